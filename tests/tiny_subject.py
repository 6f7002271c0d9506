"""Tiny model factories used by the search tests (importable as ``tiny_subject:factory`` from tests/)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from hwprune import Subject
from hwprune.export import atomic_torch_save
from hwprune.subjects.shapes import make_shapes
from hwprune.train import accuracy, finetune


class TinyNet(nn.Module):
    """Residual + depthwise + concat in a few thousand parameters: enough structure to exercise the search."""

    def __init__(self) -> None:
        super().__init__()
        # wide enough that pruning half the channels measurably cuts latency (ORT's per-op overhead is ~µs)
        self.stem = nn.Sequential(nn.Conv2d(3, 48, 3, 1, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(48, 48, 3, 1, 1, groups=48, bias=False), nn.BatchNorm2d(48), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(48, 48, 1, bias=False), nn.BatchNorm2d(48))
        self.branch_a = nn.Sequential(nn.Conv2d(48, 48, 3, 2, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU())
        self.branch_b = nn.Sequential(nn.Conv2d(48, 48, 3, 2, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 10))

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.pw(self.dw(x)))
        return self.head(torch.cat([self.branch_a(x), self.branch_b(x)], dim=1))


_DATA: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    if "val" not in _DATA:
        _DATA["val"] = make_shapes(256, seed=7)
    return _DATA["val"]


def tiny_cnn():
    """Minimal contract: (model, example_inputs, evaluate)."""
    torch.manual_seed(0)
    model = TinyNet().eval()
    x, y = _data()

    def evaluate(m: nn.Module) -> float:
        return accuracy(m, [(x, y)])

    return model, torch.zeros(1, 3, 32, 32), evaluate


def tiny_cnn_trained() -> Subject:
    """Richer contract: a Subject with calibration and training data (a few steps of real training)."""
    torch.manual_seed(0)
    model = TinyNet()
    xt, yt = make_shapes(512, seed=3)
    batches = [(xt[i:i + 64], yt[i:i + 64]) for i in range(0, 512, 64)]
    # trained once per test session (conftest gives each session its own HWPRUNE_CACHE); the CLI tests call this
    # factory in a fresh process each time, and training it took 5-8 s of each on a 2-core host
    cache = os.environ.get("HWPRUNE_CACHE")
    path = Path(cache) / "tests" / f"tiny-cnn-trained-{torch.__version__}.pt" if cache else None
    if path is not None and path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        finetune(model, batches, 30, lr=0.05)
        if path is not None:
            atomic_torch_save(model.state_dict(), path)
    x, y = _data()
    return Subject(model=model.eval(), example_inputs=(torch.zeros(1, 3, 32, 32),),
                   evaluate=lambda m: accuracy(m, [(x, y)]), calibration_data=batches, train_data=batches,
                   name="tiny-cnn-trained")


def not_a_subject():
    return 42


def broken_factory():
    raise RuntimeError("dataset missing")


def tiny_cnn_slow():
    """tiny_cnn whose evaluation sleeps $TINY_SLOW_EVAL seconds (for interrupt tests)."""
    import time

    model, inputs, evaluate = tiny_cnn()
    delay = float(os.environ.get("TINY_SLOW_EVAL", "0"))

    def slow(m):
        time.sleep(delay)
        return evaluate(m)

    return model, inputs, slow


def tiny_cnn_checkpoint() -> Subject:
    """tiny_cnn_trained, with its weights replaced by the checkpoint at $TINY_CHECKPOINT when set (a nightly job's
    factory loading whatever model was trained that day)."""
    subject = tiny_cnn_trained()
    path = os.environ.get("TINY_CHECKPOINT")
    if path:
        subject.model.load_state_dict(torch.load(path, weights_only=True))
    subject.name = "tiny-cnn-checkpoint"
    return subject


class Residual(nn.Module):
    """``relu(x + f(x))``: a block hwprune may remove whole."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                               nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.f(x))


def tiny_resnet():
    """Minimal contract, with two removable residual blocks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                          Residual(32), Residual(32), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    x, y = _data()
    return model, torch.zeros(1, 3, 32, 32), lambda m: accuracy(m, [(x, y)])
