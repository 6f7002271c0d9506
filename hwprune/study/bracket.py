"""Uniform pruning aimed at the latency budget: the warm start, the bisection to the budget, and the depth probes.

The search always holds the best uniform model that meets the budget: the baseline a user would try first, which
the sampler's models must beat.
"""

from __future__ import annotations

import logging

import optuna
from optuna.trial import TrialState

from hwprune.errors import HwpruneError
from hwprune.pruning import PruningSpace
from hwprune.study import attrs
from hwprune.study.budgets import CONFIRMED_ATTR, NEAR_MISS, Budgets, ConfirmFn, confirmed_latency

log = logging.getLogger("hwprune")

WARM_START = (1 / 3, 2 / 3, 1.0)  # fractions of the space's max ratio


def warm_start(study: optuna.Study, space: PruningSpace, fractions: tuple[float, ...] = WARM_START) -> None:
    """Enqueue uniform-ratio candidates (the baseline a user would try first) when the study is new.

    They span the space up to its smallest model, which tells the search (and the user, when nothing fits) the
    fastest latency reachable; :func:`bracket_budget` then aims uniform candidates at the budget itself.
    """
    if study.get_trials(deepcopy=False):
        return
    top = _warm_start_top(space)
    for f in fractions:
        r = round(f * top, 4)
        study.enqueue_trial(space.uniform(r), user_attrs={attrs.UNIFORM_RATIO: r}, skip_if_exists=True)


def _warm_start_top(space: PruningSpace) -> float:
    """The warm start's largest uniform ratio: all of the space's max ratio."""
    return round(max((k.max_ratio for k in space.knobs), default=0.0), 4)


BRACKET_STEPS = 6  # uniform trials spent at most on aiming at the latency budget
BRACKET_SCAN = 0.0005  # ratio step of the scan for the uniform architectures between two measured ones


def bracket_budget(study: optuna.Study, space: PruningSpace, dense_latency_ms: float, budgets: Budgets,
                   confirm: ConfirmFn | None = None) -> list[float]:
    """The next uniform ratio aimed at the latency budget, enqueued, by bisection over the uniform trials measured
    so far, so that the search always holds the best uniform model that meets the budget: the baseline it must beat.

    A safeguarded regula falsi between the least-pruned uniform trial that meets the budget and the most-pruned one
    below it that misses: latency falls off cliffs where a group's rounded width drops a whole channel multiple, so
    each step keeps to the middle half of the interval, and lands on a ratio whose rounded widths differ from both
    ends'. Returns the ratio enqueued, or nothing when no measured pair straddles the budget, no uniform architecture
    lies between the two ends (the best uniform model is found), a uniform trial is still queued, or
    ``BRACKET_STEPS`` were spent. The search stops at adjacent architectures, not at a ratio tolerance: on the demo
    two uniform architectures 0.04 apart in ratio differ by 20% in MACs, and the rounded baseline finds the one
    between. Once the bisection is done, :func:`probe_depth` tries its lower end with one block removed; when no
    uniform model meets the budget, not even the warm start's most pruned one, it tries that one so.
    Latencies are the ones ``budgets`` judges (:meth:`Budgets.judged_ms`), measured again where the study holds a
    second measurement (``CONFIRMED_ATTR``). A relative budget is judged as ``budgets`` hold it (pass
    :meth:`Budgets.now` while it follows the dense reference).

    With ``confirm`` (see :class:`~hwprune.study.refine.EdgeRefiner`), the lower end, when it missed the budget by
    at most ``NEAR_MISS``, is measured again first (once per trial), and so in turn is the end that replaces it if
    that measurement meets the budget: on a shared host the warm start's smallest model can land just over a budget
    it meets, and then bisection never starts; and a 0.37x uniform model once measured 0.41x at 0.4x, after which
    the bisection searched above it and never tried the less pruned models between it and the last miss. So is a
    lower end measured slower than a less pruned uniform trial (a 0.35x model once measured 0.51x). An upper
    end that a more pruned uniform trial's miss contradicts is measured again too: a 0.61x model once measured 0.45x
    at 0.6x, and the bisection spent its steps below it.
    """
    queued = list(study.user_attrs.get(attrs.BRACKETED) or [])
    budget_ms = budgets.latency_ms
    if budget_ms is None:
        return []
    exhausted = len(queued) >= BRACKET_STEPS
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING and attrs.UNIFORM_RATIO in t.user_attrs for t in trials):
        return []
    uniform = [t for t in trials if t.state == TrialState.COMPLETE and attrs.UNIFORM_RATIO in t.user_attrs and t.values]
    confirmed = dict(study.user_attrs.get(CONFIRMED_ATTR) or {})
    by_ratio = {float(t.user_attrs[attrs.UNIFORM_RATIO]): t for t in uniform}

    def ends() -> tuple[tuple[float, float] | None, tuple[float, float] | None, bool, bool]:
        """(most pruned miss below the least pruned meet, least pruned meet) as (ratio, latency), or None; whether a
        more pruned uniform trial than that meet missed the budget, and whether a less pruned one (or the dense model)
        than that miss ran faster than it (either way, one of the two measurements is off)."""
        measured = [(0.0, budgets.judged_ms(dense_latency_ms, 1.0))]
        measured += [(r, confirmed_latency(t, budgets, confirmed)) for r, t in by_ratio.items()]
        hi = min((p for p in measured if p[1] <= budget_ms), default=None)
        lo = max((p for p in measured if p[1] > budget_ms and (hi is None or p[0] < hi[0])), default=None)
        contradicted = hi is not None and any(p[1] > budget_ms and p[0] > hi[0] for p in measured)
        inverted = lo is not None and any(p[0] < lo[0] and p[1] < lo[1] for p in measured)
        return lo, hi, contradicted, inverted

    def suspect() -> optuna.trial.FrozenTrial | None:
        """The end to measure again: a lower end just over the budget or slower than a less pruned uniform trial,
        else an upper end a more pruned miss contradicts; each is measured again once at most."""
        ends_ = []
        if lo is not None and lo[0] in by_ratio and (lo[1] <= budget_ms * (1 + NEAR_MISS) or inverted):
            ends_.append(by_ratio[lo[0]])
        if contradicted and hi is not None and hi[0] in by_ratio:
            ends_.append(by_ratio[hi[0]])
        return next((t for t in ends_ if str(t.number) not in confirmed), None)

    lo, hi, contradicted, inverted = ends()
    while confirm is not None and not exhausted and (edge := suspect()) is not None:
        try:
            confirmed[str(edge.number)] = confirm(edge.params)
        except HwpruneError as exc:  # aiming at the budget is not worth a search
            log.warning("measuring uniform trial %d again failed (%s)", edge.number, exc)
            break
        study.set_user_attr(CONFIRMED_ATTR, confirmed)
        lo, hi, contradicted, inverted = ends()
    if hi is None:
        # every measured model missed, so ``lo`` is the most pruned one; once that is the warm start's smallest,
        # what is left to try there is trading blocks for width (seed 0 of the demo at 0.4x once spent all 30
        # trials without a model in budget)
        if lo is not None and lo[0] >= _warm_start_top(space) - 1e-9:
            probe_depth(study, space, lo[0])
        return []
    if lo is None:
        return []

    between = [] if exhausted else uniform_architectures_between(space, lo[0], hi[0])
    if not between:
        probe_depth(study, space, lo[0])
        return []
    span = hi[0] - lo[0]
    target = lo[0] + span * (lo[1] - budget_ms) / max(lo[1] - hi[1], 1e-12)
    target = min(max(target, lo[0] + 0.25 * span), hi[0] - 0.25 * span)
    # the architecture whose ratio interval holds the target, else the nearest one
    first, last = min(between, key=lambda iv: max(iv[0] - target, target - iv[1], 0.0))
    r = round(target, 4) if first <= round(target, 4) <= last else round((first + last) / 2, 4)
    study.set_user_attr(attrs.BRACKETED, queued + [r])
    study.enqueue_trial(space.uniform(r), user_attrs={attrs.UNIFORM_RATIO: r}, skip_if_exists=True)
    return [r]


