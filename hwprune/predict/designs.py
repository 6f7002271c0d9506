"""The designed calibration set: small random networks covering the kernels pruned CNNs and transformers run.

Each design is a seeded random stack of blocks (plain conv, inverted residual with optional squeeze-excite, basic
residual, pooling, transformer block) with channel widths drawn both on and off the profile's channel multiple, so
the regressors see aligned and misaligned kernels of every kind, at several input sizes.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

ACTS = ("relu", "relu6", "silu", "hardswish")
SIZES = (16, 24, 32, 48, 64, 96, 128, 160, 224)
MAX_WIDTH = 1024
# a block whose 3x3 conv would exceed this many MACs is made stride-2 instead: keeps one design to tens of ms while
# the widths still reach 512-1024 channels at the small maps real networks run them on
MAX_BLOCK_MACS = 120e6
# share of CNN designs ending in a wide 1x1 conv (512-1280 channels) before the classifier, as MobileNets do: without
# them, the designs had too few wide 1x1 kernels on small maps and large classifier Gemms, and MobileNetV2's head and
# classifier were mispredicted
WIDE_HEAD_SHARE = 0.3
# every MOBILE_EVERY-th design is a MobileNet-like chain of inverted residual blocks: in the mixed CNN designs only one
# block in six is inverted, which left the depthwise kernels with a few dozen samples and MobileNetV2 mispredicted
MOBILE_EVERY = 5
# sequence lengths of the nn.TransformerEncoder designs (the benchmark's held-out encoders run 32 and 64 tokens)
ENCODER_TOKENS = (16, 24, 49, 96, 128)


@dataclass(frozen=True)
class Design:
    """A calibration network: its name, the torch module and an example input."""

    name: str
    module: Any
    example: Any


def _act(name: str) -> Any:
    from torch import nn

    return {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "hardswish": nn.Hardswish}[name]()


def _width(rng: random.Random, multiple: int, lo: int = 8, hi: int = 96) -> int:
    """A width between lo and hi (log-uniform), on the channel multiple half the time."""
    import math

    w = int(round(math.exp(rng.uniform(math.log(max(lo, 1)), math.log(max(hi, lo + 1))))))
    if rng.random() < 0.5 and multiple > 1:
        return max(multiple, int(round(w / multiple)) * multiple)
    return max(1, w)


def _conv(cin: int, cout: int, k: int, s: int, groups: int, act: str | None) -> Any:
    from torch import nn

    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(_act(act))
    return nn.Sequential(*layers)


@functools.cache
def _block_modules() -> tuple[type, type]:
    """The (Residual, SE) module classes the CNN and MobileNet-like designs share, defined once torch is imported."""
    import torch
    from torch import nn

    class Residual(nn.Module):
        def __init__(self, body: Any, shortcut: Any | None) -> None:
            super().__init__()
            self.body, self.shortcut = body, shortcut

        def forward(self, x: Any) -> Any:
            return self.body(x) + (x if self.shortcut is None else self.shortcut(x))

    class SE(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.fc = nn.Sequential(nn.Conv2d(c, max(4, c // 4), 1), nn.ReLU(), nn.Conv2d(max(4, c // 4), c, 1))

        def forward(self, x: Any) -> Any:
            return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))

    return Residual, SE


def _cnn_blocks(rng: random.Random, multiple: int, cin: int, size: int) -> tuple[list[Any], int]:
    """A random stack of CNN blocks; returns the blocks and the output channels."""
    from torch import nn

    Residual, SE = _block_modules()
    blocks: list[Any] = []
    c = cin
    scale = float(max(cin, 8))  # channels grow as maps shrink, as in real networks
    for _ in range(rng.randint(2, 7)):
        kind = rng.choice(("conv", "conv", "inverted", "basic", "basic", "pool"))
        stride = 2 if size >= 4 and (rng.random() < 0.35 or 9 * scale * scale * size * size > MAX_BLOCK_MACS) else 1
        if stride == 2:
            scale = min(scale * rng.choice((1.5, 2.0, 2.0)), MAX_WIDTH)
        act = rng.choice(ACTS)
        lo, hi = max(4, int(scale / 2)), max(8, int(scale * 1.5))
        if kind == "conv":
            cout, k = _width(rng, multiple, lo, hi), rng.choice((1, 3, 3, 5, 7))
            blocks.append(_conv(c, cout, k, stride, 1, act))
        elif kind == "inverted":
            hidden, cout = _width(rng, multiple, 2 * lo, 6 * hi), _width(rng, multiple, lo, hi)
            k = rng.choice((3, 3, 5))
            body = [_conv(c, hidden, 1, 1, 1, act), _conv(hidden, hidden, k, stride, hidden, act)]
            if rng.random() < 0.4:
                body.append(SE(hidden))
            body.append(_conv(hidden, cout, 1, 1, 1, None))
            residual = stride == 1 and cout == c  # MobileNetV2 adds the input back only where shapes match
            blocks.append(Residual(nn.Sequential(*body), None) if residual else nn.Sequential(*body))
        elif kind == "basic":
            cout = _width(rng, multiple, lo, hi)
            body = nn.Sequential(_conv(c, cout, 3, stride, 1, "relu"), _conv(cout, cout, 3, 1, 1, None))
            short = None if (stride == 1 and cout == c) else _conv(c, cout, 1, stride, 1, None)
            blocks.append(nn.Sequential(Residual(body, short), nn.ReLU()))
        else:
            pool = rng.choice((nn.MaxPool2d(3, 2, 1), nn.AvgPool2d(2)))
            # a 2x2 average pool of a 1x1 map has no output (the draw is kept: later designs stay the same)
            blocks.append(nn.MaxPool2d(3, 2, 1) if size < 2 else pool)
            stride, cout = 2, c
        c = cout
        size = max(1, size // stride)
    return blocks, c


def cnn_design(seed: int, multiple: int) -> Design:
    """A random CNN (stem, 2-7 blocks, sometimes a wide 1x1 head, global pool, linear classifier) at a random input
    size."""
    import torch
    from torch import nn

    rng = random.Random(seed)
    size = rng.choice(SIZES)
    stem_out = _width(rng, multiple, 8, 96 if size <= 64 else 48)
    stem = _conv(3, stem_out, rng.choice((3, 3, 7)), rng.choice((1, 2)), 1, rng.choice(ACTS))
    blocks, c = _cnn_blocks(rng, multiple, stem_out, size)
    classes = rng.choice((10, 100, 1000))
    if rng.random() < WIDE_HEAD_SHARE:  # drawn last, so the designs before it stay as they were
        head = _width(rng, multiple, 512, 1280)
        blocks.append(_conv(c, head, 1, 1, 1, rng.choice(ACTS)))
        c = head
    net = nn.Sequential(stem, *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))
    return Design(f"cnn-{seed}", net.eval(), torch.randn(1, 3, size, size))


def mobile_design(seed: int, multiple: int) -> Design:
    """A MobileNet-like network: a stride-2 stem, 3-8 inverted residual blocks (expansion 1-6, 3x3 or 5x5 depthwise,
    sometimes squeeze-excite), sometimes a wide 1x1 head, global pool and a linear classifier."""
    import torch
    from torch import nn

    Residual, SE = _block_modules()
    rng = random.Random(seed)
    in_size = rng.choice(SIZES)
    act = rng.choice(ACTS)
    c = _width(rng, multiple, 8, 48)
    layers: list[Any] = [_conv(3, c, 3, 2, 1, act)]
    size = max(1, in_size // 2)
    for _ in range(rng.randint(3, 8)):
        stride = 2 if size >= 4 and rng.random() < 0.4 else 1
        cout = _width(rng, multiple, c, int(c * (2.0 if stride == 2 else 1.3)) + 1) if rng.random() < 0.6 else c
        hidden = c * rng.choice((1, 3, 4, 6, 6))
        if rng.random() < 0.5:  # pruned networks: the expanded width off its round multiple of the input
            hidden = _width(rng, multiple, max(4, hidden // 2), hidden)
        body = [] if hidden == c else [_conv(c, hidden, 1, 1, 1, act)]
        body.append(_conv(hidden, hidden, rng.choice((3, 3, 5)), stride, hidden, act))
        if rng.random() < 0.3:
            body.append(SE(hidden))
        body.append(_conv(hidden, cout, 1, 1, 1, None))
        layers.append(Residual(nn.Sequential(*body), None) if stride == 1 and cout == c else nn.Sequential(*body))
        c, size = cout, max(1, size // stride)
    if rng.random() < WIDE_HEAD_SHARE:
        head = _width(rng, multiple, 512, 1280)
        layers.append(_conv(c, head, 1, 1, 1, act))
        c = head
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, rng.choice((10, 100, 1000))))
    return Design(f"mobile-{seed}", net.eval(), torch.randn(1, 3, in_size, in_size))


def torch_encoder_design(seed: int, multiple: int) -> Design:
    """A random stack of PyTorch's own ``nn.TransformerEncoderLayer``: it exports differently from a hand-written
    block (fused multi-head attention: packed in-projection, Gather/Squeeze splits, MatMul+Add fusions in ORT), and
    it is the block users ship."""
    import torch
    from torch import nn

    rng = random.Random(seed)
    heads = rng.choice((1, 2, 4, 8))
    dim = heads * rng.choice((8, 16, 24, 32))
    layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=_width(rng, multiple, dim, 4 * dim),
                                       batch_first=True, norm_first=rng.random() < 0.5,
                                       activation=rng.choice(("relu", "gelu")))
    net = nn.TransformerEncoder(layer, num_layers=rng.randint(1, 3), enable_nested_tensor=False)
    return Design(f"encoder-{seed}", net.eval(), torch.randn(1, rng.choice(ENCODER_TOKENS), dim))


def transformer_design(seed: int, multiple: int) -> Design:
    """A random pre-norm transformer block stack on a token sequence (LayerNorm, attention, GELU MLP); every other
    one PyTorch's ``nn.TransformerEncoder`` (:func:`torch_encoder_design`)."""
    import torch
    from torch import nn

    rng = random.Random(seed)
    if rng.random() < 0.5:
        return torch_encoder_design(seed + 1, multiple)
    heads = rng.choice((1, 2, 4))
    dim = heads * rng.choice((8, 16, 24, 32, 48))
    tokens = rng.choice((16, 32, 49, 64))
    hidden = _width(rng, multiple, dim, 4 * dim)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

        def forward(self, x: Any) -> Any:
            b, t, _ = x.shape
            q, k, v = self.qkv(self.n1(x)).reshape(b, t, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-2, -1) / (dim // heads) ** 0.5, dim=-1)
            x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, dim))
            return x + self.mlp(self.n2(x))

    net = nn.Sequential(*[Block() for _ in range(rng.randint(1, 3))])
    return Design(f"transformer-{seed}", net.eval(), torch.randn(1, tokens, dim))


