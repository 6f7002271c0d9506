"""ONNX -> Relax: static-shape import (with an ONNX Runtime constant-folding retry) and the passes shared by
tuning and compiling."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from hwprune.errors import MeasurementError
from hwprune.backends.tvm._util import _first_line, _tvm
from hwprune.export import graph_inputs


def graph_input_specs(onnx_model: Any) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(name, static shape, dtype) of each real graph input; dynamic dimensions are pinned to 1."""
    return graph_inputs(onnx_model)


def _ort_constant_fold(onnx_path: Path, shapes: dict[str, tuple[int, ...]]) -> Any:
    """The graph after ONNX Runtime's *basic* optimisations (constant folding with static input shapes).

    The legacy TorchScript exporter writes runtime-computed Pad amounts (TF-style "same" padding) that TVM's importer
    rejects ("Dynamic pads are not supported yet"); with the input shapes fixed, those subgraphs are constants, and the
    basic level only folds and removes nodes - it introduces no ORT-specific ops.
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    for vi in model.graph.input:
        if vi.name in shapes:
            dims = vi.type.tensor_type.shape.dim
            for d, n in zip(dims, shapes[vi.name]):
                d.Clear()
                d.dim_value = int(n)
    with tempfile.TemporaryDirectory(prefix="hwprune-fold-") as tmp:
        src = Path(tmp) / "in.onnx"
        dst = Path(tmp) / "folded.onnx"
        onnx.save(model, str(src))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(dst)
        so.log_severity_level = 3
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        return onnx.load(str(dst))


def import_onnx(onnx_path: str | os.PathLike[str]) -> Any:
    """The Relax ``IRModule`` of an ONNX file with static input shapes (weights bound as constants).

    Raises MeasurementError with one line when TVM's importer cannot take the graph.
    """
    tvm = _tvm()
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    path = Path(onnx_path)
    model = onnx.load(str(path))
    specs = graph_input_specs(model)
    shapes = {name: shape for name, shape, _ in specs}
    dtypes = {name: str(dtype) for name, _, dtype in specs}
    try:
        return from_onnx(model, shape_dict={k: list(v) for k, v in shapes.items()}, dtype_dict=dtypes)
    except Exception as first:  # noqa: BLE001 - the importer raises many types; retry once on a folded graph
        try:
            folded = _ort_constant_fold(path, shapes)
            return from_onnx(folded, shape_dict={k: list(v) for k, v in shapes.items()}, dtype_dict=dtypes)
        except Exception:  # noqa: BLE001
            pass
        hint = ""
        if "Dynamic" in str(first):
            hint = " (export the model with the dynamo exporter: export_onnx(..., exporter='dynamo'))"
        raise MeasurementError(f"TVM {tvm.__version__} cannot import {path.name}: {_first_line(first)}{hint}") from None


def _preprocess(mod: Any) -> Any:
    """Inference-time decompositions shared by the tuned and the untuned path (batch norm -> scale/shift)."""
    tvm = _tvm()
    from tvm import relax

    return tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                     relax.transform.CanonicalizeBindings()])(mod)


def _fuse_for_tasks(mod: Any, target: Any) -> Any:
    """Legalize + fuse exactly as ``compile_relax`` does, so extracted tasks match the database keys it applies."""
    tvm = _tvm()
    from tvm import relax
    from tvm.relax import pipeline as rp

    try:
        dispatch = rp.library_dispatch_passes(target)
    except (ValueError, AttributeError):
        dispatch = []
    with target:
        return tvm.transform.Sequential([
            *dispatch,
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ])(mod)


# ---------------------------------------------------------------------------------------------------------------------
# MetaSchedule
