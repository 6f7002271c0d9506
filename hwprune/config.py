"""Search configuration: one dataclass shared by the CLI, the Python API and nightly jobs."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwprune.errors import HwpruneError

SAMPLERS = ("tpe", "nsga2", "random", "gp")
QUANTIZE_MODES = (None, "off", "int8")  # SearchConfig.quantize; None: the profile's default
DEFAULT_QUANTIZE_TOLERANCE = 0.25  # hwprune.quant.check.DEFAULT_TOLERANCE (kept here so config imports no onnx)
RECOVERY_METHODS = ("auto", "inputs", "synthetic", "none")  # hwprune.recovery; kept here so config imports no torch
DEFAULT_RECOVERY = "auto"
# channel ranking criteria: hwprune.pruning.importance.IMPORTANCES plus "auto" (per model family, docs/benchmarks.md,
# "Channel importance")
IMPORTANCES = ("auto", "l2", "l1", "bn-scale", "taylor")
DEFAULT_IMPORTANCE = "auto"
SCREEN_MODES = ("off", "on")  # --screen: a stored latency predictor skips candidates predicted well over budget
# screened searches took 0.45-0.90x the board-seconds (median 0.72x over 19 pairs at 0.6x), half or less in 3 pairs of
# 23 (docs/benchmarks.md)
DEFAULT_SCREEN = "off"


def read_toml(path: Path, what: str, error: type[HwpruneError] = HwpruneError) -> dict[str, Any]:
    """The TOML file ``path`` as a dict; a missing or malformed file is one ``error`` line naming it."""
    if not path.is_file():
        raise error(f"{what} file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML: {exc}") from None


def check_study_name(name: str) -> str:
    """``name`` if it can be a study's run folder name under ``--out``, else one error naming the rule."""
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if name in (".", "..") or ".." in name or any(s in name for s in seps) or "\0" in name or \
            os.path.isabs(name):
        raise HwpruneError(f"study {name!r}: a study name becomes the run folder's name under --out, so it cannot "
                           "contain a path separator ('/' or '\\') or '..', nor be an absolute path")
    return name


def check_storage_url(url: str) -> str:
    """``url`` if SQLAlchemy can parse it and knows its database, else one error: found before any model work rather
    than after the dense model's measurement.

    Raises:
        HwpruneError: not a database URL (e.g. a bare file name), or an unknown database.
    """
    from sqlalchemy.engine import make_url  # Optuna's RDB storage parses it the same way

    try:
        make_url(url).get_dialect()
    except Exception as exc:  # noqa: BLE001 - ArgumentError, NoSuchModuleError, ValueError alike
        shown = re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", url)  # no password in messages
        raise HwpruneError(f"storage {shown!r}: not a database URL hwprune can open ({exc}); e.g. "
                           "sqlite:///study.db or postgresql://user:password@host/db") from None
    return url


def prepare_run_dir(path: Path, hint: str = "choose an --out folder you can write to",
                    what: str = "run folder") -> Path:
    """Create the run folder ``path`` (and its parents) and check that a file can be written in it, before any work
    starts; a folder that cannot be made or written is one error naming it (as ``what``).

    Raises:
        HwpruneError: the folder cannot be created or written.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".hwprune-write-check-"):
            pass
    except OSError as exc:
        blocker = next((p for p in (path, *path.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            why = f"{blocker} exists and is not a folder"
        else:
            why = exc.strerror or str(exc)
        raise HwpruneError(f"cannot create or write the {what} {path}: {why}; {hint}") from None
    return path


@dataclass
class Budget:
    """A latency or memory budget: an absolute value, or a fraction of the dense model's (``"0.6x"``)."""

    value: float
    relative: bool = False

    @classmethod
    def parse(cls, text: str | float | int | None, what: str) -> "Budget | None":
        if text is None or text == "":
            return None
        if isinstance(text, (int, float)):
            value, relative = float(text), False
        else:
            m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(x)?\s*", str(text))
            if not m:
                raise HwpruneError(f"{what}: {text!r} is not a number (e.g. 20) or a fraction of the dense model "
                                   f"(e.g. 0.6x)")
            value, relative = float(m.group(1)), bool(m.group(2))
        if not value > 0 or math.isinf(value):  # NaN fails the first test; 1e999 parses as infinity
            raise HwpruneError(f"{what}: must be a positive finite number, got {text!r}")
        return cls(value, relative)

    def resolve(self, dense_value: float) -> float:
        return self.value * dense_value if self.relative else self.value

    def __str__(self) -> str:
        return f"{self.value:g}x" if self.relative else f"{self.value:g}"


ACCURACY_GUARD_OFF = ("off", "none")
DEFAULT_MAX_ACCURACY_DROP = "5%"  # relative: a pruned model must keep 95% of the dense model's accuracy


