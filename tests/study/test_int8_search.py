"""Pruning and INT8 searched together (--quantize int8) on real components: real searches, ORT's quantizer and
sessions, the CLI's measure, profile TOML files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import optuna
import pytest
import torch
from conftest import GUARD_OFF, GUARD_OFF_ARGS, load_summary, run_cli
from tiny_subject import TinyNet, tiny_cnn_trained

import hwprune
from hwprune.profiles import load_profile
from hwprune.quant import QuantizationError, evaluate_onnx
from hwprune.quant.device import reduce_range
from hwprune.study.precision import signature_with, split_params

FAST_MEASURE = "[measure]\nwarmup = 2\nrepeats = 5\nmin_repeat_ms = 0.5\nmax_cv = 10.0\nremeasure = 0\n"


def _profile(folder: Path, int8: str) -> Path:
    """host-cpu with fast measurements and ``[quantize] int8 = <int8>``."""
    text = Path(load_profile("host-cpu").source).read_text()
    head = text[:text.index("[measure]")].replace('name = "host-cpu"', f'name = "int8-{int8}"')
    path = folder / f"int8-{int8}.toml"
    path.write_text(head + FAST_MEASURE + f'[quantize]\nint8 = "{int8}"\nreason = "test"\n')
    return path


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real `hwprune search --quantize int8` on a trained tiny CNN with calibration data."""
    out = tmp_path_factory.mktemp("int8-search")
    run_cli("search", "--model", "tiny_subject:tiny_cnn_trained", "--device", str(_profile(out, "measure")),
            "--quantize", "int8", "--memory-budget-mb", "0.6x", "--trials", "7", "--final-finetune-steps", "5",
            "--final-candidates", "1", "--trial-finetune-steps", "0", "--out", str(out), "--study", "q",
            *GUARD_OFF_ARGS, check=True)
    return out / "q"


def test_trials_and_pareto_carry_their_precision(int8_run: Path) -> None:
    import pandas as pd

    trials = pd.read_csv(int8_run / "trials.csv")
    done = trials[trials["state"] == "COMPLETE"]
    assert set(done["precision"]) >= {"fp32", "int8"}  # the uniform warm start is FP32, the INT8 anchors INT8
    uniform = done[done["uniform_ratio"].notna()]
    assert not uniform.empty and (uniform["precision"] == "fp32").all()
    assert all(set(json.loads(r)) <= {"stem.0", "branch_a.0", "branch_b.0"} for r in done["ratios"])  # no precision
    summary = load_summary(int8_run)
    assert summary["request"]["quantize"] == "int8"
    # a 0.6x memory budget excludes the dense FP32 model, so INT8 stays searched: no FP32 lock, whatever INT8 measured
    request = summary["request"]
    assert request["dense_memory_mb"] > request["memory_budget_mb"] > 0
    assert summary["search"].get("int8_fp32_lock") is None and not trials["precision_locked"].any()
    pareto = pd.read_csv(int8_run / "pareto.csv")
    labels = {m["trial"]: m["precision"]["label"] for m in summary["pareto"]}
    assert dict(zip(pareto["trial"], pareto["precision"])) == labels
    assert any(label != "fp32" for label in labels.values())


def test_deployed_int8_file_remeasures_within_budget_and_scores_through_ort(int8_run: Path) -> None:
    summary = load_summary(int8_run)
    model = next(m for m in summary["pareto"] if m["precision"]["label"] != "fp32")
    p = model["precision"]
    assert p["mode"] == "static" and p["calibration"]["source"] == "calibration_data"
    assert p["output_check"]["relative_error"] < 0.25 and p["weight_bytes"] < p["fp32_weight_bytes"]
    onnx_path = int8_run / model["files"]["onnx"]["path"]
    assert {"onnx_fp32", "calibration"} <= set(model["files"])
    calibration = json.loads((int8_run / model["files"]["calibration"]["path"]).read_text())
    assert calibration["precision"] == p["nodes"]
    assert p["reduce_range"] is calibration["reduce_range"] is reduce_range("host-cpu")  # as this CPU needs
    graph = onnx.load(str(onnx_path)).graph
    weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert len(weights) == sum(v == "int8" for v in p["nodes"].values())
    top = max(int(np.abs(onnx.numpy_helper.to_array(t).astype(int)).max()) for t in weights)
    assert top <= 64 if p["reduce_range"] else top == 127
    # the deployed file, measured again by the CLI, holds the memory budget it was listed under
    measured = json.loads(run_cli("measure", str(onnx_path), "--json", check=True).stdout)
    budget = summary["request"]["memory_budget_mb"]
    assert measured["memory"]["total_mb"] == pytest.approx(model["memory_mb"]["total"], rel=1e-6)
    assert measured["memory"]["total_mb"] <= budget
    # its accuracy is the INT8 file's through ONNX Runtime (after the final fine-tune it was re-quantized)
    subject = tiny_cnn_trained()
    assert evaluate_onnx(onnx_path, subject.evaluate) == pytest.approx(model["accuracy"], abs=1e-9)


