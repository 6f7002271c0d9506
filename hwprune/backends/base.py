"""What every measurement backend returns, and the small protocol each one implements.

The search never imports a backend: it receives a measuring function built by :func:`hwprune.backends.create_backend`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass
class Latency:
    """Per-inference wall time in milliseconds over ``repeats`` timed runs (after ``warmup`` untimed ones)."""

    median_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    std_ms: float
    repeats: int
    warmup: int
    cpu_median_ms: float | None = None  # thread CPU time; stable under load from other processes
    noisy: bool = False  # robust spread stayed above the profile's max_cv after re-measuring
    remeasured: int = 0
    mad_ms: float = 0.0  # median absolute deviation

    @property
    def cv(self) -> float:
        """Coefficient of variation (std / mean): reported, but one preempted run on a shared host inflates it."""
        return self.std_ms / self.mean_ms if self.mean_ms > 0 else 0.0

    @property
    def robust_cv(self) -> float:
        """1.4826 * MAD / median: equals the CV for Gaussian noise, but ignores the rare run another process
        preempted. This is what decides whether a measurement is noisy."""
        return 1.4826 * self.mad_ms / self.median_ms if self.median_ms > 0 else 0.0

    @classmethod
    def from_samples(cls, samples_ms: list[float] | np.ndarray, *, warmup: int,
                     cpu_samples_ms: list[float] | np.ndarray | None = None) -> "Latency":
        s = np.asarray(samples_ms, dtype=float)
        return cls(
            median_ms=float(np.median(s)),
            p90_ms=float(np.percentile(s, 90)),
            min_ms=float(s.min()),
            mean_ms=float(s.mean()),
            std_ms=float(s.std(ddof=1)) if s.size > 1 else 0.0,
            repeats=int(s.size),
            warmup=warmup,
            cpu_median_ms=(float(np.median(cpu_samples_ms))
                           if cpu_samples_ms is not None and len(cpu_samples_ms) else None),
            mad_ms=float(np.median(np.abs(s - np.median(s)))),
        )


@dataclass
class Memory:
    """Inference memory in MB (10^6 bytes).

    ``weights_mb`` is the size of the graph's initializers; ``peak_activations_mb`` the largest sum of live
    intermediate tensors over a topological execution of the graph (inputs and outputs included, weights not);
    ``total_mb`` is their sum, the figure budgets are checked against. ``process_peak_mb`` is the measured growth
    of the measuring process's resident set while loading and running the model, when a backend can observe it.
    """

    weights_mb: float
    peak_activations_mb: float
    process_peak_mb: float | None = None

    @property
    def total_mb(self) -> float:
        return self.weights_mb + self.peak_activations_mb


@dataclass
class Measurement:
    """One model measured on one device by one backend."""

    backend: str  # ort | tvm | tvm-rpc | ssh-ort | estimate
    device: str  # profile name
    latency: Latency
    memory: Memory
    threads: int | None = None
    estimated: bool = False  # True only for the "estimate" backend: never a measured number
    tuned: bool | None = None  # TVM: whether kernels were MetaSchedule-tuned; None for other backends
    load_avg: tuple[float, float, float] | None = None  # 1/5/15-min load average of the measuring host
    stage_seconds: dict[str, float] = field(default_factory=dict)  # e.g. session / compile / upload / timing
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["latency"]["cv"] = self.latency.cv
        d["latency"]["robust_cv"] = self.latency.robust_cv
        d["memory"]["total_mb"] = self.memory.total_mb
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Measurement":
        d = dict(d)
        lat = {k: v for k, v in d.pop("latency").items() if k not in ("cv", "robust_cv")}
        mem = {k: v for k, v in d.pop("memory").items() if k != "total_mb"}
        if d.get("load_avg") is not None:
            d["load_avg"] = tuple(d["load_avg"])
        return cls(latency=Latency(**lat), memory=Memory(**mem), **d)


EXPORTER_TORCHSCRIPT = "torchscript"
EXPORTER_DYNAMO = "dynamo"


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond ``measure``/``run``, read by callers instead of testing backend names.

    Attributes:
        beside: it has ``measure_beside(onnx_path, reference)``: two models timed in alternating samples.
        node_profile: ONNX Runtime's per-node profiler describes what it runs (the report's "Where the time goes").
        exporter: the ONNX exporter its importer takes best (TVM's importer rejects the TorchScript exporter's
            dynamic pads; ONNX Runtime takes either).
        settings: the device-profile sections it reads (``ort``, ``tvm``, ``rpc``, ``ssh``), as the report shows them.
    """

    beside: bool = False
    node_profile: bool = False
    exporter: str = EXPORTER_TORCHSCRIPT
    settings: tuple[str, ...] = ()


@runtime_checkable
class Backend(Protocol):
    """A way to run and time ONNX models on a device. One candidate at a time per device.

    A backend whose ``capabilities.beside`` is true also offers ``measure_beside(onnx_path, reference) ->
    (Measurement, Measurement, ratios)``: both models timed in alternating samples, and the per-pair latency ratios
    (:meth:`OrtBackend.measure_beside`). The search then takes latency ratios to the dense model from it; without it,
    from alternating whole measurements.
    """

    name: str
    capabilities: Capabilities

    def measure(self, onnx_path: Path, inputs: dict[str, np.ndarray] | None = None) -> Measurement:
        """Time the model (inputs default to random data of the graph's input shapes)."""
        ...

    def run(self, onnx_path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the model once and return its outputs (used to check a backend against ONNX Runtime)."""
        ...

    def close(self) -> None:
        """Release sessions, RPC connections and remote files."""
        ...
