"""ORT's profiled kernels charged to the exported nodes they ran for, on a real nn.TransformerEncoder profile."""

from __future__ import annotations

import pytest

from hwprune.backends.memory import load_model
from hwprune.backends.ort import OrtBackend
from hwprune.predict.calibrate import export_design, measure_model, measured_from
from hwprune.predict.designs import design_by_name, designs, torch_encoder_design, transformer_design
from hwprune.predict.features import SKIP_SUFFIX, graph_features
from hwprune.profiles import load_profile


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory):
    """A 2-layer post-norm nn.TransformerEncoder design (4 heads, GELU), exported and measured: (profile, path,
    Measured). Post-norm and GELU: ORT fuses both into kernels named after no exported node."""
    folder = tmp_path_factory.mktemp("attribution")
    profile = load_profile("host-cpu").with_overrides(measure__repeats=5, measure__warmup=2)

    def wanted(m) -> bool:
        layer = m.layers[0]
        return len(m.layers) == 2 and layer.self_attn.num_heads == 4 and not layer.norm_first \
            and layer.activation_relu_or_gelu == 2

    seed = next(s for s in range(400) if wanted(torch_encoder_design(s, 16).module))
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


def test_fused_residual_norms_and_gelus_are_charged_to_their_nodes(encoder) -> None:
    _, path, m = encoder
    ops = {p["op_type"] for p in m.profiled}
    assert {"SkipLayerNormalization", "Gelu"} <= ops  # what this ORT makes of them, or the test proves nothing
    us = {f.name: s.us for f, s in zip(m.features, m.samples)}
    skip = [f for f in m.features if f.keys[0] == "LayerNormalization" + SKIP_SUFFIX]
    # post-norm: both norms of both layers follow their residual Add, which is folded into the norm's kernel
    assert len(skip) == 4 and all(us[f.name] > 0 for f in skip)
    adds = {f.name for f in m.features if f.op_type == "Add" and f.fused}
    graph = load_model(path).graph
    producer = {o: n.name for n in graph.node for o in n.output}
    norms = {n.name: n for n in graph.node if n.op_type == "LayerNormalization"}
    assert all(producer[norms[f.name].input[0]] in adds for f in skip)
    erf = [f for f in m.features if f.op_type == "Erf"]
    assert len(erf) == 2 and all(us[f.name] > 0 for f in erf)
    # with the reshapes ORT puts around a Gemm it made of a MatMul charged to the graph's reshapes, every kernel
    # lands on an exported node: before, a post-norm encoder lost a third of its kernel time and was predicted 11% low
    assert m.lost_kernels == pytest.approx(0.0, abs=1e-6) and m.attributed_share == pytest.approx(1.0)
    charged = sum(s.kernels for f, s in zip(m.features, m.samples) if us[f.name] > 0)
    assert charged == pytest.approx(len(m.profiled))


def test_reattribution_from_the_kept_profile_reproduces_the_measurement(encoder) -> None:
    profile, path, m = encoder
    assert m.profiled
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


def test_a_pre_norm_encoders_residual_adds_and_relus_run_as_kernels(tmp_path) -> None:
    # a MatMul on a 3-D input becomes a Gemm between two reshapes, so only its bias Add folds into it: the residual
    # Add and the ReLU after it run (and are timed) on their own, and are keyed so
    profile = load_profile("host-cpu").with_overrides(measure__repeats=5, measure__warmup=2)

    def wanted(m) -> bool:
        layer = m.layers[0]
        return layer.norm_first and layer.activation_relu_or_gelu == 1 and layer.self_attn.embed_dim >= 32

    d = next(x for x in (torch_encoder_design(s, 16) for s in range(400)) if wanted(x.module))
    path = export_design(d, tmp_path)
    m = measure_model(d.name, path, profile, OrtBackend(profile))
    kernels = {p["name"] for p in m.profiled}
    standalone = [f for f in m.features if f.op_type in ("Add", "Relu") and f.name in kernels]
    assert standalone and all(not f.fused and not f.keys[0].endswith("@fused") for f in standalone)
    us = {f.name: s.us for f, s in zip(m.features, m.samples)}
    assert all(us[f.name] > 0 for f in standalone)
    bias = [f for f in m.features if f.op_type == "Add" and f.fused]
    assert bias and all(f.name not in kernels for f in bias)  # the bias Adds ran inside their Gemm
