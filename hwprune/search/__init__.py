"""Search: the Optuna study, Pareto fronts and whole search runs."""

from hwprune.search.run import ParetoModel, Search, SearchResult, search

__all__ = ["ParetoModel", "Search", "SearchResult", "search"]
