"""The ONNX Runtime backend, the shared timing loop and ORT's per-node profile: real sessions, no mocks."""

from __future__ import annotations

import glob
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from hwprune.errors import BackendUnavailable, MeasurementError, ProfileError
from hwprune.export import export_onnx, input_feed
from hwprune.backends import Backend, Latency, Measurement, create_backend
from hwprune.backends.memory import graph_memory
from hwprune.backends.ort import OrtBackend, node_profile, parse_node_trace, session_options
from hwprune.backends.timing import timed_pair, timed_runs
from hwprune.profiles import DeviceProfile, load_profile


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = small_cnn()
    path = export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path_factory.mktemp("ort") / "cnn.onnx")
    return model, path


@pytest.fixture(scope="module")
def fast_profile() -> DeviceProfile:
    return load_profile("host-cpu").with_overrides(measure__warmup=3, measure__repeats=15, measure__max_cv=10.0)


def test_measure_fields(cnn: tuple[nn.Module, Path], fast_profile: DeviceProfile) -> None:
    _, path = cnn
    backend = OrtBackend(fast_profile)
    assert isinstance(backend, Backend) and backend.name == "ort"
    m = backend.measure(path)
    lat = m.latency
    assert m.backend == "ort" and m.device == "host-cpu"
    assert m.threads == 1 and m.estimated is False and m.tuned is None
    assert lat.repeats == 15 and lat.warmup == 3 and lat.remeasured == 0 and lat.noisy is False
    assert 0 < lat.min_ms <= lat.median_ms <= lat.p90_ms
    assert lat.cpu_median_ms is not None and lat.cpu_median_ms > 0
    assert m.load_avg is not None and len(m.load_avg) == 3
    assert set(m.stage_seconds) == {"session", "timing"} and all(v > 0 for v in m.stage_seconds.values())
    ref = graph_memory(path)
    assert m.memory.weights_mb == pytest.approx(ref.weights_mb)
    assert m.memory.peak_activations_mb == pytest.approx(ref.peak_activations_mb)
    assert m.memory.process_peak_mb is not None and m.memory.process_peak_mb >= 0
    assert m.extra["providers"] == ["CPUExecutionProvider"] and m.extra["cpu_clock"] == "thread"
    # survives the storage round trip (Optuna user attrs are JSON)
    again = Measurement.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again == m


def test_run_matches_torch(cnn: tuple[nn.Module, Path], fast_profile: DeviceProfile) -> None:
    model, path = cnn
    feed = input_feed(path, seed=1)
    (got,) = OrtBackend(fast_profile).run(path, feed)
    with torch.no_grad():
        expected = model(torch.from_numpy(feed["input"])).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_create_backend_from_profile(fast_profile: DeviceProfile) -> None:
    assert isinstance(create_backend(fast_profile), OrtBackend)


def test_every_backend_states_its_capabilities_and_they_match_its_methods() -> None:
    """Callers read ``capabilities`` instead of testing names: each registered class must say the truth."""
    from hwprune.backends import _REGISTRY, _backend_class, backend_capabilities
    from hwprune.backends.base import EXPORTER_DYNAMO, Capabilities

    for name in _REGISTRY:
        caps = backend_capabilities(name)
        assert isinstance(caps, Capabilities)
        assert caps.beside == callable(getattr(_backend_class(name), "measure_beside", None)), name
        assert caps.node_profile == callable(getattr(_backend_class(name), "node_profile", None)), name
    assert backend_capabilities("tvm").exporter == backend_capabilities("tvm-rpc").exporter == EXPORTER_DYNAMO
    assert backend_capabilities("ort").exporter != EXPORTER_DYNAMO
    assert backend_capabilities("ssh-ort").settings == ("ort", "ssh")
    with pytest.raises(BackendUnavailable, match="unknown backend 'nope'"):
        backend_capabilities("nope")


