"""optuna-dashboard shows hwprune's infeasible trials as infeasible.

Optuna 5's ``trial.set_constraint(key, value)`` stores each constraint as a trial system attribute
``constraints:<key>``. optuna-dashboard (0.21, ``_serializer.serialize_frozen_trial``) reads only the older form, one
list under the system attribute ``constraints``, and counts a trial without it as feasible: every over-budget trial
looked feasible in its plots. :class:`DashboardConstraints` wraps the objective and, when it returns, writes that
list too. Metric names need nothing here: ``study.set_metric_names`` writes ``study:metric_names``, which the
dashboard reads.

Optuna merges both forms in ``trial.constraints`` (the list's entries under the keys "0", "1", ...): code that picks
constraints by name must use :func:`named_constraints`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna

LIST_KEY = "constraints"  # the system attribute optuna-dashboard reads (and Optuna's pre-set_constraint form)
NAMED_PREFIX = f"{LIST_KEY}:"  # what Trial.set_constraint writes


def named_constraints(system_attrs: Mapping[str, Any]) -> dict[str, float]:
    """The constraints a trial stored with ``set_constraint``, by name, sorted: without the dashboard's copy.

    Args:
        system_attrs: a trial's system attributes (``FrozenTrial.system_attrs``).

    Returns:
        ``{name: value}`` for every ``constraints:<name>`` attribute.
    """
    return {k[len(NAMED_PREFIX):]: float(v) for k, v in sorted(system_attrs.items()) if k.startswith(NAMED_PREFIX)}


class DashboardConstraints:
    """An objective wrapper: runs ``objective``, then stores its trial's named constraints as the list
    optuna-dashboard reads (in :func:`named_constraints` order).

    It wraps the objective rather than being an ``optimize(callbacks=...)`` callback because callbacks run after the
    trial is finished, and storages refuse attributes on a finished trial (``UpdateFinishedTrialError``).
    """

    def __init__(self, objective: Callable[[optuna.Trial], float | Sequence[float]]) -> None:
        self.objective = objective

    def __call__(self, trial: optuna.Trial) -> float | Sequence[float]:
        """Run the objective and mirror its constraints; a trial that raises is left as it is."""
        values = self.objective(trial)
        mirror_constraints(trial)
        return values

    def __getattr__(self, name: str) -> Any:  # the wrapped runner's attributes (caches, counters) stay reachable
        return getattr(self.objective, name)


def mirror_constraints(trial: optuna.Trial) -> list[float]:
    """Write ``trial``'s named constraints as the ``constraints`` list, once; the trial must still be running.

    Returns:
        The list written ([] when the trial has no named constraints, and nothing is written).
    """
    attrs = trial.storage.get_trial_system_attrs(trial._trial_id)
    values = list(named_constraints(attrs).values())
    if values and LIST_KEY not in attrs:
        # Trial has no public setter for system attributes (Trial.set_system_attr was removed in Optuna 4), so the
        # storage is written directly, as set_constraint itself does.
        trial.storage.set_trial_system_attr(trial._trial_id, LIST_KEY, values)
    return values
