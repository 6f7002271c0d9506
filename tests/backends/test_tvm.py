"""The local TVM backend: same outputs as ONNX Runtime, labelled untuned/tuned, compile cache, persistent tuning DB."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm", reason="Apache TVM is not installed (pip install -e '.[tvm]')")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from hwprune.errors import BackendUnavailable  # noqa: E402
from hwprune.profiles import load_profile  # noqa: E402
from conftest import GUARD_OFF_ARGS


class SmallConvNet(nn.Module):
    """Conv-BN-ReLU, a strided conv, a depthwise conv, a residual add, pooling and a linear head."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.stem(x))
        x = F.relu(x + self.dw(x))
        return self.head(x.mean(dim=(2, 3)))


class TfSamePad(nn.Module):
    """TF-style "same" padding computed from the input size at runtime (as timm's Conv2dSame does)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        # Integer arithmetic on the traced sizes (no Python max/ceil): the tracer records it as graph ops.
        ph = (-(ih // -2) - 1) * 2 + 3 - ih
        pw = (-(iw // -2) - 1) * 2 + 3 - iw
        return self.conv(F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]))


def _seeded(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics so the BN folding is exercised
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return module.eval()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HWPRUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def convnet_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("convnet") / "convnet.onnx"
    model = _seeded(SmallConvNet())
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(path), dynamo=True, input_names=["input"])
    return path


def _profile():
    # One thread in both runtimes, few repeats: the numbers are checked for shape, not speed.
    return load_profile("host-cpu").with_overrides(backend="tvm", measure__repeats=10, measure__warmup=2)


def test_tvm_matches_onnxruntime_and_is_labelled_untuned(convnet_onnx: Path) -> None:
    from hwprune.export import input_feed
    from hwprune.backends import create_backend
    from hwprune.backends.ort import OrtBackend
    from hwprune.backends.tvm import TvmBackend

    profile = _profile()
    backend = create_backend(profile)
    assert isinstance(backend, TvmBackend)
    feed = input_feed(convnet_onnx, seed=3)
    tvm_out = backend.run(convnet_onnx, feed)
    ort_out = OrtBackend(profile.with_overrides(backend="ort")).run(convnet_onnx, feed)
    assert len(tvm_out) == len(ort_out) == 1
    np.testing.assert_allclose(tvm_out[0], ort_out[0], rtol=1e-4, atol=1e-5)

    m = backend.measure(convnet_onnx)
    assert m.backend == "tvm" and m.device == "host-cpu" and m.tuned is False and not m.estimated
    assert m.latency.repeats == 10 and m.latency.warmup == 2
    assert 0 < m.latency.min_ms <= m.latency.median_ms <= m.latency.p90_ms
    assert m.memory.weights_mb > 0 and m.memory.peak_activations_mb > 0
    assert m.threads == 1  # the profile's target says num-cores = 1
    assert m.extra["tvm"] and m.extra["compile_cached"] is True  # run() above compiled it already
    d = m.to_dict()
    json.dumps(d)  # a Measurement must serialise as is into the run folder
    assert d["tuned"] is False


def test_compile_cache_skips_recompilation(convnet_onnx: Path, tmp_path: Path) -> None:
    from hwprune.backends.tvm import TvmBackend, profile_cache_dir

    profile = _profile()
    first = TvmBackend(profile).measure(convnet_onnx)
    assert first.extra["compile_cached"] is False and first.stage_seconds["compile"] > 0
    assert {"compile", "load", "timing"} <= set(first.stage_seconds)
    assert {"import", "compile", "export"} <= set(first.extra["compile_detail"])
    second = TvmBackend(profile).measure(convnet_onnx)  # a new backend: the cache is on disk, not in memory
    assert second.extra["compile_cached"] is True and second.stage_seconds["compile"] == 0.0
    assert second.extra["library_key"] == first.extra["library_key"]
    libs = list((profile_cache_dir(profile) / "compiled").glob("*.so"))
    assert len(libs) == 1 and str(profile_cache_dir(profile)).startswith(str(tmp_path))
    # Another target is another library.
    other = TvmBackend(profile.with_overrides(tvm__target={"kind": "llvm", "num-cores": 1})).measure(convnet_onnx)
    assert other.extra["library_key"] != first.extra["library_key"]


def test_torchscript_dynamic_pads_are_folded_for_tvm(tmp_path: Path) -> None:
    """The legacy exporter's runtime-computed Pad amounts import after constant folding with static shapes."""
    from hwprune.export import input_feed
    from hwprune.backends.ort import OrtBackend
    from hwprune.backends.tvm import TvmBackend

    path = tmp_path / "same.onnx"
    with warnings.catch_warnings():  # the tracer's and the legacy exporter's warnings are expected here
        warnings.simplefilter("ignore")
        torch.onnx.export(_seeded(TfSamePad()), (torch.randn(1, 3, 17, 17),), str(path), dynamo=False,
                          input_names=["input"], opset_version=17)
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    raw = onnx.load(str(path))
    assert any(n.op_type == "Pad" for n in raw.graph.node)
    with pytest.raises(Exception, match="[Dd]ynamic"):
        from_onnx(raw, shape_dict={"input": [1, 3, 17, 17]})  # what TVM does with the exporter's graph as is
    feed = input_feed(path)
    out = TvmBackend(_profile()).run(path, feed)
    ref = OrtBackend(load_profile("host-cpu")).run(path, feed)
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-4, atol=1e-5)


def test_local_tvm_refuses_a_board_target() -> None:
    from hwprune.backends.tvm import TvmBackend

    with pytest.raises(BackendUnavailable, match="tvm-rpc"):
        TvmBackend(load_profile("raspberry-pi-4").with_overrides(backend="tvm"))


