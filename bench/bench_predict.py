"""Latency predictor benchmark: a fitted predictor vs the roofline on held-out architectures, and a transfer.

Run from the repository root:  python -m bench.bench_predict [--budget-seconds 240] [--sizes 64,96] [--out DIR]
Refit from an earlier run's measurements (no measuring; compares fits on identical data):
    python -m bench.bench_predict --replay DIR/measurements.pkl

1. Calibrate on host-cpu (ORT, 1 thread) with the designed set (hwprune.predict.designs) for --budget-seconds.
2. Held-out models, none in the calibration set: the demo families (mobilenet-tiny, resnet-tiny) with width-scaled
   variants, a ResNet-18 and a MobileNetV2 (plain torch) at two input sizes, and a transformer encoder. Each is
   measured (the CPU-time median with one thread, as calibration learns) and predicted by both estimators.
   A third estimator is fitted on the first half of the same calibration's models: what a calibration half as long
   gives, side by side. Two more rows rescale each prediction by measured / predicted of the widest model of its
   family (a search's screen rescales by its dense model the same way).
3. Transfer: ORT with 2 threads as the "new device": the host predictor plus N of the held-out measurements,
   validated on the rest, for several N.
Prints a table and writes predict.csv / predict.json to --out, and every measurement to measurements.pkl.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from hwprune.backends.estimate import roofline
from hwprune.backends.ort import OrtBackend
from hwprune.predict.calibrate import export_design, fit_measured, measure_designs, run_overhead_us, target_ms
from hwprune.predict.designs import Design
from hwprune.predict.model import Validation
from hwprune.predict.transfer import transfer
from hwprune.profiles import load_profile


def _resnet18(width: float, size: int) -> Design:
    import torch
    from hwprune.subjects.models import ResNet

    w = tuple(max(8, int(c * width)) for c in (64, 128, 256, 512))
    # ResNet-18's 4 stages x 2 basic blocks at 64-512 channels (stride-2 3x3 stem; no max-pool in this ResNet)
    net = ResNet(num_classes=1000, widths=w, blocks=2, stem_stride=2)
    return Design(f"resnet18-w{width:g}-{size}px", net.eval(), torch.randn(1, 3, size, size))


def _mobilenet_v2(width: float, size: int) -> Design:
    import torch
    from hwprune.subjects.models import MobileNetV2

    return Design(f"mobilenetv2-w{width:g}-{size}px", MobileNetV2(num_classes=1000, width=width).eval(),
                  torch.randn(1, 3, size, size))


def _demo(name: str, width: float) -> Design:
    import torch
    from hwprune.subjects import models

    if name == "resnet-tiny":
        net = models.ResNet(10, widths=tuple(max(4, int(c * width)) for c in (16, 32, 64)), blocks=2, stem_stride=2)
    else:
        net = models.MobileNetV2(10, width=width, stem_stride=2, settings=models.MOBILENET_TINY, last_channels=256,
                                 se=True)
    return Design(f"{name}-w{width:g}", net.eval(), torch.randn(1, 3, 32, 32))


def _encoder(dim: int, tokens: int) -> Design:
    import torch
    from torch import nn

    layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=2 * dim, batch_first=True, norm_first=True)
    net = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    return Design(f"encoder-d{dim}-t{tokens}", net.eval(), torch.randn(1, tokens, dim))


def held_out(sizes: list[int], widths: list[float]) -> list[Design]:
    """The held-out set: none of these architectures is in the calibration designs."""
    out = [_demo(n, w) for n in ("mobilenet-tiny", "resnet-tiny") for w in widths]
    out += [f(w, s) for f in (_resnet18, _mobilenet_v2) for s in sizes for w in widths]
    out += [_encoder(d, t) for d in (64, 96) for t in (32, 64)]
    return out


def _family(name: str) -> str:
    """The held-out model's family: its name without the width (``-w0.5``) or, for encoders, the token count."""
    return name.split("-t")[0] if name.startswith("encoder") else re.sub(r"-w[\d.]+", "", name)


