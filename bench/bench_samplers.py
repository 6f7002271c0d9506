"""Benchmark: which Optuna sampler should hwprune's search use by default? Chosen by measurement, not by habit.

On the demo subject (``mobilenet-tiny``, ``host-cpu``, latency budget 0.6x dense), it runs one complete
``hwprune.search(...)`` per sampler and seed, each into its own run folder, with the same trial count, the same
per-trial fine-tune and no final fine-tune:

  tpe     multivariate TPE (n_startup_trials = max(8, min(16, knobs)))
  nsga2   NSGA-II (population 16)
  gp      Gaussian-process sampler
  random  random search (the floor every sampler must beat)

and reports, as the median over seeds: the hypervolume of the feasible front after N trials and halfway, how many
trials were feasible, the first feasible trial, the best feasible accuracy (the search's accuracy proxy) and the
wall time.

One budget and one normalisation for every run. A search given a relative budget ("0.6x") resolves it from the one
dense measurement it makes at its start, and normalises its hypervolume (summary.json ``search.hypervolume``) by that
measurement too; on a busy host that measurement varied 1.7x between runs, and the hypervolume followed it
(correlation 0.81), not the sampler. So the dense model is measured here first (``--dense-rounds`` measurements, the
median), every search gets the same absolute budget (``--budget`` x that), and the hypervolume is recomputed from each
run's trials.csv with the same reference (hwprune's own ``hypervolume_history``: accuracy, latency, memory divided by
the dense model's, reference point (1, 2, 2)). summary.json's own hypervolume is reported beside it.

All runs share one dense model and data (the subject is built once; a search's ``seed`` only drives its sampler).
The first two trials of every run are the same uniform warm-start candidates (ratios 0.25 and 0.5).

Outputs: a Markdown table on stdout, ``<out>/bench_samplers.csv`` (one row per run) and ``<out>/bench_samplers.json``
(runs and medians). Run folders go to ``<out>/runs-samplers/``.

    python -m bench.bench_samplers --quick      # 1 seed x 12 trials per sampler: a smoke test, ~3 min
    python -m bench.bench_samplers              # 3 seeds x 30 trials per sampler, ~17 min on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

import pandas as pd  # noqa: E402
import torch  # noqa: E402

import hwprune  # noqa: E402
from hwprune.errors import BudgetUnreachable  # noqa: E402
from hwprune.export import export_onnx  # noqa: E402
from hwprune.backends.ort import OrtBackend  # noqa: E402
from hwprune.study.pareto import hypervolume_history  # noqa: E402
from hwprune.study.records import ModelRecord  # noqa: E402
from hwprune.subjects import build_demo  # noqa: E402
from hwprune.subjects.base import Subject  # noqa: E402

SAMPLERS = ("tpe", "nsga2", "gp", "random")
PROFILE = "host-cpu"


def say(msg: str) -> None:
    """Progress line on stderr (stdout carries only the tables)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fresh_subject(base: Subject) -> Subject:
    """The same subject with its training batches restarted at epoch 0, so every run fine-tunes on the same data."""
    subject = copy.copy(base)
    data = copy.copy(base.train_data)
    if hasattr(data, "_epoch"):
        data._epoch = 0
    subject.train_data = data
    return subject


def _hv_at(history: list[Any], trials: int) -> float:
    """Hypervolume after the first ``trials`` complete trials (0 when none)."""
    values = [hv for _, hv in history[:trials]]
    return float(values[-1]) if values else 0.0


def dense_reference(subject: Subject, rounds: int, workdir: Path) -> dict[str, float]:
    """The dense model's accuracy, latency (median over ``rounds`` measurements of the wall median) and memory."""
    path = export_onnx(subject.model, subject.example_inputs, workdir / "dense.onnx")
    backend = OrtBackend(PROFILE)
    ms = [backend.measure(path) for _ in range(rounds)]
    return {"accuracy": float(subject.evaluate(subject.model)),
            "latency_ms": statistics.median(m.latency.median_ms for m in ms),
            "latency_ms_each": [m.latency.median_ms for m in ms],
            "memory_mb": ms[0].memory.total_mb}


