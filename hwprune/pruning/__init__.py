"""Structured pruning: the space of coupled channel groups (knobs) and applying ratios to a copy of a model."""

from __future__ import annotations

from hwprune.pruning.apply import PrunedModel, architecture_signature, count_macs_params, prune, read_widths
from hwprune.pruning.importance import (
    BNScale,
    GroupMagnitude,
    TaylorImportance,
    get_importance,
    resolve_importance,
    taylor_importance,
)
from hwprune.pruning.space import GroupSpec, Knob, PruningSpace

__all__ = [
    "BNScale",
    "GroupMagnitude",
    "GroupSpec",
    "Knob",
    "PrunedModel",
    "PruningSpace",
    "TaylorImportance",
    "architecture_signature",
    "count_macs_params",
    "get_importance",
    "prune",
    "read_widths",
    "resolve_importance",
    "taylor_importance",
]
