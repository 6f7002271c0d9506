"""Transfer a fitted predictor to another device: keep its node regressors, refit the per-family correction on a
few measurements from the new device, pulled toward the host's correction so a handful of samples cannot wreck it."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from hwprune.predict.model import Predictor

TRANSFER_STRENGTH = 0.5  # prior weight in models' worth: 10 device samples outweigh it 20 to 1


def transfer(host: Predictor, samples: list[tuple[Any, float]], *, profile: str, runtime: str | None = None,
             runtime_version: str | None = None, threads: int | None = None,
             strength: float = TRANSFER_STRENGTH) -> Predictor:
    """A predictor for another device from ``host`` and ``[(onnx path or model, measured ms on the device), ...]``.

    Args:
        host: the predictor fitted on the host (its regressors are kept as they are).
        samples: whole-model measurements on the new device (a model may also be given as its node features,
            :func:`hwprune.predict.features.graph_features`).
        profile, runtime, runtime_version, threads: the new device's identity (defaults: the host's).
        strength: how strongly the correction is pulled toward the host's.

    Returns:
        The device predictor; ``transferred_from`` names the host predictor, its validation is None until one is
        measured (:func:`hwprune.predict.model.Validation.from_pairs`).
    """
    p = copy.deepcopy(host)
    p.profile = profile
    p.runtime = runtime or host.runtime
    p.runtime_version = runtime_version or host.runtime_version
    p.threads = threads if threads is not None else host.threads
    p.transferred_from = f"{host.profile} {host.runtime} {host.runtime_version} t{host.threads}"
    p.model_samples = []
    p.validation = None
    for i, (model, ms) in enumerate(samples):
        if isinstance(model, list):
            p.add_features(f"transfer-{i}", model, ms)
        else:
            p.add_model(f"transfer-{i}", model, ms)
    # the prior is the host's correction times the device's median speed ratio: a few samples then only have to
    # learn where the device differs per family, not how much slower it is overall
    ratio = float(np.median([s.measured_ms / host.corrected(s.node_sums_ms) for s in p.model_samples])) \
        if p.model_samples else 1.0
    p.prior = {k: v * ratio for k, v in host.correction.items()}
    p.correction = dict(p.prior)
    p.fit_correction(strength)
    return p


__all__ = ["transfer"]
