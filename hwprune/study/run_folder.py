"""Writing the run folder (docs/run-folder.md): trials.csv, each listed model's files, summary.json, pareto.csv,
the report; and the error of a search that found nothing."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from hwprune import __version__
from hwprune.backends import backend_capabilities
from hwprune.errors import BudgetUnreachable
from hwprune.study import pareto as pareto_mod
from hwprune.study.accuracy import best_within_budgets, guard_record, guard_refused, unreachable_message
from hwprune.study.budgets import Budgets
from hwprune.study.confirm import OVER_BUDGET
from hwprune.study.context import RunContext, fmt
from hwprune.study.process_memory import PEAK_FRESH_PROCESS
from hwprune.study.precision import FP32_LOCK
from hwprune.study.records import JUDGED_COLUMN, SCHEMA, UNSET, ModelRecord, Summary, model_record
from hwprune.study.result import ParetoModel
from hwprune.study.trials import trials_table

if TYPE_CHECKING:  # imported by the stages that run before them
    from hwprune.study.front import Front
    from hwprune.study.optimize import Trials

PARETO_COLUMNS = ["trial", "recommended", "accuracy", "accuracy_proxy", "final_finetune_steps", "latency_ms_median",
                  "latency_ms_p90", "latency_ms_std", "latency_ratio", "latency_noisy", "memory_mb_total",
                  "weights_mb", "peak_activations_mb", "params", "macs", "speedup", "meets_latency", "meets_memory",
                  "estimated", "onnx_path", "weights_path", "widths", "precision",
                  "latency_ms_judged",  # the latency the budget judges (MODEL's latency_ms.judged)
                  "estimate_error"]  # estimates only: the predictor's median error on held-out models


@dataclass(frozen=True)
class TrialsTable:
    """trials.csv, and the views of it the final stages read."""

    frame: pd.DataFrame  # every trial; ``feasible`` judged on this run's budgets
    complete: pd.DataFrame
    ranked: pd.DataFrame  # complete trials, latency as the budget judges it
    failed: pd.DataFrame


def write_trials(ctx: RunContext, trials: Trials) -> TrialsTable:
    """Write trials.csv and return its views."""
    from hwprune.export import atomic_write_text

    budgets = trials.budgets
    frame = pd.DataFrame(trials_table(trials.study))
    if not frame.empty:
        # feasibility against this run's budgets: a resumed or nightly run may have other ones (a relative
        # budget follows the dense model's latency of the night) than the run that stored a trial's constraints
        frame["feasible"] = [
            state == "COMPLETE" and budgets.feasible(lat, mem, None if pd.isna(ratio) else ratio, acc)
            for state, lat, mem, ratio, acc in zip(frame["state"], frame["latency_ms"], frame["memory_mb"],
                                                   frame["latency_ratio"], frame["accuracy"])]
        # the latency the budget judges, on the scale of the budget in ms: under a relative budget the ratio to the
        # dense model measured beside the trial x this run's dense reference (a trial measured in a slow spell is
        # not slower for it), else the trial's own median
        frame[JUDGED_COLUMN] = [
            budgets.judged_ms(lat, None if pd.isna(ratio) else ratio) if state == "COMPLETE" else None
            for state, lat, ratio in zip(frame["state"], frame["latency_ms"], frame["latency_ratio"])]
    atomic_write_text(ctx.run_dir / "trials.csv", frame.to_csv(index=False))
    complete = frame[frame["state"] == "COMPLETE"] if not frame.empty else frame
    # latency is ranked as the budget judges it
    ranked = complete.assign(latency_ms=complete[JUDGED_COLUMN]) if not complete.empty else complete
    failed = frame[frame["state"] == "FAIL"] if not frame.empty else frame
    return TrialsTable(frame, complete, ranked, failed)


def dense_model(ctx: RunContext, trials: Trials) -> ParetoModel:
    """The dense model's record (and module), with its ONNX file."""
    from hwprune.export import file_record

    d = trials.dense
    record = model_record(trial=None, accuracy=d.accuracy, accuracy_proxy=d.accuracy, m=trials.dense_m,
                          params=d.params, macs=d.macs, widths=d.widths, ratios=None, budgets=trials.budgets,
                          dense=None, example=trials.subject.example_inputs[0])
    record = record.with_file("onnx", file_record(d.path, ctx.run_dir))
    if not trials.interrupted:  # Ctrl-C stops now; the next run measures it
        record = process_peak(ctx, d.path, record)
    else:
        record = record.replace(memory_mb=dataclasses.replace(record.memory_mb, process_peak=None))
    return ParetoModel(None, record, ctx.run_dir, trials.subject.model)


