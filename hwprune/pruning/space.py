"""The pruning space: one knob per coupled channel group of a model, found with Torch-Pruning's DependencyGraph.

A *group* is every channel that must disappear together when one layer loses an output channel: the layer itself,
its BatchNorm/LayerNorm, the next layers' inputs, every branch of a residual add, the matching slice of a concat, the
depthwise conv in between. Each prunable group becomes a :class:`Knob` whose ratio the search chooses.

A removable residual block (``y = x + f(x)``, see :mod:`hwprune.pruning.depth`) is a knob too, of kind ``"block"``:
a ratio of ``BLOCK_REMOVAL`` or more removes the whole block and keeps its skip connection.

Groups that are left out (listed in ``PruningSpace.skipped`` with the reason): ones that would change the shape of a
model output (the final classifier, a backbone's last hidden state), ones touching an ignored layer, attention
modules whose head layout hwprune does not know, grouped convolutions Torch-Pruning cannot prune correctly, and
groups too narrow to prune in steps of the channel multiple.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from hwprune.errors import HwpruneError
from hwprune.pruning import attention as attn
from hwprune.pruning.depth import find_blocks
from hwprune.pruning.inputs import (  # noqa: F401 - re-exported: importers of space use these names
    ExampleInputs,
    as_inputs,
    keep_training_flags,
    output_tensors,
    run_forward,
)
from hwprune.pruning.importance import DEFAULT_IMPORTANCE, ImportanceFn, get_importance


KINDS = ("channels", "heads", "block")
BLOCK_REMOVAL = 0.5  # a block knob's ratio from which its block is removed (uniform ratios never remove blocks)
# layer types that can name a group (its "root layer"), in order of preference
_NAMING_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding)


@dataclass(frozen=True)
class Knob:
    """One coupled channel group (or one attention group) and how far it may be pruned.

    For ``kind == "channels"``, ``channels`` is the group's width and ``kept`` rounds to ``multiple`` (and to
    ``groups``, the number of conv/norm groups the width must stay divisible by). For ``kind == "heads"``,
    ``channels`` is the number of heads, each ``head_dim`` channels wide, and ``multiple`` is 1: whole heads go.
    For ``kind == "block"``, ``channels`` is 1: the block is kept (1) or removed (0, from a ratio of
    ``BLOCK_REMOVAL``).
    """

    name: str
    channels: int
    multiple: int
    max_ratio: float
    kind: str
    groups: int = 1
    head_dim: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise HwpruneError(f"knob {self.name!r}: kind must be one of {KINDS}, not {self.kind!r}")
        if self.channels < 1 or self.multiple < 1 or self.groups < 1 or self.head_dim < 1:
            raise HwpruneError(f"knob {self.name!r}: channels, multiple, groups and head_dim must be >= 1")
        if not 0.0 <= self.max_ratio < 1.0:
            raise HwpruneError(f"knob {self.name!r}: max_ratio must be in [0, 1), not {self.max_ratio}")

    def widths(self) -> list[int]:
        """Every width this knob can keep, ascending (always includes ``channels``, i.e. no pruning)."""
        if self.kind == "block":
            return [0, 1]
        if self.kind == "heads":
            step, low = self.groups, 1
        else:
            step = self.multiple * self.groups // math.gcd(self.multiple, self.groups)
            if step > self.channels:
                step = self.groups  # the multiple cannot be honoured; the group count still must be
            low = min(self.channels, self.multiple)
        options = {c for c in range(step, self.channels + 1, step) if c >= low}
        options.add(self.channels)
        return sorted(options)

    def kept(self, ratio: float) -> int:
        """The width (channels, or heads) kept for ``ratio``: the allowed width nearest ``channels * (1 - ratio)``.

        Ratios are clipped to ``[0, max_ratio]``; a width below ``channels * (1 - max_ratio)`` is never chosen, and
        ties go to the wider option.
        """
        r = min(max(float(ratio), 0.0), self.max_ratio)
        if self.kind == "block":
            return 0 if r >= BLOCK_REMOVAL else 1
        if r <= 0.0:
            return self.channels
        target = self.channels * (1.0 - r)
        floor = self.channels * (1.0 - self.max_ratio) - 1e-9
        allowed = [c for c in self.widths() if c >= floor] or [self.channels]
        return min(allowed, key=lambda c: (abs(c - target), -c))

    def removed_channels(self, ratio: float) -> int:
        """How many channels of the group's root layer go for ``ratio`` (heads count ``head_dim`` each)."""
        return (self.channels - self.kept(ratio)) * self.head_dim


