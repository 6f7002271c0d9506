"""Confirming the front: rebuild, export, re-measure and re-evaluate each front model, and keep those that still
meet the budgets and are still non-dominated on the confirmed numbers.

A trial's single measurement is the one the sampler ranked; the exported file is what the user deploys, so it is
measured again (interleaved with the dense model under a relative budget) before it is listed.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from hwprune.backends.base import Measurement
from hwprune.errors import HwpruneError
from hwprune.pruning import PruningSpace, prune
from hwprune.study import attrs
from hwprune.study import pareto as pareto_mod
from hwprune.study.budgets import Budgets, latency_ratio
from hwprune.study.context import RunContext
from hwprune.quant.base import QuantizationError
from hwprune.study.objective import TrialRunner
from hwprune.study.precision import has_int8, precision_record, signature_with, write_calibration
from hwprune.study.records import ModelRecord, model_record
from hwprune.study.reference import ROUNDS, Rounds, interleaved_rounds, own_median_note, retime_in_slow_spell
from hwprune.study.result import ParetoModel
from hwprune.subjects.base import Subject

OVER_BUDGET = "over budget when re-measured"  # a rejected_on_remeasure reason
QUANTIZATION_FAILED = "INT8 quantization failed when rebuilt"  # a rejected_on_remeasure reason
# when front models go over a budget on re-measure, the trials behind them get up to this many times the first
# front's size in extra confirmations (each a rebuild and a few interleaved measurements)
REFILL_CONFIRMATIONS = 2


def judged_ms(pm: ParetoModel, budgets: Budgets) -> float:
    """A confirmed model's latency as ``budgets`` judge it (:meth:`Budgets.judged_ms`)."""
    return budgets.judged_ms(pm.latency_ms, pm.entry.latency_ratio)


def objectives(models: list[ParetoModel], budgets: Budgets) -> pd.DataFrame:
    """trial, accuracy, accuracy_proxy, latency_ms (as ``budgets`` judge it) and memory_mb of confirmed models, the
    columns the Pareto helpers read."""
    def proxy(pm: ParetoModel) -> float:
        value = pm.entry.accuracy_proxy
        return float(pm.accuracy if value is None else value)

    return pd.DataFrame({"trial": [pm.trial for pm in models], "accuracy": [pm.accuracy for pm in models],
                         "accuracy_proxy": [proxy(pm) for pm in models],
                         "latency_ms": [judged_ms(pm, budgets) for pm in models],
                         "memory_mb": [pm.memory_mb for pm in models]})


def rejected_entry(pm: ParetoModel, reason: str, **more: Any) -> dict[str, Any]:
    """A ``rejected_on_remeasure`` entry of summary.json for a confirmed model left out."""
    return {"trial": pm.trial, "latency_ms": pm.latency_ms, "memory_mb": pm.memory_mb, **more, "reason": reason}


def drop_dominated(ctx: RunContext, models: list[ParetoModel], budgets: Budgets, reason: str, why: str,
                   accuracies: tuple[str, ...] = ("accuracy",)) -> tuple[list[ParetoModel], list[dict[str, Any]]]:
    """Models no other of ``models`` dominates (with the front's tie tolerance, on each of ``accuracies``:
    ``accuracy`` and/or ``accuracy_proxy``), and a ``rejected_on_remeasure`` entry for each one left out, whose
    exported files are removed."""
    keep = pareto_mod.pareto_mask(objectives(models, budgets), pareto_mod.TIE_TOLERANCE, accuracies)
    kept_models, rejected = [], []
    for pm, kept in zip(models, keep, strict=True):
        if kept:
            kept_models.append(pm)
            continue
        ctx.log(f"trial {pm.trial} left out: {why}")
        rejected.append(rejected_entry(pm, reason))
        shutil.rmtree(ctx.model_dir(pm.trial), ignore_errors=True)
    return kept_models, rejected


