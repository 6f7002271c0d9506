"""hwprune: hardware-aware structured pruning.

Search per-layer pruning ratios with Optuna, physically remove channels and heads, and measure every candidate's
real latency and memory on the target device (ONNX Runtime or Apache TVM, locally or on a remote board).
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

# The public API, imported lazily so `hwprune --help` does not pay for torch and optuna.
_EXPORTS = {
    "search": "hwprune.study.run",
    "SearchResult": "hwprune.study.run",
    "ParetoModel": "hwprune.study.run",
    "SearchConfig": "hwprune.config",
    "Subject": "hwprune.subjects.base",
    "load_profile": "hwprune.profiles",
    "available_profiles": "hwprune.profiles",
    "DeviceProfile": "hwprune.profiles",
    "measure": "hwprune.api",
    "prune": "hwprune.api",
    "Measurement": "hwprune.backends.base",
    "PruningSpace": "hwprune.pruning",
    "PrunedModel": "hwprune.pruning",
    "HwpruneError": "hwprune.errors",
}

if TYPE_CHECKING:  # pragma: no cover
    from hwprune.api import measure, prune
    from hwprune.config import SearchConfig
    from hwprune.errors import HwpruneError
    from hwprune.backends.base import Measurement
    from hwprune.profiles import DeviceProfile, available_profiles, load_profile
    from hwprune.pruning import PrunedModel, PruningSpace
    from hwprune.study.run import ParetoModel, SearchResult, search
    from hwprune.subjects.base import Subject


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hwprune' has no attribute {name!r}")


__all__ = sorted(_EXPORTS) + ["__version__"]