def test_failing_quantization_fails_only_that_trial(tmp_path: Path) -> None:
    # a profile whose [quantize] says search turns INT8 on without --quantize; a tolerance no INT8 file keeps makes
    # every INT8 candidate fail with its reason, and the study goes on with the FP32 ones
    model, example, evaluate = __import__("tiny_subject").tiny_cnn()
    result = hwprune.search(model, str(_profile(tmp_path, "search")), example_inputs=example, evaluate=evaluate,
                            trials=5, out=tmp_path, study="fail", quantize_tolerance=1e-9,
                            memory_budget_mb="0.9x", **GUARD_OFF)
    summary = load_summary(result.run_dir)
    assert summary["request"]["quantize"] == "int8"
    reasons = [f["reason"] for f in summary["search"]["failures"]]
    assert reasons and all("INT8 outputs moved too far" in r and "tolerance 1e-09" in r for r in reasons)
    assert summary["search"]["trials_complete"] >= 3
    assert all(m["precision"]["label"] == "fp32" for m in summary["pareto"])


def test_int8_on_a_refusing_profile_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = run_cli("search", "--model", "tiny_subject:tiny_cnn", "--device", "host-cpu-tvm", "--allow-untuned",
                   "--quantize", "int8", "--trials", "1", "--out", str(tmp_path), *GUARD_OFF_ARGS)
    assert proc.returncode == 2, proc.stderr
    assert "Relax ONNX importer" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "tiny_cnn-host-cpu-tvm").exists()
    bad = run_cli("search", "--model", "tiny_subject:tiny_cnn", "--quantize", "fp16", "--trials", "1",
                  "--out", str(tmp_path))
    assert bad.returncode == 2 and "quantize: 'fp16' is not one of off, int8" in bad.stderr


def test_nothing_to_calibrate_refuses_explicit_int8_and_falls_back_from_the_default(tmp_path: Path) -> None:
    torch.manual_seed(0)
    blind = {"example_inputs": torch.zeros(1, 3, 32, 32), "evaluate": lambda m: 0.5, "trials": 1, **GUARD_OFF}
    with pytest.raises(QuantizationError, match="nothing to calibrate INT8 quantization on"):
        hwprune.search(TinyNet().eval(), str(_profile(tmp_path, "measure")), out=tmp_path, study="a",
                       quantize="int8", **blind)
    result = hwprune.search(TinyNet().eval(), str(_profile(tmp_path, "search")), out=tmp_path, study="b", **blind)
    assert load_summary(result.run_dir)["request"]["quantize"] == "off"  # FP32 only, with a warning


def test_precision_params_and_signatures() -> None:
    ratios, choice = split_params({"stem.0": 0.5, "precision:stem.0": "int8", "precision:head.2": "fp32"})
    assert ratios == {"stem.0": 0.5} and choice == {"stem.0": "int8", "head.2": "fp32"}
    assert signature_with("abc", {"head.2": "fp32"}) == "abc"  # an FP32 candidate is the architecture itself
    assert signature_with("abc", choice) != signature_with("abc", {"head.2": "int8"}) != "abc"


def _int8_model(summary: dict) -> dict:
    """The listed model with the most INT8 nodes."""
    return max(summary["pareto"], key=lambda m: sum(p == "int8" for p in (m["precision"].get("nodes") or {}).values()))


