"""A Subject is what hwprune prunes: a model, example inputs, and a way to score it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

Batch = Any  # a tensor of inputs, or (inputs, targets)


@dataclass
class Subject:
    """A trained model plus what hwprune needs to judge a pruned copy of it.

    ``evaluate(model) -> float`` is higher-is-better (e.g. top-1 accuracy on held-out data).
    ``calibration_data`` (batches of inputs, or (inputs, targets)) re-estimates BatchNorm statistics after pruning.
    ``train_data`` (an iterable of (inputs, targets), re-iterable) and ``loss_fn`` enable fine-tuning; ``teacher``
    (defaults to the dense model) enables distillation during the final fine-tune. ``data`` is the short way to give
    both: a tensor of inputs, an (inputs, targets) pair or a list of batches (:mod:`hwprune.subjects.data`).
    """

    model: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    evaluate: Callable[[nn.Module], float]
    name: str = "model"
    calibration_data: Iterable[Batch] | None = None
    train_data: Iterable[Batch] | None = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    teacher: nn.Module | None = None
    metric: str = "accuracy"
    ignored_layers: list[str] = field(default_factory=list)  # qualified names never to prune
    description: str = ""
    data: Any = None  # inputs, or (inputs, targets): fills calibration_data / train_data (hwprune.subjects.data)

    def __post_init__(self) -> None:
        if isinstance(self.example_inputs, torch.Tensor):
            self.example_inputs = (self.example_inputs,)
        else:
            self.example_inputs = tuple(self.example_inputs)