def test_latency_stats_for_known_samples() -> None:
    samples = [1.0, 2.0, 3.0, 4.0, 10.0]
    lat = Latency.from_samples(samples, warmup=2, cpu_samples_ms=[0.5, 0.9, 1.0, 1.1, 2.0])
    assert lat.median_ms == 3.0 and lat.min_ms == 1.0 and lat.mean_ms == 4.0
    assert lat.p90_ms == pytest.approx(7.6)  # linear interpolation between 4 and 10
    assert lat.std_ms == pytest.approx(np.sqrt(((np.array(samples) - 4.0) ** 2).sum() / 4))
    assert lat.cv == pytest.approx(lat.std_ms / 4.0)
    assert lat.cpu_median_ms == 1.0 and lat.repeats == 5 and lat.warmup == 2


def _busy(ms: float) -> None:
    end = time.perf_counter_ns() + int(ms * 1e6)
    while time.perf_counter_ns() < end:
        pass


def test_timed_runs_flags_and_remeasures_noise() -> None:
    calls = {"n": 0}

    def jittery() -> None:  # alternates 0.05 ms and 1 ms: CV near 1
        calls["n"] += 1
        _busy(1.0 if calls["n"] % 2 else 0.05)

    lat = timed_runs(jittery, warmup=2, repeats=6, max_cv=0.1, remeasure=2)
    assert lat.noisy is True and lat.remeasured == 2
    assert calls["n"] == 2 + 3 * 6  # warm-up once, then the first attempt and two re-measurements
    assert lat.cpu_median_ms is not None and lat.cpu_median_ms > 0

    steady = timed_runs(lambda: _busy(0.2), warmup=1, repeats=5, max_cv=10.0, remeasure=2)
    assert steady.noisy is False and steady.remeasured == 0 and steady.repeats == 5
    assert steady.min_ms >= 0.2


def test_timed_runs_min_repeat_ms_batches_fast_calls() -> None:
    calls = {"n": 0}

    def tiny() -> None:
        calls["n"] += 1

    lat = timed_runs(tiny, warmup=1, repeats=3, max_cv=10.0, remeasure=0, min_repeat_ms=1.0, cpu_clock=None)
    assert lat.repeats == 3 and lat.cpu_median_ms is None
    assert calls["n"] > 100  # each sample repeated the call until it lasted a millisecond
    assert lat.median_ms < 0.1  # reported per call


def test_timed_pair_alternates_samples_and_a_slow_spell_cancels_in_the_ratios() -> None:
    order: list[str] = []

    def slowdown() -> float:  # the "host" runs 3x slower from the 150th to the 300th call: a slow spell (~420 calls)
        return 3.0 if 150 <= len(order) < 300 else 1.0

    def model() -> None:
        order.append("m")
        _busy(0.4 * slowdown())

    def dense() -> None:
        order.append("d")
        _busy(1.0 * slowdown())

    lat, ref, ratios = timed_pair(model, dense, warmup=1, repeats=60, max_cv=10.0, min_repeat_ms=1.5)
    assert len(ratios) == 60 and lat.repeats == ref.repeats == 60
    # the spell slowed some samples of each side 3x: visible in each latency's spread, not in the neighbours' ratios
    assert lat.p90_ms > 2 * lat.min_ms and ref.p90_ms > 2 * ref.min_ms
    assert 0.3 < float(np.median(ratios)) < 0.5
    assert sum(0.3 < r < 0.5 for r in ratios) >= 54  # only a pair straddling the spell's edges is off
    # samples alternate, model-dense then dense-model: the calls change side about once per pair (60 pairs), where
    # timing one side's whole set and then the other's would change side a handful of times
    sides = "".join(order)
    assert sum(a != b for a, b in zip(sides, sides[1:])) >= 60


