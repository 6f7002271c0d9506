"""Fail fast on a model that cannot be pruned or evaluated: when the first trials of a run all fail the same way at
the model level and none ever completed, stop the study and say what is wrong with the model (exit 2), instead of
running every trial into the same error and ending in "no model met the budgets".

The objective records why a trial failed (:func:`classify`: a kind and the stage it failed in, as trial user
attributes); :class:`FailFast` is the Optuna callback that counts them and stops the study; :meth:`FailFast.check`
raises :class:`ModelUnusable` after ``study.optimize`` returns.
"""

from __future__ import annotations

import linecache
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from hwprune.errors import BackendUnavailable, ExportError, HwpruneError, MeasurementError
from hwprune.quant.base import QuantizationError
from hwprune.study import attrs

FAIL_FAST_TRIALS = 3  # model-level failures of one kind, with no trial ever completed, that stop the study
FAIL_KIND, FAIL_STAGE = attrs.FAIL_KIND, attrs.FAIL_STAGE  # trial user attributes (hwprune.study.attrs)

# kinds of trial failure
TRANSIENT = "transient"  # the board, the session or the measurement: not the model's fault, never counted
NAN = "nan"  # evaluate returned NaN
SHAPE = "shape"  # a forward pass of the pruned model hit mismatched shapes
EXPORT = "export"  # the pruned model could not be exported
OTHER = "error"  # any other exception in a trial (with its stage)
QUANTIZE = "quantize"  # an INT8 candidate's quantization failed: its FP32 twin may work, so never counted
UNCOUNTED = (TRANSIENT, QUANTIZE)

# trial stages, as the objective names them
PRUNE, FORWARD, EXPORT_STAGE, MEASURE, EVALUATE = "prune", "forward", "export", "measure", "evaluate"
_STAGE_TEXT = {PRUNE: "while pruning", FORWARD: "in the pruned model's forward pass (BatchNorm re-calibration or "
               "fine-tune)", EXPORT_STAGE: "while exporting the pruned model", MEASURE: "while measuring it",
               EVALUATE: "in evaluate(model)"}
# what a forward pass says when a layer's input no longer has the width its weights expect
_SHAPE_MISMATCH = re.compile(
    r"expected input\[.*\] to have \d+ channels|size mismatch|shapes cannot be multiplied|must match the size of "
    r"tensor|The size of tensor a|running_mean should contain|expected .*channels|normalized_shape|"
    r"Incompatible dimensions|dimension mismatch", re.IGNORECASE)
NAN_MARK = "returned NaN"  # in the objective's message for a NaN score
_CONTROL_FLOW_SITES = 3  # source lines named in the message


class ModelUnusable(HwpruneError):
    """The first trials of a search all failed the same way because of the model (exit 2)."""


@dataclass(frozen=True)
class ModelFailure:
    """What stopped the study: the trials that failed, the kind, the stage and the first reason."""

    kind: str
    stage: str
    trials: tuple[int, ...]
    reason: str


def classify(exc: BaseException, stage: str) -> tuple[str, str]:
    """The kind of a trial's failure and the stage it happened in.

    Args:
        exc: what the trial raised.
        stage: the stage the objective was in (:data:`PRUNE`, :data:`FORWARD`, :data:`EXPORT_STAGE`,
            :data:`EVALUATE`); the export step also measures, which a measurement error tells apart.

    Returns:
        ``(kind, stage)``.
    """
    if isinstance(exc, (MeasurementError, BackendUnavailable)):
        return TRANSIENT, MEASURE
    if isinstance(exc, QuantizationError):
        return QUANTIZE, stage
    text = f"{exc}\n{exc.__cause__ or ''}"
    if stage == EVALUATE and NAN_MARK in text:
        return NAN, stage
    if _SHAPE_MISMATCH.search(text):
        return SHAPE, stage
    if isinstance(exc, ExportError):
        return EXPORT, EXPORT_STAGE
    if stage == EXPORT_STAGE and not isinstance(exc, HwpruneError):
        stage = MEASURE  # export_onnx raises only ExportError: anything else came from measuring
    return OTHER, stage


