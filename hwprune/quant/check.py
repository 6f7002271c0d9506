"""Does the quantized file still compute the model? Its outputs against the FP32 file's on held-out inputs.

The error is relative: ``||q - f|| / ||f||`` over all held-out samples of each output (the worst output counts), so
it means the same for logits and for features. Classifier-shaped outputs (batch x classes) also report the top-1
agreement. Beyond the tolerance the candidate fails with a :class:`QuantizationError` that says by how much.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hwprune.backends.ort import open_session
from hwprune.profiles import DeviceProfile, load_profile
from hwprune.quant.base import QuantizationError
from hwprune.quant.calibration import Feed

# Relative output error allowed by default. Measured here: per-channel static INT8 of the demo CNNs and of a small
# ResNet/MobileNetV2 stays at 0.02-0.10; a broken quantization (clipped ranges, a wrongly quantized op) is at 0.5+.
DEFAULT_TOLERANCE = 0.25


@dataclass(frozen=True)
class OutputCheck:
    """How far the quantized outputs moved: worst relative error, its output, max abs error, top-1 agreement."""

    samples: int
    relative_error: float
    worst_output: str
    max_abs_error: float
    top1_agreement: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run_all(path: Path, feeds: list[Feed], profile: DeviceProfile) -> tuple[list[str], list[np.ndarray]]:
    try:
        sess = open_session(path, profile)
        names = [o.name for o in sess.get_outputs()]
        runs = [sess.run(None, f) for f in feeds]
    except Exception as exc:  # noqa: BLE001 - a file ORT cannot load or run fails the candidate, with the reason
        raise QuantizationError(f"ONNX Runtime cannot run {path.name}: {str(exc).strip().splitlines()[0]}") from None
    return names, [np.concatenate([r[i] for r in runs]) for i in range(len(names))]


def compare_outputs(fp32: str | Path, quantized: str | Path, feeds: list[Feed],
                    profile: DeviceProfile | str = "host-cpu") -> OutputCheck:
    """Run both files on ``feeds`` and measure how far the quantized outputs are from the FP32 ones."""
    if not feeds:
        raise QuantizationError("no held-out inputs to check the quantized outputs on")
    prof = load_profile(profile)
    names, ref = _run_all(Path(fp32), feeds, prof)
    _, got = _run_all(Path(quantized), feeds, prof)
    worst, worst_name, max_abs, agree = -1.0, names[0], 0.0, None
    for name, f, q in zip(names, ref, got):
        f64, q64 = f.astype(np.float64), q.astype(np.float64)
        rel = float(np.linalg.norm(q64 - f64) / max(np.linalg.norm(f64), 1e-12))
        if not np.isfinite(rel):
            rel = float("inf")
        if rel > worst:
            worst, worst_name = rel, name
        max_abs = max(max_abs, float(np.nan_to_num(np.abs(q64 - f64), nan=np.inf).max(initial=0.0)))
        if agree is None and f.ndim == 2 and f.shape[1] > 1:
            agree = float(np.mean(f.argmax(1) == q.argmax(1)))
    samples = sum(int(next(iter(f.values())).shape[0]) for f in feeds)
    return OutputCheck(samples, worst, worst_name, max_abs, agree)


def check_outputs(fp32: str | Path, quantized: str | Path, feeds: list[Feed], tolerance: float = DEFAULT_TOLERANCE,
                  profile: DeviceProfile | str = "host-cpu") -> OutputCheck:
    """:func:`compare_outputs`, failing beyond ``tolerance``.

    Raises:
        QuantizationError: the relative error of an output exceeds ``tolerance`` (or the file does not run).
    """
    result = compare_outputs(fp32, quantized, feeds, profile)
    if not result.relative_error <= tolerance:
        agree = f", top-1 agreement {result.top1_agreement:.2f}" if result.top1_agreement is not None else ""
        raise QuantizationError(
            f"INT8 outputs moved too far: output {result.worst_output!r} has relative error "
            f"{result.relative_error:.3f} > tolerance {tolerance} on {result.samples} held-out samples{agree}")
    return result
