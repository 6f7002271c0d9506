"""The Optuna callbacks of a search, as named classes. Each changes only what it owns (the dense reference's sets,
the study's queue); the budgets every reader shares are derived, not written (:meth:`Budgets.now`)."""

from __future__ import annotations

from collections.abc import Callable

import optuna
from optuna.trial import TrialState

from hwprune.pruning import PruningSpace
from hwprune.study import attrs
from hwprune.study.bracket import bracket_budget
from hwprune.study.budgets import Budgets, ConfirmFn
from hwprune.study.reference import DenseReference


class FollowReference:
    """Measure the dense model again every few completed trials (:meth:`DenseReference.after_trial`), which a
    relative latency budget follows."""

    def __init__(self, reference: DenseReference) -> None:
        self.reference = reference
        self.completed = 0  # trials completed in this run

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state != TrialState.COMPLETE:
            return
        self.completed += 1
        self.reference.after_trial(self.completed)


class AimAtBudget:
    """After each uniform trial, queue the next uniform ratio of the bisection to the latency budget (or the depth
    probes once it is done; :func:`~hwprune.study.bracket.bracket_budget`)."""

    def __init__(self, space: PruningSpace, reference: DenseReference, budgets: Budgets,
                 confirm: ConfirmFn, log: Callable[[str], None]) -> None:
        self.space, self.reference, self.budgets, self.confirm, self.log = space, reference, budgets, confirm, log

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state != TrialState.COMPLETE or attrs.UNIFORM_RATIO not in trial.user_attrs:
            return
        probed = study.user_attrs.get(attrs.DEPTH_PROBED) is not None
        ratios = bracket_budget(study, self.space, self.reference.measurement.latency.median_ms, self.budgets.now(),
                                confirm=self.confirm)
        if ratios:
            self.log(f"uniform ratio {ratios[0]:.3f} queued: bisecting for the least uniform pruning "
                     "that meets the latency budget")
        elif not probed and study.user_attrs.get(attrs.DEPTH_PROBED):
            self.log("probing depth: a uniform model over the budget (the least pruned one, or the "
                     "most pruned when none meets it), with one of "
                     f"{', '.join(study.user_attrs[attrs.DEPTH_PROBED])} removed")


class StopOnInterrupt:
    """Ctrl-C during the trials, kept even where Python loses it. Python raises ``KeyboardInterrupt`` wherever the
    main thread is when SIGINT arrives; inside a garbage-collector or weakref callback (SQLAlchemy's, seen in CI)
    the exception is printed as "ignored" and dropped, and the search ran on to its last trial. While active, the
    SIGINT handler also records the request, and this callback raises it again once the trial in flight is saved.

    Use as a context manager around ``study.optimize`` and pass it as a callback; :attr:`requested` says whether
    Ctrl-C came, caught or not. The handler is installed only over Python's default one, in the main thread: a
    process that ignores SIGINT (a shell's background job) keeps ignoring it.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: object = None

    def _handler(self, signum: int, frame: object) -> None:
        self.requested = True
        raise KeyboardInterrupt

    def __enter__(self) -> StopOnInterrupt:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]
            self._previous = None

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.requested:
            raise KeyboardInterrupt
