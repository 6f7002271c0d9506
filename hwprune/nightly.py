"""Nightly search jobs: one job file, one study that grows night after night, one run folder per night, a comparison
with the previous night and an exit status that flags regressions.

A job folder looks like::

    <out>/<name>/study.db           the Optuna study every night resumes (unless the job names another storage)
    <out>/<name>/nights/2026-11-22/ that night's run folder (summary.json, pareto.csv, models/, report.html,
                                    night.json, and compare.json/.html/.md against the night before)
    <out>/<name>/history.csv        one row per night: trials so far, the recommended model, regressions

Re-running the same night resumes it up to the same trial target instead of adding another night's worth.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwprune.config import SearchConfig, prepare_run_dir, read_toml
from hwprune.errors import BudgetUnreachable, HwpruneError

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_NIGHT = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_SEARCH_FIELDS = {f.name for f in dataclasses.fields(SearchConfig)} - {
    "trials", "timeout_s", "storage", "study", "out", "run_folder", "progress", "command"}
_TOLERANCES = ("latency_tolerance", "accuracy_tolerance", "memory_tolerance")
HISTORY_COLUMNS = ["night", "created", "trials_total", "trials_tonight", "recommended", "accuracy", "latency_ms",
                   "latency_judged_ms", "memory_mb", "dense_latency_ms", "hypervolume", "regressions", "run_dir"]


@dataclass
class NightlyJob:
    """A nightly job as read from its TOML file (see README, "Nightly jobs")."""

    name: str
    search: dict[str, Any]
    trials_per_night: int | None = 20
    timeout_s: float | None = None
    out: Path = Path("reports/nightly")
    storage: str | None = None
    # a shared host moves latencies by several per cent from night to night, and a growing study may recommend another,
    # slightly larger model; these are the margins a change must pass (as in examples/nightly.toml)
    tolerances: dict[str, float] = field(default_factory=lambda: {"latency_tolerance": 0.05,
                                                                   "accuracy_tolerance": 0.01,
                                                                   "memory_tolerance": 0.05})
    source: Path | None = None

    @property
    def folder(self) -> Path:
        return self.out / self.name

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.folder / 'study.db').resolve()}"


def load_job(path: str | Path) -> NightlyJob:
    """Read and validate a job file; errors name the file and the field."""
    path = Path(path)
    data = read_toml(path, "nightly job")
    known = {"name", "out", "storage", "trials_per_night", "timeout_s", "search", "regressions"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise HwpruneError(f"{path}: {unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name or name == ".":
        raise HwpruneError(f"{path}: name: required, letters, digits, '.', '_' or '-' only, not '.' or '..' (it "
                           f"names the job's folder; got {name!r})")
    search = data.get("search")
    if not isinstance(search, dict) or "model" not in search or "device" not in search:
        raise HwpruneError(f"{path}: [search]: a table with at least model and device is required")
    bad = sorted(set(search) - _SEARCH_FIELDS)
    if bad:
        raise HwpruneError(f"{path}: search.{bad[0]}: unknown or not allowed here (nightly sets it; allowed: "
                           f"{', '.join(sorted(_SEARCH_FIELDS))})")
    per_night, timeout = data.get("trials_per_night", 20 if "timeout_s" not in data else None), data.get("timeout_s")
    if per_night is not None and (not isinstance(per_night, int) or per_night < 1):
        raise HwpruneError(f"{path}: trials_per_night: a positive integer, got {per_night!r}")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise HwpruneError(f"{path}: timeout_s: a positive number of seconds, got {timeout!r}")
    job = NightlyJob(name=name, search=dict(search), trials_per_night=per_night,
                     timeout_s=float(timeout) if timeout is not None else None, source=path.resolve())
    if "out" in data:
        out = Path(str(data["out"]))
        job.out = out if out.is_absolute() else path.resolve().parent / out
    else:
        job.out = Path.cwd() / job.out
    if "storage" in data:
        job.storage = str(data["storage"])
    regs = data.get("regressions", {})
    if not isinstance(regs, dict):
        raise HwpruneError(f"{path}: [regressions]: expected a table")
    for key, value in regs.items():
        if key not in _TOLERANCES:
            raise HwpruneError(f"{path}: regressions.{key}: unknown field (known: {', '.join(_TOLERANCES)})")
        if not isinstance(value, (int, float)) or value < 0:
            raise HwpruneError(f"{path}: regressions.{key}: a number >= 0, got {value!r}")
        job.tolerances[key] = float(value)
    try:  # validate the search settings now, not after a night of work
        _config(job, job.folder / "nights" / "check", trials=1)
    except HwpruneError as exc:
        raise HwpruneError(f"{path}: [search]: {exc}") from None
    except TypeError as exc:
        raise HwpruneError(f"{path}: [search]: {exc}") from None
    return job


def _config(job: NightlyJob, run_folder: Path, trials: int | None) -> SearchConfig:
    return SearchConfig(**job.search, trials=trials, timeout_s=job.timeout_s, storage=job.storage_url,
                        study=job.name, out=job.out, run_folder=run_folder, progress=False,
                        command=f"hwprune nightly {job.source or job.name}")


@dataclass
class NightResult:
    """What one night produced: its run folder, the comparison with the night before, and the regressions."""

    night: str
    run_dir: Path
    previous: Path | None
    comparison: dict[str, Any] | None
    budget_unreachable: str | None = None

    @property
    def regressions(self) -> list[dict[str, Any]]:
        return list((self.comparison or {}).get("regressions", []))


def previous_night(job: NightlyJob, night: str) -> Path | None:
    """The latest earlier night of ``job`` that finished (has a summary.json)."""
    nights = job.folder / "nights"
    if not nights.is_dir():
        return None
    earlier = sorted(p for p in nights.iterdir()
                     if _NIGHT.match(p.name) and p.name < night and (p / "summary.json").is_file())
    return earlier[-1] if earlier else None


def _completed_trials(storage: str, study: str) -> int:
    import optuna
    from optuna.trial import TrialState

    try:
        s = optuna.load_study(study_name=study, storage=storage)
    except KeyError:  # a new job: no study yet
        return 0
    return len(s.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def check_night(night: str | None) -> str:
    """``night`` (default: today, UTC) if it is a real date written YYYY-MM-DD, else one error: it names a folder."""
    night = night or dt.datetime.now(dt.timezone.utc).date().isoformat()
    try:
        if not _NIGHT.match(night):
            raise ValueError
        dt.date.fromisoformat(night)
    except ValueError:
        raise HwpruneError(f"night: {night!r} is not a date written YYYY-MM-DD, like 2026-11-22") from None
    return night


def run_night(job: NightlyJob, night: str | None = None, log: Callable[[str], None] | None = None) -> NightResult:
    """Run (or resume) the night ``night`` (default: today, UTC) of ``job``."""
    from hwprune.export import atomic_write_text
    from hwprune.study.run import Search

    log = log or (lambda _m: None)
    night = check_night(night)
    run_dir = prepare_run_dir(job.folder / "nights" / night, "set the job's out to a folder you can write to")
    marker = run_dir / "night.json"
    if marker.is_file():  # resuming this night: same target, not another night's worth of trials
        state = json.loads(marker.read_text())
        log(f"night {night}: resuming toward {state['target']} complete trials")
    else:
        start = _completed_trials(job.storage_url, job.name)
        target = start + job.trials_per_night if job.trials_per_night else None
        state = {"night": night, "trials_at_start": start, "target": target, "job": job.name,
                 "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        atomic_write_text(marker, json.dumps(state, indent=2))
        log(f"night {night}: study {job.name!r} has {start} complete trials; "
            f"{'target ' + str(target) if target is not None else 'running'}"
            f"{f' within {job.timeout_s:.0f} s' if job.timeout_s else ''}")

    config = _config(job, run_dir, state["target"])
    unreachable = None
    try:
        Search(config, log_fn=log).run()
    except BudgetUnreachable as exc:
        unreachable = str(exc)  # a night that finds nothing is a result to compare too
        if not (run_dir / "summary.json").is_file():
            raise
        log(str(exc))

    previous = previous_night(job, night)
    comparison = None
    if previous is not None:
        from hwprune.report import build_comparison

        build_comparison(previous, run_dir, run_dir, **job.tolerances)
        comparison = json.loads((run_dir / "compare.json").read_text())
    result = NightResult(night, run_dir, previous, comparison, unreachable)
    _append_history(job, result, state)
    return result


def _append_history(job: NightlyJob, result: NightResult, state: dict[str, Any]) -> None:
    from hwprune.export import atomic_write_text
    from hwprune.study.records import Summary

    summary = Summary.read(result.run_dir / "summary.json")
    rec = next((r for r in summary.pareto if r.recommended), None)
    hv = (summary.search.get("hypervolume") or [[None, None]])[-1][1]
    total = summary.search["trials_complete"]
    # latency_ms: the recommended model's own median; latency_judged_ms: what its budget judged (compare.json's
    # regressions are judged on it)
    row = {"night": result.night, "created": summary.created, "trials_total": total,
           "trials_tonight": total - int(state["trials_at_start"]),
           "recommended": rec.trial if rec else "", "accuracy": rec.accuracy if rec else "",
           "latency_ms": rec.latency_ms.median if rec else "",
           "latency_judged_ms": rec.latency_ms.primary_ms if rec else "",
           "memory_mb": rec.memory_mb.total if rec else "",
           "dense_latency_ms": summary.dense.latency_ms.median, "hypervolume": hv if hv is not None else "",
           "regressions": len(result.regressions), "run_dir": str(result.run_dir.relative_to(job.folder))}
    path = job.folder / "history.csv"
    rows: list[dict[str, Any]] = []
    if path.is_file():
        with path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("night") != result.night]
    rows.append(row)
    rows.sort(key=lambda r: str(r["night"]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
