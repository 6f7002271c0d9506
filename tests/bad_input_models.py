"""Factories that return the wrong things, for the bad-input sweep (importable as ``bad_input_models:NAME``)."""

from __future__ import annotations

import torch
from torch import nn


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 2))


def model_is_a_string():
    return "resnet", torch.zeros(1, 3, 8, 8), lambda m: 0.5


def inputs_are_a_list_of_ints():
    return _model(), [1, 2, 3], lambda m: 0.5


def evaluate_is_a_number():
    return _model(), torch.zeros(1, 3, 8, 8), 0.5


def five_things():
    return _model(), torch.zeros(1, 3, 8, 8), lambda m: 0.5, None, None


def dict_with_unknown_field():
    return {"model": _model(), "example_inputs": torch.zeros(1, 3, 8, 8), "evaluate": lambda m: 0.5, "colour": 1}


def evaluate_raises():
    def evaluate(m: nn.Module) -> float:
        raise KeyError("labels")
    return _model(), torch.zeros(1, 3, 8, 8), evaluate


def evaluate_returns_text():
    return _model(), torch.zeros(1, 3, 8, 8), lambda m: "good"


def wrong_input_shape():
    return _model(), torch.zeros(1, 5, 8, 8), lambda m: 0.5


def takes_arguments(depth):  # noqa: ANN001 - a factory must take none
    return _model(), torch.zeros(1, 3, 8, 8), lambda m: 0.5


def small():
    """A model that works, for the cases whose fault lies elsewhere (data, flags)."""
    return _model(), torch.zeros(1, 3, 8, 8), lambda m: 0.5


NOT_CALLABLE = 3
