"""Running and timing a Relax VM, local or remote: the same ``time_evaluator`` runs on the device either way."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from hwprune.errors import MeasurementError
from hwprune.backends.base import Latency, Memory
from hwprune.profiles import DeviceProfile
from hwprune.backends.tvm.compiler import CompiledModel
from hwprune.backends.memory import graph_memory


def _ordered_args(specs: list[tuple[str, tuple[int, ...], Any]], inputs: dict[str, np.ndarray] | None,
                  label: str) -> list[np.ndarray]:
    if inputs is None:
        rng = np.random.default_rng(0)
        arrays = []
        for _, shape, dtype in specs:
            dt = np.dtype(dtype)
            if np.issubdtype(dt, np.floating):
                arrays.append(rng.standard_normal(shape).astype(dt))
            elif np.issubdtype(dt, np.integer):
                arrays.append(rng.integers(0, 10, size=shape).astype(dt))
            else:
                arrays.append(np.zeros(shape, dtype=dt))
        return arrays
    missing = [n for n, _, _ in specs if n not in inputs]
    if missing:
        raise MeasurementError(f"inputs for {label} lack {', '.join(missing)} "
                               f"(the graph takes {', '.join(n for n, _, _ in specs)})")
    return [np.ascontiguousarray(inputs[n]) for n, _, _ in specs]


def _device(session_or_tvm: Any, kind: str) -> Any:
    """The device a target kind runs on, from ``tvm`` (local) or an RPC session (remote)."""
    names = {"llvm": "cpu", "c": "cpu", "cuda": "cuda", "opencl": "cl", "vulkan": "vulkan", "metal": "metal",
             "rocm": "rocm"}
    attr = names.get(kind, "cpu")
    return getattr(session_or_tvm, attr)(0)


def _outputs(value: Any) -> list[np.ndarray]:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    out: list[np.ndarray] = []
    for v in value:
        out.extend(_outputs(v))
    return out


def _time_vm(vm: Any, dev: Any, args: list[Any], profile: DeviceProfile,
             progress: dict[str, str] | None = None) -> Latency:
    """Warm-up, then ``repeats`` on-device samples via ``time_evaluator``; noisy sets are re-taken (kept if best)."""
    m = profile.measure
    if progress is not None:
        progress["stage"] = "warm-up"
    if m.warmup > 0:
        vm.time_evaluator("main", dev, number=m.warmup, repeat=1)(*args)
    evaluator = vm.time_evaluator("main", dev, number=1, repeat=m.repeats, min_repeat_ms=int(m.min_repeat_ms))
    best: Latency | None = None
    attempts = 0
    if progress is not None:
        progress["stage"] = "timing"
    while True:
        res = evaluator(*args)
        lat = Latency.from_samples([r * 1e3 for r in res.results], warmup=m.warmup)
        if best is None or lat.robust_cv < best.robust_cv:
            best = lat
        if best.robust_cv <= m.max_cv or attempts >= m.remeasure:
            break
        attempts += 1
    best.remeasured = attempts
    best.noisy = best.robust_cv > m.max_cv
    return best


def _graph_memory(onnx_path: Path) -> Memory:
    return graph_memory(str(onnx_path))


def _load_avg() -> tuple[float, float, float] | None:
    return tuple(float(x) for x in os.getloadavg()) if hasattr(os, "getloadavg") else None  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------------
# local backend


def _extra(built: CompiledModel) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "tvm": built.info.get("tvm"), "tvm_ffi": built.info.get("tvm_ffi"), "target": built.info.get("target"),
        "compile_cached": built.cached, "library_key": built.key,
        "compile_detail": built.info.get("stage_seconds"),
    }
    if built.info.get("tuning"):
        extra["tuning"] = built.info["tuning"]
    if built.info.get("cross_compiler"):
        extra["cross_compiler"] = built.info["cross_compiler"]
    return extra