@dataclass(frozen=True)
class GroupSpec:
    """How to find and prune a knob's group in a (copy of the) model; plain data so a space can be saved."""

    knob: str
    root: str  # qualified name of the layer whose output channels are the group's index space
    root_channels: int
    members: tuple[str, ...]  # every module/parameter whose output width the group changes
    attention: tuple[str, ...] = ()  # attention modules whose heads this group removes


# ---------------------------------------------------------------------------------------------------------------------
# tracing


@contextlib.contextmanager
def _all_weights_traced(model: nn.Module) -> Iterator[None]:
    # the graph is traced through autograd: a frozen layer fed by a frozen input leaves no trace and would be
    # missed from its group, so every weight takes part while tracing
    flags = [(p, p.requires_grad) for p in model.parameters() if p.is_floating_point() or p.is_complex()]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _module_stack(model: nn.Module) -> Iterator[list[str]]:
    """Track which modules are running, so a failed forward can name the innermost one."""
    stack: list[str] = []
    handles = []
    for name, module in model.named_modules():
        label = f"{name or '<model>'} ({type(module).__name__})"

        def pre(_m: nn.Module, _a: Any, label: str = label) -> None:
            stack.append(label)

        def post(_m: nn.Module, _a: Any, _o: Any) -> None:
            if stack:
                stack.pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for errors shown as one line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


@dataclass
class Traced:
    """A model's dependency graph and the output tensors it was traced from."""

    graph: tp.DependencyGraph
    outputs: list[torch.Tensor]


def trace(model: nn.Module, example_inputs: ExampleInputs) -> Traced:
    """Build Torch-Pruning's DependencyGraph for ``model``; a failure becomes one ``HwpruneError`` line.

    Every list/dict argument is passed fresh: Torch-Pruning's defaults are shared mutable objects that keep
    references to earlier models.
    """
    inputs = as_inputs(example_inputs)
    captured: list[torch.Tensor] = []

    def capture(out: Any) -> list[torch.Tensor]:
        # only tensors that depend on the weights can be traced; keeping them lets groups be checked against outputs
        captured.extend(t for t in output_tensors(out) if t.grad_fn is not None)
        return list(captured)

    kind = type(model).__name__
    with keep_training_flags(model), _all_weights_traced(model), torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _module_stack(model) as stack:
            try:
                graph = tp.DependencyGraph().build_dependency(
                    model,
                    example_inputs=inputs,
                    # Torch-Pruning's own call retries a failed forward with the inputs packed differently,
                    # which hides the real error; call it exactly once, our way
                    forward_fn=lambda m, inp: run_forward(m, inp),
                    output_transform=capture,
                    unwrapped_parameters=[],
                    customized_pruners={},
                    ignored_layers=[],
                    ignored_params=[],
                    verbose=False,
                )
            except HwpruneError:
                raise
            except Exception as exc:
                where = f" in module {stack[-1]}" if stack else ""
                raise HwpruneError(
                    f"cannot trace {kind} for pruning{where}: {one_line(exc)}; "
                    "check that the example inputs match the model's forward()"
                ) from exc
    if not captured:
        raise HwpruneError(
            f"cannot prune {kind}: none of its outputs depends on its weights (is forward() under no_grad?)"
        )
    return Traced(graph, captured)


