"""Everything a report shows, read from a run folder (and, only as a fallback, from the Optuna storage it names).

A report must rebuild on another machine from the run folder alone, so the run folder is always the primary source:
``summary.json`` for the answer, ``trials.csv`` for every trial, ``node_latency.json`` files for per-node profiles.
The study storage is opened only when ``trials.csv`` is missing, and never created: an SQLite URL whose file does
not exist is skipped (opening it would silently create an empty study).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from hwprune.errors import HwpruneError
from hwprune.export import sha256_file
# the run folder's names for the latency the budget judges (hwprune.study.records imports without torch and Optuna)
from hwprune.study.records import JUDGED_BY_OWN, JUDGED_BY_RATIO, JUDGED_COLUMN  # noqa: F401


log = logging.getLogger("hwprune")

# columns of trials.csv the report uses; a storage fallback fills the same ones
TRIAL_COLUMNS = ("trial", "state", "accuracy", "latency_ms", "memory_mb", "feasible", "cached_from", "fail_reason",
                 "duration_s", "macs", "params", "latency_ratio", JUDGED_COLUMN)


@dataclass
class FileCheck:
    """One artifact recorded in summary.json, checked against the file on disk at report time."""

    model: str  # "dense" or "trial 17"
    kind: str  # onnx | weights | module | node_latency
    path: str  # relative to the run folder, as recorded
    bytes: int | None
    sha256: str | None
    status: str  # ok | missing | mismatch | outside
    actual_bytes: int | None = None
    actual_sha256: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def problem(self) -> str:
        """One sentence saying what is wrong with the file ('' when it checks out)."""
        if self.status == "missing":
            return f"{self.path} ({self.model} {self.kind}) is missing from the run folder"
        if self.status == "outside":
            return f"{self.path} ({self.model} {self.kind}) is not a path inside the run folder"
        if self.status == "mismatch":
            return (f"{self.path} ({self.model} {self.kind}) does not match its recorded SHA-256: recorded "
                    f"{(self.sha256 or '?')[:12]}..., on disk {(self.actual_sha256 or '?')[:12]}... "
                    f"({self.actual_bytes} bytes on disk, {self.bytes} recorded)")
        return ""


@dataclass
class RunData:
    """A run folder, loaded: the summary plus the tables and profiles the report draws from."""

    run_dir: Path
    summary: dict[str, Any]
    trials: pd.DataFrame
    trials_source: str  # "trials.csv" | "study storage" | "none"
    pareto_csv: pd.DataFrame | None
    node_latency: dict[int | None, dict[str, Any]] = field(default_factory=dict)  # trial (None = dense) -> profile
    file_checks: list[FileCheck] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # problems found while loading (shown in the report)

    @property
    def request(self) -> dict[str, Any]:
        return self.summary.get("request", {})

    @property
    def metric(self) -> str:
        return str(self.summary.get("metric") or "accuracy")

    @property
    def dense(self) -> dict[str, Any]:
        return self.summary["dense"]

    @property
    def pareto(self) -> list[dict[str, Any]]:
        return list(self.summary.get("pareto") or [])

    @property
    def node_profiles(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The per-node latency profiles of the dense and the recommended model (None where not recorded)."""
        rec = self.recommended
        return self.node_latency.get(None), (self.node_latency.get(rec["trial"]) if rec is not None else None)

    @property
    def recommended(self) -> dict[str, Any] | None:
        rec = self.summary.get("recommended")
        return next((m for m in self.pareto if m.get("trial") == rec), None) if rec is not None else None

    @property
    def name(self) -> str:
        return str(self.request.get("study") or self.run_dir.name)

    def models(self) -> list[dict[str, Any]]:
        """Dense first, then the recommended model, then the rest of the Pareto front by latency."""
        rec = self.recommended
        rest = [m for m in self.pareto if m is not rec]
        return [self.dense] + ([rec] if rec is not None else []) + rest


