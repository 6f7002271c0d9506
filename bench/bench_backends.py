"""Benchmark: one model family through every backend, side by side, in one run.

For a dense demo-sized model and two narrower ("pruned") variants of it:

* ONNX Runtime on this machine (1 thread);
* TVM on this machine, untuned (the default pipeline only legalizes ops) and MetaSchedule-tuned, with the tuning time
  and how many tuning tasks the shared database already had for the second and third model;
* TVM over the loopback RPC path (a real tracker + rpc_server on 127.0.0.1): latency timed on the "board" and the
  per-measurement overhead split into compile, connect, upload, load and time - the number that decides how many
  trials per hour a real board can serve.

Results: a table on stdout and ``bench/results/bench_backends.{csv,json}``. The tuning database starts empty (a fresh
cache folder) unless ``--cache`` names one, so the tuning times are from scratch.

    python -m bench.bench_backends                      # ~5-10 min on a 2-core host
    python -m bench.bench_backends --tuning-trials 16   # shorter
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# Variants: the demo subject "resnet-tiny" (trained on first use, then cached) and two physically pruned copies of it,
# every channel group pruned uniformly with widths rounded to multiples of 16 (host-cpu's channel multiple).
VARIANTS: list[tuple[str, float]] = [
    ("dense", 0.0),
    ("pruned-25%", 0.25),
    ("pruned-50%", 0.5),
]


def _build(ratio: float):
    """The demo subject's model, pruned by ``ratio`` in every channel group; returns (model, widths by layer)."""
    from hwprune.api import prune
    from hwprune.subjects.demo import build_demo

    subject = build_demo("resnet-tiny")
    pruned = prune(subject.model, subject.example_inputs, ratio, channel_multiple=16, max_ratio=0.9)
    return pruned.module.eval(), sorted({kept for _, kept in pruned.widths.values()})


def _export(model: Any, path: Path) -> Path:
    import torch

    from hwprune.export import export_onnx

    # The dynamo exporter: its graphs have static pads, which TVM's importer needs.
    return export_onnx(model, (torch.randn(1, 3, 32, 32),), path, exporter="dynamo")


