"""Ratios -> a physically pruned copy of the model, with its widths, size and cost read back from the copy itself.

The number of channels each group loses comes from :meth:`Knob.kept`, not from Torch-Pruning's ``round_to`` (which
rounds down and miscounts with grouped convs), and the channels to drop are chosen here from the group importance.
All importances are computed on the unpruned copy before anything is removed, so the result does not depend on the
order in which groups are pruned.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from hwprune.errors import HwpruneError
from hwprune.pruning import attention as attn
from hwprune.pruning import depth
from hwprune.pruning.importance import ImportanceFn, get_importance
from hwprune.pruning.space import (
    ExampleInputs,
    Knob,
    PruningSpace,
    as_inputs,
    keep_training_flags,
    one_line,
    out_channel_fn,
    output_tensors,
    run_forward,
    trace,
)


@dataclass
class PrunedModel:
    """A pruned deep copy of a model and what was measured on it (never inferred from the requested ratios)."""

    module: nn.Module
    widths: dict[str, tuple[int, int]]  # Conv/Linear/attention name -> (original out width, kept out width)
    params: int
    macs: int
    signature: str
    kept: dict[str, int] = field(default_factory=dict)  # knob name -> kept channels (or heads), read back
    ratios: dict[str, float] = field(default_factory=dict)  # knob name -> ratio applied (after clipping)
    removed: tuple[str, ...] = ()  # residual blocks removed whole (replaced by their skip connection)


def count_macs_params(model: nn.Module, example_inputs: ExampleInputs) -> tuple[int, int]:
    """(multiply-accumulates of one forward pass, number of parameters) for ``model`` on ``example_inputs``.

    MACs come from Torch-Pruning's op counter (module-level ops: conv, linear, norms, ``nn.MultiheadAttention``;
    functional matmuls such as ``scaled_dot_product_attention`` are not counted). Parameters are counted once each,
    so tied weights are not counted twice. The model is not modified.
    """
    inputs = as_inputs(example_inputs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            macs, _ = tp.utils.count_ops_and_params(model, inputs)
        except Exception as exc:
            raise HwpruneError(f"cannot count the operations of {type(model).__name__}: {one_line(exc)}") from exc
    params = sum(p.numel() for p in model.parameters())
    return int(macs), int(params)


def architecture_signature(widths: Mapping[str, tuple[int, int] | int]) -> str:
    """A short stable hash of the achieved widths: equal for two models with the same layer widths."""
    items = []
    for name in sorted(widths):
        value = widths[name]
        kept = value[1] if isinstance(value, (tuple, list)) else value
        items.append([name, int(kept)])
    digest = hashlib.sha256(json.dumps(items, separators=(",", ":")).encode()).hexdigest()
    return digest[:16]


def _out_width(name: str, module: nn.Module) -> int | None:
    """The output width of a Conv/Linear/attention module, read from its weights, after checking its attributes."""
    if isinstance(module, nn.modules.conv._ConvNd):
        w = module.weight.shape
        width = w[1] * module.groups if module.transposed else w[0]
        if width != module.out_channels:
            raise HwpruneError(
                f"pruned layer {name} is inconsistent: out_channels={module.out_channels}, weight {tuple(w)}"
            )
        return int(width)
    if isinstance(module, nn.Linear):
        w = module.weight.shape
        if (w[0], w[1]) != (module.out_features, module.in_features):
            raise HwpruneError(
                f"pruned layer {name} is inconsistent: {module.in_features}->{module.out_features}, weight {tuple(w)}"
            )
        return int(w[0])
    if isinstance(module, nn.MultiheadAttention):
        width = module.out_proj.weight.shape[0]
        if module.embed_dim != width or module.num_heads * module.head_dim != width:
            raise HwpruneError(
                f"pruned attention {name} is inconsistent: embed_dim={module.embed_dim}, "
                f"num_heads={module.num_heads}, head_dim={module.head_dim}, width {width}"
            )
        return int(width)
    info = attn.describe(name, module)
    if info is not None and info.family == "hf":
        width = module.get_submodule("query").weight.shape[0]
        heads, head_dim = module.num_attention_heads, module.attention_head_size
        all_head = getattr(module, "all_head_size", width)
        if heads * head_dim != width or all_head != width:
            raise HwpruneError(
                f"pruned attention {name} is inconsistent: {heads} heads x {head_dim}, all_head_size={all_head}, "
                f"query width {width}"
            )
        return int(width)
    return None


def read_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every Conv/Linear/attention module, keyed by qualified name, in model order."""
    widths = {}
    for name, module in model.named_modules():
        width = _out_width(name, module)
        if width is not None:
            widths[name] = width
    return widths


