"""ORT's profiled kernels charged to the exported nodes they ran for, on a real nn.TransformerEncoder profile."""

from __future__ import annotations

import pytest

from hwprune.backends.ort import OrtBackend
from hwprune.predict.calibrate import export_design, measure_model, measured_from
from hwprune.predict.designs import design_by_name, designs, torch_encoder_design, transformer_design
from hwprune.predict.features import graph_features
from hwprune.profiles import load_profile


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory):
    """A 2-layer nn.TransformerEncoder design (4 heads), exported and measured: (profile, path, Measured)."""
    folder = tmp_path_factory.mktemp("attribution")
    profile = load_profile("host-cpu").with_overrides(measure__repeats=5, measure__warmup=2)
    seed = next(s for s in range(200) if (lambda m: len(m.layers) == 2 and m.layers[0].self_attn.num_heads == 4)(
        torch_encoder_design(s, 16).module))
    d = torch_encoder_design(seed, profile.channel_multiple)
    path = export_design(d, folder)
    return profile, path, measure_model(d.name, path, profile, OrtBackend(profile))


def test_attention_matmuls_get_their_own_kernels(encoder) -> None:
    _, path, m = encoder
    us = {f.name: s.us for f, s in zip(m.features, m.samples)}
    kernels = {f.name: s.kernels for f, s in zip(m.features, m.samples)}
    attention = [n for n in us if n.endswith(("self_attn/MatMul_1", "self_attn/MatMul_2"))]
    # ORT names them "<node>/MatMulScaleFusion//MatmulTransposeFusion/"; a first-match prefix charged them to
    # "<layer>/self_attn/MatMul" (the QKV projection: three kernels) and left these at 0
    assert len(attention) == 4 and all(us[n] > 0 for n in attention)
    qkv = [n for n in us if n.endswith("self_attn/MatMul")]
    assert qkv and all(kernels[n] == 1 for n in qkv)


def test_shared_weights_are_keyed_as_weights(encoder) -> None:
    profile, path, _ = encoder
    # nn.TransformerEncoder copies its layer, and the exporter shares the equal weights of the second layer through
    # Identity nodes: those Linear MatMuls are still MatMuls by a weight
    linear = [f for f in graph_features(path, profile.channel_multiple)
              if f.op_type in ("MatMul", "Gemm") and not f.name.endswith(("MatMul_1", "MatMul_2"))]
    assert len(linear) == 8 and all(f.keys[0].split("/")[1] == "w" for f in linear)


def test_reattribution_from_the_kept_profile_reproduces_the_measurement(encoder) -> None:
    profile, path, m = encoder
    # ORT's own reshapes around a fused Gemm map onto no exported node: counted, they carry the profiler's cost too
    assert m.profiled and 0 < m.lost_kernels < len(m.profiled)
    again = measured_from(m.name, path, profile, list(m.profiled), m.measured_ms)
    assert again.samples == m.samples and again.lost_kernels == m.lost_kernels


def test_designs_are_rebuilt_from_their_names() -> None:
    for d in designs(10, 16, seed=3):
        again = design_by_name(d.name, 16)
        assert again.name == d.name and tuple(again.example.shape) == tuple(d.example.shape)
        assert str(again.module) == str(d.module)
    handed = next(s for s in range(50) if transformer_design(s, 16).name != f"transformer-{s}")
    for bad in ("resnet18-w1-64px", "cnn-x", f"transformer-{handed}"):
        with pytest.raises(ValueError):
            design_by_name(bad, 16)
