"""The trial stage of a search: the dense model, the budgets, the pruning space, the Optuna study and its trials.

:func:`run_trials` returns a :class:`Trials`, which is everything the final stages read.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from hwprune import train
from hwprune.backends.base import Measurement
from hwprune.errors import HwpruneError
from hwprune.integrations.dashboard import DashboardConstraints
from hwprune.integrations.mlflow import search_callbacks
from hwprune.pruning import PruningSpace, prune
from hwprune.pruning.importance import resolve_importance
from hwprune.quant.device import reduce_range as int8_reduce_range
from hwprune.recovery import RecoveryPlan
from hwprune.study import attrs
from hwprune.study.bracket import warm_start
from hwprune.study.budgets import Budgets
from hwprune.study.callbacks import AimAtBudget, FollowReference, StopOnInterrupt
from hwprune.study.confirm import measure_again
from hwprune.study.context import RunContext, fmt, measurement_context
from hwprune.study.dense import DenseModel, make_budgets, measure_dense
from hwprune.study.failfast import FAIL_FAST_TRIALS, FailFast
from hwprune.study.identity import Fingerprint, check_identity
from hwprune.study.objective import TrialRunner
from hwprune.study.precision import channel_groups, recorded_inputs, setup_quant
from hwprune.study.progress import FinalPlan, SearchProgress
from hwprune.study.reference import START_SETS, DenseReference
from hwprune.study.refine import EdgeRefiner
from hwprune.study.screening import open_screening
from hwprune.study.storage import make_sampler, open_study
from hwprune.subjects.base import Subject


@dataclass(frozen=True)
class Trials:
    """The state after the trial stage: what the front's confirmation, the final candidates and the run folder
    read."""

    study: optuna.Study
    subject: Subject  # with recovery data where it brought none
    space: PruningSpace
    runner: TrialRunner
    budgets: Budgets  # resolved against the final dense reference
    dense: DenseModel
    dense_m: Measurement  # the dense reference: the middle of its sets
    request: dict[str, Any]  # request.json, with the resolved budgets, the sampler and the dense sets
    recovery: RecoveryPlan | None
    interrupted: bool  # Ctrl-C: the final stages are left to the next run


def run_trials(ctx: RunContext, subject: Subject, request: dict[str, Any], fingerprint: Fingerprint) -> Trials:
    """Measure and score the dense model, then run the study's trials (resuming it when it exists)."""
    c = ctx.config
    torch.manual_seed(c.seed)
    torch.set_num_threads(train.training_threads())
    dense, reference, scored = measure_dense(ctx, subject)
    subject, recovery = scored.subject, scored.recovery
    budgets = make_budgets(c, reference, dense.accuracy, subject)
    request = {**request, "latency_budget_ms": budgets.latency_ms, "memory_budget_mb": budgets.memory_mb,
               "accuracy_floor": budgets.accuracy_floor,
               # whether the memory budget binds the dense FP32 model (precision.memory_budget_binds) is asked
               # while trials run, before the dense record is stored
               "dense_memory_mb": reference.measurement.memory.total_mb}
    _log_dense(ctx, subject, dense, reference.measurement, budgets)
    space = _space(ctx, subject, recovery, fingerprint)
    request["importance"] = fingerprint.importance
    sampler = make_sampler(c.sampler, c.seed, len(space.knobs))
    request["sampler_repr"] = f"{type(sampler).__name__}"
    study = _open(ctx, subject, sampler, fingerprint, request)
    warm_start(study, space)
    quant = setup_quant(ctx.quantize, dense.path, subject, channel_groups(space), recorded_inputs(recovery),
                        c.quantize_tolerance, ctx.log, reduce_range=int8_reduce_range(ctx.profile))
    if quant is not None:
        quant.enqueue_anchors(study, space.uniform, c.max_ratio)
    elif ctx.quantize.on:  # the profile's default, with nothing to calibrate on: FP32 only (warned)
        request["quantize"] = "off"
    runner = TrialRunner(subject=subject, space=space, measure=ctx.measure, budgets=budgets,
                         exporter=ctx.exporter, calibration_batches=c.calibration_batches,
                         finetune_steps=c.trial_finetune_steps, seed=c.seed,
                         context=measurement_context(ctx.profile, ctx.exporter),
                         beside=dense.path if budgets.latency_factor else None, measure_pair=ctx.pair_measure,
                         quant=quant)
    runner.load_cache(study)
    dense_m = reference.measurement
    runner.add_dense(dense.signature, [dense.accuracy, dense_m.latency.median_ms, dense_m.memory.total_mb],
                     dense.trial_attrs(dense_m, relative=bool(budgets.latency_factor)))
    # guard_trials is False exactly when final candidates get the final fine-tune (make_budgets)
    runner.screening = open_screening(c.screen, ctx.profile, dense.path, dense_m.latency.median_ms, ctx.log,
                                      finalists=0 if budgets.guard_trials else max(1, c.final_candidates))
    if runner.screening is not None:  # a resumed study: its earlier measured candidates give the screen's error
        runner.screening.resume(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    interrupted = _optimize(ctx, study, runner, reference, budgets, request)
    if runner.screening is not None:
        runner.screening.finish()
    budgets = budgets.now()
    dense_m = reference.measurement
    if c.latency_budget_ms:
        request["latency_budget_ms"] = budgets.latency_ms
    if len(reference.sets) > START_SETS:
        ctx.log(f"dense latency over {len(reference.sets)} sets spread over the search: "
                f"{dense_m.latency.median_ms:.3f} ms (sets {min(reference.medians_ms):.3f}-"
                f"{max(reference.medians_ms):.3f}); latency budget {fmt(budgets.latency_ms, 'ms')}")
    request["dense_latency_sets_ms"] = reference.medians_ms
    return Trials(study=study, subject=subject, space=space, runner=runner, budgets=budgets, dense=dense,
                  dense_m=dense_m, request=request, recovery=recovery, interrupted=interrupted)


def _log_dense(ctx: RunContext, subject: Subject, dense: DenseModel, dense_m: Measurement, budgets: Budgets) -> None:
    guard = ("off" if budgets.accuracy_floor is None else
             f"{subject.metric} >= {budgets.accuracy_floor:.4f} (at most {ctx.config.max_accuracy_drop} below dense)")
    ctx.log(f"dense {subject.name}: {subject.metric} {dense.accuracy:.4f}, latency "
            f"{dense_m.latency.median_ms:.3f} ms (p90 {dense_m.latency.p90_ms:.3f}), memory "
            f"{dense_m.memory.total_mb:.2f} MB; budgets: latency "
            f"{fmt(budgets.latency_ms, 'ms')}, memory {fmt(budgets.memory_mb, 'MB')}; accuracy guard {guard}")


def _space(ctx: RunContext, subject: Subject, recovery: RecoveryPlan | None,
           fingerprint: Fingerprint) -> PruningSpace:
    """The pruning space, its channels ranked by the fingerprint's importance.

    Raises:
        HwpruneError: the model has nothing to prune.
    """
    # taylor ranks by the task loss on inputs: recovery batches hold the dense outputs as targets, whose
    # distillation loss has no gradient at the dense model, so it gets their inputs alone (pseudo-labels)
    ranking_data = ([x for x, _ in recovery.batches] if recovery is not None and recovery.active
                    else subject.calibration_data)
    importance = resolve_importance(fingerprint.importance, subject.model, ranking_data,
                                    None if recovery is not None else subject.loss_fn)
    c = ctx.config
    space = PruningSpace.build(subject.model, subject.example_inputs, channel_multiple=ctx.profile.channel_multiple,
                               max_ratio=c.max_ratio, ignored_layers=list(subject.ignored_layers), depth=c.depth,
                               importance=importance)
    if not space.knobs:
        raise HwpruneError(f"{subject.name}: found no prunable channel groups (nothing but the output layer?)")
    return space


def _open(ctx: RunContext, subject: Subject, sampler: optuna.samplers.BaseSampler, fingerprint: Fingerprint,
          request: dict[str, Any]) -> optuna.Study:
    """The study, created or resumed (refused when made for another model or device), with the request stored."""
    c = ctx.config
    study = open_study(ctx.storage, c.study_name, sampler)
    check_identity(study, fingerprint, resume_changed=c.resume_changed, storage=ctx.storage, log=ctx.log)
    if study.metric_names is None:  # named objectives for optuna-dashboard and trials_dataframe()
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2, and stable in use
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([subject.metric, "latency_ms", "memory_mb"])
    study.set_user_attr(attrs.REQUEST, request)
    return study


def _optimize(ctx: RunContext, study: optuna.Study, runner: TrialRunner, reference: DenseReference,
              budgets: Budgets, request: dict[str, Any]) -> bool:
    """Run the trials left to run; whether Ctrl-C interrupted them."""
    c, space, subject = ctx.config, runner.space, runner.subject
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    remaining = None if c.trials is None else max(0, c.trials - done)
    blocks = len(space.blocks)
    ctx.log(f"{len(space.knobs)} knobs ({len(space.knobs) - blocks} coupled channel groups, {blocks} removable "
            f"residual blocks); study {c.study_name!r} has {done} complete "
            f"trials; running {remaining if remaining is not None else 'until timeout'} more")
    if remaining == 0:
        return False
    progress = SearchProgress(total=remaining, enabled=c.progress, budgets=budgets, log=ctx.log,
                              final=FinalPlan.of(c, subject, budgets))

    def again(ratios: dict[str, float]) -> dict[str, float]:
        return measure_again(ctx, ratios, subject, space, runner)

    def macs_of(ratios: dict[str, float]) -> int:
        return prune(subject.model, subject.example_inputs, ratios, space).macs

    # stops the study when the first trials all fail because of the model (checked below, after optimize)
    fail_fast = FailFast(subject, min(FAIL_FAST_TRIALS, remaining or FAIL_FAST_TRIALS))
    callbacks: list[Any] = [fail_fast, FollowReference(reference), progress.callback,
                            AimAtBudget(space, reference, budgets, again, ctx.log),
                            EdgeRefiner(space, c.trials, c.timeout_s, c.seed, macs_of=macs_of, budgets=budgets,
                                        log=ctx.log, confirm=again)]
    if c.trials is not None:
        callbacks.append(optuna.study.MaxTrialsCallback(c.trials, states=(TrialState.COMPLETE,)))
    callbacks.extend(search_callbacks(c.callbacks, c.mlflow, request))
    interrupt = StopOnInterrupt()
    callbacks.append(interrupt)  # after the others: a trial's own bookkeeping is done before Ctrl-C stops the study
    try:
        with progress, interrupt:
            # the dashboard reads constraints as one list, which Optuna 5 no longer writes
            study.optimize(DashboardConstraints(runner), n_trials=remaining, timeout=c.timeout_s, callbacks=callbacks,
                           catch=(HwpruneError,), gc_after_trial=False, show_progress_bar=False)
        if interrupt.requested:  # Ctrl-C during the last trial, lost where Python drops it (StopOnInterrupt)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        # Optuna has already marked the trial in flight as failed; completed trials are in the storage
        ctx.log("interrupted: completed trials are saved; the final phase (confirming the front, final "
                "fine-tunes, report) is skipped: run the same command again to resume and finish it")
        return True
    fail_fast.check()
    progress.final_phase_started()
    return False

