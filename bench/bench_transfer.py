"""Transfer benchmark: how many device measurements does `hwprune calibrate --device BOARD` need?

Run from the repository root:  python -m bench.bench_transfer [--host-cache DIR] [--devices ort-2t,tvm-untuned]

1. The host predictor: the one stored under --host-cache (a `hwprune calibrate --device host-cpu` run), else one
   calibrated here for --budget-seconds.
2. Each "device" available on this machine: ONNX Runtime with 2 threads (`ort-2t`), Apache TVM untuned
   (`tvm-untuned`: the host CPU through TVM's default schedules, different kernels from ONNX Runtime's) and TVM
   tuned (`tvm-tuned`: MetaSchedule, --tuning-trials per model; not in the default --devices: it takes an hour).
   On each, a pool of --pool designed models is measured the way `hwprune calibrate --device BOARD` measures them
   (hwprune.predict.transfer.measure_on_device), and the 22 held-out architectures of bench_predict (none is a
   design) the same way.
3. For each N in --samples: the host predictor transferred with N designs drawn from the pool (--draws random
   draws; the table gives the mean share within +-10% / +-25% and the median of the draws' median errors) and judged
   on the held-out architectures, against two baselines: the host predictor as it is, and the host predictor times
   one speed ratio (the median measured / predicted of the same N designs). The "relative" rows rescale each
   prediction by measured / predicted of the widest model of its family, as a search's screen rescales by the
   measured dense model.
Prints a table and writes transfer.csv / transfer.json to --out, and every measurement to measurements.pkl.
"""

from __future__ import annotations

import argparse
import json
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.bench_predict import _relative, held_out
from hwprune.backends import create_backend
from hwprune.predict import store
from hwprune.predict.calibrate import calibrate, export_design, target_ms
from hwprune.predict.features import graph_features
from hwprune.predict.model import Validation
from hwprune.predict.transfer import measure_on_device, transfer
from hwprune.profiles import load_profile

DEVICES = {  # name -> (profile, overrides) of another "device" on this machine
    "ort-2t": ("host-cpu", {"ort__intra_op_threads": 2}),
    "tvm-untuned": ("host-cpu-tvm", {"tvm__tuning_trials": 0}),
    "tvm-tuned": ("host-cpu-tvm", {}),  # MetaSchedule with --tuning-trials per model (its database kept per profile)
}
DEFAULT_TUNING_TRIALS = 32  # per model for tvm-tuned: minutes per held-out ResNet-18 on 2 cores


def host_predictor(args: argparse.Namespace):
    """The stored host predictor under --host-cache, else one calibrated now."""
    if args.host_cache is not None:
        p = store.find("host-cpu", 1, root=args.host_cache, runtime="ort")
        if p is None:
            raise SystemExit(f"no host-cpu ORT predictor under {args.host_cache}/predictors")
        return p, 0.0
    t0 = time.monotonic()
    return calibrate("host-cpu", args.budget_seconds, log=print), time.monotonic() - t0


def measure_device(name: str, pool: int, rounds: int, sizes: list[int], widths: list[float],
                   multiple: int, tuning_trials: int = DEFAULT_TUNING_TRIALS) -> dict:
    """The pool of designs and the held-out architectures measured on one device."""
    base, overrides = DEVICES[name]
    if name == "tvm-tuned":
        overrides = {"tvm__tuning_trials": tuning_trials}
    profile = load_profile(base).with_overrides(**overrides)
    t0 = time.monotonic()
    designs = measure_on_device(profile, multiple, pool, budget_s=1e9, log=lambda m: print(f"{name}: {m}"))
    pool_s = time.monotonic() - t0
    models = held_out(sizes, widths)
    backend = create_backend(profile)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            paths = [export_design(d, Path(tmp)) for d in models]
            feats = [graph_features(p, multiple) for p in paths]
            times: list[list[float]] = [[] for _ in paths]
            for r in range(max(1, rounds)):  # interleaved rounds: a slow spell hits one round of every model
                for i, path in enumerate(paths):
                    times[i].append(target_ms(backend.measure(path)))
                print(f"{name}: held-out round {r + 1}/{rounds} done")
    finally:
        backend.close()
    held = [{"model": d.name, "features": f, "ms": float(np.median(t)), "rounds": t}
            for d, f, t in zip(models, feats, times)]
    return {"profile": profile, "pool": designs, "pool_seconds": pool_s, "held": held}


