"""Data a user gives for recovery: tensors, (inputs, targets) pairs, lists of batches, or a .pt/.npz file of them.

Labelled data re-calibrates BatchNorm and fine-tunes with the subject's loss (cross-entropy by default); inputs
alone re-calibrate BatchNorm and are distilled on (``hwprune.recovery``). Errors say what is wrong with the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hwprune.errors import SubjectError

BATCH = 64  # samples per batch when the data comes as whole tensors
INPUT_KEYS = ("inputs", "x", "images", "input_ids")
TARGET_KEYS = ("targets", "y", "labels")


@dataclass(frozen=True)
class UserData:
    """The user's data as batches: ``inputs`` always, ``targets`` (one per input batch) when labelled."""

    inputs: list[torch.Tensor]
    targets: list[torch.Tensor] | None

    @property
    def labelled(self) -> bool:
        return self.targets is not None

    @property
    def samples(self) -> int:
        return sum(int(x.shape[0]) for x in self.inputs)

    def batches(self) -> list[Any]:
        """(inputs, targets) pairs when labelled, else input tensors."""
        return list(zip(self.inputs, self.targets)) if self.targets is not None else list(self.inputs)


def load_data_file(path: str | Path) -> Any:
    """The data in a ``.pt`` (``torch.load(weights_only=True)``) or ``.npz`` file, as tensors.

    Raises:
        SubjectError: missing file, unknown suffix, or a file that does not load.
    """
    path = Path(path)
    if not path.is_file():
        raise SubjectError(f"data file {path} does not exist")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: torch.from_numpy(z[k]) for k in z.files}
        if path.suffix in (".pt", ".pth"):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt or pickled file may raise anything
        # torch's message can be a paragraph (weights_only advice): its first line says what went wrong
        first = (str(exc).strip().splitlines() or [""])[0]
        raise SubjectError(f"data file {path}: cannot load it ({type(exc).__name__}: {first})") from None
    raise SubjectError(f"data file {path}: expected a .pt or .npz file of tensors")


def as_user_data(data: Any, example_inputs: tuple[torch.Tensor, ...], what: str = "data") -> UserData:
    """Normalise ``data`` into batches checked against ``example_inputs``.

    Accepted: a tensor of inputs; ``(inputs, targets)``; a dict with ``inputs``/``x`` and optionally
    ``targets``/``y`` (what a .npz holds); or a list of batches, each a tensor or an (inputs, targets) pair.

    Raises:
        SubjectError: naming what is wrong (empty, not tensors, shapes that do not match the example inputs,
            inputs and targets of different lengths).
    """
    if len(example_inputs) != 1:
        raise SubjectError(f"{what}: models with {len(example_inputs)} inputs take data through a Subject's "
                           "calibration_data/train_data (batches of input tuples), not as tensors")
    example = example_inputs[0]
    if isinstance(data, dict):
        x = next((data[k] for k in INPUT_KEYS if k in data), None)
        if x is None:
            raise SubjectError(f"{what}: a dict of data needs an 'inputs' (or 'x') entry; found {sorted(data)}")
        y = next((data[k] for k in TARGET_KEYS if k in data), None)
        return _split(_tensor(x, what, "inputs"), None if y is None else _tensor(y, what, "targets"), example, what)
    if isinstance(data, torch.Tensor) or isinstance(data, np.ndarray):
        return _split(_tensor(data, what, "inputs"), None, example, what)
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in data):
        return _split(_tensor(data[0], what, "inputs"), _tensor(data[1], what, "targets"), example, what)
    if isinstance(data, (list, tuple)):
        if not data:
            raise SubjectError(f"{what}: no batches")
        inputs, targets = [], []
        for i, batch in enumerate(data):
            if isinstance(batch, (tuple, list)) and len(batch) == 2:
                x, y = _tensor(batch[0], what, f"batch {i} inputs"), _tensor(batch[1], what, f"batch {i} targets")
                _check_pair(x, y, example, f"{what}: batch {i}")
                targets.append(y)
            else:
                x = _tensor(batch, what, f"batch {i}")
                _check_inputs(x, example, f"{what}: batch {i}")
            inputs.append(x)
        if targets and len(targets) != len(inputs):
            raise SubjectError(f"{what}: some batches have targets and some do not")
        return UserData(inputs, targets or None)
    raise SubjectError(f"{what}: {type(data).__name__} is not a tensor, an (inputs, targets) pair, a dict of them "
                       "or a list of batches")


def _tensor(value: Any, what: str, name: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise SubjectError(f"{what}: {name} is {type(value).__name__}, not a tensor")
    return value


def _check_inputs(x: torch.Tensor, example: torch.Tensor, what: str) -> None:
    if x.dim() != example.dim() or tuple(x.shape[1:]) != tuple(example.shape[1:]):
        raise SubjectError(f"{what}: inputs of shape {tuple(x.shape)} do not match the example inputs "
                           f"{tuple(example.shape)} (a batch of the same shape is expected)")
    if x.shape[0] == 0:
        raise SubjectError(f"{what}: no samples")
    if x.is_floating_point() != example.is_floating_point():
        raise SubjectError(f"{what}: inputs are {x.dtype}, the example inputs {example.dtype}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise SubjectError(f"{what}: inputs hold NaN or infinite values")


def _check_pair(x: torch.Tensor, y: torch.Tensor, example: torch.Tensor, what: str) -> None:
    _check_inputs(x, example, what)
    if y.dim() == 0 or y.shape[0] != x.shape[0]:
        raise SubjectError(f"{what}: {x.shape[0]} inputs but targets of shape {tuple(y.shape)}")


def _split(x: torch.Tensor, y: torch.Tensor | None, example: torch.Tensor, what: str) -> UserData:
    if y is None:
        _check_inputs(x, example, what)
    else:
        _check_pair(x, y, example, what)
    xs = list(torch.split(x, BATCH))
    return UserData(xs, list(torch.split(y, BATCH)) if y is not None else None)
