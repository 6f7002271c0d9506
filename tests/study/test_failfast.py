"""Fail fast on models that cannot be pruned or evaluated (exit 2 naming the model's fault), and the final phase's
ETA. Real Optuna studies on SQLite, real exports and traces, real searches (CLI and API)."""

from __future__ import annotations

import inspect
from pathlib import Path

import optuna
import pytest
import torch
from conftest import GUARD_OFF_ARGS, run_cli
from failfast_models import Branchy, Plain
from optuna.trial import TrialState

from hwprune.errors import ExportError, HwpruneError, MeasurementError
from hwprune.export import control_flow_sites, export_onnx
from hwprune.study import attrs, failfast
from hwprune.study.failfast import FailFast, ModelUnusable, classify, layers_not_run
from hwprune.study.progress import REPORT_SECONDS, FinalPhase, FinalPlan, SearchProgress

BRANCH_LINE = next(i for i, line in enumerate(inspect.getsource(inspect.getmodule(Branchy)).splitlines(), 1)
                   if "# BRANCH" in line)


def _shape_error() -> RuntimeError:
    try:
        torch.nn.Conv2d(32, 8, 3)(torch.zeros(1, 16, 8, 8))
    except RuntimeError as exc:
        return exc
    raise AssertionError("a conv on the wrong width ran")


def test_classify_tells_model_faults_from_transient_ones() -> None:
    assert classify(_shape_error(), failfast.FORWARD) == (failfast.SHAPE, failfast.FORWARD)
    assert classify(HwpruneError("evaluate(model) returned NaN"), failfast.EVALUATE) == (failfast.NAN,
                                                                                         failfast.EVALUATE)
    assert classify(MeasurementError("board vanished"), failfast.EXPORT_STAGE)[0] == failfast.TRANSIENT
    assert classify(ExportError("cannot export X: op aten::fft"), failfast.EXPORT_STAGE) == (failfast.EXPORT,
                                                                                             failfast.EXPORT_STAGE)
    # export_and_measure also measures: a non-export error after the export came from measuring
    assert classify(ValueError("session died"), failfast.EXPORT_STAGE) == (failfast.OTHER, failfast.MEASURE)


def _failing(kinds: list[BaseException]):
    """An objective whose trial i raises ``kinds[i]``, classified as the objective records it."""
    def objective(trial: optuna.Trial) -> float:
        exc = kinds[trial.number] if trial.number < len(kinds) else None
        if exc is None:
            return 1.0
        kind, stage = classify(exc, failfast.FORWARD)
        trial.set_user_attr(failfast.FAIL_KIND, kind)
        trial.set_user_attr(failfast.FAIL_STAGE, stage)
        trial.set_user_attr(attrs.FAIL_REASON, str(exc))
        raise HwpruneError(str(exc))
    return objective


class _Named:
    name = "tiny"
    model = Plain()
    example_inputs = (torch.zeros(1, 3, 8, 8),)


def test_fail_fast_stops_after_three_model_failures_and_skips_transient_ones(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    shape = _shape_error()
    kinds = [MeasurementError("board gone"), shape, MeasurementError("again"), shape, shape] + [shape] * 5
    ff = FailFast(_Named())
    study.optimize(_failing(kinds), n_trials=10, callbacks=[ff], catch=(HwpruneError,))
    assert len(study.trials) == 5  # stopped right after the third shape failure
    assert ff.failure is not None and ff.failure.trials == (1, 3, 4) and ff.failure.stage == failfast.FORWARD
    with pytest.raises(ModelUnusable, match=r"trials 1, 3, 4 all failed in the pruned model's forward pass"):
        ff.check()


def test_fail_fast_never_fires_once_a_trial_completed_in_the_storage(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=storage, study_name="s")
    study.optimize(lambda t: 1.0, n_trials=1)  # an earlier run that completed a trial
    resumed = optuna.load_study(study_name="s", storage=storage)
    ff = FailFast(_Named())
    resumed.optimize(_failing([None] + [_shape_error()] * 5), n_trials=5, callbacks=[ff], catch=(HwpruneError,))
    assert len(resumed.get_trials(states=(TrialState.FAIL,))) == 5  # all ran: the model worked before
    assert ff.failure is None
    ff.check()  # nothing to raise


def test_control_flow_sites_from_the_export_and_from_a_trace(tmp_path: Path) -> None:
    model, x = Branchy().eval(), torch.randn(1, 3, 16, 16)
    export_onnx(model, x, tmp_path / "m.onnx")
    sites = control_flow_sites(model)  # recorded by the export's tracer warnings
    assert [(Path(f).name, line) for f, line in sites] == [("failfast_models.py", BRANCH_LINE)]
    assert control_flow_sites(Branchy().eval(), x) == sites  # never exported: traced
    assert control_flow_sites(Branchy().eval()) == ()  # neither, and nothing to trace with
    assert control_flow_sites(Plain().eval(), torch.randn(1, 3, 8, 8)) == ()
    assert layers_not_run(Branchy().eval(), (x,)) == ["conv2"]
    assert layers_not_run(Plain(), (torch.randn(1, 3, 8, 8),)) == []


def test_search_on_a_model_with_a_tensor_branch_exits_2_naming_it(tmp_path: Path) -> None:
    proc = run_cli("search", "--model", "failfast_models:branchy", *GUARD_OFF_ARGS, "--recovery", "synthetic",
                   "--latency-budget-ms", "0.8x", "--trials", "8", "--out", str(tmp_path), "--quiet")
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    line = errors[0]
    for needle in ("trials 0, 1, 2 all failed", "forward pass", "dependency graph did not see every path",
                   f"failfast_models.py:{BRANCH_LINE} `if y.mean() > 0.3:`", "never run: conv2"):
        assert needle in line, line
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 'failfast_models-branchy-host-cpu'}"
                              "/study.db")
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 3  # stopped, not 8 trials into the same error


