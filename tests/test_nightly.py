"""Nightly jobs, end to end through the CLI: a study that grows night after night, resumed nights, the comparison
with the night before, and the exit status that flags a regression."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import optuna
import pytest
import torch

from conftest import budget_profile, run_cli

JOB = """
name = "tiny-nightly"
out = "{out}"
trials_per_night = 3

[search]
model = "tiny_subject:tiny_cnn_checkpoint"
device = "host-cpu"
latency_budget_ms = "2x"
trial_finetune_steps = 0
final_finetune_steps = 0
calibration_batches = 2
max_accuracy_drop = "off"  # the checkpoint scores at chance: the guard would judge noise
resume_changed = true      # each night's checkpoint differs: resume the study anyway (its front is re-evaluated)

[regressions]
latency_tolerance = 1.0   # this test is about accuracy: a shared host's latency drift must not decide it
accuracy_tolerance = 0.02
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nightly")
    path = root / "job.toml"
    path.write_text(JOB.format(out=root / "out"))
    return path


def _history(job_dir: Path) -> list[dict[str, str]]:
    with (job_dir / "history.csv").open() as f:
        return list(csv.DictReader(f))


def test_first_night_then_resume_then_regression(job: Path, tmp_path: Path) -> None:
    job_dir = job.parent / "out" / "tiny-nightly"
    first = run_cli("nightly", str(job), "--night", "2026-11-20", check=True)
    assert "first night of job tiny-nightly" in first.stdout
    night1 = job_dir / "nights" / "2026-11-20"
    assert (night1 / "summary.json").is_file() and (night1 / "report.html").is_file()
    study = optuna.load_study(study_name="tiny-nightly", storage=f"sqlite:///{job_dir / 'study.db'}")
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 3

    # the same night again resumes it: its target stays 3 trials, nothing is added
    again = run_cli("nightly", str(job), "--night", "2026-11-20", check=True)
    assert "resuming toward 3 complete trials" in again.stderr.replace("\n", " ")
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 3
    assert [r["night"] for r in _history(job_dir)] == ["2026-11-20"]

    # the next night the model that was "trained today" is broken (its classifier zeroed): the study grows by
    # another 3 trials, the front is re-evaluated on tonight's model, and the accuracy drop is a regression
    from tiny_subject import tiny_cnn_trained

    model = tiny_cnn_trained().model
    state = model.state_dict()
    state["head.2.weight"].zero_()
    state["head.2.bias"].zero_()
    ckpt = tmp_path / "broken.pt"
    torch.save(state, ckpt)
    second = run_cli("nightly", str(job), "--night", "2026-11-21", env={"TINY_CHECKPOINT": str(ckpt)})
    assert second.returncode == 4, second.stdout + second.stderr
    assert "night 2026-11-21 vs 2026-11-20" in second.stdout and "regression (accuracy)" in second.stdout
    night2 = job_dir / "nights" / "2026-11-21"
    cmp = json.loads((night2 / "compare.json").read_text())
    assert [r["kind"] for r in cmp["regressions"]] == ["accuracy"]
    assert (night2 / "compare.html").is_file()
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 6
    rows = _history(job_dir)
    assert [r["night"] for r in rows] == ["2026-11-20", "2026-11-21"]
    assert [r["trials_total"] for r in rows] == ["3", "6"] and rows[1]["regressions"] == "1"
    assert float(rows[1]["accuracy"]) < float(rows[0]["accuracy"]) - 0.02


