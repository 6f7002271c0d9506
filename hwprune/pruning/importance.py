"""Channel importance for a Torch-Pruning group: how much each channel of the group's root layer matters.

Every criterion here scores each weight, sums the scores of the weights tied to a channel in each layer the group
touches, and averages those sums per channel over the layers (Torch-Pruning's ``group_reduction="mean"``):

- ``"l2"`` (default) / ``"l1"``: weight magnitude ``|w|^p`` (Torch-Pruning's ``GroupMagnitudeImportance`` idea).
  This version also counts depthwise convolutions, embeddings and ``nn.MultiheadAttention`` projections
  (Torch-Pruning's skips them, which would rank MobileNet and transformer channels on a fraction of their weights),
  and it computes grouped-conv input norms per group instead of repeating one group's norms.
- ``"bn-scale"``: ``|gamma|`` of the group's BatchNorm layers only (network slimming, Liu et al. 2017); a group
  without BatchNorm falls back to ``"l2"``.
- ``"taylor"``: first-order Taylor ``|w * dL/dw|`` (Molchanov et al. 2019; Torch-Pruning's ``TaylorImportance``),
  from gradients computed once on the dense model (:func:`taylor_importance`). ``prune`` scores a deep copy, so
  the gradients are looked up by parameter qualified name, never by object identity.

``resolve_importance`` turns a name (or ``"auto"``) plus a subject's calibration data into what ``prune`` takes.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from hwprune.errors import HwpruneError

ImportanceFn = Callable[[object], "torch.Tensor | None"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GroupScore:
    """Per channel of the group's root: the mean over the group's layers of the summed per-weight scores tied to it.

    Subclasses say how one parameter's weights are scored (:meth:`_elementwise`, same shape as the parameter,
    non-negative); ``None`` leaves that layer out of the average.
    """

    def _elementwise(self, layer: nn.Module, attr: str, DG: tp.DependencyGraph) -> torch.Tensor | None:
        raise NotImplementedError

    @staticmethod
    def _rows(s: torch.Tensor) -> torch.Tensor:
        return s.flatten(1).sum(1)

    def _local(self, layer: object, handler: object, idxs: list[int], DG: tp.DependencyGraph) -> torch.Tensor | None:
        out = DG.is_out_channel_pruning_fn(handler)
        if isinstance(layer, nn.modules.conv._ConvNd):
            if layer.transposed and layer.groups != 1:  # weight is [in, out/groups, ...]; excluded from the space
                return None
            s = self._elementwise(layer, "weight", DG)
            if s is None:
                return None
            if layer.transposed:
                return self._rows(s.transpose(0, 1)[idxs] if out else s[idxs])
            if out or (layer.groups == layer.out_channels == layer.in_channels):
                return self._rows(s[idxs])  # depthwise: a channel's input and output share one filter
            g = layer.groups
            # [out, in/g, k..] -> score of each input channel over the output channels of its own group
            per_in = s.reshape(g, layer.out_channels // g, layer.in_channels // g, -1)
            return per_in.sum(dim=(1, 3)).reshape(-1)[idxs]
        if isinstance(layer, nn.Linear):
            s = self._elementwise(layer, "weight", DG)
            if s is None:
                return None
            return self._rows(s[idxs] if out else s.t()[idxs])
        if isinstance(layer, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
            if getattr(layer, "weight", None) is None:
                return None
            s = self._elementwise(layer, "weight", DG)
            return None if s is None else s[idxs]
        if isinstance(layer, nn.Embedding):
            s = self._elementwise(layer, "weight", DG)
            return None if s is None else self._rows(s.t()[idxs])
        if isinstance(layer, nn.MultiheadAttention) and layer.in_proj_weight is not None:
            e = layer.embed_dim
            ip = self._elementwise(layer, "in_proj_weight", DG)
            op = self._elementwise(layer, "out_proj.weight", DG)
            if ip is None or op is None:
                return None
            rows = sum(self._rows(ip[k * e : (k + 1) * e][idxs]) for k in range(3))
            return rows + self._rows(ip.t()[idxs]) + self._rows(op[idxs]) + self._rows(op.t()[idxs])
        return None

    @torch.no_grad()
    def __call__(self, group: object) -> torch.Tensor | None:
        DG = group._DG
        total: torch.Tensor | None = None
        count: torch.Tensor | None = None
        for item in group:
            dep, idxs = item.dep, item.idxs
            root_idxs = item.root_idxs
            if any(r is None for r in root_idxs):
                continue
            local = self._local(dep.target.module, dep.handler, list(idxs), DG)
            if local is None:
                continue
            local = local.float().cpu()
            if total is None:
                n = len(group[0].idxs)
                total, count = torch.zeros(n), torch.zeros(n)
            index = torch.tensor(root_idxs, dtype=torch.long)
            total.scatter_add_(0, index, local)
            count.scatter_add_(0, index, torch.ones_like(local))
        if total is None or count is None:
            return None
        return total / count.clamp(min=1)


class GroupMagnitude(GroupScore):
    """Mean over the group's layers of each channel's weight p-norm (to the power p, which keeps the ranking)."""

    def __init__(self, p: int = 2) -> None:
        self.p = p

    def _elementwise(self, layer: nn.Module, attr: str, DG: tp.DependencyGraph) -> torch.Tensor | None:
        return layer.get_parameter(attr).detach().abs().pow(self.p)

    def __repr__(self) -> str:
        return f"GroupMagnitude(p={self.p})"


class BNScale(GroupMagnitude):
    """Mean ``|gamma|`` of the group's BatchNorm layers; groups without an affine BatchNorm use ``fallback``."""

    def __init__(self, fallback: ImportanceFn | None = None) -> None:
        super().__init__(p=1)
        self.fallback = fallback if fallback is not None else GroupMagnitude(p=2)

    def _local(self, layer: object, handler: object, idxs: list[int], DG: tp.DependencyGraph) -> torch.Tensor | None:
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            return super()._local(layer, handler, idxs, DG)
        return None

    def __call__(self, group: object) -> torch.Tensor | None:
        scores = super().__call__(group)
        return self.fallback(group) if scores is None else scores

    def __repr__(self) -> str:
        return f"BNScale(fallback={self.fallback!r})"