def process_peak(ctx: RunContext, onnx_path: Path, record: ModelRecord) -> ModelRecord:
    """``record`` with a process peak that is real or null.

    The measuring process's resident-memory growth read 0 MB for most models (it already held memory earlier
    sessions freed), so it is not reported: with ONNX Runtime on this host a fresh process per listed model measures
    it (:mod:`hwprune.study.process_memory`); the SSH backend's figure already comes from a fresh process on the
    board; other backends report none.
    """
    settings = backend_capabilities(ctx.profile.backend).settings
    if "ssh" in settings and record.memory_mb.process_peak is not None:
        peak: float | None = record.memory_mb.process_peak
    elif "ort" in settings and "ssh" not in settings:
        from hwprune.study.process_memory import fresh_process_peak_mb

        peak = fresh_process_peak_mb(onnx_path, ctx.profile)
    else:
        peak = None
    memory = dataclasses.replace(record.memory_mb, process_peak=peak,
                                 process_peak_by=PEAK_FRESH_PROCESS if peak is not None else UNSET)
    return record.replace(memory_mb=memory)


def write_model_files(ctx: RunContext, pm: ParetoModel) -> None:
    """Save a listed model's weights, module and measurement beside its ONNX file, and record them."""
    from hwprune.export import atomic_torch_save, atomic_write_text, file_record

    assert pm.module is not None and pm.trial is not None and pm.measurement is not None
    folder = ctx.model_dir(pm.trial)
    atomic_torch_save(pm.module.state_dict(), folder / "weights.pt")
    atomic_torch_save(pm.module, folder / "model.pt")
    atomic_write_text(folder / "measurement.json", json.dumps(pm.measurement.to_dict(), indent=2))
    pm.entry = pm.entry.replace(files={"onnx": file_record(folder / "model.onnx", ctx.run_dir),
                                       "weights": file_record(folder / "weights.pt", ctx.run_dir),
                                       "module": file_record(folder / "model.pt", ctx.run_dir)})
    for name, file in (("onnx_fp32", "model.fp32.onnx"), ("calibration", "calibration.json")):  # INT8 models
        if (folder / file).exists():
            pm.entry = pm.entry.with_file(name, file_record(folder / file, ctx.run_dir))
    pm.entry = node_profile(ctx, folder / "model.onnx", pm.entry)
    pm.entry = process_peak(ctx, folder / "model.onnx", pm.entry)
    pm.entry = pm.entry.replace(file_bytes=pm.entry.files["onnx"]["bytes"])


def node_profile(ctx: RunContext, onnx_path: Path, record: ModelRecord) -> ModelRecord:
    """``record`` with the per-node latency file for the report (ONNX Runtime's profiler); as it is for backends
    the profiler does not describe, or when profiling fails."""
    if ctx.node_profile is None:
        return record
    from hwprune.export import atomic_write_text, file_record

    try:
        prof = ctx.node_profile(onnx_path, runs=10)  # on the device itself: ONNX Runtime here or on the board
    except Exception as exc:  # noqa: BLE001 - a profile is a nicety; never lose a search over it
        ctx.log(f"per-node profile of {onnx_path.name} failed: {exc}")
        return record
    path = onnx_path.parent / "node_latency.json"
    atomic_write_text(path, json.dumps(prof, indent=1))
    return record.with_file("node_latency", file_record(path, ctx.run_dir))


def recovery_record(config_recovery: str, trials: Trials, recommended: ModelRecord | None) -> dict[str, Any]:
    """The ``recovery`` record of summary.json: what the search recovered pruned models with."""
    if trials.recovery is None:
        return {"method": "data", "requested": config_recovery, "leak": False,
                "note": "the subject's own calibration/training data"}
    agreement = recommended.agreement if recommended is not None else None
    return {**trials.recovery.to_dict(), "agreement": None if agreement is UNSET else agreement}