def run_one(base: Subject, sampler: str, seed: int, args: argparse.Namespace, runs_dir: Path,
            dense: dict[str, float]) -> dict[str, Any]:
    """One search with the common absolute budget; what it found, read back from its run folder."""
    study = f"{sampler}-s{seed}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    note = ""
    try:
        hwprune.search(fresh_subject(base), PROFILE, latency_budget_ms=args.budget * dense["latency_ms"],
                       trials=args.trials,
                       sampler=sampler, seed=seed, out=runs_dir, study=study, final_finetune_steps=0,
                       trial_finetune_steps=args.trial_finetune_steps, progress=False)
    except BudgetUnreachable as exc:
        note = str(exc)
    wall = time.perf_counter() - t0
    run_dir = runs_dir / study
    summary = json.loads((run_dir / "summary.json").read_text())
    dense_record = ModelRecord.from_dict(summary["dense"])
    s = summary["search"]
    trials = pd.read_csv(run_dir / "trials.csv")
    complete = trials[trials["state"] == "COMPLETE"]
    feasible = complete[complete["feasible"].astype(bool)]
    first_feasible = int(feasible["trial"].min()) if not feasible.empty else None
    best = max((m["accuracy_proxy"] for m in summary["pareto"]), default=None)
    common = hypervolume_history(complete, (dense["accuracy"], dense["latency_ms"], dense["memory_mb"])) \
        if not complete.empty else []
    return {
        "sampler": sampler, "seed": seed, "trials_complete": int(s["trials_complete"]),
        "trials_failed": int(s["trials_failed"]), "trials_cached": int(s["trials_cached"]),
        "hypervolume": _hv_at(common, args.trials),
        "hypervolume_half": _hv_at(common, args.trials // 2),
        "summary_hypervolume": _hv_at(s["hypervolume"], args.trials),
        "feasible_trials": int(len(feasible)), "first_feasible_trial": first_feasible,
        "best_feasible_accuracy": best, "pareto_models": len(summary["pareto"]),
        "dense_accuracy": dense_record.accuracy, "dense_latency_ms": dense_record.latency_ms.median,
        "budget_ms": summary["request"].get("latency_budget_ms"), "wall_seconds": round(wall, 1),
        "search_wall_seconds": s["wall_seconds"], "sampler_repr": summary["request"].get("sampler_repr"),
        "run_dir": str(run_dir), "note": note,
    }


def _median(values: list[Any]) -> float | None:
    clean = [v for v in values if v is not None]
    return statistics.median(clean) if clean else None


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median (and range) over seeds, per sampler, best hypervolume first."""
    rows = []
    for sampler in dict.fromkeys(r["sampler"] for r in runs):
        mine = [r for r in runs if r["sampler"] == sampler]
        row: dict[str, Any] = {"sampler": sampler, "seeds": len(mine)}
        for key in ("hypervolume", "hypervolume_half", "summary_hypervolume", "feasible_trials",
                    "first_feasible_trial", "best_feasible_accuracy", "wall_seconds"):
            vals = [r[key] for r in mine if r[key] is not None]
            row[key] = _median(vals)
            row[key + "_range"] = (min(vals), max(vals)) if vals else None
        row["failed"] = sum(r["trials_failed"] for r in mine)
        rows.append(row)
    return sorted(rows, key=lambda r: -(r["hypervolume"] or 0.0))


def table(rows: list[dict[str, Any]], trials: int) -> str:
    """Markdown table of the medians over seeds (range in brackets when there are several seeds)."""
    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        v, rng = row[key], row[key + "_range"]
        if v is None:
            return "–"
        text = format(v, fmt)
        if row["seeds"] > 1 and rng is not None:
            text += f" ({format(rng[0], fmt)}–{format(rng[1], fmt)})"
        return text

    lines = [f"| sampler | seeds | hypervolume @ {trials} | hypervolume @ {trials // 2} "
             f"| summary.json hypervolume @ {trials} | feasible trials | first feasible trial "
             "| best feasible accuracy | wall s | failed trials |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['seeds']} | {cell(r, 'hypervolume', '.4f')} "
                     f"| {cell(r, 'hypervolume_half', '.4f')} | {cell(r, 'summary_hypervolume', '.4f')} "
                     f"| {cell(r, 'feasible_trials', 'g')} "
                     f"| {cell(r, 'first_feasible_trial', 'g')} | {cell(r, 'best_feasible_accuracy', '.3f')} "
                     f"| {cell(r, 'wall_seconds', '.0f')} | {r['failed']} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed x 12 trials per sampler (a smoke test)")
    p.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated subset of tpe,nsga2,gp,random")
    p.add_argument("--seeds", type=int, default=None, help="seeds per sampler (default 3; quick 1)")
    p.add_argument("--trials", type=int, default=None, help="trials per search (default 30; quick 12)")
    p.add_argument("--trial-finetune-steps", type=int, default=5, help="per-trial fine-tune steps (default 5)")
    p.add_argument("--budget", type=float, default=0.6, help="latency budget as a fraction of dense (default 0.6)")
    p.add_argument("--dense-rounds", type=int, default=7,
                   help="measurements of the dense model behind the common budget and reference (default 7)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads for BN re-calibration and evaluation (default 1; see bench/README.md)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    args.samplers = args.samplers.split(",")
    args.seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    args.trials = args.trials if args.trials is not None else (12 if args.quick else 30)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.torch_threads)
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    base = build_demo("mobilenet-tiny", seed=0, log=say)
    runs_dir = out / "runs-samplers"
    runs_dir.mkdir(parents=True, exist_ok=True)
    dense = dense_reference(base, args.dense_rounds, runs_dir)
    say(f"dense: accuracy {dense['accuracy']:.4f}, latency {dense['latency_ms']:.4f} ms (median of "
        f"{args.dense_rounds}: {', '.join(f'{x:.4f}' for x in dense['latency_ms_each'])}); every search gets the "
        f"budget {args.budget * dense['latency_ms']:.4f} ms")
    runs: list[dict[str, Any]] = []
    # seeds in the outer loop: a drift in the host's load then spreads over every sampler instead of one
    for seed in range(args.seeds):
        for sampler in args.samplers:
            say(f"{sampler}, seed {seed}: {args.trials} trials...")
            r = run_one(base, sampler, seed, args, runs_dir, dense)
            say(f"  hypervolume {r['hypervolume']:.4f}, {r['feasible_trials']} feasible, best accuracy "
                f"{r['best_feasible_accuracy']}, {r['wall_seconds']:.0f} s")
            runs.append(r)
    rows = aggregate(runs)
    wall = time.perf_counter() - t0
    command = "python -m bench.bench_samplers " + " ".join(sys.argv[1:] if argv is None else argv)
    report = "\n".join([
        f"## bench_samplers: hwprune's search per Optuna sampler (mobilenet-tiny, {PROFILE}, budget {args.budget:g}x)",
        "", f"`{command}` — {dt.datetime.now().isoformat(timespec='minutes')}, {wall / 60:.1f} min, load average "
        f"{load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end; {args.trials} trials per run, "
        f"{args.trial_finetune_steps} fine-tune steps per trial, medians over {args.seeds} seed(s)"
        + (" (range in brackets)" if args.seeds > 1 else "")
        + f"; dense model {dense['latency_ms']:.4f} ms (median of {args.dense_rounds} measurements), common budget "
        f"{args.budget * dense['latency_ms']:.4f} ms; hypervolumes normalised by that dense model", "",
        table(rows, args.trials), ""])
    print(report)
    with open(out / "bench_samplers.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(runs[0]))
        writer.writeheader()
        writer.writerows(runs)
    (out / "bench_samplers.json").write_text(json.dumps(
        {"command": command, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
         "wall_seconds": round(wall, 1), "load_avg_start": load0, "load_avg_end": os.getloadavg(),
         "args": vars(args), "dense": dense, "medians": rows, "runs": runs, "markdown": report}, indent=2,
        default=str))
    say(f"wrote {out / 'bench_samplers.csv'} and {out / 'bench_samplers.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