@dataclass(frozen=True)
class AccuracyGuard:
    """How much accuracy a recommended model may lose: an absolute drop (``0.01``) or a share of the dense model's
    accuracy (``"1%"``). Parsed from the CLI, the API, nightly job files and ``SearchConfig``."""

    value: float
    relative: bool

    @classmethod
    def parse(cls, text: "str | float | int | AccuracyGuard | None") -> "AccuracyGuard | None":
        """The guard for ``text``: ``"5%"`` (relative), ``0.01`` (absolute), ``"off"``/``None`` (no guard).

        Raises:
            HwpruneError: ``text`` is not one of those, or is negative.
        """
        if text is None or isinstance(text, AccuracyGuard):
            return text
        if isinstance(text, str) and text.strip().lower() in ACCURACY_GUARD_OFF:
            return None
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%)?\s*", str(text))
        if isinstance(text, bool) or not m:
            raise HwpruneError(f"max accuracy drop: {text!r} is not an absolute drop (e.g. 0.01), a share of the "
                               "dense accuracy (e.g. 1%) or 'off'")
        value, relative = float(m.group(1)), bool(m.group(2))
        if relative and value >= 100 or not relative and value < 0:
            raise HwpruneError(f"max accuracy drop: {text!r} is out of range")
        return cls(value / 100 if relative else value, relative)

    def floor(self, dense: float) -> float:
        """The least accuracy a pruned model may have, given the dense model's ``dense``."""
        return dense - abs(dense) * self.value if self.relative else dense - self.value

    def __str__(self) -> str:
        return f"{self.value * 100:g}%" if self.relative else f"{self.value:g}"


