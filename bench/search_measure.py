"""bench_search's measuring: latency statistics, the latency probe, ratio-latency curves and the
one-ratio model builders (uniform, Torch-Pruning global magnitude).
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch_pruning as tp
from torch import nn

from hwprune.export import export_onnx
from hwprune.backends.base import Measurement
from hwprune.backends.ort import OrtBackend
from hwprune.pruning import PruningSpace, architecture_signature, count_macs_params, prune, read_widths
from hwprune.subjects.base import Subject
from hwprune.study.reference import interleaved_rounds

from bench.common import say
from bench.search_data import classifier_of


# measuring


def stat(m: Measurement, which: str) -> float:
    """The latency statistic used to decide a budget: ``median`` (wall clock), ``cpu`` (median thread CPU time) or
    ``min`` (fastest timed sample)."""
    if which == "cpu" and m.latency.cpu_median_ms is not None:
        return m.latency.cpu_median_ms
    if which == "min":
        return m.latency.min_ms
    return m.latency.median_ms


class LatencyProbe:
    """Measures a candidate between two measurements of the dense model (dense, candidate, dense), so drift in the
    host's load mostly cancels in the ratio."""

    MEASUREMENTS = 3

    def __init__(self, backend: OrtBackend, dense_onnx: Path, which: str) -> None:
        self.backend, self.dense_onnx, self.which = backend, dense_onnx, which

    def ratio(self, onnx_path: Path) -> float:
        """Candidate latency / mean of the two dense latencies around it; with statistic ``pair``, the median ratio of
        alternating samples of the two."""
        if self.which == "pair":
            return statistics.median(self.backend.measure_beside(onnx_path, self.dense_onnx)[2])
        before = stat(self.backend.measure(self.dense_onnx), self.which)
        cand = stat(self.backend.measure(onnx_path), self.which)
        after = stat(self.backend.measure(self.dense_onnx), self.which)
        return cand / ((before + after) / 2)


# ---------------------------------------------------------------------------------------------------------------------
# one-ratio methods: uniform and Torch-Pruning global magnitude


@dataclass
class CurvePoint:
    """One pruning ratio of a one-ratio method, built, exported and measured against the dense model."""

    ratio: float
    latency_ratio: float  # candidate / dense, by the probe's statistic
    macs: int
    params: int
    signature: str
    seconds: float  # prune + export + measure
    measured: bool  # False when an identical architecture was already measured
    module: nn.Module = field(repr=False)
    onnx: Path = field(repr=False)  # the exported file (the first ratio's, for an architecture already measured)


@dataclass
class Selection:
    """What :meth:`RatioCurve.select` chose, the points it consulted, whether the budget was met, and the latency
    ratio, extra measurements and seconds of the interleaved confirmation (None, 0 and 0 without one)."""

    choice: CurvePoint
    used: list[CurvePoint]
    met: bool
    confirmed_ratio: float | None = None
    confirm_measurements: int = 0
    confirm_seconds: float = 0.0


