"""Small entry points of the public API that are not a whole search."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from hwprune.backends import backend_capabilities, create_backend
from hwprune.backends.base import Measurement
from hwprune.export import export_onnx
from hwprune.errors import HwpruneError
from hwprune.profiles import DeviceProfile, load_profile
from hwprune.pruning import PrunedModel, PruningSpace
from hwprune.pruning import prune as _prune
from hwprune.pruning.importance import ImportanceFn, resolve_importance


def measure(model: str | os.PathLike[str] | torch.nn.Module, device: str | DeviceProfile = "host-cpu", *,
            example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None, backend: str | None = None,
            **overrides: Any) -> Measurement:
    """Latency and memory of a model on ``device``.

    Args:
        model: an ONNX file, or an ``nn.Module`` (exported for you, as a search exports its candidates).
        device: a profile name, a .toml path or a DeviceProfile.
        example_inputs: with an ``nn.Module``: a batch of 1 (a tensor or a tuple of tensors).
        backend: replaces the profile's backend for this call.
        **overrides: replace profile settings, e.g. ``rpc__tracker="127.0.0.1:9190"``, ``rpc__key="local"``.

    Returns:
        The Measurement (``.latency.median_ms``, ``.memory.total_mb``, ...).

    Raises:
        HwpruneError: bad input, an export failure, or a device that cannot be measured (one line each).
    """
    profile = load_profile(device).with_overrides(backend=backend, **overrides)
    if isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise HwpruneError("measuring an nn.Module needs example_inputs= (a batch of 1)")
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        with tempfile.TemporaryDirectory(prefix="hwprune-measure-") as tmp:
            exporter = backend_capabilities(profile.backend).exporter
            path = export_onnx(model, inputs, Path(tmp) / "model.onnx", exporter=exporter)
            return measure(path, profile)
    b = create_backend(profile)
    try:
        return b.measure(Path(model))
    finally:
        b.close()


def prune(model: torch.nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor],
          ratios: float | dict[str, float], *, channel_multiple: int = 8, max_ratio: float = 0.9,
          ignored_layers: Sequence[Any] | None = None, importance: str | ImportanceFn = "l2",
          calibration_data: Iterable[Any] | None = None, loss_fn: Any = None) -> PrunedModel:
    """A physically pruned copy of ``model``: one ratio for every coupled channel group, or a ratio per knob name.

    ``importance`` ranks the channels: ``"l2"`` (default), ``"l1"``, ``"bn-scale"``, a callable on a Torch-Pruning
    group, or ``"taylor"``/``"auto"``, which use ``calibration_data`` (batches of inputs or (inputs, targets), with
    ``loss_fn``; see :func:`hwprune.pruning.importance.resolve_importance`).
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    importance = resolve_importance(importance, model, calibration_data, loss_fn)
    space = PruningSpace.build(model, tuple(example_inputs), channel_multiple=channel_multiple, max_ratio=max_ratio,
                               ignored_layers=list(ignored_layers or []), importance=importance)
    per_knob = space.uniform(ratios) if isinstance(ratios, (int, float)) else ratios
    return _prune(model, tuple(example_inputs), per_knob, space)
