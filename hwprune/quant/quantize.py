"""Quantize an exported ONNX file with ONNX Runtime: static QDQ with per-channel INT8 weights for the nodes a
:class:`PrecisionPlan` puts in INT8, or dynamic (INT8 weights of MatMul/Gemm, activations quantized at run time).

The precision recorded is read back from the written file, not assumed from the plan: a node ORT left in FP32 is
recorded FP32 (with a note). Files are written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from hwprune.backends.memory import graph_memory, load_model
from hwprune.export import _tmp_path
from hwprune.quant.base import FP32, INT8, QuantizationError, QuantizedModel
from hwprune.quant.calibration import CalibrationSet, FeedReader
from hwprune.quant.plan import PrecisionPlan

MODES = ("static", "dynamic")
DEFAULT_MODE = "static"
DEFAULT_CALIBRATION = "MinMax"  # ORT's default; Entropy/Percentile cost 10x the calibration time on small CNNs
DYNAMIC_OPS = ("MatMul", "Gemm")  # dynamic ConvInteger runs slower than FP32 Conv in ORT's CPU provider
_INT8_TYPES = (2, 3)  # TensorProto.UINT8, INT8


def _quant() -> Any:
    try:
        import onnxruntime.quantization as q
    except ImportError as exc:  # pragma: no cover - onnxruntime is a dependency
        raise QuantizationError(f"INT8 quantization needs onnxruntime.quantization ({exc})") from None
    return q


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _preprocessed(source: Path, tmp: Path, wanted: list[str]) -> Path:
    """ORT's recommended pre-processing (shape inference, graph optimisation), kept only if every planned node
    survives under its name (an optimisation that fused one would make the plan's exclusions miss)."""
    q = _quant()
    try:
        q.quant_pre_process(str(source), str(tmp), skip_symbolic_shape=True)
    except Exception:  # noqa: BLE001 - pre-processing is an optimisation; the original quantizes too
        return source
    names = {n.name for n in load_model(tmp).graph.node}
    return tmp if all(w in names for w in wanted) else source


def read_precision(path: str | Path, nodes: list[str], mode: str) -> dict[str, str]:
    """The precision each of ``nodes`` has in the quantized file: INT8 when its weight input is dequantized from an
    INT8 initializer (static QDQ), or when the node was replaced by an integer op (dynamic); else FP32."""
    graph = load_model(path).graph
    int8_inits = {t.name for t in graph.initializer if t.data_type in _INT8_TYPES}
    dq_int8 = {o for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8_inits
               for o in n.output}
    by_name = {n.name: n for n in graph.node}
    result: dict[str, str] = {}
    for name in nodes:
        node = by_name.get(name)
        if node is None:  # dynamic quantization replaces the node (MatMulInteger, DynamicQuantizeMatMul, ...)
            result[name] = INT8 if mode == "dynamic" and any(n.startswith(name) for n in by_name) else FP32
        else:
            result[name] = INT8 if any(i in dq_int8 for i in node.input[1:]) else FP32
    return result


def quantize(source: str | Path, out: str | Path, plan: PrecisionPlan, calibration: CalibrationSet | None = None,
             *, mode: str = DEFAULT_MODE, calibrate_method: str = DEFAULT_CALIBRATION,
             reduce_range: bool = False) -> QuantizedModel:
    """Write ``out``: ``source`` with ``plan``'s INT8 nodes quantized (``mode`` static needs ``calibration``).

    ``reduce_range`` quantizes weights to 7 bits: what x86 CPUs without VNNI need, where ORT's u8 x s8 kernels sum
    pairs of products in 16 bits and saturate on full-range weights (:func:`hwprune.quant.device.reduce_range`).

    A plan without INT8 nodes writes nothing and returns a record of ``source`` itself (mode ``none``).

    Raises:
        QuantizationError: unknown mode, no calibration for static, or ORT failing to quantize (its reason).
    """
    source, out = Path(source), Path(out)
    if mode not in MODES:
        raise QuantizationError(f"unknown quantization mode {mode!r}; choose {' or '.join(MODES)}")
    fp32_bytes = int(round(graph_memory(source).weights_mb * 1e6))
    if not plan.int8_nodes:
        return QuantizedModel(source, source, "none", plan.node_precision, None, fp32_bytes, fp32_bytes,
                              source.stat().st_size)
    if mode == "static" and (calibration is None or not calibration.calibrate):
        raise QuantizationError("static INT8 quantization needs calibration inputs (none were given)")
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    pre, tmp = _tmp_path(out.with_name(out.name + ".pre")), _tmp_path(out)
    try:
        model_in = _preprocessed(source, pre, list(plan.node_precision))
        _run_ort(model_in, tmp, plan, calibration, mode, calibrate_method, reduce_range)
        os.replace(tmp, out)
    finally:
        for p in (pre, tmp):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    precision = read_precision(out, list(plan.node_precision), mode)
    missed = [n for n in plan.int8_nodes if precision[n] == FP32]
    notes = (f"ORT left {len(missed)} planned INT8 node(s) in FP32: {', '.join(missed[:3])}",) if missed else ()
    record = calibration.record(calibrate_method if mode == "static" else "none") if calibration else None
    weight_bytes = int(round(graph_memory(out).weights_mb * 1e6))
    return QuantizedModel(out, source, mode, precision, record, weight_bytes, fp32_bytes, out.stat().st_size,
                          time.perf_counter() - start, notes, reduce_range)


def _run_ort(model_in: Path, tmp: Path, plan: PrecisionPlan, calibration: CalibrationSet | None, mode: str,
             calibrate_method: str, reduce_range: bool) -> None:
    q = _quant()
    try:
        if mode == "static":
            assert calibration is not None
            q.quantize_static(
                str(model_in), str(tmp), FeedReader(calibration.calibrate), quant_format=q.QuantFormat.QDQ,
                per_channel=True, activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
                nodes_to_exclude=plan.fp32_nodes, calibrate_method=getattr(q.CalibrationMethod, calibrate_method),
                reduce_range=reduce_range, extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        else:
            q.quantize_dynamic(str(model_in), str(tmp), weight_type=q.QuantType.QInt8, per_channel=False,
                               reduce_range=reduce_range,
                               op_types_to_quantize=list(DYNAMIC_OPS), nodes_to_exclude=plan.fp32_nodes)
    except QuantizationError:
        raise
    except Exception as exc:  # noqa: BLE001 - ORT's quantizer raises many types; the candidate fails with the reason
        raise QuantizationError(f"ONNX Runtime could not quantize {model_in.name} ({mode}): {_first_line(exc)}") \
            from None
