"""Shared test setup: a private cache folder and helpers to run the real `hwprune` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
# tiny_subject's tiny_cnn and tiny_cnn_trained score at chance (10 classes): the tests that search it for something
# else (storage, boards, interrupts, budgets) search it as hwprune did before the accuracy guard and recovery, which
# test_accuracy.py covers
GUARD_OFF_ARGS = ("--recovery", "none", "--max-accuracy-drop", "off")
GUARD_OFF = {"recovery": "none", "max_accuracy_drop": "off"}


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    # demo weights and TVM databases go to a per-run folder so tests never see a user's cache
    os.environ.setdefault("HWPRUNE_CACHE", str(tmp_path_factory.mktemp("hwprune-cache")))
    yield


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache folder of the test's own (TVM compile caches and tuning databases start empty)."""
    monkeypatch.setenv("HWPRUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16-channel 32x32 CNN written directly with onnx.helper (no torch export)."""
    from hwprune.doctor import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.onnx", channels=16, size=32)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict[str, str] | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `python -m hwprune.cli ARGS` in a fresh process, with tests/ importable for the test factories."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), full_env.get("PYTHONPATH", "")])
    full_env["COLUMNS"] = "200"
    if env:
        full_env.update(env)
    proc = subprocess.run([sys.executable, "-m", "hwprune.cli", *args], cwd=cwd or TESTS, env=full_env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"hwprune {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def load_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def budget_profile(folder: Path, budgets: str = "memory_mb = 50.0") -> Path:
    """host-cpu as a profile file of its own whose [budgets] are ``budgets`` (no latency budget by default)."""
    from hwprune.profiles import load_profile

    text = Path(load_profile("host-cpu").source).read_text()
    path = folder / "budgeted.toml"
    quick = "[measure]\nwarmup = 2\nrepeats = 5\nmin_repeat_ms = 0.5\nmax_cv = 10.0\nremeasure = 0\n"  # a fast test
    path.write_text(text[:text.index("[measure]")] + quick + f"[budgets]\n{budgets}\n")
    return path
