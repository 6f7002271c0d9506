"""The bad-input sweep: what a user can get wrong on every command, each answered by exit 2 (README's exit-code
table), one error line on stderr, no traceback, and nothing written outside --out.

The cases run the real command line in this process (``hwprune.cli.main``), since each fails before any model
work; the files they read (profiles, job files, data, ONNX files, run folders) are real files made once.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hwprune import cli

EXIT_BAD_INPUT = 2
ERROR_PREFIXES = ("hwprune: error:", "Error:")  # hwprune's own line, click's usage line


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The malformed files the cases point at."""
    from hwprune.profiles import load_profile

    d = tmp_path_factory.mktemp("inputs")
    (d / "a-file.txt").write_text("keep me")
    host = Path(load_profile("host-cpu").source).read_text()
    (d / "not-toml.toml").write_text("this is [not toml\n")
    (d / "zero-gflops.toml").write_text(_set(host, "peak_gflops", "0.0"))
    (d / "unknown-field.toml").write_text(host + "\ncolour = 'red'\n")
    (d / "no-hardware.toml").write_text('name = "x"\nbackend = "ort"\n')
    (d / "bad-backend.toml").write_text(host.replace('backend = "ort"', 'backend = "magic"'))
    (d / "corrupt.pt").write_bytes(b"\x00not a torch file" * 10)
    torch.save(torch.zeros(10, 5, 8, 8), d / "wrong-shape.pt")
    torch.save({"inputs": torch.zeros(10, 3, 8, 8), "targets": torch.zeros(7, dtype=torch.long)}, d / "lengths.pt")
    torch.save(torch.zeros(0, 3, 8, 8), d / "empty.pt")
    np.savez(d / "no-keys.npz", foo=np.zeros((4, 3, 8, 8), dtype=np.float32))
    (d / "data.csv").write_text("1,2,3\n")
    torch.save({"inputs": torch.zeros(4, 3, 8, 8), "note": ValueError("not a tensor")}, d / "pickled.pt")
    (d / "syntax.py").write_text("def factory(:\n    pass\n")
    (d / "corrupt.onnx").write_bytes(os.urandom(512))
    (d / "text.onnx").write_text("hello, I am not a model\n")
    (d / "empty.onnx").write_bytes(b"")
    for name, text in (("corrupt-run", "{not json"), ("schema-run", "{}"), ("list-run", "[1, 2]")):
        (d / name).mkdir()
        (d / name / "summary.json").write_text(text)
    (d / "empty-run").mkdir()
    job = ('name = "demo"\nout = "{out}"\ntrials_per_night = 1\n[search]\nmodel = "bad_input_models:small"\n'
           'device = "host-cpu"\n')
    (d / "job.toml").write_text(job)
    (d / "job-unknown.toml").write_text(job + "[extra]\nx = 1\n")
    (d / "job-name.toml").write_text(job.replace('name = "demo"', 'name = "../up"'))
    (d / "job-budget.toml").write_text(job + 'latency_budget_ms = "abc"\n')
    (d / "job-trials.toml").write_text(job.replace("trials_per_night = 1", "trials_per_night = -3"))
    (d / "job-field.toml").write_text(job + "trials = 4\n")
    return d


def _set(toml: str, key: str, value: str) -> str:
    lines = [f"{key} = {value}" if ln.split("=")[0].strip() == key else ln for ln in toml.splitlines()]
    return "\n".join(lines) + "\n"


SEARCH = ("search", "--model", "bad_input_models:small", "--trials", "1", "--out", "{out}",
          "--latency-budget-ms", "0.8x", "--recovery", "none", "--quiet")

