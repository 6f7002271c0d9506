"""Pareto fronts over (accuracy up, latency down, memory down), hypervolume, and the recommendation rule."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

OBJECTIVES = ("accuracy", "latency_ms", "memory_mb")
# Relative latency/memory differences a less accurate model must beat to stay on the front: below this a model
# gave up accuracy for no speed or memory a measurement can tell apart (a "smaller but not faster" model).
TIE_TOLERANCE = 0.05


def _losses(df: pd.DataFrame, accuracy: str = "accuracy") -> np.ndarray:
    # everything as "lower is better"
    return np.column_stack([-df[accuracy].to_numpy(float), df["latency_ms"].to_numpy(float),
                            df["memory_mb"].to_numpy(float)])


def pareto_mask(df: pd.DataFrame, tolerance: float = 0.0, accuracies: Sequence[str] = ("accuracy",)) -> np.ndarray:
    """True for rows no other row dominates (at least as good in all objectives, better in one).

    With ``tolerance`` > 0, a *more accurate* row also dominates one whose latency and memory are within that
    relative margin of its own (faster or smaller by less than the margin). Rows of equal accuracy compare exactly,
    so the relation has no cycles and the front is never empty. With several ``accuracies`` (columns of ``df``), a
    row dominates another only if it does on each of them: e.g. on accuracy after a fine-tune that some rows got and
    others did not, and on the proxy all rows got alike.
    """
    all_losses = [_losses(df, column) for column in accuracies]
    n = len(df)
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        dominated = np.ones(n, dtype=bool)
        for losses in all_losses:
            by = np.all(losses <= losses[i], axis=1) & np.any(losses < losses[i], axis=1)
            if tolerance > 0:
                more_accurate = losses[:, 0] < losses[i, 0]
                close = np.all(losses[:, 1:] <= losses[i, 1:] * (1.0 + tolerance), axis=1)
                by |= more_accurate & close
            dominated &= by
        if np.any(dominated):
            mask[i] = False
    return mask


def pareto_front(trials: pd.DataFrame, tolerance: float = TIE_TOLERANCE) -> pd.DataFrame:
    """Feasible, non-dominated rows of ``trials`` (columns: accuracy, latency_ms, memory_mb, feasible, signature),
    one per architecture signature, sorted by latency. See :func:`pareto_mask` for ``tolerance``."""
    feasible = trials[trials["feasible"]].copy()
    if feasible.empty:
        return feasible
    # one row per architecture: identical widths are the same model (the first trial that built it wins)
    if "signature" in feasible.columns:
        feasible = feasible.sort_values("trial").drop_duplicates("signature", keep="first")
    front = feasible[pareto_mask(feasible, tolerance)]
    return front.sort_values(["latency_ms", "accuracy"], ascending=[True, False]).reset_index(drop=True)


def recommend(front: pd.DataFrame, accuracy_tolerance: float = 0.0) -> int | None:
    """Trial number to recommend: the most accurate feasible model; within ``accuracy_tolerance`` of it, the fastest."""
    if front.empty:
        return None
    best = front["accuracy"].max()
    close = front[front["accuracy"] >= best - accuracy_tolerance]
    return int(close.sort_values(["latency_ms", "memory_mb"]).iloc[0]["trial"])


def hypervolume_history(trials: pd.DataFrame, reference: Sequence[float]) -> list[tuple[int, float]]:
    """Hypervolume of the feasible front after each complete trial, on objectives normalised by ``reference``
    (accuracy, latency_ms, memory_mb of the dense model), so it is comparable across runs of the same job."""
    from optuna._hypervolume import compute_hypervolume  # Optuna's WFG implementation

    ref_acc, ref_lat, ref_mem = (float(v) for v in reference)
    # normalised losses: (1 - acc/ref_acc, lat/ref_lat, mem/ref_mem); reference point (1, 2, 2) bounds all sane models
    ref_point = np.array([1.0, 2.0, 2.0])
    history: list[tuple[int, float]] = []
    ordered = trials.sort_values("trial")
    points: list[np.ndarray] = []
    for _, row in ordered.iterrows():
        if row["feasible"]:
            p = np.array([1.0 - row["accuracy"] / max(ref_acc, 1e-12), row["latency_ms"] / ref_lat,
                          row["memory_mb"] / ref_mem])
            if np.all(p < ref_point):
                points.append(p)
        if points:
            arr = np.array(points)
            arr = arr[pareto_mask(pd.DataFrame({"accuracy": -arr[:, 0], "latency_ms": arr[:, 1],
                                                "memory_mb": arr[:, 2]}))]
            hv = float(compute_hypervolume(arr, ref_point))
        else:
            hv = 0.0
        history.append((int(row["trial"]), hv))
    return history
