"""Inference memory of an ONNX graph, computed from the graph alone (no runtime needed).

Definition (the figures budgets are checked against):

* **weights** = bytes of the graph's initializers (plus tensors held by ``Constant`` nodes, which are weights in all
  but name), computed from their declared shapes and element types, so external-data files need not be read. INT8
  weights count one byte each. In a quantized (QDQ) graph the FP32 outputs of ``DequantizeLinear`` nodes that read a
  weight are weights too, counted once at their stored size: ONNX Runtime fuses them into integer kernels
  (QLinearConv, ...) and never holds them as FP32 tensors.
* **peak activations** = ONNX shape inference is run (symbolic or unknown dims count as 1); nodes are walked in
  file order, which ONNX requires to be topological. A tensor is live from the step of the node that produces it
  through the step of its last consumer; graph inputs are live from the first step and graph outputs to the last.
  While node *i* runs, its inputs and outputs are live together. The peak is the largest sum of the bytes of live
  tensors over all steps; initializers and constants are excluded (they are weights). Tensors whose shape cannot
  be inferred count as 0 bytes (they are reported in :func:`activation_timeline`'s ``unknown``).

This is the footprint of a simple executor that frees each tensor after its last use and does no in-place reuse,
so it is an upper bound on what a memory-planning runtime such as ONNX Runtime needs, and does not depend on it.
MB means 10^6 bytes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hwprune.backends.base import Memory

MB = 1e6

# Element sizes of the low-precision types (ONNX packs sub-byte types; numpy's storage types would overstate them).
_ODD_SIZES = {16: 2.0, 17: 1.0, 18: 1.0, 19: 1.0, 20: 1.0, 21: 0.5, 22: 0.5, 23: 0.5, 24: 1.0, 25: 0.25, 26: 0.25,
              27: 0.75, 28: 0.75}


def load_model(onnx_path_or_model: Any) -> Any:
    """An ``onnx.ModelProto`` from a path or a proto (external weights are not read: only their shapes matter)."""
    import onnx

    if isinstance(onnx_path_or_model, onnx.ModelProto):
        return onnx_path_or_model
    return onnx.load(os.fspath(onnx_path_or_model), load_external_data=False)


def elem_size(elem_type: int) -> float:
    """Bytes per element of an ONNX ``TensorProto`` element type (0 for strings and unknown types)."""
    from onnx import TensorProto, helper

    if elem_type in _ODD_SIZES:
        return _ODD_SIZES[elem_type]
    if elem_type in (TensorProto.UNDEFINED, TensorProto.STRING):
        return 0.0
    try:
        return float(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return 0.0


@dataclass
class TensorInfo:
    """Shape (dynamic dims as 1) and element size of one tensor in a graph."""

    shape: tuple[int, ...]
    itemsize: float

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return int(math.ceil(self.numel * self.itemsize))


def _value_info(vi: Any) -> TensorInfo | None:
    if not vi.type.HasField("tensor_type"):
        return None
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim)
    return TensorInfo(dims, elem_size(tt.elem_type))


def tensor_infos(onnx_path_or_model: Any) -> tuple[Any, dict[str, TensorInfo]]:
    """Run shape inference; return the inferred model and the shape/element size of every tensor it could type.

    Initializers are included (from their declared dims). Shape inference failing outright leaves only what the
    file itself declares.
    """
    import onnx

    model = load_model(onnx_path_or_model)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - an unusual op must not make memory unmeasurable; fall back to what is declared
        inferred = model
    infos: dict[str, TensorInfo] = {}
    g = inferred.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        info = _value_info(vi)
        if info is not None:
            infos[vi.name] = info
    for t in g.initializer:
        infos[t.name] = TensorInfo(tuple(int(d) for d in t.dims), elem_size(t.data_type))
    return inferred, infos


def _constant_bytes(node: Any) -> int:
    from onnx import numpy_helper

    for attr in node.attribute:
        if attr.name == "value" and attr.HasField("t"):
            t = attr.t
            return int(math.ceil(math.prod(t.dims) * elem_size(t.data_type)))
        if attr.name == "sparse_value":
            return int(numpy_helper.to_array(attr.sparse_tensor.values).nbytes)
        if attr.name in ("value_floats", "value_ints"):
            return 4 * len(attr.floats) if attr.name == "value_floats" else 8 * len(attr.ints)
        if attr.name in ("value_float", "value_int"):
            return 4 if attr.name == "value_float" else 8
    return 0


def _subgraph_inputs(node: Any) -> set[str]:
    """Names a control-flow node's subgraphs read from the enclosing scope (they keep those tensors alive)."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for sub in graphs:
            local = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            for n in sub.node:
                local.update(n.output)
            for n in sub.node:
                names.update(x for x in n.input if x and x not in local)
                names.update(x for x in _subgraph_inputs(n) if x not in local)
    return names


@dataclass
class Timeline:
    """Live activation bytes per node step, as defined in this module's docstring."""

    weights_bytes: int
    live_bytes: list[int]  # at each node step
    peak_bytes: int
    peak_step: int  # index of the node at the peak (-1 for a graph without nodes)
    unknown: list[str] = field(default_factory=list)  # activations whose shape inference could not determine


def activation_timeline(onnx_path_or_model: Any) -> Timeline:
    """The liveness walk behind :func:`graph_memory`, step by step (useful to see which node sets the peak)."""
    model, infos = tensor_infos(onnx_path_or_model)
    g = model.graph
    weights = {t.name for t in g.initializer}
    weights_bytes = sum(infos[t.name].nbytes for t in g.initializer)
    nodes = list(g.node)
    for n in nodes:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            weights.update(n.output)
            weights_bytes += _constant_bytes(n)
        elif n.op_type == "DequantizeLinear" and n.input and n.input[0] in weights:
            weights.update(n.output)  # a dequantized weight: already counted at its stored (INT8) size

    last = len(nodes) - 1
    birth: dict[str, int] = {}
    death: dict[str, int] = {}
    for vi in g.input:
        if vi.name not in weights:
            birth[vi.name] = 0
            death[vi.name] = 0
    for i, n in enumerate(nodes):
        for name in [*n.input, *_subgraph_inputs(n)]:
            if name and name in birth:
                death[name] = max(death[name], i)
        for name in n.output:
            if name and name not in weights:
                birth[name] = i
                death[name] = i
    for vi in g.output:
        if vi.name in birth:
            death[vi.name] = max(last, 0)

    unknown = sorted(name for name in birth if name not in infos)
    size = {name: (infos[name].nbytes if name in infos else 0) for name in birth}
    if not nodes:
        total = sum(size.values())
        return Timeline(weights_bytes, [], total, -1, unknown)
    # Difference array: +bytes at birth, -bytes after death; a prefix sum gives the live total at each step.
    delta = [0] * (len(nodes) + 1)
    for name, b in birth.items():
        delta[b] += size[name]
        delta[death[name] + 1] -= size[name]
    live: list[int] = []
    running = 0
    for i in range(len(nodes)):
        running += delta[i]
        live.append(running)
    peak_step = int(np.argmax(live))
    return Timeline(weights_bytes, live, live[peak_step], peak_step, unknown)


def graph_memory(onnx_path_or_model: Any) -> Memory:
    """Weights and peak live activations of an ONNX graph in MB (10^6 bytes); see the module docstring."""
    t = activation_timeline(onnx_path_or_model)
    return Memory(weights_mb=t.weights_bytes / MB, peak_activations_mb=t.peak_bytes / MB)


__all__ = ["MB", "TensorInfo", "Timeline", "activation_timeline", "elem_size", "graph_memory", "load_model",
           "tensor_infos"]
