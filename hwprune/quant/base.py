"""The records quantization hands between stages, and its error."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hwprune.errors import HwpruneError

FP32 = "fp32"
INT8 = "int8"
PRECISIONS = (FP32, INT8)


class QuantizationError(HwpruneError):
    """A model cannot be quantized as asked (nothing to calibrate on, an op ORT cannot quantize, outputs that moved
    beyond the tolerance); the message says why, so a search can fail that candidate and go on."""


@dataclass(frozen=True)
class CalibrationRecord:
    """What the activation ranges of a static quantization were computed from.

    ``source`` is ``calibration_data`` (the subject's), ``recorded`` (inputs recorded from the subject's evaluator)
    or ``given`` (batches passed directly); ``method`` is ORT's calibration method (``MinMax``, ...) or ``none`` for
    dynamic quantization, which calibrates nothing ahead of time.
    """

    method: str
    source: str
    batches: int
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class QuantizedModel:
    """A quantized ONNX file and how it was made.

    ``precision`` maps every weighted node (Conv, Gemm, MatMul, ...) of the FP32 graph to ``fp32`` or ``int8``;
    ``mode`` is ``static`` (QDQ, activations and per-channel weights in INT8) or ``dynamic`` (INT8 weights,
    activations quantized at run time); ``weight_bytes`` counts INT8 initializers at one byte each.
    """

    path: Path
    source: Path
    mode: str
    precision: dict[str, str]
    calibration: CalibrationRecord | None
    weight_bytes: int
    fp32_weight_bytes: int
    file_bytes: int
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default_factory=tuple)
    reduce_range: bool = False  # weights quantized to 7 bits (x86 without VNNI: see hwprune.quant.device)

    @property
    def int8_nodes(self) -> list[str]:
        return [n for n, p in self.precision.items() if p == INT8]

    @property
    def label(self) -> str:
        """``fp32``, ``int8`` or ``mixed 5/12`` (INT8 nodes / weighted nodes): the precision column of a table."""
        return precision_label(self.precision)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "source": str(self.source), "mode": self.mode, "label": self.label,
            "precision": dict(self.precision),
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "weight_bytes": self.weight_bytes, "fp32_weight_bytes": self.fp32_weight_bytes,
            "file_bytes": self.file_bytes, "seconds": self.seconds, "notes": list(self.notes),
            "reduce_range": self.reduce_range,
        }


def precision_label(precision: dict[str, str]) -> str:
    """``fp32`` when no node is INT8, ``int8`` when all are, else ``mixed <int8>/<all>``."""
    n = sum(p == INT8 for p in precision.values())
    if n == 0:
        return FP32
    if n == len(precision):
        return INT8
    return f"mixed {n}/{len(precision)}"
