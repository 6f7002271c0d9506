"""Graph memory (weights + peak live activations) and the roofline estimate, checked by hand on tiny graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from hwprune.export import export_onnx
from hwprune.backends.estimate import EstimateBackend, node_macs, roofline
from hwprune.backends.memory import activation_timeline, graph_memory, tensor_infos
from hwprune.profiles import load_profile


def _init(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.zeros(shape, dtype=np.float32), name)


def residual_graph(batch: int | str = 1) -> onnx.ModelProto:
    """X[1,100] -> MatMul W1[100,50] -> A -> Relu -> B -> MatMul W2[50,100] -> C -> Add(X, C) -> D (output).

    Bytes (float32): X 400, A 200, B 200, C 400, D 400; W1 = W2 = 20000.
    Live per step: 0: X+A = 600; 1: X+A+B = 800; 2: X+B+C = 1000; 3: X+C+D = 1200 (X is kept alive by the Add).
    """
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["A"], name="mm1"),
        helper.make_node("Relu", ["A"], ["B"], name="relu"),
        helper.make_node("MatMul", ["B", "W2"], ["C"], name="mm2"),
        helper.make_node("Add", ["X", "C"], ["D"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "residual",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, 100])],
        [helper.make_tensor_value_info("D", TensorProto.FLOAT, [batch, 100])],
        [_init("W1", (100, 50)), _init("W2", (50, 100))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_hand_checked_residual_graph(tmp_path: Path) -> None:
    model = residual_graph()
    t = activation_timeline(model)
    assert t.live_bytes == [600, 800, 1000, 1200]
    assert t.peak_bytes == 1200 and t.peak_step == 3
    assert t.weights_bytes == 40000 and t.unknown == []
    path = tmp_path / "r.onnx"
    onnx.save(model, str(path))
    mem = graph_memory(path)
    assert mem.weights_mb == pytest.approx(0.04)
    assert mem.peak_activations_mb == pytest.approx(0.0012)
    assert mem.total_mb == pytest.approx(0.0412)
    assert mem.process_peak_mb is None


def test_dynamic_batch_counts_as_one() -> None:
    assert activation_timeline(residual_graph("N")).peak_bytes == 1200


def test_tensors_are_freed_after_last_use() -> None:
    """X[1,100] -> MatMul W[100,1000] -> A (4000 B) -> MatMul W2[1000,10] -> B (40 B) -> Relu -> C (40 B).

    X dies after step 0 and A after step 1: live = [400+4000, 4000+40, 40+40].
    Weights: 400000 + 40000 bytes, plus a Constant node's 3 float32 values (12 bytes) feeding nothing live.
    """
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["A"]),
        helper.make_node("MatMul", ["A", "W2"], ["B"]),
        helper.make_node("Constant", [], ["unused_const"], value=numpy_helper.from_array(np.ones(3, np.float32))),
        helper.make_node("Relu", ["B"], ["C"]),
    ]
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 100])],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [1, 10])],
        [_init("W", (100, 1000)), _init("W2", (1000, 10))],
    )
    t = activation_timeline(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    # steps: mm (X+A), mm (A+B), Constant (B only: the constant is a weight), relu (B+C)
    assert t.live_bytes == [4400, 4040, 40, 80]
    assert t.peak_bytes == 4400 and t.peak_step == 0
    assert t.weights_bytes == 440012


def test_dtypes_and_graph_inputs_listing_initializers() -> None:
    """float16 activations count 2 bytes each; an initializer also listed as a graph input is a weight, not an input."""
    nodes = [helper.make_node("Cast", ["X"], ["H"], to=TensorProto.FLOAT16),
             helper.make_node("Mul", ["H", "S"], ["Y"])]
    s = numpy_helper.from_array(np.ones((1, 8), np.float16), "S")
    graph = helper.make_graph(
        nodes, "half",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("S", TensorProto.FLOAT16, [1, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, [1, 8])],
        [s],
    )
    t = activation_timeline(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    # step 0: X (32) + H (16); step 1: H (16) + Y (16)
    assert t.live_bytes == [48, 32]
    assert t.weights_bytes == 16


def test_exported_model_weights_equal_parameter_bytes(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    path = export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    mem = graph_memory(path)
    params = sum(p.numel() for p in model.parameters()) * 4
    assert mem.weights_mb * 1e6 == pytest.approx(params)
    # float32 steps: conv1 in 3x16x16 + out 8x16x16 = 4*(768+2048); relu 8x16x16 in + out = 4*(2048+2048);
    # conv2 8x16x16 in + 4x16x16 out = 4*(2048+1024). The ReLU step is the peak.
    t = activation_timeline(path)
    assert t.live_bytes == [4 * (768 + 2048), 4 * (2048 + 2048), 4 * (2048 + 1024)]
    assert mem.peak_activations_mb * 1e6 == pytest.approx(4 * 4096)
    _, infos = tensor_infos(path)
    assert infos["output"].shape == (1, 4, 16, 16)


def test_roofline_estimate_hand_checked(tmp_path: Path) -> None:
    """Conv 3->8, 3x3, 16x16 output: MACs = 8*16*16 * 3*3*3 = 55296."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16 * 16, 10)).eval()
    path = export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "e.onnx")
    proto, infos = tensor_infos(path)
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
    assert node_macs(conv, infos) == 55296
    assert node_macs(gemm, infos) == 2048 * 10

    profile = load_profile("host-cpu")
    est = roofline(path, profile)
    assert est["macs"] == 55296 + 20480
    hw = profile.hardware
    expected_s = 0.0
    for node in est["nodes"]:
        expected_s += max(2 * node["macs"] / (hw.peak_gflops * 1e9), node["bytes"] / (hw.memory_bandwidth_gbs * 1e9))
    assert est["latency_ms"] == pytest.approx(expected_s * 1e3)

    m = EstimateBackend(profile).measure(path)
    assert m.backend == "estimate" and m.estimated is True and m.device == "host-cpu"
    lat = m.latency
    assert lat.repeats == 0 and lat.std_ms == 0.0
    assert lat.median_ms == lat.min_ms == lat.mean_ms == lat.p90_ms == pytest.approx(est["latency_ms"])
    assert m.memory.weights_mb == pytest.approx(graph_memory(path).weights_mb)