def summary(ctx: RunContext, trials: Trials, table: TrialsTable, dense: ModelRecord, front: Front,
            measurements: int, t_start: float, board_seconds: float = 0.0) -> Summary:
    """The summary of the run (summary.json); ``board_seconds`` is the backend's own time on the device for this
    run's ``measurements``."""
    complete, budgets, dense_m = table.complete, trials.budgets, trials.dense_m
    rec = next((pm.entry for pm in front.models if pm.trial == front.recommended), None)
    best = best_within_budgets(table.ranked, budgets, front.under)
    hv = pareto_mod.hypervolume_history(
        table.ranked, (trials.dense.accuracy, dense_m.latency.median_ms, dense_m.memory.total_mb)
    ) if not complete.empty else []
    search = {
        "trials_complete": int(len(complete)),
        "trials_failed": int(len(table.failed)),
        "trials_pruned": int((table.frame["state"] == "PRUNED").sum()) if not table.frame.empty else 0,
        "trials_cached": int(complete["cached_from"].notna().sum()) if not complete.empty else 0,
        "measurements": measurements,
        "board_seconds": round(board_seconds, 3),
        "trials_feasible": int(complete["feasible"].sum()) if not complete.empty else 0,
        "failures": [{"trial": int(r["trial"]), "reason": r["fail_reason"] or "unknown"}
                     for _, r in table.failed.iterrows()],
        "stage_seconds": {k: round(v, 3) for k, v in trials.runner.stage_seconds.items()},
        "wall_seconds": round(time.perf_counter() - t_start, 2),
        "hypervolume": hv,
        "best_infeasible": best_infeasible(front, table),
        "rejected_on_remeasure": front.rejected,
        "interrupted": trials.interrupted,
        "knobs": len(trials.space.knobs),
        "blocks": trials.space.blocks,
    }
    if trials.runner.screening is not None:  # --screen on with a stored predictor
        search["screen"] = trials.runner.screening.record_for(table.frame)
    lock = trials.study.user_attrs.get(FP32_LOCK)
    if lock is not None:  # --quantize int8: the sampler searched FP32 only after its INT8 anchors measured slower
        search["int8_fp32_lock"] = lock
    m = ctx.profile.measure
    return Summary(
        schema=SCHEMA, hwprune_version=__version__,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), request=trials.request,
        metric=trials.subject.metric,
        accuracy_guard=guard_record(ctx.config.max_accuracy_drop, budgets, trials.dense.accuracy,
                                    rec.to_dict() if rec is not None else None, best, front.under),
        recovery=recovery_record(ctx.config.recovery, trials, rec), dense=dense,
        pareto=tuple(pm.entry for pm in front.models), recommended=front.recommended,
        measurement={"backend": dense_m.backend, "threads": dense_m.threads, "warmup": m.warmup,
                     "repeats": m.repeats, "max_cv": m.max_cv, "estimated": dense_m.estimated,
                     "tuned": dense_m.tuned,
                     # estimates only: the predictor (fitted or roofline) and its held-out error, for every label
                     "predictor": dense_m.extra.get("predictor") if dense_m.estimated else None},
        search=search)


def best_infeasible(front: Front, table: TrialsTable) -> dict[str, float] | None:
    """When nothing was listed: the least latency (as the budget judges it, so it compares with the budget) and memory
    any complete trial reached."""
    if front.models or table.complete.empty:
        return None
    return {"latency_ms": float(table.ranked["latency_ms"].min()),
            "memory_mb": float(table.complete["memory_mb"].min())}


def pareto_table(summary: dict[str, Any]) -> pd.DataFrame:
    """The ``pareto.csv`` table: one flat row per Pareto model (see docs/run-folder.md)."""
    rows = []
    predictor = (summary.get("measurement") or {}).get("predictor") or {}
    for r in summary["pareto"]:
        rows.append({
            "trial": r["trial"], "recommended": r["recommended"], "accuracy": r["accuracy"],
            "accuracy_proxy": r["accuracy_proxy"], "final_finetune_steps": r.get("final_finetune_steps", 0),
            "latency_ms_median": r["latency_ms"]["median"],
            "latency_ms_p90": r["latency_ms"]["p90"], "latency_ms_std": r["latency_ms"]["std"],
            "latency_ratio": r.get("latency_ratio"),
            "latency_noisy": r["latency_ms"]["noisy"], "memory_mb_total": r["memory_mb"]["total"],
            "weights_mb": r["memory_mb"]["weights"], "peak_activations_mb": r["memory_mb"]["peak_activations"],
            "params": r["params"], "macs": r["macs"], "speedup": r["speedup"],
            "meets_latency": r["meets"]["latency"], "meets_memory": r["meets"]["memory"],
            "estimated": r["estimated"], "onnx_path": r["files"]["onnx"]["path"],
            "weights_path": r["files"]["weights"]["path"], "widths": json.dumps(r["widths"]),
            "precision": (r.get("precision") or {}).get("label", "fp32"),
            "latency_ms_judged": r["latency_ms"].get("judged"),
            "estimate_error": predictor.get("median_abs_error") if r["estimated"] else None,
        })
    return pd.DataFrame(rows, columns=PARETO_COLUMNS)


