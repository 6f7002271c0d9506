"""The dense model's latency as the reference of relative budgets, measured in sets spread over the whole search.

On a shared host a slow spell lasting a few seconds moved a single dense measurement by up to 1.5x, and with it every
budget of the search (bench/README.md). Sets taken at the start and again every few trials, and their middle value,
do not follow one spell.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hwprune.backends.base import Measurement

START_SETS = 3  # sets measured before the first trial
EVERY = 8  # trials completed in this run between two further sets


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