class TaylorImportance(GroupScore):
    """First-order Taylor importance ``|w * dL/dw|`` from precomputed gradients keyed by parameter qualified name.

    ``grads`` maps every parameter name of the dense model (``named_parameters(remove_duplicate=False)``) to its
    gradient; the layers of a group are named through the DependencyGraph of the model being pruned, which is a
    deep copy with the same names.
    """

    def __init__(self, grads: dict[str, torch.Tensor], batches: int = 0) -> None:
        self.grads = grads
        self.batches = batches

    def _elementwise(self, layer: nn.Module, attr: str, DG: tp.DependencyGraph) -> torch.Tensor | None:
        name = DG._module2name.get(layer)
        if name is None:
            return None
        key = f"{name}.{attr}" if name else attr
        w = layer.get_parameter(attr).detach()
        g = self.grads.get(key)
        if g is None or g.shape != w.shape:
            found = "no gradient" if g is None else f"a gradient of shape {tuple(g.shape)}"
            raise HwpruneError(
                f"taylor importance: {found} for {key} {tuple(w.shape)}; the gradients were computed for another "
                "model (compute them with taylor_importance on the unpruned model this space was built for)"
            )
        return (w * g.to(w.device, w.dtype)).abs()

    def __repr__(self) -> str:
        return f"TaylorImportance({len(self.grads)} gradients, {self.batches} batches)"


def _split(batch: Any) -> tuple[Any, Any]:
    """(inputs, targets or None) of a calibration batch: a tensor/dict of inputs, or (inputs, targets)."""
    if isinstance(batch, (tuple, list)):
        if len(batch) >= 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
    return batch, None


def _logits(model: nn.Module, inputs: Any) -> torch.Tensor:
    if isinstance(inputs, dict):
        out = model(**inputs)
    elif isinstance(inputs, (tuple, list)):
        out = model(*inputs)
    else:
        out = model(inputs)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise HwpruneError(f"taylor importance: the model returned {type(out).__name__}, not a tensor of logits")
    return out


def _pseudo_label_loss(out: torch.Tensor) -> torch.Tensor:
    flat = out.reshape(-1, out.shape[-1])
    return F.cross_entropy(flat, flat.detach().argmax(-1))


def taylor_importance(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn | None = None,
                      max_batches: int = 4) -> TaylorImportance:
    """First-order Taylor importance of ``model``'s channels, from the gradients of up to ``max_batches`` batches.

    Batches of (inputs, targets) use ``loss_fn`` (cross-entropy when None); batches of inputs alone use
    cross-entropy against the dense model's own argmax (pseudo-labels). The gradients are computed once, here,
    in eval mode on a deep copy (``model`` and its ``.grad`` are untouched, frozen parameters get gradients too),
    summed over the batches, and kept by parameter name so they apply to any deep copy that ``prune`` scores.
    """
    if max_batches < 1:
        raise HwpruneError(f"taylor importance: max_batches must be at least 1, not {max_batches}")
    if batches is None:
        raise HwpruneError("taylor importance needs calibration data (batches of inputs, or of (inputs, targets))")
    dense = copy.deepcopy(model).eval()
    named = list(dense.named_parameters(remove_duplicate=False))
    for _, p in named:
        if p.is_floating_point():
            p.requires_grad_(True)
        p.grad = None
    used = 0
    with torch.enable_grad():
        for batch in itertools.islice(batches, max_batches):
            inputs, targets = _split(batch)
            try:
                out = _logits(dense, inputs)
                if targets is None:
                    loss = _pseudo_label_loss(out)
                else:
                    loss = (loss_fn or F.cross_entropy)(out, targets)
                loss.backward()
            except HwpruneError:
                raise
            except Exception as exc:  # noqa: BLE001 - one line naming what failed
                raise HwpruneError(f"taylor importance: cannot compute gradients on a calibration batch: "
                                   f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
            used += 1
    if used == 0:
        raise HwpruneError("taylor importance: the calibration data has no batches")
    grads = {name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p.detach()))
             for name, p in named}
    del dense, named
    return TaylorImportance(grads, used)


