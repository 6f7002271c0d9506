"""Built-in demo subjects: tiny classifiers trained on generated data and cached after the first run."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hwprune import train
from hwprune.export import atomic_torch_save
from hwprune.subjects import models
from hwprune.subjects.base import Subject
from hwprune.subjects.shapes import make_shapes

DATA_VERSION = "shapes-v1"
# part of the cache key: bump when the dense training's numerics change (v2: channels-last training; v3: depthwise
# weight gradients on maps smaller than the kernel summed by kernel taps; v4: 1x1 convs on small maps as matrix
# products, 900 steps; see hwprune.small_map_convs)
RECIPE_VERSION = 4


@dataclass(frozen=True)
class DemoSpec:
    build: Callable[[], nn.Module]
    description: str
    train_steps: int
    lr: float = 0.05


DEMOS: dict[str, DemoSpec] = {
    "mobilenet-tiny": DemoSpec(
        models.mobilenet_tiny,
        "MobileNetV2-like (inverted residuals, depthwise convs, squeeze-excite) for 32x32 'shapes' images",
        # 900 steps at 0.1 reach 0.91-0.94 held-out accuracy (the spread is float rounding: runs differing only in
        # the order of sums) in 95 s on a 2-core Zen 3 host; 600 at 0.05 reached 0.88. A dense model trained further
        # leaves the final fine-tunes less to make up, so they compare architectures
        train_steps=900,
        lr=0.1,
    ),
    "resnet-tiny": DemoSpec(
        models.resnet_tiny,
        "ResNet-like (basic residual blocks 16-32-64) for 32x32 'shapes' images",
        train_steps=400,
    ),
}


class _Batches:
    """Re-iterable mini-batches over in-memory tensors.

    With ``seed``, epoch ``k`` is shuffled by ``seed * 1000 + k`` (the dense training, reproducible on its own).
    Without, each epoch's order is drawn from torch's global RNG, as ``DataLoader(shuffle=True)`` does, so a caller
    that seeds torch replays the same batches (the search rebuilds its Pareto models this way).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool,
                 seed: int | None = None) -> None:
        self.x, self.y, self.batch_size, self.shuffle, self.seed = x, y, batch_size, shuffle, seed
        self._epoch = 0

    def __iter__(self):
        n = self.x.shape[0]
        if self.shuffle and self.seed is not None:
            g = torch.Generator().manual_seed(self.seed * 1000 + self._epoch)
            order = torch.randperm(n, generator=g)
            self._epoch += 1
        elif self.shuffle:
            order = torch.randperm(n)
        else:
            order = torch.arange(n)
        for i in range(0, n, self.batch_size):
            idx = order[i : i + self.batch_size]
            yield self.x[idx], self.y[idx]

    def __len__(self) -> int:
        return -(-self.x.shape[0] // self.batch_size)


def cache_dir() -> Path:
    root = os.environ.get("HWPRUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hwprune")
    return Path(root)


def _data(seed: int = 0):
    x_train, y_train = make_shapes(12000, seed=1000 + seed)
    x_val, y_val = make_shapes(2000, seed=2000 + seed)
    return x_train, y_train, x_val, y_val


def build_demo(name: str, *, seed: int = 0, log: Callable[[str], None] | None = None) -> Subject:
    """The demo subject ``name``: trains the dense model on first use (1-2 minutes) and caches its weights."""
    spec = DEMOS[name]
    torch.manual_seed(seed)
    model = spec.build()
    x_train, y_train, x_val, y_val = _data(seed)
    train_batches = _Batches(x_train, y_train, 128, shuffle=True, seed=seed)
    val_batches = _Batches(x_val, y_val, 500, shuffle=False)
    key = hashlib.sha256(
        f"{name}|{DATA_VERSION}|{RECIPE_VERSION}|{spec.train_steps}|{spec.lr}|{seed}|{torch.__version__}".encode())
    path = cache_dir() / "subjects" / f"{name}-{key.hexdigest()[:12]}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        if log:
            log(f"training the dense {name} on generated data ({spec.train_steps} steps, first run only)...")
        start = time.perf_counter()

        def progress(step: int, loss: float) -> None:
            if log and (step % 100 == 0 or step == spec.train_steps):
                elapsed = time.perf_counter() - start
                log(f"  step {step}/{spec.train_steps}, loss {loss:.3f}, "
                    f"{elapsed:.0f} s elapsed, ~{elapsed / step * (spec.train_steps - step):.0f} s left")

        train.finetune(model, train_batches, spec.train_steps, lr=spec.lr, progress=progress)
        atomic_torch_save(model.state_dict(), path)
        if log:
            log(f"trained in {time.perf_counter() - start:.0f} s, accuracy {train.accuracy(model, val_batches):.3f};"
                f" cached at {path}")
    model.eval()
    calib = _Batches(x_train[:1024], y_train[:1024], 128, shuffle=False)
    return Subject(
        model=model,
        example_inputs=(torch.zeros(1, 3, 32, 32),),
        evaluate=lambda m: train.accuracy(m, val_batches),
        name=name,
        calibration_data=calib,
        train_data=_Batches(x_train, y_train, 128, shuffle=True),
        loss_fn=nn.functional.cross_entropy,
        metric="accuracy",
        description=spec.description,
    )
