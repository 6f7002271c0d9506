"""Screening for a search: whether a candidate is worth the board's time, from a predictor and its error.

A candidate whose predicted latency, less the predictor's p90 error, is still over the budget is skipped; one
predicted over the budget but within the error is measured last; one whose prediction plus the error is still well
inside the budget is measured once (one round beside the dense model, unless that round lands near the budget); the
rest are measured now. The measured front is never made of predictions: a screen only orders, shortens and skips
measurements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from hwprune.predict.model import Predictor

DEFAULT_ERROR = 0.5  # assumed relative error of a predictor that was never validated
SKIP_MARGIN = 0.05  # a skip needs the optimistic prediction at least this far over the budget
# one round settles a candidate whose pessimistic prediction is at least this far inside the budget, as long as the
# round agrees; a round's ratio to the dense model beside it varies by ~6% (reference.interleaved_rounds), so a round
# 10% inside and a prediction that says the same leave little chance that it is really over
SETTLE_MARGIN = 0.10


@dataclass(frozen=True)
class ScreenDecision:
    """What to do with one candidate: ``measure`` now, ``measure_once`` (one round settles it when the round
    agrees), ``measure_last`` or ``skip``, and why."""

    action: Literal["measure", "measure_once", "measure_last", "skip"]
    predicted_ms: float
    low_ms: float  # the prediction less the relative error allowed for
    budget_ms: float
    reason: str
    error: float  # the relative error allowed for (the p90 validation error unless the caller gave one)


def screen(predictor: Predictor, onnx_path_or_model: Any, budget_ms: float, dense_ms: float | None = None,
           dense_onnx: Any = None, error: float | None = None) -> ScreenDecision:
    """Decide whether to measure a candidate against a latency budget.

    Args:
        predictor: a fitted predictor for the search's device.
        onnx_path_or_model: the candidate's exported ONNX model.
        budget_ms: the latency budget in ms (a relative budget times the measured dense latency).
        dense_ms: the measured latency of the dense model; with ``dense_onnx`` it rescales every prediction by
            measured / predicted dense, so the device's state today cancels out.
        dense_onnx: the dense model's ONNX, predicted once per call (cache the ratio for many candidates).
        error: the relative error to allow for (default: the predictor's p90 validation error); a search passes
            the error measured on its own candidates once it has a few.

    Returns:
        The :class:`ScreenDecision`.
    """
    predicted = predictor.predict_ms(onnx_path_or_model)
    if dense_ms is not None and dense_onnx is not None:
        predicted *= dense_ms / predictor.predict_ms(dense_onnx)
    v = predictor.validation
    err = error if error is not None else v.p90_abs_error if v is not None and v.n_models else DEFAULT_ERROR
    low = predicted * (1.0 - err)
    if low > budget_ms * (1.0 + SKIP_MARGIN):
        action, why = "skip", f"even {low:.3f} ms (prediction less its p90 error {err:.0%}) is over the budget"
    elif predicted > budget_ms:
        action, why = "measure_last", "predicted over the budget, but within the predictor's error"
    elif predicted * (1.0 + err) <= budget_ms * (1.0 - SETTLE_MARGIN):
        action, why = "measure_once", (f"predicted well within the budget: even {predicted * (1.0 + err):.3f} ms "
                                       f"(prediction plus its p90 error {err:.0%}) is {SETTLE_MARGIN:.0%} under it")
    else:
        action, why = "measure", "predicted within the budget"
    return ScreenDecision(action, predicted, low, budget_ms, why, err)


__all__ = ["SETTLE_MARGIN", "SKIP_MARGIN", "ScreenDecision", "screen"]