def test_measure_beside_times_two_real_sessions(cnn: tuple[nn.Module, Path], tmp_path: Path) -> None:
    _, small = cnn
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Conv2d(3, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)).eval()
    big = export_onnx(wide, (torch.randn(1, 3, 32, 32),), tmp_path / "wide.onnx")
    profile = load_profile("host-cpu").with_overrides(measure__warmup=2, measure__repeats=9)
    backend = OrtBackend(profile)
    m, ref, ratios = backend.measure_beside(small, big)
    assert len(ratios) == 9 and m.latency.repeats == ref.latency.repeats == 9
    assert float(np.median(ratios)) < 0.5  # the wide model has ~100x the MACs
    assert m.memory.weights_mb < ref.memory.weights_mb
    assert set(m.stage_seconds) == {"session", "timing"} and ref.stage_seconds["timing"] > 0
    assert m.backend == ref.backend == "ort" and m.latency.cpu_median_ms is not None
    with pytest.raises(MeasurementError, match="cannot load"):
        backend.measure_beside(small, tmp_path / "missing.onnx")


def test_noisy_ort_measurement_is_remeasured_and_flagged(cnn: tuple[nn.Module, Path]) -> None:
    _, path = cnn
    profile = load_profile("host-cpu").with_overrides(measure__max_cv=1e-9, measure__remeasure=2,
                                                      measure__warmup=1, measure__repeats=5)
    m = OrtBackend(profile).measure(path)
    assert m.latency.remeasured == 2 and m.latency.noisy is True and m.latency.repeats == 5


def test_measure_cli_flags_every_spread_above_max_cv(cnn: tuple[nn.Module, Path], tmp_path: Path,
                                                     fast_profile: DeviceProfile) -> None:
    """`hwprune measure` says [noisy] whenever the robust CV (what decides `noisy`) is above the profile's max_cv, and
    shows the plain CV beside it, which one preempted run can inflate without the measurement being noisy."""
    from conftest import run_cli
    from hwprune.cli import _noisy, _spread

    _, path = cnn
    text = Path(load_profile("host-cpu").source).read_text()
    strict = tmp_path / "strict.toml"
    strict.write_text(text.replace("max_cv = 0.10", "max_cv = 0.000001").replace("remeasure = 2", "remeasure = 0")
                      .replace("repeats = 30", "repeats = 5"))
    proc = run_cli("measure", str(path), "--device", str(strict), check=True)
    line = " ".join(proc.stdout.split())  # as one line, however the console wrapped it
    assert "above the profile's max_cv 0.0001%) over 5 runs after 10 warm-up [noisy]" in line, proc.stdout
    # the same words in-process, on real measurements either side of the limit
    lat = OrtBackend(fast_profile).measure(path).latency  # max_cv 10.0 = 1000%
    assert "within the profile's max_cv 1000%" in _spread(lat, 10.0)
    # within max_cv it is noisy only when the thread waited for a core all along (a busy host), and says so
    assert _noisy(lat, 10.0) == "" if not lat.noisy else "another process held the core" in _noisy(lat, 10.0)
    assert "above" in _spread(lat, lat.robust_cv / 2) and _noisy(lat, lat.robust_cv / 2) == " [noisy]"


def test_thread_settings_are_honored(cnn: tuple[nn.Module, Path]) -> None:
    _, path = cnn
    base = load_profile("host-cpu")
    sess = OrtBackend(base).session(path)
    opts = sess.get_session_options()
    assert opts.intra_op_num_threads == base.ort.intra_op_threads == 1
    assert opts.inter_op_num_threads == base.ort.inter_op_threads
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert sess.get_providers() == ["CPUExecutionProvider"]

    two = base.with_overrides(ort__intra_op_threads=2, ort__inter_op_threads=2, ort__graph_optimization_level="basic",
                              measure__warmup=1, measure__repeats=3, measure__max_cv=10.0)
    opts = OrtBackend(two).session(path).get_session_options()
    assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 2
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert session_options(two).intra_op_num_threads == 2
    m = OrtBackend(two).measure(path)
    assert m.threads == 2 and m.extra["cpu_clock"] == "process"


