"""Study identity: a resumed study refuses another model's trials, announces changed budgets, and writes nothing
into a run folder that belongs to another model before refusing."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import hwprune
from conftest import GUARD_OFF
from hwprune.errors import HwpruneError

QUICK = {**GUARD_OFF, "trial_finetune_steps": 0, "final_finetune_steps": 0, "channel_multiple": 8}


def test_another_model_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from tiny_subject import tiny_resnet

    first = hwprune.search("tiny_subject:tiny_cnn", "host-cpu", latency_budget_ms="2x", trials=1, out=tmp_path,
                           study="shared", **QUICK)
    assert first.summary["request"]["fingerprint"]["architecture"]
    files = {p: p.read_bytes() for p in (first.run_dir / "request.json", first.run_dir / "dense" / "model.onnx")}
    with pytest.raises(HwpruneError, match="was made for another model architecture.*cannot be resumed.*--study NEW"):
        hwprune.search(tiny_resnet, "host-cpu", latency_budget_ms="2x", trials=2, out=tmp_path, study="shared",
                       **QUICK)
    assert all(p.read_bytes() == data for p, data in files.items())  # the other model's run folder is untouched
    with pytest.raises(HwpruneError, match="cannot be resumed by this model"):  # not even when asked to
        hwprune.search(tiny_resnet, "host-cpu", latency_budget_ms="2x", trials=2, out=tmp_path, study="shared",
                       resume_changed=True, **QUICK)


def test_other_weights_resume_only_when_asked(tmp_path: Path) -> None:
    import torch
    from tiny_subject import tiny_cnn

    def retrained():  # the same architecture with other weights, as after a night of training
        model, x, evaluate = tiny_cnn()
        with torch.no_grad():
            model.stem[0].weight.mul_(1.5)
        return model, x, evaluate

    kw = dict(latency_budget_ms="2x", out=tmp_path, study="weights", **QUICK)
    first = hwprune.search("tiny_subject:tiny_cnn", "host-cpu", trials=1, **kw)
    with pytest.raises(HwpruneError, match=r"another model \(its weights differ\).*--resume-changed"):
        hwprune.search(retrained, "host-cpu", trials=2, **kw)
    again = hwprune.search(retrained, "host-cpu", trials=2, resume_changed=True, **kw)
    assert again.summary["search"]["trials_complete"] == 2  # the first run's trial is kept
    fp = again.study.user_attrs["fingerprint"]
    assert fp == again.summary["request"]["fingerprint"] and fp["weights"] != first.summary["request"][
        "fingerprint"]["weights"]


def test_changed_budgets_are_announced_and_each_trial_keeps_its_own(tmp_path: Path) -> None:
    lines: list[str] = []
    kw = dict(out=tmp_path, study="budgets", **QUICK)
    hwprune.search("tiny_subject:tiny_cnn", "host-cpu", latency_budget_ms="2x", trials=1, **kw)
    import logging

    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("hwprune").addHandler(handler)
    logging.getLogger("hwprune").setLevel(logging.INFO)
    try:
        result = hwprune.search("tiny_subject:tiny_cnn", "host-cpu", latency_budget_ms="3x", trials=2, **kw)
    finally:
        logging.getLogger("hwprune").removeHandler(handler)
    assert any("budgets changed since the study's last run" in line and "2x" in line and "3x" in line
               for line in lines), lines
    trials = pd.read_csv(result.run_dir / "trials.csv")
    judged = [json.loads(j)["latency_ms"] for j in trials["judged_by"].dropna()]
    # each trial keeps the budget in ms it was judged by: 2x, then 3x, of the dense latency measured in its run
    assert len(judged) == 2 and all(j > 0 for j in judged) and judged[0] != judged[1]
    assert judged[1] == pytest.approx(3 * result.summary["dense"]["latency_ms"]["median"], rel=0.5)
