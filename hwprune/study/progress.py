"""Progress for long searches: trials done, failures, best feasible model so far, ETA (rich progress bar), and an
estimate of the final phase that follows the last trial (confirming the front, final fine-tunes, report)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from hwprune.integrations.dashboard import named_constraints
from hwprune.study import attrs
from hwprune.study.budgets import Budgets, judged_latency

REPORT_SECONDS = 5.0  # trials.csv, the dense node profile, summary.json and the report: a few seconds on the demo
STEP_FORWARDS = 3.0  # a training step costs about three forward passes (forward, backward): a rate from calibration


@dataclass(frozen=True)
class FinalPlan:
    """What the final phase will do, as far as the configuration and the subject say."""

    candidates: int  # models that get the final fine-tune (0: none follows)
    final_steps: int
    trial_steps: int  # fine-tune steps each trial ran (0: none), the rate's source
    calibration_batches: int  # BatchNorm re-calibration batches per trial, the rate's source without a fine-tune
    # front models under this trial accuracy are not confirmed unless drawn as final candidates (the guard judges
    # listed models after the final fine-tune: hwprune.study.finalists.guard_bound); None: every front model is
    guard_floor: float | None = None

    @classmethod
    def of(cls, config: Any, subject: Any, budgets: Any = None) -> FinalPlan:
        """The plan of a search with ``config`` (:class:`~hwprune.config.SearchConfig`) on ``subject`` under
        ``budgets`` (:class:`~hwprune.study.budgets.Budgets`, for the accuracy guard)."""
        trains = subject.train_data is not None
        # guard_trials is False exactly when final candidates get the final fine-tune (make_budgets)
        floor = budgets.accuracy_floor if budgets is not None and not budgets.guard_trials else None
        return cls(candidates=config.final_candidates if trains and config.final_finetune_steps else 0,
                   final_steps=config.final_finetune_steps, trial_steps=config.trial_finetune_steps if trains else 0,
                   calibration_batches=config.calibration_batches, guard_floor=floor)


class FinalPhase:
    """The final phase's duration, estimated from the per-stage seconds of the trials measured so far: each front
    model is rebuilt and measured again (about a trial's work), each final candidate fine-tuned at the trials'
    rate per step, then the report."""

    def __init__(self, plan: FinalPlan) -> None:
        self.plan = plan
        self._trial_s: list[float] = []
        self._step_s: list[float] = []
        self._evaluate_s: list[float] = []
        self._feasible: list[tuple[float, float, float]] = []

    def observe(self, trial: optuna.trial.FrozenTrial, feasible: bool) -> None:
        """Take a completed trial's stage seconds (a cached one did no work) and, if feasible, its values."""
        if feasible and trial.values:
            self._feasible.append(tuple(trial.values))  # type: ignore[arg-type]
        stages = trial.user_attrs.get(attrs.STAGE_SECONDS) or {}
        if attrs.CACHED_FROM in trial.user_attrs or attrs.MEASUREMENT not in trial.user_attrs or not stages:
            return
        self._trial_s.append(float(sum(stages.values())))
        self._evaluate_s.append(float(stages.get("evaluate", 0.0)))
        if self.plan.trial_steps and "finetune" in stages:
            self._step_s.append(stages["finetune"] / self.plan.trial_steps)
        elif self.plan.calibration_batches and "calibrate" in stages:
            self._step_s.append(STEP_FORWARDS * stages["calibrate"] / self.plan.calibration_batches)

    def front_size(self) -> int:
        """Feasible trials no other feasible trial dominates (accuracy up, latency and memory down) that the front's
        confirmation takes (those under the plan's ``guard_floor`` are left to the final candidates)."""
        def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
            return a[0] >= b[0] and a[1] <= b[1] and a[2] <= b[2] and a != b

        floor = self.plan.guard_floor
        return sum(not any(dominates(o, v) for o in self._feasible) and (floor is None or v[0] >= floor)
                   for v in set(self._feasible))

    def seconds(self) -> float | None:
        """Seconds the final phase should take; None before a measured trial completed."""
        if not self._trial_s:
            return None
        trial_s = statistics.median(self._trial_s)
        step_s = statistics.median(self._step_s) if self._step_s else 0.0
        finetune_s = self.plan.final_steps * step_s + statistics.median(self._evaluate_s)
        # the finalists come from the front or beside it: each not on it is confirmed first
        confirmations = self.front_size() + self.plan.candidates
        return confirmations * trial_s + self.plan.candidates * finetune_s + trial_s + REPORT_SECONDS

    def describe(self) -> str:
        """What the final phase will do, and its estimated seconds."""
        s = self.seconds()
        tunes = (f", {self.plan.candidates} final fine-tunes of {self.plan.final_steps} steps"
                 if self.plan.candidates else "")
        eta = f": ~{s:.0f} s to finish" if s is not None else ""
        # with a guard judged after the final fine-tune, often no front model is confirmed before the candidates
        front = self.front_size()
        what = f"~{front} front models" if front or not self.plan.candidates else "the final candidates"
        return f"confirming {what} (rebuilt, re-measured, re-evaluated){tunes}, report{eta}"


class SearchProgress:
    """An Optuna callback that draws a progress bar on stderr (a no-op when ``enabled`` is False)."""

    def __init__(self, total: int | None, enabled: bool, budgets: Budgets | None, log: Any = None,
                 final: FinalPlan | None = None) -> None:
        self.enabled = enabled
        self.final = FinalPhase(final) if final is not None else None
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
            if self.final is not None:
                self.final.observe(trial, feasible)
            if feasible:
                acc, lat, mem = self._judged(trial)
                if self.best == "none feasible yet" or acc > self._best_acc:
                    self._best_acc = acc
                    self.best = f"best feasible: acc {acc:.3f} @ {lat:.3f} ms, {mem:.2f} MB (trial {trial.number})"
        status = self.best + (f" | {self.failed} failed" if self.failed else "")
        # the bar's ETA ends at the last trial; the final phase comes after it
        final_s = self.final.seconds() if self.final is not None else None
        then = f"then ~{final_s:.0f} s to finish" if final_s is not None else ""
        self._progress.update(self._task, advance=1, status=status + (f" | {then}" if then else ""))
        if not self.enabled and self.log is not None and trial.state == TrialState.COMPLETE:
            # no terminal (CI, nightly logs): one line per trial instead of a bar
            task = self._progress.tasks[0]
            eta = f", ETA {task.time_remaining:.0f} s" if task.time_remaining else ""
            eta += f"{',' if eta else ''} {then}" if then else ""
            acc, lat, mem = self._judged(trial)
            self.log(f"trial {trial.number} ({task.completed:.0f}/{task.total or '?'}{eta}): {acc:.4f}, "
                     f"{lat:.3f} ms, {mem:.2f} MB | {status}")

    _best_acc: float = float("-inf")

    def _judged(self, trial: optuna.trial.FrozenTrial) -> tuple[float, float, float]:
        """accuracy, latency as the budget judges it (as the final tables show it), memory."""
        acc, _, mem = trial.values
        if self.budgets is None:
            return acc, trial.values[1], mem
        return acc, judged_latency(trial, self.budgets.now()), mem

    def final_phase_started(self) -> None:
        """Log the stage line of the final phase, with its estimate."""
        if self.final is not None and self.log is not None:
            self.log(f"trials done; final phase: {self.final.describe()}")