def write_summary(ctx: RunContext, record: Summary) -> tuple[dict[str, Any], pd.DataFrame]:
    """Write summary.json and pareto.csv; return both as written."""
    from hwprune.export import atomic_write_text

    data = record.to_dict()
    atomic_write_text(ctx.run_dir / "summary.json", json.dumps(data, indent=2, default=str))
    table = pareto_table(data)
    atomic_write_text(ctx.run_dir / "pareto.csv", table.to_csv(index=False))
    return data, table


def build_report(ctx: RunContext) -> None:
    """report.html and report.md; a failure is logged, never fatal (the result is saved already)."""
    try:
        from hwprune.report import build_report as build
    except ImportError:
        return
    try:
        build(ctx.run_dir)
    except Exception as exc:  # noqa: BLE001 - the search result is already saved
        ctx.log(f"report failed ({type(exc).__name__}: {exc}); rebuild it with `hwprune report {ctx.run_dir}`")


def unreachable(ctx: RunContext, trials: Trials, table: TrialsTable, front: Front) -> BudgetUnreachable:
    """The error of a search that lists no model: why, and what to change."""
    budgets = trials.budgets
    best_inf = best_infeasible(front, table)
    if best_inf is None:
        return BudgetUnreachable(f"no trial completed; see the failures in {ctx.run_dir / 'trials.csv'}")
    best = best_within_budgets(table.ranked, budgets, front.under)
    over = [r for r in front.rejected if r["reason"] == OVER_BUDGET]
    if guard_refused(budgets, best, front.under):
        return BudgetUnreachable(unreachable_message(
            ctx.config.max_accuracy_drop, budgets, trials.dense.accuracy, trials.subject.metric, best,
            trials.recovery is None or trials.recovery.method == "data", ctx.storage))
    if over:
        return BudgetUnreachable(none_held(over, budgets, ctx.storage))
    return BudgetUnreachable(
        f"no candidate met the budgets (latency {fmt(budgets.latency_ms, 'ms')}, memory "
        f"{fmt(budgets.memory_mb, 'MB')}); the best reached were {best_inf['latency_ms']:.3f} ms and "
        f"{best_inf['memory_mb']:.2f} MB. Relax a budget, raise --max-ratio, or run more --trials; "
        f"completed trials are kept in {ctx.storage}")


def none_held(over: list[dict[str, Any]], budgets: Budgets, storage: str) -> str:
    """The error for a search whose feasible trials all went over a budget when re-measured: which ones, by how much,
    and that the same command confirms them again (its trials are kept)."""
    def figure(r: dict[str, Any]) -> str:
        if r.get("latency_ratio_upper") is not None:
            return f"trial {r['trial']} at {r['latency_ratio_upper']:.3f}x"
        return f"trial {r['trial']} at {r['latency_ms']:.3f} ms, {r['memory_mb']:.2f} MB"

    limit = (f"{budgets.latency_factor:g}x the dense model measured beside it" if budgets.latency_factor
             else f"latency {fmt(budgets.latency_ms, 'ms')}, memory {fmt(budgets.memory_mb, 'MB')}")
    shown = ", ".join(figure(r) for r in over[:4]) + (", ..." if len(over) > 4 else "")
    return (f"{len(over)} trial(s) met the budgets during the search, but none held when re-measured ({shown}; "
            f"budget {limit}). On a shared host a slow spell can do this: run the same command again to re-confirm "
            f"them, or relax the budget; completed trials are kept in {storage}")