def test_report_marks_int8_layers_and_profiles_the_quantized_file(int8_run: Path) -> None:
    from hwprune.report import plots
    from hwprune.report.data import load_run

    run = load_run(int8_run)
    model = _int8_model(run.summary)
    run.summary["recommended"] = model["trial"]  # the report of a run whose recommended model is INT8
    units, int8 = model["precision"]["units"], plots.int8_layers(model)
    layer_units = [w for w in model["widths"] if w in units]
    assert layer_units and any(units[w] == "int8" for w in layer_units)
    assert all((w in int8) == (units[w] == "int8") for w in layer_units)
    marked = plots.widths_plot(run)
    model["precision"] = {"label": "fp32", "units": {}}  # the same widths without precision: the plot must differ
    assert marked is not None and plots.widths_plot(run) != marked
    # the per-node breakdown is the deployed INT8 file's: ORT's quantized ops, not the FP32 source's Conv nodes
    profile = json.loads((int8_run / model["files"]["node_latency"]["path"]).read_text())
    ops = {n["op_type"] for n in profile["nodes"]}
    assert ops & {"QLinearConv", "QuantizeLinear", "DequantizeLinear", "ConvInteger"}, ops


def test_node_section_says_the_int8_profile_is_the_quantized_files(int8_run: Path) -> None:
    from hwprune.report import sections
    from hwprune.report.data import load_run

    run = load_run(int8_run)
    run.summary["recommended"] = _int8_model(run.summary)["trial"]
    text = " ".join(getattr(b, "text", "") for b in sections._node_section(run).blocks)
    assert "profiled as its deployed quantized file" in text
    run.summary["recommended"] = next((m["trial"] for m in run.pareto if m["precision"]["label"] == "fp32"), None)
    if run.summary["recommended"] is not None:
        section = sections._node_section(run)
        assert section is None or "deployed quantized file" not in " ".join(getattr(b, "text", "")
                                                                            for b in section.blocks)


def test_agreement_of_an_int8_model_is_its_quantized_files_through_ort(int8_run: Path) -> None:
    from hwprune.quant.evaluate import OrtModule
    from hwprune.recovery import RecoveryPlan, agreement
    from hwprune.study.finalists import add_agreement
    from hwprune.study.records import ModelRecord
    from hwprune.study.result import ParetoModel

    model = _int8_model(load_summary(int8_run))
    onnx_path = int8_run / model["files"]["onnx"]["path"]
    module = torch.load(int8_run / model["files"]["module"]["path"], weights_only=False)
    with torch.no_grad():
        for p in module.parameters():  # the module says class 0 for every input: the file must be what is scored
            p.zero_()
    subject, ort = tiny_cnn_trained(), OrtModule(onnx_path)
    with torch.no_grad():
        heldout = [(x, ort(x)) for x, _ in subject.calibration_data[:2]]  # the INT8 file's own outputs
        seen = [(x, subject.model(x)) for x, _ in subject.calibration_data[2:4]]  # the dense FP32 model's
    assert agreement(module, heldout) < 1.0  # the FP32 module would not give the file's answer
    pm = ParetoModel(model["trial"], ModelRecord.from_dict(model), int8_run, module)
    add_agreement(pm, RecoveryPlan("inputs", "inputs", batches=seen, heldout=heldout))
    assert pm.entry.agreement == {"heldout": 1.0, "recovery_inputs": agreement(ort, seen)}


DENSE_MB = 3.3  # the dense FP32 model's memory in the lock tests


def _lock_study(slowdown: float, memory_budget: float | None) -> optuna.Study:
    """A real in-memory study as a search leaves it after its warm start: an FP32 uniform trial and the two INT8
    anchors (the unpruned one measured beside the dense model, the other twin of the FP32 one), ``slowdown`` x."""
    from optuna.distributions import FloatDistribution

    from hwprune.study import attrs

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    study.set_user_attr(attrs.REQUEST, {"memory_budget_mb": memory_budget, "dense_memory_mb": DENSE_MB})
    dist = {"g": FloatDistribution(0.0, 0.8)}

    def add(ratio: float, sig: str, latency: float, user: dict) -> None:
        study.add_trial(optuna.trial.create_trial(params={"g": ratio}, distributions=dist, values=[0.9, latency, 1.0],
                                                  user_attrs={attrs.SIGNATURE: sig, **user}))
    add(0.5, "a", 2.0, {attrs.UNIFORM_RATIO: 0.5, attrs.LATENCY_RATIO: 0.5})
    add(0.0, "dense-int8-x", 4.0 * slowdown, {attrs.INT8_ANCHOR: 0.0, attrs.LATENCY_RATIO: slowdown,
                                               attrs.PRECISION: "int8"})
    add(0.5, "a-int8-y", 2.0 * slowdown, {attrs.INT8_ANCHOR: 0.5, attrs.LATENCY_RATIO: 0.5 * slowdown,
                                          attrs.PRECISION: "int8"})
    return study


