"""The trials table: one plain record per trial, for trials.csv and the report."""

from __future__ import annotations

import json
from typing import Any

import optuna
from optuna.trial import TrialState

from hwprune.integrations.dashboard import named_constraints
from hwprune.study import attrs
from hwprune.study.budgets import is_feasible, latency_ratio


def trials_table(study: optuna.Study) -> list[dict[str, Any]]:
    """One plain record per trial (state, values, feasibility, user attributes) for tables and reports."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        constraints = named_constraints(t.system_attrs)
        row: dict[str, Any] = {
            "trial": t.number,
            "state": t.state.name,
            "accuracy": t.values[0] if t.values else None,
            "latency_ms": t.values[1] if t.values else None,
            "memory_mb": t.values[2] if t.values else None,
            "feasible": is_feasible(t),
            "constraint_latency": constraints.get("latency"),
            "constraint_memory": constraints.get("memory"),
            "constraint_accuracy": constraints.get("accuracy"),
            "judged_by": json.dumps(t.user_attrs[attrs.JUDGED_BY]) if attrs.JUDGED_BY in t.user_attrs else None,
            "latency_ratio": latency_ratio(t),
            # the interleaved rounds behind latency_ratio: 3 or more; with --screen on, 1 where the round agreed
            # it is well inside the budget, 0 where it was measured alone and judged against the dense reference
            "latency_rounds": t.user_attrs.get(attrs.LATENCY_ROUNDS),
            "uniform_ratio": t.user_attrs.get(attrs.UNIFORM_RATIO),
            "signature": t.user_attrs.get(attrs.SIGNATURE),
            "macs": t.user_attrs.get(attrs.MACS),
            "params": t.user_attrs.get(attrs.PARAMS),
            "cached_from": t.user_attrs.get(attrs.CACHED_FROM),
            "fail_reason": t.user_attrs.get(attrs.FAIL_REASON) or (
                "its worker stopped without finishing it (interrupted, killed, or its heartbeat was lost)"
                if t.state == TrialState.FAIL else None),
            "duration_s": t.duration.total_seconds() if t.duration else None,
            "stage_seconds": json.dumps(t.user_attrs.get(attrs.STAGE_SECONDS, {})),
            "ratios": json.dumps({k: v for k, v in t.params.items() if not k.startswith(attrs.PRECISION_PARAM)}),
            "precision": t.user_attrs.get(attrs.PRECISION, "fp32"),
            "precision_locked": bool(t.user_attrs.get(attrs.PRECISION_LOCKED, False)),
            "screened": t.user_attrs.get(attrs.SCREENED),  # --screen on: the predicted ms of a trial left unmeasured
            # --screen on: the judged latency predicted before measuring (an estimate beside the measurement)
            "predicted_ms": t.user_attrs.get(attrs.PREDICTED),
            # --screen on: the trial that dominated it when it was settled on one measurement (attrs.DOMINATED_BY)
            "dominated_by": t.user_attrs.get(attrs.DOMINATED_BY),
            # --screen on: settled on one measurement because it could not be listed (attrs.UNDER_GUARD)
            "under_guard": t.user_attrs.get(attrs.UNDER_GUARD),
        }
        rows.append(row)
    return rows
