"""What every stage of a search reads: the run's settings (:class:`RunContext`), and the checks and records made
before the first trial (the device profile, the measurement context, the package versions, request.json)."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import importlib.metadata
import json
import platform
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwprune import __version__
from hwprune.backends.base import Measurement
from hwprune.config import SearchConfig
from hwprune.errors import HwpruneError
from hwprune.profiles import DeviceProfile, load_profile
from hwprune.study.identity import Fingerprint
from hwprune.study.precision import QuantChoice
from hwprune.study.reference import MeasurePair

# module name -> distributions that install it (the first one installed is reported)
_DISTRIBUTIONS = {"torch": ("torch",), "onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "optuna": ("optuna",),
                  "torch_pruning": ("torch-pruning",), "onnx": ("onnx",), "tvm": ("apache-tvm", "tlcpack", "tvm")}


@dataclass(frozen=True)
class RunContext:
    """The settings of one search run, fixed once its backend is open; every stage after the dense model reads them."""

    config: SearchConfig
    profile: DeviceProfile
    run_dir: Path
    storage: str  # the Optuna storage URL
    exporter: str  # "torchscript" or "dynamo"
    log: Callable[[str], None]
    measure: Callable[[Path], Measurement]  # one whole measurement (counted by the Search)
    pair_measure: MeasurePair | None  # both models in alternating samples, where the backend can
    quantize: QuantChoice = QuantChoice("off", False)  # --quantize, resolved against the profile
    # ONNX Runtime's per-node profile through the backend (here, or on the board over SSH), where it has one
    node_profile: Callable[..., dict[str, Any]] | None = None

    def model_dir(self, trial: int) -> Path:
        """The folder of trial ``trial``'s exported model."""
        return self.run_dir / "models" / f"trial-{trial:04d}"


def versions() -> dict[str, str | None]:
    """Versions of the packages a run depends on, read from their installed metadata.

    Not ``__import__(mod).__version__``: importing TVM takes seconds (it imports torch on the way) and an ONNX
    Runtime search never needs it.
    """
    out: dict[str, str | None] = {"hwprune": __version__, "python": platform.python_version()}
    for mod, dists in _DISTRIBUTIONS.items():
        out[mod] = None
        for dist in dists:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                out[mod] = importlib.metadata.version(dist)
                break
    return out


def resolve_profile(config: SearchConfig) -> DeviceProfile:
    """The device profile of ``config``, with its overrides applied."""
    profile = load_profile(config.device)
    if config.profile_overrides:
        profile = profile.with_overrides(**config.profile_overrides)
    if config.channel_multiple:
        profile = profile.with_overrides(channel_multiple=config.channel_multiple)
    return profile


def measurement_context(profile: DeviceProfile, exporter: str) -> str:
    """A short hash of what a latency depends on besides the architecture: the device and how it is measured (backend,
    hardware, runtime settings, board key or host), the runtime versions and the exporter. Cached measurements are
    reused only under the same context, so a resumed or nightly search after an upgrade measures again."""
    p = profile.to_dict()
    key = {k: p[k] for k in ("backend", "hardware", "ort", "tvm", "measure")}
    key["rpc_key"], key["ssh_host"] = p["rpc"].get("key"), p["ssh"].get("host")
    key["tvm"] = {k: v for k, v in key["tvm"].items() if k != "tuning_db"}
    v = versions()
    key["versions"] = {m: v.get(m) for m in ("onnxruntime", "tvm", "onnx", "torch")}
    key["exporter"] = exporter
    key["ratios"] = "alternating samples"  # how ratios to the dense model are taken (whole measurements before)
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def check_rankable(profile: DeviceProfile, config: SearchConfig) -> None:
    """Refuse latencies that rank nothing a user would deploy, unless asked for explicitly.

    Raises:
        HwpruneError: estimated latency without ``allow_estimate``, untuned TVM without ``allow_untuned``.
    """
    if profile.backend == "estimate" and not config.allow_estimate:
        raise HwpruneError(f"profile {profile.name} uses estimated latency; pass --allow-estimate to search on "
                           "roofline estimates (they are labelled 'estimated' in every output)")
    if profile.backend in ("tvm", "tvm-rpc") and profile.tvm.tuning_trials == 0 and not config.allow_untuned:
        raise HwpruneError(
            f"profile {profile.name} measures with untuned TVM, which runs 20-50x slower than tuned kernels and ranks "
            "candidates wrongly; set tvm.tuning_trials in the profile (e.g. --tuning-trials 64) or pass "
            "--allow-untuned to search on untuned numbers anyway")


def write_request(config: SearchConfig, profile: DeviceProfile, storage: str, exporter: str,
                  fingerprint: Fingerprint, run_dir: Path, quantize: QuantChoice | None = None) -> dict[str, Any]:
    """Write request.json (what was asked, as the search starts) and return it; later stages add the resolved
    budgets, the importance, the sampler and the dense latency sets to the summary's copy."""
    from hwprune.export import atomic_write_text

    c = config
    request = {
        "model": str(c.model) if isinstance(c.model, str) else getattr(c.model, "__name__", "model"),
        "device": profile.name,
        "profile": profile.to_dict(),
        "backend": profile.backend,
        "latency_budget": str(c.latency_budget_ms) if c.latency_budget_ms else None,
        "memory_budget": str(c.memory_budget_mb) if c.memory_budget_mb else None,
        "trials": c.trials, "timeout_s": c.timeout_s, "seed": c.seed,
        "study": c.study_name, "storage": storage,
        "sampler": c.sampler, "max_ratio": c.max_ratio, "depth": c.depth,
        "channel_multiple": profile.channel_multiple,
        "exporter": exporter,
        "finetune": {"trial_steps": c.trial_finetune_steps, "final_steps": c.final_finetune_steps,
                     "final_candidates": c.final_candidates},
        "calibration_batches": c.calibration_batches,
        **({"quantize": quantize.mode} if quantize is not None and quantize.on else {}),
        "max_accuracy_drop": str(c.max_accuracy_drop) if c.max_accuracy_drop else "off",
        "recovery": c.recovery,
        "data": str(c.data) if c.data else None,
        "fingerprint": fingerprint.to_dict(),
        "tune_final_trials": c.tune_final_trials,
        "command": c.command or " ".join(shlex.quote(a) for a in sys.argv),
        "versions": versions(),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(run_dir / "request.json", json.dumps(request, indent=2))
    return request


def fmt(value: float | None, unit: str) -> str:
    """A budget for messages: ``"none"`` or the value with its unit."""
    return "none" if value is None else f"{value:.3f} {unit}"
