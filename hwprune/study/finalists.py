"""After the front is confirmed: the final candidates' long fine-tune, the accuracy guard, the recommendation (and
its optional TVM tuning), and each model's agreement with the dense one."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from typing import Any

import optuna
import pandas as pd
import torch

from hwprune import train
from hwprune.backends import create_backend
from hwprune.errors import HwpruneError
from hwprune.quant.base import FP32
from hwprune.recovery import RecoveryPlan, agreement
from hwprune.study import attrs
from hwprune.study import pareto as pareto_mod
from hwprune.study.accuracy import UNDER_GUARD, retention
from hwprune.study.budgets import NEAR_MISS, Budgets, latency_ratio
from hwprune.study.confirm import confirm_trial, drop_dominated, judged_ms, objectives, rejected_entry
from hwprune.study.context import RunContext
from hwprune.study.objective import TrialRunner
from hwprune.study.precision import has_int8, precision_record, write_calibration
from hwprune.study.records import Meets, ModelRecord
from hwprune.study.result import ParetoModel
from hwprune.subjects.base import Subject


def near_miss(ranked: pd.DataFrame, budgets: Budgets) -> pd.Series:
    """Rows of ``ranked`` (latency as the budget judges it) over the latency budget by at most ``NEAR_MISS`` of it
    and within the memory budget."""
    if budgets.latency_ms is None or ranked.empty:
        return pd.Series(False, index=ranked.index)
    memory_ok = [budgets.meets(0.0, mem)[1] for mem in ranked["memory_mb"]]
    latency = ranked["latency_ms"]
    over = (latency > budgets.latency_ms) & (latency <= budgets.latency_ms * (1 + NEAR_MISS))
    return over & pd.Series(memory_ok, index=ranked.index)


def guard_bound(ranked: pd.DataFrame, budgets: Budgets) -> frozenset[int]:
    """Feasible trials the accuracy guard would leave out unless they become final candidates: under the guard's
    floor by their trial accuracy, in a search whose guard judges listed models after the final fine-tune (not
    ``budgets.guard_trials``). A model that is not a final candidate keeps its trial accuracy (its rebuild replays
    the trial's seeded fine-tune), so confirming it before the final candidates are drawn spends board time on a
    model that will not be listed: at 0.6x on the demo, 6 of 12 confirmations were such models. The final candidates
    confirm those they draw."""
    if budgets.accuracy_floor is None or budgets.guard_trials or ranked.empty:
        return frozenset()
    under = ranked["feasible"] & (ranked["accuracy"] < budgets.accuracy_floor)
    return frozenset(int(n) for n in ranked.loc[under, "trial"])


def deferred_under(deferred: frozenset[int], taken: set[int], study: optuna.Study,
                   ranked: pd.DataFrame) -> list[dict[str, Any]]:
    """A ``rejected_on_remeasure`` entry (``UNDER_GUARD``, ``remeasured``: false) for each trial of ``deferred``
    (:func:`guard_bound`) not in ``taken``, with its trial's measurement and accuracy: the guard leaves it out on
    its trial accuracy, without a re-measure."""
    accuracy = dict(zip(ranked["trial"].astype(int), ranked["accuracy"].astype(float)))
    entries = []
    for t in sorted((t for t in study.get_trials(deepcopy=False) if t.number in deferred - taken),
                    key=lambda t: t.number):
        ratio = latency_ratio(t)
        entries.append({"trial": t.number, "latency_ms": float(t.values[1]), "memory_mb": float(t.values[2]),
                        **({"latency_ratio": ratio} if ratio is not None else {}),
                        "accuracy": accuracy[t.number], "reason": UNDER_GUARD, "remeasured": False})
    return entries


@dataclass
class _Picker:
    """Draws finalists from a pool of trials, confirming those not confirmed yet (at most twice the wanted number)."""

    ctx: RunContext
    by_number: dict[int, optuna.trial.FrozenTrial]
    subject: Subject
    runner: TrialRunner
    budgets: Budgets
    dense: ModelRecord
    confirmed: dict[int, ParetoModel]
    left_out: set[int]  # trials whose confirmation put them over a budget already (the picker's own copy)
    near: set[int]  # trials measured just over the latency budget
    deferred: frozenset[int]  # front trials left unconfirmed (guard_bound): confirming one is not a new try
    finalists: list[ParetoModel] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    tries: int = 0

    def take(self, number: int) -> bool:
        """Add trial ``number`` to the finalists if it holds within the budgets (confirming it if need be)."""
        if number in self.confirmed:
            self.finalists.append(self.confirmed[number])
            return True
        if number in self.left_out:
            return False
        self.tries += number not in self.deferred
        t0 = time.perf_counter()
        found = confirm_trial(self.ctx, self.by_number[number], self.subject, self.runner, self.budgets, self.dense)
        self.runner.book("confirm_front", time.perf_counter() - t0)
        if not isinstance(found, ParetoModel):
            self.rejected.append(found)
            self.left_out.add(number)  # not confirmed again (as the uniform baseline, say)
            return False
        where = ("measured just over the latency budget in its trial, within it on re-measure"
                 if number in self.near else "a front model, confirmed once drawn" if number in self.deferred
                 else "off the front")
        self.ctx.log(f"trial {number} joins the final candidates ({where}, {self.subject.metric} "
                     f"{found.entry.accuracy_proxy:.4f} by the proxy)")
        self.finalists.append(found)
        return True


def final_candidates(ctx: RunContext, models: list[ParetoModel], ranked: pd.DataFrame, left_out: set[int],
                     study: optuna.Study, subject: Subject, runner: TrialRunner, budgets: Budgets,
                     dense: ModelRecord,
                     deferred: frozenset[int] = frozenset()) -> tuple[list[ParetoModel], list[dict[str, Any]]]:
    """Give the ``final_candidates`` most accurate feasible models (by the search's proxy) the final fine-tune,
    and return the front with those that are not dominated afterwards, and the models left out.

    A 20-step proxy cannot rank models whose accuracies differ by a point, and the final fine-tune is what the
    user deploys. The candidates are drawn from every feasible trial, not only from the front: the
    recommendation is the most accurate model within the budgets, however fast, and on the front a model a hair
    more accurate by the proxy and a hair faster hides the ones beside it, which after the fine-tune may be
    the more accurate (bench/README.md). Trials measured just over the latency budget (``NEAR_MISS``) are
    candidates too. A candidate not yet confirmed is confirmed like a front model first, and only a confirmed
    one is fine-tuned; ``left_out`` are trials whose confirmation put them over a budget already, ``deferred``
    front trials the front's confirmation left to this stage (:func:`guard_bound`).

    The most accurate uniform model within the budgets (the bisection's, see
    :func:`~hwprune.study.bracket.bracket_budget`) is always a finalist, one more when the proxy did not rank
    it among the first: it is the baseline a user would otherwise deploy, so the recommendation is never a model
    the same fine-tune leaves less accurate than it."""
    c = ctx.config
    # guard_trials is False exactly when final candidates get the final fine-tune (make_budgets)
    if budgets.guard_trials or ranked.empty:
        return models, []
    confirmed = {pm.trial: pm for pm in models if pm.module is not None}
    if not confirmed and not deferred:
        return models, []
    near = near_miss(ranked, budgets)
    pool = (ranked[ranked["feasible"] | near].sort_values("trial").drop_duplicates("signature", keep="first")
            .sort_values(["accuracy", "latency_ms"], ascending=[False, True]))
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    picker = _Picker(ctx, by_number, subject, runner, budgets, dense, confirmed, set(left_out),
                     set(ranked.loc[near, "trial"].astype(int)), deferred)  # near: over the budget, so none is feasible
    want = max(1, c.final_candidates)
    for number in (int(n) for n in pool["trial"]):
        if len(picker.finalists) == want or picker.tries >= 2 * want:
            break
        picker.take(number)
    uniform = [int(n) for n, u in zip(pool["trial"], pool[attrs.UNIFORM_RATIO]) if pd.notna(u)]
    if picker.finalists and not any(pm.trial in uniform for pm in picker.finalists):
        for number in uniform[:2]:
            if picker.take(number):
                ctx.log(f"trial {number}, the most accurate uniform model within the budgets, is a final "
                        "candidate too: the baseline the recommendation must beat")
                break
    front, dropped = _finetune_finalists(ctx, models, picker.finalists, set(confirmed), subject, runner, budgets)
    return front, picker.rejected + dropped


def _finetune_finalists(ctx: RunContext, models: list[ParetoModel], finalists: list[ParetoModel],
                        confirmed: set[int | None], subject: Subject, runner: TrialRunner,
                        budgets: Budgets) -> tuple[list[ParetoModel], list[dict[str, Any]]]:
    """Fine-tune ``finalists`` and return the front (``models`` and the finalists from off it) that no finalist
    dominates afterwards, and the models left out."""
    t0 = time.perf_counter()
    for i, pm in enumerate(finalists, 1):
        ctx.log(f"final fine-tune {i}/{len(finalists)}: trial {pm.trial} ({subject.metric} "
                f"{pm.accuracy:.4f} before), {ctx.config.final_finetune_steps} steps distilled from the dense model...")
        final_finetune(ctx, pm, subject, runner)
    runner.stage_seconds["final_finetune"] = time.perf_counter() - t0
    if len(finalists) > 1:
        ctx.log("after the final fine-tune: " + ", ".join(f"trial {pm.trial} {pm.accuracy:.4f}" for pm in finalists))
    kept, dominated = drop_dominated(ctx, finalists, budgets, "dominated after the final fine-tune",
                                     "dominated by another final candidate after the final fine-tune")
    gone = {pm.trial for pm in finalists} - {pm.trial for pm in kept}
    front = [pm for pm in models if pm.trial not in gone] + [pm for pm in kept if pm.trial not in confirmed]
    # a finalist from off the front can dominate front models it never met; one more accurate after its final
    # fine-tune and by the proxy both (which every model got alike), and as fast and small, leaves no reason to
    # deploy them: a demo run at 0.4x listed a model with 6% fewer MACs that ran 6% slower than the recommended
    front, behind = drop_dominated(ctx, front, budgets, "dominated by a final candidate",
                                   "dominated by a final candidate after the final fine-tune",
                                   accuracies=("accuracy", "accuracy_proxy"))
    front.sort(key=lambda pm: (judged_ms(pm, budgets), -pm.accuracy))
    return front, dominated + behind


def final_finetune(ctx: RunContext, pm: ParetoModel, subject: Subject, runner: TrialRunner) -> None:
    """The long distilled fine-tune, seeded alike for every finalist; the exported file gets the new weights."""
    from hwprune.export import export_onnx

    assert subject.train_data is not None and pm.module is not None
    torch.manual_seed(ctx.config.seed)
    train.finetune(pm.module, subject.train_data, ctx.config.final_finetune_steps, loss_fn=subject.loss_fn,
                   lr=0.02, teacher=subject.teacher or subject.model)
    # same architecture, new weights: the measured latency and memory still hold
    choice = pm.entry.precision["units"] if isinstance(pm.entry.precision, dict) else {}
    if runner.quant is not None and has_int8(choice):
        requantize(ctx, pm, choice, subject, runner)
        return
    pm.entry = pm.entry.replace(accuracy=runner.evaluate(pm.module, {}),
                                final_finetune_steps=ctx.config.final_finetune_steps)
    export_onnx(pm.module, subject.example_inputs, pm.onnx_path, exporter=ctx.exporter)


def requantize(ctx: RunContext, pm: ParetoModel, choice: dict[str, str], subject: Subject,
               runner: TrialRunner) -> None:
    """An INT8 finalist after its fine-tune: the new FP32 weights exported, quantized again (its calibration ranges
    and output check are the new weights'), and its accuracy taken from the new quantized file through ONNX Runtime.
    A new quantization that fails keeps the file from before the fine-tune, and says so."""
    from hwprune.export import export_onnx

    assert runner.quant is not None and pm.module is not None
    folder = pm.onnx_path.parent
    fp32 = export_onnx(pm.module, subject.example_inputs, folder / "model.fp32.new.onnx", exporter=ctx.exporter)
    try:
        q = runner.quant.apply(fp32, folder / "model.new.onnx", choice)
        accuracy = runner.quant.evaluate(q.model.path, subject.evaluate)
    except HwpruneError as exc:
        ctx.log(f"trial {pm.trial}: re-quantizing after the final fine-tune failed ({exc}); its INT8 file and "
                "accuracy are from before the fine-tune")
        pm.entry = pm.entry.replace(remeasure_note=f"re-quantizing after the final fine-tune failed: {exc}")
        for p in (fp32, folder / "model.new.onnx"):
            p.unlink(missing_ok=True)
        return
    fp32.replace(folder / "model.fp32.onnx")
    q.model.path.replace(pm.onnx_path)
    result = replace(q, model=replace(q.model, path=pm.onnx_path, source=folder / "model.fp32.onnx"))
    write_calibration(result, folder)
    pm.entry = pm.entry.replace(accuracy=accuracy, final_finetune_steps=ctx.config.final_finetune_steps,
                                precision=precision_record(result, choice))


def guard(ctx: RunContext, models: list[ParetoModel], budgets: Budgets, dense_accuracy: float,
          metric: str) -> tuple[list[ParetoModel], list[dict[str, Any]]]:
    """The models that keep within the accuracy guard, and a ``rejected_on_remeasure`` entry for each other one
    (whose exported files are removed). Every model's record gets ``meets.accuracy`` and its retention."""
    kept, under = [], []
    for pm in models:
        meets = Meets(pm.entry.meets.latency, pm.entry.meets.memory, budgets.meets_accuracy(pm.accuracy))
        pm.entry = pm.entry.replace(meets=meets, accuracy_retention=retention(pm.accuracy, dense_accuracy))
        if meets.accuracy:
            kept.append(pm)
            continue
        ctx.log(f"trial {pm.trial} left out: {metric} {pm.accuracy:.4f} is under the accuracy guard "
                f"({budgets.accuracy_floor:.4f})")
        under.append(rejected_entry(pm, UNDER_GUARD, accuracy=pm.accuracy))
        shutil.rmtree(ctx.model_dir(pm.trial), ignore_errors=True)
    return kept, under


def recommend(ctx: RunContext, models: list[ParetoModel], budgets: Budgets) -> int | None:
    """The most accurate model that meets the budgets; among the final candidates when there were some (their
    accuracy, after the final fine-tune, is not comparable with the others' proxy). Tuned on the device with
    ``--tune-final``."""
    if not models:
        return None
    pool = [pm for pm in models if pm.entry.final_finetune_steps] or models
    number = pareto_mod.recommend(objectives(pool, budgets))
    pm = next(p for p in models if p.trial == number)
    pm.entry = pm.entry.replace(recommended=True)
    ctx.log(f"recommending trial {number}")
    if ctx.config.tune_final_trials:
        tune_final(ctx, pm, ctx.config.tune_final_trials)
    return number


def tune_final(ctx: RunContext, pm: ParetoModel, trials: int) -> None:
    """MetaSchedule-tune the recommended model on the device and record its tuned latency beside the search's
    (which stays the figure the front was ranked on). A failure is recorded, never fatal."""
    tuned_profile = ctx.profile.with_overrides(tvm__tuning_trials=trials)
    ctx.log(f"tuning the recommended model (trial {pm.trial}) with {trials} MetaSchedule trials on "
            f"{ctx.profile.name}...")
    t0 = time.perf_counter()
    backend = None
    try:
        backend = create_backend(tuned_profile)
        m = backend.measure(pm.onnx_path)
    except HwpruneError as exc:
        ctx.log(f"tuning the recommended model failed: {exc}")
        pm.entry = pm.entry.replace(final_tuned={"tuning_trials": trials, "error": str(exc)})
        return
    finally:
        if backend is not None:
            backend.close()
    pm.entry = pm.entry.replace(final_tuned={
        "tuning_trials": trials, "tuned": m.tuned, "seconds": round(time.perf_counter() - t0, 2),
        "latency_ms": {"median": m.latency.median_ms, "p90": m.latency.p90_ms, "min": m.latency.min_ms},
        "tuning": m.extra.get("tuning"),
    })
    ctx.log(f"tuned: {m.latency.median_ms:.3f} ms (search measurement {pm.latency_ms:.3f} ms)")


def add_agreement(pm: ParetoModel, plan: RecoveryPlan | None) -> None:
    """The model's top-1 agreement with the dense model on recorded inputs recovery never saw, and on those it
    did (a gap between the two shows how much the recovery fitted its own inputs). An INT8 model's is its deployed
    quantized file's, run through ONNX Runtime: the PyTorch module is its FP32 source, not the INT8 model."""
    if plan is None or pm.module is None:
        return
    model = pm.module
    precision = pm.entry.precision
    if isinstance(precision, dict) and precision.get("label", FP32) != FP32:
        from hwprune.quant.evaluate import OrtModule

        model = OrtModule(pm.onnx_path)
    with torch.no_grad():
        pm.entry = pm.entry.replace(agreement={"heldout": agreement(model, plan.heldout),
                                               "recovery_inputs": agreement(model, plan.batches)})
