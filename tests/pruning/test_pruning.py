"""Tests for hwprune.pruning: knobs from real dependency graphs, physical pruning, ONNX export of the result."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from hwprune.errors import HwpruneError
from hwprune.pruning import (
    Knob,
    PrunedModel,
    PruningSpace,
    architecture_signature,
    count_macs_params,
    prune,
    read_widths,
)

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------------------
# tiny models, one per structure the pruner must handle


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2))
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ConcatNet(nn.Module):
    """DenseNet/Inception-like: two branches concatenated, then a dense-style concat with the input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = nn.Sequential(nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.mix = nn.Conv2d(40, 32, 1)
        self.dense = nn.Conv2d(32, 16, 3, padding=1)
        self.head = nn.Conv2d(48, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.mix(torch.cat([self.b1(x), self.b2(x)], 1)))
        x = torch.cat([x, torch.relu(self.dense(x))], 1)  # DenseNet: features grow by concatenation
        return self.head(x).mean((2, 3))


class InvertedResidual(nn.Module):
    def __init__(self, c: int, expand: int) -> None:
        super().__init__()
        hidden = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                                nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.dw(self.expand(x)))


class MobileNetish(nn.Module):
    """MobileNetV2 inverted residuals (depthwise) plus a groups=4 convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.block1 = InvertedResidual(16, 6)
        self.block2 = InvertedResidual(16, 4)
        self.pre = nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32), nn.ReLU())
        self.post = nn.Conv2d(32, 24, 1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.post(self.grouped(self.pre(self.block2(self.block1(self.stem(x))))))
        return self.fc(x.mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * s


class SENet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.se = SqueezeExcite(32, 2)  # 16-wide bottleneck: prunable with multiple 8
        self.conv2 = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.se2 = SqueezeExcite(32, 8)  # 4-wide bottleneck: too narrow for multiple 8
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.se2(self.conv2(self.se(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class XBlock(nn.Module):
    """RegNet X block: 1x1, grouped 3x3 (group width 8), 1x1, residual."""

    def __init__(self, w: int = 48, group_width: int = 8) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(w, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, groups=w // group_width, bias=False), nn.BatchNorm2d(w),
                               nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(w, w, 1, bias=False), nn.BatchNorm2d(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.c(self.b(self.a(x))))


class RegNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 48, 3, 2, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU())
        self.blocks = nn.Sequential(XBlock(), XBlock())
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(20, 64), nn.LayerNorm(64), nn.GELU(),
            nn.Linear(64, 48), nn.ReLU(),
            nn.Linear(48, 32), nn.ReLU(),
            nn.Linear(32, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ViTBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class TinyViT(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, 4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 17, d) * 0.02)
        self.blocks = nn.Sequential(ViTBlock(d, heads), ViTBlock(d, heads))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def _bert(kind: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128, vocab_size=100,
        max_position_embeddings=32,
    )
    cls = transformers.BertForSequenceClassification if kind == "cls" else transformers.BertModel
    return cls(config)


class LastHidden(nn.Module):
    """Exports a Hugging Face backbone: transformers 5 + the TorchScript exporter reject BertModel called directly."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).last_hidden_state


def _images(size: int = 16) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))


def _ids() -> torch.Tensor:
    return torch.randint(1, 100, (1, 8), generator=torch.Generator().manual_seed(2))


def _randomise_norms(model: nn.Module) -> nn.Module:
    # fresh BatchNorm/LayerNorm are all ones, which would make every channel tie on the norm part of importance
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


Case = tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], str]
CASES: dict[str, Case] = {
    "resnet": (TinyResNet, _images, "tensor"),
    "concat": (ConcatNet, _images, "tensor"),
    "mobilenet": (MobileNetish, lambda: _images(32), "tensor"),
    "regnet": (RegNetish, _images, "tensor"),
    "se": (SENet, _images, "tensor"),
    "mlp": (MLP, lambda: torch.randn(1, 20, generator=torch.Generator().manual_seed(4)), "tensor"),
    "vit": (TinyViT, _images, "tensor"),
    "bert_cls": (lambda: _bert("cls"), _ids, "hf"),
    "bert": (lambda: _bert("base"), _ids, "hf"),
}


