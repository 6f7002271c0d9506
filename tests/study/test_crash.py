"""Crash safety: a worker killed with SIGKILL mid-trial leaves no trial RUNNING once the study is opened again, and
loses none of the completed ones.

Slow: the default suite's chaos test (test_chaos.py) kills three runs at random moments and checks the same and more;
this one kills once, deterministically inside a trial, with the default host-cpu profile."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

from conftest import GUARD_OFF_ARGS, ROOT, TESTS


SLOW_EVAL_S = 4.0  # each trial's evaluation sleeps this long, so the worker is killed mid-trial


def _states(db: Path) -> dict[str, int]:
    return _census(db)[0]


def _census(db: Path) -> tuple[dict[str, int], float | None]:
    """Trial counts by state, and how long ago the running trial (if any) started, in seconds."""
    study = optuna.load_study(study_name="crash", storage=f"sqlite:///{db}")
    out: dict[str, int] = {}
    age = None
    for t in study.trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
        if t.state.name == "RUNNING" and t.datetime_start is not None:
            age = (datetime.datetime.now() - t.datetime_start).total_seconds()
    return out, age


@pytest.mark.slow
def test_a_killed_worker_leaves_no_running_trial_and_loses_no_completed_one(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]),
               TINY_SLOW_EVAL=str(SLOW_EVAL_S), HWPRUNE_HEARTBEAT_S="1")
    args = [sys.executable, "-m", "hwprune.cli", "search", "--model", "tiny_subject:tiny_cnn_slow", *GUARD_OFF_ARGS,
            "--latency-budget-ms", "2x", "--trials", "20", "--out", str(tmp_path), "--study", "crash",
            "--final-finetune-steps", "0", "--quiet"]
    proc = subprocess.Popen(args, env=env, cwd=TESTS, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    db = tmp_path / "crash" / "study.db"
    deadline = time.time() + 240
    states: dict[str, int] = {}
    while time.time() < deadline:
        time.sleep(0.5)
        try:
            states, age = _census(db) if db.exists() else ({}, None)
        except Exception:  # noqa: BLE001 - the study may not exist yet
            continue
        # Kill only early in a trial, so that the trial cannot finish between this look and the signal.
        if states.get("COMPLETE", 0) >= 2 and age is not None and age < SLOW_EVAL_S / 2:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = _states(db)
    assert before.get("RUNNING") == 1 and before.get("COMPLETE", 0) >= 2, before  # killed inside a trial
    time.sleep(2.5)  # past the grace period (2 heartbeats)
    env["TINY_SLOW_EVAL"] = "0"
    want = before["COMPLETE"] + 1
    again = subprocess.run(args[:args.index("20")] + [str(want)] + args[args.index("20") + 1:], env=env, cwd=TESTS,
                           capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stderr
    after = _states(db)
    assert "RUNNING" not in after and after["COMPLETE"] == want and after.get("FAIL", 0) >= 1, after
    trials = pd.read_csv(tmp_path / "crash" / "trials.csv")
    failed = trials[trials["state"] == "FAIL"]
    assert failed["fail_reason"].str.contains("stopped without finishing").all()
