"""A small BatchNorm CNN that really learns (a generated 4-class task, trained in seconds), in the minimal form a
user would give it: the subject of the accuracy-guard and recovery tests (tests/study/test_accuracy.py)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from hwprune.export import atomic_torch_save
from hwprune.train import accuracy, finetune

SIZE = 16


def quadrant_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy 3x16x16 images with a bright 5x5 square in one quadrant; the class is the quadrant."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, SIZE, SIZE, generator=g) * 0.5
    y = torch.randint(0, 4, (n,), generator=g)
    offsets = torch.randint(0, SIZE // 2 - 5, (n, 2), generator=g)
    for i in range(n):
        r = (SIZE // 2) * int(y[i] // 2) + int(offsets[i, 0])
        c = (SIZE // 2) * int(y[i] % 2) + int(offsets[i, 1])
        x[i, :, r:r + 5, c:c + 5] += torch.rand(3, 1, 1, generator=g) + 1.0
    return x, y


def net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 48, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(48), nn.ReLU(),
        nn.Conv2d(48, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 4))


def trained() -> nn.Module:
    """The trained model, cached per test session (HWPRUNE_CACHE) like tiny_subject.tiny_cnn_trained."""
    torch.manual_seed(0)
    model = net()
    cache = os.environ.get("HWPRUNE_CACHE")
    path = Path(cache) / "tests" / f"quadrant-cnn-{torch.__version__}.pt" if cache else None
    if path is not None and path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    x, y = quadrant_images(1024, seed=11)
    finetune(model, [(x[i:i + 64], y[i:i + 64]) for i in range(0, 1024, 64)], 120, lr=0.05)
    if path is not None:
        atomic_torch_save(model.state_dict(), path)
    return model.eval()


VAL = quadrant_images(512, seed=12)  # what the user's evaluate scores
HELDOUT = quadrant_images(512, seed=13)  # what nothing in a search sees


def evaluate(m: nn.Module) -> float:
    return accuracy(m, [(VAL[0][i:i + 128], VAL[1][i:i + 128]) for i in range(0, 512, 128)])


def minimal():
    """The README's minimal form: (model, example_inputs, evaluate)."""
    return trained(), torch.zeros(1, 3, SIZE, SIZE), evaluate


def with_data():
    """The minimal form with data as a fourth element: (inputs, targets) tensors."""
    x, y = quadrant_images(512, seed=14)
    return trained(), torch.zeros(1, 3, SIZE, SIZE), evaluate, (x, y)


def named_dict():
    """A dict of Subject fields that names itself."""
    return {"model": trained(), "example_inputs": torch.zeros(1, 3, SIZE, SIZE), "evaluate": evaluate,
            "name": "quadrants"}