def test_doctor_local_backends() -> None:
    from hwprune.doctor import doctor, format_checks

    for backend in ("ort", "tvm"):
        checks = doctor(load_profile("host-cpu").with_overrides(backend=backend))
        assert all(c.ok for c in checks), format_checks(checks)
        assert any("tiny model" in c.detail for c in checks)
    text = format_checks(checks)
    assert text.endswith("all checks passed") and "untuned" in text


@pytest.mark.slow
def test_metaschedule_database_persists_and_is_reused(tmp_path: Path) -> None:
    """Tune a tiny model with a few trials; the database persists; a second build (and a second model with the same
    layer shapes) reuses every record instead of tuning again."""
    from hwprune.doctor import write_tiny_model
    from hwprune.export import input_feed
    from hwprune.backends.ort import OrtBackend
    from hwprune.backends.tvm import TvmBackend, TvmCompiler, tuning_db_dir

    model = write_tiny_model(tmp_path / "a.onnx", channels=8, size=16, seed=0)
    profile = load_profile("host-cpu-tvm").with_overrides(tvm__tuning_trials=8, measure__repeats=10,
                                                          measure__min_repeat_ms=0.0)
    m = TvmBackend(profile).measure(model)
    assert m.tuned is True and m.stage_seconds["tune"] > 0
    tuning = m.extra["tuning"]
    assert tuning["tasks"] > 0 and tuning["tasks_tuned"] == tuning["tasks"] and tuning["tasks_reused"] == 0
    db = tuning_db_dir(profile)
    records = (db / "database_tuning_record.json").read_text().splitlines()
    assert str(db).startswith(str(tmp_path)) and len(records) >= tuning["tasks"]
    assert (db / "database_workload.json").stat().st_size > 0

    # Same model, compile cache bypassed: every task comes from the database.
    again = TvmCompiler(profile).build(model, use_cache=False)
    assert again.tuned and again.info["tuning"]["tasks_reused"] == tuning["tasks"]
    assert again.info["tuning"]["tasks_tuned"] == 0 and again.stage_seconds["tune"] < m.stage_seconds["tune"]

    # Same layer shapes, other weights (what a search's repeated widths produce): no tuning either.
    twin = write_tiny_model(tmp_path / "b.onnx", channels=8, size=16, seed=1)
    m2 = TvmBackend(profile).measure(twin)
    assert m2.tuned and m2.extra["compile_cached"] is False
    assert m2.extra["tuning"]["tasks_tuned"] == 0 and m2.extra["tuning"]["tasks_reused"] == tuning["tasks"]
    feed = input_feed(twin)
    np.testing.assert_allclose(TvmBackend(profile).run(twin, feed)[0],
                               OrtBackend(load_profile("host-cpu")).run(twin, feed)[0], rtol=1e-4, atol=1e-5)
    assert len((db / "database_tuning_record.json").read_text().splitlines()) == len(records)


def test_tune_final_needs_a_tvm_backend(tmp_path: Path) -> None:
    from conftest import run_cli

    proc = run_cli("search", "--model", "tiny_subject:tiny_cnn", *GUARD_OFF_ARGS, "--device", "host-cpu",
                   "--latency-budget-ms", "2x", "--trials", "1", "--tune-final", "4", "--out", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--tune-final" in proc.stderr and "--backend tvm" in proc.stderr


@pytest.mark.slow
def test_tune_final_tunes_only_the_recommended_model(tmp_path: Path) -> None:
    """An untuned search ranks candidates; --tune-final then tunes the recommended one and reports both numbers."""
    from conftest import load_summary, run_cli

    proc = run_cli("search", "--model", "tiny_subject:tiny_cnn", *GUARD_OFF_ARGS, "--device", "host-cpu-tvm",
                   "--tuning-trials", "0", "--allow-untuned",
                   "--latency-budget-ms", "2x", "--trials", "2", "--final-finetune-steps", "0", "--tune-final", "4",
                   "--out", str(tmp_path), "--study", "tf", env={"HWPRUNE_CACHE": str(tmp_path / "cache")},
                   timeout=1500, check=True)
    summary = load_summary(tmp_path / "tf")
    rec = next(r for r in summary["pareto"] if r["recommended"])
    assert rec["tuned"] is False  # the search itself ranked on untuned numbers, labelled so
    tuned = rec["final_tuned"]
    assert tuned["tuned"] is True and tuned["tuning_trials"] == 4 and tuned["latency_ms"]["median"] > 0
    assert tuned["tuning"]["tasks"] > 0
    assert all("final_tuned" not in r for r in summary["pareto"] if not r["recommended"])
    assert "tuned on the device (4 MetaSchedule trials" in proc.stdout
    assert "was tuned on the device after the search" in (tmp_path / "tf" / "report.md").read_text()


def test_native_target_is_this_cpu() -> None:
    """host-cpu compiles for the CPU it runs on: a fixed mcpu (znver4) once emitted AVX-512 on an AVX2 host."""
    from tvm.target import codegen

    from hwprune.backends.tvm import make_target, resolved_targets, target_signature

    profile = load_profile("host-cpu")
    assert profile.tvm.target["mcpu"] == "native"
    target, _ = resolved_targets(profile)
    assert target["mcpu"] == codegen.llvm_get_system_cpu() != "native"
    assert str(make_target(profile).attrs["mcpu"]) == target["mcpu"]
    fixed = profile.with_overrides(tvm__target={"kind": "llvm", "mcpu": target["mcpu"], "num-cores": 1})
    assert target_signature(fixed) == target_signature(profile)  # the same code, the same tuning records
