"""Accuracy of an ONNX file through ONNX Runtime, with the subject's own evaluator.

Evaluators take a module and call it on batches (``evaluate(model) -> float``; :mod:`hwprune.train` calls
``model.eval()`` and ``model(inputs)``). :class:`OrtModule` is such a module whose forward runs an ORT session, so an
INT8 file, which no PyTorch module computes, is scored by the same code and data as the FP32 model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hwprune.backends.ort import open_session
from hwprune.export import graph_inputs
from hwprune.profiles import DeviceProfile, load_profile
from hwprune.quant.base import QuantizationError

DEFAULT_PROFILE = "host-cpu"  # evaluation runs here, whatever the target: only the outputs matter


class OrtModule(nn.Module):
    """An ``nn.Module`` whose forward runs ``path`` in ONNX Runtime: tensors in, tensors out (a tuple when the graph
    has several outputs). Batches are cut to the graph's static batch size (the last one padded, then trimmed)."""

    def __init__(self, path: str | Path, profile: DeviceProfile | str = DEFAULT_PROFILE) -> None:
        super().__init__()
        self.path = Path(path)
        try:
            self.session = open_session(self.path, load_profile(profile))
        except Exception as exc:  # noqa: BLE001 - a file ORT cannot load is a failed candidate, with the reason
            raise QuantizationError(f"ONNX Runtime cannot load {self.path.name}: {exc}") from None
        self.inputs = graph_inputs(self.path)
        self.batch = self.inputs[0][1][0] if self.inputs and self.inputs[0][1] else 1

    def _arrays(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[np.ndarray]:
        names = [n for n, _, _ in self.inputs]
        values = [kwargs[n] for n in names if n in kwargs] if kwargs else list(args)
        if len(values) != len(names):
            raise QuantizationError(f"{self.path.name} takes {len(names)} inputs ({names}), got {len(values)}")
        return [(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)).astype(dtype)
                for v, (_, _, dtype) in zip(values, self.inputs)]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        arrays = self._arrays(args, kwargs)
        n = int(arrays[0].shape[0])
        chunks: list[list[np.ndarray]] = []
        for start in range(0, n, self.batch):
            part = [a[start:start + self.batch] for a in arrays]
            short = self.batch - int(part[0].shape[0])
            if short:  # pad with the chunk's first sample; the padded rows are trimmed from the outputs
                part = [np.concatenate([p, np.repeat(p[:1], short, axis=0)]) for p in part]
            feed = {name: np.ascontiguousarray(p) for (name, _, _), p in zip(self.inputs, part)}
            outs = self.session.run(None, feed)
            chunks.append([o[: self.batch - short] for o in outs])
        outputs = [torch.from_numpy(np.concatenate([c[i] for c in chunks])) for i in range(len(chunks[0]))]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def evaluate_onnx(path: str | Path, evaluate: Callable[[nn.Module], float],
                  profile: DeviceProfile | str = DEFAULT_PROFILE) -> float:
    """``evaluate`` (the subject's evaluator) run on the ONNX file at ``path`` through ONNX Runtime.

    Raises:
        QuantizationError: the file does not load in ONNX Runtime.
    """
    with torch.no_grad():
        return float(evaluate(OrtModule(path, profile)))
