"""The accuracy guard and recovery without user data, on a small BatchNorm CNN that really learns
(tests/accuracy_subject.py): pruned uniformly by 0.7 it scores 0.30 with the dense model's BatchNorm statistics."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import accuracy_subject as quad
import hwprune
from conftest import load_summary, run_cli
from hwprune.config import AccuracyGuard
from hwprune.errors import HwpruneError, SubjectError
from hwprune.pruning import prune
from hwprune.recovery import (HELDOUT_EVERY, agreement, batchnorm_layers, capture_inputs, plan_recovery, recover,
                              synthesize_inputs)
from hwprune.subjects.loader import load_subject
from hwprune.train import accuracy

EXAMPLE = (torch.zeros(1, 3, quad.SIZE, quad.SIZE),)
HELDOUT = [(quad.HELDOUT[0], quad.HELDOUT[1])]


@pytest.mark.parametrize("text, value, relative, floor", [
    ("5%", 0.05, True, 0.95), ("1%", 0.01, True, 0.99), ("0.02", 0.02, False, 0.98), (0.1, 0.1, False, 0.9),
    ("0", 0.0, False, 1.0)])
def test_accuracy_guard_parses_absolute_and_relative_drops(text, value, relative, floor) -> None:
    guard = AccuracyGuard.parse(text)
    assert guard is not None and guard.value == pytest.approx(value) and guard.relative is relative
    assert guard.floor(1.0) == pytest.approx(floor)


@pytest.mark.parametrize("text", ["off", "none", None])
def test_accuracy_guard_switches_off(text) -> None:
    assert AccuracyGuard.parse(text) is None


@pytest.mark.parametrize("text", ["abc", "-0.1", "100%", "5 %%", True])
def test_bad_accuracy_guard_is_one_line(text) -> None:
    with pytest.raises(HwpruneError, match="max accuracy drop"):
        AccuracyGuard.parse(text)


def test_bad_guard_on_the_command_line_exits_2() -> None:
    proc = run_cli("search", "--model", "accuracy_subject:minimal", "--max-accuracy-drop", "lots", "--trials", "1")
    assert proc.returncode == 2 and "max accuracy drop" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return quad.trained()


def test_recorded_inputs_recover_a_collapsed_model(model: nn.Module) -> None:
    score, recorded = capture_inputs(model, quad.evaluate)
    assert score == quad.evaluate(model) and sum(x.shape[0] for x in recorded) == quad.VAL[0].shape[0]
    assert torch.equal(torch.cat(recorded), quad.VAL[0])  # exactly what evaluate fed the model, in order
    # a capped recording samples chunks from the whole evaluation, not its first batches (a set sorted by class)
    def sixteen_batches(m: nn.Module) -> float:
        for k in range(16):
            m(torch.full((64, 3, quad.SIZE, quad.SIZE), float(k)))
        return 0.0

    _, capped = capture_inputs(model, sixteen_batches, max_samples=4 * 64)
    firsts = [float(x[0, 0, 0, 0]) for x in capped]
    assert len(capped) == 4 and firsts == sorted(firsts) and max(firsts) >= 4  # in order, from beyond the first 4
    plan = plan_recovery(model, EXAMPLE, recorded, "auto")
    assert plan.method == "inputs" and plan.leak and plan.active
    # every HELDOUT_EVERY-th chunk of 64 samples is held out, never used for recovery
    assert plan.heldout_samples == 512 // 64 // HELDOUT_EVERY * 64 and plan.samples == 512 - plan.heldout_samples
    held_ids = {id(x) for x, _ in plan.heldout}
    assert not held_ids & {id(x) for x, _ in plan.batches}

    space = hwprune.PruningSpace.build(model, EXAMPLE, channel_multiple=8, max_ratio=0.85)
    pruned = prune(model, EXAMPLE, space.uniform(0.7), space).module
    raw = accuracy(pruned, HELDOUT)
    torch.manual_seed(0)
    recovered = recover(copy.deepcopy(pruned), plan, steps=30)
    assert raw < 0.6  # stale BatchNorm statistics
    assert accuracy(recovered, HELDOUT) > 0.9 > raw  # on images nothing in the recovery saw
    assert agreement(recovered, plan.heldout) > 0.9 and agreement(pruned, plan.heldout) < 0.6


def test_synthetic_inputs_match_the_batchnorm_statistics(model: nn.Module) -> None:
    def mismatch(x: torch.Tensor) -> float:
        stats: list[float] = []
        hooks = [bn.register_forward_pre_hook(lambda m, a: stats.append(
            float((a[0].mean((0, 2, 3)) - m.running_mean).norm() + (a[0].var((0, 2, 3)) - m.running_var).norm())))
            for bn in batchnorm_layers(model)]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        return sum(stats)

    noise = torch.randn(32, 3, quad.SIZE, quad.SIZE, generator=torch.Generator().manual_seed(0))
    (synthetic,) = synthesize_inputs(model, EXAMPLE, samples=32, steps=40, batch=32)
    assert synthetic.shape == noise.shape and mismatch(synthetic) < 0.5 * mismatch(noise)
    # auto falls back on them when evaluate fed the model nothing it could record
    plan = plan_recovery(model, EXAMPLE, [], "auto")
    assert plan.method == "synthetic" and not plan.leak and plan.samples > 0


def test_recovery_that_cannot_be_done_is_a_subject_error() -> None:
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * quad.SIZE * quad.SIZE, 4)).eval()
    with pytest.raises(SubjectError, match="no BatchNorm"):
        plan_recovery(mlp, EXAMPLE, [], "synthetic")
    with pytest.raises(SubjectError, match="usable samples"):
        plan_recovery(mlp, EXAMPLE, [torch.zeros(4, 3, quad.SIZE, quad.SIZE)], "inputs")
    assert not plan_recovery(mlp, EXAMPLE, [], "none").active


def test_minimal_form_module_gets_recovered_and_guarded(tmp_path: Path, model: nn.Module) -> None:
    """An nn.Module given straight to hwprune.search with example_inputs and evaluate, and no data at all."""
    result = hwprune.search(model, "host-cpu", example_inputs=EXAMPLE[0], evaluate=quad.evaluate,
                            memory_budget_mb="0.5x", trials=4, out=tmp_path, study="minimal", max_ratio=0.8,
                            trial_finetune_steps=10, final_finetune_steps=30, final_candidates=1)
    s = result.summary
    assert s["recovery"]["method"] == "inputs" and s["recovery"]["leak"] is True
    guard = s["accuracy_guard"]
    assert guard["max_drop"] == "5%" and guard["floor"] == pytest.approx(0.95 * s["dense"]["accuracy"])
    assert guard["judged_on"] == "accuracy after the final fine-tune" and guard["met"] is True
    rec = result.recommended
    assert rec is not None and rec.accuracy >= guard["floor"] and rec.record["meets"]["accuracy"]
    assert rec.record["accuracy_retention"] == pytest.approx(rec.accuracy / s["dense"]["accuracy"])
    assert rec.record["agreement"]["heldout"] is not None
    assert accuracy(rec.module, HELDOUT) > 0.9  # the answer holds on data nothing in the search saw
    report = (result.run_dir / "report.md").read_text()
    assert "No data was given" in report and "kept" in report and "Accuracy guard" in report


def test_without_recovery_a_collapsed_search_refuses_with_exit_3(tmp_path: Path) -> None:
    """No data, no recovery: every model within a tight memory budget lost its BatchNorm statistics; the guard
    refuses them with one line naming the best accuracy reached, and the run folder and report are written."""
    proc = run_cli("search", "--model", "accuracy_subject:minimal", "--memory-budget-mb", "0.3x",
                   "--latency-budget-ms", "100", "--recovery", "none", "--trials", "4", "--max-ratio", "0.85",
                   "--out", str(tmp_path), "--study", "collapse", "--no-depth")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "no model within the budgets kept the accuracy guard" in last and "give calibration/training data" in last
    run = tmp_path / "collapse"
    s = load_summary(run)
    assert s["recommended"] is None and s["accuracy_guard"]["best_within_budgets"]["accuracy"] < s[
        "accuracy_guard"]["floor"]
    assert s["accuracy_guard"]["judged_on"] == "trial accuracy" and (run / "report.html").is_file()
    assert "No model kept the accuracy guard" in (run / "report.md").read_text()


def test_data_as_a_file_or_a_fourth_element(tmp_path: Path) -> None:
    x, y = quad.quadrant_images(256, seed=15)
    good = tmp_path / "data.npz"
    np.savez(good, inputs=x.numpy(), targets=y.numpy())
    subject = load_subject("accuracy_subject:with_data")
    assert subject.train_data is not None and len(list(subject.train_data)) == 8  # 512 pairs in batches of 64
    assert load_subject("accuracy_subject:named_dict").name == "quadrants"  # a dict may name itself
    bad = tmp_path / "bad.npz"
    np.savez(bad, inputs=np.zeros((8, 3, 32, 32), np.float32))
    proc = run_cli("search", "--model", "accuracy_subject:minimal", "--data", str(bad), "--trials", "1",
                   "--out", str(tmp_path))
    last = proc.stderr.strip().splitlines()[-1]  # after the progress lines: one line, what is wrong
    assert proc.returncode == 2 and last.startswith("hwprune: error: data:") and "do not match the example" in last
    assert "Traceback" not in proc.stderr
    proc = run_cli("search", "--model", "accuracy_subject:minimal", "--data", str(good), "--trials", "2",
                   "--memory-budget-mb", "0.6x", "--latency-budget-ms", "100", "--final-finetune-steps", "10",
                   "--trial-finetune-steps", "5", "--out", str(tmp_path), "--study", "given")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = load_summary(tmp_path / "given")
    assert s["recovery"]["method"] == "data" and s["request"]["data"] == str(good)
    assert "No data was given" not in proc.stdout and "accuracy guard:" in proc.stdout


def test_inputs_recorded_from_keyword_calls_recover_like_positional_ones() -> None:
    """An evaluate that calls ``m(x=...)`` (as Hugging Face evaluators do) is recorded as keyword inputs, which
    re-calibration and distillation must pass back as keywords."""

    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
            return self.fc(self.bn(self.conv(x)).mean((2, 3)))

    model = Keyword().eval()
    data = torch.randn(128, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    _, recorded = capture_inputs(model, lambda m: float(m(x=data).sum()))
    assert isinstance(recorded[0], dict) and torch.equal(recorded[0]["x"], data[:64])
    plan = plan_recovery(model, (data[:1],), recorded, "inputs")
    copy_ = copy.deepcopy(model)
    copy_.bn.running_mean.fill_(5.0)  # stale statistics, as after pruning
    recover(copy_, plan, steps=2)
    assert copy_.bn.running_mean.abs().max() < 5.0  # re-calibrated on the recorded keyword inputs