def _pick(scores: torch.Tensor, n: int) -> list[int]:
    # stable sort: equal scores drop the earlier channel first, the same way every time
    order = torch.argsort(scores.float(), stable=True)
    return sorted(order[:n].tolist())


def _removal(knob: Knob, scores: torch.Tensor, kept: int) -> list[int]:
    """Indices (in the root layer's output channels) to remove so that ``kept`` channels or heads remain."""
    if knob.kind == "heads":
        per_head = scores.view(knob.channels, knob.head_dim).mean(1)
        heads = _pick(per_head, knob.channels - kept)
        return [h * knob.head_dim + d for h in heads for d in range(knob.head_dim)]
    if knob.groups > 1:
        # grouped convs keep the same positions in every group so each group stays equally wide
        size = knob.channels // knob.groups
        per_slot = scores.view(knob.groups, size).mean(0)
        slots = _pick(per_slot, (knob.channels - kept) // knob.groups)
        return sorted(g * size + s for g in range(knob.groups) for s in slots)
    return _pick(scores, knob.channels - kept)


def _restore_requires_grad(model: nn.Module, flags: dict[str, bool]) -> None:
    # Torch-Pruning rebuilds pruned parameters as fresh nn.Parameters, which would unfreeze frozen weights
    for name, p in model.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])


def _shapes(out: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in output_tensors(out)]