class RatioCurve:
    """Latency-to-dense of one method as a function of its single pruning ratio, measured on demand and cached
    (by ratio, and by achieved architecture, as hwprune does)."""

    def __init__(self, name: str, build: Callable[[float], nn.Module], subject: Subject, probe: LatencyProbe,
                 workdir: Path) -> None:
        self.name, self.build, self.subject, self.probe, self.workdir = name, build, subject, probe, workdir
        self.points: dict[float, CurvePoint] = {}
        self._by_signature: dict[str, tuple[float, Path]] = {}

    def at(self, ratio: float) -> CurvePoint:
        """The point for ``ratio`` (built and measured on first use)."""
        ratio = round(ratio, 4)
        if ratio in self.points:
            return self.points[ratio]
        t0 = time.perf_counter()
        module = self.build(ratio)
        macs, params = count_macs_params(module, self.subject.example_inputs)
        sig = architecture_signature(read_widths(module))
        if sig in self._by_signature:
            (lat, path), measured = self._by_signature[sig], False
        else:
            path = export_onnx(module, self.subject.example_inputs, self.workdir / f"{self.name}-{ratio:.4f}.onnx")
            lat, measured = self.probe.ratio(path), True
            self._by_signature[sig] = (lat, path)
        point = CurvePoint(ratio, lat, macs, params, sig, time.perf_counter() - t0, measured, module, path)
        self.points[ratio] = point
        say(f"  {self.name} ratio {ratio:.3f}: latency {lat:.3f}x dense, {macs / 1e6:.2f} M MACs"
            + ("" if measured else " (architecture already measured)"))
        return point

    def select(self, budget: float, grid: list[float], refine: int, confirm_tries: int = 0) -> Selection:
        """The least pruning whose measured latency meets ``budget`` (a fraction of dense): the first grid ratio that
        meets it, then ``refine`` bisection steps toward the grid ratio before it, then up to ``confirm_tries``
        interleaved confirmations (:meth:`confirm`). When no grid ratio meets the budget, the fastest grid point is
        returned, not met."""
        used: list[CurvePoint] = []
        lo, hi = 0.0, None
        for r in grid:
            p = self.at(r)
            used.append(p)
            if p.latency_ratio <= budget:
                hi = r
                break
            lo = r
        if hi is None:
            return Selection(min(used, key=lambda p: p.latency_ratio), used, False)
        for _ in range(refine):
            mid = (lo + hi) / 2
            p = self.at(mid)
            used.append(p)
            if p.latency_ratio <= budget:
                hi = mid
            else:
                lo = mid
        selection = Selection(self.at(hi), used, True)
        return self.confirm(selection, budget, confirm_tries) if confirm_tries else selection

    def confirm(self, selection: Selection, budget: float, tries: int, step: float = 0.01) -> Selection:
        """hwprune's rule for its own picks (hwprune.study.reference): the choice is measured in interleaved rounds
        with the dense model and must meet ``budget`` by its median ratio plus standard error; if it does not, the
        next more-pruned architecture (ratios in ``step`` increments) is tried, ``tries`` times at most."""
        choice = selection.choice
        for _ in range(tries):
            t0 = time.perf_counter()
            rounds = interleaved_rounds(self.probe.backend.measure, choice.onnx, self.probe.dense_onnx, budget,
                                        self.probe.backend.measure_beside)
            selection.confirm_seconds += time.perf_counter() - t0
            selection.confirm_measurements += 2 * len(rounds.ratios)
            selection.confirmed_ratio = rounds.ratio
            say(f"  {self.name} ratio {choice.ratio:.3f}: {rounds.ratio:.3f}x dense over {len(rounds.ratios)} "
                f"interleaved rounds, {rounds.upper:.3f}x with its standard error")
            if rounds.upper <= budget:
                selection.choice, selection.met = choice, True
                return selection
            nxt = self.next_architecture(choice, step)
            if nxt is None:
                break
            selection.used.append(nxt)
            choice = nxt
        selection.choice, selection.met = choice, False
        return selection

    def next_architecture(self, point: CurvePoint, step: float, limit: float = 0.95) -> CurvePoint | None:
        """The first point past ``point`` (in ``step`` ratio increments, up to ``limit``) with other widths."""
        r = point.ratio
        while r + step <= limit:
            r += step
            nxt = self.at(r)
            if nxt.signature != point.signature:
                return nxt
        return None


def uniform_space(subject: Subject, channel_multiple: int) -> PruningSpace:
    """The pruning space the uniform baselines prune in: every coupled channel group, up to 95%; widths only."""
    return PruningSpace.build(subject.model, subject.example_inputs, channel_multiple=channel_multiple,
                              max_ratio=0.95, ignored_layers=list(subject.ignored_layers), depth=False)


def uniform_builder(subject: Subject, channel_multiple: int,
                    space: PruningSpace | None = None) -> Callable[[float], nn.Module]:
    """ratio -> the model with every coupled channel group pruned by ``ratio`` (hwprune's pruner and importance),
    kept widths rounded to ``channel_multiple``."""
    space = space or uniform_space(subject, channel_multiple)

    def build(ratio: float) -> nn.Module:
        return prune(subject.model, subject.example_inputs, space.uniform(ratio), space).module

    return build


def tp_global_magnitude_builder(subject: Subject) -> Callable[[float], nn.Module]:
    """ratio -> Torch-Pruning's global magnitude pruning of a copy of the model (no channel rounding, as a user of
    Torch-Pruning would run it; no layer loses more than 90% of its channels; the classifier keeps its outputs)."""

    def build(ratio: float) -> nn.Module:
        model = copy.deepcopy(subject.model).eval()
        # fresh containers everywhere: Torch-Pruning's mutable defaults are shared between calls (DESIGN.md)
        pruner = tp.pruner.MagnitudePruner(
            model, subject.example_inputs[0], importance=tp.importance.GroupMagnitudeImportance(p=2),
            global_pruning=True, pruning_ratio=ratio, max_pruning_ratio=0.9,
            ignored_layers=[classifier_of(model)], round_to=None, in_channel_groups={}, out_channel_groups={},
            num_heads={}, channel_groups={}, customized_pruners={}, unwrapped_parameters={},
            root_module_types=[nn.modules.conv._ConvNd, nn.Linear])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner.step()
        return model.eval()

    return build
