"""Benchmark: hwprune's search against simple pruning baselines at equal *measured* latency, in one run.

For each subject (the demo ``mobilenet-tiny`` at 32x32, and a full-size MobileNetV2 at 224x224) and each latency
budget (a fraction of the dense model's latency on the ``host-cpu`` profile), it compares:

  (a) ``hwprune``        hwprune.search(...) with a fixed trial count; its recommended model;
  (b) ``uniform-16``     one pruning ratio for every channel group, rounded to the profile's channel multiple (16),
      ``uniform-1``      the same without rounding (channel multiple 1); the least pruning that meets the budget,
                         found by bisection over the ratio with real ONNX Runtime measurements;
  (c) ``tp-global-mag``  Torch-Pruning's global magnitude pruning (MagnitudePruner, global_pruning=True,
                         GroupMagnitudeImportance), its ratio bisected the same way until the measured latency meets
                         the budget (MACs are what the ratio controls; measured latency is what must meet the budget).

A baseline's bisected choice is then held to the rule hwprune holds its own picks to (``--confirm-tries``): measured
in interleaved rounds with the dense model, its median ratio plus standard error must meet the budget, else the next
more-pruned architecture on its curve is tried. Without this, one lucky probe let a baseline's pick run over its
budget side by side in most demo runs, while hwprune's met it, and "equal latency" favoured the baselines.

Every final model gets the same fine-tune: BatchNorm re-calibration, then ``--finetune-steps`` SGD steps distilled
from the dense model (lr 0.02, the recipe of hwprune's own final fine-tune), from the same data order. hwprune's
search runs with that same final fine-tune for its ``--final-candidates`` (its default: 3) and recommends the best of
them, as it does for a user; its recommended model is then rebuilt from its ratios and fine-tuned here like the
others (so it gets neither its search-time fine-tune steps nor an extra fine-tune). The time hwprune spends choosing,
its candidates' fine-tunes included, is its "select s".

The search evaluates on the subject's validation data; the table's accuracy is measured on test data that nothing
chose on (demo: 5,000 other generated images; cifar: the 10,000 test images, the search seeing 5,000 held-out
training images), so picking the best of several candidates earns no selection bias.

(b') ``uniform-16-matched`` asks for equal latency directly, free of any bisection's noise: the uniform-16
architectures nearest hwprune's pick by measured latency (``--near`` of them) get the common fine-tune and the
side-by-side re-measurement below, and hwprune is compared with the most accurate of those that ran no slower than
its pick (the best of several on the test data: a choice that favours the baseline).

All final models of a subject, and the dense model, are then re-measured interleaved (round-robin, ``--rounds``
rounds) and each model's median taken, so load drift from other processes hits every method alike, then each model
is measured beside the dense model in alternating 2 ms samples, ``--rounds`` times (``OrtBackend.measure_beside``).
Latencies are reported with the dense latency of the same rounds and as ratios to it: the median ratio of alternating
samples (what every comparison is judged on, as hwprune judges its picks), wall-clock median, thread CPU time and
fastest sample.

Outputs: Markdown tables on stdout, ``<out>/bench_search.csv`` (one row per model) and ``<out>/bench_search.json``
(everything, including the ratio-latency curves and each search's per-trial overhead and Pareto-front check).
hwprune's run folders go to ``<out>/runs/``.

    python -m bench.bench_search --quick            # demo subject only, ~10 min on 2 cores
    python -m bench.bench_search                    # demo + MobileNetV2 at 224, ~25 min on 2 cores (+13 min once)
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp

import hwprune
from hwprune.export import export_onnx
from hwprune.backends.ort import OrtBackend
from hwprune.pruning import count_macs_params

from bench.common import CIFAR_ZIP, DEFAULTS, NEAR, PROFILE, ROOT, STAT_NAMES, git_commit, say
from bench.search_data import build_subject
from bench.search_measure import LatencyProbe, RatioCurve, tp_global_magnitude_builder, uniform_builder, uniform_space
from bench.search_baselines import (
    Final,
    matched_uniform,
    near_uniform,
    run_tp,
    run_uniform,
    uniform_architecture_ratios,
)
from bench.search_runs import check_front, finetune_final, overhead_row, remeasure_interleaved, run_hwprune
from bench.search_tables import (
    budget_lines,
    front_lines,
    near_table,
    overhead_table,
    paired_comparisons,
    paired_lines,
    results_table,
)


# driver


def subject_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Trials and fine-tune steps for one subject: the flag if given, else the subject's (quick) default."""
    d = DEFAULTS[name]
    return {
        "trials": args.trials or d["quick_trials" if args.quick else "trials"],
        "finetune_steps": args.finetune_steps if args.finetune_steps is not None
        else d["quick_finetune_steps" if args.quick else "finetune_steps"],
        "trial_finetune_steps": args.trial_finetune_steps if args.trial_finetune_steps is not None
        else d["trial_finetune_steps"],
    }


