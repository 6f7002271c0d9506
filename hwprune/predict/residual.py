"""Whole-model residual trees: a per-node factor, boosted on whole-model measurements, that rescales the node
predictions so that each calibration model's node sum matches its measured latency.

Why: the node regressors learn from ONNX Runtime's profiler, whose own cost per node varies by op and by model (1-3 us
per node measured on the same host, against kernels of 1-5 us in small models), so a profiled node time is a biased
target and no single per-node offset removes the bias. The whole-model medians are not biased. Gradient boosting on
the models' log residuals, with each node weighted by its share of its model, learns which kinds of node (family,
geometry, predicted size) the profile over- or under-states. Refitted with and without it on the measurements of two
calibrations of this host: held-out architectures 55% -> 64% and 64% -> 77% within +-10%, the calibration designs'
p90 error 24% -> 20% (docs/design.md).

scikit-learn is imported only when the trees are fitted; without it, or with too few models, there is no residual.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hwprune.predict.features import TREE_NAMES

RESIDUAL_ITERS = 200  # boosting rounds
RESIDUAL_RATE = 0.15  # shrinkage per round
RESIDUAL_DEPTH = 3  # depth of each tree: a factor depends on a few node traits at once, not on many
RESIDUAL_LEAF = 50  # fewest nodes per leaf: a factor is learnt from many nodes of many models, not one model
# fewer calibration models than this: no residual stage (validated on 400-500; on a 52-model quick calibration it
# overfitted, median held-out error 0.16 -> 0.20; `hwprune calibrate`'s default budget measures ~500 here)
MIN_RESIDUAL_MODELS = 100
OP_BUCKETS = 97  # op types are coded by a stable hash into this many buckets (a tree splits on the code)
_FAMILY_CODES = ("conv", "conv-dw", "matmul", "other")


def node_row(op_type: str, fam: str, x: Sequence[float], base_us: float) -> list[float]:
    """The residual trees' input for one node: its family, op type, predicted microseconds and kernel geometry."""
    geometry = list(x) if x else [0.0] * len(TREE_NAMES)
    return [float(_FAMILY_CODES.index(fam)), float(zlib.crc32(op_type.encode()) % OP_BUCKETS),
            float(np.log(max(base_us, 0.0) + 1e-3)), *geometry]


@dataclass
class ResidualTrees:
    """The fitted boosting: ``factor(node) = exp(rate x sum of tree outputs)``."""

    trees: list[Any]
    rate: float

    def factors(self, rows: np.ndarray) -> np.ndarray:
        """Multiplicative factor per node row (:func:`node_row`)."""
        if not len(rows):
            return np.ones(0)
        g = np.zeros(len(rows))
        x = np.ascontiguousarray(rows, dtype=np.float32)  # what the trees split on; skips sklearn's per-call checks
        for t in self.trees:
            g += self.rate * t.predict(x, check_input=False)
        return np.exp(np.clip(g, -5.0, 5.0))


def fit_residual(models: list[tuple[np.ndarray, np.ndarray, float]], iters: int = RESIDUAL_ITERS,
                 rate: float = RESIDUAL_RATE) -> ResidualTrees | None:
    """Boost per-node factors so each model's factored node sum (ms) approaches its measured ms (in logs).

    Args:
        models: per calibration model, (node rows, predicted node ms before the factor, measured whole-model ms).
        iters: boosting rounds.
        rate: shrinkage.

    Returns:
        The fitted trees, or None without scikit-learn or with fewer than :data:`MIN_RESIDUAL_MODELS` usable models.
    """
    try:
        from sklearn.tree import DecisionTreeRegressor
    except ImportError:
        return None
    models = [(r, b, ms) for r, b, ms in models if len(r) and b.sum() > 0 and ms > 0]
    if len(models) < MIN_RESIDUAL_MODELS:
        return None
    rows = np.ascontiguousarray(np.vstack([r for r, _, _ in models]), dtype=np.float32)
    base = np.concatenate([b for _, b, _ in models])
    owner = np.concatenate([np.full(len(b), k) for k, (_, b, _) in enumerate(models)])
    target = np.log([ms for _, _, ms in models])
    g = np.zeros(len(base))
    trees = []
    for _ in range(iters):
        node_ms = base * np.exp(g)
        model_ms = np.bincount(owner, node_ms, minlength=len(models))
        residual = target - np.log(np.maximum(model_ms, 1e-9))
        # a node moves its model's sum by its share: the Newton step of the log loss weights each node by it
        share = node_ms / np.maximum(model_ms[owner], 1e-12)
        tree = DecisionTreeRegressor(max_depth=RESIDUAL_DEPTH, min_samples_leaf=RESIDUAL_LEAF, random_state=0)
        tree.fit(rows, residual[owner], sample_weight=share + 1e-9)
        trees.append(tree)
        g += rate * tree.predict(rows, check_input=False)
    return ResidualTrees(trees, rate)


__all__ = ["MIN_RESIDUAL_MODELS", "ResidualTrees", "fit_residual", "node_row"]
