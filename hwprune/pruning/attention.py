"""Attention modules whose heads hwprune can remove whole, and the attribute patching that keeps them correct.

Torch-Pruning removes channels but leaves each attention module's head bookkeeping (``num_heads``, head size) as it
was, so the forward pass would split the narrower projection into the wrong number of heads. Two families are
supported:

* ``torch.nn.MultiheadAttention`` (self-attention, ``kdim == vdim == embed_dim``): its channels are the embedding
  channels, so removing a head narrows every layer coupled to that residual stream by ``head_dim`` channels.
* Hugging Face style self-attention (BERT, RoBERTa, ViT-HF, ...): a module with integer ``num_attention_heads`` and
  ``attention_head_size`` and separate ``query``/``key``/``value`` ``nn.Linear`` children of equal width.

Other modules that carry a head count (fused-qkv attention, grouped-query attention, ...) are recognised as
attention so that their channel groups are left alone rather than pruned into a broken model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch.nn as nn

# attribute names that mark a module as carrying attention heads
HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
HF_QKV = ("query", "key", "value")


@dataclass(frozen=True)
class AttentionInfo:
    """One supported attention module: where it is and how its heads are laid out."""

    name: str
    family: str  # "mha" or "hf"
    num_heads: int
    head_dim: int
    proj_names: tuple[str, ...]  # qualified names of the projections whose outputs are split into heads


def _int_attr(module: nn.Module, attr: str) -> int | None:
    value = getattr(module, attr, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def carries_heads(module: nn.Module) -> bool:
    """True when ``module`` looks like an attention module (it has an integer head count)."""
    return isinstance(module, nn.MultiheadAttention) or any(
        _int_attr(module, a) is not None for a in HEAD_COUNT_ATTRS
    )


def describe(name: str, module: nn.Module) -> AttentionInfo | None:
    """The head layout of ``module`` if hwprune can prune its heads, else None."""
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim or module.num_heads < 1:
            return None  # cross-attention with other key/value widths: pruning would cut the wrong inputs
        if module.embed_dim % module.num_heads:
            return None
        return AttentionInfo(name, "mha", module.num_heads, module.embed_dim // module.num_heads, (name,))
    heads = _int_attr(module, "num_attention_heads")
    head_dim = _int_attr(module, "attention_head_size")
    if heads is None or head_dim is None or heads < 1:
        return None
    projs = [getattr(module, p, None) for p in HF_QKV]
    if not all(isinstance(p, nn.Linear) and p.out_features == heads * head_dim for p in projs):
        return None  # grouped-query or fused projections: head layout differs per projection
    prefix = f"{name}." if name else ""
    return AttentionInfo(name, "hf", heads, head_dim, tuple(prefix + p for p in HF_QKV))


def find_attention(model: nn.Module) -> tuple[dict[str, AttentionInfo], dict[str, nn.Module]]:
    """Supported attention modules by name, and every other module that carries heads (unsupported) by name."""
    supported: dict[str, AttentionInfo] = {}
    unsupported: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not carries_heads(module):
            continue
        info = describe(name, module)
        if info is None:
            unsupported[name] = module
        else:
            supported[name] = info
    return supported, unsupported


@contextlib.contextmanager
def relaxed_mha_checks(modules: list[nn.MultiheadAttention]) -> Iterator[None]:
    """Let Torch-Pruning remove whole heads from ``nn.MultiheadAttention``.

    Its pruner asserts that the new ``embed_dim`` divides by the *old* head count, which whole-head removal generally
    violates (4 heads of 16 -> 3 heads: 48 % 4 == 0 but 32 % 3 != 0 for 3 -> 2). With ``num_heads`` set to 1 the
    check always passes; ``patch_heads`` restores the real count afterwards.
    """
    saved = [m.num_heads for m in modules]
    for m in modules:
        m.num_heads = 1
    try:
        yield
    finally:
        for m, heads in zip(modules, saved, strict=True):
            m.num_heads = heads


def patch_heads(model: nn.Module, info: AttentionInfo) -> int:
    """Make the head bookkeeping of a pruned attention module match its weights; returns the new head count."""
    module = model.get_submodule(info.name)
    if info.family == "mha":
        assert isinstance(module, nn.MultiheadAttention)
        width = module.out_proj.weight.shape[0]
        heads = width // info.head_dim
        module.embed_dim = width
        module.kdim = width
        module.vdim = width
        module.num_heads = heads
        module.head_dim = info.head_dim
        return heads
    width = model.get_submodule(info.proj_names[0]).weight.shape[0]
    heads = width // info.head_dim
    module.num_attention_heads = heads
    module.attention_head_size = info.head_dim
    if hasattr(module, "all_head_size"):
        module.all_head_size = heads * info.head_dim
    return heads


def heads_of(module: nn.Module) -> tuple[int, int] | None:
    """(num_heads, head_dim) as the module itself reports them, for consistency checks."""
    if isinstance(module, nn.MultiheadAttention):
        return module.num_heads, module.head_dim
    heads = _int_attr(module, "num_attention_heads")
    head_dim = _int_attr(module, "attention_head_size")
    if heads is None or head_dim is None:
        return None
    return heads, head_dim
