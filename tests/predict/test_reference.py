"""Calibration designs timed beside a fixed reference model, on real ONNX Runtime, and taken relative to it."""

from __future__ import annotations

import dataclasses

import pytest

from hwprune.predict.calibrate import measure_designs, relative_to_reference
from hwprune.profiles import load_profile


@pytest.fixture(scope="module")
def measured():
    profile = load_profile("host-cpu").with_overrides(measure__repeats=5, measure__warmup=2)
    return measure_designs(profile, budget_s=1.0, max_models=6)[1]


def test_designs_are_timed_beside_the_reference(measured) -> None:
    assert len(measured) == 6
    typical = sorted(m.reference_ms for m in measured)
    typical = (typical[2] + typical[3]) / 2  # the median of six
    for m in measured:
        assert m.raw_ms > 0 and m.reference_ms > 0
        assert m.measured_ms == pytest.approx(m.raw_ms / m.reference_ms * typical)
        assert all(s.model_ms == m.measured_ms for s in m.samples)  # what the residual trees fit to


def test_a_slow_spell_cancels(measured) -> None:
    # a spell that slows the host 1.5x while one design is timed slows the reference beside it alike
    slow = [dataclasses.replace(m, raw_ms=m.raw_ms * 1.5, reference_ms=m.reference_ms * 1.5) if i == 0 else m
            for i, m in enumerate(measured)]
    again = relative_to_reference(slow)
    assert again[0].measured_ms == pytest.approx(measured[0].measured_ms, rel=0.2)
    # timed alone (no reference), a model keeps its own time
    alone = dataclasses.replace(measured[1], reference_ms=0.0, measured_ms=0.123)
    assert relative_to_reference([alone])[0].measured_ms == 0.123
