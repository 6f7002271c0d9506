"""Channel importance for a Torch-Pruning group: how much each channel of the group's root layer matters.

The default is the group magnitude (Torch-Pruning's ``GroupMagnitudeImportance`` idea): every layer the group touches
contributes the p-norm of the weights tied to a channel, and the contributions are averaged per channel. This version
also counts depthwise convolutions, embeddings and ``nn.MultiheadAttention`` projections (Torch-Pruning's skips them,
which would rank MobileNet and transformer channels on a fraction of their weights), and it computes grouped-conv
input norms per group instead of repeating one group's norms.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch_pruning as tp

from hwprune.errors import HwpruneError

ImportanceFn = Callable[[object], "torch.Tensor | None"]

IMPORTANCE_NAMES = ("l1", "l2")


class GroupMagnitude:
    """Mean over the group's layers of each channel's weight p-norm (to the power p, which keeps the ranking)."""

    def __init__(self, p: int = 2) -> None:
        self.p = p

    def _norm(self, w: torch.Tensor) -> torch.Tensor:
        return w.abs().pow(self.p).flatten(1).sum(1)

    def _local(self, layer: object, handler: object, idxs: list[int], DG: tp.DependencyGraph) -> torch.Tensor | None:
        out = DG.is_out_channel_pruning_fn(handler)
        if isinstance(layer, nn.modules.conv._ConvNd):
            w = layer.weight.detach()
            if layer.transposed:  # weight is [in, out/groups, ...]; grouped ones are excluded from the space
                if layer.groups != 1:
                    return None
                return self._norm(w.transpose(0, 1)[idxs] if out else w[idxs])
            if out or (layer.groups == layer.out_channels == layer.in_channels):
                return self._norm(w[idxs])  # depthwise: a channel's input and output share one filter
            g = layer.groups
            # [out, in/g, k..] -> norm of each input channel over the output channels of its own group
            per_in = w.reshape(g, layer.out_channels // g, layer.in_channels // g, -1)
            norms = per_in.abs().pow(self.p).sum(dim=(1, 3)).reshape(-1)
            return norms[idxs]
        if isinstance(layer, nn.Linear):
            w = layer.weight.detach()
            return self._norm(w[idxs] if out else w.t()[idxs])
        if isinstance(layer, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
            if getattr(layer, "weight", None) is None:
                return None
            return layer.weight.detach()[idxs].abs().pow(self.p)
        if isinstance(layer, nn.Embedding):
            return self._norm(layer.weight.detach().t()[idxs])
        if isinstance(layer, nn.MultiheadAttention) and layer.in_proj_weight is not None:
            e = layer.embed_dim
            ip = layer.in_proj_weight.detach()
            op = layer.out_proj.weight.detach()
            rows = sum(self._norm(ip[k * e : (k + 1) * e][idxs]) for k in range(3))
            return rows + self._norm(ip.t()[idxs]) + self._norm(op[idxs]) + self._norm(op.t()[idxs])
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


def get_importance(importance: str | ImportanceFn) -> ImportanceFn:
    """An importance estimator from a name (``"l1"``, ``"l2"``) or a callable taking a Torch-Pruning group.

    A callable must return one score per channel of the group's root (higher = keep), or None for no preference.
    """
    if callable(importance):
        return importance
    if importance == "l2":
        return GroupMagnitude(p=2)
    if importance == "l1":
        return GroupMagnitude(p=1)
    raise HwpruneError(
        f"unknown importance {importance!r}; choose one of {', '.join(IMPORTANCE_NAMES)} or pass a callable"
    )
