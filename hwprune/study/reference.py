"""The dense model's latency as the reference of relative budgets: measured in sets spread over the whole search,
and beside a model in interleaved rounds.

On a shared host a slow spell lasting a few seconds moved a single dense measurement by up to 1.5x, and with it every
budget of the search (bench/README.md). Sets taken at the start and again every few trials, and their middle value,
do not follow one spell; a model's ratio to the dense model measured right beside it follows it even less.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hwprune.backends.base import Measurement

if TYPE_CHECKING:
    from hwprune.study.budgets import Budgets

START_SETS = 3  # sets measured before the first trial
EVERY = 8  # trials completed in this run between two further sets
# A model's ratio to the dense model is judged on interleaved rounds: at least ROUNDS, and up to MAX_ROUNDS while the
# median ratio is within BAND of the budget. One round's ratio moved by +-15% on the shared build host
# (bench/README.md), so three rounds cannot settle a model 2% inside the budget.
ROUNDS = 3
MAX_ROUNDS = 9
BAND = 0.05
# Within the band, the rounds end before MAX_ROUNDS once the median is clearly on one side of the budget: from
# DECIDE_FROM rounds, by Student's t at DECIDE_CONFIDENCE (two-sided) times its standard error. A median's standard
# error from three rounds' spread is too unsure to stop on (one of the three deviations is zero); from five, t is 2.8.
DECIDE_FROM = 5
DECIDE_CONFIDENCE = 0.95
# a floor under the standard error, relative to the median: rounds that happen to agree closely must not decide a
# model a hair from the budget (a quiet host's pair rounds vary by ~2%, bench/README.md)
MIN_RELATIVE_SE = 0.01
# A listed model's own median is reported from the round whose dense model ran fastest beside it. When even that
# dense model ran SLOW_SPELL x its reference or slower, the host was in a slow spell for the whole of the model's
# rounds (a 2-core host under load: 1.7x), its own median is slowed alike, and up to RETIME_ROUNDS more rounds are
# measured to time it outside the spell, each after the dense model alone shows the spell over. The judged latency
# (the ratio) does not need it: a spell slows both models.
SLOW_SPELL = 1.25
RETIME_ROUNDS = 2
# a listed model whose own median and judged latency (median ratio x dense reference) differ by more than this,
# either way, gets a note saying why: a reader comparing the two columns must know (the host's pace at the round
# that timed it, that round's ratio against the rounds' median, or both; a README demo: 20% apart, neither factor
# over 15% alone)
DRIFT_NOTE = 0.15


@dataclass
class DenseReference:
    """Measurements of the dense model; :attr:`measurement` is the set with the middle median latency."""

    path: Path
    measure: Callable[[Path], Measurement]
    sets: list[Measurement] = field(default_factory=list)
    every: int = EVERY

    def start(self, n: int = START_SETS) -> Measurement:
        for _ in range(n):
            self.sets.append(self.measure(self.path))
        return self.measurement

    def after_trial(self, completed_in_run: int) -> bool:
        """Measure another set every ``every`` trials; True when one was taken."""
        if completed_in_run <= 0 or completed_in_run % self.every:
            return False
        self.sets.append(self.measure(self.path))
        return True

    @property
    def measurement(self) -> Measurement:
        ordered = sorted(self.sets, key=lambda m: m.latency.median_ms)
        return ordered[(len(ordered) - 1) // 2]

    @property
    def medians_ms(self) -> list[float]:
        return [m.latency.median_ms for m in self.sets]


@dataclass
class Rounds:
    """A model measured in interleaved rounds with the dense model: each round's model measurement and latency ratio
    (model / dense of that round)."""

    measurements: list[Measurement]
    ratios: list[float]
    # the dense model's median (ms) beside each of ``measurements``, where the round measured it (not the pooled
    # earlier ratios, which come without measurements)
    dense_ms: list[float] = field(default_factory=list)

    @property
    def middle(self) -> Measurement:
        """The round whose model latency is the middle one (the upper middle of an even count): a real measurement,
        with its spread, to report."""
        ordered = sorted(self.measurements, key=lambda m: m.latency.median_ms)
        return ordered[len(ordered) // 2]

    @property
    def steadiest(self) -> Measurement:
        """The model's measurement from the round whose dense model ran fastest beside it: the round a slow spell
        of the host disturbed least, whose own median is the one to report as the model's (:attr:`middle` without
        the dense medians)."""
        if len(self.dense_ms) != len(self.measurements):
            return self.middle
        return self.measurements[min(range(len(self.dense_ms)), key=self.dense_ms.__getitem__)]

    def slowdown(self, reference_ms: float) -> float | None:
        """How much slower than ``reference_ms`` (the dense reference) the dense model ran in the steadiest round;
        None without the dense medians."""
        if not self.dense_ms or len(self.dense_ms) != len(self.measurements) or reference_ms <= 0:
            return None
        return min(self.dense_ms) / reference_ms

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def upper(self) -> float:
        return upper_ratio(self.ratios)

    def judged_ms(self, budgets: Budgets) -> float:
        """The latency ``budgets`` judge from these rounds: the middle round's, or the median ratio's share of the
        dense reference under a relative budget (:meth:`Budgets.judged_ms`)."""
        return budgets.judged_ms(self.middle.latency.median_ms, self.ratio)


MeasurePair = Callable[[Path, Path], tuple[Measurement, Measurement, list[float]]]


def interleaved_rounds(measure: Callable[[Path], Measurement], path: Path, dense_path: Path,
                       factor: float | None = None, measure_pair: MeasurePair | None = None,
                       settled: Callable[[Rounds], bool] | None = None, earlier: list[float] | None = None) -> Rounds:
    """Measure the model at ``path`` and the dense model in alternating order, ``ROUNDS`` times, and up to
    ``MAX_ROUNDS`` while the median ratio is within ``BAND`` of ``factor`` (a relative budget) and the rounds have not
    put it clearly on one side (:func:`decided`). With ``settled``, fewer than ``ROUNDS`` once it says the rounds so
    far settle the model (``--screen on``: a candidate predicted and then measured well inside the budget).
    ``earlier``: ratios of the same architecture measured earlier in the run (the incumbent's re-measure), which
    count as rounds; at least one fresh round is measured all the same.

    With ``measure_pair`` (a backend's ``measure_beside``), one round is one measurement of both models in
    alternating samples, and its ratio the median of the neighbouring samples' ratios: on a shared host that
    cancels spells shorter than a whole measurement, which alternating whole measurements do not (a CV of 6%
    against 20-25% per round on a 2-core Zen 3 host; :func:`hwprune.backends.timing.timed_pair`).
    """
    rounds = Rounds([], list(earlier or [])[:MAX_ROUNDS - 1])
    while not rounds.measurements or len(rounds.ratios) < ROUNDS or (
            factor and len(rounds.ratios) < MAX_ROUNDS and abs(rounds.ratio / factor - 1.0) < BAND
            and not decided(rounds.ratios, factor)):
        # only a fresh round can settle the model (the middle round it judges must be one of this file's)
        if rounds.measurements and len(rounds.ratios) < ROUNDS and settled is not None and settled(rounds):
            break
        one_round(rounds, measure, path, dense_path, measure_pair)
    return rounds


def one_round(rounds: Rounds, measure: Callable[[Path], Measurement], path: Path, dense_path: Path,
              measure_pair: MeasurePair | None = None) -> None:
    """Measure one more round of the model at ``path`` beside the dense model and add it to ``rounds``."""
    if measure_pair is not None:
        m, dense, pair_ratios = measure_pair(path, dense_path)
        ratio = statistics.median(pair_ratios)
    else:
        if len(rounds.ratios) % 2:  # alternate which goes first, so a drifting host favours neither
            dense = measure(dense_path)
            m = measure(path)
        else:
            m = measure(path)
            dense = measure(dense_path)
        ratio = m.latency.median_ms / dense.latency.median_ms
    rounds.measurements.append(m)
    rounds.dense_ms.append(dense.latency.median_ms)
    rounds.ratios.append(ratio)


def retime_in_slow_spell(rounds: Rounds, reference_ms: float, measure: Callable[[Path], Measurement], path: Path,
                         dense_path: Path, measure_pair: MeasurePair | None = None) -> float | None:
    """Up to ``RETIME_ROUNDS`` more tries while every round of ``rounds`` ran in a slow spell (the dense model
    beside the model ``SLOW_SPELL`` x ``reference_ms`` or slower), so that the model's own median is timed outside
    it. Each try first measures the dense model alone, and measures a round only when that shows the spell over: a
    round in the spell would be slowed alike, at twice the board time of the probe. The rounds are fresh ones and
    count toward the ratio like any other.

    Returns:
        The remaining slowdown (:meth:`Rounds.slowdown`) when the spell outlasted the tries, else None.
    """
    tries = 0
    while True:
        slow = rounds.slowdown(reference_ms)
        if slow is None or slow < SLOW_SPELL:
            return None
        if tries == RETIME_ROUNDS:
            return slow
        tries += 1
        if measure(dense_path).latency.median_ms < SLOW_SPELL * reference_ms:
            one_round(rounds, measure, path, dense_path, measure_pair)


def own_median_note(rounds: Rounds, reference_ms: float | None, outlasted: bool) -> str | None:
    """A note for a listed model whose own median (:attr:`Rounds.steadiest`) and judged latency (the rounds' median
    ratio x ``reference_ms``, the dense reference) differ by more than ``DRIFT_NOTE``, either way, or whose own
    median was timed in a slow spell that outlasted the re-timing rounds (``outlasted``); None otherwise.

    The two differ by the product of two factors, both named in the note: how fast the dense model beside the
    round ran against the reference (the host's pace then) and how that round's ratio compares with the rounds'
    median (the round's own noise).
    """
    slowdown = rounds.slowdown(reference_ms) if reference_ms is not None else None
    if slowdown is None or not rounds.ratios:
        return None
    own = rounds.steadiest.latency.median_ms
    judged = rounds.ratio * reference_ms
    if outlasted:
        return (f"its own median ({own:.3f} ms) was timed while the host ran slow (the dense model beside it at "
                f"{slowdown:.2f}x its reference in the steadiest of {len(rounds.measurements)} rounds); the judged "
                f"latency ({judged:.3f} ms), its ratio to the dense model, is not affected")
    apart = own / judged - 1.0
    if abs(apart) <= DRIFT_NOTE:
        return None
    round_vs_median = (1.0 + apart) / slowdown  # own / judged is the product of the two factors
    return (f"its own median, {own:.3f} ms, is {abs(apart):.0%} {'above' if apart > 0 else 'below'} its judged "
            f"latency, {judged:.3f} ms (its median ratio to the dense model x the dense reference): in the round "
            f"it was timed in, the dense model beside it ran at {slowdown:.2f}x the reference (the host's pace "
            f"then) and the model at {round_vs_median:.2f}x its median ratio (that round's noise); the budget "
            "was judged on the ratio")


def standard_error(ratios: list[float]) -> float:
    """The standard error of the rounds' median ratio: 1.253 x the robust spread (1.4826 MAD) over the square root
    of the rounds."""
    median = statistics.median(ratios)
    mad = statistics.median(abs(r - median) for r in ratios)
    return 1.253 * 1.4826 * mad / len(ratios) ** 0.5


def upper_ratio(ratios: list[float]) -> float:
    """The median of the rounds' ratios plus its standard error (:func:`standard_error`): a front model must meet a
    relative budget by this much, so that one measured a hair inside the budget, which a re-measurement puts over it
    about half the time, is not listed as meeting it."""
    return statistics.median(ratios) + standard_error(ratios)


def decided(ratios: list[float], factor: float) -> bool:
    """Whether the rounds so far put the median ratio clearly on one side of ``factor``: at least ``DECIDE_FROM``
    rounds, and the median at least Student's t (``DECIDE_CONFIDENCE``, rounds - 1 degrees of freedom) standard
    errors from it (the standard error at least ``MIN_RELATIVE_SE`` of the median). More rounds would not change
    whether the model meets the budget, only spend board time.

    Args:
        ratios: the rounds' latency ratios to the dense model.
        factor: the relative budget (e.g. 0.6 for 0.6x).

    Returns:
        True when further rounds are not needed to judge the model against ``factor``.
    """
    from scipy.stats import t as student_t

    n = len(ratios)
    if n < DECIDE_FROM:
        return False
    median = statistics.median(ratios)
    se = max(standard_error(ratios), MIN_RELATIVE_SE * median)
    return abs(median - factor) > float(student_t.ppf(0.5 + DECIDE_CONFIDENCE / 2, n - 1)) * se
