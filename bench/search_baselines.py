"""bench_search's baselines: the final models, uniform and Torch-Pruning picks by bisection, and
uniform-16 at hwprune's measured latency (see the comment above :func:`uniform_architecture_ratios`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hwprune.pruning import PruningSpace
from hwprune.subjects.base import Subject
from hwprune.study.objective import uniform_architectures

from bench.common import JUDGED, MATCHED, NEAR
from bench.search_measure import LatencyProbe, RatioCurve


# results


@dataclass
class Final:
    """One method's final model at one budget, and what choosing it cost."""

    subject: str
    budget: float | None  # None for the dense model
    method: str
    setting: str  # what was chosen: a ratio, or hwprune's trial number
    module: nn.Module | None
    macs: int = 0
    params: int = 0
    trials: int | None = None  # hwprune trials
    measurements: int = 0  # ORT measurements spent choosing (each one session + warm-up + timed runs)
    select_seconds: float = 0.0
    select_latency_ratio: float | None = None  # what the method itself saw when it chose
    budget_met_at_selection: bool | None = None
    accuracy_calibrated: float | None = None  # after BN re-calibration, before fine-tuning
    accuracy: float | None = None  # after the common fine-tune
    finetune_seconds: float = 0.0
    onnx: Path | None = None
    rounds: list[dict[str, float]] = field(default_factory=list)  # interleaved re-measurements
    latency: dict[str, float] = field(default_factory=dict)  # medians and ratios over the rounds
    extra: dict[str, Any] = field(default_factory=dict)  # hwprune: the dense latency and budget its search resolved
    note: str = ""
    correct: torch.Tensor | None = None  # per test image, after the common fine-tune

    @property
    def key(self) -> str:
        return f"{self.subject}|{self.budget}|{self.method}"


def run_uniform(subject: Subject, curve: RatioCurve, budget: float, grid: list[float], refine: int,
                method: str, confirm_tries: int = 0) -> Final:
    """(b) The least uniform pruning ratio that meets the budget, by measurement."""
    sel = curve.select(budget, grid, refine, confirm_tries)
    distinct = {id(p): p for p in sel.used}.values()
    choice = sel.choice
    if sel.met:
        note = ""
    elif sel.confirmed_ratio is not None:
        note = f"not confirmed within the budget after {confirm_tries} interleaved confirmations"
    else:
        note = "no ratio on the grid met the budget"
    return Final(subject.name, budget, method, f"ratio {choice.ratio:.3f}", copy.deepcopy(choice.module),
                 choice.macs, choice.params,
                 measurements=LatencyProbe.MEASUREMENTS * sum(p.measured for p in distinct) + sel.confirm_measurements,
                 select_seconds=round(sum(p.seconds for p in distinct) + sel.confirm_seconds, 2),
                 select_latency_ratio=sel.confirmed_ratio if sel.confirmed_ratio is not None else choice.latency_ratio,
                 budget_met_at_selection=sel.met, note=note)


def run_tp(subject: Subject, curve: RatioCurve, budget: float, grid: list[float], refine: int,
           confirm_tries: int = 0) -> Final:
    """(c) Torch-Pruning global magnitude pruning, its global ratio bisected to the latency budget."""
    return run_uniform(subject, curve, budget, grid, refine, "tp-global-mag", confirm_tries)


# ---------------------------------------------------------------------------------------------------------------------
# uniform-16 at hwprune's measured latency
#
# Each baseline above picks its model by its own noisy bisection to the budget, so at 0.4x on the demo (about 0.08 ms)
# the two picks being compared can run at 0.32x and 0.38x side by side. The matched comparison asks the question of
# equal latency directly: the uniform-16 architectures nearest hwprune's pick get the common fine-tune and the
# side-by-side re-measurement too, and hwprune is compared with the most accurate of those that ran no slower than
# its pick. Taking the best of several on the test data favours the baseline.


def uniform_architecture_ratios(space: PruningSpace, step: float = 0.0025, limit: float = 0.95) -> list[float]:
    """One uniform ratio per distinct uniform architecture of ``space`` (the middle of the ratio interval that builds
    it), in ratio order, so in falling MACs."""
    return [round((a + b) / 2, 4) for a, b in uniform_architectures(space, 0.0, limit, step)]


def near_uniform(subject: Subject, budget: float, curve: RatioCurve, ratios: list[float], target: float,
                 slower: int, faster: int) -> list[Final]:
    """The uniform architectures nearest the latency ratio ``target`` on ``curve`` (one ratio per architecture in
    ``ratios``, in ratio order): ``slower`` that the curve's probe measured over it, and ``faster`` measured at or
    below it, as finals of method ``NEAR``. Found by bisection over the architectures, whose latency falls as the
    ratio grows; the probe is noisy (one uniform model it put at 0.50x ran at 0.55x side by side), so the side-by-side
    re-measurement decides which are no slower, and more are taken on the faster side.

    By latency, not MACs: hwprune's picks run faster than uniform models of their MACs (one 2.32 M-MAC pick ran at
    0.58x, the uniform models of 2.2-2.6 M at 0.62-0.69x), so a bracket by MACs held nothing no slower."""
    lo, hi = 0, len(ratios)  # the first architecture the probe measured at or below target
    while lo < hi:
        mid = (lo + hi) // 2
        if curve.at(ratios[mid]).latency_ratio <= target:
            hi = mid
        else:
            lo = mid + 1
    out = []
    for i in range(max(lo - slower, 0), min(lo + faster, len(ratios))):
        point = curve.at(ratios[i])
        out.append(Final(subject.name, budget, NEAR, f"ratio {point.ratio:.3f}", copy.deepcopy(point.module),
                         point.macs, point.params, select_latency_ratio=point.latency_ratio))
    return out


def matched_uniform(near: list[Final], hw: Final) -> Final | None:
    """The most accurate of ``near`` whose side-by-side latency ratio is at or below that of hwprune's pick ``hw``, as
    a final of method ``MATCHED``; None without a measured pick or near architectures."""
    if not hw.latency or not near:
        return None
    limit = hw.latency[JUDGED]
    fits = [f for f in near if f.latency and f.accuracy is not None and f.latency[JUDGED] <= limit]
    if not fits:
        return Final(hw.subject, hw.budget, MATCHED, "none", None,
                     note=f"none of the {len(near)} uniform-16 architectures near hwprune's pick ran at or below its "
                          f"{limit:.3f}x")
    best = max(fits, key=lambda f: f.accuracy or 0.0)
    matched = copy.copy(best)
    matched.method = MATCHED
    matched.setting = f"{best.setting}, best of {len(fits)} of {len(near)} near"
    if max(near, key=lambda f: f.macs) in fits:
        matched.note = "every near uniform-16 architecture ran at or below hwprune's latency: a less pruned one may too"
    return matched
