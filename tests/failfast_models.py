"""Model factories that cannot be pruned or evaluated (importable as ``failfast_models:NAME`` from tests/)."""

from __future__ import annotations

import torch
from torch import nn


class Branchy(nn.Module):
    """Branches on a tensor value: the example input skips ``conv2``, which pruning's trace therefore never sees."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        if y.mean() > 0.3:  # BRANCH
            y = torch.relu(self.conv2(y))
        return self.fc(y.mean((2, 3)))


def branchy():
    torch.manual_seed(0)
    return Branchy().eval(), torch.randn(1, 3, 16, 16), lambda m: 0.9


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.fc = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def later_nan():
    """Scores the dense model, then NaN for every pruned one."""
    calls = [0]

    def evaluate(m: nn.Module) -> float:
        calls[0] += 1
        return 0.9 if calls[0] == 1 else float("nan")

    torch.manual_seed(0)
    return Plain().eval(), torch.randn(1, 3, 16, 16), evaluate