def test_api_on_an_evaluate_that_returns_nan_raises_model_unusable(tmp_path: Path) -> None:
    import hwprune
    from failfast_models import later_nan

    with pytest.raises(ModelUnusable, match=r"evaluate\(model\) returned NaN for the pruned models of trials "
                                            r"0, 1, 2"):
        hwprune.search(later_nan, "host-cpu", latency_budget_ms="0.8x", trials=6, out=tmp_path,
                       recovery="none", max_accuracy_drop="off")


def test_final_phase_estimate_from_the_trials_stage_seconds(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", directions=["maximize", "minimize",
                                                                                         "minimize"])
    plan = FinalPlan(candidates=3, final_steps=100, trial_steps=20, calibration_batches=8)
    stages = {"prune": 0.1, "calibrate": 0.3, "finetune": 1.0, "export": 0.1, "timing": 0.3, "evaluate": 0.2}
    rows = [((0.9, 1.0, 2.0), {}), ((0.8, 0.5, 2.0), {}), ((0.7, 0.6, 2.0), {}),  # front of two (third dominated)
            ((0.95, 0.4, 1.0), {attrs.CACHED_FROM: 0})]  # cached: no work, but on the front
    for values, more in rows:
        study.add_trial(optuna.trial.create_trial(values=list(values), user_attrs={
            attrs.STAGE_SECONDS: stages, attrs.MEASUREMENT: {}, **more}))
    final = FinalPhase(plan)
    assert final.seconds() is None
    for t in study.trials:
        final.observe(t, feasible=True)
    assert final.front_size() == 1  # the cached trial dominates the rest
    # a guard judged after the final fine-tune: front models under its floor wait for the final candidates
    guarded = FinalPhase(FinalPlan(candidates=3, final_steps=100, trial_steps=20, calibration_batches=8,
                                   guard_floor=0.96))
    for t in study.trials:
        guarded.observe(t, feasible=True)
    assert guarded.front_size() == 0 and guarded.describe().startswith("confirming the final candidates (rebuilt")
    trial_s, step_s = 2.0, 1.0 / 20
    want = (1 + 3) * trial_s + 3 * (100 * step_s + 0.2) + trial_s + REPORT_SECONDS
    assert final.seconds() == pytest.approx(want)
    # without a per-trial fine-tune the step rate comes from the re-calibration's forward passes
    calib = FinalPhase(FinalPlan(candidates=1, final_steps=10, trial_steps=0, calibration_batches=8))
    calib.observe(study.trials[0], feasible=False)
    assert calib.seconds() == pytest.approx(0 * 2 + 1 * 2 + 1 * (10 * 3 * 0.3 / 8 + 0.2) + 2 + REPORT_SECONDS)

    lines: list[str] = []
    progress = SearchProgress(total=4, enabled=False, budgets=None, log=lines.append, final=plan)
    with progress:
        for t in study.trials:
            progress.callback(study, t)
        progress.final_phase_started()
    assert f"then ~{final.seconds():.0f} s to finish" in lines[0]
    assert lines[-1] == (f"trials done; final phase: confirming ~1 front models (rebuilt, re-measured, "
                         f"re-evaluated), 3 final fine-tunes of 100 steps, report: ~{final.seconds():.0f} s to finish")