def bench_subject(name: str, args: argparse.Namespace, backend: OrtBackend, out: Path) -> dict[str, Any]:
    """Every method at every budget on one subject, fine-tuned alike and re-measured interleaved."""
    conf = subject_config(name, args)
    subject, note, test = build_subject(name, args.seed, Path(args.cifar_zip))
    say(f"{subject.name}: {note}")
    say(f"{subject.name}: trials {conf['trials']}, fine-tune steps {conf['finetune_steps']} for every final model, "
        f"hwprune trial fine-tune steps {conf['trial_finetune_steps']}")
    workdir = out / "runs" / f"{subject.name}-candidates"
    workdir.mkdir(parents=True, exist_ok=True)
    dense_onnx = export_onnx(subject.model, subject.example_inputs, workdir / "dense.onnx")
    macs, params = count_macs_params(subject.model, subject.example_inputs)
    dense = Final(subject.name, None, "dense", "–", subject.model, macs, params, onnx=dense_onnx)
    dense.correct = test(subject.model)
    dense.accuracy = float(dense.correct.float().mean())
    probe = LatencyProbe(backend, dense_onnx, args.select_stat)
    grid = [float(x) for x in args.grid.split(",")]
    refine = 2 if args.quick else 3
    space16 = uniform_space(subject, 16)
    architectures16 = uniform_architecture_ratios(space16) if args.near else []
    curves = {
        "uniform-16": RatioCurve("uniform-16", uniform_builder(subject, 16, space16), subject, probe, workdir),
        "uniform-1": RatioCurve("uniform-1", uniform_builder(subject, 1), subject, probe, workdir),
        "tp-global-mag": RatioCurve("tp-global-mag", tp_global_magnitude_builder(subject), subject, probe, workdir),
    }
    finals: list[Final] = [dense]
    overhead: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    for budget in args.budgets:
        say(f"{subject.name} {budget:g}x: hwprune search ({conf['trials']} trials)...")
        hw, summary, run_dir = run_hwprune(subject, budget, args, conf, out / "runs")
        finals.append(hw)
        if hw.module is not None and args.near:
            say(f"{subject.name} {budget:g}x: uniform-16 architectures near hwprune's pick "
                f"({hw.select_latency_ratio:.3f}x)...")
            near = near_uniform(subject, budget, curves["uniform-16"], architectures16, hw.select_latency_ratio,
                                slower=args.near // 3, faster=args.near - args.near // 3)
            finals += near
        if summary is not None:
            overhead.append(overhead_row(subject.name, budget, summary))
            say(f"{subject.name} {budget:g}x: checking hwprune's Pareto front ({len(summary['pareto'])} models)...")
            check = check_front(summary, run_dir, backend, args.front_rounds, args.select_stat)
            checks.append({"model": subject.name, "budget": budget, "run_dir": str(run_dir), **check})
        for method in ("uniform-16", "uniform-1"):
            say(f"{subject.name} {budget:g}x: {method} bisection...")
            finals.append(run_uniform(subject, curves[method], budget, grid, refine, method, args.confirm_tries))
        say(f"{subject.name} {budget:g}x: tp-global-mag bisection...")
        finals.append(run_tp(subject, curves["tp-global-mag"], budget, grid, refine, args.confirm_tries))

    for f in finals[1:]:
        if f.module is None:
            continue
        say(f"{subject.name} {f.budget:g}x {f.method}: BN re-calibration + {conf['finetune_steps']} fine-tune steps")
        finetune_final(f, subject, conf["finetune_steps"], args.seed, test)
        name = f"final-{f.budget:g}x-{f.method}" + (f"-{f.setting.removeprefix('ratio ')}" if f.method == NEAR else "")
        f.onnx = export_onnx(f.module, subject.example_inputs, workdir / f"{name}.onnx")
    say(f"{subject.name}: re-measuring {sum(f.onnx is not None for f in finals)} models interleaved, "
        f"{args.rounds} rounds...")
    remeasure_interleaved(finals, backend, args.rounds, dense.key)
    finals = with_matched(finals)
    return {
        "subject": subject.name, "note": note, "finals": finals, "overhead": overhead,
        "config": {**conf, "sampler": ", ".join(sorted({str(f.extra["sampler"]) for f in finals
                                                         if f.extra.get("sampler")})) or "?"},
        "checks": checks,
        "curves": {k: [{"ratio": p.ratio, "latency_ratio": p.latency_ratio, "macs": p.macs, "params": p.params,
                        "measured": p.measured, "seconds": p.seconds} for p in sorted(c.points.values(),
                                                                                        key=lambda p: p.ratio)]
                   for k, c in curves.items()},
    }


def with_matched(finals: list[Final]) -> list[Final]:
    """``finals`` with a ``MATCHED`` final after each budget's uniform-16 pick (:func:`matched_uniform`)."""
    out: list[Final] = []
    for f in finals:
        out.append(f)
        if f.method == "uniform-16":
            hw = next((h for h in finals if h.method == "hwprune" and (h.subject, h.budget) == (f.subject, f.budget)),
                      None)
            near = [n for n in finals if n.method == NEAR and (n.subject, n.budget) == (f.subject, f.budget)]
            matched = matched_uniform(near, hw) if hw is not None else None
            if matched is not None:
                out.append(matched)
    return out


def final_record(f: Final) -> dict[str, Any]:
    """A flat CSV/JSON row for one final model."""
    lat = f.latency
    return {
        "model": f.subject, "budget": f.budget, "method": f.method, "setting": f.setting,
        "accuracy": f.accuracy, "accuracy_bn_calibrated": f.accuracy_calibrated,
        "latency_wall_ms": lat.get("wall_ms"), "latency_cpu_ms": lat.get("cpu_ms"), "latency_min_ms": lat.get("min_ms"),
        "dense_wall_ms": lat.get("dense_wall_ms"), "dense_cpu_ms": lat.get("dense_cpu_ms"),
        "ratio_wall": lat.get("ratio_wall"), "ratio_cpu": lat.get("ratio_cpu"), "ratio_min": lat.get("ratio_min"),
        "ratio_pair": lat.get("ratio_pair"),
        "meets_pair": None if f.budget is None or not lat else lat["ratio_pair"] <= f.budget,
        "meets_wall": None if f.budget is None or not lat else lat["ratio_wall"] <= f.budget,
        "meets_cpu": None if f.budget is None or not lat else lat["ratio_cpu"] <= f.budget,
        "meets_min": None if f.budget is None or not lat else lat["ratio_min"] <= f.budget,
        "macs": f.macs, "params": f.params, "trials": f.trials, "measurements": f.measurements,
        "select_seconds": round(f.select_seconds, 2), "select_latency_ratio": f.select_latency_ratio,
        "budget_met_at_selection": f.budget_met_at_selection, "finetune_seconds": round(f.finetune_seconds, 2),
        "rounds": len(f.rounds), "note": f.note, **{f"hwprune_{k}": v for k, v in f.extra.items()},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="demo subject only, fewer trials and fine-tune steps")
    p.add_argument("--cifar-zip", default=str(CIFAR_ZIP),
                   help="the CIFAR-10 JPEG zip for --models cifar (train/<class>/NNNN.jpg, test/<class>/NNNN.jpg)")
    p.add_argument("--models", default=None,
                   help="comma-separated: demo,mobilenetv2,cifar (default: demo,mobilenetv2; demo with --quick; cifar "
                        "needs the CIFAR-10 JPEG zip, see --cifar-zip)")
    p.add_argument("--budgets", default="0.6,0.4", help="latency budgets as fractions of dense (default 0.6,0.4)")
    p.add_argument("--trials", type=int, default=None, help="hwprune trials per search (default: demo 30, "
                   "mobilenetv2 16; --quick: 12 and 8)")
    p.add_argument("--finetune-steps", type=int, default=None, help="fine-tune steps of every final model (default: "
                   "demo 150, mobilenetv2 20; --quick: 40 and 10)")
    p.add_argument("--final-candidates", type=int, default=hwprune.SearchConfig.final_candidates,
                   help="hwprune's final candidates: front models it fine-tunes (--finetune-steps) before it "
                        "recommends one (default: hwprune's default)")
    p.add_argument("--trial-finetune-steps", type=int, default=None,
                   help="hwprune's per-trial fine-tune steps (default: demo 20 = hwprune's default, mobilenetv2 0)")
    p.add_argument("--sampler", default=None, help="hwprune's sampler (default: hwprune's own default)")
    p.add_argument("--max-ratio", type=float, default=hwprune.SearchConfig.max_ratio,
                   help=f"hwprune's per-group max ratio (default: hwprune's, {hwprune.SearchConfig.max_ratio})")
    p.add_argument("--grid", default="0.15,0.3,0.45,0.6,0.75,0.9",
                   help="ratios scanned before bisecting, for the uniform and Torch-Pruning baselines")
    p.add_argument("--select-stat", choices=("pair", "cpu", "min", "median"), default="pair",
                   help="statistic the baselines' bisection compares with the budget: the median ratio of alternating "
                        "samples of the candidate and the dense model (default; what hwprune judges on), median "
                        "thread CPU time, fastest sample, or wall median (each between two dense measurements)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved re-measurement rounds (default 7; quick 5)")
    p.add_argument("--confirm-tries", type=int, default=4,
                   help="interleaved confirmations of each baseline's choice, as hwprune confirms its picks: median + "
                        "standard error within the budget, else the next more-pruned architecture (default 4; 0 = "
                        "choose on the bisection's probe alone, as before)")
    p.add_argument("--near", type=int, default=7,
                   help="uniform-16 architectures fine-tuned and re-measured around hwprune's pick (by measured "
                        "latency; a few more on the faster side), for the comparison at hwprune's side-by-side "
                        "latency ('uniform-16-matched'; default 7; 0 = off)")
    p.add_argument("--front-rounds", type=int, default=None,
                   help="rounds re-measuring hwprune's Pareto front for the check (default 3; quick 2; 0 = off)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads for BN re-calibration and evaluation (default 1: on a busy 2-core host, 2 "
                        "threads made them 4-10x slower; fine-tuning picks its own count)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the subjects' training (a new CIFAR-10 seed retrains its model), the final "
                        "fine-tunes and, unless --search-seed is given, hwprune's search")
    p.add_argument("--search-seed", type=int, default=None,
                   help="seed of hwprune's search only (default: --seed); repeats the comparison over search seeds "
                        "on the same trained models")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    args.models = (args.models or ("demo" if args.quick else "demo,mobilenetv2")).split(",")
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.rounds = args.rounds if args.rounds is not None else (5 if args.quick else 7)
    args.front_rounds = args.front_rounds if args.front_rounds is not None else (2 if args.quick else 3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    torch.set_num_threads(args.torch_threads)
    backend = OrtBackend(PROFILE)
    results = [bench_subject(name, args, backend, out) for name in args.models]
    finals = [f for r in results for f in r["finals"]]
    overhead = [o for r in results for o in r["overhead"]]
    checks = [c for r in results for c in r["checks"]]
    wall = time.perf_counter() - t0
    command = "python -m bench.bench_search " + " ".join(sys.argv[1:] if argv is None else argv)

    text = [f"## bench_search: hwprune vs. baselines at equal measured latency ({PROFILE}, ONNX Runtime, 1 thread)",
            "", f"`{command}` — {dt.datetime.now().isoformat(timespec='minutes')}, {wall / 60:.1f} min, load average "
            f"{load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end", ""]
    for r in results:
        c = r["config"]
        text.append(f"- **{r['subject']}**: {r['note']}. hwprune: {c['trials']} trials, sampler {c['sampler']}, "
                    f"{c['trial_finetune_steps']} fine-tune steps per trial. Every final model: BN re-calibration + "
                    f"{c['finetune_steps']} fine-tune steps distilled from the dense model.")
    text += ["", results_table(finals), "",
             "Latency: median over interleaved rounds, with the dense model's in the same rounds in brackets; the "
             "ratios are medians over rounds of (model ÷ dense of that round); 'alternating samples' times the model "
             "and the dense model in alternating 2 ms samples in each round, the ratio every comparison is judged "
             "on. 'chose' gives the latency ratio the "
             "method saw when it chose (baselines: "
             + (f"{STAT_NAMES[args.select_stat]} beside the dense model"
                if not args.confirm_tries else
                "the median ratio of the interleaved rounds with the dense model that confirmed the bisection's "
                "choice, which must meet the budget with its standard error as hwprune's picks must")
             + "; hwprune: the median ratio of the interleaved rounds with the dense model that confirmed its pick). "
             "'BN-cal' = accuracy after BN "
             "re-calibration only, before the common fine-tune.", "",
             "### hwprune per-trial overhead (seconds per trial, from summary.json `search.stage_seconds`)", "",
             overhead_table(overhead), ""]
    if any(f.method == NEAR for f in finals):
        text += ["### uniform-16 at hwprune's measured latency", "",
                 "The uniform-16 architectures nearest each hwprune pick by latency (the bisection probe's), given "
                 "the common fine-tune and re-measured in the same interleaved rounds; `uniform-16-matched` above "
                 "is the most accurate of those that ran no slower than hwprune's pick.", "", near_table(finals), ""]
    text += ["### Paired accuracy differences on the same test images", ""]
    pairs = paired_comparisons(finals)
    text += paired_lines(pairs)
    text += ["", "### The budgets hwprune's searches worked to", ""]
    text += budget_lines(finals)
    text += ["", "### No 'smaller but not faster' model on hwprune's Pareto front", ""]
    text += front_lines(checks)
    report = "\n".join(text)
    print(report)

    rows = [final_record(f) for f in finals]
    with open(out / "bench_search.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    payload = {
        "command": command, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(wall, 1), "load_avg_start": load0, "load_avg_end": os.getloadavg(),
        "host": platform.platform(), "commit": git_commit(), "args": {k: v for k, v in vars(args).items()},
        "versions": {"hwprune": hwprune.__version__, "torch": torch.__version__, "torch_pruning": tp.__version__,
                     "onnxruntime": __import__("onnxruntime").__version__, "optuna": __import__("optuna").__version__},
        "subjects": [{"subject": r["subject"], "note": r["note"], "config": r["config"], "curves": r["curves"]}
                     for r in results],
        "results": [{**final_record(f), "latency_rounds": f.rounds} for f in finals],
        "hwprune_overhead_per_trial_s": overhead, "paired": pairs, "pareto_checks": checks, "markdown": report,
    }
    (out / "bench_search.json").write_text(json.dumps(payload, indent=2, default=str))
    say(f"wrote {out / 'bench_search.csv'} and {out / 'bench_search.json'} ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