DEPTH_PROBES = 4  # blocks probed one at a time once the bracket is done


def probe_depth(study: optuna.Study, space: PruningSpace, ratio: float) -> list[str]:
    """Once per study, enqueue the uniform model of ``ratio`` (the bracket's lower end: the least pruned uniform
    model that missed the budget; or the warm start's most pruned one when none met it) with one residual block
    removed, for up to ``DEPTH_PROBES`` blocks spread over the model; returns the blocks probed.

    Each trades a block for the widths one uniform step buys, right at the budget: near the per-operator floor that
    is the trade left (on the demo at 0.4x, two blocks out and uniform 0.5-0.6 beat uniform 0.7-0.75 at the same
    latency by 2-3 points after fine-tuning). The sampler alone meets few of them: a random block choice at random
    widths is rarely near the budget, and the edge refinement keeps the incumbent's blocks."""
    blocks = space.blocks
    if not blocks or study.user_attrs.get(attrs.DEPTH_PROBED) is not None:
        return []
    n = min(DEPTH_PROBES, len(blocks))
    picked = [blocks[round(i * (len(blocks) - 1) / (n - 1))] if n > 1 else blocks[-1] for i in range(n)]
    study.set_user_attr(attrs.DEPTH_PROBED, picked)
    base = space.uniform(ratio)
    for name in picked:
        study.enqueue_trial({**base, name: space.knob(name).max_ratio}, user_attrs={attrs.DEPTH_PROBE: name},
                            skip_if_exists=True)
    return picked


def uniform_architectures(space: PruningSpace, lo: float, hi: float,
                          step: float = BRACKET_SCAN) -> list[tuple[float, float]]:
    """The uniform architectures of ratios ``lo`` to ``hi`` (both included, scanned in ``step`` increments), as the
    ratio interval ``(first, last)`` of the scan that builds each, in ratio order (so in falling widths)."""
    found: list[tuple[float, float]] = []
    last: tuple[int, ...] | None = None
    for i in range(int(round((hi - lo) / step)) + 1):
        r = round(lo + i * step, 4)
        if r > hi:
            break
        w = space.kept_widths(space.uniform(r))
        if w == last:
            found[-1] = (found[-1][0], r)
        else:
            found.append((r, r))
            last = w
    return found


def uniform_architectures_between(space: PruningSpace, lo: float, hi: float) -> list[tuple[float, float]]:
    """The uniform architectures strictly between uniform ratios ``lo`` and ``hi``, as the ratio interval
    ``(first, last)`` that builds each (scanned in ``BRACKET_SCAN`` steps), in ratio order; their rounded widths
    differ from those of ``lo`` and ``hi``."""
    ends = {space.kept_widths(space.uniform(lo)), space.kept_widths(space.uniform(hi))}
    return [iv for iv in uniform_architectures(space, lo, hi)
            if space.kept_widths(space.uniform(iv[0])) not in ends]

