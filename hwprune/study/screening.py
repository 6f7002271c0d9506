"""Screening in a measured search (``--screen on``): a stored latency predictor for the profile predicts each
candidate's judged latency before the board measures it, and a candidate predicted well over the latency budget (by
more than the predictor's p90 validation error, :func:`hwprune.predict.screen.screen`) is not measured: its trial is
recorded as pruned, with the user attribute ``screened`` (the predicted ms) and a ``fail_reason``. A screened trial
never has values, so the measured front is never made of predictions.

The predictor's validation error is measured on other models; what matters to a search is its error on this model's
candidates. So each measured candidate's prediction is kept beside its judged latency (trial attribute
``predicted_ms``), and once a few are measured the screen rescales predictions by their median ratio and allows for
the p90 of the errors left (floored at the measurement noise) instead of the validation error. Each ratio is kept on
its trial (``screen_ratio``), so a resumed search starts from the errors its earlier trials measured.

A candidate whose prediction plus that error is still well inside the budget (``measure_once``,
:data:`hwprune.predict.screen.SETTLE_MARGIN`) is first measured alone and judged against the dense reference (the
middle of the dense sets) instead of in three rounds beside the dense model, as long as that measurement also puts
it that far inside: its trial records ``latency_rounds`` = 0. A measurement that lands nearer the budget is followed
by the rounds beside the dense model, where one round settles it when that round is that far inside
(``latency_rounds`` = 1). An incumbent measured again before the refinement builds on it is settled by one round
beside the dense model under the same rule (:meth:`Screening.settle_ms_for`), never alone: the re-measure guards
against a lucky measurement, and the predictor is an independent second opinion that the model is far from the
budget's edge.

Once a candidate's accuracy is known (it is evaluated before it is measured when the screen is on), a measured
feasible trial at least as accurate and no larger in memory that the candidate is predicted clearly slower than
(by ``DOMINATED_MARGIN`` beyond the prediction's error) dominates it: it cannot be on the front, whichever side of
the budget it falls, so its latency only guides the sampler. It is settled like a candidate well inside the budget,
on one measurement that also puts it that much slower than the dominating trial (``dominated_by`` on its trial).
A candidate that cannot be listed whatever its latency (under the accuracy guard's floor, with enough more accurate
feasible trials ahead of it that the final candidates are drawn before it: :meth:`Screening.cannot_be_listed`) is
settled on any one measurement (``under_guard`` on its trial).

Every candidate the search does measure is added to the predictor (``Predictor.update``: its whole-model correction
is refitted), and the predictor is saved back beside the measurement cache when the trials end.

A device with no stored predictor is screened by the host's standing in (``Screening.stand_in``): its predictions are
only used relative to the dense model measured on the device, it allows an unvalidated predictor's error until the
search measures its own, and it neither learns from the device nor is saved.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd

from hwprune.config import DEFAULT_SCREEN, SCREEN_MODES
from hwprune.study import attrs

SCREENED_ATTR = attrs.SCREENED  # trial user attribute (hwprune.study.attrs)
PREDICTED_ATTR = attrs.PREDICTED
RATIO_ATTR = attrs.SCREEN_RATIO
REFIT_EVERY = 5  # measured candidates between refits of the predictor's correction (a refit is a small solve)
MIN_STUDY_SAMPLES = 5  # measured candidates before the screen trusts their errors over the predictor's validation
STUDY_ERROR_FLOOR = 0.05  # the least error allowed for: the measurement's own run-to-run noise
# a candidate predicted (beyond the prediction's error) and then measured this much slower than a measured feasible
# trial at least as accurate and no larger is settled on one measurement: as far as SETTLE_MARGIN puts a candidate
# from the budget, for the same reason (drift of the dense reference since it was measured)
DOMINATED_MARGIN = 0.10
# a candidate under the accuracy guard's floor is listed only as a final candidate, drawn in order of accuracy from
# the measured feasible trials; the draw confirms at most FINALIST_DEPTH x the wanted number before it stops
# (hwprune.study.finalists.final_candidates), so with that many distinct architectures more accurate it is never
# reached
FINALIST_DEPTH = 2


@dataclass(frozen=True)
class _Judged:
    """The screen's decision on one model against the budget now, in the budget's units."""

    decision: Any  # hwprune.predict.screen.ScreenDecision, in the predictor's own units
    scale: float  # predictor units -> the device today (measured / predicted dense)
    bias: float  # the search's own median measured / predicted ratio (1.0 until MIN_STUDY_SAMPLES)
    budget_ms: float
    own_error: bool  # the error allowed for is this search's, not the held-out one

    @property
    def settle_ms(self) -> float | None:
        """A judged latency under which one round settles the model (``measure_once``); None otherwise."""
        from hwprune.predict.screen import SETTLE_MARGIN

        return self.budget_ms * (1.0 - SETTLE_MARGIN) if self.decision.action == "measure_once" else None


@dataclass
class Screening:
    """The screen of one search: the predictor, the dense model it is judged against and the measurements to add.

    ``dense_ms`` is the dense model's measured latency; predictions are rescaled by ``dense_ms / predicted dense``,
    so only the predictor's *relative* error between the candidate and the dense model matters.
    """

    predictor: Any  # hwprune.predict.model.Predictor
    dense_onnx: Path
    dense_ms: float
    log: Any = print
    root: Path | None = None  # where the predictor is saved (default: the measurement cache)
    # a predictor of another device standing in (the host's, for a board without one of its own): its predictions
    # are only taken relative to the dense model, the device's measurements are not added to it and it is not saved
    stand_in: bool = False
    # final candidates the search draws (0: none, the guard then judges each trial's accuracy): what decides whether
    # a candidate under the guard's floor can still be listed (settles_for)
    finalists: int = 0
    screened: int = 0
    measured: int = 0
    _dense_pred: float | None = None
    _pending: Any = None  # features of the candidate last screened (measured next, unless skipped)
    _pending_ms: float | None = None  # its predicted judged latency, before the study's own rescaling
    _settle_ms: float | None = None  # a judged latency under which one round settles the pending candidate
    _predicted: float | None = None  # the pending candidate's predicted judged latency (ms), rescaled as judged
    _error: float | None = None  # the relative error the screen allowed that prediction
    _memory_mb: float | None = None  # the pending candidate's memory (weights and peak activations, from its graph)
    _dominator: tuple[int, float] | None = None  # (trial, judged ms) that dominates the pending candidate
    _under_guard: bool = False  # the pending candidate cannot be listed (under the guard's floor, settles_for)
    ratios: list[float] = field(default_factory=list)  # measured / predicted judged latency of measured candidates

    def study_error(self) -> tuple[float, float | None]:
        """(rescaling, relative error) from this search's measured candidates: their median measured / predicted
        ratio and the p90 of the errors left after it (at least ``STUDY_ERROR_FLOOR``); ``(1.0, None)``, i.e. the
        predictor's validation error, until ``MIN_STUDY_SAMPLES`` are measured."""
        if len(self.ratios) < MIN_STUDY_SAMPLES:
            return 1.0, None
        r = np.asarray(self.ratios)
        bias = float(np.median(r))
        return bias, max(float(np.quantile(np.abs(r / bias - 1.0), 0.9)), STUDY_ERROR_FLOOR)

    def dense_pred(self) -> float:
        """The predictor's latency of the dense model (predicted once)."""
        if self._dense_pred is None:
            self._dense_pred = self.predictor.predict_ms(self.dense_onnx)
        return self._dense_pred

    def check(self, trial: optuna.Trial, module: Any, example_inputs: Any, budgets: Any, exporter: str) -> None:
        """Predict the candidate's judged latency; skip it (raise ``optuna.TrialPruned``) when predicted well over
        the latency budget of ``budgets`` (resolved now: a relative budget follows the dense reference).

        Raises:
            optuna.TrialPruned: the candidate was screened out (its trial records why).
        """
        from hwprune.backends.memory import graph_memory
        from hwprune.export import export_onnx
        from hwprune.predict.features import graph_features

        module.eval()  # BatchNorm in train mode exports another graph; re-calibration sets train mode itself
        with tempfile.TemporaryDirectory(prefix="hwprune-screen-") as tmp:
            path = export_onnx(module, example_inputs, Path(tmp) / "candidate.onnx", exporter=exporter)
            feats = graph_features(path, self.predictor.channel_multiple)
            memory_mb = graph_memory(path).total_mb  # what the backend's measurement will report
        self._pending = feats
        self._settle_ms = self._predicted = self._error = self._dominator = None
        self._under_guard = False
        self._memory_mb = memory_mb
        judged = self._decide(feats, budgets)
        if judged is None:
            return
        decision, budget_ms = judged.decision, judged.budget_ms
        self._pending_ms = decision.predicted_ms * judged.scale
        predicted = self._pending_ms * judged.bias
        trial.set_user_attr(PREDICTED_ATTR, predicted)
        self._settle_ms = judged.settle_ms
        self._predicted, self._error = predicted, decision.error
        if decision.action != "skip":
            return
        self.screened += 1
        self._pending = self._pending_ms = None
        trial.set_user_attr(SCREENED_ATTR, predicted)
        # decision.reason speaks in the predictor's own units; the trial's reason in the budget's
        err = decision.error
        source = (f"its p90 error on {len(self.ratios)} of this search's candidates" if judged.own_error
                  else "the error allowed for a predictor of another device" if self.stand_in
                  else "its p90 error on held-out models")
        reason = (f"screened: predicted {predicted:.3f} ms by the {self.predictor.profile} predictor; even "
                  f"{predicted * (1.0 - err):.3f} ms (less {source}, {err:.0%}) is over the {budget_ms:.3f} ms "
                  f"budget; not measured")
        trial.set_user_attr(attrs.FAIL_REASON, reason)
        raise optuna.TrialPruned(reason)

    def _decide(self, feats: Any, budgets: Any) -> _Judged | None:
        """The screen's decision on a model's node features against ``budgets`` now, with the scale from the
        predictor's units to the device's today, the search's own rescaling and the budget in ms; None without a
        latency budget."""
        from hwprune.predict.screen import screen

        b = budgets.now()
        budget_ms = b.latency_ms
        if budget_ms is None:
            return None
        # a relative budget judges the ratio to the dense model: its dense reference now
        dense_ms = b.reference_ms if b.reference_ms is not None else self.dense_ms
        bias, error = self.study_error()
        scale = dense_ms / self.dense_pred()
        # screen() compares in the predictor's own units: the budget goes there, not the prediction here
        return _Judged(screen(self.predictor, feats, budget_ms / (scale * bias), error=error), scale, bias, budget_ms,
                       error is not None)

    def settle_ms_for(self, onnx_path: Path, budgets: Any) -> float | None:
        """A judged latency under which one round settles the model at ``onnx_path`` (an incumbent measured again):
        the screen predicts it well inside the budget (``measure_once``); None when it does not."""
        from hwprune.predict.features import graph_features

        judged = self._decide(graph_features(onnx_path, self.predictor.channel_multiple), budgets)
        return None if judged is None else judged.settle_ms

    def settles(self, judged_ms: float) -> bool:
        """Whether a round that judged the candidate just screened at ``judged_ms`` settles it: the screen predicted
        it well inside the budget (``measure_once``) and the round agrees, by the same margin; or (after
        :meth:`settles_for`) a trial dominates it and the round agrees (:meth:`dominated_by`)."""
        inside = self._settle_ms is not None and judged_ms <= self._settle_ms
        return inside or self._under_guard or self.dominated_by(judged_ms) is not None

    def settles_for(self, accuracy: float, trials: list[optuna.trial.FrozenTrial],
                    budgets: Any, uniform: bool = False) -> Callable[[float], bool] | None:
        """What settles the candidate just screened on one measurement now that its ``accuracy`` is known
        (:meth:`settles`), or None when nothing can: neither predicted well inside the budget, nor dominated, nor
        unable to be listed.

        Dominated: of ``trials`` (the study's), a complete feasible one at least as accurate and no larger in memory
        that the candidate's prediction, less the error the screen allows it, is still ``DOMINATED_MARGIN`` slower
        than (judged under ``budgets`` now). The fastest such trial is kept for :meth:`dominated_by`.

        Unable to be listed (:attr:`under_guard`): see :meth:`cannot_be_listed`; ``uniform``: the candidate is one
        of the bisection's uniform models, one of which is always a final candidate, so it can be.
        """
        from hwprune.study.budgets import admitted, judged_latency

        self._dominator = None
        self._under_guard = not uniform and self.cannot_be_listed(accuracy, trials, budgets)
        if self._predicted is not None and self._error is not None and self._memory_mb is not None:
            b = budgets.now()
            floor = self._predicted * (1.0 - self._error)
            for t in trials:
                if t.state != optuna.trial.TrialState.COMPLETE or not t.values:
                    continue
                # feasible under this run's budgets (a resumed study's earlier runs may have had others)
                if t.values[0] < accuracy or t.values[2] > self._memory_mb or not admitted(t, b):
                    continue
                judged = judged_latency(t, b)
                if judged * (1.0 + DOMINATED_MARGIN) <= floor and (self._dominator is None
                                                                    or judged < self._dominator[1]):
                    self._dominator = (t.number, judged)
        return self.settles if (self._settle_ms is not None or self._dominator is not None
                                or self._under_guard) else None

    def cannot_be_listed(self, accuracy: float, trials: list[optuna.trial.FrozenTrial], budgets: Any) -> bool:
        """Whether a candidate of ``accuracy`` cannot be a listed model, whatever its latency, so that its latency
        only guides the sampler and one measurement settles it: its accuracy is under the guard's floor and either
        the guard judges each trial (the candidate is infeasible) or at least ``FINALIST_DEPTH`` x
        :attr:`finalists` distinct architectures among ``trials``, feasible under ``budgets`` now, are at least as
        accurate (the guard judges the final fine-tune, and a model under its floor by its trial accuracy is listed
        only as a final candidate, which are drawn before it). A listed model is confirmed in fresh rounds beside
        the dense model all the same."""
        from hwprune.study.budgets import admitted

        b = budgets.now()
        if b.accuracy_floor is None or accuracy >= b.accuracy_floor:
            return False
        if b.guard_trials:
            return True
        if self.finalists <= 0:
            return False
        ahead = {t.user_attrs.get(attrs.SIGNATURE, t.number) for t in trials
                 if t.state == optuna.trial.TrialState.COMPLETE and t.values and t.values[0] >= accuracy
                 and admitted(t, b)}
        return len(ahead) >= FINALIST_DEPTH * self.finalists

    @property
    def under_guard(self) -> bool:
        """Whether the candidate just judged by :meth:`settles_for` cannot be listed (:meth:`cannot_be_listed`)."""
        return self._under_guard

    def dominated_by(self, judged_ms: float) -> int | None:
        """The trial that dominates the candidate just screened when a round judged it at ``judged_ms``: the one
        :meth:`settles_for` found, if the round too puts the candidate ``DOMINATED_MARGIN`` slower than it."""
        if self._dominator is None or judged_ms < self._dominator[1] * (1.0 + DOMINATED_MARGIN):
            return None
        return self._dominator[0]

    def resume(self, trials: list[optuna.trial.FrozenTrial]) -> int:
        """Start from the measured / predicted ratios that earlier trials of the study recorded; returns how many."""
        earlier = [float(t.user_attrs[RATIO_ATTR]) for t in trials if RATIO_ATTR in t.user_attrs]
        self.ratios[:0] = earlier
        if earlier:
            self.log(f"screening: {len(earlier)} earlier measured candidates of this study give the screen's own "
                     f"error")
        return len(earlier)

    def record(self, measurement: Any, judged_ms: float | None = None) -> float | None:
        """Add the candidate just measured to the predictor (refitting its correction every few), and with
        ``judged_ms`` (its latency as the budget judges it) its error to the search's own.

        Returns:
            The candidate's measured / predicted judged latency (its trial keeps it as ``screen_ratio``), or None
            when it was not predicted against a latency budget.
        """
        from hwprune.predict.calibrate import target_ms

        if self._pending is None:
            return None
        ratio = None
        if judged_ms is not None and self._pending_ms:
            ratio = judged_ms / self._pending_ms
            self.ratios.append(ratio)
        self._pending_ms = self._settle_ms = self._predicted = self._error = self._dominator = None
        self._under_guard = False
        self.measured += 1
        if not self.stand_in:  # another device's predictor must not learn this device's times
            self.predictor.add_features(f"search-{len(self.predictor.model_samples)}", self._pending,
                                        target_ms(measurement))
            if self.measured % REFIT_EVERY == 0:
                self.predictor.fit_correction()
        self._pending = None
        return ratio

    def record_for(self, trials: pd.DataFrame) -> dict[str, Any]:
        """summary.json's ``search.screen``: over the study's trials (``trials``, the trials table; a resumed study
        counts its earlier runs too), how many candidates were skipped unmeasured and how many judged on one round,
        the predictor's held-out p90 error, and its median ratio and p90 error on this search's candidates."""
        def count(column: str, test: Any) -> int:
            return int(test(trials[column]).sum()) if column in trials else 0

        v = self.predictor.validation
        bias, error = self.study_error()
        return {"skipped": count(SCREENED_ATTR, pd.Series.notna),
                # a trial that reused a measured architecture carries its rounds, not a measurement of its own
                "one_round": count(attrs.LATENCY_ROUNDS, lambda c: (c == 1) & trials[attrs.CACHED_FROM].isna()),
                "alone": count(attrs.LATENCY_ROUNDS, lambda c: (c == 0) & trials[attrs.CACHED_FROM].isna()),
                "dominated": count(attrs.DOMINATED_BY, lambda c: c.notna() & trials[attrs.CACHED_FROM].isna()),
                # recorded only as True
                "under_guard": count(attrs.UNDER_GUARD, lambda c: c.notna() & trials[attrs.CACHED_FROM].isna()),
                "predicted": count(PREDICTED_ATTR, pd.Series.notna),
                "held_out_p90_error": v.p90_abs_error if v is not None and v.n_models else None,
                "held_out_models": v.n_models if v is not None else 0,
                "study_ratio": bias if error is not None else None, "study_p90_error": error,
                "stand_in": self.predictor.profile if self.stand_in else None}

    def finish(self) -> Path | None:
        """Refit and save the predictor with the search's measurements; returns its path (None if none were added,
        or when it stood in for another device: it learnt nothing here)."""
        from hwprune.predict import store

        if not self.measured:
            return None
        bias, error = self.study_error()
        own = (f"; on this model's candidates measured {bias:.2f}x the prediction, p90 error {error:.0%}"
               if error is not None else "")
        if self.stand_in:
            self.log(f"screening: {self.screened} candidates skipped unmeasured by the {self.predictor.profile} "
                     f"predictor standing in{own}; this device's measurements were not added to it")
            return None
        self.predictor.fit_correction()
        path = store.save(self.predictor, self.root)
        self.log(f"screening: {self.screened} candidates skipped unmeasured; {self.measured} measurements added to "
                 f"the predictor ({path}){own}")
        return path