def confirm_front(ctx: RunContext, ranked: pd.DataFrame, study: optuna.Study, subject: Subject, runner: TrialRunner,
                  budgets: Budgets, dense: ModelRecord,
                  defer: frozenset[int] = frozenset()
                  ) -> tuple[list[ParetoModel], list[dict[str, Any]], frozenset[int]]:
    """Confirm every front model of ``ranked`` (:func:`confirm_trial`) but those in ``defer``; keep those that
    still meet the budgets and are still non-dominated on the confirmed numbers. Returns them, the models left
    out, and the front models of ``defer`` not confirmed.

    ``defer``: trials that can be listed only as final candidates, which confirm them when they draw them
    (:func:`hwprune.study.finalists.guard_bound`); confirming them here would spend board time on models the
    accuracy guard then leaves out. A less accurate model never dominates a more accurate one, so leaving them out
    changes no other model's standing.

    A front model that goes over a budget when re-measured may have hidden feasible trials behind it, so the
    front of the trials left is confirmed in turn, up to ``REFILL_CONFIRMATIONS`` x the first front's size in
    extra confirmations. Seen on a noisy host: a 0.4x search's three-model front went over on re-measure while
    trials at 0.30x sat behind it, and the run recommended nothing.
    """
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    candidates: list[ParetoModel] = []
    rejected: list[dict[str, Any]] = []
    over: set[int] = set()
    done: set[int] = set()
    skipped: set[int] = set()
    front = pareto_mod.pareto_front(ranked) if not ranked.empty else ranked
    cap = len(front) * (1 + REFILL_CONFIRMATIONS)
    while True:
        todo = [int(n) for n in front["trial"] if int(n) not in done][: max(cap - len(done), 0)]
        if not todo:
            break
        for number in todo:
            done.add(number)
            if number in defer:
                skipped.add(number)
                continue
            confirmed = confirm_trial(ctx, by_number[number], subject, runner, budgets, dense)
            if isinstance(confirmed, ParetoModel):
                candidates.append(confirmed)
            else:
                rejected.append(confirmed)
                over.add(number)
        if not over & set(todo):
            break
        front = pareto_mod.pareto_front(ranked[~ranked["trial"].isin(over)])
        if any(int(n) not in done for n in front["trial"]):
            ctx.log(f"{len(over)} front model(s) over a budget when re-measured: confirming the trials behind them")
    if not candidates:
        return [], rejected, frozenset(skipped)
    models, dominated = drop_dominated(ctx, candidates, budgets, "dominated when re-measured",
                                       "dominated once re-measured and re-evaluated")
    models.sort(key=lambda pm: (judged_ms(pm, budgets), -pm.accuracy))
    return models, rejected + dominated, frozenset(skipped)


def confirm_trial(ctx: RunContext, t: optuna.trial.FrozenTrial, subject: Subject, runner: TrialRunner,
                  budgets: Budgets, dense: ModelRecord) -> ParetoModel | dict[str, Any]:
    """Rebuild, export, re-measure and re-evaluate one trial's model: the model, or a ``rejected_on_remeasure``
    entry when it no longer meets the budgets.

    The rebuild replays the trial's seeded calibration and fine-tune, so the exported weights are the ones the
    trial evaluated; the accuracy reported is measured again on them anyway. A re-measure that disagrees with
    the trial about a budget is settled by a third measurement (the median of three), so one preempted run on
    a shared host neither admits nor rejects a model.
    """
    number = t.number
    ratios, choice = runner.split(t.params)
    pruned = runner.build(ratios)
    acc_proxy = float(t.user_attrs.get(attrs.ACCURACY_PROXY, t.values[0]))
    folder = ctx.model_dir(number)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        onnx_path, accuracy, precision = export_model(ctx, pruned.module, choice, subject, runner, folder)
    except QuantizationError as exc:  # the trial quantized fine; its rebuild did not: not a model to list
        ctx.log(f"trial {number} left out: {exc}")
        shutil.rmtree(folder, ignore_errors=True)
        return {"trial": number, "latency_ms": t.values[1], "memory_mb": t.values[2],
                "reason": f"{QUANTIZATION_FAILED}: {exc}"}
    earlier = runner.remeasured.get(signature_with(pruned.signature, choice))
    m, rounds, note = confirm_latency(ctx, Measurement.from_dict(t.user_attrs[attrs.MEASUREMENT]), latency_ratio(t),
                                      onnx_path, budgets, runner.beside, earlier)
    record = model_record(trial=number, accuracy=accuracy, accuracy_proxy=acc_proxy, m=m, params=pruned.params,
                          macs=pruned.macs, widths=pruned.widths, ratios=ratios, budgets=budgets, dense=dense,
                          example=subject.example_inputs[0], rounds=rounds)
    record = record.replace(removed_blocks=list(pruned.removed), **({"remeasure_note": note} if note else {}))
    if precision is not None:
        record = record.replace(precision=precision)
    if not (record.meets.latency and record.meets.memory):
        beside = (f" ({record.latency_ratio:.3f}x the dense model beside it, "
                  f"{record.latency_ratio_upper:.3f}x with its standard error)") if rounds else ""
        ctx.log(f"trial {number} left out: re-measured at {m.latency.median_ms:.3f} ms{beside} / "
                f"{m.memory.total_mb:.2f} MB, over a budget it met during the search")
        shutil.rmtree(folder, ignore_errors=True)
        entry: dict[str, Any] = {"trial": number, "latency_ms": m.latency.median_ms, "memory_mb": m.memory.total_mb,
                                 "reason": OVER_BUDGET}
        if rounds:
            entry.update(latency_ratio=record.latency_ratio, latency_ratio_upper=record.latency_ratio_upper)
        return entry
    record = record.replace(files={"onnx": {"path": onnx_path.relative_to(ctx.run_dir).as_posix()}})
    return ParetoModel(number, record, ctx.run_dir, pruned.module, m)