def out_channel_fn(graph: tp.DependencyGraph, module: nn.Module) -> Any:
    """Torch-Pruning's function that removes ``module``'s output channels."""
    return graph.get_pruner_of_module(module).prune_out_channels


# ---------------------------------------------------------------------------------------------------------------------
# groups -> knobs


def _is_depthwise(conv: nn.modules.conv._ConvNd) -> bool:
    return conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1


def _channel_groups(graph: tp.DependencyGraph, group: Any) -> tuple[int, str | None]:
    """The number of equal parts the group's width must keep (grouped convs, GroupNorm), or a reason to skip it."""
    parts = 1
    for dep, _ in group:
        module = dep.target.module
        if isinstance(module, nn.modules.conv._ConvNd):
            if module.groups == 1 or _is_depthwise(module):
                continue
            if module.transposed:
                return 0, f"grouped transposed convolution {dep.target.name} is not supported"
            if module.groups == module.out_channels:
                # Torch-Pruning mistakes this for a depthwise conv and would prune its input wrongly
                return 0, f"grouped convolution {dep.target.name} (groups == out_channels != in) is not supported"
            g = module.groups
        elif isinstance(module, nn.GroupNorm):
            g = module.num_groups
        else:
            continue
        parts = parts * g // math.gcd(parts, g)
    return parts, None


