"""Model factories that cannot be handled, for error-message tests."""

from __future__ import annotations

import torch
from torch import nn


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        y = self.conv(x)
        n = int(y.sum().item() > 0) + 1  # a Python value taken from the data: no graph can express this
        return self.fc(y.mean((2, 3))) * n


def data_dependent():
    return DataDependent().eval(), torch.randn(1, 3, 8, 8), lambda m: 0.5