def model_label(record: dict[str, Any]) -> str:
    """How the report names a model: ``dense`` or ``trial N``, with its precision when not FP32 (``trial N (int8)``)."""
    if record.get("trial") is None:
        return "dense"
    precision = (record.get("precision") or {}).get("label", "fp32")
    return f"trial {record['trial']}" + (f" ({precision})" if precision != "fp32" else "")


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _inside(run_dir: Path, rel: str) -> Path | None:
    """``run_dir / rel`` if ``rel`` is a relative path that stays inside the run folder, else None."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not rel:
        return None
    return run_dir.joinpath(*p.parts)


def check_files(run_dir: Path, models: list[dict[str, Any]]) -> list[FileCheck]:
    """Hash every file the models record and compare with the recorded size and SHA-256."""
    checks: list[FileCheck] = []
    for m in models:
        for kind, rec in (m.get("files") or {}).items():
            if not isinstance(rec, dict) or "path" not in rec:
                continue
            path = _inside(run_dir, str(rec["path"]))
            check = FileCheck(model_label(m), kind, str(rec["path"]), rec.get("bytes"), rec.get("sha256"), "ok")
            if path is None:
                check.status = "outside"
            elif not path.is_file():
                check.status = "missing"
            else:
                check.actual_bytes = path.stat().st_size
                check.actual_sha256 = sha256_file(path)
                size_differs = check.bytes is not None and check.actual_bytes != check.bytes
                if check.actual_sha256 != check.sha256 or size_differs:
                    check.status = "mismatch"
            checks.append(check)
    return checks


def _sqlite_file(url: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(url[len(prefix):]) if url.startswith(prefix) else None


def _storage_candidates(run_dir: Path, url: str | None) -> list[str]:
    """Storage URLs worth trying, without ever creating a database: the recorded one, then the run folder's own."""
    urls: list[str] = []
    if url:
        db = _sqlite_file(url)
        if db is None or db.is_file():
            urls.append(url)
    local = run_dir / "study.db"
    if local.is_file():
        urls.append(f"sqlite:///{local.resolve()}")
    return list(dict.fromkeys(urls))


def trials_from_storage(run_dir: Path, request: dict[str, Any]) -> pd.DataFrame | None:
    """The trials.csv table rebuilt from the Optuna storage, or None when no storage can be opened."""
    study_name = request.get("study")
    if not study_name:
        return None
    try:
        import optuna

        from hwprune.study.objective import trials_table
    except ImportError:
        return None
    for url in _storage_candidates(run_dir, request.get("storage")):
        try:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            study = optuna.load_study(study_name=study_name, storage=url)
            return pd.DataFrame(trials_table(study))
        except Exception as exc:  # noqa: BLE001 - an unreachable storage only means less detail
            log.debug("report: cannot read study %s from %s: %s", study_name, url, exc)
    return None


def _load_trials(run_dir: Path, request: dict[str, Any], warnings: list[str]) -> tuple[pd.DataFrame, str]:
    path = run_dir / "trials.csv"
    if path.is_file():
        try:
            return pd.read_csv(path), "trials.csv"
        except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
            warnings.append(f"trials.csv could not be read ({exc}); trial details come from the study storage")
    df = trials_from_storage(run_dir, request)
    if df is not None:
        return df, "study storage"
    warnings.append("trials.csv is missing and the study storage cannot be opened: the per-trial plot and table "
                    "show only the models recorded in summary.json")
    return pd.DataFrame(columns=list(TRIAL_COLUMNS)), "none"


def _normalise_trials(df: pd.DataFrame, dense_ms: float) -> pd.DataFrame:
    df = df.copy()
    for col in TRIAL_COLUMNS:
        if col not in df.columns:
            df[col] = None
    for col in ("accuracy", "latency_ms", "memory_mb", "duration_s", "latency_ratio", JUDGED_COLUMN):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    # a trials table without the judged latency (older run folders, the storage fallback): as the search judged
    # it, the ratio to the dense model measured beside the trial x the dense reference, else the own median
    judged = df["latency_ratio"] * dense_ms
    df[JUDGED_COLUMN] = df[JUDGED_COLUMN].fillna(judged.where(df["latency_ratio"].notna(), df["latency_ms"]))
    df["feasible"] = df["feasible"].map(lambda v: str(v).strip().lower() in ("true", "1", "1.0"))
    df["cached_from"] = pd.to_numeric(df["cached_from"], errors="coerce")
    df["fail_reason"] = df["fail_reason"].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v))
                                              else str(v))
    df["trial"] = pd.to_numeric(df["trial"], errors="coerce").astype("Int64")
    return df.sort_values("trial").reset_index(drop=True)


# what a report cannot do without: (keys of every model record, keys of a front model's), each "key" or "key.sub"
_MODEL_NEEDS = ("accuracy", "latency_ms.median", "memory_mb.total")
_FRONT_NEEDS = ("trial", "meets.latency", "meets.memory", "files.onnx")
_TABLES = ("request", "search", "measurement", "accuracy_guard", "recovery")  # optional, but tables when present


