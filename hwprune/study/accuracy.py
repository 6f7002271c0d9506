"""The search's accuracy stages: recovery data before the trials, the accuracy guard after them.

Accuracy is a constraint like the budgets: a model that lost more than ``--max-accuracy-drop`` is infeasible for the
sampler (when the trial's accuracy is the one reported), the front and the recommendation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from hwprune.config import AccuracyGuard, SearchConfig
from hwprune.recovery import RecoveryPlan, distill_loss, iterate, plan_from_inputs, plan_recovery
from hwprune.study.budgets import Budgets
from hwprune.subjects.base import Subject
from hwprune.subjects.data import UserData
from hwprune.subjects.loader import check_evaluate

UNDER_GUARD = "under the accuracy guard"  # a rejected_on_remeasure reason


@dataclasses.dataclass(frozen=True)
class DenseScore:
    """The dense model's score, and the subject the search prunes (with recovery data where it had none)."""

    accuracy: float
    subject: Subject
    recovery: RecoveryPlan | None


def score_dense(subject: Subject, config: SearchConfig, log: Callable[[str], None]) -> DenseScore:
    """Score the dense model and, when the subject brings no calibration or training data, plan its recovery
    (:mod:`hwprune.recovery`): inputs recorded from ``evaluate``, synthetic inputs, or the user's unlabelled data.

    Returns:
        The dense score, and the subject to search with: its calibration and training data are the recovery
        batches (inputs with the dense model's outputs as targets, and a distillation loss) when recovery applies.

    Raises:
        SubjectError: ``evaluate`` misbehaves, or the recovery asked for cannot be done for this model.
    """
    has_data = subject.calibration_data is not None or subject.train_data is not None
    record = not has_data and config.recovery != "none"
    accuracy, recorded = check_evaluate(subject, record=record)
    if has_data:
        return DenseScore(accuracy, subject, None)
    user = subject.data if isinstance(subject.data, UserData) else None
    if user is not None:  # inputs without targets: distil on them; they are not evaluate's, so nothing leaks
        plan = plan_from_inputs(subject.model, user.inputs, [], "data", "data", leak=False,
                                note="the given inputs (no targets) re-calibrate BatchNorm and are distilled on")
    else:
        plan = plan_recovery(subject.model, subject.example_inputs, recorded, config.recovery, seed=config.seed,
                             log=log)
    log(f"recovery: {plan.method} ({plan.samples} samples for re-calibration and distillation"
        + (f", {plan.heldout_samples} held out" if plan.heldout_samples else "") + ")"
        + ("; evaluate's inputs are among them, so its accuracy may be optimistic" if plan.leak else ""))
    if not plan.active:
        return DenseScore(accuracy, subject, plan)
    batches = iterate(plan)
    searched = dataclasses.replace(subject, calibration_data=batches, train_data=batches, loss_fn=distill_loss)
    return DenseScore(accuracy, searched, plan)


def accuracy_floor(guard: AccuracyGuard | None, dense_accuracy: float) -> float | None:
    """The least accuracy a model may keep under ``guard`` (None without a guard)."""
    return None if guard is None else guard.floor(dense_accuracy)


def guard_record(guard: AccuracyGuard | None, budgets: Budgets, dense_accuracy: float,
                 recommended: dict[str, Any] | None, best: dict[str, Any] | None,
                 under: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``accuracy_guard`` record of summary.json."""
    return {
        "max_drop": str(guard) if guard else "off",
        "floor": budgets.accuracy_floor,
        "dense": dense_accuracy,
        "judged_on": "trial accuracy" if budgets.guard_trials else "accuracy after the final fine-tune",
        "met": None if recommended is None else budgets.meets_accuracy(recommended["accuracy"]),
        "retention": None if recommended is None else retention(recommended["accuracy"], dense_accuracy),
        "best_within_budgets": best,
        "refused": recommended is None and guard_refused(budgets, best, under),
    }


def retention(accuracy: float, dense: float) -> float | None:
    """``accuracy`` as a share of the dense model's (None when the dense score is not positive)."""
    return accuracy / dense if dense > 0 else None


def best_within_budgets(ranked: pd.DataFrame, budgets: Budgets,
                        under: Sequence[dict[str, Any]] = ()) -> dict[str, Any] | None:
    """The most accurate model within the latency and memory budgets, whatever its accuracy: what the message names
    when nothing keeps within the guard. ``under`` are confirmed models the guard left out, with their accuracy as
    the guard judged it (after the final fine-tune, where they had one), which counts over their trial's proxy."""
    best: dict[str, Any] | None = None
    if not ranked.empty:
        ok = [all(budgets.meets(lat, mem)) for lat, mem in zip(ranked["latency_ms"], ranked["memory_mb"])]
        within = ranked[pd.Series(ok, index=ranked.index)]
        if not within.empty:
            row = within.sort_values("accuracy", ascending=False).iloc[0]
            best = {"trial": int(row["trial"]), "accuracy": float(row["accuracy"])}
    judged = {int(u["trial"]): float(u["accuracy"]) for u in under}
    if best is not None and best["trial"] in judged:
        best["accuracy"] = judged[best["trial"]]
    for trial, accuracy in judged.items():
        if best is None or accuracy > best["accuracy"]:
            best = {"trial": trial, "accuracy": accuracy}
    return best


def guard_refused(budgets: Budgets, best: dict[str, Any] | None, under: list[dict[str, Any]]) -> bool:
    """Whether the accuracy guard, not a budget, left the search without a model: models within the budgets
    existed, and those the guard judged fell under it."""
    if budgets.accuracy_floor is None or best is None:
        return False
    return bool(under) or (budgets.guard_trials and best["accuracy"] < budgets.accuracy_floor)


def unreachable_message(guard: AccuracyGuard, budgets: Budgets, dense_accuracy: float, metric: str,
                        best: dict[str, Any] | None, has_data: bool, storage: str) -> str:
    """The one-line refusal when models met the budgets but none kept within the accuracy guard."""
    reached = (f"the best {metric} within the budgets was {best['accuracy']:.4f} (trial {best['trial']})"
               if best else "no model within the budgets kept it")
    helps = ("loosen a budget, run more --trials, or raise --final-finetune-steps" if has_data else
             "give calibration/training data (a fourth factory element, --data FILE; README 'Your own model'), "
             "or loosen a budget")
    return (f"no model within the budgets kept the accuracy guard ({metric} at least {budgets.accuracy_floor:.4f}: "
            f"dense {dense_accuracy:.4f} less {guard}); {reached}. To go on: {helps}, or accept a larger drop with "
            f"--max-accuracy-drop; completed trials are kept in {storage}")