def _relative(df: pd.DataFrame, col: str) -> tuple[list[float], list[float]]:
    """Predictions of ``col`` rescaled by measured / predicted of the first (widest) model of each family, as a
    search's screen rescales by its dense model; the references themselves are left out."""
    pred, meas = [], []
    for _, g in df.groupby(df.model.map(_family), sort=False):
        ref = g.iloc[0]
        for _, r in g.iloc[1:].iterrows():
            pred.append(float(r[col] * ref.measured_ms / ref[col]))
            meas.append(float(r.measured_ms))
    return pred, meas


def _spearman(a: list[float], b: list[float]) -> float:
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 2 else float("nan")


def _stats(pred: list[float], meas: list[float]) -> dict[str, float]:
    v = Validation.from_pairs(pred, meas)
    return {"n": v.n_models, "within_10pct": v.within_10pct, "within_25pct": v.within_25pct,
            "median_abs_error": v.median_abs_error, "spearman": _spearman(pred, meas)}


def measure(args: argparse.Namespace) -> dict:
    """Calibrate and measure the held-out set; everything the fits and the table need, without ONNX files."""
    from hwprune.predict.features import graph_features

    profile = load_profile("host-cpu")
    host, dev = OrtBackend(profile), OrtBackend(profile.with_overrides(ort__intra_op_threads=2))
    with tempfile.TemporaryDirectory() as tmp:
        models = held_out([int(s) for s in args.sizes.split(",")], [float(w) for w in args.widths.split(",")])
        paths = [export_design(d, Path(tmp)) for d in models]
        # one round before calibration: how far the host itself drifts between calibrating and using a predictor
        before = [target_ms(host.measure(path)) for path in paths]
        t0 = time.monotonic()
        measured_profile, measured = measure_designs(profile, args.budget_seconds)
        run_us = run_overhead_us(measured_profile)
        calib_s = time.monotonic() - t0
        # rounds interleave the models (round 1 over all, round 2 over all, ...): a slow spell on the shared host
        # then hits one round of every model instead of all rounds of a few
        host_ms: list[list[float]] = [[] for _ in paths]
        dev_ms: list[list[float]] = [[] for _ in paths]
        for _ in range(max(1, args.rounds)):
            for i, path in enumerate(paths):
                host_ms[i].append(target_ms(host.measure(path)))
                dev_ms[i].append(dev.measure(path).latency.median_ms)
        held = [{"model": d.name, "features": graph_features(path, profile.channel_multiple), "host_ms": h,
                 "threads2": t2, "before_ms": b, "roofline_ms": roofline(path, profile)["latency_ms"]}
                for d, path, h, t2, b in zip(models, paths, host_ms, dev_ms, before)]
    return {"profile": measured_profile, "measured": measured, "calibration_s": calib_s, "held": held,
            "run_us": run_us}