def designs(count: int, multiple: int, seed: int = 0) -> Iterator[Design]:
    """Up to ``count`` calibration designs, one in five a transformer and one in :data:`MOBILE_EVERY` MobileNet-like,
    reproducible from ``seed``; each is built when it is asked for (building 1000 up front took 15 s of a
    calibration's budget before its first measurement)."""
    for i in range(count):
        s = seed * 100_003 + i
        if i % 5 == 4:
            yield transformer_design(s, multiple)
        elif i % MOBILE_EVERY == 2:
            yield mobile_design(s, multiple)
        else:
            yield cnn_design(s, multiple)


def reference_design() -> Design:
    """The fixed model every calibration design is timed beside (:func:`hwprune.predict.calibrate.measure_designs`):
    a small CNN with dense, depthwise and 1x1 convs and a classifier, ~0.2 ms on one Zen 3 core. Its time tracks
    the host's speed through the calibration, so each design's time is taken relative to it."""
    import torch
    from torch import nn

    net = nn.Sequential(_conv(3, 32, 3, 2, 1, "relu"), _conv(32, 32, 3, 1, 32, "relu"), _conv(32, 64, 1, 1, 1, "relu"),
                        _conv(64, 64, 3, 2, 1, "relu"), _conv(64, 128, 1, 1, 1, "relu"), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(128, 100))
    return Design("reference", net.eval(), torch.randn(1, 3, 48, 48))


def design_by_name(name: str, multiple: int) -> Design:
    """The design a calibration named ``name`` (``cnn-12``, ``encoder-5``, ...), built again from its seed: what
    re-attributes a stored calibration's profiles without measuring again.

    Raises:
        ValueError: the name is not a design's.
    """
    kind, _, seed = name.rpartition("-")
    builders = {"cnn": cnn_design, "mobile": mobile_design, "encoder": torch_encoder_design,
                "transformer": transformer_design}
    if kind not in builders or not seed.isdigit():
        raise ValueError(f"{name!r} is not a calibration design's name")
    d = builders[kind](int(seed), multiple)
    if d.name != name:  # transformer_design(s) hands half its seeds to torch_encoder_design(s + 1)
        raise ValueError(f"{name!r} is not a calibration design's name")
    return d


__all__ = ["Design", "cnn_design", "design_by_name", "designs", "mobile_design", "reference_design",
           "torch_encoder_design", "transformer_design"]
