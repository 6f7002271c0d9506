"""Example inputs and forward calls shared by the pruning modules (a leaf: ``space`` and ``depth`` both import it).

Example inputs are a tensor, a tuple of tensors or a dict of keyword tensors (Hugging Face models take ``input_ids=``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Union

import torch
import torch.nn as nn
import torch_pruning as tp

from hwprune.errors import HwpruneError

ExampleInputs = Union[torch.Tensor, Sequence[torch.Tensor], Mapping[str, torch.Tensor]]  # noqa: UP007 (runtime alias)


def as_inputs(example_inputs: ExampleInputs) -> tuple[torch.Tensor, ...] | dict[str, torch.Tensor]:
    """Normalise example inputs to a tuple of positional arguments, or a dict of keyword arguments."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Mapping):
        return dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise HwpruneError(
        f"example inputs must be a tensor, a tuple of tensors or a dict of tensors, not {type(example_inputs).__name__}"
    )


def run_forward(model: nn.Module, inputs: tuple[torch.Tensor, ...] | dict[str, torch.Tensor]) -> Any:
    """Call ``model`` with normalised inputs."""
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors in a model output (tensor, tuple, list, dict, Hugging Face ``ModelOutput``)."""
    return [t for t in tp.utils.flatten_as_list(out) if isinstance(t, torch.Tensor)]


@contextlib.contextmanager
def keep_training_flags(model: nn.Module) -> Iterator[None]:
    """Every module's ``training`` flag restored on exit (DependencyGraph, and the eval-mode checks, change them)."""
    flags = [m.training for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in zip(model.modules(), flags, strict=True):
            m.training = flag
