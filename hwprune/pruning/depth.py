"""Depth pruning: residual blocks that can be removed whole, leaving their skip connection.

Near a device's per-operator floor, narrower channels buy little: on the demo at 0.4x its dense latency, the most
pruned uniform model (9% of the MACs) still ran at 0.37-0.41x, because every layer costs a kernel launch however thin
it is. Removing a whole block removes its operators. A block ``y = x + f(x)`` (optionally followed by a ReLU) becomes
``y = x``: the block module is replaced by ``nn.Identity``, so the pruned model is still an ordinary module that
exports, pickles and fine-tunes like the original.

Torch-Pruning prunes widths only; this pass is hwprune's own. A module is a removable block when

* tracing it alone with ``torch.fx`` shows its output to be an addition whose skip operand is its (only) input,
  reached through nothing but ``Identity``/``Dropout`` modules or further such additions (a pre-norm transformer
  block, ``x1 = x + attn(ln(x)); return x1 + mlp(ln(x1))``), followed by nothing but ReLU-type activations
  (post-norm blocks such as BERT's ``LayerNorm(x + f(x))`` are not: without the block the norm would be gone too);
* on the example inputs it is called once, with one tensor, and returns a tensor of the same shape.

The ReLU after a post-activation block (ResNet's ``relu(x + f(x))``) goes with it: where the block's input is itself
a ReLU's output, as in ResNets, ``relu(x + 0) == x``; elsewhere the dropped ReLU is one more change the accuracy
proxy and the fine-tunes see.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from hwprune.errors import HwpruneError
from hwprune.pruning.inputs import keep_training_flags, run_forward

# what may stand between the block's input and the addition: the skip path of a ResNet block is often an
# ``nn.Identity`` module; dropout is the identity at inference
_PASS_MODULES = (nn.Identity, nn.Dropout)
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6)
_ACTIVATION_FUNCTIONS = {F.relu, F.relu6, torch.relu, torch.relu_}
_ACTIVATION_METHODS = {"relu", "relu_"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


@dataclass(frozen=True)
class Block:
    """A residual block that can be removed: its qualified name and the layers (Conv/Linear/...) inside it."""

    name: str
    layers: tuple[str, ...]


def _is_library_module(module: nn.Module) -> bool:
    # torch's own modules (Sequential, Conv2d, ...) never hold a residual addition in their forward
    return type(module).__module__.startswith("torch.")


def _skips_to(node: torch.fx.Node, source: torch.fx.Node, root: nn.Module, depth: int = 0) -> bool:
    """Whether ``node`` is ``source`` plus residual branches: ``source`` itself, through ``_PASS_MODULES``, or an
    addition one of whose operands is."""
    while node.op == "call_module" and isinstance(root.get_submodule(str(node.target)), _PASS_MODULES) \
            and len(node.args) == 1 and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    if node is source:
        return True
    if depth < 8 and _is_add(node) and len(node.args) == 2:
        return any(isinstance(a, torch.fx.Node) and _skips_to(a, source, root, depth + 1) for a in node.args)
    return False


def _is_activation(node: torch.fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(root.get_submodule(str(node.target)), _ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS
    return node.op == "call_method" and node.target in _ACTIVATION_METHODS


def _is_add(node: torch.fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS and not node.kwargs.get("alpha")
    return node.op == "call_method" and node.target in _ADD_METHODS and not node.kwargs.get("alpha")


def is_residual(module: nn.Module) -> bool:
    """Whether ``module``'s forward, traced alone with ``torch.fx``, returns ``input + something`` (then at most
    ReLU-type activations). Modules that cannot be traced are not residual blocks."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = torch.fx.Tracer().trace(module)
    except Exception:  # noqa: BLE001 - fx cannot trace every forward; such a module is simply not a candidate
        return False
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    outputs = [n for n in graph.nodes if n.op == "output"]
    if len(inputs) != 1 or len(outputs) != 1 or not isinstance(outputs[0].args[0], torch.fx.Node):
        return False
    node = outputs[0].args[0]
    while _is_activation(node, module) and node.args and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    if not _is_add(node) or len(node.args) != 2:
        return False
    operands = [a for a in node.args if isinstance(a, torch.fx.Node)]
    return len(operands) == 2 and any(_skips_to(a, inputs[0], module) for a in operands)


def _same_shape_calls(model: nn.Module, inputs: tuple[torch.Tensor, ...] | dict[str, torch.Tensor],
                      names: Iterable[str]) -> set[str]:
    """Those of ``names`` that, on one forward pass, are called exactly once with one tensor and return a tensor of
    the same shape and dtype."""
    calls: dict[str, list[bool]] = {}
    handles = []
    for name in names:
        def hook(_m: nn.Module, args: tuple[Any, ...], out: Any, name: str = name) -> None:
            ok = (len(args) == 1 and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor)
                  and out.shape == args[0].shape and out.dtype == args[0].dtype)
            calls.setdefault(name, []).append(ok)

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        with keep_training_flags(model), torch.no_grad():
            model.eval()
            run_forward(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return {n for n, seen in calls.items() if seen == [True]}


def find_blocks(model: nn.Module, inputs: tuple[torch.Tensor, ...] | dict[str, torch.Tensor],
                ignored: set[str], layer_types: tuple[type, ...]) -> list[Block]:
    """The removable residual blocks of ``model``, outermost only (a block inside a removable block is left to its
    parent), in model order; blocks holding an ignored layer are left out. ``layer_types`` are the layers listed as
    each block's ``layers``."""
    candidates = [n for n, m in model.named_modules()
                  if n and not _is_library_module(m) and n not in ignored and is_residual(m)]
    if not candidates:
        return []
    try:
        candidates = sorted(_same_shape_calls(model, inputs, candidates), key=candidates.index)
    except Exception:  # noqa: BLE001 - the channel analysis reports a forward that fails; depth just finds nothing
        return []
    outermost = [n for n in candidates if not any(n.startswith(p + ".") for p in candidates if p != n)]
    blocks = []
    for name in outermost:
        inside = [f"{name}.{n}" for n, m in model.get_submodule(name).named_modules() if n]
        if any(n in ignored for n in inside):
            continue
        layers = tuple(n for n in inside if isinstance(model.get_submodule(n), layer_types))
        blocks.append(Block(name, layers))
    return blocks


def remove_blocks(model: nn.Module, names: Iterable[str]) -> None:
    """Replace each named block of ``model`` (in place) by ``nn.Identity``."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            getattr(parent, child)
        except AttributeError:
            raise HwpruneError(f"the pruning space does not match {type(model).__name__}: no block {name!r}") from None
        setattr(parent, child, nn.Identity())  # a Sequential's child "3" is replaced in place, order kept


def is_removed(model: nn.Module, name: str) -> bool:
    """Whether the layer or block ``name`` of the original model is gone from ``model``: it, or a module holding
    it, was replaced by ``nn.Identity`` (so never ask about a layer that was an ``nn.Identity`` to begin with)."""
    prefix = ""
    for part in name.split("."):
        prefix = f"{prefix}.{part}" if prefix else part
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            return True
        if isinstance(module, nn.Identity):
            return True
    return False