def _count(model: Any) -> tuple[int | None, int]:
    import torch

    params = sum(p.numel() for p in model.parameters())
    try:
        from hwprune.pruning.apply import count_macs_params

        macs, params = count_macs_params(model, (torch.randn(1, 3, 32, 32),))
        return macs, params
    except Exception:  # noqa: BLE001 - MACs are context, not the point of this benchmark
        return None, params


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tuning-trials", type=int, default=64, help="MetaSchedule trials per model (0: skip tuning)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--min-repeat-ms", type=float, default=20.0)
    ap.add_argument("--no-rpc", action="store_true", help="skip the loopback RPC measurements")
    ap.add_argument("--cache", default="", help="HWPRUNE_CACHE to use (default: a fresh temporary folder)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)

    tmp = tempfile.TemporaryDirectory(prefix="hwprune-bench-")
    os.environ["HWPRUNE_CACHE"] = args.cache or os.path.join(tmp.name, "cache")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    from hwprune.backends.ort import OrtBackend
    from hwprune.backends.tvm import TvmBackend, TvmRpcBackend, tvm_versions
    from hwprune.profiles import load_profile
    from hwprune.rpc_local import LocalRpc

    common = {"measure__warmup": args.warmup, "measure__repeats": args.repeats,
              "measure__min_repeat_ms": args.min_repeat_ms}
    ort_profile = load_profile("host-cpu").with_overrides(**common)
    tvm_untuned = load_profile("host-cpu-tvm").with_overrides(tvm__tuning_trials=0, **common)
    # Same profile name as the untuned one would share its compile cache key only if the budget matched; it does not.
    tvm_tuned = load_profile("host-cpu-tvm").with_overrides(tvm__tuning_trials=args.tuning_trials, **common)

    t_start = time.perf_counter()
    models = []
    for label, ratio in VARIANTS:
        model, widths = _build(ratio)
        label = f"{label} (widths {'-'.join(map(str, widths))})"
        macs, params = _count(model)
        path = _export(model, Path(tmp.name) / f"{label.split()[0]}.onnx")
        models.append({"label": label, "widths": list(widths), "path": path, "macs": macs, "params": params})
    print(f"exported {len(models)} models in {time.perf_counter() - t_start:.1f} s", flush=True)

    rows: list[dict[str, Any]] = []
    ort = OrtBackend(ort_profile)
    untuned = TvmBackend(tvm_untuned)
    tuned = TvmBackend(tvm_tuned) if args.tuning_trials > 0 else None
    for i, mdl in enumerate(models):
        row: dict[str, Any] = {"model": mdl["label"], "widths": mdl["widths"], "params": mdl["params"],
                               "macs": mdl["macs"]}
        m = ort.measure(mdl["path"])
        row.update(ort_ms=m.latency.median_ms, ort_min_ms=m.latency.min_ms, ort_cv=m.latency.cv)
        m = untuned.measure(mdl["path"])
        row.update(tvm_untuned_ms=m.latency.median_ms, tvm_untuned_cv=m.latency.cv,
                   tvm_compile_s=m.stage_seconds.get("compile", 0))
        if tuned is not None:
            t0 = time.perf_counter()
            m = tuned.measure(mdl["path"])
            info = m.extra.get("tuning", {})
            row.update(tvm_tuned_ms=m.latency.median_ms, tvm_tuned_cv=m.latency.cv,
                       tune_s=m.stage_seconds.get("tune"), tuned_build_s=time.perf_counter() - t0,
                       tasks=info.get("tasks"), tasks_tuned=info.get("tasks_tuned"),
                       tasks_reused=info.get("tasks_reused"))
        rows.append(row)
        print(f"[{i + 1}/{len(models)}] {mdl['label']}: ORT {row['ort_ms']:.3f} ms, TVM untuned "
              f"{row['tvm_untuned_ms']:.3f} ms" + (f", tuned {row['tvm_tuned_ms']:.3f} ms (tuning "
                                                   f"{row['tune_s']:.0f} s, {row['tasks_reused']}/{row['tasks']} "
                                                   "tasks from the database)" if tuned else ""), flush=True)

    if not args.no_rpc:
        with LocalRpc(key="bench") as rpc:
            rpc_profile = tvm_untuned.with_overrides(backend="tvm-rpc", rpc__tracker=rpc.tracker, rpc__key="bench")
            remote = TvmRpcBackend(rpc_profile)
            # A compile cache of its own: the first measurement of each model pays the compile, as in a search.
            remote.compiler.cache_dir = Path(tmp.name) / "rpc-compiled"
            for row, mdl in zip(rows, models):
                first = remote.measure(mdl["path"])
                again = remote.measure(mdl["path"])
                st = first.stage_seconds
                compile_s = st.get("compile", 0)
                row.update(rpc_ms=first.latency.median_ms, rpc_again_ms=again.latency.median_ms,
                           rpc_compile_s=compile_s, rpc_connect_s=st.get("connect"), rpc_upload_s=st.get("upload"),
                           rpc_load_s=st.get("load"), rpc_time_s=st.get("timing"),
                           rpc_overhead_s=compile_s + sum(st.get(k, 0) for k in ("connect", "upload", "load")),
                           rpc_total_s=compile_s + sum(st.get(k, 0) for k in ("connect", "upload", "load",
                                                                              "timing")),
                           rpc_again_total_s=sum(again.stage_seconds.get(k, 0)
                                                 for k in ("connect", "upload", "load", "timing")))
                print(f"  RPC {row['model']}: {row['rpc_ms']:.3f} ms on the loopback board; per measurement "
                      f"{row['rpc_total_s']:.2f} s (compile {compile_s:.2f}, connect {st.get('connect', 0):.2f}, "
                      f"upload {st.get('upload', 0):.3f}, load {st.get('load', 0):.3f}, time "
                      f"{st.get('timing', 0):.2f})", flush=True)

    for row in rows:
        row["tvm_untuned_vs_ort"] = row["tvm_untuned_ms"] / row["ort_ms"]
        if "tvm_tuned_ms" in row:
            row["tvm_tuned_vs_ort"] = row["tvm_tuned_ms"] / row["ort_ms"]
        row["ort_vs_dense"] = row["ort_ms"] / rows[0]["ort_ms"]
        if "tvm_tuned_ms" in row:
            row["tvm_tuned_vs_dense"] = row["tvm_tuned_ms"] / rows[0]["tvm_tuned_ms"]
    if tuned is not None and rows[0].get("tune_s"):
        for row in rows[1:]:
            row["tune_saving_vs_dense"] = 1.0 - (row["tune_s"] or 0.0) / rows[0]["tune_s"]

    wall = time.perf_counter() - t_start
    meta = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": wall, "host": platform.node(),
        "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": {**tvm_versions(), "onnxruntime": __import__("onnxruntime").__version__,
                     "python": platform.python_version()},
        "settings": {"tuning_trials": args.tuning_trials, "repeats": args.repeats, "warmup": args.warmup,
                     "min_repeat_ms": args.min_repeat_ms, "ort_threads": 1,
                     "tvm_target": tvm_tuned.tvm.target, "cost_model": __import__(
                         "hwprune.backends.tvm", fromlist=["cost_model_name"]).cost_model_name()},
        "note": "latency = median ms over the repeats; loopback RPC runs on this same CPU (its latency checks the "
                "path, the overhead split is what a real board adds per measurement besides network transfer)",
    }
    (out_dir / "bench_backends.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    fields = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 999)
    with open(out_dir / "bench_backends.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in r.items()})

    print()
    print(_table(rows))
    print(f"\nwall {wall:.0f} s; results in {out_dir}/bench_backends.csv and .json")
    tmp.cleanup()
    return 0


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _table(rows: list[dict[str, Any]]) -> str:
    """Markdown table (pasteable into the README)."""
    head = ("| model | params | ORT ms | TVM untuned ms (x ORT) | TVM tuned ms (x ORT) | tuning s (tasks from DB) "
            "| RPC ms | RPC per measurement s: compile + connect + upload + load + time |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        tuned = (f"{_fmt(r.get('tvm_tuned_ms'))} ({_fmt(r.get('tvm_tuned_vs_ort'), '.1f')}x)"
                 if r.get("tvm_tuned_ms") is not None else "-")
        tune = (f"{_fmt(r.get('tune_s'), '.0f')} ({r.get('tasks_reused')}/{r.get('tasks')})"
                if r.get("tune_s") is not None else "-")
        rpc = (f"{_fmt(r.get('rpc_total_s'), '.2f')} = {_fmt(r.get('rpc_compile_s'), '.2f')} + "
               f"{_fmt(r.get('rpc_connect_s'), '.2f')} + {_fmt(r.get('rpc_upload_s'), '.3f')} + "
               f"{_fmt(r.get('rpc_load_s'), '.3f')} + {_fmt(r.get('rpc_time_s'), '.2f')}"
               if r.get("rpc_total_s") is not None else "-")
        lines.append(f"| {r['model']} | {r['params']:,} | {_fmt(r['ort_ms'])} | {_fmt(r['tvm_untuned_ms'])} "
                     f"({_fmt(r['tvm_untuned_vs_ort'], '.1f')}x) | {tuned} | {tune} | {_fmt(r.get('rpc_ms'))} | "
                     f"{rpc} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
