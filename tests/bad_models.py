"""Model factories that cannot be handled, for error-message tests."""

from __future__ import annotations

import torch
from torch import nn


class Spectral(nn.Module):
    """Uses an FFT, which the ONNX exporter cannot express."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3)
        self.fc = nn.Linear(32, 2)

    def forward(self, x):
        y = torch.fft.fft2(self.conv(x)).abs()
        return self.fc(y.mean((2, 3)))


def unexportable():
    return Spectral().eval(), torch.randn(1, 3, 8, 8), lambda m: 0.5
