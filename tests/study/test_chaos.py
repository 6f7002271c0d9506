"""Chaos: ``kill -9`` of a real search (CLI process, SQLite storage) at random moments, run after run, each run
resuming the study the killed one left; then a last run that finishes. No trial that was COMPLETE at a kill may be
lost or changed, and no trial may be left RUNNING (Optuna heartbeats + fail_stale_trials, HWPRUNE_HEARTBEAT_S=1).

The kill moments are drawn from a seeded generator: most land a random fraction of a second after the run completed
a trial (inside the next trial: evaluation, measurement, or the storage write), some during start-up (import, dense
baseline, creating or opening the study). The 3-run variant runs in the default suite (it also checks the reason
trials.csv gives a killed trial); the 10-run one and test_crash.py's deterministic single kill are slow.
"""

from __future__ import annotations

import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

from conftest import GUARD_OFF_ARGS, ROOT, TESTS

STUDY = "chaos"
EVAL_S = "0.8"  # each evaluation sleeps this long, so a trial is mostly evaluation and a kill lands inside one
STARTUP_KILL_SHARE = 0.2  # share of the runs killed during start-up rather than after a trial
RUN_DEADLINE_S = 120  # a run that has not completed a trial by then is a failure, not a slow host


def fast_profile(folder: Path) -> Path:
    """host-cpu with fewer, shorter timing repeats: each run starts (and measures its dense baseline) sooner."""
    text = (ROOT / "device_profiles" / "host-cpu.toml").read_text()
    text = re.sub(r"(?m)^warmup = .*$", "warmup = 2", text)
    text = re.sub(r"(?m)^repeats = .*$", "repeats = 7", text)
    text = re.sub(r"(?m)^min_repeat_ms = .*$", "min_repeat_ms = 0.5", text)
    path = folder / "host-cpu-fast.toml"
    path.write_text(text.replace('name = "host-cpu"', 'name = "host-cpu-fast"'))
    return path


def states(db: Path) -> dict[str, int]:
    """Trial counts by state, read with plain SQLite (cheap enough to poll while the worker writes)."""
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return dict(con.execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall())
    except sqlite3.OperationalError:  # the study's tables are not created yet
        return {}


def trials(db: Path) -> dict[int, tuple[str, tuple[float, ...] | None]]:
    """Every trial of the study: number -> (state, values)."""
    if not states(db):  # killed before the study had a trial (or a table)
        return {}
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{db}")
    return {t.number: (t.state.name, tuple(t.values) if t.values else None) for t in study.trials}


def search_args(profile: Path, out: Path, n_trials: int) -> list[str]:
    return [sys.executable, "-m", "hwprune.cli", "search", "--model", "tiny_subject:tiny_cnn_slow", *GUARD_OFF_ARGS,
            "--device", str(profile), "--latency-budget-ms", "2x", "--trials", str(n_trials), "--out", str(out),
            "--study", STUDY, "--final-finetune-steps", "0", "--quiet"]


def kill_at_random(args: list[str], env: dict[str, str], db: Path, rng: random.Random, log: Path) -> str:
    """Start a run, SIGKILL it at a random moment; returns where the moment was drawn ("start-up" or "trial")."""
    with open(log, "ab") as err:
        proc = subprocess.Popen(args, env=env, cwd=TESTS, stdout=subprocess.DEVNULL, stderr=err,
                                stdin=subprocess.DEVNULL)
    try:
        if rng.random() < STARTUP_KILL_SHARE:
            where = "start-up"
            time.sleep(rng.uniform(0.5, 8.0))
        else:
            where = "trial"
            done = states(db).get("COMPLETE", 0)
            deadline = time.monotonic() + RUN_DEADLINE_S
            while states(db).get("COMPLETE", 0) <= done:  # this run's first completed trial
                assert proc.poll() is None, f"the run exited {proc.returncode}: {log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no trial completed in time"
                time.sleep(0.2)
            time.sleep(rng.uniform(0.0, 1.5))
        assert proc.poll() is None, f"the run exited {proc.returncode} before its kill: {log.read_text()[-3000:]}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    return where


def chaos(tmp_path: Path, runs: int, seed: int) -> None:
    rng = random.Random(seed)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]),
               TINY_SLOW_EVAL=EVAL_S, HWPRUNE_HEARTBEAT_S="1")
    profile, db, log = fast_profile(tmp_path), tmp_path / STUDY / "study.db", tmp_path / "runs.log"
    completed: dict[int, tuple[float, ...]] = {}  # every trial COMPLETE at some kill, with its values
    killed_inside: set[int] = set()  # trials RUNNING at some kill
    for _ in range(runs):
        kill_at_random(search_args(profile, tmp_path, 500), env, db, rng, log)
        for number, (state, values) in trials(db).items():
            if state == "COMPLETE":
                assert completed.setdefault(number, values) == values, f"trial {number} changed"
            elif state == "RUNNING":
                killed_inside.add(number)
    assert completed, "no trial completed before any kill"
    assert killed_inside, "no kill landed inside a trial"

    time.sleep(2.5)  # past the heartbeat grace period (2 heartbeats of 1 s)
    env["TINY_SLOW_EVAL"] = "0"
    want = states(db)["COMPLETE"] + 1
    final = subprocess.run(search_args(profile, tmp_path, want), env=env, cwd=TESTS, capture_output=True, text=True,
                           timeout=300, stdin=subprocess.DEVNULL)
    assert final.returncode == 0, final.stderr[-3000:]
    after = trials(db)
    assert [n for n, (state, _) in after.items() if state == "RUNNING"] == []
    assert {n: after[n] for n in completed} == {n: ("COMPLETE", v) for n, v in completed.items()}  # none lost
    assert all(after[n][0] == "FAIL" for n in killed_inside)
    assert sum(state == "COMPLETE" for state, _ in after.values()) == want
    # the user reads why in trials.csv
    table = pd.read_csv(tmp_path / STUDY / "trials.csv")
    reasons = table[table["trial"].isin(killed_inside)]["fail_reason"]
    assert len(reasons) == len(killed_inside) and reasons.str.contains("stopped without finishing").all()


def test_kill_9_three_times_loses_nothing_and_leaves_nothing_running(tmp_path: Path) -> None:
    chaos(tmp_path, runs=3, seed=1)


@pytest.mark.slow
def test_kill_9_ten_times_loses_nothing_and_leaves_nothing_running(tmp_path: Path) -> None:
    chaos(tmp_path, runs=10, seed=2)
