"""The first stage of a search: the dense model exported, measured (the dense reference) and scored, and the
budgets it resolves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwprune.backends.base import Measurement
from hwprune.config import SearchConfig
from hwprune.pruning import architecture_signature, count_macs_params, read_widths
from hwprune.study import attrs
from hwprune.study.accuracy import DenseScore, accuracy_floor, score_dense
from hwprune.study.budgets import Budgets
from hwprune.study.context import RunContext
from hwprune.study.reference import DenseReference
from hwprune.subjects.base import Subject


@dataclass(frozen=True)
class DenseModel:
    """The unpruned model as the search saw it."""

    path: Path  # its ONNX file in the run folder
    accuracy: float
    macs: int
    params: int
    signature: str  # architecture signature: a candidate that rounds back to it is the dense model
    widths: dict[str, tuple[int, int]]  # module name -> (original, kept) output channels

    def trial_attrs(self, m: Measurement, relative: bool) -> dict[str, Any]:
        """The user attributes a trial gets when its architecture is the dense model's, measured as ``m``."""
        return {attrs.WIDTHS: {k: list(v) for k, v in self.widths.items()}, attrs.MACS: self.macs,
                attrs.PARAMS: self.params, attrs.SIGNATURE: self.signature, attrs.MEASUREMENT: m.to_dict(),
                attrs.ACCURACY_PROXY: self.accuracy, **({attrs.LATENCY_RATIO: 1.0} if relative else {})}


def measure_dense(ctx: RunContext, subject: Subject) -> tuple[DenseModel, DenseReference, DenseScore]:
    """Export the dense model, take its first reference sets and score it (planning recovery when the subject has
    no data).

    Returns:
        The dense model, its latency reference (further sets follow during the trials) and its score.
    """
    from hwprune.export import export_onnx

    path = export_onnx(subject.model, subject.example_inputs, ctx.run_dir / "dense" / "model.onnx",
                       exporter=ctx.exporter)
    reference = DenseReference(path, ctx.measure)
    reference.start()
    scored = score_dense(subject, ctx.config, ctx.log)
    macs, params = count_macs_params(subject.model, subject.example_inputs)
    widths = read_widths(subject.model)
    dense = DenseModel(path=path, accuracy=scored.accuracy, macs=macs, params=params,
                       signature=architecture_signature(widths), widths={k: (v, v) for k, v in widths.items()})
    return dense, reference, scored


def make_budgets(config: SearchConfig, reference: DenseReference, dense_accuracy: float,
                 subject: Subject) -> Budgets:
    """The budgets of ``config`` resolved against the dense model; a relative latency budget follows the dense
    reference while trials run (:meth:`Budgets.now`)."""
    c = config
    dense_m = reference.measurement
    relative = bool(c.latency_budget_ms and c.latency_budget_ms.relative)
    return Budgets(
        latency_ms=c.latency_budget_ms.resolve(dense_m.latency.median_ms) if c.latency_budget_ms else None,
        memory_mb=c.memory_budget_mb.resolve(dense_m.memory.total_mb) if c.memory_budget_mb else None,
        latency_factor=c.latency_budget_ms.value if relative else None,
        accuracy_floor=accuracy_floor(c.max_accuracy_drop, dense_accuracy),
        # a final fine-tune recovers what the per-trial proxy lacks: then the guard judges the finalists after it
        guard_trials=not (c.final_finetune_steps and subject.train_data is not None),
        follow=(lambda: reference.measurement.latency.median_ms) if relative else None,
    )
