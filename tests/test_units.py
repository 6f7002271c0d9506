"""Small pieces with exact answers: budgets, Pareto fronts, recommendation, hypervolume, generated data, BN recal."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from hwprune.config import Budget, SearchConfig
from hwprune.errors import HwpruneError
from hwprune.study.pareto import hypervolume_history, pareto_front, pareto_mask, recommend
from hwprune.subjects.shapes import CLASSES, make_shapes
from hwprune.train import accuracy, channels_last, correct, finetune, recalibrate_batchnorm


def test_budget_parsing() -> None:
    assert Budget.parse("20", "x") == Budget(20.0, False)
    assert Budget.parse("0.6x", "x") == Budget(0.6, True)
    assert Budget.parse(5, "x").resolve(100.0) == 5.0
    assert Budget.parse("0.5x", "x").resolve(8.0) == 4.0
    assert Budget.parse(None, "x") is None
    for bad in ("fast", "-3", "0", "1.2.3x"):
        with pytest.raises(HwpruneError):
            Budget.parse(bad, "latency budget")


def test_config_validation_names_the_field() -> None:
    with pytest.raises(HwpruneError, match="trials"):
        SearchConfig(trials=0)
    with pytest.raises(HwpruneError, match="max ratio"):
        SearchConfig(max_ratio=1.0)
    with pytest.raises(HwpruneError, match="--trials N or --timeout"):
        SearchConfig(trials=None, timeout_s=None)
    assert SearchConfig(model="pkg.mod:make", device="device_profiles/host-cpu.toml").study_name == \
        "pkg.mod-make-host-cpu"


def _trials(rows):
    return pd.DataFrame(rows, columns=["trial", "accuracy", "latency_ms", "memory_mb", "feasible", "signature"])


def test_pareto_front_by_hand() -> None:
    df = _trials([
        (0, 0.90, 10.0, 5.0, True, "a"),   # front: most accurate
        (1, 0.80, 5.0, 5.0, True, "b"),    # front: fastest
        (2, 0.79, 6.0, 5.0, True, "c"),    # dominated by 1
        (3, 0.95, 1.0, 1.0, False, "d"),   # infeasible: never on the front
        (4, 0.80, 5.0, 5.0, True, "b"),    # same architecture as 1: dropped
        (5, 0.70, 7.0, 2.0, True, "e"),    # front: least memory
    ])
    assert list(pareto_mask(df)) == [False, False, False, True, False, False]  # trial 3 dominates everything
    assert list(pareto_mask(df[df["feasible"]])) == [True, True, False, True, True]
    front = pareto_front(df)
    assert list(front["trial"]) == [1, 5, 0]  # sorted by latency
    assert recommend(front) == 0
    assert recommend(front, accuracy_tolerance=0.15) == 1
    assert recommend(front.iloc[:0]) is None


def test_front_drops_smaller_but_not_faster_models() -> None:
    """A less accurate model stays on the front only if it buys speed or memory beyond measurement noise."""
    df = _trials([
        (0, 0.90, 10.0, 5.0, True, "a"),
        (1, 0.85, 9.8, 4.9, True, "b"),    # 2% faster, 2% smaller, 5 points less accurate: noise, dropped
        (2, 0.85, 9.0, 5.0, True, "c"),    # 10% faster: kept
        (3, 0.80, 10.2, 4.0, True, "d"),   # slower, but 20% less memory: kept
        (4, 0.90, 9.9, 5.0, True, "e"),    # equally accurate, faster at all: dominates 0 exactly
    ])
    assert list(pareto_mask(df)) == [False, True, True, True, True]  # exact dominance keeps trial 1
    assert list(pareto_front(df)["trial"]) == [2, 4, 3]
    # never empty: equal accuracies compare exactly, so no two models drop each other
    ties = _trials([(0, 0.9, 10.0, 5.0, True, "a"), (1, 0.9, 9.9, 5.1, True, "b")])
    assert list(pareto_front(ties)["trial"]) == [1, 0]


def test_dominance_on_two_accuracies_needs_both() -> None:
    """After the final fine-tune some models' accuracy is fine-tuned and others' is not; the proxy every model got
    alike must agree before one drops another."""
    df = _trials([
        (0, 0.90, 10.0, 5.0, True, "a"),   # a final candidate: fine-tuned from a proxy of 0.60
        (1, 0.60, 10.5, 4.9, True, "b"),   # not fine-tuned, proxy 0.58: slower, 2% less memory
        (2, 0.62, 10.4, 4.9, True, "c"),   # not fine-tuned, proxy 0.62: ahead of 0 by the proxy
    ]).assign(accuracy_proxy=[0.60, 0.58, 0.62])
    assert list(pareto_mask(df, 0.05)) == [True, False, False]  # on the fine-tuned accuracy alone
    assert list(pareto_mask(df, 0.05, ("accuracy", "accuracy_proxy"))) == [True, False, True]
    assert list(pareto_mask(df, 0.05, ("accuracy_proxy",))) == [False, False, True]  # on the proxy alone


def test_hypervolume_grows_monotonically_and_ignores_infeasible() -> None:
    df = _trials([
        (0, 0.5, 1.0, 1.0, True, "a"),
        (1, 0.9, 0.1, 0.1, False, "b"),
        (2, 0.8, 0.8, 0.8, True, "c"),
    ])
    hv = hypervolume_history(df, (1.0, 1.0, 1.0))
    # ref point (1, 2, 2) on (1 - acc, lat, mem): trial 0 alone -> 0.5 * 1 * 1
    assert hv[0] == (0, pytest.approx(0.5))
    assert hv[1] == (1, pytest.approx(0.5))
    assert hv[2][1] > hv[1][1]


def test_generated_shapes_are_deterministic_and_balanced() -> None:
    x1, y1 = make_shapes(500, seed=3)
    x2, y2 = make_shapes(500, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (500, 3, 32, 32) and x1.dtype == torch.float32
    assert set(y1.tolist()) == set(range(len(CLASSES)))
    assert not torch.equal(make_shapes(10, seed=4)[0], x1[:10])


def test_batchnorm_recalibration_matches_data_statistics() -> None:
    bn = nn.BatchNorm2d(4)
    data = [torch.randn(64, 4, 8, 8) * 3 + 2 for _ in range(4)]
    used = recalibrate_batchnorm(nn.Sequential(bn), data, batches=4)
    assert used == 4
    all_x = torch.cat(data)
    assert torch.allclose(bn.running_mean, all_x.mean((0, 2, 3)), atol=1e-4)
    assert not bn.training


def test_channels_last_training_learns_and_leaves_contiguous_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 2))
    x = torch.randn(64, 3, 8, 8)
    y = (x.mean((1, 2, 3)) > 0).long()  # learnable from the mean brightness
    data = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    with channels_last(model):
        assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert not model[0].weight.is_contiguous()
    before = accuracy(model, data)
    finetune(model, data, 60, lr=0.1)
    assert accuracy(model, data) > max(before, 0.8)
    # pruning, export and state_dict consumers get the usual layout back
    assert all(p.is_contiguous() for p in model.parameters())
    assert all(b.is_contiguous() for b in model.buffers())
    linear = nn.Linear(3, 3)
    with channels_last(linear, None):  # no 4-D weights: left alone, and None is allowed (no teacher)
        assert linear.weight.is_contiguous()
    mine = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)  # a caller's own layout is kept
    with channels_last(mine):
        pass
    assert mine.weight.is_contiguous(memory_format=torch.channels_last) and not mine.weight.is_contiguous()


def test_per_sample_correctness_and_accuracy_agree() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(3)]
    hits = correct(model, batches)
    with torch.no_grad():
        expected = torch.cat([model(x).argmax(-1) == y for x, y in batches])
    assert hits.dtype == torch.bool and torch.equal(hits, expected)  # per sample, in data order
    assert accuracy(model, batches) == int(expected.sum()) / 15
    assert accuracy(model, []) == 0.0


def test_public_api_names_stay_functions_after_submodule_imports() -> None:
    # hwprune.search and hwprune.measure are functions; no subpackage of the same name may shadow them
    import hwprune
    import hwprune.backends.ort  # noqa: F401
    import hwprune.study.run  # noqa: F401

    assert callable(hwprune.search) and hwprune.search.__module__ == "hwprune.study.run"
    assert callable(hwprune.measure) and hwprune.measure.__module__ == "hwprune.api"
    assert callable(hwprune.load_profile) and callable(hwprune.prune)


def test_busy_cores_elsewhere_sees_another_process() -> None:
    """Training threads follow the cores other processes keep busy, read from /proc/stat (not the load average,
    which counts this process's own work)."""
    import subprocess
    import sys
    import time

    from hwprune import train

    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)
        train._BUSY_CACHE.clear()
        busy = train._busy_cores_elsewhere(window_s=0.5)
        assert busy >= 0.6, busy  # one core spinning in another process
        assert train._busy_cores_elsewhere() == busy  # reused for a few seconds, not re-measured every call
    finally:
        child.kill()
        child.wait()
        train._BUSY_CACHE.clear()
