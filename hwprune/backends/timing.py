"""The "warm up, time, check the spread, re-measure" loop every local backend shares.

Why this shape: on a shared host, wall-clock medians drift under load from other processes while the minimum and the
thread's CPU time stay put (see DESIGN.md, "Timing"). So each timed run records both clocks, a run whose robust
spread (1.4826 MAD / median, which one preempted run does not inflate) exceeds the profile's ``max_cv`` is
repeated (keeping the steadiest attempt), and one that stays noisy is kept but flagged, never silently trusted.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from hwprune.backends.base import Latency


def _samples(fn: Callable[[], Any], repeats: int, number: int,
             cpu_clock: Callable[[], int] | None) -> tuple[list[float], list[float] | None]:
    wall: list[float] = []
    cpu: list[float] | None = [] if cpu_clock is not None else None
    perf = time.perf_counter_ns
    # A collection pause inside a timed run is noise that has nothing to do with the model.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            c0 = cpu_clock() if cpu_clock is not None else 0
            t0 = perf()
            for _ in range(number):
                fn()
            t1 = perf()
            if cpu is not None and cpu_clock is not None:
                cpu.append((cpu_clock() - c0) / 1e6 / number)
            wall.append((t1 - t0) / 1e6 / number)
    finally:
        if gc_was_enabled:
            gc.enable()
    return wall, cpu


def _calls_per_sample(fn: Callable[[], Any], min_repeat_ms: float, first_ms: float) -> int:
    """How many calls one sample needs to last ``min_repeat_ms`` (like TVM's time_evaluator), from a first guess."""
    if min_repeat_ms <= 0:
        return 1
    number = 1
    if first_ms <= 0:
        t0 = time.perf_counter_ns()
        fn()
        first_ms = (time.perf_counter_ns() - t0) / 1e6
    per_call = max(first_ms, 1e-6)
    while number * per_call < min_repeat_ms and number < 1_000_000:
        number = min(1_000_000, max(number * 2, int(min_repeat_ms / per_call * 1.1) + 1))
        t0 = time.perf_counter_ns()
        for _ in range(number):
            fn()
        per_call = max((time.perf_counter_ns() - t0) / 1e6 / number, 1e-6)
    return number


def timed_runs(
    fn: Callable[[], Any],
    warmup: int,
    repeats: int,
    max_cv: float,
    remeasure: int,
    *,
    min_repeat_ms: float = 0.0,
    cpu_clock: Callable[[], int] | None = time.thread_time_ns,
    max_starvation: float | None = 1.25,
) -> Latency:
    """Time a zero-argument callable: ``warmup`` untimed calls, then ``repeats`` timed samples.

    Each sample is one call, or enough calls to last ``min_repeat_ms`` (reported per call). ``cpu_clock`` (ns,
    default the calling thread's CPU time; ``None`` to skip) gives ``cpu_median_ms``. When the samples' coefficient
    of variation is above ``max_cv``, the whole set is taken again, up to ``remeasure`` more times; the set with the
    lowest CV is returned with ``remeasured`` = extra attempts made and ``noisy`` = whether it is still above.

    With a per-thread ``cpu_clock``, a set whose wall median exceeds its CPU median by more than ``max_starvation``
    is treated the same way: the thread was waiting for a core (another process held it) for the whole set, which
    a spread check cannot see because every sample is equally slow. Pass ``None`` when the work runs on other threads.
    """

    def badness(lat: Latency) -> float:
        starved = 0.0
        if max_starvation and lat.cpu_median_ms:
            starved = lat.median_ms / lat.cpu_median_ms - max_starvation
        return max(lat.robust_cv - max_cv, starved)

    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    first_ms = 0.0
    for i in range(max(warmup, 0)):
        t0 = time.perf_counter_ns()
        fn()
        if i == max(warmup, 0) - 1:
            first_ms = (time.perf_counter_ns() - t0) / 1e6
    number = _calls_per_sample(fn, min_repeat_ms, first_ms) if min_repeat_ms > 0 else 1

    best: Latency | None = None
    attempts = 0
    while True:
        wall, cpu = _samples(fn, repeats, number, cpu_clock)
        lat = Latency.from_samples(wall, warmup=warmup, cpu_samples_ms=cpu)
        if best is None or badness(lat) < badness(best):
            best = lat
        if badness(best) <= 0 or attempts >= remeasure:
            break
        attempts += 1
    best.remeasured = attempts
    best.noisy = badness(best) > 0
    return best


def timed_pair(fn: Callable[[], Any], ref: Callable[[], Any], warmup: int, repeats: int, max_cv: float, *,
               min_repeat_ms: float = 0.0,
               cpu_clock: Callable[[], int] | None = time.thread_time_ns) -> tuple[Latency, Latency, list[float]]:
    """Time ``fn`` and ``ref`` in alternating samples: the latency of each, and the ``repeats`` ratios
    fn-sample / ref-sample of neighbouring samples.

    Why: a shared host's speed changes over tenths of a second, longer than one 2 ms sample but shorter than one
    whole measurement. Measured on a 2-core Zen 3 host, the ratio of a 0.4x model to the dense model varied with a
    CV of 20-25% between whole measurements taken one after the other, and of 6% as the median of 30 neighbouring
    sample ratios. The order within a pair alternates so that neither side always follows the other. No set is
    retaken: drift cancels in the ratios, and each latency is flagged ``noisy`` when its spread exceeds ``max_cv``.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    numbers = []
    for f in (fn, ref):
        first_ms = 0.0
        for _ in range(max(warmup, 0)):
            t0 = time.perf_counter_ns()
            f()
            first_ms = (time.perf_counter_ns() - t0) / 1e6
        numbers.append(_calls_per_sample(f, min_repeat_ms, first_ms) if min_repeat_ms > 0 else 1)
    samples: dict[int, tuple[list[float], list[float] | None]] = {0: ([], [] if cpu_clock else None),
                                                                   1: ([], [] if cpu_clock else None)}
    for i in range(repeats):
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            wall, cpu = _samples((fn, ref)[side], 1, numbers[side], cpu_clock)
            samples[side][0].extend(wall)
            if cpu is not None:
                samples[side][1].extend(cpu)  # type: ignore[union-attr]
    lats = []
    for side in (0, 1):
        lat = Latency.from_samples(samples[side][0], warmup=warmup, cpu_samples_ms=samples[side][1])
        lat.noisy = lat.robust_cv > max_cv
        lats.append(lat)
    ratios = [a / b for a, b in zip(samples[0][0], samples[1][0], strict=True)]
    return lats[0], lats[1], ratios


__all__ = ["timed_pair", "timed_runs"]
