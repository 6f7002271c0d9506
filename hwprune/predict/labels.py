"""How an estimated latency is labelled wherever it appears (CLI, report): the estimator and its held-out error."""

from __future__ import annotations

from typing import Any

FIRM_VALIDATION = 20  # fewer held-out models than this: the label says the error figures are loose
UNKNOWN = "by the estimate backend (a fitted predictor where `hwprune calibrate` stored one, else the roofline)"


def estimate_label(predictor: dict[str, Any] | None) -> str:
    """One phrase naming the estimator of a latency and how far off it was on held-out models.

    Args:
        predictor: ``Measurement.extra["predictor"]`` (:meth:`hwprune.predict.model.Predictor.describe`, or the
            roofline's ``{"kind": "roofline"}``); None when the record does not say.

    Returns:
        E.g. "fitted predictor, 69% of 131 held-out models within +-10%, 91% within +-25%, median error 7%".
    """
    if not predictor:
        return UNKNOWN
    if predictor.get("kind") != "fitted":
        if predictor.get("stale"):
            return (f"roofline: the stored predictor {predictor['stale']} was fitted by an older hwprune; run "
                    "`hwprune calibrate` again")
        return "roofline; run `hwprune calibrate` for a fitted predictor"
    if predictor.get("within_10pct") is None:
        return f"fitted predictor on {predictor.get('fitted_on')} models, not validated"
    n = predictor.get("validated_on")
    source = predictor.get("transferred_from")
    of = f"of {n} held-out {'device samples' if source else 'models'}" if n else "of held-out models"
    # a short calibration holds out one or two models: 100% of 2 says little, and the label says so
    more = "more `hwprune calibrate --samples`" if source else "a longer `hwprune calibrate --budget-seconds`"
    loose = f" (only {n} held out: {more} gives firmer figures)" if n and n < FIRM_VALIDATION else ""
    kind = f"fitted predictor transferred from {source.split(' ')[0]}" if source else "fitted predictor"
    return (f"{kind}, {predictor['within_10pct']:.0%} {of} within +-10%, "
            f"{predictor['within_25pct']:.0%} within +-25%, median error {predictor['median_abs_error']:.0%}{loose}")


__all__ = ["FIRM_VALIDATION", "estimate_label"]
