"""Calibration inputs for static quantization: the subject's data, or inputs recorded from its evaluator, as ONNX
Runtime feeds of the exported graph's batch size.

Example inputs are never used: they are often zeros (the demo's are), and ranges calibrated on zeros clip every real
activation. With nothing else to calibrate on, quantization is refused with one :class:`QuantizationError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hwprune.export import graph_inputs
from hwprune.quant.base import CalibrationRecord, QuantizationError

CALIBRATION_SAMPLES = 128  # samples ORT's MinMax calibration runs on: enough for stable ranges, ~1 s on small CNNs
HELDOUT_SAMPLES = 64  # samples kept apart to check the quantized outputs against FP32 ones
Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class CalibrationSet:
    """Feeds to calibrate on, feeds held out to check outputs on, and where they came from."""

    calibrate: list[Feed]
    heldout: list[Feed]
    source: str

    def record(self, method: str) -> CalibrationRecord:
        samples = sum(_samples(f) for f in self.calibrate)
        return CalibrationRecord(method=method, source=self.source, batches=len(self.calibrate), samples=samples)


class FeedReader:
    """ONNX Runtime's ``CalibrationDataReader`` protocol (``get_next`` until None, ``rewind``) over a list of feeds."""

    def __init__(self, feeds: Sequence[Feed]) -> None:
        self.feeds = list(feeds)
        self._next = 0

    def get_next(self) -> Feed | None:
        if self._next >= len(self.feeds):
            return None
        self._next += 1
        return self.feeds[self._next - 1]

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return len(self.feeds)


def _samples(feed: Feed) -> int:
    first = next(iter(feed.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def _input_tensors(batch: Any, names: list[str]) -> list[torch.Tensor]:
    """The input tensors of one batch, in graph-input order: a tensor, a tuple of positional tensors, a dict by name,
    or an (inputs, targets) pair (the subject's calibration_data convention)."""
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        if all(n in batch for n in names):
            return [batch[n] for n in names]
        return list(batch.values())[: len(names)]
    if isinstance(batch, (tuple, list)) and batch:
        if len(names) == 1 or not isinstance(batch[0], torch.Tensor):
            return _input_tensors(batch[0], names)
        return list(batch[: len(names)])
    raise QuantizationError(f"calibration batch of type {type(batch).__name__} holds no input tensors")


def to_feeds(onnx_path: str | Path, batches: Iterable[Any], max_samples: int) -> list[Feed]:
    """Cut ``batches`` into feeds of the graph's batch size (the exported graph's batch dimension is static), at most
    ``max_samples`` samples; a batch's remainder smaller than the graph's batch is dropped.

    Raises:
        QuantizationError: a batch whose inputs do not match the graph's inputs in number or shape.
    """
    spec = graph_inputs(onnx_path)
    names = [n for n, _, _ in spec]
    feeds: list[Feed] = []
    taken = 0
    for batch in batches:
        tensors = _input_tensors(batch, names)
        if len(tensors) != len(spec):
            raise QuantizationError(f"calibration batch has {len(tensors)} inputs, the model {len(spec)} ({names})")
        arrays = [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in tensors]
        for (name, shape, _), a in zip(spec, arrays):
            if tuple(a.shape[1:]) != tuple(shape[1:]):
                raise QuantizationError(f"calibration input {name!r} has shape {tuple(a.shape)}, the model expects "
                                        f"{tuple(shape)} (batch first)")
        size = spec[0][1][0] if spec[0][1] else 1
        for start in range(0, int(arrays[0].shape[0]) - size + 1, size):
            if taken >= max_samples:
                return feeds
            feeds.append({name: np.ascontiguousarray(a[start:start + size].astype(dtype))
                          for (name, _, dtype), a in zip(spec, arrays)})
            taken += size
        if taken >= max_samples:
            break
    return feeds


def calibration_set(onnx_path: str | Path, subject: Any, *, recorded: list[Any] | None = None,
                    samples: int = CALIBRATION_SAMPLES, heldout: int = HELDOUT_SAMPLES,
                    record: bool = True) -> CalibrationSet:
    """Calibration and held-out feeds for the exported ``onnx_path`` of ``subject``.

    Sources, first that has inputs: the subject's ``calibration_data``; its ``data``; ``recorded`` (the inputs the
    accuracy stage recorded from the evaluator, :func:`hwprune.recovery.capture_inputs`); with ``record``, inputs
    recorded here by running the subject's evaluator once. The first ``samples`` samples calibrate, the next
    ``heldout`` are held out (fewer when the source is short: at least one feed each).

    Raises:
        QuantizationError: when no source has inputs.
    """
    source, batches = _source(subject, recorded, record)
    feeds = to_feeds(onnx_path, batches, samples + heldout)
    if not feeds:
        raise QuantizationError(
            "nothing to calibrate INT8 quantization on: give the subject calibration_data or data (inputs like the "
            "real ones), or an evaluator whose inputs can be recorded; example inputs are not used (often zeros)")
    per_feed = _samples(feeds[0])
    n_cal = min(max(1, samples // per_feed), max(1, len(feeds) - 1)) if len(feeds) > 1 else 1
    rest = feeds[n_cal:] or feeds[:1]  # a single feed both calibrates and checks: better than no check at all
    return CalibrationSet(feeds[:n_cal], rest, source)


def _source(subject: Any, recorded: list[Any] | None, record: bool) -> tuple[str, list[Any]]:
    cal = getattr(subject, "calibration_data", None)
    if cal is not None:
        batches = list(cal)
        if batches:
            return "calibration_data", batches
    data = getattr(subject, "data", None)
    if data is not None:
        from hwprune.subjects.data import as_user_data

        return "data", list(as_user_data(data, subject.example_inputs, "data").inputs)
    if recorded:
        return "recorded", list(recorded)
    if record and getattr(subject, "evaluate", None) is not None:
        from hwprune.recovery import capture_inputs

        _, captured = capture_inputs(subject.model, subject.evaluate)
        if captured:
            return "recorded", captured
    return "none", []
