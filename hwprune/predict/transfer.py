"""Transfer a fitted predictor to another device: keep its node regressors, refit the per-family correction on a
few measurements from the new device, pulled toward the host's correction so a handful of samples cannot wreck it.

:func:`transfer` fits from measurements a caller already has; :func:`calibrate_transfer` measures designed models on
the device through its profile's own backend (TVM RPC, ONNX Runtime over SSH, another ORT setting) and fits from
them, which is what ``hwprune calibrate --device BOARD`` runs.
"""

from __future__ import annotations

import copy
import importlib.metadata
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hwprune.errors import HwpruneError
from hwprune.predict.calibrate import VALIDATION_EVERY  # as a calibration splits
from hwprune.predict.model import Predictor, Validation

TRANSFER_STRENGTH = 0.5  # prior weight in models' worth: 10 device samples outweigh it 20 to 1
# device measurements a transfer takes by default: bench_predict's transfer to 2 threads needed 5-10 to bring most
# held-out models within +-10% on a quiet host; a few dozen leave a quarter to validate on and survive a slow spell
DEFAULT_TRANSFER_SAMPLES = 30
MIN_TRANSFER_SAMPLES = 4  # three to fit the per-family correction, one held out to validate it
# transfer designs come from another seed than a calibration's default, so the held-out device samples are designs
# the host predictor never fitted either
TRANSFER_SEED_OFFSET = 1000
DEFAULT_HOST_PROFILE = "host-cpu"  # what a board's predictor is transferred from unless --from names another


@dataclass(frozen=True)
class DeviceSample:
    """One designed model measured on the device: its name, node features and measured ms."""

    name: str
    features: list[Any]
    ms: float


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
    # a shallow copy: the node samples, regressors and fitted trees are the host's and only read; what a transfer and
    # a later update change (the samples list, the correction) are new objects (a deep copy of a 400-model host took
    # seconds per transfer)
    p = copy.copy(host)
    p.node_samples = list(host.node_samples)
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


def device_runtime(profile: Any) -> tuple[str, str]:
    """(runtime, version) a predictor of ``profile``'s backend is stored under: what a search's screen and the
    estimate backend look it up by (ORT profiles: ``ort`` and ONNX Runtime's version; TVM: the backend name and
    TVM's version; ONNX Runtime over SSH: ``ssh-ort`` and ``remote``, the board's version being the board's)."""
    backend = profile.backend
    if backend in ("ort", "estimate"):
        return "ort", _version("onnxruntime")
    if backend in ("tvm", "tvm-rpc"):
        return backend, _version("apache-tvm")
    return backend, "remote"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def measure_on_device(profile: Any, channel_multiple: int, samples: int = DEFAULT_TRANSFER_SAMPLES,
                      budget_s: float = 300.0, seed: int = 0,
                      log: Callable[[str], None] | None = None) -> list[DeviceSample]:
    """Designed models measured on ``profile``'s device through its own backend, in the order measured.

    Args:
        profile: the device profile (any backend; a remote one is measured on the board).
        channel_multiple: the host predictor's channel multiple (the node features are computed with it).
        samples: how many to measure.
        budget_s: wall seconds after which measuring stops with fewer (at least :data:`MIN_TRANSFER_SAMPLES`).
        seed: seed of the designed models (offset from a calibration's, so they are new to the host predictor).
        log: called with one progress line per sample.

    Raises:
        BackendUnavailable: the device cannot be reached.
        HwpruneError: ``samples`` is under :data:`MIN_TRANSFER_SAMPLES`, fewer designs could be measured, or the
            device failed :data:`~hwprune.predict.calibrate.MAX_FAILURES_IN_A_ROW` designs in a row.
    """
    from hwprune.backends import create_backend
    from hwprune.predict.calibrate import measure_each, target_ms
    from hwprune.predict.designs import designs
    from hwprune.predict.features import graph_features

    if samples < MIN_TRANSFER_SAMPLES:
        raise HwpruneError(f"--samples {samples}: a transfer needs at least {MIN_TRANSFER_SAMPLES} device "
                           "measurements")
    say = log or (lambda _msg: None)
    measured: list[DeviceSample] = []
    backend = create_backend(profile)
    t0 = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="hwprune-transfer-") as tmp:
            def sample(d: Any, path: Path) -> DeviceSample:
                ms = target_ms(backend.measure(path))
                return DeviceSample(d.name, graph_features(path, channel_multiple), ms)

            for d, s in measure_each(designs(50 * samples, channel_multiple, seed + TRANSFER_SEED_OFFSET), Path(tmp),
                                     sample, profile.name, say):
                measured.append(s)
                elapsed = time.monotonic() - t0
                eta = min(elapsed / len(measured) * (samples - len(measured)), max(budget_s - elapsed, 0.0))
                say(f"[{elapsed:4.0f} s, ~{eta:.0f} s left] sample {len(measured)}/{samples} {d.name}: "
                    f"{measured[-1].ms:.3f} ms on {profile.name} via {profile.backend}")
                if len(measured) >= samples or (elapsed > budget_s and len(measured) >= MIN_TRANSFER_SAMPLES):
                    break
    finally:
        backend.close()
    if len(measured) < MIN_TRANSFER_SAMPLES:
        raise HwpruneError(f"{profile.name}: only {len(measured)} designed models measured in {budget_s:g} s; a "
                           f"transfer needs {MIN_TRANSFER_SAMPLES} (raise --budget-seconds)")
    return measured


def fit_transfer(host: Predictor, measured: list[DeviceSample], profile: Any) -> Predictor:
    """:func:`transfer` of ``host`` to ``profile``'s device on ``measured``, with its validation from a transfer that
    left every fourth sample out.

    Raises:
        HwpruneError: fewer than :data:`MIN_TRANSFER_SAMPLES` samples.
    """
    if len(measured) < MIN_TRANSFER_SAMPLES:
        raise HwpruneError(f"a transfer needs at least {MIN_TRANSFER_SAMPLES} device measurements, got "
                           f"{len(measured)}")
    runtime, version = device_runtime(profile)
    ident = {"profile": profile.name, "runtime": runtime, "runtime_version": version,
             "threads": profile.ort.intra_op_threads}
    held = [s for i, s in enumerate(measured) if i % VALIDATION_EVERY == 1]
    train = [s for i, s in enumerate(measured) if i % VALIDATION_EVERY != 1]
    part = transfer(host, [(s.features, s.ms) for s in train], **ident)
    validation = Validation.from_pairs([part.predict_features(s.features) for s in held], [s.ms for s in held])
    p = transfer(host, [(s.features, s.ms) for s in measured], **ident)
    p.validation = validation
    return p


def calibrate_transfer(profile: Any, host: Predictor, samples: int = DEFAULT_TRANSFER_SAMPLES,
                       budget_s: float = 300.0, seed: int = 0,
                       log: Callable[[str], None] | None = None) -> Predictor:
    """Measure designed models on ``profile``'s device (:func:`measure_on_device`, same arguments and errors) and
    transfer ``host`` to it (:func:`fit_transfer`): what ``hwprune calibrate --device BOARD`` runs.

    Returns:
        The device predictor, its ``validation`` from the held-out device samples.
    """
    measured = measure_on_device(profile, host.channel_multiple, samples, budget_s, seed, log)
    return fit_transfer(host, measured, profile)


__all__ = ["DEFAULT_HOST_PROFILE", "DEFAULT_TRANSFER_SAMPLES", "MIN_TRANSFER_SAMPLES", "DeviceSample",
           "calibrate_transfer", "device_runtime", "fit_transfer", "measure_on_device", "transfer"]
