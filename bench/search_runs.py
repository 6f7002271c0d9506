"""bench_search's hwprune runs, the common fine-tune, side-by-side re-measurement and the Pareto check.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import hwprune
from hwprune import train
from hwprune.errors import BudgetUnreachable
from hwprune.backends.ort import OrtBackend
from hwprune.pruning import PruningSpace, prune
from hwprune.study.records import ModelRecord, Summary
from hwprune.subjects.base import Subject

from bench.common import FINAL_LR, NOISE_TOL, PROFILE, say
from bench.search_data import fresh_data
from bench.search_measure import stat
from bench.search_baselines import Final


def run_hwprune(subject: Subject, budget: float, args: argparse.Namespace, conf: dict[str, Any],
                runs_dir: Path) -> tuple[Final, dict[str, Any] | None, Path]:
    """(a) hwprune's search with a fixed trial count; its recommended model, rebuilt from its ratios (so that its
    fine-tune below is exactly the one every other method gets). Returns the result, summary.json and the run
    folder."""
    study = f"{subject.name}-{budget:g}x-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    note = ""
    try:
        hwprune.search(subject, PROFILE, latency_budget_ms=f"{budget}x", trials=conf["trials"], out=runs_dir,
                       study=study, seed=args.seed if args.search_seed is None else args.search_seed,
                       max_ratio=args.max_ratio,
                       **({"sampler": args.sampler} if args.sampler else {}),
                       trial_finetune_steps=conf["trial_finetune_steps"], final_finetune_steps=conf["finetune_steps"],
                       final_candidates=args.final_candidates, progress=False)
    except BudgetUnreachable as exc:
        note = f"hwprune: {exc}"
    seconds = time.perf_counter() - t0
    run_dir = runs_dir / study
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    final = Final(subject.name, budget, "hwprune", "none", None, select_seconds=seconds, note=note)
    if summary is None:
        final.note = note or "hwprune wrote no summary.json"
        return final, None, run_dir
    typed = Summary.from_dict(summary)
    s = typed.search
    final.extra = {"search_dense_ms": typed.dense.latency_ms.median,
                   "search_budget_ms": typed.request["latency_budget_ms"], "run_dir": str(run_dir),
                   "sampler": typed.request.get("sampler")}
    final.trials = int(s["trials_complete"])
    final.measurements = int(s["measurements"])  # dense sets, trials, and the confirmation of the front
    rec = next((m for m in summary["pareto"] if m["recommended"]), None)
    if rec is None:
        final.budget_met_at_selection = False
        final.note = final.note or "no feasible model"
        return final, summary, run_dir
    removed = rec.get("removed_blocks") or []
    final.setting = f"trial {rec['trial']}" + (f", {len(removed)} block{'s' * (len(removed) > 1)} removed"
                                               if removed else "")
    # under a relative budget hwprune judges (and records) the ratio to the dense model measured beside the model
    final.select_latency_ratio = rec.get("latency_ratio") or (ModelRecord.from_dict(rec).latency_ms.median
                                                              / typed.dense.latency_ms.median)
    final.budget_met_at_selection = bool(rec["meets"]["latency"])
    space = PruningSpace.build(subject.model, subject.example_inputs,
                               channel_multiple=int(summary["request"]["channel_multiple"]),
                               max_ratio=args.max_ratio, ignored_layers=list(subject.ignored_layers),
                               depth=bool(summary["request"].get("depth", True)))
    pruned = prune(subject.model, subject.example_inputs, rec["ratios"], space)
    if {k: list(v) for k, v in pruned.widths.items()} != rec["widths"]:
        final.note = "WARNING: rebuilding the recommended ratios gave other widths than summary.json reports"
    final.module, final.macs, final.params = pruned.module, pruned.macs, pruned.params
    return final, summary, run_dir


def finetune_final(final: Final, subject: Subject, steps: int, seed: int,
                   test: Callable[[nn.Module], torch.Tensor]) -> None:
    """The fine-tune every final model gets: BN re-calibration, then ``steps`` steps distilled from the dense model,
    from the same data order and seed."""
    if final.module is None:
        return
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    if subject.calibration_data is not None:
        train.recalibrate_batchnorm(final.module, subject.calibration_data, 8)
    final.accuracy_calibrated = float(test(final.module).float().mean())
    if steps and subject.train_data is not None:
        train.finetune(final.module, fresh_data(subject.train_data), steps, loss_fn=subject.loss_fn, lr=FINAL_LR,
                       teacher=subject.teacher or subject.model)
    final.correct = test(final.module)
    final.accuracy = float(final.correct.float().mean())
    final.finetune_seconds = time.perf_counter() - t0


def remeasure_interleaved(finals: list[Final], backend: OrtBackend, rounds: int, dense_key: str) -> None:
    """Measure every model once per round, round-robin (each round starting one model later), and store per model
    the median over rounds of wall and CPU medians, and of its ratio to the dense model of the same round."""
    live = [f for f in finals if f.onnx is not None]
    for r in range(rounds):
        order = live[r % len(live):] + live[: r % len(live)]
        for f in order:
            m = backend.measure(f.onnx)
            f.rounds.append({"round": r, "wall_ms": m.latency.median_ms,
                             "cpu_ms": m.latency.cpu_median_ms or m.latency.median_ms, "min_ms": m.latency.min_ms,
                             "noisy": m.latency.noisy, "load1": (m.load_avg or (float("nan"),))[0]})
        say(f"  round {r + 1}/{rounds} measured ({len(live)} models)")
    dense = next(f for f in live if f.key == dense_key)
    for r in range(rounds):  # then each model beside the dense model, in alternating samples
        order = live[r % len(live):] + live[: r % len(live)]
        for f in order:
            f.rounds[r]["ratio_pair"] = 1.0 if f is dense else statistics.median(
                backend.measure_beside(f.onnx, dense.onnx)[2])
        say(f"  round {r + 1}/{rounds} measured beside the dense model")
    for f in live:
        wall = [x["wall_ms"] for x in f.rounds]
        cpu = [x["cpu_ms"] for x in f.rounds]
        f.latency = {
            "wall_ms": statistics.median(wall), "cpu_ms": statistics.median(cpu),
            "min_ms": min(x["min_ms"] for x in f.rounds),
            "dense_wall_ms": statistics.median(x["wall_ms"] for x in dense.rounds),
            "dense_cpu_ms": statistics.median(x["cpu_ms"] for x in dense.rounds),
            "ratio_wall": statistics.median(a["wall_ms"] / b["wall_ms"] for a, b in zip(f.rounds, dense.rounds)),
            "ratio_cpu": statistics.median(a["cpu_ms"] / b["cpu_ms"] for a, b in zip(f.rounds, dense.rounds)),
            "ratio_min": min(x["min_ms"] for x in f.rounds) / min(x["min_ms"] for x in dense.rounds),
            "ratio_pair": statistics.median(x["ratio_pair"] for x in f.rounds),
        }


def check_front(summary: dict[str, Any], run_dir: Path, backend: OrtBackend, rounds: int,
                which: str) -> dict[str, Any]:
    """hwprune's promise: no 'smaller but not faster' model on its Pareto front. Every front model must be faster
    than dense, and along the front sorted by latency, a model with fewer MACs must never be slower than one with
    more MACs. Checked on the latencies the search recorded and, with ``rounds`` > 0, on interleaved re-measurements
    (statistic ``which``, median over rounds) of the exported front models and the dense model."""
    front = summary["pareto"]
    result: dict[str, Any] = {"models": len(front)}
    if not front:
        return result
    if all(m.get("latency_ratio") for m in front):  # a relative budget: what the search judged and ranked on
        lat, dense_lat = {m["trial"]: m["latency_ratio"] for m in front}, 1.0
    else:
        lat = {m.trial: m.latency_ms.median for m in map(ModelRecord.from_dict, front)}
        dense_lat = ModelRecord.from_dict(summary["dense"]).latency_ms.median
    result["search"] = _front_order(front, lat, dense_lat)
    if rounds > 0:
        paths = {m["trial"]: run_dir / m["files"]["onnx"]["path"] for m in front}
        paths[None] = run_dir / summary["dense"]["files"]["onnx"]["path"]
        samples: dict[Any, list[float]] = {k: [] for k in paths}
        keys = list(paths)
        for r in range(rounds):
            for k in keys[r % len(keys):] + keys[: r % len(keys)]:
                if which == "pair":  # ratios to the dense model, which is 1
                    samples[k].append(1.0 if k is None else statistics.median(
                        backend.measure_beside(paths[k], paths[None])[2]))
                else:
                    samples[k].append(stat(backend.measure(paths[k]), which))
        re_lat = {k: statistics.median(v) for k, v in samples.items() if k is not None}
        result["remeasured"] = _front_order(front, re_lat, statistics.median(samples[None]))
        result["remeasured"].update(rounds=rounds, statistic=which)
    return result


def _front_order(front: list[dict[str, Any]], lat: dict[Any, float], dense_lat: float) -> dict[str, Any]:
    """Counts of front models not faster than dense and of (fewer MACs, slower) pairs: raw, beyond noise, and beyond
    noise with nothing bought for it (the slower, smaller model is neither more accurate nor smaller in memory by
    more than the noise margin: a model that gave up accuracy and got nothing back). The promise holds when no model
    is slower than dense and no pair of the last kind exists: a slower model with fewer MACs that is more accurate
    or smaller in memory is a trade-off on the front, not a "smaller but not faster" model."""
    ordered = sorted(front, key=lambda m: lat[m["trial"]])
    not_faster = [m["trial"] for m in ordered if lat[m["trial"]] >= dense_lat]
    pairs = violations = beyond_noise = unexplained = 0
    examples: list[str] = []
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:  # lat[a] <= lat[b]
            pairs += 1
            if b["macs"] < a["macs"] and lat[b["trial"]] > lat[a["trial"]]:
                violations += 1
                if lat[b["trial"]] > lat[a["trial"]] * (1 + NOISE_TOL):
                    beyond_noise += 1
                    bought = (b["accuracy"] > a["accuracy"]
                              or b["memory_mb"]["total"] * (1 + NOISE_TOL) < a["memory_mb"]["total"])
                    unexplained += not bought
                    if not bought and len(examples) < 3:
                        examples.append(f"trial {b['trial']} ({b['macs'] / 1e6:.2f} M MACs, "
                                        f"{lat[b['trial']]:.4f} ms, acc {b['accuracy']:.3f}, "
                                        f"{b['memory_mb']['total']:.2f} MB) slower than trial {a['trial']} "
                                        f"({a['macs'] / 1e6:.2f} M MACs, {lat[a['trial']]:.4f} ms, acc "
                                        f"{a['accuracy']:.3f}, {a['memory_mb']['total']:.2f} MB)")
    return {"dense_ms": dense_lat, "not_faster_than_dense": not_faster, "pairs": pairs, "violations": violations,
            "violations_beyond_noise": beyond_noise, "unexplained_beyond_noise": unexplained, "examples": examples,
            "holds": not not_faster and unexplained == 0}


def overhead_row(subject: str, budget: float, summary: dict[str, Any]) -> dict[str, Any]:
    """hwprune's per-trial time per stage: summary.json's search.stage_seconds divided by the complete trials."""
    s = summary["search"]
    n = max(int(s["trials_complete"]), 1)
    row: dict[str, Any] = {"model": subject, "budget": budget, "trials": int(s["trials_complete"]),
                           "cached": int(s["trials_cached"]), "knobs": s.get("knobs")}
    stages = s["stage_seconds"]
    for k in ("prune", "export", "session", "timing", "dense_beside", "evaluate", "calibrate", "finetune"):
        row[k] = stages.get(k, 0.0) / n
    row["search_wall"] = float(s["wall_seconds"]) / n
    return row
