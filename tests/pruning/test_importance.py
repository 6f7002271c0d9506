"""Channel importance criteria (l2, l1, bn-scale, taylor, auto) on a real small model, and how they travel with the
pruning space into ``prune``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from tiny_subject import TinyNet

import hwprune.api
from hwprune.config import IMPORTANCES, SearchConfig
from hwprune.errors import HwpruneError
from hwprune.pruning import PruningSpace, prune
from hwprune.pruning.importance import (
    IMPORTANCE_NAMES,
    BNScale,
    GroupMagnitude,
    TaylorImportance,
    auto_importance,
    get_importance,
    resolve_importance,
    taylor_importance,
)
from hwprune.subjects.shapes import make_shapes

torch.set_num_threads(1)

X = torch.zeros(1, 3, 32, 32)
N = 48  # TinyNet's width


def _tiny() -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet().eval()
    with torch.no_grad():
        model.branch_a[1].bias.copy_(torch.arange(float(N)))  # labels each branch_a channel: read back which survive
    return model


def _batches(n: int = 2, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = make_shapes(n * size, seed=11)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n * size, size)]


def _kept_a(result) -> list[int]:
    """Which original branch_a channels survived (their BatchNorm bias is their index)."""
    return [int(v) for v in result.module.branch_a[1].bias.round()]


def _space(model: nn.Module, **kw) -> PruningSpace:
    return PruningSpace.build(model, X, channel_multiple=8, **kw)


def test_bn_scale_keeps_the_largest_gammas() -> None:
    model = _tiny()
    gen = torch.Generator().manual_seed(3)
    gamma = torch.randperm(N, generator=gen).float() + 1
    signs = torch.where(torch.rand(N, generator=gen) < 0.5, -1.0, 1.0)  # |gamma| counts, not gamma
    with torch.no_grad():
        model.branch_a[1].weight.copy_(gamma * signs)
        # conv filter norms in the opposite order, so l2 (which also counts these) keeps other channels
        w = model.branch_a[0].weight
        w.copy_(w / w.flatten(1).norm(dim=1)[:, None, None, None] * (100.0 / gamma)[:, None, None, None])
    space = _space(model, importance="bn-scale")
    result = prune(model, X, {"branch_a.0": 0.5}, space)  # the space's importance decides
    assert _kept_a(result) == sorted(torch.argsort(gamma, descending=True)[:24].tolist())
    torch.testing.assert_close(result.module.branch_a[1].weight.abs(), gamma[_kept_a(result)])
    l2 = prune(model, X, {"branch_a.0": 0.5}, space, importance="l2")  # an explicit importance wins
    assert _kept_a(l2) != _kept_a(result)


def test_bn_scale_averages_the_coupled_batchnorms() -> None:
    model = _tiny()
    gamma = torch.randperm(N, generator=torch.Generator().manual_seed(4)).float() + 1
    with torch.no_grad():
        model.stem[1].weight.copy_(gamma)  # stem, dw and pw share the residual's channels; dw.1 and pw.1 stay 1
        model.stem[1].bias.copy_(torch.arange(float(N)))
    result = prune(model, X, {"stem.0": 0.5}, _space(model), importance="bn-scale")
    kept = [int(v) for v in result.module.stem[1].bias.round()]
    assert kept == sorted(torch.argsort(gamma, descending=True)[:24].tolist())


def test_bn_scale_falls_back_to_l2_without_batchnorm() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(2, 16)
    space = PruningSpace.build(mlp, x, channel_multiple=8)
    a = prune(mlp, x, {"0": 0.5}, space, importance="bn-scale").module
    b = prune(mlp, x, {"0": 0.5}, space, importance="l2").module
    torch.testing.assert_close(a[0].weight, b[0].weight)
    assert not torch.equal(a[0].weight, prune(mlp, x, {"0": 0.5}, space, importance=lambda g: -torch.arange(32.0))
                           .module[0].weight)


def test_taylor_scores_come_from_the_precomputed_gradients() -> None:
    model = _tiny()
    model.stem[0].weight.requires_grad_(False)  # frozen layers still get a gradient (on the copy)
    imp = taylor_importance(model, _batches(), loss_fn=nn.functional.cross_entropy, max_batches=2)
    assert isinstance(imp, TaylorImportance) and imp.batches == 2
    # the model itself is untouched
    assert all(p.grad is None for p in model.parameters())
    assert not model.stem[0].weight.requires_grad and model.branch_a[0].weight.requires_grad
    assert imp.grads["stem.0.weight"].abs().sum() > 0

    # the scores prune sees on its deep copy are |w * g| summed per channel, averaged over the group's layers
    seen: list[torch.Tensor] = []

    def spy(group):
        seen.append(imp(group))
        return seen[-1]

    prune(model, X, {"branch_a.0": 0.5}, _space(model), importance=spy)
    g = imp.grads
    conv = (model.branch_a[0].weight * g["branch_a.0.weight"]).abs().flatten(1).sum(1)
    bn = (model.branch_a[1].weight * g["branch_a.1.weight"]).abs()
    head = (model.head[2].weight * g["head.2.weight"]).abs()[:, :N].sum(0)  # branch_a feeds the first 48 inputs
    torch.testing.assert_close(seen[0], (conv + bn + head) / 3)


def test_taylor_removes_a_zero_gradient_channel_first() -> None:
    model = _tiny()
    k = 5
    with torch.no_grad():
        model.branch_a[0].weight[k] *= 50  # by far the largest filter: l2 keeps it
    imp = taylor_importance(model, _batches(), max_batches=1)
    for name in ("branch_a.0.weight", "branch_a.1.weight"):
        imp.grads[name][k] = 0
    imp.grads["head.2.weight"][:, k] = 0
    space = _space(model, importance=imp)  # the importance travels with the space into prune's deep copy
    smallest = 8 / N  # the smallest step: 8 channels go
    assert k not in _kept_a(prune(model, X, {"branch_a.0": smallest}, space))
    assert k in _kept_a(prune(model, X, {"branch_a.0": smallest}, space, importance="l2"))
    # a space rebuilt from its description keeps a named importance, not a callable one
    assert PruningSpace.from_dict(json.loads(json.dumps(space.to_dict()))).importance == "l2"
    named = _space(model, importance="bn-scale")
    assert PruningSpace.from_dict(json.loads(json.dumps(named.to_dict()))).importance == "bn-scale"


def test_taylor_pseudo_labels_and_wrong_model() -> None:
    model = _tiny()
    inputs_only = [x for x, _ in _batches()]
    imp = taylor_importance(model, inputs_only, max_batches=2)  # the dense model's argmax as labels
    assert imp.batches == 2 and imp.grads["branch_a.0.weight"].abs().sum() > 0
    result = prune(model, X, {"branch_a.0": 0.5, "stem.0": 0.25}, _space(model), importance=imp)
    assert result.kept == {"stem.0": 40, "branch_a.0": 24, "branch_b.0": 48}
    other = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    with pytest.raises(HwpruneError, match="another model"):
        prune(other, X, {"0": 0.5}, PruningSpace.build(other, X, channel_multiple=8), importance=imp)
    with pytest.raises(HwpruneError, match="no batches"):
        taylor_importance(model, [])


def test_unknown_and_data_less_names() -> None:
    model = _tiny()
    for bad in ("taylor-ish", "L2", "auto", 3):
        with pytest.raises(HwpruneError, match="unknown importance"):
            get_importance(bad)
    with pytest.raises(HwpruneError, match="unknown importance"):
        _space(model, importance="magnitude")
    with pytest.raises(HwpruneError, match="unknown importance"):
        resolve_importance("fisher", model, _batches())
    with pytest.raises(HwpruneError, match="calibration data"):
        get_importance("taylor")
    with pytest.raises(HwpruneError, match="calibration data"):
        _space(model, importance="taylor")
    with pytest.raises(HwpruneError, match="calibration data"):
        resolve_importance("taylor", model, None)
    assert isinstance(get_importance("l1"), GroupMagnitude) and isinstance(get_importance("bn-scale"), BNScale)
    assert resolve_importance("l1", model) == "l1"
    assert isinstance(resolve_importance("taylor", model, _batches(1)), TaylorImportance)


def test_auto_picks_per_family() -> None:
    resnet_like = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    depthwise = _tiny()  # TinyNet has a depthwise conv, like MobileNet
    mlp = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 4))
    expected = {id(resnet_like): "bn-scale", id(depthwise): "l2", id(mlp): "l2"}
    for model in (resnet_like, depthwise, mlp):
        for data in (None, _batches(1)):  # taylor is never picked, so calibration data does not change the pick
            assert auto_importance(model, data) == expected[id(model)]
            assert resolve_importance("auto", model, data) == expected[id(model)]
    x = torch.zeros(1, 3, 32, 32)
    space = PruningSpace.build(resnet_like, x, importance=resolve_importance("auto", resnet_like))
    assert space.importance == "bn-scale"


def test_config_and_api() -> None:
    assert set(IMPORTANCES) == set(IMPORTANCE_NAMES) | {"auto"}
    assert SearchConfig().importance in IMPORTANCES
    assert SearchConfig(importance="taylor").importance == "taylor"
    with pytest.raises(HwpruneError, match="importance"):
        SearchConfig(importance="fisher")
    model = _tiny()
    dense = copy.deepcopy(model.state_dict())
    a = hwprune.api.prune(model, X, 0.5, channel_multiple=8, importance="taylor", calibration_data=_batches(1))
    b = hwprune.api.prune(model, X, 0.5, channel_multiple=8)
    assert a.kept == b.kept and _kept_a(a) != _kept_a(b)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in dense.items())
