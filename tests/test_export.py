"""ONNX export, atomic writes, hashing and random input feeds."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from hwprune.errors import ExportError
from hwprune.export import (
    atomic_write_bytes,
    atomic_write_text,
    export_onnx,
    file_record,
    input_feed,
    sha256_file,
)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


class UnsupportedOp(nn.Module):
    """A conv followed by an FFT, which the TorchScript exporter cannot translate."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.fft2(self.conv(x)).abs()


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Identity(), UnsupportedOp())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class DataDependent(nn.Module):
    """Python control flow on a tensor's value: tracing can only follow one branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x - 1


def _ort_outputs(path: Path, x: torch.Tensor) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})


def test_torchscript_export_matches_torch(tmp_path: Path) -> None:
    model = small_cnn()
    model.train()  # export must run in eval mode and hand the model back as it was
    x = torch.randn(2, 3, 16, 16)
    path = export_onnx(model, x, tmp_path / "sub" / "model.onnx")
    assert path == tmp_path / "sub" / "model.onnx" and path.is_file()
    assert model.training and all(m.training for m in model.modules())
    assert sorted(os.listdir(path.parent)) == ["model.onnx"]  # one file, no temp left behind

    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["output"]
    assert proto.opset_import[0].version == 17
    # the batch of the example inputs is kept
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2

    model.eval()
    with torch.no_grad():
        expected = model(x).numpy()
    (got,) = _ort_outputs(path, x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_export_multiple_inputs_and_custom_names(tmp_path: Path) -> None:
    class Two(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return a + b, a * b

    a, b = torch.randn(1, 4), torch.randn(1, 4)
    p = export_onnx(Two(), (a, b), tmp_path / "two.onnx")
    proto = onnx.load(str(p))
    assert [i.name for i in proto.graph.input] == ["input_0", "input_1"]
    assert [o.name for o in proto.graph.output] == ["output_0", "output_1"]
    p2 = export_onnx(Two(), (a, b), tmp_path / "two_named.onnx", input_names=["left", "right"])
    sess = ort.InferenceSession(str(p2), providers=["CPUExecutionProvider"])
    s, m = sess.run(None, {"left": a.numpy(), "right": b.numpy()})
    np.testing.assert_allclose(s, (a + b).numpy(), rtol=1e-6)
    np.testing.assert_allclose(m, (a * b).numpy(), rtol=1e-6)


def test_dynamo_export_single_file_matches_torch(tmp_path: Path) -> None:
    model = small_cnn().eval()
    x = torch.randn(1, 3, 16, 16)
    path = export_onnx(model, x, tmp_path / "dyn.onnx", exporter="dynamo")
    assert sorted(os.listdir(tmp_path)) == ["dyn.onnx"]  # no external .data file for a small model
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input"]
    assert len(proto.graph.initializer) > 0
    with torch.no_grad():
        expected = model(x).numpy()
    (got,) = _ort_outputs(path, x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_export_is_quiet(tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HWPRUNE_DEBUG", raising=False)
    export_onnx(small_cnn(), torch.randn(1, 3, 8, 8), tmp_path / "q.onnx")
    with pytest.raises(ExportError):
        export_onnx(UnsupportedOp(), torch.randn(1, 3, 4, 4), tmp_path / "bad.onnx")
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_unsupported_op_raises_one_line_export_error(tmp_path: Path) -> None:
    target = tmp_path / "bad.onnx"
    with pytest.raises(ExportError) as info:
        export_onnx(Wrapper(), torch.randn(1, 3, 4, 4), target)
    msg = str(info.value)
    assert "\n" not in msg
    assert "aten::fft_fft2" in msg
    assert "body.1" in msg  # the module that holds the op
    assert not target.exists() and os.listdir(tmp_path) == []


def test_data_dependent_control_flow_raises_when_strict(tmp_path: Path) -> None:
    with pytest.raises(ExportError) as info:
        export_onnx(DataDependent(), torch.randn(1, 4), tmp_path / "dd.onnx", strict=True)
    msg = str(info.value)
    assert "\n" not in msg and "data-dependent" in msg and "test_export.py" in msg
    assert os.listdir(tmp_path) == []
    # without strict the tracer's warning is not fatal: the graph follows the branch taken
    export_onnx(DataDependent(), torch.randn(1, 4), tmp_path / "dd.onnx")
    assert (tmp_path / "dd.onnx").is_file()


def test_data_dependent_control_flow_fails_with_dynamo(tmp_path: Path) -> None:
    with pytest.raises(ExportError) as info:
        export_onnx(DataDependent(), torch.randn(1, 4), tmp_path / "dd.onnx", exporter="dynamo")
    msg = str(info.value)
    assert "\n" not in msg and "data-dependent" in msg


def test_unknown_exporter(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown exporter"):
        export_onnx(small_cnn(), torch.randn(1, 3, 8, 8), tmp_path / "x.onnx", exporter="tflite")  # type: ignore[arg-type]


def test_atomic_writes_leave_no_temp_files(tmp_path: Path) -> None:
    p = atomic_write_text(tmp_path / "a" / "summary.json", '{"x": 1}\n')
    assert p.read_text() == '{"x": 1}\n'
    atomic_write_bytes(tmp_path / "a" / "summary.json", b"second")
    assert p.read_bytes() == b"second"
    assert os.listdir(tmp_path / "a") == ["summary.json"]
    # a failed write leaves the old file untouched and no temp file behind
    with pytest.raises(TypeError):
        atomic_write_bytes(p, "not bytes")  # type: ignore[arg-type]
    assert p.read_bytes() == b"second"
    assert os.listdir(tmp_path / "a") == ["summary.json"]


def test_sha256_and_file_record(tmp_path: Path) -> None:
    data = b"hwprune" * 1000
    p = atomic_write_bytes(tmp_path / "models" / "trial-0001" / "model.onnx", data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    rec = file_record(p, tmp_path)
    assert rec == {"path": "models/trial-0001/model.onnx", "bytes": len(data),
                   "sha256": hashlib.sha256(data).hexdigest()}
    with pytest.raises(ValueError):
        file_record(p, tmp_path / "elsewhere")


def test_input_feed_matches_graph(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [2, "T"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x, ids], [y], [w])
    model = helper.make_model(graph)
    path = tmp_path / "in.onnx"
    onnx.save(model, str(path))

    feed = input_feed(path, seed=3)
    assert list(feed) == ["x", "ids"]
    assert feed["x"].shape == (1, 3, 4) and feed["x"].dtype == np.float32
    assert feed["ids"].shape == (2, 1) and feed["ids"].dtype == np.int64
    assert feed["ids"].min() >= 0 and feed["ids"].max() < 10
    again = input_feed(model, seed=3)
    np.testing.assert_array_equal(feed["x"], again["x"])
    assert not np.array_equal(feed["x"], input_feed(model, seed=4)["x"])


def test_transformer_encoder_layers_export_despite_the_attention_fast_path(tmp_path: Path) -> None:
    """nn.MultiheadAttention's eval-mode fast path is a fused op without an ONNX export; export goes around it."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from torch import nn

    from hwprune.export import export_onnx

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, norm_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Flatten(),
                          nn.Linear(8 * 32, 5)).eval()
    x = torch.randn(1, 8, 32)
    path = export_onnx(model, (x,), tmp_path / "vit.onnx", exporter="torchscript")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], expected, atol=1e-4)
    assert torch.backends.mha.get_fastpath_enabled()  # switched back on afterwards
