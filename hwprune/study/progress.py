"""Progress for long searches: trials done, failures, best feasible model so far, ETA (rich progress bar)."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from hwprune.integrations.dashboard import named_constraints
from hwprune.study import attrs


class SearchProgress:
    """An Optuna callback that draws a progress bar on stderr (a no-op when ``enabled`` is False)."""

    def __init__(self, total: int | None, enabled: bool, budgets: Any, log: Any = None) -> None:
        self.enabled = enabled
        self.log = log
        self.budgets = budgets
        self.failed = 0
        self.best: str = "none feasible yet"
        self._progress = Progress(
            TextColumn("[bold]search"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(stderr=True), disable=not enabled, transient=False,
        )
        self._task = self._progress.add_task("search", total=total, status="")

    def __enter__(self) -> "SearchProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)

    def callback(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == TrialState.FAIL:
            self.failed += 1
            if self.log is not None:
                self.log(f"trial {trial.number} failed: {trial.user_attrs.get(attrs.FAIL_REASON, 'interrupted')}")
        elif trial.state == TrialState.COMPLETE and trial.values:
            feasible = all(v <= 0 for v in named_constraints(trial.system_attrs).values())
            if feasible:
                acc, lat, mem = trial.values
                if self.best == "none feasible yet" or acc > self._best_acc:
                    self._best_acc = acc
                    self.best = f"best feasible: acc {acc:.3f} @ {lat:.3f} ms, {mem:.2f} MB (trial {trial.number})"
        status = self.best + (f" | {self.failed} failed" if self.failed else "")
        self._progress.update(self._task, advance=1, status=status)
        if not self.enabled and self.log is not None and trial.state == TrialState.COMPLETE:
            # no terminal (CI, nightly logs): one line per trial instead of a bar
            task = self._progress.tasks[0]
            eta = f", ETA {task.time_remaining:.0f} s" if task.time_remaining else ""
            acc, lat, mem = trial.values
            self.log(f"trial {trial.number} ({task.completed:.0f}/{task.total or '?'}{eta}): {acc:.4f}, "
                     f"{lat:.3f} ms, {mem:.2f} MB | {status}")

    _best_acc: float = float("-inf")
