"""MLflow tracking of a search: one MLflow run per trial (``hwprune search --mlflow URI``, ``hwprune.search(...,
mlflow=URI)``), through optuna-integration's ``MLflowCallback``.

Each run holds the trial's objectives under hwprune's metric names (accuracy, ``latency_ms``, ``memory_mb``), its
constraint values and feasibility, its pruning ratios as parameters, and the search's device profile and budgets as
tags. The experiment is named after the study. Optional: ``pip install 'hwprune[mlflow]'``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import optuna

from hwprune.errors import HwpruneError
from hwprune.integrations.dashboard import named_constraints

INSTALL_HINT = "pip install 'hwprune[mlflow]' (mlflow-skinny and optuna-integration)"
DEFAULT_METRIC_NAMES = ("accuracy", "latency_ms", "memory_mb")  # the study's objectives when it names none
# request fields (hwprune.study.run's request.json) recorded as tags of every run: what the trial was judged under
TAG_FIELDS = ("model", "device", "backend", "study", "latency_budget", "memory_budget", "latency_budget_ms",
              "memory_budget_mb", "accuracy_floor", "max_accuracy_drop", "sampler", "seed", "recovery")
TAG_PREFIX = "hwprune."


def require_mlflow() -> None:
    """Check that MLflow and optuna-integration can be imported, without importing them (MLflow takes seconds).

    Raises:
        HwpruneError: one of them is missing (one line, with the install command).
    """
    missing = [name for name in ("mlflow", "optuna_integration") if not _installed(name)]
    if missing:
        raise HwpruneError(f"--mlflow: {' and '.join(missing)} not installed; {INSTALL_HINT}")


def _installed(name: str) -> bool:
    if name in sys.modules:  # imported already (lazily loaded modules have no __spec__), or blocked with None
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise HwpruneError(f"--mlflow: cannot import {name} ({exc}); {INSTALL_HINT}") from None


def tracking_tags(request: Mapping[str, Any]) -> dict[str, str]:
    """The tags every run of a search gets: its :data:`TAG_FIELDS` and the profile's CPU, as ``hwprune.<field>``.

    Args:
        request: the search's request (``request.json``: model, device, budgets, ...).

    Returns:
        Tag names and string values; fields that are missing or None are left out.
    """
    tags = {f"{TAG_PREFIX}{k}": str(request[k]) for k in TAG_FIELDS if request.get(k) is not None}
    cpu = ((request.get("profile") or {}).get("hardware") or {}).get("cpu")
    if cpu:
        tags[f"{TAG_PREFIX}cpu"] = str(cpu)
    return tags


class MlflowTracking:
    """An Optuna callback logging each finished trial as an MLflow run (optuna-integration's ``MLflowCallback``),
    then its constraints (``constraint_<name>``) and ``feasible`` (1 or 0) as metrics of that run.

    The inner callback is built on the first trial, when the study's metric names are known.
    """

    def __init__(self, tracking_uri: str, tags: Mapping[str, str] | None = None,
                 metric_names: Sequence[str] | None = None) -> None:
        """Args:
            tracking_uri: where MLflow writes (``file:/path``, ``sqlite:///mlflow.db``, ``http://host:5000``).
            tags: tags for every run (:func:`tracking_tags`).
            metric_names: the objectives' names; default the study's (``study.metric_names``).

        Raises:
            HwpruneError: MLflow or optuna-integration is not installed.
        """
        require_mlflow()
        self.tracking_uri = tracking_uri
        self.tags = dict(tags or {})
        self.metric_names = list(metric_names) if metric_names else None
        self._callback: Any = None
        if re.match(r"file:", tracking_uri) or "://" not in tracking_uri:
            # MLflow 3 refuses its file store unless asked (it prefers a database); a file: URI given here is asking
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Log ``trial`` (any finished state; values and constraints where it has them)."""
        mlflow = _import("mlflow")
        if self._callback is None:
            names = self.metric_names or study.metric_names or list(DEFAULT_METRIC_NAMES)
            callback_cls = _import("optuna_integration.mlflow").MLflowCallback
            self._callback = callback_cls(tracking_uri=self.tracking_uri, metric_name=list(names),
                                          mlflow_kwargs={"tags": self.tags}, tag_trial_user_attrs=False)
        self._callback(study, trial)
        constraints = named_constraints(trial.system_attrs)
        run = mlflow.last_active_run()
        if run is None or not trial.values:
            return
        metrics = {f"constraint_{k}": v for k, v in constraints.items()}
        metrics["feasible"] = float(all(v <= 0 for v in constraints.values()))
        metric = _import("mlflow.entities").Metric
        now_ms = int(time.time() * 1000)
        mlflow.MlflowClient(self.tracking_uri).log_batch(
            run.info.run_id, metrics=[metric(k, v, now_ms, 0) for k, v in metrics.items()])


def search_callbacks(callbacks: Sequence[Any], tracking_uri: str | None,
                     request: Mapping[str, Any]) -> list[Any]:
    """The callbacks a search adds to ``study.optimize``: the user's, then MLflow tracking when asked for.

    Args:
        callbacks: ``SearchConfig.callbacks``.
        tracking_uri: ``SearchConfig.mlflow`` (None: no MLflow).
        request: the search's request, for the runs' tags.

    Returns:
        A new list of callbacks.
    """
    out = list(callbacks)
    if tracking_uri:
        out.append(MlflowTracking(tracking_uri, tags=tracking_tags(request)))
    return out
