"""The Optuna study behind a search: objective, Pareto fronts, progress, and whole search runs.

(Named `study` because `hwprune.search` is the public function.) The names below load on first use, so the light
modules (``attrs``, ``records``) import without torch and Optuna, as the report needs them.
"""

from typing import Any

__all__ = ["ParetoModel", "Search", "SearchResult", "search"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from hwprune.study import run

        return getattr(run, name)
    raise AttributeError(f"module 'hwprune.study' has no attribute {name!r}")