def evaluate(host, data: dict, ns: list[int], draws: int) -> list[dict]:
    """Rows of the table for one device."""
    held = data["held"]
    meas = [h["ms"] for h in held]
    as_is = [host.predict_features(h["features"]) for h in held]
    rows = []
    v = Validation.from_pairs(as_is, meas)
    rows.append({"n": 0, "estimator": "host predictor as is", "within_10pct": v.within_10pct,
                 "within_25pct": v.within_25pct, "median_abs_error": v.median_abs_error, "draws": 1})
    pool = data["pool"]
    rng = np.random.default_rng(0)
    # what a search's screen on the device sees: each prediction rescaled by the measured dense model, here the
    # widest model of its family (one speed ratio cancels out: it is the host predictor as is)
    names = [h["model"] for h in held]
    v = Validation.from_pairs(*_relative(pd.DataFrame({"model": names, "measured_ms": meas, "p": as_is}), "p"))
    rows.append({"n": 0, "estimator": "host predictor as is, relative to the family's widest model",
                 "within_10pct": v.within_10pct, "within_25pct": v.within_25pct,
                 "median_abs_error": v.median_abs_error, "draws": 1})
    for n in ns:
        if n > len(pool):
            continue
        fits: dict[str, list[Validation]] = {"transfer (per-family correction)": [], "host x one speed ratio": [],
                                             "transfer, relative to the family's widest model": []}
        for _ in range(draws if n < len(pool) else 1):
            pick = [pool[i] for i in rng.choice(len(pool), n, replace=False)]
            dev = transfer(host, [(s.features, s.ms) for s in pick], profile="bench-device")
            pred = [dev.predict_features(h["features"]) for h in held]
            fits["transfer (per-family correction)"].append(Validation.from_pairs(pred, meas))
            fits["transfer, relative to the family's widest model"].append(Validation.from_pairs(
                *_relative(pd.DataFrame({"model": names, "measured_ms": meas, "p": pred}), "p")))
            ratio = float(np.median([s.ms / host.predict_features(s.features) for s in pick]))
            fits["host x one speed ratio"].append(Validation.from_pairs([p * ratio for p in as_is], meas))
        for est, vs in fits.items():
            rows.append({"n": n, "estimator": est, "within_10pct": float(np.mean([x.within_10pct for x in vs])),
                         "within_25pct": float(np.mean([x.within_25pct for x in vs])),
                         "median_abs_error": float(np.median([x.median_abs_error for x in vs])), "draws": len(vs)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host-cache", type=Path, help="cache root holding a stored host-cpu predictor")
    ap.add_argument("--budget-seconds", type=float, default=240.0, help="host calibration time without --host-cache")
    ap.add_argument("--devices", default="ort-2t,tvm-untuned", help=f"of {', '.join(DEVICES)}")
    ap.add_argument("--pool", type=int, default=40, help="designed models measured on each device")
    ap.add_argument("--samples", default="3,5,10,20,30", help="device measurements a transfer gets")
    ap.add_argument("--draws", type=int, default=20, help="random draws of the samples from the pool per N")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the held-out set (median)")
    ap.add_argument("--sizes", default="64,96", help="input sizes of ResNet-18 / MobileNetV2")
    ap.add_argument("--widths", default="1,0.75,0.5", help="width multipliers of the held-out CNNs")
    ap.add_argument("--tuning-trials", type=int, default=DEFAULT_TUNING_TRIALS,
                    help="MetaSchedule trials per model on tvm-tuned")
    ap.add_argument("--replay", type=Path, help="evaluate this measurements.pkl instead of measuring")
    ap.add_argument("--out", type=Path, default=Path("bench/results/transfer"))
    args = ap.parse_args()
    ns = [int(x) for x in args.samples.split(",")]
    if args.replay:
        saved = pickle.loads(args.replay.read_bytes())
        host, host_s, devices = saved["host"], saved["host_seconds"], saved["devices"]
    else:
        host, host_s = host_predictor(args)
        devices = {}
        for name in args.devices.split(","):
            devices[name] = measure_device(name, args.pool, args.rounds, [int(s) for s in args.sizes.split(",")],
                                           [float(w) for w in args.widths.split(",")], host.channel_multiple,
                                           args.tuning_trials)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "measurements.pkl").write_bytes(pickle.dumps({"host": host, "host_seconds": host_s,
                                                                   "devices": devices}))
    rows = []
    for name, data in devices.items():
        speed = float(np.median([h["ms"] / host.predict_features(h["features"]) for h in data["held"]]))
        print(f"\n{name}: pool of {len(data['pool'])} designs measured in {data['pool_seconds']:.0f} s; held-out "
              f"models run {speed:.2f}x the host predictor's time (median)")
        rows += [{"device": name, **r} for r in evaluate(host, data, ns, args.draws)]
    df = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "transfer.csv", index=False)
    (args.out / "transfer.json").write_text(json.dumps({
        "host": {"fitted_on": host.fitted_on, "validation": host.describe(), "calibration_s": host_s},
        "devices": {n: {"pool": len(d["pool"]), "pool_seconds": d["pool_seconds"],
                        "held": [{"model": h["model"], "ms": h["ms"]} for h in d["held"]]}
                    for n, d in devices.items()},
        "results": rows}, indent=1, default=float))
    print(f"\nhost predictor: {host.fitted_on} models, {host.describe()['within_10pct']:.0%} of held-out designs "
          "within +-10%")
    print(df.to_string(index=False, float_format=lambda x: f"{x:.2f}"))


if __name__ == "__main__":
    main()
