"""The budgets a search judges candidates by, and a trial's latency as they judge it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna

from hwprune.integrations.dashboard import named_constraints
from hwprune.study import attrs

CONFIRMED_ATTR = attrs.CONFIRMED  # study user attribute: trial number -> its latency measured again
# a trial measured over the latency budget by at most this fraction of it is measured again before it is given up:
# one measurement cannot tell 2% over from 2% under on a shared host. Seen on the demo at 0.4x: one architecture
# measured 0.410x in its trial and 0.395x over 4 interleaved rounds
NEAR_MISS = 0.05
# ratios -> {"latency_ms": .., "latency_ratio": ..}: a model measured again (the ratio under a relative budget)
ConfirmFn = Callable[[dict[str, float]], dict[str, float]]


@dataclass(frozen=True)
class Budgets:
    """The budgets of a search. A relative latency budget ("0.4x") also keeps its factor: a candidate is then judged
    on its latency divided by the dense model's measured right beside it (``ratio``), which a slow spell of a shared
    host moves far less than either latency alone (bench/README.md: the search's dense reference drifted 5-17% from
    side-by-side measurements, more than the margin between the best candidates and the budget).

    A relative budget follows the dense reference while trials run: ``follow`` gives the dense latency now, and
    :meth:`now` the budgets it implies. Nothing is changed in place, so every reader holds the same object."""

    latency_ms: float | None
    memory_mb: float | None
    latency_factor: float | None = None  # set for relative latency budgets: ``latency_ms`` = factor x dense reference
    # the accuracy guard: the least accuracy a model may keep (None = no guard), and whether trials are judged on it
    # (their accuracy is the one reported when no final fine-tune follows; else the guard judges the finalists)
    accuracy_floor: float | None = None
    guard_trials: bool = True
    # the dense model's latency now (ms), which a relative latency budget is a factor of; None: fixed budgets
    follow: Callable[[], float] | None = field(default=None, compare=False, repr=False)

    def now(self) -> Budgets:
        """These budgets with a relative latency budget resolved against the dense latency now (fixed ones as they
        are), and following nothing."""
        if self.follow is None:
            return self
        if self.latency_factor is None:
            return dataclasses.replace(self, follow=None)
        return dataclasses.replace(self, latency_ms=self.latency_factor * self.follow(), follow=None)

    def accuracy_violation(self, accuracy: float) -> float:
        """Optuna constraint value of the accuracy guard: <= 0 means the guard is met."""
        return self.accuracy_floor - accuracy if self.accuracy_floor is not None else -1.0

    def meets_accuracy(self, accuracy: float) -> bool:
        """Whether ``accuracy`` keeps within the accuracy guard (always, without one)."""
        return self.accuracy_violation(accuracy) <= 0

    def feasible(self, latency_ms: float, memory_mb: float, ratio: float | None, accuracy: float) -> bool:
        """A trial within the budgets and, where trials are judged on it, the accuracy guard."""
        return all(self.meets(latency_ms, memory_mb, ratio)) and (not self.guard_trials
                                                                  or self.meets_accuracy(accuracy))

    @property
    def reference_ms(self) -> float | None:
        """The dense reference a relative latency budget is a factor of (``latency_ms / latency_factor``); None
        without a relative latency budget."""
        if self.latency_factor and self.latency_ms is not None:
            return self.latency_ms / self.latency_factor
        return None

    def judged_ms(self, latency_ms: float, ratio: float | None = None) -> float:
        """The latency a budget is judged on: with a relative budget and a ``ratio`` to the dense model measured
        beside the candidate, that ratio times the dense reference; else ``latency_ms`` as measured."""
        reference = self.reference_ms
        return ratio * reference if reference is not None and ratio is not None else latency_ms

    def meets(self, latency_ms: float, memory_mb: float, ratio: float | None = None) -> tuple[bool, bool]:
        """Whether the latency and the memory are within their budgets (a missing budget is always met)."""
        lat_v, mem_v = self.violations(latency_ms, memory_mb, ratio)
        return lat_v <= 0, mem_v <= 0

    def violations(self, latency_ms: float, memory_mb: float, ratio: float | None = None) -> tuple[float, float]:
        """Optuna constraint values: <= 0 means the budget is met."""
        lat = self.judged_ms(latency_ms, ratio) - self.latency_ms if self.latency_ms is not None else -1.0
        mem = memory_mb - self.memory_mb if self.memory_mb is not None else -1.0
        return lat, mem

    def judged_by(self) -> dict[str, float | None]:
        """The ``budgets`` trial attribute: what a trial was judged by (a resumed run may bring other budgets)."""
        return {"latency_ms": self.latency_ms, "memory_mb": self.memory_mb,
                "accuracy_floor": self.accuracy_floor if self.guard_trials else None}


def latency_ratio(trial: optuna.trial.FrozenTrial) -> float | None:
    """The trial's latency divided by the dense model's measured beside it (stored only under relative budgets)."""
    value = trial.user_attrs.get(attrs.LATENCY_RATIO)
    return float(value) if value is not None else None


def judged_latency(trial: optuna.trial.FrozenTrial, budgets: Budgets) -> float:
    """A complete trial's latency as ``budgets`` judge it (:meth:`Budgets.judged_ms`)."""
    return budgets.judged_ms(trial.values[1], latency_ratio(trial))


def admitted(trial: optuna.trial.FrozenTrial, budgets: Budgets) -> bool:
    """Whether a complete trial is feasible under ``budgets`` (:meth:`Budgets.feasible`), which may not be the
    budgets of the run that measured it (:func:`is_feasible` reads those)."""
    acc, lat, mem = trial.values
    return budgets.feasible(lat, mem, latency_ratio(trial), acc)


def confirmed_latency(trial: optuna.trial.FrozenTrial, budgets: Budgets, confirmed: dict[str, Any]) -> float:
    """A complete trial's judged latency (:func:`judged_latency`), taken from its measurement again where
    ``confirmed`` (the study's ``CONFIRMED_ATTR``) holds one."""
    again = confirmed.get(str(trial.number))
    if again:
        return budgets.judged_ms(again["latency_ms"], again.get("latency_ratio"))
    return judged_latency(trial, budgets)


def is_feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial has values and met every constraint it stored (the budgets of the run that measured it)."""
    return bool(trial.values) and all(v <= 0 for v in named_constraints(trial.system_attrs).values())
