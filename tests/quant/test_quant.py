"""INT8 quantization on real components: ORT's quantizer, ORT sessions, the CLI's measure, profile TOML files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import run_cli
from tiny_subject import TinyNet

from hwprune import Subject
from hwprune.backends.memory import elem_size, graph_memory
from hwprune.errors import ProfileError
from hwprune.export import export_onnx
from hwprune.profiles import load_profile
from hwprune.pruning import PruningSpace
from hwprune.quant import (FP32, INT8, CalibrationSet, QuantizationError, calibration_set, check_outputs,
                           compare_outputs, evaluate_onnx, group_units, plan_for, quantize, to_feeds, weighted_nodes)
from hwprune.quant.device import TVM_REASON, int8_policy, require_int8
from hwprune.subjects.shapes import make_shapes
from hwprune.train import accuracy


def _subject(calibration: bool = True) -> Subject:
    torch.manual_seed(0)
    model = TinyNet().eval()
    x, y = make_shapes(192, seed=3)
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 192, 64)]
    return Subject(model=model, example_inputs=(torch.zeros(1, 3, 32, 32),),
                   evaluate=lambda m: accuracy(m, batches[:2]),
                   calibration_data=batches if calibration else None)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("quant")
    subject = _subject()
    fp32 = export_onnx(subject.model, subject.example_inputs, folder / "fp32.onnx")
    cal = calibration_set(fp32, subject, samples=48, heldout=32)
    q = quantize(fp32, folder / "int8.onnx", plan_for(fp32), cal)
    return subject, fp32, cal, q


def test_quantized_file_is_int8_smaller_and_close(quantized) -> None:
    _, fp32, cal, q = quantized
    assert q.path.is_file() and q.mode == "static" and q.label == INT8
    assert set(q.precision) == {n.name for n in weighted_nodes(fp32)}
    assert q.file_bytes < 0.5 * fp32.stat().st_size
    graph = onnx.load(q.path).graph
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert len(int8_weights) == len(q.precision)  # every conv/gemm weight stored as INT8
    assert q.calibration is not None and q.calibration.source == "calibration_data"
    assert q.calibration.samples == 48 and q.calibration.method == "MinMax"
    check = check_outputs(fp32, q.path, cal.heldout)
    assert 0.0 < check.relative_error < 0.25 and check.samples == 32
    sess = ort.InferenceSession(str(q.path), providers=["CPUExecutionProvider"])
    assert sess.run(None, cal.heldout[0])[0].shape == (1, 10)


def test_memory_counts_int8_weights_at_one_byte(quantized) -> None:
    _, fp32, _, q = quantized
    graph = onnx.load(q.path).graph
    stored = sum(int(np.prod(t.dims)) * elem_size(t.data_type) for t in graph.initializer)
    mem, dense = graph_memory(q.path), graph_memory(fp32)
    assert mem.weights_mb == pytest.approx(stored / 1e6)
    assert q.weight_bytes == pytest.approx(stored, abs=1)
    assert mem.weights_mb < 0.35 * dense.weights_mb
    # dequantized weights are not activations: the peak is no larger than the FP32 graph's
    assert mem.peak_activations_mb <= dense.peak_activations_mb


def test_measure_cli_on_a_quantized_file(quantized) -> None:
    _, _, _, q = quantized
    proc = run_cli("measure", str(q.path), "--json", check=True)
    m = json.loads(proc.stdout)
    assert m["latency"]["median_ms"] > 0
    assert m["memory"]["weights_mb"] == pytest.approx(graph_memory(q.path).weights_mb)


def test_mixed_plan_keeps_excluded_layers_fp32(quantized, tmp_path: Path) -> None:
    _, fp32, cal, _ = quantized
    plan = plan_for(fp32, ["stem.0", "branch_a.0"])
    q = quantize(fp32, tmp_path / "mixed.onnx", plan, cal)
    assert q.precision["/stem/stem.0/Conv"] == INT8 and q.precision["/branch_a/branch_a.0/Conv"] == INT8
    assert q.precision["/head/head.2/Gemm"] == FP32 and q.precision["/dw/dw.0/Conv"] == FP32
    assert q.label == "mixed 2/6"
    assert q.weight_bytes < q.fp32_weight_bytes
    none = quantize(fp32, tmp_path / "none.onnx", plan_for(fp32, []), cal)
    assert none.mode == "none" and none.path == fp32 and not (tmp_path / "none.onnx").exists()


def test_group_units_follow_the_pruning_space(quantized) -> None:
    subject, fp32, _, _ = quantized
    space = PruningSpace.build(subject.model, subject.example_inputs, channel_multiple=16, max_ratio=0.9)
    units = group_units(weighted_nodes(fp32), space.specs)
    assert set(units["stem.0"]) == {"/stem/stem.0/Conv", "/dw/dw.0/Conv", "/pw/pw.0/Conv"}
    assert units["head.2"] == ("/head/head.2/Gemm",)  # the classifier is in no group: a unit of its own
    plan = plan_for(fp32, ["stem.0"], groups=space.specs)
    assert plan.label == "mixed 3/6"


def test_evaluation_through_ort_equals_the_evaluator_on_a_session(quantized) -> None:
    subject, fp32, _, q = quantized
    x, y = make_shapes(192, seed=3)
    sess = ort.InferenceSession(str(q.path), providers=["CPUExecutionProvider"])
    preds = [sess.run(None, {"input": x[i:i + 1].numpy()})[0].argmax(1)[0] for i in range(128)]
    by_hand = float(np.mean(np.array(preds) == y[:128].numpy()))
    assert evaluate_onnx(q.path, subject.evaluate) == pytest.approx(by_hand)
    # the FP32 file through ORT scores what the PyTorch module scores
    assert evaluate_onnx(fp32, subject.evaluate) == pytest.approx(subject.evaluate(subject.model))


def test_exceeded_tolerance_fails_with_the_reason(quantized) -> None:
    _, fp32, cal, q = quantized
    with pytest.raises(QuantizationError, match=r"relative error 0\.\d+ > tolerance 1e-06 on 32 held-out samples"):
        check_outputs(fp32, q.path, cal.heldout, tolerance=1e-6)
    assert compare_outputs(fp32, fp32, cal.heldout).relative_error == 0.0


def test_failing_quantization_gives_orts_reason(quantized, tmp_path: Path) -> None:
    _, fp32, _, _ = quantized
    wrong = CalibrationSet([{"input": np.zeros((1, 3, 8, 8), np.float32)}], [], "given")  # wrong shape for the graph
    with pytest.raises(QuantizationError, match="ONNX Runtime could not quantize .*static"):
        quantize(fp32, tmp_path / "bad.onnx", plan_for(fp32), wrong)
    assert not (tmp_path / "bad.onnx").exists() and not list(tmp_path.glob(".*tmp"))
    with pytest.raises(QuantizationError, match="unknown unit 'nope'"):
        plan_for(fp32, ["nope"])


def test_nothing_to_calibrate_on_is_refused(quantized) -> None:
    _, fp32, _, _ = quantized
    bare = _subject(calibration=False)
    bare.evaluate = lambda m: 0.5  # an evaluator that never calls the model records nothing
    with pytest.raises(QuantizationError, match="nothing to calibrate INT8 quantization on"):
        calibration_set(fp32, bare)
    recorded = calibration_set(fp32, _subject(calibration=False), samples=16, heldout=8)
    assert recorded.source == "recorded" and len(recorded.calibrate) == 16 and len(recorded.heldout) == 8


def test_feeds_are_cut_to_the_graph_batch(quantized) -> None:
    _, fp32, _, _ = quantized
    feeds = to_feeds(fp32, [torch.randn(5, 3, 32, 32), (torch.randn(4, 3, 32, 32), torch.zeros(4))], 7)
    assert len(feeds) == 7 and all(f["input"].shape == (1, 3, 32, 32) for f in feeds)
    with pytest.raises(QuantizationError, match="expects"):
        to_feeds(fp32, [torch.randn(2, 3, 16, 16)], 4)


def test_profile_switch_is_read_from_toml(tmp_path: Path) -> None:
    assert int8_policy("host-cpu").mode == "measure"
    pi4 = load_profile("raspberry-pi-4")
    assert pi4.quantize.int8 == "measure" and "dot-product" in pi4.quantize.reason
    assert int8_policy(pi4).mode == "off" and TVM_REASON in int8_policy(pi4).reason  # through TVM RPC: refused
    assert int8_policy(pi4.with_overrides(backend="ssh-ort")).mode == "measure"
    with pytest.raises(QuantizationError, match="Relax ONNX importer lowers"):
        require_int8("host-cpu-tvm")
    text = Path(load_profile("host-cpu").source).read_text()
    off = tmp_path / "off.toml"
    off.write_text(text.replace('int8 = "measure"', 'int8 = "off"').replace('name = "host-cpu"', 'name = "off"'))
    assert int8_policy(str(off)).mode == "off"
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace('int8 = "measure"', 'int8 = "always"'))
    with pytest.raises(ProfileError, match=r"quantize\.int8: 'always' is not one of search, measure, off"):
        load_profile(str(bad))


def test_module_of_rebuilds_qualified_names_of_nested_sequentials() -> None:
    from hwprune.quant import module_of

    assert module_of("/stem/stem.0/Conv") == "stem.0"
    assert module_of("/features/features.1/block/block.0/block.0.0/Conv") == "features.1.block.0.0"
    assert module_of("/features/features.4/block/block.2/fc1/Conv") == "features.4.block.2.fc1"
    assert module_of("/Add") == ""


def _x86_without_int32_dot(host: Any) -> bool:
    """Whether a detected CPU is x86 without VNNI/AMX (where 8-bit weights saturate ORT's kernels)."""
    return host.arch in ("x86_64", "AMD64") and not any("VNNI" in f or f == "AMX" for f in host.features)


def _profile_with(tmp_path: Path, cpu: str, reduce_range: str | None = None) -> str:
    text = Path(load_profile("host-cpu").source).read_text().replace('cpu = "detect"', f'cpu = "{cpu}"')
    if reduce_range is not None:
        text = text.replace('reduce_range = "auto"', f'reduce_range = "{reduce_range}"')
    path = tmp_path / f"p{abs(hash((cpu, reduce_range)))}.toml"
    path.write_text(text)
    return str(path)


def test_reduce_range_follows_the_cpu_and_the_profile(tmp_path: Path) -> None:
    from hwprune.hostinfo import detect_host_cpu
    from hwprune.quant.device import reduce_range

    assert reduce_range(_profile_with(tmp_path, "AMD EPYC, x86_64, 2 cores, AVX2 FMA")) is True
    assert reduce_range(_profile_with(tmp_path, "Intel Xeon, x86_64, 4 cores, AVX2 AVX-512 AVX512-VNNI")) is False
    assert reduce_range("raspberry-pi-4") is False and reduce_range("android-sd8gen2") is False  # Arm: no saturation
    assert reduce_range(_profile_with(tmp_path, "AMD EPYC, x86_64, 2 cores, AVX2", "off")) is False
    assert reduce_range(_profile_with(tmp_path, "4x Cortex-A72", "on")) is True
    assert reduce_range("host-cpu") is _x86_without_int32_dot(detect_host_cpu())
    with pytest.raises(ProfileError, match=r"quantize\.reduce_range: 'yes' is not one of auto, on, off"):
        load_profile(_profile_with(tmp_path, "x86_64", "yes"))


def test_seven_bit_weights_reach_ort_and_avoid_saturation(tmp_path: Path) -> None:
    """A first conv whose weights all sit near their channel's maximum, on inputs spanning their range: the
    u8 x s8 pairs of x86 without VNNI saturate at 8-bit weights; 7-bit weights (reduce_range) do not."""
    from hwprune.hostinfo import detect_host_cpu

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(0.5 + 0.5 * torch.rand_like(conv.weight))
    model = torch.nn.Sequential(conv, torch.nn.Flatten(), torch.nn.Linear(16 * 8 * 8, 10)).eval()
    fp32 = export_onnx(model, (torch.zeros(1, 3, 8, 8),), tmp_path / "fp32.onnx")
    g = torch.Generator().manual_seed(1)
    feeds = to_feeds(fp32, [(torch.rand(16, 3, 8, 8, generator=g) * 2 - 1,) for _ in range(3)], 48)
    cal = CalibrationSet(feeds[:2], feeds[2:], "given")
    errors, ranges = {}, {}
    for rr in (False, True):
        q = quantize(fp32, tmp_path / f"rr{rr}.onnx", plan_for(fp32, ["0"]), cal, reduce_range=rr)
        assert q.reduce_range is rr and q.to_dict()["reduce_range"] is rr
        w = [onnx.numpy_helper.to_array(t) for t in onnx.load(q.path).graph.initializer
             if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4][0]
        ranges[rr] = int(np.abs(w.astype(int)).max())
        errors[rr] = compare_outputs(fp32, q.path, cal.heldout).relative_error
    assert ranges == {False: 127, True: 64}
    assert errors[True] < 0.25, errors
    if _x86_without_int32_dot(detect_host_cpu()):
        assert errors[False] > 2 * errors[True] and errors[False] > 0.3, errors  # measured 0.55 vs 0.13 (AVX2)
