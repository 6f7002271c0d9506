"""The benchmark's own logic: which uniform architectures exist, how the equal-latency baseline is chosen, how runs
are pooled. The benchmark's numbers are only as good as these choices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import search_baselines as bench_search
from bench import summarize_runs
from bench.common import MATCHED, NEAR
from bench.search_baselines import Final
from tiny_subject import TinyNet

from hwprune.pruning import PruningSpace


def test_uniform_architecture_ratios_one_per_architecture() -> None:
    space = PruningSpace.build(TinyNet().eval(), torch.zeros(1, 3, 32, 32), channel_multiple=16, max_ratio=0.95)
    ratios = bench_search.uniform_architecture_ratios(space)
    widths = [space.kept_widths(space.uniform(r)) for r in ratios]
    assert ratios == sorted(ratios) and len(ratios) >= 2
    assert len(set(widths)) == len(widths), "two ratios build the same architecture"
    scanned = {space.kept_widths(space.uniform(i / 1000)) for i in range(951)}
    assert scanned == set(widths), "an architecture of the scan is missing"
    assert all(sum(a) >= sum(b) for a, b in zip(widths, widths[1:])), "architectures not in falling width order"


def _final(method: str, ratio_pair: float, accuracy: float, macs: int, setting: str = "") -> Final:
    f = Final("tiny", 0.4, method, setting or f"ratio {ratio_pair}", None, macs=macs, accuracy=accuracy)
    f.latency = {"ratio_pair": ratio_pair}
    return f


def test_matched_uniform_is_the_most_accurate_no_slower_than_the_pick() -> None:
    hw = _final("hwprune", 0.50, 0.90, 1000)
    near = [_final(NEAR, 0.55, 0.95, 1200), _final(NEAR, 0.50, 0.86, 1100), _final(NEAR, 0.48, 0.88, 1000),
            _final(NEAR, 0.45, 0.80, 900)]
    matched = bench_search.matched_uniform(near, hw)
    assert matched is not None and matched.method == MATCHED
    assert matched.accuracy == 0.88 and matched.latency["ratio_pair"] == 0.48
    assert "best of 3 of 4" in matched.setting and matched.note == ""
    assert near[2].method == NEAR, "the near final itself must keep its method"


def test_matched_uniform_says_when_the_bracket_is_open_or_empty() -> None:
    hw = _final("hwprune", 0.50, 0.90, 1000)
    every = bench_search.matched_uniform([_final(NEAR, 0.49, 0.85, 1100), _final(NEAR, 0.45, 0.80, 900)], hw)
    assert every is not None and "a less pruned one may too" in every.note
    none = bench_search.matched_uniform([_final(NEAR, 0.55, 0.85, 1100)], hw)
    assert none is not None and none.module is None and none.setting == "none" and "none of the 1" in none.note
    assert bench_search.matched_uniform([], hw) is None


def _run_json(path: Path, seed: int, diffs: dict[str, float]) -> Path:
    results = [{"model": "tiny", "budget": 0.4, "method": m, "accuracy": 0.9 - d, "ratio_wall": 0.4,
                "meets_wall": True} for m, d in diffs.items()]
    results.append({"model": "tiny", "budget": 0.4, "method": "hwprune", "accuracy": 0.9, "ratio_wall": 0.39,
                    "meets_wall": True})
    paired = [{"model": "tiny", "budget": 0.4, "baseline": m, "difference": d, "paired_se": 0.003,
               "p_two_sided": 0.001 if d > 0.01 else 0.5} for m, d in diffs.items()]
    path.write_text(json.dumps({"args": {"seed": 0, "search_seed": seed}, "created": "now", "commit": "abc",
                                "results": results, "paired": paired}))
    return path


def test_summarize_runs_pools_each_baseline_separately(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = _run_json(tmp_path / "a.json", 0, {"uniform-16": 0.02, MATCHED: 0.001})
    b = _run_json(tmp_path / "b.json", 1, {"uniform-16": 0.015})  # a run without the matched comparison
    assert summarize_runs.main([str(a), str(b), "--out", str(tmp_path / "sum")]) == 0
    text = capsys.readouterr().out
    assert "hwprune vs `uniform-16`**" in text and f"hwprune vs `{MATCHED}`**" in text
    assert "2 runs: hwprune more accurate (p < 0.05) in 2" in text
    assert "1 runs: hwprune more accurate (p < 0.05) in 0, tied in 1" in text
    rows = json.loads((tmp_path / "sum.json").read_text())["rows"]
    assert sorted((r["baseline"], r["search_seed"]) for r in rows) == [("uniform-16", 0), ("uniform-16", 1),
                                                                        (MATCHED, 0)]
