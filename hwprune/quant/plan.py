"""Which weighted nodes run in INT8: a precision per *unit*, a unit being one layer or one coupled channel group.

The torchscript exporter names a node after the scopes of the modules that emitted it (``/layer1/layer1.0/conv1/Conv``;
a scope restarts at each attribute and accumulates over indexed children: ``/features/features.1/block/block.0/Conv``
is module ``features.1.block.0``), so a layer is a qualified module name and its weighted nodes; a coupled group of the
pruning space (:class:`hwprune.pruning.space.GroupSpec`) is the layers among its ``members`` (the layers whose output
width the group sets, so each layer belongs to at most one group). Weighted layers in no group (the classifier, skipped
groups) stay units of their own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwprune.backends.memory import load_model
from hwprune.quant.base import FP32, INT8, PRECISIONS, QuantizationError, precision_label

# ops ORT quantizes with INT8 weights: the ones a precision choice is about (others follow their neighbours)
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class WeightedNode:
    """A node with weights: its ONNX name, op type and the module (qualified name) the exporter emitted it from."""

    name: str
    op_type: str
    module: str


def module_of(node_name: str) -> str:
    """The qualified module name in a torchscript-exported node name (``""`` for a node of the top module).

    ``/stem/stem.0/Conv`` -> ``stem.0``; ``/features/features.1/block/block.0/block.0.0/Conv`` ->
    ``features.1.block.0.0`` (a scope that extends the previous one by ``.<index>`` is an indexed child of it).
    """
    qualified, prev = "", ""
    for comp in node_name.split("/")[1:-1]:
        if prev and comp.startswith(prev + "."):
            qualified += comp[len(prev):]
        else:
            qualified = f"{qualified}.{comp}" if qualified else comp
        prev = comp
    return qualified


def weighted_nodes(onnx_model: Any) -> list[WeightedNode]:
    """The weighted nodes of a graph (a path or a proto), in file order."""
    graph = load_model(onnx_model).graph
    return [WeightedNode(n.name, n.op_type, module_of(n.name)) for n in graph.node
            if n.op_type in WEIGHTED_OPS and n.domain in ("", "ai.onnx")]


def layer_units(nodes: Iterable[WeightedNode]) -> dict[str, tuple[str, ...]]:
    """One unit per module (nodes without a module are a unit each, named after the node)."""
    units: dict[str, list[str]] = {}
    for n in nodes:
        units.setdefault(n.module or n.name, []).append(n.name)
    return {k: tuple(v) for k, v in units.items()}


def group_units(nodes: Iterable[WeightedNode], groups: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """One unit per coupled group (``{knob name: GroupSpec or member names}``), plus one per layer in no group."""
    owner: dict[str, str] = {}
    for name, spec in groups.items():
        for member in getattr(spec, "members", spec):
            owner.setdefault(member, name)
    units: dict[str, list[str]] = {}
    for unit, names in layer_units(nodes).items():
        units.setdefault(owner.get(unit, unit), []).extend(names)
    return {k: tuple(v) for k, v in units.items()}


@dataclass(frozen=True)
class PrecisionPlan:
    """A precision per unit, and the units' nodes: what :func:`hwprune.quant.quantize.quantize` is asked to make."""

    units: Mapping[str, tuple[str, ...]]
    choice: Mapping[str, str]

    def __post_init__(self) -> None:
        unknown = sorted(set(self.choice) - set(self.units))
        if unknown:
            raise QuantizationError(f"precision plan: unknown unit {unknown[0]!r} (known: {', '.join(self.units)})")
        bad = sorted(v for v in self.choice.values() if v not in PRECISIONS)
        if bad:
            raise QuantizationError(f"precision plan: {bad[0]!r} is not one of {', '.join(PRECISIONS)}")

    @classmethod
    def uniform(cls, units: Mapping[str, tuple[str, ...]], precision: str) -> PrecisionPlan:
        return cls(units, {u: precision for u in units})

    @classmethod
    def only(cls, units: Mapping[str, tuple[str, ...]], int8_units: Iterable[str]) -> PrecisionPlan:
        chosen = set(int8_units)
        unknown = sorted(chosen - set(units))
        if unknown:
            raise QuantizationError(f"precision plan: unknown unit {unknown[0]!r} (known: {', '.join(units)})")
        return cls(units, {u: INT8 if u in chosen else FP32 for u in units})

    def unit_precision(self, unit: str) -> str:
        return self.choice.get(unit, FP32)

    @property
    def node_precision(self) -> dict[str, str]:
        return {n: self.unit_precision(u) for u, nodes in self.units.items() for n in nodes}

    @property
    def int8_nodes(self) -> list[str]:
        return [n for n, p in self.node_precision.items() if p == INT8]

    @property
    def fp32_nodes(self) -> list[str]:
        return [n for n, p in self.node_precision.items() if p == FP32]

    @property
    def label(self) -> str:
        return precision_label(self.node_precision)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "units": {u: {"precision": self.unit_precision(u), "nodes": list(n)}
                                               for u, n in self.units.items()}}


def plan_for(onnx_path: str | Path, int8_units: Iterable[str] | None = None, *,
             groups: Mapping[str, Any] | None = None) -> PrecisionPlan:
    """A plan over the graph's layers (or ``groups``' units): ``int8_units`` in INT8 (all when None), the rest FP32."""
    nodes = weighted_nodes(onnx_path)
    units = group_units(nodes, groups) if groups is not None else layer_units(nodes)
    return PrecisionPlan.uniform(units, INT8) if int8_units is None else PrecisionPlan.only(units, int8_units)