def _make(case: str) -> tuple[nn.Module, torch.Tensor]:
    factory, inputs, _ = CASES[case]
    torch.manual_seed(0)
    return _randomise_norms(factory()).eval(), inputs()


def _first(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state") and getattr(out, "logits", None) is None:
        return out.last_hidden_state
    if getattr(out, "logits", None) is not None:
        return out.logits
    return out[0]


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _first(model(x))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == snap.keys()
    for k, v in snap.items():
        assert state[k].shape == v.shape, k
        assert torch.equal(state[k], v), k


def _onnx_roundtrip(module: nn.Module, x: torch.Tensor, path: Path, case: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    exported = LastHidden(module) if case == "bert" else module
    exported.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(exported, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy()})[0]
    want = _run(exported, x).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# the main behaviour, on every model family


@pytest.mark.parametrize("case", list(CASES))
def test_prune_family(case: str, tmp_path: Path) -> None:
    model, x = _make(case)
    snap = _snapshot(model)
    reference = _run(model, x)

    space = PruningSpace.build(model, x, channel_multiple=8)
    assert space.knobs, space.skipped
    json.dumps(space.to_dict())

    result = prune(model, x, space.uniform(0.5), space)
    assert isinstance(result, PrunedModel)
    _assert_same_state(model, snap)  # the input model is untouched
    assert result.module is not model

    out = _run(result.module, x)
    assert out.shape == reference.shape
    assert torch.isfinite(out).all()

    shrunk = {n: w for n, w in result.widths.items() if w[1] < w[0]}
    assert shrunk, result.widths
    assert all(w[1] <= w[0] for w in result.widths.values())
    assert result.widths == {n: (w, read_widths(result.module)[n]) for n, w in read_widths(model).items()}

    macs0, params0 = count_macs_params(model, x)
    assert result.params < params0
    assert result.params == sum(p.numel() for p in result.module.parameters())
    assert result.macs < macs0

    for knob in space.knobs:
        kept = result.kept[knob.name]
        if knob.kind == "block":
            assert kept == 1  # uniform ratios keep every block
            continue
        assert kept == knob.kept(0.5) < knob.channels
        if knob.kind == "channels":
            assert kept % knob.groups == 0
            if knob.multiple * knob.groups <= knob.channels:
                assert kept % knob.multiple == 0, (knob, kept)

    _onnx_roundtrip(result.module, x, tmp_path / f"{case}.onnx", case)


@pytest.mark.parametrize("case", ["resnet", "mobilenet", "vit", "bert_cls"])
def test_zero_ratio_is_identity(case: str) -> None:
    model, x = _make(case)
    space = PruningSpace.build(model, x)
    result = prune(model, x, {}, space)
    assert all(a == b for a, b in result.widths.values())
    torch.testing.assert_close(_run(result.module, x), _run(model, x), rtol=0, atol=1e-5)
    explicit = prune(model, x, {k.name: 0.0 for k in space.knobs}, space)
    assert explicit.signature == result.signature


@pytest.mark.parametrize("case", ["concat", "mobilenet", "vit", "bert_cls"])
def test_deterministic(case: str) -> None:
    model, x = _make(case)
    space = PruningSpace.build(model, x)
    ratios = {k.name: 0.2 + 0.5 * (i % 2) for i, k in enumerate(space.knobs)}
    a = prune(model, x, ratios, space)
    b = prune(model, x, ratios, space)
    assert a.signature == b.signature
    for (ka, va), (kb, vb) in zip(a.module.state_dict().items(), b.module.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    # a space rebuilt from its JSON description prunes identically
    again = PruningSpace.from_dict(json.loads(json.dumps(space.to_dict())))
    assert prune(model, x, ratios, again).signature == a.signature
    # and a different choice is a different architecture
    assert prune(model, x, space.uniform(0.7), space).signature != prune(model, x, {}, space).signature


# ---------------------------------------------------------------------------------------------------------------------
# structures in detail


def test_resnet_residual_groups_are_coupled() -> None:
    model, x = _make("resnet")
    space = PruningSpace.build(model, x)
    names = space.names
    # the stem and both layer1 blocks share one residual stream: one knob, not three
    stream = [n for n in names if space.knob(n).kind == "channels" and "layer1.0.conv2" in space.specs[n].members]
    assert len(stream) == 1
    assert {"stem.0", "layer1.0.conv2", "layer1.1.conv2"} <= set(space.specs[stream[0]].members)
    assert "fc" not in names and "fc" in space.skipped  # the classifier is never pruned
    result = prune(model, x, {stream[0]: 0.5}, space)
    assert result.widths["stem.0"] == (16, 8)
    assert result.widths["layer1.1.conv2"] == (16, 8)
    assert result.widths["layer1.0.conv1"] == (16, 16)


def test_concat_branches_prune_independently() -> None:
    model, x = _make("concat")
    space = PruningSpace.build(model, x)
    assert {"b1.0", "b2.0", "mix", "dense"} <= set(space.names)
    result = prune(model, x, {"b1.0": 0.7, "b2.0": 0.5, "dense": 0.5}, space)
    assert result.widths["b1.0"] == (24, 8)
    assert result.widths["b2.0"] == (16, 8)
    assert result.module.mix.in_channels == 16
    assert result.module.head.in_channels == 32 + 8
    assert _run(result.module, x).shape == (1, 10)


def test_depthwise_and_grouped_convs() -> None:
    model, x = _make("mobilenet")
    space = PruningSpace.build(model, x, channel_multiple=8)
    grouped = space.knob("pre.0")  # its output feeds the groups=4 conv's input
    assert grouped.groups == 4
    assert space.knob("grouped.0").groups == 4
    result = prune(model, x, {"block1.expand.0": 0.5, "pre.0": 0.5, "grouped.0": 0.75}, space)
    m = result.module
    dw = m.block1.dw[0]
    assert dw.in_channels == dw.out_channels == dw.groups == 48  # 96 -> 48, still depthwise
    assert m.block1.project[0].in_channels == 48
    assert m.grouped[0].groups == 4
    assert m.grouped[0].in_channels == 16 and m.grouped[0].out_channels == 8
    assert m.post.in_channels == 8
    # groups=4 with multiple 8 -> widths move in steps of 8; never a width the groups cannot split
    assert Knob("g", 32, 8, 0.75, "channels", groups=4).widths() == [8, 16, 24, 32]
    assert Knob("g", 12, 8, 0.75, "channels", groups=3).widths() == [9, 12]


def test_regnet_group_width_rounding() -> None:
    model, x = _make("regnet")
    space = PruningSpace.build(model, x, channel_multiple=8)
    knob = space.knob("blocks.0.b.0")
    assert knob.groups == 6 and knob.widths() == [24, 48]  # lcm(8, 6 groups) = 24
    result = prune(model, x, {"blocks.0.a.0": 0.5, "blocks.0.b.0": 0.5}, space)
    conv = result.module.blocks[0].b[0]
    assert (conv.in_channels, conv.out_channels, conv.groups) == (24, 24, 6)
    assert result.module.blocks[0].c[0].in_channels == 24


def test_squeeze_excitation_and_narrow_groups() -> None:
    model, x = _make("se")
    space = PruningSpace.build(model, x, channel_multiple=8)
    assert "se.fc1" in space.names
    assert "se2.fc1" not in space.names and "too few" in space.skipped["se2.fc1"]
    result = prune(model, x, {"se.fc1": 0.5, "conv1.0": 0.5}, space)
    assert result.widths["se.fc1"] == (16, 8)
    assert result.widths["conv1.0"] == (32, 16)
    assert result.module.se.fc2.out_channels == 16  # the excitation scales the pruned trunk, so it shrinks too


def test_mlp_layernorm_widths() -> None:
    model, x = _make("mlp")
    space = PruningSpace.build(model, x, channel_multiple=16)
    result = prune(model, x, {"net.0": 0.5, "net.3": 0.4}, space)
    assert result.module.net[1].normalized_shape == (32,)
    assert result.widths["net.0"] == (64, 32)
    assert result.widths["net.3"] == (48, 32)  # 48 * 0.6 = 28.8 -> nearest multiple of 16
    assert result.widths["net.7"] == (3, 3)


def test_multihead_attention_heads() -> None:
    model, x = _make("vit")
    space = PruningSpace.build(model, x)
    knob = space.knob("blocks.0.attn")
    assert (knob.kind, knob.channels, knob.head_dim, knob.multiple) == ("heads", 4, 8, 1)
    assert {"blocks.1.attn", "patch", "norm"} <= set(space.specs[knob.name].members)
    result = prune(model, x, {knob.name: 0.5}, space)
    for block in result.module.blocks:
        a = block.attn
        assert (a.num_heads, a.head_dim, a.embed_dim) == (2, 8, 16)
        assert a.in_proj_weight.shape == (48, 16)
    assert result.module.pos.shape == (1, 17, 16)
    assert result.module.cls_token.shape == (1, 1, 16)
    assert result.kept[knob.name] == 2
    assert result.widths["blocks.1.attn"] == (32, 16)


def test_bert_heads_and_hidden() -> None:
    model, ids = _make("bert_cls")
    space = PruningSpace.build(model, ids)
    layer = "bert.encoder.layer.0.attention.self"
    knob = space.knob(layer)
    assert (knob.kind, knob.channels, knob.head_dim) == ("heads", 4, 16)
    assert "classifier" in space.skipped
    # make head 2 of layer 0 clearly the weakest, so it is the one removed
    attention = model.get_submodule(layer)
    with torch.no_grad():
        for proj in (attention.query, attention.key, attention.value):
            proj.weight[32:48] *= 0.01
    result = prune(model, ids, {layer: 0.25, "bert.embeddings.word_embeddings": 0.5}, space)
    pruned = result.module.get_submodule(layer)
    assert pruned.num_attention_heads == 3
    assert pruned.attention_head_size == 16
    assert pruned.all_head_size == 48 == pruned.query.out_features
    keep = torch.cat([torch.arange(0, 32), torch.arange(48, 64)])
    torch.testing.assert_close(pruned.query.weight, attention.query.weight[keep][:, _kept_hidden(model, result)])
    assert result.module.bert.embeddings.word_embeddings.embedding_dim == 32
    assert result.module.bert.encoder.layer[1].attention.self.num_attention_heads == 4


def _kept_hidden(model: nn.Module, result: PrunedModel) -> torch.Tensor:
    # which hidden channels survived: match the pruned LayerNorm weights against the original ones
    before = model.bert.embeddings.LayerNorm.weight
    after = result.module.bert.embeddings.LayerNorm.weight
    return torch.tensor([int(torch.nonzero(before == v)[0]) for v in after])


def test_bert_backbone_keeps_its_hidden_size() -> None:
    model, ids = _make("bert")
    space = PruningSpace.build(model, ids)
    assert "embeddings.word_embeddings" in space.skipped  # last_hidden_state would shrink
    assert all(k.kind == "heads" or "intermediate" in k.name for k in space.knobs)
    result = prune(model, ids, space.uniform(0.75), space)
    assert {k: v for k, v in result.kept.items() if "attention" in k} == {
        "encoder.layer.0.attention.self": 1, "encoder.layer.1.attention.self": 1}
    assert _run(result.module, ids).shape == (1, 8, 64)


def test_bert_eager_attention() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64,
                                     vocab_size=50, max_position_embeddings=16, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = _ids() % 50
    space = PruningSpace.build(model, ids)
    result = prune(model, ids, space.uniform(0.5), space)
    assert result.kept["bert.encoder.layer.0.attention.self"] == 2
    assert _run(result.module, ids).shape == (1, 2)


class FusedAttention(nn.Module):
    """timm-style attention: one qkv projection and a head count hwprune does not know how to split."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        a = torch.softmax(q @ k.transpose(-2, -1) * self.head_dim**-0.5, -1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, c))


class FusedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.attn = FusedAttention()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.out = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        x = x + self.attn(x)
        return self.out((x + self.fc2(torch.relu(self.fc1(x)))).mean(1))


def test_unknown_attention_is_left_alone() -> None:
    torch.manual_seed(0)
    model, x = FusedNet().eval(), torch.randn(1, 5, 8)
    space = PruningSpace.build(model, x)
    assert space.names == ["fc1"]
    assert "not supported" in space.skipped["attn.qkv"]
    result = prune(model, x, space.uniform(0.5), space)
    assert result.module.attn.qkv.out_features == 96
    assert _run(result.module, x).shape == (1, 3)


# ---------------------------------------------------------------------------------------------------------------------
# importance, rounding, errors


class TwoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(16, 4, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


def test_importance_keeps_largest_norm_channels() -> None:
    model = TwoConv().eval()
    norms = torch.tensor([5.0, 1, 9, 3, 14, 2, 8, 11, 4, 13, 6, 16, 7, 10, 12, 15])
    with torch.no_grad():
        w = torch.randn(16, 3, 3, 3)
        model.conv1.weight.copy_(w / w.flatten(1).norm(dim=1)[:, None, None, None] * norms[:, None, None, None])
        model.conv2.weight.fill_(0.1)  # every input channel of conv2 weighs the same
    x = _images()
    space = PruningSpace.build(model, x, channel_multiple=4)
    assert space.names == ["conv1"]  # conv2 produces the output
    result = prune(model, x, {"conv1": 0.5}, space, importance="l2")
    keep = sorted(torch.argsort(norms, descending=True)[:8].tolist())
    torch.testing.assert_close(result.module.conv1.weight, model.conv1.weight[keep])
    torch.testing.assert_close(result.module.conv2.weight, model.conv2.weight[:, keep])
    assert prune(model, x, {"conv1": 0.5}, space, importance="l1").kept == {"conv1": 8}
    # a callable importance decides instead: here, later channels matter more
    result = prune(model, x, {"conv1": 0.5}, space, importance=lambda group: torch.arange(16.0))
    torch.testing.assert_close(result.module.conv1.weight, model.conv1.weight[8:])


def test_knob_rounding() -> None:
    k = Knob("a", 100, 16, 0.75, "channels")
    assert k.kept(0.0) == 100
    assert k.kept(0.01) == 100  # 99 is nearer 100 than 96
    assert k.kept(0.3) == 64  # 70 -> 64
    assert k.kept(0.75) == 32  # 25 is the floor; 16 would prune past max_ratio
    assert k.kept(2.0) == k.kept(0.75)
    assert k.removed_channels(0.3) == 36
    small = Knob("s", 6, 8, 0.75, "channels")
    assert small.widths() == [6]  # narrower than the multiple: cannot be pruned
    heads = Knob("h", 4, 1, 0.75, "heads", head_dim=16)
    assert [heads.kept(r) for r in (0.0, 0.2, 0.5, 0.75, 0.9)] == [4, 3, 2, 1, 1]
    assert heads.removed_channels(0.5) == 32
    with pytest.raises(HwpruneError):
        Knob("bad", 8, 8, 1.0, "channels")
    with pytest.raises(HwpruneError):
        Knob("bad", 8, 8, 0.5, "filters")


def test_uniform_and_ratio_validation() -> None:
    model, x = _make("mlp")
    space = PruningSpace.build(model, x, max_ratio=0.6)
    assert set(space.uniform(0.9).values()) == {0.6}
    assert space.check_ratios({"net.0": 0.3}) == {"net.0": 0.3, "net.3": 0.0, "net.5": 0.0}
    with pytest.raises(HwpruneError, match="net.99"):
        prune(model, x, {"net.99": 0.5}, space)
    with pytest.raises(HwpruneError, match="net.0"):
        prune(model, x, {"net.0": -0.1}, space)
    with pytest.raises(HwpruneError):
        space.uniform(1.5)
    with pytest.raises(HwpruneError, match="importance"):
        prune(model, x, {}, space, importance="taylor-ish")


def test_ignored_layers_by_name_and_module() -> None:
    model, x = _make("resnet")
    by_name = PruningSpace.build(model, x, ignored_layers=["layer2"])
    assert not any(n.startswith("layer2") for n in by_name.names)
    by_module = PruningSpace.build(model, x, ignored_layers=[model.layer1[0].conv1])
    assert "layer1.0.conv1" not in by_module.names and "layer1.1.conv1" in by_module.names
    with pytest.raises(HwpruneError, match="nope"):
        PruningSpace.build(model, x, ignored_layers=["nope"])


class Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 8), nn.ReLU())
        self.tail = nn.Linear(7, 2)  # wrong width: forward fails here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.body(x))


def test_untraceable_model_names_the_module() -> None:
    with pytest.raises(HwpruneError) as info:
        PruningSpace.build(Broken(), torch.randn(1, 10))
    message = str(info.value)
    assert "tail" in message and "Linear" in message
    assert "\n" not in message


def test_build_and_prune_leave_the_model_as_it_was() -> None:
    model, x = _make("resnet")
    model.train()
    model.stem[0].weight.requires_grad_(False)
    snap = _snapshot(model)
    space = PruningSpace.build(model, x)
    result = prune(model, x, space.uniform(0.5), space)
    _assert_same_state(model, snap)  # BN running stats included: no forward ran in train mode
    assert all(m.training for m in model.modules())
    assert not model.stem[0].weight.requires_grad and model.stem[1].weight.requires_grad
    assert all(m.training for m in result.module.modules())  # the copy keeps the caller's mode
    assert not result.module.stem[0].weight.requires_grad  # frozen stays frozen after pruning
    assert result.module.layer1[0].conv1.weight.requires_grad


def test_signature_is_stable() -> None:
    widths = {"b": (16, 8), "a": (32, 24)}
    assert architecture_signature(widths) == architecture_signature(dict(reversed(list(widths.items()))))
    assert architecture_signature(widths) != architecture_signature({"b": (16, 16), "a": (32, 24)})
    assert len(architecture_signature(widths)) == 16


def test_space_is_reusable_on_a_copy() -> None:
    model, x = _make("mobilenet")
    space = PruningSpace.build(model, x)
    twin = copy.deepcopy(model)
    assert prune(twin, x, space.uniform(0.5), space).signature == prune(model, x, space.uniform(0.5), space).signature
    other, _ = _make("resnet")
    with pytest.raises(HwpruneError, match="does not match"):
        prune(other, _images(), space.uniform(0.5), space)


# ---------------------------------------------------------------------------------------------------------------------
# depth: residual blocks removed whole


class PostNorm(nn.Module):
    """BERT-style ``LayerNorm(x + f(x))``: removing it would drop the norm too, so it is no removable block."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x + self.fc(x))


class Scaled(nn.Module):
    """``2 * x + f(x)``: the skip path is not the input itself."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x + self.fc(x)


class Plain(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


class Residual(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)


class DepthZoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.post = PostNorm()
        self.scaled = Scaled()
        self.plain = Plain()
        self.res = Residual()
        self.twice = Residual()  # called twice in forward: not one block with one input
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.twice(self.twice(self.res(self.plain(self.scaled(self.post(x)))))))


@pytest.mark.parametrize(("case", "blocks"), [
    ("resnet", ["layer1.0", "layer1.1"]),  # layer2.0 has a strided shortcut conv: not removable
    ("mobilenet", ["block1", "block2"]),
    ("regnet", ["blocks.0", "blocks.1"]),
    ("vit", ["blocks.0", "blocks.1"]),  # pre-norm: x1 = x + attn(ln(x)); x1 + mlp(ln(x1))
    ("bert", []),  # post-norm
    ("concat", []),
    ("mlp", []),
])
def test_removable_blocks_found(case: str, blocks: list[str]) -> None:
    model, x = _make(case)
    assert PruningSpace.build(model, x).blocks == blocks
    assert PruningSpace.build(model, x, depth=False).blocks == []
    assert PruningSpace.build(model, x, max_ratio=0.4).blocks == []  # a block goes from a ratio of 0.5


def test_only_plain_residual_blocks_are_removable() -> None:
    model = DepthZoo().eval()
    assert PruningSpace.build(model, torch.randn(2, 16)).blocks == ["res"]


@pytest.mark.parametrize("case", ["resnet", "mobilenet", "vit"])
def test_removed_block_is_its_skip_connection(case: str, tmp_path: Path) -> None:
    """Removing a block gives exactly the model whose block adds nothing to its input."""
    model, x = _make(case)
    space = PruningSpace.build(model, x, channel_multiple=8)
    block = space.blocks[-1]
    # the residual branch's last layer zeroed: the block computes x (+0); ResNet's ReLU then sees a ReLU's output
    inert = copy.deepcopy(model)
    last = [m for m in inert.get_submodule(block).modules() if isinstance(m, (nn.BatchNorm2d, nn.Linear))][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    if case == "vit":  # two residual branches: zero the attention's output too
        attn_out = inert.get_submodule(block).attn.out_proj
        with torch.no_grad():
            attn_out.weight.zero_()
            attn_out.bias.zero_()

    result = prune(model, x, {block: 0.5}, space)
    assert result.removed == (block,)
    assert isinstance(result.module.get_submodule(block), nn.Identity)
    torch.testing.assert_close(_run(result.module, x), _run(inert, x), rtol=1e-5, atol=1e-5)

    inside = [n for n in read_widths(model) if n.startswith(block + ".")]
    assert inside and all(result.widths[n] == (read_widths(model)[n], 0) for n in inside)
    assert result.kept[block] == 0
    assert all(result.kept[k.name] == 0 for k in space.knobs if space.specs[k.name].root.startswith(block + "."))
    macs0, params0 = count_macs_params(model, x)
    assert result.macs < macs0 and result.params < params0
    assert result.params == sum(p.numel() for p in result.module.parameters())
    _onnx_roundtrip(result.module, x, tmp_path / f"{case}.onnx", case)
    torch.save(result.module, tmp_path / "model.pt")
    again = torch.load(tmp_path / "model.pt", weights_only=False)
    torch.testing.assert_close(_run(again, x), _run(result.module, x))


def test_depth_and_width_together() -> None:
    model, x = _make("mobilenet")
    space = PruningSpace.build(model, x, channel_multiple=8)
    ratios = {**space.uniform(0.5), "block2": 0.75}
    both = prune(model, x, ratios, space)
    assert both.removed == ("block2",)
    assert both.widths["block1.expand.0"][1] < both.widths["block1.expand.0"][0]  # block1 is kept, and narrower
    assert both.widths["block2.expand.0"][1] == 0
    # a removed block's own widths do not matter: the same architecture, the same signature
    other = prune(model, x, {**ratios, "block2.expand.0": 0.0}, space)
    assert other.signature == both.signature
    assert prune(model, x, space.uniform(0.5), space).signature != both.signature
    # the space's JSON description keeps its blocks
    again = PruningSpace.from_dict(json.loads(json.dumps(space.to_dict())))
    assert again.blocks == space.blocks and prune(model, x, ratios, again).signature == both.signature


def test_block_knob_keeps_or_removes() -> None:
    k = Knob("b", 1, 1, 0.75, "block")
    assert k.widths() == [0, 1]
    assert [k.kept(r) for r in (0.0, 0.49, 0.5, 0.75, 1.0)] == [1, 1, 0, 0, 0]
    assert Knob("b", 1, 1, 0.4, "block").kept(0.9) == 1  # clipped to max_ratio