def export_model(ctx: RunContext, module: Any, choice: dict[str, str], subject: Subject, runner: TrialRunner,
                 folder: Path) -> tuple[Path, float, dict[str, Any] | None]:
    """Export a listed model into ``folder``: model.onnx, the file to deploy (with INT8 units: the quantized file,
    beside its FP32 source model.fp32.onnx and calibration.json), its accuracy (through ONNX Runtime when quantized)
    and its ``precision`` record (None when the search does not quantize).

    Raises:
        QuantizationError: the model could not be quantized again, or its outputs moved too far.
    """
    from hwprune.export import export_onnx

    if runner.quant is None or not has_int8(choice):
        accuracy = runner.evaluate(module, {})
        path = export_onnx(module, subject.example_inputs, folder / "model.onnx", exporter=ctx.exporter)
        return path, accuracy, (precision_record(None, choice) if runner.quant is not None else None)
    fp32 = export_onnx(module, subject.example_inputs, folder / "model.fp32.onnx", exporter=ctx.exporter)
    q = runner.quant.apply(fp32, folder / "model.onnx", choice)
    write_calibration(q, folder)
    return q.model.path, runner.quant.evaluate(q.model.path, subject.evaluate), precision_record(q, choice)


def confirm_latency(ctx: RunContext, trial_m: Measurement, trial_ratio: float | None, onnx_path: Path,
                    budgets: Budgets, beside: Path | None,
                    earlier: list[float] | None = None) -> tuple[Measurement, Rounds | None, str | None]:
    """The measurement to report for an exported front model, its rounds beside the dense model (with ``beside``,
    the dense model's ONNX, under a relative budget; they are judged), and a note when the figures are not fresh
    ones.

    Under a relative budget the model and the dense model are measured in interleaved rounds
    (:func:`~hwprune.study.reference.interleaved_rounds`): the most accurate trials at the budget's edge are also
    the ones whose single measurement came out lucky, so one more single measurement is not enough. ``earlier``:
    the ratios of this run's re-measure of the same architecture as the incumbent, counted as rounds (the latency
    depends on the architecture, not the fine-tuned weights); at least one round is fresh.
    """
    def meets(m: Measurement) -> bool:
        return budgets.meets(m.latency.median_ms, m.memory.total_mb)[0]

    try:
        if beside is not None:
            rounds = interleaved_rounds(ctx.measure, onnx_path, beside, budgets.latency_factor, ctx.pair_measure,
                                        earlier=earlier)
            reference = budgets.reference_ms
            slow = (retime_in_slow_spell(rounds, reference, ctx.measure, onnx_path, beside, ctx.pair_measure)
                    if reference is not None else None)
            if slow is not None:
                ctx.log(f"{onnx_path.parent.name}: the host stayed slow through {len(rounds.measurements)} rounds "
                        f"(the dense model beside it {slow:.2f}x its reference at best); its own median is slowed "
                        "alike, its ratio is not")
            # rounds pooled from the incumbent's re-measure are recorded (latency_ratio_pooled), not noted: they are
            # rounds like any other, and a note the CLI prints under most recommendations would teach users to
            # skip the notes that matter
            return rounds.steadiest, rounds, own_median_note(rounds, reference, slow is not None)
        fresh = ctx.measure(onnx_path)
        if meets(fresh) == meets(trial_m):
            return fresh, None, None
        third = ctx.measure(onnx_path)
    except HwpruneError as exc:  # a board that vanished must not cost the search its answer
        ctx.log(f"re-measuring {onnx_path.parent.name} failed ({exc}); reporting its trial measurement")
        return trial_m, Rounds([trial_m], [trial_ratio]) if trial_ratio is not None else None, (
            f"re-measuring the exported file failed ({exc}); the figures are the trial's measurement of the "
            "same architecture")
    trio = sorted([trial_m, fresh, third], key=lambda m: m.latency.median_ms)
    return trio[1], None, ("the trial and the first re-measure disagreed about the latency budget; the figures "
                           "are the median of three measurements")