def test_bad_job_files_name_the_field(tmp_path: Path) -> None:
    cases = {
        'name = "x"\nsearch = {model = "mobilenet-tiny", device = "host-cpu", latency_budget_ms = "0.6x"}\n'
        'trails_per_night = 3\n': "trails_per_night: unknown field",
        'name = "x"\n[search]\nmodel = "mobilenet-tiny"\ndevice = "host-cpu"\ntrials = 5\n': "search.trials",
        'name = "x"\n[search]\nmodel = "mobilenet-tiny"\ndevice = "host-cpu"\nsampler = "magic"\n': "sampler",
        'name = "a b"\n[search]\nmodel = "m"\ndevice = "host-cpu"\n': "name:",
        'name = "x"\ntrials_per_night = 0\n[search]\nmodel = "m"\ndevice = "host-cpu"\n': "trials_per_night",
        'name = "x"\n[search]\nmodel = "m"\ndevice = "host-cpu"\n[regressions]\nlatency = 1\n': "regressions.latency",
        'name = "x"\n[search]\nmodel = "m"\ndevice = "host-cpu"\nmax_accuracy_drop = "lots"\n': "max accuracy drop",
        'name = "x"\n[search]\nmodel = "m"\ndevice = "host-cpu"\nrecovery = "magic"\n': "recovery",
        'name = ".."\n[search]\nmodel = "m"\ndevice = "host-cpu"\n': "name:",  # the job's folder would be out/..
    }
    for i, (text, expected) in enumerate(cases.items()):
        path = tmp_path / f"job{i}.toml"
        path.write_text(text)
        proc = run_cli("nightly", str(path))
        assert proc.returncode == 2, (text, proc.stderr)
        assert str(path) in proc.stderr.replace("\n", "") and expected in proc.stderr.replace("\n", ""), proc.stderr
        assert "Traceback" not in proc.stderr
    missing = run_cli("nightly", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_a_night_where_nothing_fits_exits_3_and_keeps_its_history(tmp_path: Path) -> None:
    job = tmp_path / "tight.toml"
    job.write_text('name = "tight"\ntrials_per_night = 2\n[search]\nmodel = "tiny_subject:tiny_cnn"\n'
                   'device = "host-cpu"\nlatency_budget_ms = "0.01x"\nfinal_finetune_steps = 0\n'
                   'recovery = "none"\n')
    proc = run_cli("nightly", str(job), "--night", "2026-11-20", cwd=tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "no model met the budgets" in proc.stderr and "Traceback" not in proc.stderr
    job_dir = tmp_path / "reports" / "nightly" / "tight"  # `out` defaults to reports/nightly under the cwd
    rows = _history(job_dir)
    assert [r["night"] for r in rows] == ["2026-11-20"] and rows[0]["recommended"] == ""


# the default budget is resolved by the search itself: the CLI and API tests cover it in the default run
@pytest.mark.slow
def test_the_profiles_default_budget_applies_to_a_night(tmp_path: Path) -> None:
    profile = budget_profile(tmp_path)
    job = tmp_path / "job.toml"
    job.write_text(f'name = "budgeted"\nout = "out"\ntrials_per_night = 1\n[search]\nmodel = "tiny_subject:tiny_cnn"\n'
                   f'device = "{profile}"\nfinal_finetune_steps = 0\nrecovery = "none"\nmax_accuracy_drop = "off"\n')
    run_cli("nightly", str(job), "--night", "2026-11-20", check=True)
    request = json.loads((tmp_path / "out" / "budgeted" / "nights" / "2026-11-20" / "request.json").read_text())
    assert (request["memory_budget"], request["latency_budget"]) == ("50", None)


def test_a_night_that_is_not_a_date_is_refused_before_any_work(tmp_path: Path) -> None:
    from hwprune.errors import HwpruneError
    from hwprune.nightly import load_job, run_night

    job = tmp_path / "job.toml"
    job.write_text('name = "dated"\nout = "out"\n[search]\nmodel = "tiny_subject:tiny_cnn"\ndevice = "host-cpu"\n')
    proc = run_cli("nightly", str(job), "--night", "2026-13-45")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "night: '2026-13-45' is not a date written YYYY-MM-DD" in lines[0], proc.stderr
    loaded = load_job(job)
    for night in ("2026-02-30", "2026-11-20/../..", "../2026-11-20", "20261120", "2026-1-5", ""):
        with pytest.raises(HwpruneError, match="is not a date written YYYY-MM-DD"):
            run_night(loaded, night or " ")
    assert not (tmp_path / "out").exists(), "nothing is written for a night that is not a date"
    loaded.out = Path("/proc/hwprune-test")  # a job folder that cannot be written: one error, before any work
    with pytest.raises(HwpruneError, match="cannot create or write the run folder /proc/hwprune-test/dated/nights"):
        run_night(loaded, "2026-11-20")
