"""A generated 10-class 32x32 RGB image dataset ("shapes"), so the demo needs no download.

Each image is one of ten patterns (filled/outlined circles and squares, triangles, plus and X crosses, horizontal and
vertical stripes, checkerboards) at a random position, size, colour and background, with pixel noise. It is easy
enough for a tiny CNN to learn in a minute on two cores and hard enough that pruning too much costs accuracy.
"""

from __future__ import annotations

import numpy as np
import torch

CLASSES = (
    "circle", "square", "triangle", "ring", "frame",
    "plus", "cross", "h-stripes", "v-stripes", "checker",
)
SIZE = 32


def _masks(kind: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, period: np.ndarray) -> np.ndarray:
    n = kind.shape[0]
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    yy = yy[None] - cy[:, None, None]
    xx = xx[None] - cx[:, None, None]
    r3 = r[:, None, None]
    p3 = period[:, None, None]
    d = np.sqrt(xx**2 + yy**2)
    cheb = np.maximum(np.abs(xx), np.abs(yy))
    width = np.maximum(1.5, r3 * 0.3)
    inside = cheb <= r3
    shapes = np.stack([
        d <= r3,                                                   # circle
        inside,                                                    # square
        (yy <= r3) & (yy >= -r3) & (np.abs(xx) <= (yy + r3) / 2),  # triangle (apex up)
        (d <= r3) & (d >= r3 - width),                             # ring
        inside & (cheb >= r3 - width),                             # frame
        inside & ((np.abs(xx) <= width / 2) | (np.abs(yy) <= width / 2)),                    # plus
        inside & ((np.abs(xx - yy) <= width / 1.4) | (np.abs(xx + yy) <= width / 1.4)),      # cross
        inside & (np.floor((yy + 64) / p3) % 2 == 0),              # horizontal stripes
        inside & (np.floor((xx + 64) / p3) % 2 == 0),              # vertical stripes
        inside & ((np.floor((yy + 64) / p3) + np.floor((xx + 64) / p3)) % 2 == 0),  # checker
    ], axis=1)
    return shapes[np.arange(n), kind]


def make_shapes(n: int, seed: int = 0, noise: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (float32, N x 3 x 32 x 32, roughly zero-mean) and their labels (int64), deterministic per seed."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), size=n)
    r = rng.uniform(5.0, 12.0, size=n).astype(np.float32)
    cx = rng.uniform(0, SIZE, size=n).astype(np.float32)
    cy = rng.uniform(0, SIZE, size=n).astype(np.float32)
    # keep the shape mostly on the canvas
    cx = np.clip(cx, r * 0.6, SIZE - r * 0.6)
    cy = np.clip(cy, r * 0.6, SIZE - r * 0.6)
    period = rng.uniform(2.0, 4.5, size=n).astype(np.float32)
    mask = _masks(labels, cx, cy, r, period).astype(np.float32)[:, None]
    fg = rng.uniform(0, 1, size=(n, 3, 1, 1)).astype(np.float32)
    bg = rng.uniform(0, 1, size=(n, 3, 1, 1)).astype(np.float32)
    # guarantee contrast between shape and background
    flip = np.abs(fg - bg).sum(axis=1, keepdims=True) < 0.6
    fg = np.where(flip, 1.0 - bg, fg)
    img = mask * fg + (1 - mask) * bg
    img += rng.normal(0, noise, size=img.shape).astype(np.float32)
    img = (img - 0.5) / 0.5
    return torch.from_numpy(img.astype(np.float32)), torch.from_numpy(labels.astype(np.int64))