def _settles_on_screen(runner: TrialRunner, path: Path, choice: dict[str, str]) -> Any:
    """With ``--screen on``, what settles an incumbent's re-measure after one round: the screen predicts it well
    inside the budget and the round agrees (:meth:`~hwprune.study.screening.Screening.settle_ms_for`). An incumbent
    is measured again because the most accurate feasible trial is the one most likely to owe its feasibility to a
    lucky measurement; one the predictor independently puts well inside the budget does not. None otherwise (and
    for INT8 choices, which the FP32 predictor does not know)."""
    if runner.screening is None or has_int8(choice):
        return None
    settle_ms = runner.screening.settle_ms_for(path, runner.budgets)
    if settle_ms is None:
        return None
    return lambda r: r.judged_ms(runner.budgets.now()) <= settle_ms


def measure_again(ctx: RunContext, ratios: dict[str, float], subject: Subject, space: PruningSpace,
                  runner: TrialRunner) -> dict[str, float]:
    """The latency of the model pruned to ``ratios``, measured again: interleaved with the dense model under a
    relative budget (``latency_ratio`` is then the median ratio), else the median of ``ROUNDS`` measurements.
    Latency does not depend on the weights, so the model is neither calibrated nor fine-tuned. With ``--screen
    on``, one round settles a model the screen predicts well inside the budget (:func:`_settles_on_screen`)."""
    from hwprune.export import export_onnx

    t0 = time.perf_counter()
    ratios, choice = runner.split(ratios)
    pruned = prune(subject.model, subject.example_inputs, ratios, space)
    pruned.module.eval()
    with tempfile.TemporaryDirectory(prefix="hwprune-") as tmp:
        path = export_onnx(pruned.module, subject.example_inputs, Path(tmp) / "incumbent.onnx", exporter=ctx.exporter)
        if runner.quant is not None and has_int8(choice):  # the INT8 file is what was measured; its outputs are not
            path = runner.quant.apply(path, Path(tmp) / "incumbent.int8.onnx", choice, check=False).model.path
        if runner.beside is not None:
            rounds = interleaved_rounds(ctx.measure, path, runner.beside, runner.budgets.latency_factor,
                                        ctx.pair_measure, settled=_settles_on_screen(runner, path, choice))
            again = {"latency_ms": rounds.middle.latency.median_ms, "latency_ratio": rounds.ratio}
            signature = signature_with(pruned.signature, choice)
            runner.remeasured[signature] = runner.remeasured.get(signature, []) + rounds.ratios
        else:
            again = {"latency_ms": statistics.median(ctx.measure(path).latency.median_ms for _ in range(ROUNDS))}
    runner.book("measure_incumbent", time.perf_counter() - t0)
    return again
