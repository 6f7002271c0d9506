"""Deployment reports built from a small real search: numbers, checksums, the ONNX snippet, rebuilds, comparisons.

One real search (a tiny conv net, a few trials) is shared by every test in this file and by test_report_browser.py
(see :func:`real_run`). Tests that change a run folder work on a copy.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from hwprune.report import build_comparison, build_report, compare_runs
from hwprune.report.render import (
    fmt_bytes, fmt_count, fmt_int, fmt_mb, fmt_metric, fmt_ms, fmt_x, judged_cell, latency_cell, metric_cell,
    model_cell, sig,
)
from hwprune.report.data import load_run
from hwprune.report.format import fmt_s
from hwprune.errors import HwpruneError
from conftest import run_cli
from report_helpers import _unmark, find_table, html_tables, md_tables, real_run, row_of, tiny_factory  # noqa: F401

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return real_run(tmp_path_factory)


@pytest.fixture(scope="module")
def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def md(run_dir: Path) -> str:
    return (run_dir / "report.md").read_text()


@pytest.fixture(scope="module")
def html_text(run_dir: Path) -> str:
    return (run_dir / "report.html").read_text()


# ---------------------------------------------------------------------------------------------------------------------
# tests


def test_search_wrote_the_report(run_dir: Path, summary: dict[str, Any], html_text: str) -> None:
    assert summary["recommended"] is not None, "the tiny search should find a feasible model"
    for name in ("report.html", "report.md", "report_files/pareto.png", "report_files/widths.png",
                 "report_files/hypervolume.png", "report_files/node_latency.png"):
        assert (run_dir / name).is_file(), name
    # self-contained: no script, every image inline, no reference to anything outside the page
    assert "<script" not in html_text.lower()
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", html_text), "external reference in the HTML"
    assert not re.search(r"url\(", html_text), "CSS must not load anything"
    assert html_text.count('src="data:image/png;base64,') == 4
    md_text = (run_dir / "report.md").read_text()
    for png in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md_text):
        assert not Path(png).is_absolute() and (run_dir / png).is_file(), png


def test_html_and_markdown_show_the_same_tables(md: str, html_text: str) -> None:
    mt, ht = md_tables(md), html_tables(html_text)
    assert len(mt) == len(ht) and len(mt) >= 8
    for m, h in zip(mt, ht):
        assert [[_unmark(c) for c in row] for row in m] == h


def test_answer_numbers_equal_summary_and_pareto_csv(run_dir: Path, summary: dict[str, Any], md: str) -> None:
    run = load_run(run_dir)
    tables = md_tables(md)
    speed = find_table(tables, "Model", "accuracy", "accuracy (search proxy)", "Latency", "Own median")
    size = find_table(tables, "Model", "Memory", "Weights", "Peak activations")
    records = [summary["dense"]] + summary["pareto"]
    assert len(speed) == len(size) == len(records)
    for r in records:
        s, z = row_of(speed, model_cell(r)), row_of(size, model_cell(r))
        assert s["accuracy"] == metric_cell(run, r)
        assert s["accuracy"].startswith(fmt_metric(r["accuracy"]) + " (")
        assert s["accuracy (search proxy)"] == fmt_metric(r["accuracy_proxy"])
        # measured on ORT: no "estimated"/"untuned" flag; "noisy" only when the host was too busy to measure cleanly
        noisy = " (noisy)" if r["latency_ms"]["noisy"] else ""
        assert s["Latency"] == judged_cell(r) == fmt_ms(r["latency_ms"]["judged"]) + noisy
        assert s["Own median"] == latency_cell(r) == fmt_ms(r["latency_ms"]["median"]) + noisy
        assert s["Own p90"] == fmt_ms(r["latency_ms"]["p90"]) + noisy
        assert s["Spread (std, min)"] == f"± {sig(r['latency_ms']['std'])} ms (min {sig(r['latency_ms']['min'])})"
        assert s["Speedup"] == fmt_x(r["speedup"]) + noisy
        assert z["Memory"] == fmt_mb(r["memory_mb"]["total"])
        assert z["Weights"] == fmt_mb(r["memory_mb"]["weights"])
        assert z["Peak activations"] == fmt_mb(r["memory_mb"]["peak_activations"])
        assert z["Parameters"] == fmt_int(r["params"])
        assert z["Size ratio"] == fmt_x(r["size_ratio"])
        assert z["MACs"] == fmt_count(r["macs"])
        assert z["ONNX file"] == fmt_bytes(r["file_bytes"])
        assert s["Meets latency budget"] == ("yes" if r["meets"]["latency"] else "**NO**")
        # the host-cpu profile's default memory budget applies (64 MB), as the API applies it
        assert z["Meets memory budget"] == ("yes" if r["meets"]["memory"] else "**NO**")
    # the recommended model is labelled, fine-tuned, and its final accuracy is not called a proxy
    rec = next(r for r in summary["pareto"] if r["recommended"])
    assert row_of(speed, model_cell(rec))["accuracy"].endswith("(fine-tuned, 2 steps)")
    # pareto.csv holds the same numbers as summary.json, so the report equals both
    csv = pd.read_csv(run_dir / "pareto.csv")
    assert sorted(csv["trial"]) == sorted(r["trial"] for r in summary["pareto"])
    for _, c in csv.iterrows():
        s, z = row_of(speed, model_cell({"trial": int(c["trial"]), "recommended": bool(c["recommended"])})), \
            row_of(size, model_cell({"trial": int(c["trial"]), "recommended": bool(c["recommended"])}))
        assert s["accuracy (search proxy)"] == fmt_metric(c["accuracy_proxy"])
        noisy = " (noisy)" if c["latency_noisy"] else ""
        assert s["Latency"] == fmt_ms(c["latency_ms_judged"]) + noisy
        assert s["Own median"] == fmt_ms(c["latency_ms_median"]) + noisy
        assert s["Own p90"] == fmt_ms(c["latency_ms_p90"]) + noisy
        assert s["Speedup"] == fmt_x(c["speedup"]) + noisy
        assert z["Memory"] == fmt_mb(c["memory_mb_total"])
        assert z["Parameters"] == fmt_int(c["params"])
        assert z["MACs"] == fmt_count(c["macs"])


def test_request_and_health_numbers(run_dir: Path, summary: dict[str, Any], md: str) -> None:
    req, srch = summary["request"], summary["search"]
    settings = {r["Setting"]: r["Value"] for r in find_table(md_tables(md), "Setting", "Value")}
    assert settings["Latency budget"].startswith(f"{sig(req['latency_budget_ms'])} ms (typed `0.9x`")
    # no memory budget was given: host-cpu's default applies (64 MB in its [budgets])
    assert req["memory_budget_mb"] == 64.0 and settings["Memory budget"].startswith(f"{sig(64.0)} MB")
    assert settings["Trials"] == "5" and settings["Seed"] == "0"
    assert settings["Model"] == "`tiny_factory`" and settings["Device profile"].startswith("`host-cpu`")
    assert _unmark(settings["Hardware (from the profile)"]).startswith(req["profile"]["hardware"]["cpu"] + ";")
    for package in ("hwprune", "torch", "onnxruntime", "optuna"):
        assert f"{package} {req['versions'][package]}" in _unmark(settings["Software"])
    lang = "python" if req["command"].startswith("hwprune.search(") else "bash"
    assert f"```{lang}\n{req['command']}\n```" in md
    counts = {r["Trials"]: r["Count"] for r in find_table(md_tables(md), "Trials", "Count")}
    assert counts["Completed trials"] == str(srch["trials_complete"])
    assert counts["Failed trials"] == str(srch["trials_failed"])
    assert counts["of which reused an earlier measurement (cached)"] == str(srch["trials_cached"])
    assert counts["Device time measuring (board-seconds, for the measurements of this run)"] == (
        f"{fmt_s(srch['board_seconds'])} for {srch['measurements']:,} measurements") and srch["board_seconds"] > 0
    stages = {_unmark(r["Stage"]): r["Seconds"] for r in find_table(md_tables(md), "Stage", "Seconds")}
    assert set(stages) == set(srch["stage_seconds"]) and "final_finetune" in stages
    # the measurement conditions, and "a model's own median is over N runs after M warm-ups"
    m = summary["measurement"]
    assert f"own median and p90 are over {m['repeats']} timed runs after {m['warmup']} untimed warm-up runs" in md
    cond = {r["Condition"]: r["Value"] for r in find_table(md_tables(md), "Condition", "Value")}
    assert cond["Warm-up runs / timed runs"] == f"{m['warmup']} / {m['repeats']}"
    assert cond["Threads"] == str(m["threads"]) and cond["Latency source"] == "measured on the device"
    trials = find_table(md_tables(md), "Trial", "State")
    csv = pd.read_csv(run_dir / "trials.csv")
    assert [int(t["Trial"]) for t in trials] == list(csv["trial"])
    for t, (_, c) in zip(trials, csv.iterrows()):
        if c["state"] == "COMPLETE":
            assert (t["accuracy (proxy)"], t["Latency"], t["Own median"], t["Memory"]) == \
                (fmt_metric(c["accuracy"]), fmt_ms(c["latency_judged_ms"]), fmt_ms(c["latency_ms"]),
                 fmt_mb(c["memory_mb"]))


def test_checksums_shown_match_the_files(run_dir: Path, summary: dict[str, Any], md: str) -> None:
    rows = find_table(md_tables(md), "Model", "File", "Path", "Size", "SHA-256", "Check")
    shown = {_unmark(r["Path"]): (_unmark(r["SHA-256"]), r["Check"]) for r in rows}
    expected = 0
    for r in [summary["dense"]] + summary["pareto"]:
        for rec in r["files"].values():
            expected += 1
            digest = hashlib.sha256((run_dir / rec["path"]).read_bytes()).hexdigest()
            assert shown[rec["path"]] == (digest, "ok")
            assert digest == rec["sha256"]
    assert len(rows) == expected
    assert f"All {expected} files match their recorded SHA-256." in md


def test_tampered_and_missing_artifacts_are_flagged(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    summary = json.loads((copy / "summary.json").read_text())
    rec = next(r for r in summary["pareto"] if r["recommended"])
    onnx = copy / rec["files"]["onnx"]["path"]
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    (copy / rec["files"]["weights"]["path"]).unlink()
    build_report(copy)
    md = (copy / "report.md").read_text()
    html_text = (copy / "report.html").read_text()
    assert "> **Warning:** 2 artifact file(s) do not match" in md  # at the top, in the summary
    assert "2 of " in md and "files do NOT match" in md
    rows = {_unmark(r["Path"]): r["Check"] for r in find_table(md_tables(md), "Model", "File", "Path")}
    assert rows[rec["files"]["onnx"]["path"]] == "**MISMATCH**"
    assert rows[rec["files"]["weights"]["path"]] == "**MISSING**"
    assert "MISMATCH" in html_text and 'class="callout warning"' in html_text


def test_onnx_snippet_runs_and_matches_the_model(run_dir: Path, summary: dict[str, Any], md: str,
                                                 tmp_path: Path) -> None:
    import onnxruntime as ort

    snippets = [b for b in re.findall(r"```python\n(.*?)```", md, flags=re.S) if "import onnxruntime" in b]
    assert len(snippets) == 1
    snippet = snippets[0]
    out = tmp_path / "out.npy"
    # the snippet as a user would paste it, plus one line that hands its output to the test
    script = snippet + f"\nnp.save({str(out)!r}, outputs[0])\n"
    proc = subprocess.run([sys.executable, "-c", script], cwd=run_dir, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rec = next(r for r in summary["pareto"] if r["recommended"])
    sess = ort.InferenceSession(str(run_dir / rec["files"]["onnx"]["path"]), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal(tuple(rec["input"]["shape"])).astype(rec["input"]["dtype"])
    expected = sess.run(None, {name: x})[0]
    assert proc.stdout.strip() == f"{name} {x.shape} {[expected.shape]}"
    got = np.load(out)
    np.testing.assert_array_equal(got, expected)
    # and the same outputs as the pruned PyTorch model the search saved next to it
    module = torch.load(run_dir / rec["files"]["module"]["path"], weights_only=False).eval()
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_rebuild_from_a_copied_folder_is_identical(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "moved-run"
    shutil.copytree(run_dir, copy)
    (copy / "study.db").unlink()  # the storage is not needed when trials.csv is there
    for p in (copy / "report.html", copy / "report.md"):
        p.unlink()
    shutil.rmtree(copy / "report_files")
    paths = build_report(copy)
    assert [p.name for p in paths[:2]] == ["report.html", "report.md"]
    for name in ("report.html", "report.md", "report_files/pareto.png", "report_files/widths.png",
                 "report_files/node_latency.png", "report_files/hypervolume.png"):
        assert (copy / name).read_bytes() == (run_dir / name).read_bytes(), name
    assert not (copy / "study.db").exists(), "building a report must never create a storage"


def test_report_falls_back_to_the_storage_then_to_the_summary(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "trials.csv").unlink()
    build_report(copy)
    md = (copy / "report.md").read_text()
    assert "Every trial, from study storage" in md
    original = find_table(md_tables((run_dir / "report.md").read_text()), "Trial", "State")
    assert find_table(md_tables(md), "Trial", "State") == original
    # storage unreachable too: the report still builds from summary.json and says what is missing
    summary = json.loads((copy / "summary.json").read_text())
    summary["request"]["storage"] = f"sqlite:///{tmp_path / 'gone' / 'study.db'}"
    (copy / "summary.json").write_text(json.dumps(summary))
    (copy / "study.db").unlink()
    build_report(copy)
    md = (copy / "report.md").read_text()
    assert "trials.csv is missing and the study storage cannot be opened" in md
    assert not (tmp_path / "gone").exists()


def test_estimated_untuned_and_noisy_are_labelled_in_the_tables(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    summary = json.loads((copy / "summary.json").read_text())
    rec = next(r for r in summary["pareto"] if r["recommended"])
    rec.update(estimated=True, tuned=False)
    rec["latency_ms"]["noisy"] = True
    summary["measurement"].update(estimated=True, tuned=False)
    (copy / "summary.json").write_text(json.dumps(summary))
    build_report(copy)
    md = (copy / "report.md").read_text()
    speed = find_table(md_tables(md), "Model", "accuracy", "accuracy (search proxy)", "Latency")
    row = row_of(speed, model_cell(rec))
    flags = " (estimated, untuned, noisy)"
    assert row["Latency"] == fmt_ms(rec["latency_ms"]["judged"]) + flags
    assert row["Own median"] == fmt_ms(rec["latency_ms"]["median"]) + flags
    assert row["Own p90"] == fmt_ms(rec["latency_ms"]["p90"]) + flags
    assert row["Speedup"] == fmt_x(rec["speedup"]) + flags
    cond = {r["Condition"]: r["Value"] for r in find_table(md_tables(md), "Condition", "Value")}
    assert cond["Latency source"].startswith("**estimated**") and cond["TVM kernels"] == "**untuned**"
    per_model = row_of(find_table(md_tables(md), "Model", "Latency source"), model_cell(rec))
    assert per_model["Latency source"] == "`ort`, estimated" and per_model["Noisy"] == "**yes**"
    assert "**estimated**" in md and "**untuned**" in md and "Noisy latency measurements" in md


def test_failed_trials_are_listed_with_their_reasons(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    reason = "ExportError: torch.onnx failed on aten::foo | see <log>"
    trials = pd.read_csv(copy / "trials.csv")
    failed = {c: None for c in trials.columns}
    failed.update(trial=len(trials), state="FAIL", feasible=False, fail_reason=reason, duration_s=0.5)
    pd.concat([trials, pd.DataFrame([failed])]).to_csv(copy / "trials.csv", index=False)
    summary = json.loads((copy / "summary.json").read_text())
    summary["search"].update(trials_failed=1, failures=[{"trial": len(trials), "reason": reason}])
    (copy / "summary.json").write_text(json.dumps(summary))
    build_report(copy)
    md = (copy / "report.md").read_text()
    assert "1 trial(s) failed" in md
    rows = find_table(md_tables(md), "Failed trial", "Reason")
    assert [(r["Failed trial"], _unmark(r["Reason"])) for r in rows] == [(str(len(trials)), reason)]
    row = find_table(md_tables(md), "Trial", "State")[-1]
    assert row["State"] == "fail" and _unmark(row["Notes"]) == f"failed: {reason}"
    html_text = (copy / "report.html").read_text()
    assert "see &lt;log&gt;" in html_text and "<log>" not in html_text


def test_report_when_nothing_met_the_budgets(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary.update(pareto=[], recommended=None)
    summary["search"]["best_infeasible"] = {"latency_ms": 0.5, "memory_mb": 1.25}
    (copy / "summary.json").write_text(json.dumps(summary))
    (copy / "pareto.csv").write_text(pd.read_csv(run_dir / "pareto.csv").iloc[:0].to_csv(index=False))
    build_report(copy)
    md = (copy / "report.md").read_text()
    assert "> **Warning:** **No model met the budgets**" in md
    assert f"reached was {fmt_ms(0.5)} latency and {fmt_mb(1.25)} memory" in md
    assert "import onnxruntime" not in md and "## What was pruned" not in md
    speed = find_table(md_tables(md), "Model", "accuracy", "accuracy (search proxy)", "Latency")
    assert [r["Model"] for r in speed] == ["dense"]
    assert not (copy / "report_files" / "widths.png").exists()  # an image of an earlier build is removed


def test_compare_same_run_has_no_regressions(run_dir: Path, tmp_path: Path) -> None:
    result = compare_runs(run_dir, run_dir)
    assert result["regressions"] == []
    assert result["recommended"]["latency_ms_median"]["delta"] == 0
    assert result["recommended"]["latency_ms_judged"]["delta"] == 0
    assert result["differences"] == []
    paths = build_comparison(run_dir, run_dir, tmp_path / "cmp")
    assert {p.name for p in paths} >= {"compare.html", "compare.md", "compare.json", "fronts.png"}
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "**OK:** No regressions" in md


def test_compare_flags_regressions(run_dir: Path, tmp_path: Path) -> None:
    base, worse = tmp_path / "base", tmp_path / "worse"
    shutil.copytree(run_dir, base)
    # the baseline's recommended model meets its latency budget (a busy host can make the real one miss it)
    summary = json.loads((base / "summary.json").read_text())
    next(r for r in summary["pareto"] if r["recommended"])["meets"]["latency"] = True
    (base / "summary.json").write_text(json.dumps(summary))
    shutil.copytree(base, worse)
    rec = next(r for r in summary["pareto"] if r["recommended"])
    a_lat, a_acc = rec["latency_ms"]["judged"], rec["accuracy"]
    spread = rec["latency_ms"]["std"]
    # regressions are judged on the latency the budget judges; the own median moving alone is no regression
    rec["latency_ms"]["median"] += 10 * spread + 1.0
    (worse / "summary.json").write_text(json.dumps(summary))
    assert compare_runs(base, worse)["regressions"] == []
    rec["latency_ms"]["judged"] = a_lat + 3 * spread + 0.01
    rec["accuracy"] = a_acc - 0.05
    rec["meets"]["latency"] = False
    a_ort = summary["request"]["versions"]["onnxruntime"]
    summary["request"]["versions"]["onnxruntime"] = "0.0.1"
    (worse / "summary.json").write_text(json.dumps(summary))
    result = compare_runs(base, worse)
    kinds = {r["kind"] for r in result["regressions"]}
    assert kinds == {"latency", "accuracy", "budget_latency"}
    d = result["recommended"]
    assert d["latency_ms_judged"]["delta"] == pytest.approx(3 * spread + 0.01)
    assert d["accuracy"]["delta"] == pytest.approx(-0.05)
    assert d["accuracy"]["delta_pct"] == pytest.approx(-0.05 / a_acc * 100)
    assert {"field": "versions.onnxruntime", "a": a_ort, "b": "0.0.1"} in result["differences"]
    # a latency rise within the measurement spread is not a regression
    rec["latency_ms"]["judged"] = a_lat + 0.5 * spread
    rec["accuracy"], rec["meets"]["latency"] = a_acc, True
    (worse / "summary.json").write_text(json.dumps(summary))
    assert compare_runs(base, worse)["regressions"] == []


def test_compare_cli_on_runs_with_different_requests(run_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hwprune.cli import app

    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    summary = json.loads((other / "summary.json").read_text())
    summary["request"].update(latency_budget="0.7x", seed=1)
    summary["request"]["latency_budget_ms"] *= 0.7 / 0.9
    (other / "summary.json").write_text(json.dumps(summary))
    runner = CliRunner()
    res = runner.invoke(app, ["report", str(other)])
    assert res.exit_code == 0, res.output
    assert "report.html" in res.output
    res = runner.invoke(app, ["report", str(run_dir), "--compare", str(other), "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    out = tmp_path / "cmp"
    data = json.loads((out / "compare.json").read_text())
    assert data == json.loads(json.dumps(compare_runs(run_dir, other), default=str))
    fields = {d["field"] for d in data["differences"]}
    assert fields == {"request.latency_budget", "request.latency_budget_ms", "request.seed"}
    md = (out / "compare.md").read_text()
    assert "![Both Pareto fronts](compare_files/fronts.png)" in md and (out / "compare_files/fronts.png").is_file()
    assert "the runs had different budgets" in md
    rows = find_table(md_tables(md), "Number", "A", "B")
    lat = next(r for r in rows if r["Number"] == "latency (as the budget judges it)")
    d = data["recommended"]["latency_ms_judged"]
    assert lat["A"] == fmt_ms(d["a"]) and lat["B"] == fmt_ms(d["b"]) and lat["Δ %"] == "+0.0%"
    diffs = {_unmark(r["Setting"]): (r["A"], r["B"]) for r in find_table(md_tables(md), "Setting", "A", "B")}
    assert diffs["request.latency_budget"] == ("0.9x", "0.7x") and diffs["request.seed"] == ("0", "1")
    html_text = (out / "compare.html").read_text()
    assert "<script" not in html_text and html_text.count("data:image/png;base64,") == 1


_MODEL = {"trial": None, "accuracy": 0.5, "latency_ms": {"median": 1.0, "p90": 1.1}, "memory_mb": {"total": 2.0}}


@pytest.mark.parametrize("text,needle", [
    ("{\"schema\": 1, \"dense\": {", "not valid JSON"),
    ("[1, 2]", "summary: expected an object, got list"),
    (json.dumps({"schema": 1, "pareto": []}), "summary.dense is missing"),
    (json.dumps({"schema": 1, "dense": {**_MODEL, "latency_ms": {}}}), "dense.latency_ms.median is missing"),
    (json.dumps({"schema": 1, "dense": _MODEL, "pareto": [{**_MODEL, "trial": 3}]}),
     "pareto[0].meets.latency is missing"),
    (json.dumps({"schema": 1, "dense": _MODEL, "pareto": "none"}), "pareto: expected a list"),
    (json.dumps({"schema": 1, "dense": _MODEL, "request": [1]}), "request: expected an object"),
])
def test_a_damaged_summary_is_one_error_naming_the_file(tmp_path: Path, text: str, needle: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(text)
    with pytest.raises(HwpruneError, match=re.escape(needle)) as exc:
        build_report(run)
    assert str(run / "summary.json") in str(exc.value) and "\n" not in str(exc.value)
    assert not (run / "report.html").exists()


def test_report_cli_on_a_damaged_summary_exits_2_in_one_line(tmp_path: Path) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    for folder, text in ((good, json.dumps({"schema": 1, "dense": _MODEL, "pareto": []})), (bad, "not json")):
        folder.mkdir()
        (folder / "summary.json").write_text(text)
    for args in (["report", str(bad)], ["report", str(good), "--compare", str(bad), "--out", str(tmp_path / "cmp")]):
        proc = run_cli(*args)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"hwprune: error: {bad / 'summary.json'}: not valid JSON")
        assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("value,expected", [(0.034827, "0.0348"), (1.2134, "1.21"), (12.34, "12.3"), (1234.5, "1234"),
                                            (9.996, "10.0"), (0.0999999, "0.100"), (0, "0"), (-0.5, "-0.500"),
                                            (None, "—"), (float("nan"), "—")])
def test_sig(value: Any, expected: str) -> None:
    assert sig(value) == expected


def test_removed_blocks_are_named(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    summary = json.loads((copy / "summary.json").read_text())
    assert all(not r.get("removed_blocks") for r in summary["pareto"])  # the tiny net has no residual block
    rec = next(r for r in summary["pareto"] if r["recommended"])
    rec["removed_blocks"] = ["layer3.1", "layer4.0"]
    (copy / "summary.json").write_text(json.dumps(summary))
    build_report(copy)
    md = (copy / "report.md").read_text()
    assert "Residual blocks removed whole" in md and "`layer3.1`, `layer4.0`" in md