CASES: dict[str, tuple[tuple[str, ...], str]] = {  # name: (argv, what the error line says)
    # click's usage errors
    "no such command": (("prune",), "No such command 'prune'"),
    "unknown flag": ((*SEARCH, "--bogus"), 'No such option: --bogus'),
    "trials not a number": ((*SEARCH, "--trials", "abc"), "Invalid value for '--trials'"),
    "seed not a number": ((*SEARCH, "--seed", "1.5"), "Invalid value for '--seed'"),
    "ssh port not a number": ((*SEARCH, "--ssh-port", "twenty"), "Invalid value for '--ssh-port'"),
    "missing flag value": (("search", "--out", "{out}", "--model"), "'--model' requires an argument"),
    "report without a folder": (("report",), 'Missing argument'),
    # values
    "trials negative": ((*SEARCH, "--trials", "-1"), 'trials: must be at least 1'),
    "trials zero": ((*SEARCH, "--trials", "0"), 'trials: must be at least 1'),
    "timeout negative": ((*SEARCH, "--timeout", "-5"), 'timeout: must be positive'),
    "budget abc": ((*SEARCH, "--latency-budget-ms", "abc"), "'abc' is not a number"),
    "budget negative": ((*SEARCH, "--latency-budget-ms", "-1"), "'-1' is not a number"),
    "budget zero x": ((*SEARCH, "--latency-budget-ms", "0x"), "must be a positive finite number, got '0x'"),
    "budget xx": ((*SEARCH, "--latency-budget-ms", "1.5xx"), "'1.5xx' is not a number"),
    "budget infinite": ((*SEARCH, "--latency-budget-ms", "1e999"), "positive finite number, got '1e999'"),
    "memory budget abc": ((*SEARCH, "--memory-budget-mb", "abc"), "memory budget: 'abc'"),
    "memory budget zero": ((*SEARCH, "--memory-budget-mb", "0"), 'memory budget: must be a positive'),
    "sampler unknown": ((*SEARCH, "--sampler", "magic"), "sampler: 'magic'"),
    "max ratio one": ((*SEARCH, "--max-ratio", "1"), 'max ratio: must be between 0 and 1'),
    "max ratio negative": ((*SEARCH, "--max-ratio", "-0.2"), 'max ratio: must be between'),
    "max ratio nan": ((*SEARCH, "--max-ratio", "nan"), 'got nan'),
    "channel multiple zero": ((*SEARCH, "--channel-multiple", "0"), 'channel multiple: must be at least 1'),
    "importance unknown": ((*SEARCH, "--importance", "random"), "importance: 'random'"),
    "final candidates zero": ((*SEARCH, "--final-candidates", "0"), 'final candidates: must be at least 1'),
    "finetune steps negative": ((*SEARCH, "--trial-finetune-steps", "-1"),
                                'trial finetune steps: must not be negative'),
    "accuracy drop abc": ((*SEARCH, "--max-accuracy-drop", "abc"), "max accuracy drop: 'abc'"),
    "accuracy drop 150%": ((*SEARCH, "--max-accuracy-drop", "150%"), "'150%' is out of range"),
    "recovery unknown": ((*SEARCH, "--recovery", "magic"), "recovery: 'magic'"),
    "tune final on ORT": ((*SEARCH, "--tune-final", "8"), '--tune-final tunes TVM kernels'),
    "tracker without port": ((*SEARCH, "--tracker", "nohost"), 'expected HOST:PORT'),
    "backend unknown": ((*SEARCH, "--backend", "cuda"), "unknown backend 'cuda'"),
    "mlflow empty": ((*SEARCH, "--mlflow", " "), '--mlflow: expected a tracking URI'),
    "storage unknown scheme": ((*SEARCH, "--storage", "nosuchdb://x/y"),
                               "storage 'nosuchdb://x/y': not a database URL"),
    "storage not a url": ((*SEARCH, "--storage", "study.db"), "storage 'study.db': not a database URL"),
    # profiles
    "device unknown": ((*SEARCH, "--device", "pi-17"), "unknown device profile 'pi-17'"),
    "device file missing": ((*SEARCH, "--device", "{in}/missing.toml"), 'missing.toml does not exist'),
    "device not toml": ((*SEARCH, "--device", "{in}/not-toml.toml"), 'not valid TOML'),
    "device peak_gflops 0": ((*SEARCH, "--device", "{in}/zero-gflops.toml"), 'hardware.peak_gflops: must be positive'),
    "device unknown field": ((*SEARCH, "--device", "{in}/unknown-field.toml"), 'colour: unknown field'),
    "device no hardware": ((*SEARCH, "--device", "{in}/no-hardware.toml"), 'hardware: required table is missing'),
    "device bad backend": ((*SEARCH, "--device", "{in}/bad-backend.toml"), "backend: 'magic'"),
    "profiles show unknown": (("profiles", "show", "pi-17"), "unknown device profile 'pi-17'"),
    "profiles show not toml": (("profiles", "show", "{in}/not-toml.toml"), 'not valid TOML'),
    # --out and --study
    "out is a file": ((*SEARCH, "--out", "{in}/a-file.txt"), 'a-file.txt exists and is not a folder'),
    "out under a file": ((*SEARCH, "--out", "{in}/a-file.txt/sub"), 'a-file.txt exists and is not a folder'),
    "out /dev/null": ((*SEARCH, "--out", "/dev/null"), '/dev/null exists and is not a folder'),
    "out in /proc": ((*SEARCH, "--out", "/proc/hwprune-test"), 'cannot create or write the run folder /proc'),
    "out in /sys": ((*SEARCH, "--out", "/sys/hwprune-test"), 'cannot create or write the run folder /sys'),
    "study escapes": ((*SEARCH, "--study", "../../escape"), 'cannot contain a path separator'),
    "study with a slash": ((*SEARCH, "--study", "a/b"), 'cannot contain a path separator'),
    "study dot dot": ((*SEARCH, "--study", ".."), 'cannot contain a path separator'),
    "study absolute": ((*SEARCH, "--study", "/tmp/abs"), 'cannot contain a path separator'),
    # model sources
    "model unknown name": ((*SEARCH, "--model", "resnet-huge"), 'neither a built-in demo'),
    "model module missing": ((*SEARCH, "--model", "no_such_module_xyz:f"), "cannot import module 'no_such_module_xyz'"),
    "model factory missing": ((*SEARCH, "--model", "bad_input_models:nope"), "has no attribute 'nope'"),
    "model file missing": ((*SEARCH, "--model", "{in}/missing.py:f"), 'missing.py does not exist'),
    "model file syntax error": ((*SEARCH, "--model", "{in}/syntax.py:factory"), "cannot import"),
    "model not callable": ((*SEARCH, "--model", "bad_input_models:NOT_CALLABLE"), 'NOT_CALLABLE is not callable'),
    "model empty spec": ((*SEARCH, "--model", ":"), "model ':' is neither"),
    "factory raises": ((*SEARCH, "--model", "tiny_subject:broken_factory"), 'failed: RuntimeError: dataset missing'),
    "factory returns int": ((*SEARCH, "--model", "tiny_subject:not_a_subject"), 'returned int'),
    "factory takes arguments": ((*SEARCH, "--model", "bad_input_models:takes_arguments"),
                                'missing 1 required positional argument'),
    "factory model is a string": ((*SEARCH, "--model", "bad_input_models:model_is_a_string"),
                                  'the model is str, not a torch.nn.Module'),
    "factory inputs not tensors": ((*SEARCH, "--model", "bad_input_models:inputs_are_a_list_of_ints"),
                                   'example_inputs must be a tensor'),
    "factory evaluate a number": ((*SEARCH, "--model", "bad_input_models:evaluate_is_a_number"),
                                  'evaluate must be a callable'),
    "factory returns five": ((*SEARCH, "--model", "bad_input_models:five_things"), 'five_things returned tuple'),
    "factory dict unknown field": ((*SEARCH, "--model", "bad_input_models:dict_with_unknown_field"),
                                   "unexpected keyword argument 'colour'"),
    "evaluate raises": ((*SEARCH, "--model", "bad_input_models:evaluate_raises"),
                        'evaluate(model) failed on the dense model: KeyError'),
    "evaluate returns text": ((*SEARCH, "--model", "bad_input_models:evaluate_returns_text"),
                              "returned 'good', not a number"),
    "inputs the model rejects": ((*SEARCH, "--model", "bad_input_models:wrong_input_shape"),
                                 'expected input[1, 5, 8, 8] to have 3 channels'),
    # --data
    "data missing": ((*SEARCH, "--data", "{in}/missing.pt"), 'missing.pt does not exist'),
    "data corrupt": ((*SEARCH, "--data", "{in}/corrupt.pt"), 'corrupt.pt: cannot load it'),
    "data wrong shape": ((*SEARCH, "--data", "{in}/wrong-shape.pt"), 'do not match the example inputs'),
    "data lengths differ": ((*SEARCH, "--data", "{in}/lengths.pt"), '10 inputs but targets of shape (7,)'),
    "data empty": ((*SEARCH, "--data", "{in}/empty.pt"), 'data: no samples'),
    "data npz without keys": ((*SEARCH, "--data", "{in}/no-keys.npz"), "needs an 'inputs' (or 'x') entry"),
    "data pickled object": ((*SEARCH, "--data", "{in}/pickled.pt"), "pickled.pt: cannot load it"),
    "data csv": ((*SEARCH, "--data", "{in}/data.csv"), 'expected a .pt or .npz file'),
    "data is a folder": ((*SEARCH, "--data", "{in}"), 'does not exist'),
    # measure
    "measure missing": (("measure", "{in}/missing.onnx"), 'missing.onnx: no such ONNX file'),
    "measure corrupt": (("measure", "{in}/corrupt.onnx"), 'ONNX Runtime cannot load'),
    "measure text": (("measure", "{in}/text.onnx"), 'ONNX Runtime cannot load'),
    "measure empty": (("measure", "{in}/empty.onnx"), 'ONNX Runtime cannot load'),
    "measure a folder": (("measure", "{in}"), 'no such ONNX file'),
    "measure beside missing": (("measure", "{in}/corrupt.onnx", "--beside", "{in}/missing.onnx"),
                               'missing.onnx: no such ONNX file'),
    "measure device unknown": (("measure", "{in}/corrupt.onnx", "--device", "pi-17"), "unknown device profile 'pi-17'"),
    # report
    "report missing folder": (("report", "{in}/missing-run"), 'missing-run: no summary.json'),
    "report without summary": (("report", "{in}/empty-run"), 'empty-run: no summary.json'),
    "report corrupt summary": (("report", "{in}/corrupt-run"), 'summary.json: not valid JSON'),
    "report summary {}": (("report", "{in}/schema-run"), 'summary.dense is missing'),
    "report summary a list": (("report", "{in}/list-run"), 'expected an object, got list'),
    "report compare missing": (("report", "{in}/schema-run", "--compare", "{in}/missing-run"),
                               'missing-run: no summary.json'),
    "report compare corrupt": (("report", "{in}/corrupt-run", "--compare", "{in}/corrupt-run", "--out", "{out}"),
                               'not valid JSON'),
    # nightly
    "nightly job missing": (("nightly", "{in}/missing.toml"), 'nightly job file'),
    "nightly job not toml": (("nightly", "{in}/not-toml.toml"), 'not valid TOML'),
    "nightly unknown table": (("nightly", "{in}/job-unknown.toml"), 'extra: unknown field'),
    "nightly name escapes": (("nightly", "{in}/job-name.toml"), "got '../up'"),
    "nightly bad budget": (("nightly", "{in}/job-budget.toml"), "latency budget: 'abc'"),
    "nightly trials negative": (("nightly", "{in}/job-trials.toml"), 'trials_per_night: a positive integer'),
    "nightly field nightly sets": (("nightly", "{in}/job-field.toml"), 'search.trials: unknown or not allowed here'),
    "nightly night 2026-13-45": (("nightly", "{in}/job.toml", "--night", "2026-13-45"),
                                 "night: '2026-13-45' is not a date"),
    "nightly night words": (("nightly", "{in}/job.toml", "--night", "yesterday"), "night: 'yesterday' is not a date"),
    # calibrate and doctor
    "calibrate device unknown": (("calibrate", "--device", "pi-17"), "unknown device profile 'pi-17'"),
    "calibrate device not toml": (("calibrate", "--device", "{in}/not-toml.toml"), 'not valid TOML'),
    "calibrate budget negative": (("calibrate", "--budget-seconds", "-1"), '--budget-seconds -1: must be positive'),
    "calibrate out is a file": (("calibrate", "--out", "{in}/a-file.txt", "--budget-seconds", "1"),
                                'a-file.txt: not a folder'),
    # checked before minutes of measurements, not when the predictor is saved after them
    "calibrate out under a file": (("calibrate", "--out", "{in}/a-file.txt/sub", "--budget-seconds", "600"),
                                   'a-file.txt exists and is not a folder; choose an --out folder you can write to '
                                   '(or set $HWPRUNE_CACHE)'),
    "doctor device unknown": (("doctor", "--device", "pi-17"), "unknown device profile 'pi-17'"),
    "doctor device peak_gflops 0": (("doctor", "--device", "{in}/zero-gflops.toml"), 'peak_gflops: must be positive'),
    "doctor tracker without port": (("doctor", "--device", "raspberry-pi-4", "--tracker", "nohost"),
                                    'expected HOST:PORT'),
}


