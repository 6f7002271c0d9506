"""Latency estimates for when the user asks for one and no device is at hand: a fitted predictor when
``hwprune calibrate`` (or a transfer) stored one for the profile (:mod:`hwprune.predict`), else a roofline.

The roofline, the last resort:

Per node: compute time = 2 x MACs / peak FLOP/s, memory time = bytes moved / memory bandwidth; the node takes the
larger of the two, and the model the sum over nodes. Only Conv, ConvTranspose, Gemm and MatMul count MACs (the rest is
treated as memory-bound). Bytes moved = every input (weights included) read once plus every output written once.
The figures come from ``profile.hardware`` and are always labelled ``estimated``: they ignore kernel efficiency,
caches, SIMD alignment and threads, the very effects hwprune exists to measure.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from hwprune.errors import BackendUnavailable
from hwprune.backends.base import Capabilities, Latency, Measurement
from hwprune.backends.memory import TensorInfo, graph_memory, load_model, tensor_infos
from hwprune.profiles import DeviceProfile, load_profile


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def node_macs(node: Any, infos: dict[str, TensorInfo]) -> int:
    """Multiply-accumulates of one node from inferred shapes (0 for ops that are not Conv/Gemm/MatMul)."""
    def info(i: int, outputs: bool = False) -> TensorInfo | None:
        names = node.output if outputs else node.input
        return infos.get(names[i]) if len(names) > i and names[i] else None

    op = node.op_type
    out = info(0, outputs=True)
    if op == "Conv":
        w = info(1)
        if out is None or w is None or len(w.shape) < 2:
            return 0
        # each output element sums over Cin/group x kernel window
        return out.numel * math.prod(w.shape[1:])
    if op == "ConvTranspose":
        x, w = info(0), info(1)
        if x is None or w is None or len(w.shape) < 2:
            return 0
        # each input element scatters into Cout/group x kernel window outputs
        return x.numel * math.prod(w.shape[1:])
    if op == "Gemm":
        a = info(0)
        if out is None or a is None or len(a.shape) != 2:
            return 0
        k = a.shape[0] if _attr(node, "transA", 0) else a.shape[1]
        return out.numel * k
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul"):
        a = info(0)
        if out is None or a is None or not a.shape:
            return 0
        return out.numel * a.shape[-1]
    return 0


def node_bytes(node: Any, infos: dict[str, TensorInfo]) -> int:
    """Bytes a node reads (all inputs, weights included) and writes (all outputs)."""
    names = [n for n in [*node.input, *node.output] if n]
    return sum(infos[n].nbytes for n in names if n in infos)


def roofline(onnx_path_or_model: Any, profile: DeviceProfile) -> dict[str, Any]:
    """Estimated latency in ms with its totals: ``{"latency_ms", "macs", "bytes", "nodes": [...]}``."""
    model, infos = tensor_infos(onnx_path_or_model)
    hw = profile.hardware
    flops_per_s = hw.peak_gflops * 1e9
    bytes_per_s = hw.memory_bandwidth_gbs * 1e9
    total_s = 0.0
    macs_total = 0
    bytes_total = 0
    per_node = []
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        macs = node_macs(node, infos)
        moved = node_bytes(node, infos)
        compute_s = 2.0 * macs / flops_per_s if flops_per_s > 0 else 0.0
        memory_s = moved / bytes_per_s if bytes_per_s > 0 else 0.0
        t = max(compute_s, memory_s)
        total_s += t
        macs_total += macs
        bytes_total += moved
        per_node.append({"name": node.name, "op_type": node.op_type, "macs": macs, "bytes": moved,
                         "estimate_us": t * 1e6, "bound": "compute" if compute_s >= memory_s else "memory"})
    return {"latency_ms": total_s * 1e3, "macs": macs_total, "bytes": bytes_total, "nodes": per_node}


def _find_predictor(profile: DeviceProfile) -> Any:
    """The stored fitted predictor for the profile and its ORT threads, or None."""
    from hwprune.predict import store

    try:
        import onnxruntime

        version = onnxruntime.__version__
    except ImportError:
        version = None
    return store.find(profile.name, profile.ort.intra_op_threads, version)


class EstimateBackend:
    """A fitted predictor's estimate, else a roofline from ``profile.hardware``; never a measurement
    (``estimated=True`` everywhere, ``extra["predictor"]`` says which and how wrong it is expected to be)."""

    name = "estimate"
    capabilities = Capabilities()

    def __init__(self, profile: DeviceProfile | str, predictor: Any = None) -> None:
        self.profile = load_profile(profile)
        self.predictor = predictor if predictor is not None else _find_predictor(self.profile)
        # a stored predictor an older hwprune wrote, which find passed over: the label names it (read once here,
        # not per estimate, since a search estimates every candidate)
        self.stale: Path | None = None
        if self.predictor is None:
            from hwprune.predict import store

            self.stale = next(iter(store.stale(self.profile.name, self.profile.ort.intra_op_threads)), None)

    def measure(self, onnx_path: str | os.PathLike[str] | Any,
                inputs: dict[str, np.ndarray] | None = None) -> Measurement:
        """Estimate latency (fitted predictor, else roofline) and compute memory from the graph; ``inputs`` are
        ignored (shapes come from the graph)."""
        model = load_model(onnx_path)
        est = roofline(model, self.profile)
        ms = est["latency_ms"]
        predictor = {"kind": "roofline", "within_10pct": None, "within_25pct": None, "median_abs_error": None,
                     "fitted_on": 0}
        if self.predictor is not None:
            ms = self.predictor.predict_ms(model)
            predictor = self.predictor.describe()
        elif self.stale is not None:
            predictor["stale"] = str(self.stale)
        latency = Latency(median_ms=ms, p90_ms=ms, min_ms=ms, mean_ms=ms, std_ms=0.0, repeats=0, warmup=0,
                          cpu_median_ms=None, noisy=False, remeasured=0)
        hw = self.profile.hardware
        return Measurement(
            backend=self.name,
            device=self.profile.name,
            latency=latency,
            memory=graph_memory(model),
            threads=None,
            estimated=True,
            tuned=None,
            load_avg=None,
            stage_seconds={},
            extra={"method": predictor["kind"], "predictor": predictor, "roofline_ms": est["latency_ms"],
                   "macs": est["macs"], "bytes_moved": est["bytes"],
                   "peak_gflops": hw.peak_gflops, "memory_bandwidth_gbs": hw.memory_bandwidth_gbs},
        )

    def run(self, onnx_path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The estimate backend computes nothing; check models with the ``ort`` backend instead."""
        raise BackendUnavailable("the estimate backend only estimates latency; it cannot run a model (use 'ort')")

    def close(self) -> None:
        """Nothing is held."""


__all__ = ["EstimateBackend", "node_bytes", "node_macs", "roofline"]