# ---------------------------------------------------------------------------------------------------------------------
# registry: name -> factory(model, calibration_data, loss_fn) -> ImportanceFn


def _taylor_factory(model: nn.Module | None, data: Iterable[Any] | None, loss_fn: LossFn | None) -> ImportanceFn:
    if model is None or data is None:
        raise HwpruneError(
            "importance 'taylor' needs gradients from calibration data: pass taylor_importance(model, batches) or "
            "resolve_importance('taylor', model, calibration_data, loss_fn)"
        )
    return taylor_importance(model, data, loss_fn)


IMPORTANCES: dict[str, Callable[[nn.Module | None, Iterable[Any] | None, LossFn | None], ImportanceFn]] = {
    "l2": lambda model, data, loss_fn: GroupMagnitude(p=2),
    "l1": lambda model, data, loss_fn: GroupMagnitude(p=1),
    "bn-scale": lambda model, data, loss_fn: BNScale(),
    "taylor": _taylor_factory,
}
IMPORTANCE_NAMES = tuple(IMPORTANCES)
DEFAULT_IMPORTANCE = "l2"


def _unknown(importance: object) -> HwpruneError:
    return HwpruneError(
        f"unknown importance {importance!r}; choose one of {', '.join(IMPORTANCE_NAMES)}, 'auto' "
        "(resolve_importance) or pass a callable"
    )


def get_importance(importance: str | ImportanceFn) -> ImportanceFn:
    """An importance estimator from a name (``"l2"``, ``"l1"``, ``"bn-scale"``) or a callable taking a
    Torch-Pruning group. ``"taylor"`` needs calibration data: see :func:`taylor_importance`.

    A callable must return one score per channel of the group's root (higher = keep), or None for no preference.
    """
    if callable(importance):
        return importance
    factory = IMPORTANCES.get(importance) if isinstance(importance, str) else None
    if factory is None:
        raise _unknown(importance)
    return factory(None, None, None)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has an affine BatchNorm layer."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine for m in model.modules())


def has_grouped_convs(model: nn.Module) -> bool:
    """Whether ``model`` has a grouped (e.g. depthwise) convolution."""
    return any(isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 for m in model.modules())


def auto_importance(model: nn.Module, calibration_data: Iterable[Any] | None = None) -> str:
    """The criterion ``"auto"`` picks for ``model``, per family, from bench/bench_importance.py (docs/benchmarks.md,
    "Channel importance"):

    - BatchNorm CNNs without grouped convolutions (ResNet/VGG-like): ``"bn-scale"``. On ``resnet-tiny`` it was the
      most accurate after the 100-step fine-tune at every ratio, +2.3 and +0.9 points over l2 on two dense models
      (10 of 12 paired runs better).
    - everything else, depthwise CNNs (MobileNet-like) and models without BatchNorm (transformers): ``"l2"``. On
      ``mobilenet-tiny`` bn-scale lost 1.4-21 points and l1/taylor tied with l2; on the small ViT (a weak model:
      0.6 dense accuracy) l1 and taylor were ahead at ratios 0.3-0.5 by 0.1-5 points, too little evidence to move
      that family off l2.

    ``"taylor"`` is never picked, calibration data or not: it was never better than l2 after fine-tuning (and
    lost most of the accuracy that BN re-calibration alone keeps), so ``calibration_data`` does not change the pick.
    """
    if has_batchnorm(model) and not has_grouped_convs(model):
        return "bn-scale"
    return "l2"


def resolve_importance(name: str | ImportanceFn, model: nn.Module, calibration_data: Iterable[Any] | None = None,
                       loss_fn: LossFn | None = None) -> str | ImportanceFn:
    """What ``PruningSpace.build(..., importance=...)`` / ``prune`` take for a search's ``--importance``.

    ``"auto"`` picks per model family (:func:`auto_importance`); ``"taylor"`` computes the dense model's gradients
    now, from ``calibration_data`` (an ``HwpruneError`` without it); other names and callables are returned as they
    are (names stay names so a space that carries them still serialises).
    """
    if callable(name):
        return name
    if name == "auto":
        name = auto_importance(model, calibration_data)
    if not isinstance(name, str) or name not in IMPORTANCES:
        raise _unknown(name)
    if name == "taylor":
        return taylor_importance(model, calibration_data, loss_fn)
    return name