def evaluate(data: dict, transfer_n: list[int]) -> tuple[pd.DataFrame, list[dict], object]:
    """Fit on the saved calibration and score the held-out models: (per-model frame, table rows, predictor)."""
    measured_profile, measured, run_us = data["profile"], data["measured"], data.get("run_us", 0.0)
    predictor = fit_measured(measured_profile, measured, run_us)
    # the same calibration cut at half its models: what a calibration half as long would have fitted (the first
    # half was measured earlier, so it also carries the host's drift since)
    half = fit_measured(measured_profile, measured[: len(measured) // 2], run_us)
    held = data["held"]
    df = pd.DataFrame([{"model": h["model"], "measured_ms": float(np.median(h["host_ms"])),
                        "fitted_ms": predictor.predict_ms(h["features"]),
                        "fitted_half_ms": half.predict_ms(h["features"]), "roofline_ms": h["roofline_ms"],
                        "threads2_ms": float(np.median(h["threads2"]))} for h in held])
    table = [{"estimator": name, **_stats(df[col].tolist(), df.measured_ms.tolist())}
             for name, col in (("roofline", "roofline_ms"), ("fitted", "fitted_ms"),
                               (f"fitted on the first half ({half.fitted_on} models)", "fitted_half_ms"))]
    # what a search's screen sees: each prediction relative to a measured model of the same family
    table += [{"estimator": f"{name}, relative to the family's widest model (as the screen)",
               **_stats(*_relative(df, col))} for name, col in (("roofline", "roofline_ms"), ("fitted", "fitted_ms"))]
    if min(len(h["host_ms"]) for h in held) >= 3:
        # the noise ceiling: how often one round of measurement lands within +-10% of the median of the other
        # rounds. No predictor can be judged more precisely than the measurement it is judged against
        one = [h["host_ms"][0] for h in held]
        rest = [float(np.median(h["host_ms"][1:])) for h in held]
        table.append({"estimator": "noise: one round vs the other rounds' median", **_stats(one, rest)})
    table.append({"estimator": "drift: a round before calibration vs the median after",
                  **_stats([h["before_ms"] for h in held], df.measured_ms.tolist())})
    rng = np.random.default_rng(0)
    for n in transfer_n:
        pick = rng.permutation(len(df))
        fit_i, val_i = pick[:n], pick[n:]
        dev_p = transfer(predictor, [(held[i]["features"], df.threads2_ms[i]) for i in fit_i], profile="host-cpu-2t",
                         threads=2)
        pred = [dev_p.predict_ms(held[i]["features"]) for i in val_i]
        table.append({"estimator": f"transfer to 2 threads, {n} samples",
                      **_stats(pred, df.threads2_ms[val_i].tolist())})
        host_as_is = [predictor.predict_ms(held[i]["features"]) for i in val_i]
        table.append({"estimator": "host predictor as is, on 2 threads",
                      **_stats(host_as_is, df.threads2_ms[val_i].tolist())})
    return df, table, predictor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-seconds", type=float, default=240.0, help="calibration measuring time")
    ap.add_argument("--sizes", default="64,96", help="input sizes of ResNet-18 / MobileNetV2")
    ap.add_argument("--widths", default="1,0.75,0.5", help="width multipliers of the held-out CNNs")
    ap.add_argument("--transfer-n", default="3,5,10", help="device measurements the transfer gets")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measuring rounds of the held-out set (median)")
    ap.add_argument("--replay", type=Path, help="refit from this measurements.pkl instead of measuring")
    ap.add_argument("--run-us", type=float, help="with --replay: the runtime's per-run cost in us to fit with "
                    "(default: the one the run measured; 0 for runs saved before it was measured)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/predict"))
    args = ap.parse_args()
    if args.replay:
        data = pickle.loads(args.replay.read_bytes())
        if args.run_us is not None:
            data["run_us"] = args.run_us
    else:
        data = measure(args)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "measurements.pkl").write_bytes(pickle.dumps(data))
    df, table, predictor = evaluate(data, [int(x) for x in args.transfer_n.split(",")])
    res = pd.DataFrame(table)
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "predict_models.csv", index=False)
    res.to_csv(args.out / "predict.csv", index=False)
    (args.out / "predict.json").write_text(json.dumps({
        "calibration": {"seconds": data["calibration_s"], "models": predictor.fitted_on,
                        "run_us": data.get("run_us", 0.0),
                        "nodes": len(predictor.node_samples), "validation": predictor.describe(),
                        "replayed_from": str(args.replay) if args.replay else None},
        "results": table}, indent=1, default=float))
    print(df.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"\ncalibration: {predictor.fitted_on} models in {data['calibration_s']:.0f} s; run cost "
          f"{data.get('run_us', 0.0):.1f} us; held-out calibration designs: "
          f"{predictor.describe()['within_10pct']:.0%} within +-10%")
    print(res.to_string(index=False, float_format=lambda x: f"{x:.2f}"))


if __name__ == "__main__":
    main()
