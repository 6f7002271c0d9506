"""bench_search's subjects: the demo, MobileNetV2 at 224x224, a CIFAR-10 ResNet and a CIFAR-10 CNN with a wide
classifier head, with their data.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hwprune import train
from hwprune.export import atomic_torch_save
from hwprune.subjects import build_demo, models
from hwprune.subjects.base import Subject
from hwprune.subjects.demo import cache_dir
from hwprune.subjects.shapes import make_shapes

from bench.common import CIFAR_MEAN, CIFAR_STD, CIFAR_ZIP, say


class UpsampledBatches:
    """Re-iterable (inputs, targets) mini-batches of 32x32 'shapes' images, bilinearly upsampled to ``size`` on the
    fly (12,000 images at 224x224 would take 7 GB); shuffled with a per-epoch seed."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, size: int, shuffle: bool,
                 seed: int = 0) -> None:
        self.x, self.y, self.batch_size, self.size, self.shuffle, self.seed = x, y, batch_size, size, shuffle, seed
        self._epoch = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.x.shape[0]
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + self._epoch))
            self._epoch += 1
        else:
            order = torch.arange(n)
        for i in range(0, n, self.batch_size):
            idx = order[i: i + self.batch_size]
            xb = F.interpolate(self.x[idx], size=(self.size, self.size), mode="bilinear", align_corners=False)
            yield xb, self.y[idx]

    def __len__(self) -> int:
        return -(-self.x.shape[0] // self.batch_size)


def build_mobilenetv2(seed: int = 0, stage1_steps: int = 240, stage2_steps: int = 60) -> tuple[Subject, str]:
    """Full-size MobileNetV2 (3.5 M params, ~300 M MACs at 224x224) with 10 classes, trained briefly on generated
    'shapes' images: ``stage1_steps`` at 112x112 (batch 32), then ``stage2_steps`` at 224x224 (batch 16).
    Weights are cached after the first build. Returns the subject and a note on what its accuracy means."""
    torch.manual_seed(seed)
    model = models.mobilenet_v2(num_classes=10)
    x_train, y_train = make_shapes(6000, seed=1000 + seed)
    x_val, y_val = make_shapes(256, seed=2000 + seed)
    val = UpsampledBatches(x_val, y_val, 32, 224, shuffle=False)
    key = hashlib.sha256(f"mobilenetv2-224|shapes-v1|{stage1_steps}|{stage2_steps}|{seed}|{torch.__version__}"
                         .encode()).hexdigest()[:12]
    path = cache_dir() / "subjects" / f"bench-mobilenetv2-224-{key}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        note = f"weights cached at {path}"
    else:
        t0 = time.perf_counter()
        say(f"training the dense MobileNetV2: {stage1_steps} steps at 112x112, {stage2_steps} at 224x224 "
            "(first run only; cached afterwards)...")
        train.finetune(model, UpsampledBatches(x_train, y_train, 32, 112, shuffle=True, seed=seed), stage1_steps,
                       lr=0.05)
        train.finetune(model, UpsampledBatches(x_train, y_train, 16, 224, shuffle=True, seed=seed + 1),
                       stage2_steps, lr=0.02)
        atomic_torch_save(model.state_dict(), path)
        note = f"trained in {time.perf_counter() - t0:.0f} s and cached at {path}"
    model.eval()
    dense_acc = train.accuracy(model, val)
    verdict = ("ACCURACY IS MEANINGLESS for this subject (near the 0.10 of chance): read only its latency, MACs and "
               "params" if dense_acc < 0.5 else "its accuracies are only comparable with each other, not with any "
               "published MobileNetV2 figure; latency is the point of this subject")
    note = (f"MobileNetV2 at 224x224 trained only {stage1_steps}+{stage2_steps} steps on upsampled 32x32 'shapes' "
            f"images (dense accuracy {dense_acc:.3f} on 256 held-out images); {verdict} ({note})")
    subject = Subject(
        model=model,
        example_inputs=(torch.zeros(1, 3, 224, 224),),
        evaluate=lambda m: train.accuracy(m, val),
        name="mobilenetv2-224",
        calibration_data=UpsampledBatches(x_train[:128], y_train[:128], 32, 224, shuffle=False),
        train_data=UpsampledBatches(x_train, y_train, 16, 224, shuffle=True, seed=seed),
        loss_fn=nn.functional.cross_entropy,
        description="full-size MobileNetV2, 224x224, shapes data",
    )
    return subject, note


def load_cifar(zip_path: Path, per_class: dict[str, tuple[str, int, int]]) -> dict[str, tuple[torch.Tensor, ...]]:
    """Named splits of the CIFAR-10 JPEG zip (``train/<class>/NNNN.jpg``, ``test/...``), normalised: ``per_class``
    maps a split name to (folder, first index, count) taken from each class, in file-name order."""
    import zipfile

    import numpy as np
    from PIL import Image

    if not zip_path.is_file():
        raise SystemExit(f"no CIFAR-10 zip at {zip_path}; pass --cifar-zip PATH (train/<class>/NNNN.jpg inside)")
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    out: dict[str, tuple[torch.Tensor, ...]] = {}
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
        classes = sorted({n.split("/")[1] for n in names if n.startswith("train/") and n.count("/") == 2})
        for split, (folder, start, count) in per_class.items():
            xs, ys = [], []
            for label, cls in enumerate(classes):
                files = sorted(n for n in names if n.startswith(f"{folder}/{cls}/") and n.endswith(".jpg"))
                for n in files[start:start + count]:
                    with zf.open(n) as f:
                        xs.append(np.asarray(Image.open(f).convert("RGB"), dtype=np.uint8))
                    ys.append(label)
            x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float().div(255.0)
            out[split] = ((x - mean) / std, torch.tensor(ys))
    return out


class AugmentedBatches:
    """Shuffled mini-batches with the standard CIFAR augmentation (random 32x32 crop of the 4-pixel zero-padded
    image, random horizontal flip), reproducible per epoch from ``seed``: the dense model's training data."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self._epoch = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1000 + self._epoch)
        self._epoch += 1
        n = self.x.shape[0]
        order = torch.randperm(n, generator=g)
        for i in range(0, n, self.batch_size):
            idx = order[i: i + self.batch_size]
            xb = F.pad(self.x[idx], (4, 4, 4, 4))
            dx, dy = (int(v) for v in torch.randint(0, 9, (2,), generator=g))
            xb = xb[:, :, dy:dy + 32, dx:dx + 32]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)
            yield xb.contiguous(), self.y[idx]

    def __len__(self) -> int:
        return -(-self.x.shape[0] // self.batch_size)


def _trained_on_cifar(model: nn.Module, name: str, seed: int, zip_path: Path, steps: int, lr: float,
                      description: str) -> tuple[Subject, float, float, Any]:
    """``model`` trained ``steps`` SGD steps on 40,000 augmented CIFAR-10 images (cached by ``name``, steps and
    seed), as a subject that evaluates on 5,000 other training images; returns it with its validation and test
    accuracy and the test batches (10,000 images nothing chose on)."""
    from hwprune.subjects.demo import _Batches

    splits = load_cifar(zip_path, {"train": ("train", 0, 4000), "val": ("train", 4000, 500),
                                   "test": ("test", 0, 1000)})
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = splits["train"], splits["val"], splits["test"]
    key = hashlib.sha256(f"{name}|{zip_path.name}|40k-aug|{steps}|{seed}|{torch.__version__}".encode())
    path = cache_dir() / "subjects" / f"bench-{name}-{key.hexdigest()[:12]}.pt"
    val = _Batches(x_val, y_val, 1000, shuffle=False)
    test = _Batches(x_test, y_test, 1000, shuffle=False)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        say(f"training the CIFAR-10 {name} ({steps} steps on 40,000 augmented images, first run only)...")
        train.finetune(model, AugmentedBatches(x_train, y_train, 128, seed=seed), steps, lr=lr,
                       progress=lambda step, loss: step % 250 == 0 and say(f"  step {step}/{steps}, loss {loss:.3f}"))
        atomic_torch_save(model.state_dict(), path)
    model.eval()
    subject = Subject(
        model=model, example_inputs=(torch.zeros(1, 3, 32, 32),), evaluate=lambda m: train.accuracy(m, val),
        name=name, calibration_data=_Batches(x_train[:1024], y_train[:1024], 128, shuffle=False),
        train_data=_Batches(x_train, y_train, 128, shuffle=True), loss_fn=nn.functional.cross_entropy,
        description=description)
    return subject, train.accuracy(model, val), train.accuracy(model, test), test


def build_cifar(seed: int, zip_path: Path,
                steps: int = 3000) -> tuple[Subject, str, Callable[[nn.Module], torch.Tensor]]:
    """A ResNet (widths 32/64/128, ~5x the demo's MACs) trained on 40,000 CIFAR-10 images with augmentation.

    The search sees only a validation split (5,000 other training images); the table's accuracy is measured on the
    10,000 test images, which nothing chose on.
    """
    torch.manual_seed(seed)
    model = models.ResNet(10, widths=(32, 64, 128), blocks=2, stem_stride=2)
    subject, acc_val, acc_test, test = _trained_on_cifar(model, "cifar-resnet", seed, zip_path, steps, 0.1,
                                                         "ResNet 32/64/128 on CIFAR-10 (lossy JPEG copy)")
    return subject, (f"ResNet (widths 32/64/128) trained {steps} steps on 40,000 augmented CIFAR-10 images from the "
                     f"lossy JPEG copy (dense accuracy {acc_test:.3f} on the 10,000 test images, {acc_val:.3f} on the "
                     "5,000 validation images the search evaluates on; real data, relative comparisons only)"), \
        lambda m: train.correct(m, test)


class WideHeadCNN(nn.Module):
    """Two conv blocks (32 and 64 channels, each BN-ReLU-maxpool) and a wide three-layer classifier (4096 -> 1024 ->
    1024 -> classes), as in the VGG/AlexNet family: most weights, and at batch 1 most of the time, sit in the head.

    With ``se``, the blocks are MobileNet-style instead (a conv or 1x1 conv, then a depthwise 3x3 and a
    squeeze-excitation gate): layers where INT8 costs more in quantize/dequantize than it saves, before a head where
    it pays.
    """

    def __init__(self, num_classes: int = 10, width: int = 1024, se: bool = False) -> None:
        super().__init__()
        if se:
            self.features = nn.Sequential(
                nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                models.SqueezeExcite(32), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                models.SqueezeExcite(64), nn.MaxPool2d(2))
        else:
            self.features = nn.Sequential(
                nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 8 * 8, width), nn.ReLU(inplace=True),
                                  nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_cifar_widehead(seed: int, zip_path: Path, steps: int = 3000,
                         se: bool = False) -> tuple[Subject, str, Callable[[nn.Module], torch.Tensor]]:
    """:class:`WideHeadCNN` trained on 40,000 CIFAR-10 images with augmentation: subjects for the joint precision
    search. On this x86 host INT8 pays in the head's large Gemms; with ``se`` it costs in the depthwise and
    squeeze-excitation blocks (INT8 everywhere 0.79x of FP32, the head alone 0.59x, the blocks alone 1.6x), without
    it the plain convs are about even. Splits as :func:`build_cifar`."""
    torch.manual_seed(seed)
    model = WideHeadCNN(10, se=se)
    name = "cifar-se-widehead" if se else "cifar-widehead"
    blocks = "depthwise + squeeze-excitation blocks 32/64" if se else "convs 32/64"
    subject, acc_val, acc_test, test = _trained_on_cifar(
        model, name, seed, zip_path, steps, 0.02,
        f"CNN ({blocks}) with a 4096-1024-1024 classifier on CIFAR-10 (lossy JPEG copy)")
    return subject, (f"CNN ({blocks}, classifier 4096-1024-1024) trained {steps} steps on 40,000 augmented CIFAR-10 "
                     f"images from the lossy JPEG copy (dense accuracy {acc_test:.3f} on the 10,000 test images, "
                     f"{acc_val:.3f} on the 5,000 validation images the search evaluates on)"), \
        lambda m: train.correct(m, test)


def build_subject(name: str, seed: int,
                  cifar_zip: Path = CIFAR_ZIP) -> tuple[Subject, str, Callable[[nn.Module], torch.Tensor]]:
    """The subject for a ``--models`` entry, a note on what its accuracy means, and the test evaluation the table
    reports (per-image correctness): data no method selected on (hwprune's search evaluates with
    ``subject.evaluate``)."""
    if name == "demo":
        from hwprune.subjects.demo import _Batches

        subject = build_demo("mobilenet-tiny", seed=seed, log=say)
        test = _Batches(*make_shapes(5000, seed=3000 + seed), 500, shuffle=False)
        return subject, ("mobilenet-tiny, the built-in demo subject (32x32 generated 'shapes' images; the search "
                         "evaluates on its 2,000 held-out images, the table on 5,000 other generated ones)"), \
            lambda m: train.correct(m, test)
    if name == "mobilenetv2":
        subject, note = build_mobilenetv2(seed)
        val = UpsampledBatches(*make_shapes(256, seed=2000 + seed), 32, 224, shuffle=False)  # the subject's own
        return subject, note, lambda m: train.correct(m, val)
    if name == "cifar":
        return build_cifar(seed, cifar_zip)
    if name in ("cifar-widehead", "cifar-se-widehead"):
        return build_cifar_widehead(seed, cifar_zip, se=name == "cifar-se-widehead")
    raise SystemExit(f"unknown model {name!r}; choose from demo, mobilenetv2, cifar, cifar-widehead, "
                     "cifar-se-widehead")


def fresh_data(data: Any) -> Any:
    """A copy of a re-iterable batch source restarted at epoch 0, so every fine-tune sees the same batches."""
    data = copy.copy(data)
    if hasattr(data, "_epoch"):
        data._epoch = 0
    return data


def classifier_of(model: nn.Module) -> nn.Module:
    """The last Linear layer (the classifier, which keeps its outputs)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