class FailFast:
    """Optuna callback: stop the study once ``trials`` trials failed with one model-level kind while no trial of the
    study (this run's, an earlier run's or another worker's) has completed. Measurement errors do not count."""

    def __init__(self, subject: Any, trials: int = FAIL_FAST_TRIALS) -> None:
        self.subject = subject
        self.trials = max(1, trials)
        self.armed = True
        self.failure: ModelFailure | None = None
        self._failed: dict[str, list[optuna.trial.FrozenTrial]] = {}

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if not self.armed:
            return
        if trial.state == TrialState.COMPLETE:
            self.armed = False
            return
        kind = trial.user_attrs.get(FAIL_KIND)
        if trial.state != TrialState.FAIL or kind is None or kind in UNCOUNTED:
            return
        if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            self.armed = False  # the model worked before (an earlier run or another worker): not the model
            return
        failed = self._failed.setdefault(kind, [])
        failed.append(trial)
        if len(failed) >= self.trials:
            first = failed[0]
            self.failure = ModelFailure(kind=kind, stage=str(first.user_attrs.get(FAIL_STAGE, "")),
                                        trials=tuple(t.number for t in failed),
                                        reason=str(first.user_attrs.get(attrs.FAIL_REASON, "")))
            study.stop()

    def check(self) -> None:
        """Raise what stopped the study, if anything did.

        Raises:
            ModelUnusable: one line about the model: what failed, where, and what to do.
        """
        if self.failure is not None:
            raise ModelUnusable(explain(self.failure, self.subject))


def explain(failure: ModelFailure, subject: Any) -> str:
    """One line: which trials failed, in which stage, why, and what to do about it."""
    numbers = ", ".join(str(n) for n in failure.trials)
    where = _STAGE_TEXT.get(failure.stage, f"in stage {failure.stage}" if failure.stage else "")
    head = f"{subject.name}: trials {numbers} all failed {where} and none completed"
    if failure.kind == NAN:
        return (f"{subject.name}: evaluate(model) returned NaN for the pruned models of trials {numbers} (none "
                "completed); make evaluate return a finite score for any model of this architecture (an empty "
                "count, a division by zero, or outputs that overflow after pruning)")
    reason = _short(failure.reason)
    if failure.kind == SHAPE:
        return (f"{head}: {reason}; pruning's dependency graph did not see every path through the model "
                f"({_unseen(subject)}): Python control flow on tensor values (e.g. `if x.mean() > ...`) hides "
                "layers from tracing; rewrite it with tensor ops (torch.where), or give example_inputs that take "
                "every branch, or list the layers that feed it in ignored_layers")
    if failure.kind == EXPORT:
        return (f"{head}: {reason}; the dense model exported, so pruning broke an op: list the layers it names in "
                "ignored_layers")
    return f"{head}: {reason}; fix the model or evaluate, or list the layers it names in ignored_layers"


def _short(reason: str, limit: int = 300) -> str:
    reason = " ".join(reason.split())
    return reason if len(reason) <= limit else reason[:limit - 3] + "..."


def _unseen(subject: Any) -> str:
    """Where the example inputs' trace missed code: data-dependent branches (file:line) and layers never run."""
    from hwprune.export import control_flow_sites

    parts = []
    try:
        sites = control_flow_sites(subject.model, subject.example_inputs)
    except Exception:  # noqa: BLE001 - a diagnosis must not hide the failure it diagnoses
        sites = ()
    if sites:
        parts.append("a branch on a tensor at " + "; ".join(_site_text(s) for s in sites[:_CONTROL_FLOW_SITES]))
    layers = layers_not_run(subject.model, subject.example_inputs)
    if layers:
        parts.append("layers example_inputs never run: " + ", ".join(layers[:5]) + (" ..." if len(layers) > 5 else ""))
    return "; ".join(parts) or "no branch on a tensor was found by tracing"


def _site_text(site: tuple[str, int]) -> str:
    filename, line = site
    code = linecache.getline(filename, line).split("  #")[0].strip()  # without a trailing comment
    return f"{Path(filename).name}:{line}" + (f" `{code}`" if code else "")


def layers_not_run(model: Any, example_inputs: Any) -> list[str]:
    """Qualified names of the modules with their own parameters that a forward pass on ``example_inputs`` never
    calls (in eval mode, without gradients; the model's modes are restored)."""
    import torch

    seen: set[str] = set()
    named = [(n, m) for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    handles = [m.register_forward_hook(lambda _m, _i, _o, n=n: seen.add(n)) for n, m in named]
    modes = [(m, m.training) for m in model.modules()]
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    except Exception:  # noqa: BLE001 - the dense model ran before; if not now, name nothing
        return []
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return [n for n, _ in named if n not in seen]