class _Analyser:
    """Turns the groups of one traced model into knob specifications."""

    def __init__(self, model: nn.Module, traced: Traced, ignored: set[str], channel_multiple: int, max_ratio: float):
        self.model = model
        self.graph = traced.graph
        self.outputs = traced.outputs
        self.ignored = ignored
        self.multiple = channel_multiple
        self.max_ratio = max_ratio
        self.order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        self.names = {m: n for n, m in model.named_modules()}
        self.attention, self.unsupported = attn.find_attention(model)
        self.proj_owner = {p: a for a, info in self.attention.items() if info.family == "hf" for p in info.proj_names}

    def _touches_output(self, group: Any) -> bool:
        for dep, _ in group:
            node = dep.target
            if node.type == tp.ops.OPTYPE.OUTPUT:
                return True
            # a layer whose result is returned changes the output only if its *output* channels go
            returned = any(node.grad_fn is t.grad_fn for t in self.outputs)
            if returned and self.graph.is_out_channel_pruning_fn(dep.handler):
                return True
        return False

    def analyse(self, group: Any) -> tuple[Knob, GroupSpec] | tuple[str, str]:
        """A (knob, spec) pair, or (group label, reason it is not prunable)."""
        graph = self.graph
        members: list[tuple[str, Any]] = []
        for dep, _ in group:
            target = dep.target.module
            if not graph.is_out_channel_pruning_fn(dep.handler):
                continue
            if isinstance(target, nn.Parameter):  # e.g. a ViT's position embedding
                name = graph._param_to_name.get(target)
            else:
                name = self.names.get(target)  # None for Torch-Pruning's reshape/add/concat placeholders
            if name is not None and all(name != n for n, _ in members):
                members.append((name, target))
        members.sort(key=lambda nm: self.order.get(nm[0], len(self.order)))
        label = members[0][0] if members else str(group[0].dep.target.name)
        member_names = tuple(n for n, _ in members)

        if self._touches_output(group):
            return label, "changes the shape of a model output"
        hit = [n for n in member_names if n in self.ignored]
        if hit:
            return label, f"touches ignored layer {hit[0]}"

        mhas = [n for n, m in members if isinstance(m, nn.MultiheadAttention)]
        owners: list[str] = []
        for n, m in members:
            parent = n.rsplit(".", 1)[0] if "." in n else ""
            if isinstance(m, nn.MultiheadAttention) and n not in self.attention:
                return label, f"attention module {n} has a layout hwprune cannot prune (cross-attention?)"
            if n in self.proj_owner and self.proj_owner[n] not in owners:
                owners.append(self.proj_owner[n])
            elif isinstance(m, nn.Linear) and parent in self.unsupported:
                return label, f"attention module {parent} ({type(self.unsupported[parent]).__name__}) is not supported"
        containers = sorted(set(mhas) | set(owners), key=lambda n: self.order[n])
        if containers:
            return self._heads(group, label, member_names, containers)
        return self._channels(group, label, members, member_names)

    def _heads(
        self, group: Any, label: str, member_names: tuple[str, ...], containers: list[str]
    ) -> tuple[Knob, GroupSpec] | tuple[str, str]:
        infos = [self.attention[c] for c in containers]
        head_dims = {i.head_dim for i in infos}
        if len(head_dims) != 1:
            return label, f"attention modules {', '.join(containers)} have different head sizes"
        head_dim = head_dims.pop()
        for info in infos:
            missing = [p for p in info.proj_names if p not in member_names]
            if missing:
                return label, f"attention module {info.name}: {missing[0]} is not in the same channel group"
        first = infos[0]
        root_name = first.proj_names[0]
        root = self.model.get_submodule(root_name)
        channels = self.graph.get_out_channels(root)
        if channels is None or channels % head_dim:
            return label, f"attention module {first.name}: width {channels} is not a whole number of heads"
        knob = Knob(first.name, channels // head_dim, 1, self.max_ratio, "heads", 1, head_dim)
        if knob.kept(knob.max_ratio) >= knob.channels:
            return label, f"attention module {first.name} has too few heads to prune"
        return knob, GroupSpec(first.name, root_name, channels, member_names, tuple(containers))

    def _channels(
        self, group: Any, label: str, members: list[tuple[str, Any]], member_names: tuple[str, ...]
    ) -> tuple[Knob, GroupSpec] | tuple[str, str]:
        parts, reason = _channel_groups(self.graph, group)
        if reason:
            return label, reason
        named = [n for n, m in members if isinstance(m, _NAMING_TYPES)]
        if not named:
            return label, "no convolution, linear or embedding layer to prune"
        root_name = named[0]
        channels = self.graph.get_out_channels(self.model.get_submodule(root_name))
        if channels is None or channels < 2:
            return label, "too narrow to prune"
        if channels % parts:
            return label, f"width {channels} is not divisible by its {parts} channel groups"
        knob = Knob(root_name, channels, self.multiple, self.max_ratio, "channels", parts, 1)
        if knob.kept(knob.max_ratio) >= knob.channels:
            step = knob.multiple * parts // math.gcd(knob.multiple, parts)
            return label, f"too few channels ({channels}) to prune in steps of {step}"
        return knob, GroupSpec(root_name, root_name, channels, member_names)


def resolve_ignored(model: nn.Module, ignored_layers: Iterable[nn.Module | str] | None) -> set[str]:
    """Qualified names of the ignored layers and all their submodules; unknown names or modules are errors."""
    if not ignored_layers:
        return set()
    by_id = {id(m): n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    names: set[str] = set()
    for item in ignored_layers:
        if isinstance(item, str):
            if item not in modules:
                raise HwpruneError(f"ignored layer {item!r} is not a module of {type(model).__name__}")
            prefix = item
        elif isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise HwpruneError(f"an ignored layer ({type(item).__name__}) is not part of {type(model).__name__}")
            prefix = by_id[id(item)]
        else:
            raise HwpruneError(f"ignored layers must be modules or qualified names, not {type(item).__name__}")
        names.update(n for n in modules if n == prefix or not prefix or n.startswith(prefix + "."))
    return names


# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class PruningSpace:
    """The knobs of a model, in the order their layers are defined, and the groups behind them."""

    knobs: list[Knob]
    specs: dict[str, GroupSpec] = field(default_factory=dict, repr=False)
    channel_multiple: int = 8
    max_ratio: float = 0.75
    ignored: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict, repr=False)
    # how prune() ranks channels unless told otherwise: a name of hwprune.pruning.importance or a callable on a group
    importance: str | ImportanceFn = DEFAULT_IMPORTANCE

    @classmethod
    def build(
        cls,
        model: nn.Module,
        example_inputs: ExampleInputs,
        *,
        channel_multiple: int = 8,
        max_ratio: float = 0.75,
        ignored_layers: Iterable[nn.Module | str] | None = None,
        depth: bool = True,
        importance: str | ImportanceFn = DEFAULT_IMPORTANCE,
    ) -> PruningSpace:
        """One knob per prunable coupled channel group of ``model`` (which is not modified), and with ``depth`` one
        per removable residual block (none when ``max_ratio`` is below ``BLOCK_REMOVAL``).

        Groups that would change a model output (the final classifier) and groups or blocks touching
        ``ignored_layers`` (modules or qualified names) are never pruned. ``importance`` is what :func:`prune` ranks
        channels by for this space (``"l2"``, ``"l1"``, ``"bn-scale"`` or a callable such as
        ``taylor_importance(model, batches)``; ``resolve_importance`` turns ``"taylor"``/``"auto"`` into one).
        """
        if not isinstance(model, nn.Module):
            raise HwpruneError(f"expected a torch.nn.Module to prune, got {type(model).__name__}")
        if int(channel_multiple) < 1:
            raise HwpruneError(f"channel_multiple must be >= 1, not {channel_multiple}")
        if not 0.0 <= float(max_ratio) < 1.0:
            raise HwpruneError(f"max_ratio must be in [0, 1), not {max_ratio}")
        get_importance(importance)  # an unknown name (or "taylor" without its gradients) fails here, not per trial
        ignored = resolve_ignored(model, ignored_layers)
        traced = trace(model, example_inputs)
        analyser = _Analyser(model, traced, ignored, int(channel_multiple), float(max_ratio))
        found: list[tuple[Knob, GroupSpec]] = []
        skipped: dict[str, str] = {}
        try:
            groups = list(
                traced.graph.get_all_groups(
                    ignored_layers=[], root_module_types=(tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR, tp.ops.TORCH_MHA)
                )
            )
        except Exception as exc:
            raise HwpruneError(f"cannot group the channels of {type(model).__name__}: {one_line(exc)}") from exc
        for group in groups:
            result = analyser.analyse(group)
            if isinstance(result[0], Knob):
                found.append(result)  # type: ignore[arg-type]
            else:
                skipped[result[0]] = result[1]  # type: ignore[index]
        order = analyser.order
        if depth and float(max_ratio) >= BLOCK_REMOVAL:
            for block in find_blocks(model, as_inputs(example_inputs), ignored, _NAMING_TYPES):
                found.append((Knob(block.name, 1, 1, float(max_ratio), "block"),
                              GroupSpec(block.name, block.name, 1, block.layers)))
        found.sort(key=lambda ks: order.get(ks[0].name, len(order)))
        names = [k.name for k, _ in found]
        if len(set(names)) != len(names):
            raise HwpruneError(f"internal error: two channel groups share a name in {type(model).__name__}")
        del traced, analyser, groups  # they hold the graph and the traced autograd graph; free them now
        return cls(
            knobs=[k for k, _ in found],
            specs={k.name: s for k, s in found},
            channel_multiple=int(channel_multiple),
            max_ratio=float(max_ratio),
            ignored=tuple(sorted(ignored)),
            skipped=skipped,
            importance=importance,
        )

    def __len__(self) -> int:
        return len(self.knobs)

    def __iter__(self) -> Iterator[Knob]:
        return iter(self.knobs)

    @property
    def names(self) -> list[str]:
        """Knob names, in model order."""
        return [k.name for k in self.knobs]

    def knob(self, name: str) -> Knob:
        """The knob called ``name``."""
        for k in self.knobs:
            if k.name == name:
                return k
        raise HwpruneError(f"unknown pruning knob {name!r}; {self._known()}")

    def _known(self) -> str:
        shown = ", ".join(self.names[:5]) + (", ..." if len(self.knobs) > 5 else "")
        return f"known knobs: {shown}" if self.knobs else "this pruning space has no knobs"

    def check_ratios(self, ratios: Mapping[str, float]) -> dict[str, float]:
        """Every knob's ratio (omitted knobs = 0), clipped to its ``max_ratio``; unknown names and bad values raise."""
        if not isinstance(ratios, Mapping):
            raise HwpruneError(f"pruning ratios must be a mapping of knob name to ratio, not {type(ratios).__name__}")
        known = {k.name: k for k in self.knobs}
        unknown = [key for key in ratios if key not in known]
        if unknown:
            raise HwpruneError(f"unknown pruning knob {unknown[0]!r}; {self._known()}")
        result: dict[str, float] = {}
        for name, knob in known.items():
            value = ratios.get(name, 0.0)
            try:
                r = float(value)
            except (TypeError, ValueError):
                raise HwpruneError(f"pruning ratio for {name!r} must be a number, not {value!r}") from None
            if not 0.0 <= r <= 1.0:  # NaN fails this too
                raise HwpruneError(f"pruning ratio for {name!r} must be in [0, 1], not {value!r}")
            result[name] = min(r, knob.max_ratio)
        return result

    def kept_widths(self, ratios: Mapping[str, float]) -> tuple[int, ...]:
        """The width (or head count) each knob keeps for ``ratios``, in knob order; an omitted knob is not pruned.
        Two ratio maps with the same kept widths build the same architecture."""
        return tuple(k.kept(float(ratios.get(k.name, 0.0))) for k in self.knobs)

    @property
    def blocks(self) -> list[str]:
        """Names of the removable residual blocks (knobs of kind ``"block"``), in model order."""
        return [k.name for k in self.knobs if k.kind == "block"]

    def uniform(self, ratio: float) -> dict[str, float]:
        """The same ratio for every channel group and attention knob, clipped to each knob's ``max_ratio``; every
        block is kept (uniform pruning is the width-only baseline)."""
        r = float(ratio)
        if not 0.0 <= r <= 1.0:
            raise HwpruneError(f"a uniform pruning ratio must be in [0, 1], not {ratio!r}")
        return {k.name: 0.0 if k.kind == "block" else min(r, k.max_ratio) for k in self.knobs}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description (round-trips through :meth:`from_dict`; an importance given as a callable is
        not saved, and the rebuilt space uses the default)."""
        return {
            "channel_multiple": self.channel_multiple,
            "max_ratio": self.max_ratio,
            "ignored": list(self.ignored),
            "knobs": [
                {**asdict(k), "root": self.specs[k.name].root, "root_channels": self.specs[k.name].root_channels,
                 "members": list(self.specs[k.name].members), "attention": list(self.specs[k.name].attention)}
                for k in self.knobs
            ],
            "skipped": dict(self.skipped),
            **({"importance": self.importance} if isinstance(self.importance, str) else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruningSpace:
        """Rebuild a space saved with :meth:`to_dict` (for workers that should not re-trace the model)."""
        try:
            knobs, specs = [], {}
            for item in data["knobs"]:
                knob = Knob(item["name"], int(item["channels"]), int(item["multiple"]), float(item["max_ratio"]),
                            item["kind"], int(item.get("groups", 1)), int(item.get("head_dim", 1)))
                knobs.append(knob)
                specs[knob.name] = GroupSpec(knob.name, item["root"], int(item["root_channels"]),
                                             tuple(item.get("members", ())), tuple(item.get("attention", ())))
            return cls(knobs, specs, int(data["channel_multiple"]), float(data["max_ratio"]),
                       tuple(data.get("ignored", ())), dict(data.get("skipped", {})),
                       str(data.get("importance", DEFAULT_IMPORTANCE)))
        except (KeyError, TypeError, ValueError) as exc:
            raise HwpruneError(f"malformed pruning space description: {one_line(exc)}") from exc