def _read_summary(path: Path) -> dict[str, Any]:
    """summary.json, checked for what every report reads; a damaged one is one error naming the file and the key."""
    fix = "rebuild it by running the search again (same command), or restore the file"
    try:
        summary = _read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HwpruneError(f"{path}: not valid JSON ({exc}); {fix}") from None
    except OSError as exc:
        raise HwpruneError(f"{path}: cannot be read ({exc.strerror or exc})") from None

    def missing(record: Any, where: str, needs: tuple[str, ...]) -> None:
        if not isinstance(record, dict):
            raise HwpruneError(f"{path}: {where}: expected an object, got {type(record).__name__}; {fix}")
        for need in needs:
            value: Any = record
            for part in need.split("."):
                if not isinstance(value, dict) or part not in value:
                    raise HwpruneError(f"{path}: {where}.{need} is missing; {fix}")
                value = value[part]

    missing(summary, "summary", ("dense",))
    missing(summary["dense"], "dense", _MODEL_NEEDS)
    front = summary.get("pareto") or []
    if not isinstance(front, list):
        raise HwpruneError(f"{path}: pareto: expected a list, got {type(front).__name__}; {fix}")
    for i, record in enumerate(front):
        missing(record, f"pareto[{i}]", _MODEL_NEEDS + _FRONT_NEEDS)
    for key in _TABLES:
        if key in summary and summary[key] is None:
            del summary[key]  # null reads as absent
        elif key in summary and not isinstance(summary[key], dict):
            raise HwpruneError(f"{path}: {key}: expected an object, got {type(summary[key]).__name__}; {fix}")
    return summary


def _fill_judged(summary: dict[str, Any]) -> None:
    """Give every model of a summary written before ``latency_ms.judged`` existed the latency the budget judged: the
    ratio to the dense model measured beside it x the dense reference (the dense model's median) where it has one,
    else its own median."""
    dense_ms = summary["dense"]["latency_ms"]["median"]
    for m in [summary["dense"], *(summary.get("pareto") or [])]:
        lat = m["latency_ms"]
        if lat.get("judged") is None:
            ratio = m.get("latency_ratio") if m is not summary["dense"] else None
            lat["judged"] = float(ratio) * float(dense_ms) if ratio else lat["median"]
            lat["judged_by"] = JUDGED_BY_RATIO if ratio else JUDGED_BY_OWN


def load_run(run_dir: str | Path) -> RunData:
    """Load a run folder written by ``hwprune search`` (see docs/run-folder.md)."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no summary.json; is this a folder written by `hwprune search`?")
    summary = _read_summary(summary_path)
    warnings: list[str] = []
    if summary.get("schema") != 1:
        warnings.append(f"summary.json has schema {summary.get('schema')!r}; this report understands schema 1")
    if "request" not in summary and (run_dir / "request.json").is_file():
        try:
            summary["request"] = _read_json(run_dir / "request.json")
        except (OSError, ValueError) as exc:  # the settings are missing from the report, the rest stands
            warnings.append(f"request.json could not be read ({exc}): the report shows no search settings")
        if not isinstance(summary.get("request", {}), dict):
            del summary["request"]
            warnings.append("request.json is not an object: the report shows no search settings")
    _fill_judged(summary)
    trials, source = _load_trials(run_dir, summary.get("request", {}), warnings)
    trials = _normalise_trials(trials, float(summary["dense"]["latency_ms"]["median"]))

    pareto_csv = None
    if (run_dir / "pareto.csv").is_file():
        pareto_csv = pd.read_csv(run_dir / "pareto.csv")
        csv_trials = sorted(int(t) for t in pareto_csv["trial"]) if "trial" in pareto_csv else []
        json_trials = sorted(int(m["trial"]) for m in summary.get("pareto") or [])
        if csv_trials != json_trials:
            warnings.append(f"pareto.csv lists trials {csv_trials} but summary.json lists {json_trials}; the report "
                            "follows summary.json")

    run = RunData(run_dir=run_dir, summary=summary, trials=trials, trials_source=source, pareto_csv=pareto_csv,
                  warnings=warnings)
    run.file_checks = check_files(run_dir, run.models())
    for m in run.models():
        rec = (m.get("files") or {}).get("node_latency")
        path = _inside(run_dir, str(rec["path"])) if isinstance(rec, dict) and "path" in rec else None
        if path is not None and path.is_file():
            try:
                run.node_latency[m.get("trial")] = _read_json(path)
            except (OSError, json.JSONDecodeError) as exc:
                warnings.append(f"{rec['path']} could not be read: {exc}")
    return run