def open_screening(mode: str, profile: Any, dense_onnx: Path, dense_ms: float, log: Any,
                   root: Path | None = None, finalists: int = 0) -> Screening | None:
    """The search's screen, or None when ``mode`` is off or no predictor is stored for the profile (logged).

    Args:
        mode: ``off`` or ``on``.
        profile: the search's device profile (its name, backend and ORT threads find the predictor).
        dense_onnx: the dense model's exported ONNX file.
        dense_ms: the dense model's measured latency (the reference predictions are rescaled to).
        log: one line per message.
        root: the predictor store's root (default: the measurement cache).
        finalists: the final candidates the search draws (0: none; :attr:`Screening.finalists`).
    """
    if mode != "on":
        return None
    from hwprune.predict import store
    from hwprune.predict.screen import DEFAULT_ERROR
    from hwprune.predict.transfer import device_runtime

    runtime = device_runtime(profile)[0]
    predictor = store.find(profile.name, profile.ort.intra_op_threads, root=root, runtime=runtime)
    if predictor is None:
        host = _host_stand_in(root)
        if host is None:
            old = store.stale(profile.name, profile.ort.intra_op_threads, root)
            why = f"the stored one, {old[0]}, was fitted by an older hwprune" if old else "none stored"
            log(f"screening: no usable {runtime} predictor for {profile.name} ({why}; run `hwprune calibrate "
                f"--device {profile.name}`); every candidate is measured")
            return None
        log(f"screening: no stored {runtime} predictor for {profile.name}; the {host.profile} predictor stands in, "
            f"its predictions taken relative to the dense model measured here, allowing a {DEFAULT_ERROR:.0%} error "
            f"until {MIN_STUDY_SAMPLES} measured candidates give its own (`hwprune calibrate --device "
            f"{profile.name}` fits the device's)")
        return Screening(host, Path(dense_onnx), float(dense_ms), log, root, stand_in=True, finalists=finalists)
    v = predictor.validation
    err = f"p90 error {v.p90_abs_error:.0%} on {v.n_models} held-out models" if v is not None and v.n_models else \
        "never validated"
    log(f"screening: candidates predicted well over the latency budget are skipped unmeasured (fitted predictor, "
        f"{err})")
    return Screening(predictor, Path(dense_onnx), float(dense_ms), log, root, finalists=finalists)


def _host_stand_in(root: Path | None) -> Any:
    """The stored host predictor (:data:`~hwprune.predict.transfer.DEFAULT_HOST_PROFILE`, ONNX Runtime, 1 thread)
    to stand in for a device without a predictor of its own, with no validation (its held-out error is the host's,
    not the device's), or None when there is none (for the host itself, the caller's lookup was this one).

    Taken relative to the dense model measured on the device, the host's predictions were within +-10% of the
    measured ratio for 79% of held-out architectures on ONNX Runtime with 2 threads and 29-33% on TVM (the median
    errors 3% and 18%; docs/benchmarks.md, "Transfer to another device"): worth a screen that allows for its error.
    """
    import copy

    from hwprune.predict import store
    from hwprune.predict.transfer import DEFAULT_HOST_PROFILE

    host = store.find(DEFAULT_HOST_PROFILE, 1, root=root, runtime="ort")
    if host is None:
        return None
    stand_in = copy.copy(host)  # only read: the screen neither adds to it nor saves it
    stand_in.validation = None
    return stand_in


__all__ = ["DEFAULT_SCREEN", "PREDICTED_ATTR", "RATIO_ATTR", "SCREENED_ATTR", "SCREEN_MODES", "Screening",
           "open_screening"]
