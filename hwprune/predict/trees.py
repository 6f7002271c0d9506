"""Tree regressors of kernel time: per family (dense conv, depthwise conv, matmul), a gradient-boosted tree over the
kernel's geometry (:data:`hwprune.predict.features.TREE_NAMES`) predicting log(measured / reference), where the
reference is a simple cost (padded MACs at a nominal rate + bytes at a nominal bandwidth + a launch cost).

Why trees on a ratio: a kernel's efficiency depends on its shape in steps (SIMD lanes, blocking, cache sizes) that a
power law cannot follow (the first version's power laws put ResNet-18 2-3x off); trees interpolate those steps, and
predicting a ratio to a cost that scales with size keeps extrapolation sane (beyond the sampled range the tree's
ratio is flat, so time still grows with MACs). scikit-learn is imported only when trees are fitted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

TREE_FAMILIES = ("conv", "conv-dw", "matmul")
REF_MACS_PER_US = 40e3  # nominal rate of the reference cost (40 GMAC/s); only its shape matters, trees learn scale
REF_BYTES_PER_US = 10e3  # nominal bandwidth of the reference cost (10 GB/s)
REF_LAUNCH_US = 0.5
MIN_TREE_SAMPLES = 30  # a family with fewer timed kernels keeps the linear regressors
TREE_SEED = 0
MIN_US = 0.5  # kernels under this are timer noise: left out of tree fits


def ref_us(x: Sequence[float]) -> float:
    """The reference cost of a kernel from its tree features (padded MACs, bytes)."""
    return math.expm1(x[1]) / REF_MACS_PER_US + math.expm1(x[2]) / REF_BYTES_PER_US + REF_LAUNCH_US


def _regressor() -> Any:
    try:
        from sklearn.ensemble import HistGradientBoostingRegressor
    except ImportError:
        return None
    return HistGradientBoostingRegressor(max_iter=300, learning_rate=0.08, max_leaf_nodes=15, min_samples_leaf=8,
                                         l2_regularization=1.0, random_state=TREE_SEED)


def fit_trees(groups: dict[str, list[tuple[Sequence[float], float, float]]]) -> dict[str, Any]:
    """One tree per family with enough samples.

    Args:
        groups: family -> [(tree features, measured us, weight), ...].

    Returns:
        family -> fitted regressor (empty when scikit-learn is missing: the caller keeps its linear regressors).
    """
    out: dict[str, Any] = {}
    for fam, rows in groups.items():
        rows = [r for r in rows if r[1] >= MIN_US and r[0]]
        reg = _regressor()
        if reg is None or len(rows) < MIN_TREE_SAMPLES:
            continue
        x = np.asarray([r[0] for r in rows], float)
        y = np.log(np.asarray([r[1] / ref_us(r[0]) for r in rows], float))
        # a kernel's error counts by its share of its model's time, softened so small kernels still shape the fit
        w = np.sqrt(np.asarray([max(r[1] * r[2], 1e-6) for r in rows], float))
        reg.fit(x, y, sample_weight=w / w.mean())
        out[fam] = reg
    return out


def predict_trees(trees: dict[str, Any], fam: str, xs: list[Sequence[float]]) -> list[float] | None:
    """Predicted microseconds of kernels of one family, or None when that family has no tree."""
    reg = trees.get(fam)
    if reg is None or not xs:
        return None
    ratio = np.exp(reg.predict(np.asarray(xs, float)))
    return [float(r * ref_us(x)) for r, x in zip(ratio, xs)]


__all__ = ["TREE_FAMILIES", "fit_trees", "predict_trees", "ref_us"]
