"""optuna-dashboard on a real SQLite study, in a real headless Chromium: trials over a budget are shown as infeasible
and the objectives under hwprune's metric names (hwprune.integrations.dashboard)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import pytest

from conftest import GUARD_OFF_ARGS, run_cli
from hwprune.integrations.dashboard import DashboardConstraints, named_constraints

pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed (pip install optuna-dashboard)")
from browser import CHROMIUM, Browser  # noqa: E402

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="Chromium is not installed (Debian package `chromium`)")

METRICS = ["accuracy", "latency_ms", "memory_mb"]  # what hwprune's study names its objectives
LATENCY_BUDGET_MS = 1.0
N_TRIALS = 8


def objective(trial: optuna.Trial) -> tuple[float, float, float]:
    """A stand-in for hwprune's TrialRunner: three objectives, and budgets as named constraints, as it stores them."""
    ratio = trial.suggest_float("ratio", 0.0, 0.8)
    latency = 2.0 * (1.0 - ratio)  # over the 1 ms budget below ratio 0.5
    trial.set_constraint("latency", latency - LATENCY_BUDGET_MS)
    trial.set_constraint("memory", -1.0)
    return 0.9 - ratio / 2, latency, 10.0 * (1 - ratio)


def make_study(storage: str, name: str, wrap: bool) -> optuna.Study:
    study = optuna.create_study(storage=storage, study_name=name, directions=["maximize", "minimize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(METRICS)
    study.optimize(DashboardConstraints(objective) if wrap else objective, n_trials=N_TRIALS)
    return study


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


@contextmanager
def serve(storage: str, log_path: Path) -> Iterator[tuple[str, dict[str, int]]]:
    """optuna-dashboard's own CLI serving ``storage`` on a free local port: its base URL and study ids by name."""
    port = free_port()
    cli = Path(sys.executable).parent / "optuna-dashboard"
    with open(log_path, "wb") as log:
        server = subprocess.Popen([str(cli), storage, "--host", "127.0.0.1", "--port", str(port)],
                                  stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                listed = get_json(f"{base}/api/studies")["study_summaries"]
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"optuna-dashboard did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.3)
        yield base, {s["study_name"]: s["study_id"] for s in listed}
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two studies in one SQLite file (with and without the wrapper), served by optuna-dashboard's own CLI."""
    folder = tmp_path_factory.mktemp("dashboard")
    storage = f"sqlite:///{folder / 'study.db'}"
    studies = {wrap: make_study(storage, f"wrapped-{wrap}", wrap) for wrap in (True, False)}
    with serve(storage, folder / "dashboard.log") as (base, ids):
        yield {"base": base, "folder": folder, "studies": studies, "ids": ids}


def infeasible_numbers(study: optuna.Study) -> set[int]:
    return {t.number for t in study.trials if any(v > 0 for v in named_constraints(t.system_attrs).values())}


def test_api_serves_the_constraints_only_with_the_wrapper(dashboard: dict[str, Any]) -> None:
    for wrap, study in dashboard["studies"].items():
        served = get_json(f"{dashboard['base']}/api/studies/{dashboard['ids'][study.study_name]}")
        infeasible = {t["number"] for t in served["trials"] if any(c > 0 for c in t["constraints"])}
        assert 0 < len(infeasible_numbers(study)) < N_TRIALS  # both kinds of trial are there to tell apart
        # without the wrapper the dashboard sees no constraint at all: every trial counts as feasible
        assert infeasible == (infeasible_numbers(study) if wrap else set())
    # hwprune's own view of a wrapped trial keeps one value per named constraint
    trial = dashboard["studies"][True].trials[0]
    assert set(named_constraints(trial.system_attrs)) == {"latency", "memory"}


# every plotly trace on the page: name and number of points
TRACES_JS = """JSON.stringify(Array.from(document.querySelectorAll('.js-plotly-plot')).flatMap(
  p => (p.data || []).map(t => [t.name || '', (t.x || []).length])))"""
TEXT_JS = "document.body.innerText + ' ' + Array.from(document.querySelectorAll('svg text')).map(t => t.textContent)" \
          ".join(' ')"


def show(browser: Browser, session: str, url: str, ready: str) -> tuple[list[list[Any]], str]:
    """Open ``url``; its plotly traces and text once ``ready`` is in the text (the plots are drawn after the
    study's trials arrive over the API), or after 60 s."""
    browser.send("Page.navigate", {"url": url}, session=session)
    browser.wait_for("Page.loadEventFired")
    deadline = time.monotonic() + 60
    while True:
        browser.drain(0.5)
        traces = json.loads(browser.send("Runtime.evaluate", {"expression": TRACES_JS, "returnByValue": True},
                                         session=session)["result"]["value"])
        text = browser.send("Runtime.evaluate", {"expression": TEXT_JS, "returnByValue": True},
                            session=session)["result"]["value"]
        if ready in text or time.monotonic() > deadline:
            return traces, text


def test_chromium_shows_infeasible_trials_and_metric_names(dashboard: dict[str, Any], tmp_path: Path) -> None:
    study = dashboard["studies"][True]
    url = f"{dashboard['base']}/dashboard/studies/{dashboard['ids'][study.study_name]}"
    browser = Browser(tmp_path)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        browser.send("Page.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": 1400, "height": 2000, "deviceScaleFactor": 1, "mobile": False}, session=session)
        history, history_text = show(browser, session, url, "Infeasible")
        _, analytics_text = show(browser, session, f"{url}/analytics", f"EDF for {METRICS[-1]}")
    finally:
        browser.close()
    # the history page: the history plot's grey "Infeasible Trial of <study>" points and the states bar's "Infeasible"
    infeasible = [n for name, n in history if name.startswith("Infeasible Trial")]
    assert infeasible and all(n == len(infeasible_numbers(study)) for n in infeasible), history
    assert "Infeasible" in history_text.split("Complete", 1)[-1]
    # the analytics page: one value distribution per objective, under its name
    for metric in METRICS:
        assert f"EDF for {metric}" in analytics_text, f"{metric} is not on the page"


def test_a_real_search_storage_shows_its_infeasible_trials(tmp_path: Path) -> None:
    """The storage of a real `hwprune search` (tight budget: some trials over it), served as users would serve it:
    the dashboard's feasibility matches trials.csv's, and the objectives carry hwprune's names."""
    out = tmp_path / "out"
    run_cli("search", "--model", "tiny_subject:tiny_cnn", *GUARD_OFF_ARGS, "--latency-budget-ms", "0.6x",
            "--trials", "6", "--out", str(out), "--quiet", timeout=600)  # exit 0 or 3: the storage is what counts
    run_dir = next(p.parent for p in out.rglob("study.db"))
    import pandas as pd

    table = pd.read_csv(run_dir / "trials.csv")
    done = table[table["state"] == "COMPLETE"]
    expected = {int(n) for n in done.loc[~done["feasible"].astype(bool), "trial"]}
    assert 0 < len(done), table
    with serve(f"sqlite:///{run_dir / 'study.db'}", tmp_path / "dashboard.log") as (base, ids):
        (study_id,) = ids.values()
        served = get_json(f"{base}/api/studies/{study_id}")
    complete = [t for t in served["trials"] if t["state"] == "Complete"]
    assert {t["number"] for t in complete} == {int(n) for n in done["trial"]}
    assert {t["number"] for t in complete if any(c > 0 for c in t["constraints"])} == expected
    assert all(t["constraints"] for t in complete)  # every complete trial carries its constraints
    assert served["objective_names"] == METRICS
