"""What a search returns: the Pareto models it exported, and the whole result."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import torch

from hwprune.backends.base import Measurement
from hwprune.study.records import ModelRecord


@dataclass
class ParetoModel:
    """One model of the Pareto front (or the dense model), as exported into the run folder.

    ``entry`` is its typed summary.json record; stages replace it (records are frozen) as they add to it.
    """

    trial: int | None
    entry: ModelRecord
    run_dir: Path
    module: torch.nn.Module | None = None
    measurement: Measurement | None = None

    @property
    def record(self) -> dict[str, Any]:
        """The MODEL record of summary.json, as a dict."""
        return self.entry.to_dict()

    @property
    def onnx_path(self) -> Path:
        return self.run_dir / self.entry.files["onnx"]["path"]

    @property
    def accuracy(self) -> float:
        return float(self.entry.accuracy)

    @property
    def latency_ms(self) -> float:
        return float(self.entry.latency_ms.median)

    @property
    def memory_mb(self) -> float:
        return float(self.entry.memory_mb.total)


@dataclass
class SearchResult:
    """What :func:`hwprune.search` returns: the Pareto front as a DataFrame and the recommended model."""

    run_dir: Path
    summary: dict[str, Any]
    pareto: pd.DataFrame
    models: list[ParetoModel] = field(default_factory=list)
    dense: ParetoModel | None = None
    study: optuna.Study | None = None

    @property
    def recommended(self) -> ParetoModel | None:
        rec = self.summary.get("recommended")
        return next((m for m in self.models if m.trial == rec), None)
