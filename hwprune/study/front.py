"""The final stages on the trials: confirm the front, fine-tune the final candidates, apply the accuracy guard,
recommend, and export each listed model's files."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from hwprune.study.confirm import OVER_BUDGET, confirm_front
from hwprune.study.context import RunContext
from hwprune.study.finalists import add_agreement, deferred_under, final_candidates, guard, guard_bound, recommend
from hwprune.study.optimize import Trials
from hwprune.study.records import ModelRecord
from hwprune.study.result import ParetoModel
from hwprune.study.run_folder import write_model_files


@dataclass(frozen=True)
class Front:
    """The models a search lists, and those it left out on the way."""

    models: list[ParetoModel] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)  # summary.json's rejected_on_remeasure
    under: list[dict[str, Any]] = field(default_factory=list)  # left out by the accuracy guard (also in rejected)
    recommended: int | None = None  # trial number


def select_front(ctx: RunContext, trials: Trials, ranked: pd.DataFrame, dense: ModelRecord) -> Front:
    """Confirm the front of ``ranked`` (trials with latency as the budget judges it), add the final candidates,
    keep what the accuracy guard allows, recommend one, and write every listed model's files."""
    runner, budgets, subject = trials.runner, trials.budgets, trials.subject
    # per-trial stage times must stay per trial: the front's rebuilds are booked as one stage of their own
    trial_stages = dict(runner.stage_seconds)
    t_confirm = time.perf_counter()
    deferred = guard_bound(ranked, budgets)
    models, rejected, skipped = confirm_front(ctx, ranked, trials.study, subject, runner, budgets, dense, deferred)
    runner.stage_seconds = {**trial_stages, "confirm_front": time.perf_counter() - t_confirm}
    over = {r["trial"] for r in rejected if r["reason"] == OVER_BUDGET}
    models, dropped = final_candidates(ctx, models, ranked, over, trials.study, subject, runner, budgets, dense,
                                       skipped)
    # a trial the front's confirmation left out as dominated may come back as a final candidate
    listed = {pm.trial for pm in models}
    rejected = [r for r in rejected if r["trial"] not in listed] + dropped
    unconfirmed = deferred_under(skipped, listed | {r["trial"] for r in rejected}, trials.study, ranked)
    if unconfirmed:
        ctx.log(f"{len(unconfirmed)} front model(s) under the accuracy guard by their trial accuracy and not final "
                "candidates: left out without re-measuring them")
    models, under = guard(ctx, models, budgets, trials.dense.accuracy, subject.metric)
    under = unconfirmed + under
    rejected += under
    number = recommend(ctx, models, budgets)
    for pm in models:
        write_model_files(ctx, pm)
        add_agreement(pm, trials.recovery)
    return Front(models, rejected, under, number)
