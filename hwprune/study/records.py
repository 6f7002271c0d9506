"""Typed records of summary.json: latency and memory statistics, one model's record (MODEL in docs/run-folder.md)
and the whole summary, each with ``to_dict``/``from_dict``.

``to_dict`` writes the keys, in the order, that summary.json has always had, so ``SCHEMA`` stays 1; ``from_dict``
reads every summary written so far (keys a record does not know are kept, in ``extra``, and written back).
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hwprune.errors import HwpruneError

if TYPE_CHECKING:  # annotations only: the report reads records without loading torch and Optuna
    import torch

    from hwprune.backends.base import Measurement
    from hwprune.study.budgets import Budgets
    from hwprune.study.reference import Rounds

SCHEMA = 1  # summary.json's "schema"
# ``latency_ms.judged_by``: how the judged latency was made
JUDGED_COLUMN = "latency_judged_ms"  # trials.csv: the latency the budget judges
JUDGED_BY_RATIO = "ratio x dense reference"
JUDGED_BY_OWN = "own median"


class Unset(enum.Enum):
    """Marks an optional key a record does not have (unlike None, which is written as null)."""

    UNSET = "unset"


UNSET = Unset.UNSET


@dataclass(frozen=True)
class LatencyStats:
    """A model's latency statistics (``latency_ms`` of MODEL), in milliseconds unless named otherwise."""

    median: float
    p90: float
    min: float
    mean: float
    std: float
    cv: float  # std / mean
    robust_cv: float  # 1.4826 MAD / median: what decides "noisy"
    mad: float
    cpu_median: float | None
    repeats: int
    warmup: int
    noisy: bool
    remeasured: int
    # the latency the budget judges (ms): under a relative budget its ratio to the dense model measured beside it x
    # the dense reference (the dense model's median), else the median above; absent in summaries before it was written
    judged: float | Unset = UNSET
    judged_by: str | Unset = UNSET  # JUDGED_BY_RATIO | JUDGED_BY_OWN

    @classmethod
    def from_measurement(cls, m: Measurement) -> LatencyStats:
        """The statistics of ``m``'s latency."""
        lat = m.to_dict()["latency"]
        return cls(median=lat["median_ms"], p90=lat["p90_ms"], min=lat["min_ms"], mean=lat["mean_ms"],
                   std=lat["std_ms"], cv=lat["cv"], robust_cv=lat["robust_cv"], mad=lat["mad_ms"],
                   cpu_median=lat["cpu_median_ms"], repeats=lat["repeats"], warmup=lat["warmup"],
                   noisy=lat["noisy"], remeasured=lat["remeasured"])

    def judged_as(self, judged_ms: float, by_ratio: bool) -> LatencyStats:
        """A copy that records ``judged_ms`` as the latency the budget judged (``by_ratio``: made from the ratio to
        the dense model measured beside it)."""
        return dataclasses.replace(self, judged=judged_ms, judged_by=JUDGED_BY_RATIO if by_ratio else JUDGED_BY_OWN)

    @property
    def primary_ms(self) -> float:
        """The judged latency where recorded, else the median (summaries written before it was)."""
        return self.median if self.judged is UNSET else float(self.judged)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not UNSET}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyStats:
        optional = {"judged", "judged_by"}
        return cls(**{f.name: d.get(f.name, UNSET if f.name in optional else None) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class MemoryStats:
    """A model's memory (``memory_mb`` of MODEL), in MB."""

    weights: float
    peak_activations: float
    total: float
    process_peak: float | None
    # how ``process_peak`` was measured (PEAK_FRESH_PROCESS); absent where it is not a real figure (then null)
    process_peak_by: str | Unset = UNSET

    @classmethod
    def from_measurement(cls, m: Measurement) -> MemoryStats:
        return cls(weights=m.memory.weights_mb, peak_activations=m.memory.peak_activations_mb,
                   total=m.memory.total_mb, process_peak=m.memory.process_peak_mb)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not UNSET}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemoryStats:
        return cls(**{f.name: d.get(f.name, UNSET if f.name == "process_peak_by" else None)
                      for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class Meets:
    """Whether a model meets the latency and memory budgets, and the accuracy guard (judged on Pareto models)."""

    latency: bool
    memory: bool
    accuracy: bool | Unset = UNSET

    def to_dict(self) -> dict[str, bool]:
        d = {"latency": self.latency, "memory": self.memory}
        return d if self.accuracy is UNSET else {**d, "accuracy": self.accuracy}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Meets:
        return cls(latency=d["latency"], memory=d["memory"], accuracy=d.get("accuracy", UNSET))


# MODEL keys written only when a model has them, in the order they are written
_OPTIONAL = ("latency_ratio_rounds", "latency_ratio_pooled", "latency_ratio_upper", "speedup", "size_ratio",
             "removed_blocks", "remeasure_note", "accuracy_retention", "final_tuned", "file_bytes", "agreement",
             "precision")
_NESTED = {"latency_ms": LatencyStats, "memory_mb": MemoryStats, "meets": Meets}


@dataclass(frozen=True)
class ModelRecord:
    """One model of summary.json (MODEL in docs/run-folder.md): the dense model (``trial`` None) or a Pareto model."""

    trial: int | None
    recommended: bool
    accuracy: float
    accuracy_proxy: float | None
    final_finetune_steps: int  # set when the model was one of the final candidates
    latency_ms: LatencyStats
    memory_mb: MemoryStats
    params: int
    macs: int
    widths: dict[str, list[int]]
    ratios: dict[str, float] | None
    latency_ratio: float | None  # relative budgets: the median ratio to the dense model measured beside it
    meets: Meets
    estimated: bool
    tuned: bool | None
    backend: str
    load_avg: list[float] | None
    files: dict[str, dict[str, Any]]  # name -> file record (path, bytes, sha256)
    input: dict[str, Any]
    latency_ratio_rounds: list[float] | Unset = UNSET
    # how many of latency_ratio_rounds were measured earlier in the run, when the same architecture was re-measured
    # as the incumbent (only when some were)
    latency_ratio_pooled: int | Unset = UNSET
    latency_ratio_upper: float | Unset = UNSET
    speedup: float | Unset = UNSET
    size_ratio: float | Unset = UNSET
    removed_blocks: list[str] | Unset = UNSET
    remeasure_note: str | Unset = UNSET
    accuracy_retention: float | None | Unset = UNSET
    final_tuned: dict[str, Any] | Unset = UNSET
    file_bytes: int | Unset = UNSET
    agreement: dict[str, Any] | Unset = UNSET
    precision: dict[str, Any] | Unset = UNSET  # --quantize int8: label, units, per-node precision, calibration, check
    extra: dict[str, Any] = field(default_factory=dict)  # keys this record does not know, kept as read

    def replace(self, **changes: Any) -> ModelRecord:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)

    def with_file(self, name: str, record: dict[str, Any]) -> ModelRecord:
        """A copy whose ``files`` also hold ``name``."""
        return self.replace(files={**self.files, name: record})

    def to_dict(self, files: bool = True) -> dict[str, Any]:
        """The summary.json form (without ``files`` when ``files`` is False: the study's ``dense`` attribute)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or value is UNSET or (f.name == "files" and not files):
                continue
            out[f.name] = value.to_dict() if f.name in _NESTED else value
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelRecord:
        """A record from its summary.json form.

        Raises:
            KeyError: a key every MODEL has is missing.
        """
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: (_NESTED[k].from_dict(v) if k in _NESTED else v) for k, v in d.items() if k in names}
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})


@dataclass(frozen=True)
class Summary:
    """summary.json: the whole answer of a search (docs/run-folder.md)."""

    schema: int
    hwprune_version: str
    created: str
    request: dict[str, Any]
    metric: str
    accuracy_guard: dict[str, Any]
    recovery: dict[str, Any]
    dense: ModelRecord
    pareto: tuple[ModelRecord, ...]
    recommended: int | None
    measurement: dict[str, Any]
    search: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out["dense"] = self.dense.to_dict()
        out["pareto"] = [m.to_dict() for m in self.pareto]
        return {**out, **self.extra}

    def to_json(self) -> str:
        """The text of summary.json."""
        return json.dumps(self.to_dict(), indent=2, default=str)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Summary:
        """A summary from its JSON form, of this schema or an earlier one.

        Raises:
            HwpruneError: written by a newer hwprune (a schema this one does not know), or not a summary.
        """
        schema = d.get("schema")
        if not isinstance(schema, int) or schema > SCHEMA:
            raise HwpruneError(f"summary.json has schema {schema!r}; this hwprune reads schema {SCHEMA} and older")
        names = [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
        missing = [n for n in names if n not in d]
        if missing:
            raise HwpruneError(f"summary.json lacks {', '.join(missing)}")
        known = {n: d[n] for n in names}
        known["dense"] = ModelRecord.from_dict(d["dense"])
        known["pareto"] = tuple(ModelRecord.from_dict(m) for m in d["pareto"])
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})

    @classmethod
    def read(cls, path: Path) -> Summary:
        """The summary in ``path`` (a summary.json).

        Raises:
            HwpruneError: unreadable, not JSON, or not a summary this hwprune reads.
        """
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise HwpruneError(f"{path}: not a readable summary.json ({exc})") from None


def model_record(*, trial: int | None, accuracy: float, accuracy_proxy: float | None, m: Measurement,
                 params: int, macs: int, widths: dict[str, Any], ratios: dict[str, float] | None,
                 budgets: Budgets, dense: ModelRecord | None, example: torch.Tensor,
                 rounds: Rounds | None = None) -> ModelRecord:
    """The summary.json record of one model, measured as ``m``.

    Args:
        rounds: its measurements beside the dense model (relative budgets): the speed-up is then the inverse of their
            median ratio, and the latency budget is judged on that median plus its standard error
            (:attr:`~hwprune.study.reference.Rounds.upper`).
        dense: the dense model's record (None: this is the dense model).

    Returns:
        The record, without files.
    """
    ratio = rounds.ratio if rounds else None
    upper = rounds.upper if rounds else None
    pooled = len(rounds.ratios) - len(rounds.measurements) if rounds else 0
    if dense is not None:
        speedup = 1.0 / ratio if ratio else dense.latency_ms.median / m.latency.median_ms
        size_ratio = params / max(dense.params, 1)
    else:
        speedup, size_ratio = 1.0, 1.0
    meets = budgets.meets(m.latency.median_ms, m.memory.total_mb, upper)
    by_ratio = bool(budgets.latency_factor) and budgets.latency_ms is not None and ratio is not None  # as judged_ms
    latency = LatencyStats.from_measurement(m).judged_as(budgets.judged_ms(m.latency.median_ms, ratio), by_ratio)
    return ModelRecord(
        trial=trial, recommended=False, accuracy=accuracy, accuracy_proxy=accuracy_proxy, final_finetune_steps=0,
        latency_ms=latency, memory_mb=MemoryStats.from_measurement(m),
        params=int(params), macs=int(macs), widths={k: list(v) for k, v in widths.items()}, ratios=ratios,
        latency_ratio=ratio, meets=Meets(latency=meets[0], memory=meets[1]), estimated=m.estimated, tuned=m.tuned,
        backend=m.backend, load_avg=list(m.load_avg) if m.load_avg else None, files={},
        input={"name": "input", "shape": list(example.shape), "dtype": str(example.dtype).replace("torch.", "")},
        latency_ratio_rounds=rounds.ratios if rounds else UNSET, latency_ratio_pooled=pooled or UNSET,
        latency_ratio_upper=upper if rounds else UNSET, speedup=speedup, size_ratio=size_ratio)
