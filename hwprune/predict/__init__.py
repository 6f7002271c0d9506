"""Latency predictors fitted from measurements: features, per-op regressors, calibration, storage, screening and
transfer to another device (see docs/benchmarks.md, "Latency predictor")."""

from hwprune.predict.model import Predictor, Validation
from hwprune.predict.screen import ScreenDecision, screen
from hwprune.predict.transfer import transfer

__all__ = ["Predictor", "ScreenDecision", "Validation", "screen", "transfer"]
