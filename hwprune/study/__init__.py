"""The Optuna study behind a search: objective, Pareto fronts, progress, and whole search runs.

(Named `study` because `hwprune.search` is the public function.)
"""

from hwprune.study.run import ParetoModel, Search, SearchResult, search

__all__ = ["ParetoModel", "Search", "SearchResult", "search"]