@pytest.mark.parametrize("memory_budget", [None, 64.0], ids=["no-memory-budget", "budget-the-dense-model-meets"])
def test_int8_slower_than_fp32_locks_the_sampler_to_fp32_only_where_no_memory_budget_binds(
        memory_budget: float | None) -> None:
    from hwprune.study.precision import FP32_LOCK, INT8_SLOWER, PRECISION_LOCKED, QuantSearch, fp32_lock

    quant = QuantSearch(units={"g": ("/g/Conv",), "head": ("/head/Gemm",)}, groups={}, calibration=None)  # type: ignore[arg-type]
    # host-cpu's default 64 MB budget against a 3.3 MB dense model binds nothing: before this case was told apart,
    # the profile default kept the lock off in every host-cpu search
    study = _lock_study(3.0, memory_budget)
    trial = study.ask()
    assert quant.suggest(trial) == {"g": "fp32", "head": "fp32"} and trial.user_attrs[PRECISION_LOCKED]
    assert not any(k.startswith("precision:") for k in trial.params)  # no parameter left for the sampler
    assert study.user_attrs[FP32_LOCK] == {"after_trial": 2, "slowdown": {1: 3.0, 2: 3.0}, "threshold": INT8_SLOWER}
    assert fp32_lock(study) == study.user_attrs[FP32_LOCK]
    # a memory budget under the dense model: INT8 may be what meets it, so it stays searched; so it does when INT8 is
    # within the noise
    for study in (_lock_study(3.0, DENSE_MB / 2), _lock_study(1.1, None)):
        trial = study.ask()
        assert fp32_lock(study) is None and PRECISION_LOCKED not in trial.user_attrs
        assert set(quant.suggest(trial)) == {"g", "head"} and "precision:g" in trial.params


def test_gemm_anchor_puts_only_the_dense_layers_in_int8_and_runs_under_the_lock() -> None:
    from optuna.distributions import FloatDistribution

    from hwprune.study import attrs
    from hwprune.study.precision import QuantSearch

    units = {"g": ("/g/Conv",), "head.1": ("/head/head.1/Gemm",), "head.3": ("/head/head.3/Gemm",)}
    quant = QuantSearch(units=units, groups={}, calibration=None, gemm_units=frozenset({"head.1", "head.3"}))  # type: ignore[arg-type]
    study = _lock_study(3.0, None)  # INT8 everywhere ran 3x its FP32 twins: the sampler is locked to FP32
    dist = FloatDistribution(0.0, 0.8)
    quant.enqueue_anchors(study, lambda r: {"g": r}, 0.8)
    queued = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.WAITING]
    assert sum(attrs.GEMM_ANCHOR in t.user_attrs for t in queued) == 1
    while True:  # run the queue: the INT8-everywhere anchors are in the fixture already, skip_if_exists drops them
        trial = study.ask({"g": dist})
        if attrs.GEMM_ANCHOR in trial.user_attrs:
            break
        study.tell(trial, [0.9, 1.0, 1.0])
    # the lock holds the sampler's trials, not the anchor that tests whether the Gemms alone pay
    assert trial.params["g"] == 0.0  # the unpruned model
    assert quant.suggest(trial) == {"g": "fp32", "head.1": "int8", "head.3": "int8"}
    # without both kinds of units there is nothing to split: no such anchor
    only_gemm = QuantSearch(units={"head.1": units["head.1"]}, groups={}, calibration=None,  # type: ignore[arg-type]
                            gemm_units=frozenset({"head.1"}))
    fresh = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    only_gemm.enqueue_anchors(fresh, lambda r: {"g": r}, 0.8)
    assert not any(attrs.GEMM_ANCHOR in t.user_attrs for t in fresh.get_trials(deepcopy=False))