def _eval_shapes(model: nn.Module, inputs: tuple[torch.Tensor, ...] | dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    """Output shapes of one forward pass in eval mode (BatchNorm statistics untouched); training flags restored."""
    with keep_training_flags(model), torch.no_grad():
        model.eval()
        return _shapes(run_forward(model, inputs))


def prune(
    model: nn.Module,
    example_inputs: ExampleInputs,
    ratios: Mapping[str, float],
    space: PruningSpace,
    *,
    importance: str | ImportanceFn | None = None,
) -> PrunedModel:
    """Prune a deep copy of ``model``: each knob of ``space`` keeps ``knob.kept(ratio)`` channels (or heads), and
    each block knob whose ``kept`` is 0 removes its residual block (first, so importances are computed on the layers
    that stay; channel knobs inside a removed block then keep 0).

    ``ratios`` maps knob names to ratios; omitted knobs are not pruned, unknown names raise ``HwpruneError``.
    The lowest-importance channels go: by ``importance`` (a name of :mod:`hwprune.pruning.importance` or a callable
    on a Torch-Pruning group), by default the space's own (``space.importance``, ``"l2"`` unless set).
    The copy is checked to run on ``example_inputs`` with unchanged output shapes; ``model`` is never modified.
    """
    applied = space.check_ratios(ratios)
    score = get_importance(space.importance if importance is None else importance)
    inputs = as_inputs(example_inputs)
    plan_kept = {k.name: k.kept(applied[k.name]) for k in space.knobs}
    label = type(model).__name__

    pruned = copy.deepcopy(model)
    grads = {n: p.requires_grad for n, p in pruned.named_parameters()}
    original = read_widths(pruned)
    removed = tuple(k.name for k in space.knobs if k.kind == "block" and plan_kept[k.name] == 0)
    shapes_before = _remove_blocks(pruned, inputs, space, removed, plan_kept, label) if removed else None
    todo = [k for k in space.knobs if k.kind != "block" and 0 < plan_kept[k.name] < k.channels]

    if todo:
        traced = trace(pruned, inputs)
        if shapes_before is None:
            shapes_before = [tuple(t.shape) for t in traced.outputs]
        # decide every removal on the unpruned copy, then remove
        plan = _plan_removals(pruned, traced.graph, todo, space, score, plan_kept, label)
        _apply_plan(pruned, traced.graph, plan)
        infos, _ = attn.find_attention(model)
        for info in infos.values():
            if not depth.is_removed(pruned, info.name):
                attn.patch_heads(pruned, info)
        del plan, traced
        _restore_requires_grad(pruned, grads)

    if todo or removed:
        _check_shapes(pruned, inputs, shapes_before, label)

    after = read_widths(pruned)
    widths = {name: (original[name], after.get(name, 0)) for name in original}  # 0: removed with its block
    kept = {k.name: _kept_back(pruned, space, k) for k in space.knobs}
    for name, k in kept.items():
        if k != plan_kept[name]:
            raise HwpruneError(f"knob {name!r} kept {k} instead of {plan_kept[name]}; please report this model")
    macs, params = count_macs_params(pruned, inputs)
    # a block without Conv/Linear layers leaves the widths as they were: its removal must still change the signature
    signed = {**widths, **{f"block:{b}": 0 for b in removed}}
    return PrunedModel(pruned, widths, params, macs, architecture_signature(signed), kept, applied, removed)


def _remove_blocks(pruned: nn.Module, inputs: Any, space: PruningSpace, removed: tuple[str, ...],
                   plan_kept: dict[str, int], label: str) -> list[tuple[int, ...]]:
    """Remove the residual blocks named by ``removed`` from ``pruned``; channel knobs inside them then keep 0.

    Returns:
        The output shapes before the removal (the pruned copy must give the same).
    """
    try:
        shapes_before = _eval_shapes(pruned, inputs)
    except Exception as exc:
        raise HwpruneError(f"{label} does not run on its example inputs: {one_line(exc)}") from exc
    depth.remove_blocks(pruned, removed)
    for k in space.knobs:
        spec = space.specs.get(k.name)
        if k.kind != "block" and spec is not None and depth.is_removed(pruned, spec.root):
            plan_kept[k.name] = 0  # its layers went with their block
    return shapes_before


def _plan_removals(pruned: nn.Module, graph: Any, todo: list[Knob], space: PruningSpace, score: ImportanceFn,
                   plan_kept: dict[str, int], label: str) -> list[tuple[Knob, nn.Module, list[int]]]:
    """(knob, root layer, channel indices to remove) for every knob in ``todo``, ranked by ``score``.

    Raises:
        HwpruneError: the space does not match the model, or the importance gave the wrong number of scores.
    """
    modules = dict(pruned.named_modules())
    plan: list[tuple[Knob, nn.Module, list[int]]] = []
    for knob in todo:
        spec = space.specs.get(knob.name)
        root = modules.get(spec.root) if spec else None
        if spec is None or root is None or root not in graph.module2node:
            raise HwpruneError(f"the pruning space does not match {label}: no layer for knob {knob.name!r}")
        width = graph.get_out_channels(root)
        if width != spec.root_channels:
            raise HwpruneError(
                f"the pruning space does not match {label}: {spec.root} has {width} channels, "
                f"the space expects {spec.root_channels}"
            )
        with torch.no_grad():
            group = graph.get_pruning_group(root, out_channel_fn(graph, root), list(range(width)))
            scores = score(group)
        if scores is None:
            scores = torch.zeros(width)
        scores = torch.as_tensor(scores).detach().flatten().cpu()
        if scores.numel() != width:
            raise HwpruneError(f"importance for knob {knob.name!r} gave {scores.numel()} scores for {width} channels")
        plan.append((knob, root, _removal(knob, scores, plan_kept[knob.name])))
    return plan


def _apply_plan(pruned: nn.Module, graph: Any, plan: list[tuple[Knob, nn.Module, list[int]]]) -> None:
    """Remove the planned channels through Torch-Pruning's dependency graph (coupled layers follow)."""
    mhas = [m for m in pruned.modules() if isinstance(m, nn.MultiheadAttention)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for knob, root, idxs in plan:
            try:
                with attn.relaxed_mha_checks(mhas):
                    group = graph.get_pruning_group(root, out_channel_fn(graph, root), idxs)
                    if not graph.check_pruning_group(group):
                        raise HwpruneError(f"knob {knob.name!r}: pruning would remove every channel of a layer")
                    group.prune(record_history=False)
            except HwpruneError:
                raise
            except Exception as exc:
                raise HwpruneError(f"cannot prune knob {knob.name!r}: {one_line(exc)}") from exc


def _check_shapes(pruned: nn.Module, inputs: Any, shapes_before: list[tuple[int, ...]] | None, label: str) -> None:
    """Raise HwpruneError unless the pruned copy runs and gives the output shapes it gave before pruning."""
    try:
        shapes_after = _eval_shapes(pruned, inputs)
    except Exception as exc:
        raise HwpruneError(f"the pruned {label} no longer runs: {one_line(exc)}") from exc
    if shapes_after != shapes_before:
        raise HwpruneError(f"pruning changed the output shapes of {label}: {shapes_before} -> {shapes_after}")


def _kept_back(model: nn.Module, space: PruningSpace, knob: Knob) -> int:
    """The width (or head count) a knob's root layer really has in ``model``; 0 when it was removed with its block,
    and for a block knob 1 (kept) or 0 (removed)."""
    spec = space.specs[knob.name]
    if depth.is_removed(model, spec.root):
        return 0
    if knob.kind == "block":
        return 1
    root = model.get_submodule(spec.root)
    if isinstance(root, nn.MultiheadAttention):
        width = root.embed_dim
    elif isinstance(root, nn.modules.conv._ConvNd):
        width = root.out_channels
    elif isinstance(root, nn.Linear):
        width = root.out_features
    elif isinstance(root, nn.Embedding):
        width = root.embedding_dim
    else:
        raise HwpruneError(f"knob {knob.name!r}: cannot read the width of {type(root).__name__}")
    return width // knob.head_dim if knob.kind == "heads" else width
