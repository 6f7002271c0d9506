"""Refinement at the budget's edge: neighbours of the most accurate feasible trial.

A multi-objective sampler spreads its trials along the whole front, but the model a user deploys is the most accurate
one that fits, and it sits at the edge of the latency budget. So the last part of a search alternates the sampler
with neighbours of that model (NetAdapt-style moves over the widths the device allows): one group a channel step
wider, and as many other groups a step narrower as it takes for the estimated latency to fit the budget again. The
estimate scales the incumbent's measured latency by MACs, which tracks latency between architectures that differ by a
few aligned channel steps; the measurement of the neighbour, an ordinary enqueued trial, then decides.

The most accurate feasible trial is also the one most likely to owe its feasibility to a lucky measurement, and its
latency scales every estimate. So each new incumbent is measured again (interleaved with the dense model under a
relative budget) before neighbours are built on it; one that no longer fits stops being the incumbent.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState

from hwprune.errors import HwpruneError
from hwprune.integrations.dashboard import named_constraints
from hwprune.pruning import PruningSpace
from hwprune.study import attrs
from hwprune.study.budgets import CONFIRMED_ATTR, Budgets, ConfirmFn, confirmed_latency, is_feasible

REFINE_FROM = 0.6  # the share of the search (trials, or time) after which refinement starts
REFINE_EVERY = 2  # then one neighbour per this many completed trials
MAX_BUILDS = 16  # MACs counts (pruned copies) one neighbour may cost
# aim this far inside the latency budget: a neighbour estimated right at the edge measures over it about half the time,
# and the front is judged on the final budget and a re-measurement
BUDGET_MARGIN = 0.03

CONFIRM_TRIES = 3  # incumbents measured again at most per refinement step

MacsFn = Callable[[dict[str, float]], int]


def incumbent(study: optuna.Study, budgets: Budgets) -> tuple[optuna.trial.FrozenTrial, float] | None:
    """The most accurate feasible trial and its judged latency (:meth:`Budgets.judged_ms`), taken from its
    measurement again (``CONFIRMED_ATTR``: ``latency_ms`` and, under a relative budget, ``latency_ratio``) where
    there is one: that measurement decides whether the trial fits the latency budget, both ways. None when no trial
    fits."""
    budgets = budgets.now()  # a relative latency budget follows the dense reference
    confirmed = study.user_attrs.get(CONFIRMED_ATTR) or {}

    def fits(t: optuna.trial.FrozenTrial, ms: float) -> bool:
        if str(t.number) not in confirmed or budgets.latency_ms is None:
            return is_feasible(t)
        others = [v for k, v in named_constraints(t.system_attrs).items() if k != "latency"]
        return ms <= budgets.latency_ms and all(v <= 0 for v in others)

    scored = [(t, confirmed_latency(t, budgets, confirmed))
              for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    scored = [(t, ms) for t, ms in scored if fits(t, ms)]
    return max(scored, key=lambda x: (x[0].values[0], -x[1]), default=None)


def neighbour(study: optuna.Study, space: PruningSpace, rng: random.Random, macs_of: MacsFn,
              budgets: Budgets) -> tuple[dict[str, float], int] | None:
    """Ratios of an untried neighbour of the most accurate feasible trial, and that trial's number; None when no trial
    is feasible yet or no untried neighbour fits.

    The incumbent is :func:`incumbent`'s. The neighbour widens one group by a step; while its estimated latency (the
    incumbent's, scaled by MACs) is over the latency budget less ``BUDGET_MARGIN`` (or over the incumbent's latency,
    without a budget), other groups are narrowed a step each. Latencies are the ones ``budgets`` judges
    (:meth:`Budgets.judged_ms`).
    """
    budgets = budgets.now()
    found = incumbent(study, budgets)
    if found is None:
        return None
    best, best_ms = found
    trials = study.get_trials(deepcopy=False)
    knobs = space.knobs

    def ratios_of(widths: tuple[int, ...]) -> dict[str, float]:
        # a removed block (width 0) maps to max_ratio, which removes it
        return {k.name: min(k.max_ratio, max(0.0, 1.0 - w / k.channels)) for k, w in zip(knobs, widths)}

    seen = {space.kept_widths(t.params) for t in trials if t.params}
    seen |= {space.kept_widths(t.system_attrs.get("fixed_params", {})) for t in trials if t.state == TrialState.WAITING}
    base = space.kept_widths(best.params)
    # blocks stay as the incumbent has them (a MACs estimate cannot price the operators a removed block saves), and
    # so do the groups inside a removed block: their widths change nothing
    removed = [k.name + "." for k, w in zip(knobs, base) if k.kind == "block" and w == 0]
    fixed = [k.kind == "block" or space.specs[k.name].root.startswith(tuple(removed)) for k in knobs]
    allowed = [[w] if fix else [c for c in k.widths() if c >= k.channels * (1.0 - k.max_ratio) - 1e-9]
               for k, w, fix in zip(knobs, base, fixed)]
    wider = {i: min(c for c in a if c > w) for i, (a, w) in enumerate(zip(allowed, base)) if any(c > w for c in a)}
    narrower = {i: max(c for c in a if c < w) for i, (a, w) in enumerate(zip(allowed, base)) if any(c < w for c in a)}
    base_macs = best.user_attrs.get(attrs.MACS) or macs_of(ratios_of(base))
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
    latency budget follows the dense reference). ``confirm(ratios)``, when given, measures a model again and returns
    ``{"latency_ms": .., "latency_ratio": ..}`` (the ratio under a relative budget); each new incumbent is measured
    again with it before neighbours are built on it."""

    def __init__(self, space: PruningSpace, target: int | None, timeout_s: float | None, seed: int,
                 macs_of: MacsFn, budgets: Budgets, log: Callable[[str], None],
                 confirm: ConfirmFn | None = None) -> None:
        self.space, self.target, self.timeout_s, self.log = space, target, timeout_s, log
        self.macs_of, self.budgets, self.confirm = macs_of, budgets, confirm
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
        if self.confirm is not None and self.budgets.latency_ms is not None:
            self._confirm_incumbent(study)
        found = neighbour(study, self.space, self.rng, self.macs_of, self.budgets)
        if found is None:
            return
        ratios, of = found
        if not self.enqueued:
            self.log("refining at the budget's edge: neighbours of the most accurate feasible model join the "
                     "sampler's trials")
        self.enqueued += 1
        # a neighbour changes widths only: it keeps the incumbent's precision per unit (--quantize int8)
        precision = {k: v for t in study.get_trials(deepcopy=False) if t.number == of
                     for k, v in t.params.items() if k.startswith(attrs.PRECISION_PARAM)}
        study.enqueue_trial({**ratios, **precision}, user_attrs={attrs.NEIGHBOUR_OF: of})

    def _log_again(self, trial: optuna.trial.FrozenTrial, confirmed: dict[str, Any]) -> None:
        """One line on an incumbent measured again: a user reading the log sees why the refinement moved on to
        another model, and where the board time went."""
        b = self.budgets.now()
        if b.latency_ms is None:
            return
        judged = confirmed_latency(trial, b, confirmed)
        over = "" if judged <= b.latency_ms else "; over it, so the refinement turns to the next most accurate model"
        self.log(f"trial {trial.number} measured again as the incumbent: {judged:.3f} ms judged against the "
                 f"{b.latency_ms:.3f} ms budget{over}")

    def _confirm_incumbent(self, study: optuna.Study) -> None:
        """Measure the incumbent again until one that was (or ``CONFIRM_TRIES`` were) holds."""
        assert self.confirm is not None
        for _ in range(CONFIRM_TRIES):
            found = incumbent(study, self.budgets)
            confirmed = dict(study.user_attrs.get(CONFIRMED_ATTR) or {})
            if found is None or str(found[0].number) in confirmed:
                return
            try:
                again = self.confirm(found[0].params)
            except HwpruneError as exc:  # a refinement step is not worth a search
                self.log(f"measuring trial {found[0].number} again failed ({exc}); refining without it")
                return
            confirmed[str(found[0].number)] = again
            study.set_user_attr(CONFIRMED_ATTR, confirmed)
            self._log_again(found[0], confirmed)