@dataclass
class SearchConfig:
    """Everything one search needs. Field names match the CLI flags (``--latency-budget-ms`` -> latency_budget_ms)."""

    model: str = "mobilenet-tiny"
    device: str = "host-cpu"
    latency_budget_ms: Budget | None = None
    memory_budget_mb: Budget | None = None
    trials: int | None = 40  # target number of complete trials in the study (a resumed study runs the rest)
    timeout_s: float | None = None
    storage: str | None = None  # Optuna storage URL; default sqlite in the run folder
    study: str | None = None  # default "<model>-<device>"
    out: Path = Path("reports")
    seed: int = 0
    sampler: str = "tpe"  # bench/bench_samplers.py (corrected run): TPE ranked first, not conclusively
    max_ratio: float = 0.85  # at 0.4x of the demo, 0.75 left too little room (README, Benchmark)
    depth: bool = True  # also search over removing whole residual blocks (hwprune.pruning.depth)
    channel_multiple: int | None = None  # default from the device profile
    trial_finetune_steps: int = 20
    final_finetune_steps: int = 300
    final_candidates: int = 3  # feasible models given the final fine-tune; the best afterwards is recommended
    calibration_batches: int = 8
    # the accuracy guard: a model that loses more is infeasible (None = off); see AccuracyGuard
    max_accuracy_drop: AccuracyGuard | None = AccuracyGuard.parse(DEFAULT_MAX_ACCURACY_DROP)
    recovery: str = DEFAULT_RECOVERY  # without the subject's data: auto | inputs | synthetic | none (recovery.py)
    data: Path | None = None  # a .pt/.npz file of inputs (and targets) for re-calibration and fine-tuning
    resume_changed: bool = False  # resume a study made for another model, inputs, device or recovery (identity.py)
    importance: str = DEFAULT_IMPORTANCE  # channel ranking (hwprune.pruning.importance.resolve_importance)
    exporter: str | None = None  # torchscript | dynamo; default: the backend's capabilities.exporter
    quantize: str | None = None  # off | int8: a precision knob per channel group; None: the profile's [quantize]
    # INT8 candidates whose outputs move more than this (relative error, held-out inputs) fail (hwprune.quant.check)
    quantize_tolerance: float = DEFAULT_QUANTIZE_TOLERANCE
    allow_untuned: bool = False  # let untuned TVM latencies drive a search
    tune_final_trials: int = 0  # TVM: MetaSchedule trials for the recommended model only, after the search
    allow_estimate: bool = False  # let roofline estimates drive a search
    profile_overrides: dict[str, Any] = field(default_factory=dict)  # backend, rpc__tracker, rpc__key, ssh__host...
    progress: bool = True
    run_folder: Path | None = None  # default <out>/<study>; nightly jobs put each night in a folder of its own
    command: str = ""  # the command line that started it, for the report
    mlflow: str | None = None  # MLflow tracking URI: one MLflow run per trial (hwprune.integrations.mlflow)
    # a stored latency predictor skips candidates predicted well over the latency budget (hwprune.study.screening)
    screen: str = DEFAULT_SCREEN
    # more Optuna callbacks, (study, frozen_trial) -> None, called after each trial (API only; not recorded)
    callbacks: list[Callable[[Any, Any], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.latency_budget_ms, (Budget, type(None))):
            self.latency_budget_ms = Budget.parse(self.latency_budget_ms, "latency budget")
        if not isinstance(self.memory_budget_mb, (Budget, type(None))):
            self.memory_budget_mb = Budget.parse(self.memory_budget_mb, "memory budget")
        self.out = Path(self.out)
        self.max_accuracy_drop = AccuracyGuard.parse(self.max_accuracy_drop)
        if self.recovery not in RECOVERY_METHODS:
            raise HwpruneError(f"recovery: {self.recovery!r} is not one of {', '.join(RECOVERY_METHODS)}")
        if self.data is not None:
            self.data = Path(self.data)
        if self.study:
            check_study_name(str(self.study))
        if self.storage:
            check_storage_url(self.storage)
        if self.trials is not None and self.trials < 1:
            raise HwpruneError(f"trials: must be at least 1, got {self.trials}")
        if self.trials is None and self.timeout_s is None:
            raise HwpruneError("give --trials N or --timeout SECONDS (or both)")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise HwpruneError(f"timeout: must be positive, got {self.timeout_s}")
        if self.sampler not in SAMPLERS:
            raise HwpruneError(f"sampler: {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if not 0.0 < self.max_ratio < 1.0:
            raise HwpruneError(f"max ratio: must be between 0 and 1 (exclusive), got {self.max_ratio}")
        if self.channel_multiple is not None and self.channel_multiple < 1:
            raise HwpruneError(f"channel multiple: must be at least 1, got {self.channel_multiple}")
        if self.exporter not in (None, "torchscript", "dynamo"):
            raise HwpruneError(f"exporter: {self.exporter!r} is not 'torchscript' or 'dynamo'")
        if self.quantize not in QUANTIZE_MODES:
            raise HwpruneError(f"quantize: {self.quantize!r} is not one of off, int8")
        if not self.quantize_tolerance > 0:
            raise HwpruneError(f"quantize tolerance: must be positive, got {self.quantize_tolerance}")
        if self.importance not in IMPORTANCES:
            raise HwpruneError(f"importance: {self.importance!r} is not one of {', '.join(IMPORTANCES)}")
        if self.screen not in SCREEN_MODES:
            raise HwpruneError(f"screen: {self.screen!r} is not one of {', '.join(SCREEN_MODES)}")
        if self.final_candidates < 1:
            raise HwpruneError(f"final candidates: must be at least 1, got {self.final_candidates}")
        self._check_tracking()
        for name in ("trial_finetune_steps", "final_finetune_steps", "calibration_batches", "tune_final_trials"):
            if getattr(self, name) < 0:
                raise HwpruneError(f"{name.replace('_', ' ')}: must not be negative")

    def _check_tracking(self) -> None:
        """``mlflow`` and ``callbacks``, checked before any work starts (a missing MLflow is found now, not after
        the dense baseline)."""
        self.callbacks = list(self.callbacks or [])
        bad = [c for c in self.callbacks if not callable(c)]
        if bad:
            raise HwpruneError(f"callbacks: {bad[0]!r} is not callable (an Optuna callback takes (study, trial))")
        if self.mlflow is not None:
            if not isinstance(self.mlflow, str) or not self.mlflow.strip():
                raise HwpruneError(f"--mlflow: expected a tracking URI (e.g. file:./mlruns), got {self.mlflow!r}")
            from hwprune.integrations.mlflow import require_mlflow

            require_mlflow()

    @property
    def study_name(self) -> str:
        if self.study:
            return self.study
        model = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(self.model)).strip("-")
        device = Path(str(self.device)).stem
        return f"{model}-{device}"

    @property
    def run_dir(self) -> Path:
        return Path(self.run_folder) if self.run_folder else self.out / self.study_name

    def to_dict(self) -> dict[str, Any]:
        # callbacks are code (and may hold locks asdict cannot copy): recorded by name only
        d = dataclasses.asdict(dataclasses.replace(self, callbacks=[]))
        d["callbacks"] = [getattr(c, "__qualname__", type(c).__qualname__) for c in self.callbacks]
        d["out"] = str(self.out)
        d["run_folder"] = str(self.run_folder) if self.run_folder else None
        d["latency_budget_ms"] = str(self.latency_budget_ms) if self.latency_budget_ms else None
        d["memory_budget_mb"] = str(self.memory_budget_mb) if self.memory_budget_mb else None
        d["max_accuracy_drop"] = str(self.max_accuracy_drop) if self.max_accuracy_drop else "off"
        d["data"] = str(self.data) if self.data else None
        return d
