"""Refinement at the budget's edge: neighbours of the most accurate feasible trial.

A multi-objective sampler spreads its trials along the whole front, but the model a user deploys is the most accurate
one that fits, and it sits at the edge of the latency budget. So the last part of a search alternates the sampler
with neighbours of that model (NetAdapt-style moves over the widths the device allows): one group a channel step
wider, and as many other groups a step narrower as it takes for the estimated latency to fit the budget again. The
estimate scales the incumbent's measured latency by MACs, which tracks latency between architectures that differ by a
few aligned channel steps; the measurement of the neighbour, an ordinary enqueued trial, then decides.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import optuna
from optuna.trial import TrialState

from hwprune.pruning import PruningSpace
from hwprune.study.objective import Budgets, is_feasible, latency_ratio

REFINE_FROM = 0.6  # the share of the search (trials, or time) after which refinement starts
REFINE_EVERY = 2  # then one neighbour per this many completed trials
MAX_BUILDS = 16  # MACs counts (pruned copies) one neighbour may cost
# aim this far inside the latency budget: a neighbour estimated right at the edge measures over it about half the time,
# and the front is judged on the final budget and a re-measurement
BUDGET_MARGIN = 0.03

MacsFn = Callable[[dict[str, float]], int]


def neighbour(study: optuna.Study, space: PruningSpace, rng: random.Random, macs_of: MacsFn,
              budgets: Budgets) -> tuple[dict[str, float], int] | None:
    """Ratios of an untried neighbour of the most accurate feasible trial, and that trial's number; None when no trial
    is feasible yet or no untried neighbour fits.

    The neighbour widens one group by a step; while its estimated latency (the incumbent's, scaled by MACs) is over
    the latency budget less ``BUDGET_MARGIN`` (or over the incumbent's latency, without a budget), other groups are
    narrowed a step each. Latencies are the ones ``budgets`` judges (:meth:`Budgets.judged_ms`).
    """
    trials = study.get_trials(deepcopy=False)
    feasible = [t for t in trials if t.state == TrialState.COMPLETE and is_feasible(t)]
    if not feasible:
        return None
    def judged(t: optuna.trial.FrozenTrial) -> float:
        return budgets.judged_ms(t.values[1], latency_ratio(t))

    best = max(feasible, key=lambda t: (t.values[0], -judged(t)))
    knobs = space.knobs

    def ratios_of(widths: tuple[int, ...]) -> dict[str, float]:
        return {k.name: min(k.max_ratio, max(0.0, 1.0 - w / k.channels)) for k, w in zip(knobs, widths)}

    seen = {space.kept_widths(t.params) for t in trials if t.params}
    seen |= {space.kept_widths(t.system_attrs.get("fixed_params", {})) for t in trials if t.state == TrialState.WAITING}
    base = space.kept_widths(best.params)
    allowed = [[c for c in k.widths() if c >= k.channels * (1.0 - k.max_ratio) - 1e-9] for k in knobs]
    wider = {i: min(c for c in a if c > w) for i, (a, w) in enumerate(zip(allowed, base)) if any(c > w for c in a)}
    narrower = {i: max(c for c in a if c < w) for i, (a, w) in enumerate(zip(allowed, base)) if any(c < w for c in a)}
    base_macs = best.user_attrs.get("macs") or macs_of(ratios_of(base))
    best_ms = judged(best)
    target = budgets.latency_ms * (1.0 - BUDGET_MARGIN) if budgets.latency_ms is not None else best_ms
    builds = 0
    ups = list(wider)
    rng.shuffle(ups)
    for i in ups:
        widths = list(base)
        widths[i] = wider[i]
        downs = [j for j in narrower if j != i]
        rng.shuffle(downs)
        while builds < MAX_BUILDS:
            builds += 1
            estimate = best_ms * macs_of(ratios_of(tuple(widths))) / max(base_macs, 1)
            if estimate <= target or not downs:
                break
            j = downs.pop()
            widths[j] = narrower[j]
        if estimate <= target and tuple(widths) not in seen:
            return ratios_of(tuple(widths)), best.number
        if builds >= MAX_BUILDS:
            break
    return None


class EdgeRefiner:
    """Optuna callback: past ``REFINE_FROM`` of the search (of ``target`` trials, or of ``timeout_s``), enqueue a
    :func:`neighbour` of the most accurate feasible trial after every ``REFINE_EVERY`` completed trials.
    ``macs_of(ratios)`` counts a candidate's MACs; ``budgets`` are the search's, read at each call (a relative
    latency budget follows the dense reference)."""

    def __init__(self, space: PruningSpace, target: int | None, timeout_s: float | None, seed: int,
                 macs_of: MacsFn, budgets: Budgets, log: Callable[[str], None]) -> None:
        self.space, self.target, self.timeout_s, self.log = space, target, timeout_s, log
        self.macs_of, self.budgets = macs_of, budgets
        self.rng = random.Random(seed)
        self.started = time.perf_counter()
        self.since = 0
        self.enqueued = 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state != TrialState.COMPLETE:
            return
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        share = max(done / self.target if self.target else 0.0,
                    (time.perf_counter() - self.started) / self.timeout_s if self.timeout_s else 0.0)
        if share < REFINE_FROM or (self.target and done >= self.target):
            return
        self.since += 1
        if (self.since - 1) % REFINE_EVERY or study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return
        found = neighbour(study, self.space, self.rng, self.macs_of, self.budgets)
        if found is None:
            return
        ratios, of = found
        if not self.enqueued:
            self.log("refining at the budget's edge: neighbours of the most accurate feasible model join the "
                     "sampler's trials")
        self.enqueued += 1
        study.enqueue_trial(ratios, user_attrs={"neighbour_of": of})