def _snapshot(*folders: Path) -> dict[str, tuple[float, int]]:
    files: dict[str, tuple[float, int]] = {}
    for folder in folders:
        for root, dirs, names in os.walk(folder):
            for name in names + dirs:
                p = Path(root) / name
                st = p.lstat()
                files[str(p)] = (st.st_mtime, st.st_size)
    return files


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the command line in this process; its exit status and stderr."""
    try:
        cli.main(argv)
        rc = 0
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(case: str, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(cli.err, "width", 10_000)  # a progress line is one line, however long
    args, needle = CASES[case]
    argv = [a.format(out=out, **{"in": inputs}) for a in args]
    if argv[0] == "nightly":  # the job's out folder is the --out of a nightly run
        for job in inputs.glob("job*.toml"):
            job.write_text(job.read_text().replace("{out}", str(out)))
    before = _snapshot(inputs, tmp_path)
    rc, err = run_main(argv, capsys)
    assert rc == EXIT_BAD_INPUT, f"{case}: exit {rc}\n{err}"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(ERROR_PREFIXES)]
    # besides the error, only the search's progress lines (each one line, "hwprune: ...")
    assert len(errors) == 1 and all(ln.startswith("hwprune: ") for ln in lines if ln not in errors), err
    assert errors[0] == lines[-1] and needle in errors[0], err
    after = _snapshot(inputs, tmp_path)
    changed = sorted(p for p in set(after) | set(before)
                     if after.get(p) != before.get(p) and not Path(p).is_relative_to(out))
    assert not changed, f"{case}: wrote outside --out: {changed}"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, err = run_main([a.format(out=ro) for a in SEARCH], capsys)
    finally:
        ro.chmod(0o755)
        shutil.rmtree(ro)
    assert rc == EXIT_BAD_INPUT and "Traceback" not in err and err.strip().count("\n") == 0, err