def test_bad_profile_settings_fail_early() -> None:
    base = load_profile("host-cpu")
    with pytest.raises(ProfileError, match="graph_optimization_level"):
        OrtBackend(base.with_overrides(ort__graph_optimization_level="turbo"))
    with pytest.raises(BackendUnavailable, match="NoSuchExecutionProvider"):
        OrtBackend(base.with_overrides(ort__providers=("NoSuchExecutionProvider",)))


def test_measurement_errors_are_one_line(cnn: tuple[nn.Module, Path], tmp_path: Path,
                                        fast_profile: DeviceProfile) -> None:
    _, path = cnn
    backend = OrtBackend(fast_profile)
    with pytest.raises(MeasurementError, match="lack input") as info:
        backend.measure(path, {"wrong": np.zeros((1, 3, 32, 32), np.float32)})
    assert "\n" not in str(info.value)
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(MeasurementError, match="cannot load") as info:
        backend.measure(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(MeasurementError):
        backend.run(path, {"input": np.zeros((1, 5, 32, 32), np.float32)})  # wrong channel count


def test_node_profile_reports_graph_nodes(cnn: tuple[nn.Module, Path]) -> None:
    _, path = cnn
    profile = load_profile("host-cpu").with_overrides(ort__graph_optimization_level="disable", measure__warmup=2)
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "hwprune-ort-prof-*")))
    result = node_profile(path, profile, runs=5)
    assert set(result) == {"backend", "runs", "nodes"}
    assert result["backend"] == "ort" and result["runs"] == 5
    nodes = result["nodes"]
    names_in_graph = {n.name for n in onnx.load(str(path)).graph.node}
    convs = [n for n in nodes if n["op_type"] == "Conv"]
    assert len(convs) == 3
    assert all(n["name"] in names_in_graph for n in convs)
    assert all(n["median_us"] > 0 for n in convs)
    times = [n["median_us"] for n in nodes]
    assert times == sorted(times, reverse=True)
    # the trace file and its temporary folder are gone, and nothing was written to the working directory
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "hwprune-ort-prof-*"))) == before
    assert not glob.glob("ort_profile*")
    json.dumps(result)  # node_latency.json is plain JSON

    # With full optimization ORT fuses and renames nodes; Conv kernels are still reported.
    full = OrtBackend(load_profile("host-cpu").with_overrides(measure__warmup=1)).node_profile(path, runs=3)
    assert any(n["op_type"] == "Conv" for n in full["nodes"]) and full["runs"] == 3


def test_parse_node_trace_drops_warmup_runs() -> None:
    def run(ts: int) -> list[dict]:
        return [
            {"cat": "Node", "name": "conv_kernel_time", "ts": ts + 1, "dur": 10 if ts else 1000,
             "args": {"op_name": "Conv", "node_index": "0"}},
            {"cat": "Node", "name": "relu_kernel_time", "ts": ts + 20, "dur": 2,
             "args": {"op_name": "Relu", "node_index": "1"}},
            {"cat": "Node", "name": "relu_fence_before", "ts": ts + 19, "dur": 0, "args": {}},
            {"cat": "Session", "name": "model_run", "ts": ts, "dur": 30},
        ]

    events = [{"cat": "Session", "name": "session_initialization", "ts": 0, "dur": 5}]
    events += run(0) + run(100) + run(200)  # the first run (slow conv) is the warm-up
    nodes = parse_node_trace(events, runs=2, warmup=1)
    assert nodes == [{"name": "conv", "op_type": "Conv", "median_us": 10.0},
                     {"name": "relu", "op_type": "Relu", "median_us": 2.0}]


def test_measure_takes_a_module_and_exports_it() -> None:
    import torch
    from torch import nn

    import hwprune
    from hwprune.errors import HwpruneError

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    m = hwprune.measure(model, "host-cpu", example_inputs=torch.zeros(1, 3, 16, 16), measure__repeats=5)
    assert m.latency.median_ms > 0 and m.memory.weights_mb == pytest.approx((8 * 3 * 9 + 8 + 16 + 2) * 4 / 1e6)
    with pytest.raises(HwpruneError, match="example_inputs"):
        hwprune.measure(model, "host-cpu")
