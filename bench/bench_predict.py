"""Latency predictor benchmark: a fitted predictor vs the roofline on held-out architectures, and a transfer.

Run from the repository root:  python -m bench.bench_predict [--budget-seconds 240] [--sizes 64,96] [--out DIR]
Refit from an earlier run's measurements (no measuring; compares fits on identical data):
    python -m bench.bench_predict --replay DIR/measurements.pkl [--reattribute]

1. Calibrate on host-cpu (ORT, 1 thread) with the designed set (hwprune.predict.designs) for --budget-seconds.
2. Held-out models, none in the calibration set: the demo families (mobilenet-tiny, resnet-tiny) with width-scaled
   variants, a ResNet-18 and a MobileNetV2 (plain torch) at two input sizes, and two transformer encoders (pre-norm
   with ReLU, and BERT's post-norm GELU layout). Each is measured (the CPU-time median with one thread, as
   calibration learns; beside the reference model and relative to it, as the designs are: `--replay --absolute`
   refits and judges the times as measured) and predicted by both estimators.
   A third estimator is fitted on the first half of the same calibration's models: what a calibration half as long
   gives, side by side. Two more rows rescale each prediction by measured / predicted of the widest model of its
   family (a search's screen rescales by its dense model the same way).
3. Transfer: ORT with 2 threads as the "new device": the host predictor plus N of the held-out measurements,
   validated on the rest, for several N.
Prints a table and writes predict.csv / predict.json to --out, and every measurement to measurements.pkl.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from hwprune.predict.calibrate import (
    export_design,
    fit_measured,
    measure_designs,
    measured_from,
    reference_median,
    run_overhead_us,
    target_ms,
    with_measured_ms,
)
from hwprune.predict.designs import Design, design_by_name, reference_design
from hwprune.predict.features import graph_features
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


def _encoder(dim: int, tokens: int, bert: bool = False) -> Design:
    """A 2-layer ``nn.TransformerEncoder``: pre-norm with ReLU, or BERT's layout (post-norm, GELU, 4x FFN), which ONNX
    Runtime runs with other fused kernels (SkipLayerNormalization, Gelu)."""
    import torch
    from torch import nn

    if bert:
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=4 * dim, batch_first=True, norm_first=False,
                                           activation="gelu")
    else:
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=2 * dim, batch_first=True, norm_first=True)
    net = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    return Design(f"encoder-{'bert-' if bert else ''}d{dim}-t{tokens}", net.eval(), torch.randn(1, tokens, dim))


def held_out(sizes: list[int], widths: list[float]) -> list[Design]:
    """The held-out set: none of these architectures is in the calibration designs."""
    out = [_demo(n, w) for n in ("mobilenet-tiny", "resnet-tiny") for w in widths]
    out += [f(w, s) for f in (_resnet18, _mobilenet_v2) for s in sizes for w in widths]
    out += [_encoder(d, t) for d in (64, 96) for t in (32, 64)]
    out += [_encoder(128, t, bert=True) for t in (32, 64)]  # added 2026-12-08: runs before have 22 models
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
    profile = load_profile("host-cpu")
    host, dev = OrtBackend(profile), OrtBackend(profile.with_overrides(ort__intra_op_threads=2))
    with tempfile.TemporaryDirectory() as tmp:
        models = held_out([int(s) for s in args.sizes.split(",")], [float(w) for w in args.widths.split(",")])
        paths = [export_design(d, Path(tmp)) for d in models]
        ref = export_design(reference_design(), Path(tmp))

        def beside(path: Path) -> tuple[float, float]:  # (the model's ms, the reference's ms beside it)
            own, r, _ = host.measure_beside(path, ref)
            return target_ms(own), target_ms(r)

        # one round before calibration: how far the host itself drifts between calibrating and using a predictor
        before = [beside(path) for path in paths]
        t0 = time.monotonic()
        measured_profile, measured = measure_designs(profile, args.budget_seconds)
        run_us = run_overhead_us(measured_profile)
        calib_s = time.monotonic() - t0
        # the held-out models are timed beside the reference as the designs were, and taken relative to it at its
        # median over the calibration (hwprune.predict.calibrate.relative_to_reference)
        typical = reference_median(measured)
        # rounds interleave the models (round 1 over all, round 2 over all, ...): a slow spell on the shared host
        # then hits one round of every model instead of all rounds of a few
        timed: list[list[tuple[float, float]]] = [[] for _ in paths]
        dev_ms: list[list[float]] = [[] for _ in paths]
        for _ in range(max(1, args.rounds)):
            for i, path in enumerate(paths):
                timed[i].append(beside(path))
                dev_ms[i].append(dev.measure(path).latency.median_ms)
        held = [{"model": d.name, "features": graph_features(path, profile.channel_multiple),
                 "host_ms": [a / r * typical for a, r in h], "host_abs_ms": [a for a, _ in h], "threads2": t2,
                 "before_ms": b[0] / b[1] * typical, "before_abs_ms": b[0],
                 "roofline_ms": roofline(path, profile)["latency_ms"]}
                for d, path, h, t2, b in zip(models, paths, timed, dev_ms, before)]
    return {"profile": measured_profile, "measured": measured, "calibration_s": calib_s, "held": held,
            "run_us": run_us, "reference_ms": typical}


def absolute(data: dict) -> dict:
    """``data`` with every time as measured, not relative to the reference model (what calibration fitted before
    the reference): the designs' raw ms and the held-out models' own ms."""
    measured = [with_measured_ms(m, m.raw_ms) if m.raw_ms > 0 else m for m in data["measured"]]
    held = [{**h, "host_ms": h.get("host_abs_ms", h["host_ms"]), "before_ms": h.get("before_abs_ms", h["before_ms"])}
            for h in data["held"]]
    return {**data, "measured": measured, "held": held}


def reattribute(data: dict) -> dict:
    """``data`` with every model's features and node samples computed again by the current code from what was
    measured (the profiled kernels, the whole-model ms): the designs and held-out models are exported again from
    their names. Runs saved before the profiled kernels were kept are returned as they are, with a note."""
    measured = data["measured"]
    if not all(m.profiled for m in measured):
        print("reattribute: this run did not keep its profiled kernels; refitting as saved")
        return data
    profile = data["profile"]
    sizes = sorted({int(m) for h in data["held"] for m in re.findall(r"-(\d+)px$", h["model"])}) or [64]
    widths = sorted({float(w) for h in data["held"] for w in re.findall(r"-w([\d.]+)", h["model"])}) or [1.0]
    held = {d.name: d for d in held_out(sizes, widths)}
    with tempfile.TemporaryDirectory() as tmp:
        again = [dataclasses.replace(
            measured_from(m.name, export_design(design_by_name(m.name, profile.channel_multiple), Path(tmp)),
                          profile, list(m.profiled), m.measured_ms), raw_ms=m.raw_ms, reference_ms=m.reference_ms)
            for m in measured]
        new_held = [{**h, "features": graph_features(export_design(held[h["model"]], Path(tmp)),
                                                     profile.channel_multiple)} for h in data["held"]]
    return {**data, "measured": again, "held": new_held}


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
    ap.add_argument("--reattribute", action="store_true", help="with --replay: compute features and node samples "
                    "again from the saved profiles (after a change to either; exports every model again)")
    ap.add_argument("--absolute", action="store_true", help="with --replay: fit and judge the times as measured, "
                    "not relative to the reference model they were timed beside")
    ap.add_argument("--out", type=Path, default=Path("bench/results/predict"))
    args = ap.parse_args()
    if args.replay:
        data = pickle.loads(args.replay.read_bytes())
        if args.run_us is not None:
            data["run_us"] = args.run_us
        if args.reattribute:
            data = reattribute(data)
        if args.absolute:
            data = absolute(data)
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
