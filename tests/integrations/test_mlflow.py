"""MLflow tracking (hwprune.integrations.mlflow) against a real local MLflow file store: one run per trial, with
hwprune's metric names, constraints, feasibility, ratios and the search's profile and budgets as tags."""

from __future__ import annotations

import subprocess
import sys
import threading
import warnings
from pathlib import Path

import optuna
import pytest

from conftest import ROOT, TESTS
from hwprune.config import SearchConfig
from hwprune.errors import HwpruneError
from hwprune.integrations.mlflow import MlflowTracking, search_callbacks, tracking_tags

mlflow = pytest.importorskip("mlflow", reason="MLflow is not installed (pip install 'hwprune[mlflow]')")
pytest.importorskip("optuna_integration", reason="optuna-integration is not installed (pip install 'hwprune[mlflow]')")

METRICS = ["accuracy", "latency_ms", "memory_mb"]
REQUEST = {"model": "mobilenet-tiny", "device": "host-cpu", "backend": "ort", "study": "tracked",
           "latency_budget": "0.6x", "latency_budget_ms": 1.0, "memory_budget": None, "memory_budget_mb": 64.0,
           "seed": 0, "profile": {"hardware": {"cpu": "AMD EPYC, x86_64, 2 cores, AVX2"}}}


def objective(trial: optuna.Trial) -> tuple[float, float, float]:
    """Objectives and named constraints as hwprune's TrialRunner stores them; trial 2 fails (as an export can)."""
    ratio = trial.suggest_float("conv1", 0.0, 0.8)
    if trial.number == 2:
        raise ValueError("export failed")
    latency = 2.0 * (1 - ratio)
    trial.set_constraint("latency", latency - 1.0)
    trial.set_constraint("memory", -1.0)
    return 0.9 - ratio / 2, latency, 10.0 * (1 - ratio)


def test_one_mlflow_run_per_trial_with_metrics_constraints_and_tags(tmp_path: Path) -> None:
    uri = (tmp_path / "mlruns").as_uri()  # file:///...: MLflow's local file store
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="tracked",
                                directions=["maximize", "minimize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(METRICS)
    study.optimize(objective, n_trials=8, catch=(ValueError,), callbacks=search_callbacks([], uri, REQUEST))

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("tracked")  # one experiment per study, named after it
    runs = {int(r.data.tags["number"]): r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == [t.number for t in study.trials]  # one run per trial, the failed ones too
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 0 < len(complete) < len(study.trials)
    for t in study.trials:
        run = runs[t.number]
        assert run.data.tags["state"] == t.state.name
        assert run.data.tags["hwprune.device"] == "host-cpu" and run.data.tags["hwprune.latency_budget"] == "0.6x"
        assert run.data.tags["hwprune.cpu"].startswith("AMD EPYC") and "hwprune.memory_budget" not in run.data.tags
        assert float(run.data.params["conv1"]) == pytest.approx(t.params["conv1"])
        if t.state != optuna.trial.TrialState.COMPLETE:
            assert run.data.metrics == {}
            continue
        assert {k: run.data.metrics[k] for k in METRICS} == pytest.approx(dict(zip(METRICS, t.values)))
        assert run.data.metrics["constraint_latency"] == pytest.approx(t.values[1] - 1.0)
        assert run.data.metrics["feasible"] == float(t.values[1] <= 1.0)
    assert {runs[t.number].data.metrics["feasible"] for t in complete} == {0.0, 1.0}


def test_config_takes_callbacks_and_mlflow() -> None:
    lock_holder = MlflowTracking("file:/nonexistent/mlruns")  # holds no run yet; never called here
    lock_holder.lock = threading.Lock()  # a callback asdict cannot copy
    config = SearchConfig(mlflow="file:./mlruns", callbacks=[lock_holder, print])
    d = config.to_dict()
    assert d["mlflow"] == "file:./mlruns" and d["callbacks"] == ["MlflowTracking", "print"]
    assert search_callbacks(config.callbacks, None, {}) == [lock_holder, print]
    assert tracking_tags({"device": "x", "seed": 0, "memory_budget": None}) == {"hwprune.device": "x",
                                                                                 "hwprune.seed": "0"}
    with pytest.raises(HwpruneError, match="not callable"):
        SearchConfig(callbacks=["print"])
    with pytest.raises(HwpruneError, match="tracking URI"):
        SearchConfig(mlflow=" ")


def test_cli_without_mlflow_is_one_line_and_exit_2(tmp_path: Path) -> None:
    # mlflow made unimportable the way Python documents (sys.modules[name] = None), then the real CLI
    code = "import sys; sys.modules['mlflow'] = None; from hwprune.cli import main; main()"
    proc = subprocess.run([sys.executable, "-c", code, "search", "--mlflow", "file:./mlruns", "--out", str(tmp_path),
                           "--trials", "1"], cwd=TESTS, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": f"{TESTS}:{ROOT}", "PATH": "/usr/bin:/bin", "COLUMNS": "200"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "mlflow not installed" in proc.stderr
    assert "pip install 'hwprune[mlflow]'" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
