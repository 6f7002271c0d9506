"""The fitted latency predictor on real ONNX Runtime measurements: held-out error, storage, estimate labels,
screening, transfer and the calibrate command."""

from __future__ import annotations

import copy
from typing import Any
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import GUARD_OFF_ARGS, budget_profile, run_cli
from hwprune.backends.estimate import EstimateBackend, roofline
from hwprune.backends.ort import OrtBackend
from hwprune.errors import HwpruneError, MeasurementError
from hwprune.export import export_onnx
from hwprune.predict import screen, transfer
from hwprune.predict import residual, store
from hwprune.predict.calibrate import (
    MAX_PROFILER_US,
    MAX_RUN_US,
    _chain,
    attribute_node_times,
    export_design,
    fit_measured,
    measure_each,
    measure_model,
    profiler_overhead_us,
    run_overhead_us,
    target_ms,
    without_profiler,
)
from hwprune.predict.designs import designs
from hwprune.predict.features import graph_features
from hwprune.predict.labels import FIRM_VALIDATION, estimate_label
from hwprune.predict.model import Predictor, Validation
from hwprune.profiles import load_profile

N_MODELS = 96
# every HELD_EVERY-th model is held out (16 of 96), spread over the run so that a host that slows down part way
# through (a shared CI machine) biases training and held-out models alike. With 14 training models of 20 the fit was
# no better than the roofline; once the designs gained wide 1x1 heads and encoders, the last 12 of 64 held out gave
# a median error of 0.07-0.15 here and 0.21 on a CI host: too few training models and too few held out for a stable
# median
HELD_EVERY = 6


def split(items: list) -> tuple[list, list]:
    """(training, held-out) items of the module's measured set."""
    return ([x for i, x in enumerate(items) if i % HELD_EVERY != HELD_EVERY - 1],
            [x for i, x in enumerate(items) if i % HELD_EVERY == HELD_EVERY - 1])


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory):
    """64 designed models measured on host-cpu with quick settings: (profile, [Measured], onnx paths)."""
    folder = tmp_path_factory.mktemp("predict")
    # quick settings, but 15 timed runs per model: a median of 5 moved 2x on a CI host's slow spell and biased the fit
    profile = load_profile(budget_profile(folder)).with_overrides(measure__repeats=15)
    backend = OrtBackend(profile)
    paths, out = [], []
    for d in designs(N_MODELS, profile.channel_multiple, seed=7):
        path = export_design(d, folder)
        paths.append(path)
        out.append(measure_model(d.name, path, profile, backend))
    return profile, out, paths



@pytest.fixture(scope="module")
def _fitted_once(measured) -> Predictor:
    profile, ms, _ = measured
    return fit_measured(profile, ms)


@pytest.fixture
def fitted(_fitted_once: Predictor) -> Predictor:
    """A predictor fitted on every measured model (a fit takes seconds; each test gets its own copy to change)."""
    return copy.deepcopy(_fitted_once)

def test_fitted_predictor_beats_the_roofline_on_held_out_models(measured) -> None:
    profile, ms, paths = measured
    train, held = split(ms)
    p = fit_measured(profile, train)
    # the held-out models are judged on the median of three interleaved measurements: one, taken in a slow spell of
    # a shared CI host, put the fit's median error at 0.28 where a re-run here gave 0.13
    backend, held_paths = OrtBackend(profile), split(paths)[1]
    rounds = [[m.measured_ms for m in held]] + [[target_ms(backend.measure(path)) for path in held_paths]
                                                 for _ in range(2)]
    truth = [float(np.median(r)) for r in zip(*rounds)]
    fitted = Validation.from_pairs([p.predict_features(m.features) for m in held], truth)
    roof = Validation.from_pairs([roofline(path, profile)["latency_ms"] for path in held_paths], truth)
    # measured here on three design seeds: the fit's median held-out error 0.06-0.14, the roofline's 0.26-0.33 (it
    # ignores kernel efficiency); these are 0.03-10 ms models timed with quick settings (run-to-run median 4%). A CI
    # host's slow spells moved it to 0.22 and 0.24 (0.12 on a re-run): its single rounds of the same model differ by
    # up to 1.5x, CPU time included, and the training models are measured once each. So the test holds the fit to
    # beating the roofline on the same truth; how far it beats it is docs/benchmarks.md's to show
    assert fitted.median_abs_error < 0.3
    assert fitted.median_abs_error < roof.median_abs_error
    assert p.validation is not None and p.validation.n_models == len(range(1, len(train), 4))


def test_residual_trees_bring_node_sums_to_the_whole_model_times(measured, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    profile, ms, paths = measured
    few = fit_measured(profile, split(ms)[0])  # under MIN_RESIDUAL_MODELS: too few to fit it without overfitting
    assert not few.has_residual
    assert few.nodes_us(ms[0].features) == few.base_nodes_us(ms[0].features)
    # the mechanism on this test's 80 training models (a real calibration measures ~500)
    monkeypatch.setattr(residual, "MIN_RESIDUAL_MODELS", 20)
    p = fit_measured(profile, split(ms)[0])
    assert p.has_residual and p.describe()["residual_trees"]

    def median_error(nodes_us) -> float:
        return float(np.median([abs(sum(nodes_us(m.features)) / 1e3 / m.measured_ms - 1) for m in split(ms)[0]]))

    # what the boosting minimises: each model's node sum against its measured time (the profiled node times, less
    # the profiler's per-node cost, are a biased target for small kernels)
    assert median_error(p.nodes_us) < 0.8 * median_error(p.base_nodes_us)
    # not stored: refitted from the stored node samples on load, to the same predictions
    q = store.load(store.save(p, tmp_path))
    assert q.has_residual and q.predict_ms(paths[-1]) == pytest.approx(p.predict_ms(paths[-1]))


def test_profiler_time_maps_onto_exported_nodes(measured) -> None:
    _, ms, _ = measured
    cnn = [m for m in ms if m.name.startswith("cnn")]
    # ORT fuses conv+bias+activation and reorders layouts; the mapping must still charge most kernel time to convs
    assert np.median([m.attributed_share for m in cnn]) > 0.8
    conv_us = [s.us for m in cnn for s in m.samples if s.keys[-1] == "Conv"]
    assert conv_us and min(conv_us) >= 0 and np.mean([u > 0 for u in conv_us]) > 0.9


def test_attribution_of_unknown_names_is_counted_as_lost(measured) -> None:
    _, ms, paths = measured
    times, lost = attribute_node_times(paths[0], ms[0].features, [{"name": "no-such-node", "median_us": 5.0}])
    assert times == {} and lost == 5.0


def test_store_round_trip_and_estimate_labels(measured, fitted, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    profile, ms, paths = measured
    monkeypatch.setenv("HWPRUNE_CACHE", str(tmp_path))
    assert EstimateBackend(profile).measure(paths[0]).extra["predictor"]["kind"] == "roofline"
    p = fitted
    path = store.save(p)
    assert path.parent == tmp_path / "predictors" and profile.name in path.name
    q = store.load(path)
    assert q.predict_ms(paths[1]) == pytest.approx(p.predict_ms(paths[1]))
    assert q.validation == p.validation and q.correction == p.correction
    m = EstimateBackend(profile).measure(paths[1])
    assert m.estimated and m.extra["predictor"]["kind"] == "fitted"
    assert m.extra["predictor"]["within_10pct"] == p.validation.within_10pct
    label = estimate_label(m.extra["predictor"])
    assert f"of {p.validation.n_models} held-out models" in label
    assert ("only" in label) == (p.validation.n_models < FIRM_VALIDATION)
    assert m.latency.median_ms == pytest.approx(p.predict_ms(paths[1]))
    assert store.find("raspberry-pi-4", 1) is None


def test_a_predictor_an_older_hwprune_stored_is_named_not_silently_skipped(measured, fitted, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    profile, _, paths = measured
    monkeypatch.setenv("HWPRUNE_CACHE", str(tmp_path))
    path = store.save(fitted)
    old = json.loads(path.read_text())
    old["format"] = store.FORMAT_VERSION - 1  # as the release before this attribution wrote it
    path.write_text(json.dumps(old))
    assert store.find(profile.name, profile.ort.intra_op_threads) is None
    assert store.stale(profile.name, profile.ort.intra_op_threads) == [path]
    m = EstimateBackend(profile).measure(paths[0])
    assert m.extra["predictor"]["kind"] == "roofline"
    label = estimate_label(m.extra["predictor"])
    assert str(path) in label and "older hwprune" in label and "calibrate` again" in label
    # a board transferred from it: one line naming the file, exit 2
    proc = run_cli("calibrate", "--device", "raspberry-pi-4", "--from", profile.name, "--out", str(tmp_path))
    assert proc.returncode == 2 and "older hwprune" in proc.stderr and str(path) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_fitted_trees_are_cached_beside_the_stored_predictor(measured, fitted, tmp_path: Path) -> None:
    """Refitting a stored predictor's trees took ~10 s in every process; they are cached beside its JSON, used only
    while they match its node samples and library versions, and refitted when the cache is torn."""
    profile, ms, paths = measured
    p = fitted
    path = store.save(p, tmp_path)
    cache = path.with_name(path.stem + ".fitted.pkl")
    assert cache.is_file()  # fitted during validation, so written with the JSON
    q = store.load(path)
    assert q.trees is None and q.fitted_cache is not None and q.fitted_cache.load() is not None
    assert q.predict_ms(paths[1]) == pytest.approx(p.predict_ms(paths[1]), rel=1e-9)
    # other node samples: the cache is not theirs
    stale = dataclasses.replace(q.fitted_cache, digest="0" * 64)
    assert stale.load() is None
    cache.write_bytes(b"torn")
    r = store.load(path)
    assert r.predict_ms(paths[1]) == pytest.approx(p.predict_ms(paths[1]), rel=1e-9)  # refitted
    assert r.fitted_cache is not None and r.fitted_cache.load() is not None  # and written again


def test_screen_and_update(measured, fitted) -> None:
    profile, ms, paths = measured
    p = fitted
    pred = p.predict_ms(paths[2])
    # well inside even with the error: one round may settle it; inside, but not by the error: the usual rounds
    assert screen(p, paths[2], budget_ms=pred * 10, error=0.2).action == "measure_once"
    assert screen(p, paths[2], budget_ms=pred * 1.2, error=0.2).action == "measure"
    assert screen(p, paths[2], budget_ms=pred * 0.99).action == "measure_last"
    assert screen(p, paths[2], budget_ms=pred * 0.01).action == "skip"
    n = p.fitted_on
    p.update([(paths[0], ms[0].measured_ms * 3)])  # a device three times slower on one model moves the correction
    assert p.fitted_on == n + 1


def test_transfer_learns_a_slower_device(measured, fitted) -> None:
    profile, ms, paths = measured
    host = fitted
    # a "device" exactly 2.5x slower than the host predictor says: 6 samples must get the rest within 10%
    samples = [(path, 2.5 * host.predict_ms(path)) for path in paths[:6]]
    dev = transfer(host, samples, profile="slow-board", threads=1)
    ratios = [dev.predict_ms(path) / host.predict_ms(path) for path in paths[6:]]
    assert np.median(ratios) == pytest.approx(2.5, rel=0.1)
    assert dev.transferred_from and dev.profile == "slow-board" and dev.fitted_on == 6
    # the same samples given as node features (what a caller holding no ONNX file has) fit the same predictor
    by_feats = transfer(host, [(graph_features(path, profile.channel_multiple), ms) for path, ms in samples],
                        profile="slow-board", threads=1)
    assert by_feats.correction == pytest.approx(dev.correction)


def test_features_tell_alignment_and_fusion(measured) -> None:
    profile, _, paths = measured
    feats = graph_features(paths[0], profile.channel_multiple)
    convs = [f for f in feats if f.op_type == "Conv"]
    assert convs and all(f.keys[0].endswith(("/a", "/u")) for f in convs)
    assert all((f.cin % 16 == 0 and f.cout % 16 == 0) == f.aligned for f in convs)
    assert all(f.basis[2] >= f.basis[1] for f in convs)  # padded MACs never fewer than MACs


def test_features_key_elementwise_ops_by_broadcast(tmp_path: Path) -> None:
    import torch
    from torch import nn

    from hwprune.export import export_onnx

    class SE(nn.Module):  # a squeeze-excite gate: [1, C, H, W] x [1, C, 1, 1], then a same-shape add and a scalar
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            gated = y * torch.sigmoid(y.mean((2, 3), keepdim=True))
            return (gated + x) / 3.0

    path = export_onnx(SE().eval(), (torch.randn(1, 8, 16, 16),), tmp_path / "se.onnx")
    keys = {f.op_type: f.keys for f in graph_features(path, 16) if f.op_type in ("Mul", "Add", "Div")}
    # measured: the broadcast Mul of the demo's squeeze-excite blocks takes ~4 us a node while the same-shape Muls of
    # decomposed activations are folded; one "Mul" regressor predicted ~0.2 us and the demo 16-21% too fast
    assert keys["Mul"] == ("Mul/bcast", "Mul")
    assert keys["Div"] == ("Div/scalar", "Div")
    assert keys["Add"][-1] == "Add" and keys["Add"][0] in ("Add/same", "Add@fused")


def test_calibrate_cli(tmp_path: Path) -> None:
    folder = tmp_path / "p"
    folder.mkdir()
    # seed 7: its first six designs (the fewest calibrate measures) are small, which keeps this test short
    proc = run_cli("calibrate", "--device", str(budget_profile(folder)), "--budget-seconds", "1", "--seed", "7",
                   "--out", str(tmp_path / "cache"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    files = list((tmp_path / "cache" / "predictors").glob("host-cpu-ort-*-t1.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["format"] == store.FORMAT_VERSION
    assert "within +-10%" in proc.stdout
    assert "the runtime's own cost per inference (no node's):" in proc.stderr
    assert "each model timed beside a reference model" in proc.stderr
    stored = json.loads(files[0].read_text())
    assert 0 < stored["run_overhead_ms"] == stored["prior"]["overhead_ms"]
    onnx = next(Path(tmp_path).rglob("*.onnx"), None)
    assert onnx is None  # calibration models live in a temporary folder, never beside --out


def _two_threads(folder: Path) -> Path:
    """The quick host-cpu profile as another "device": ONNX Runtime with 2 threads, under a name of its own."""
    path = folder / "two-threads.toml"
    text = budget_profile(folder).read_text()
    path.write_text(text.replace('name = "host-cpu"', 'name = "host-cpu-2t"', 1)
                    .replace("intra_op_threads = 1", "intra_op_threads = 2", 1))
    return path


def test_calibrate_transfers_the_host_predictor_to_another_device(measured, fitted, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    profile, ms, paths = measured
    root = tmp_path / "cache"
    host = fitted
    store.save(host, root)
    device = _two_threads(tmp_path)
    proc = run_cli("calibrate", "--device", str(device), "--from", "host-cpu", "--samples", "8", "--out", str(root),
                   timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "sample 8/8" in proc.stderr and "via ort" in proc.stderr
    assert "8 device measurements: fitted predictor transferred from host-cpu" in proc.stdout
    files = list((root / "predictors").glob("host-cpu-2t-ort-*-t2.json"))
    assert len(files) == 1
    dev = store.load(files[0])
    assert dev.transferred_from.startswith("host-cpu ort") and (dev.runtime, dev.threads) == ("ort", 2)
    assert dev.fitted_on == 8 and dev.validation is not None and dev.validation.n_models == 2
    # the host's node regressors are kept; the correction is the device's own, fitted to its measurements
    assert dev.node_samples == host.node_samples and dev.correction != host.correction
    assert 0.8 < np.median([dev.corrected(s.node_sums_ms) / s.measured_ms for s in dev.model_samples]) < 1.25
    # the host predictor is still there, and the estimate backend finds the device's under the device's name
    assert store.find("host-cpu", 1, root=root, runtime="ort").transferred_from is None
    monkeypatch.setenv("HWPRUNE_CACHE", str(root))
    m = EstimateBackend(load_profile(device)).measure(paths[0])
    assert m.extra["predictor"]["transferred_from"] == dev.transferred_from
    assert "transferred from host-cpu" in estimate_label(m.extra["predictor"])


@pytest.mark.parametrize("args", [("--budget-seconds", "0"), ("--device", "no-such-profile"),
                                  # a board: transferred from host-cpu's predictor, and there is none in --out
                                  ("--device", "raspberry-pi-4"),
                                  ("--from", "host-cpu"),  # the device itself
                                  ("--samples", "8"),  # samples count a transfer's measurements
                                  ("--device", "raspberry-pi-4", "--samples", "3")])
def test_calibrate_bad_input_exits_2(args: tuple[str, ...], tmp_path: Path) -> None:
    proc = run_cli("calibrate", *args, "--out", str(tmp_path / "c"))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "c").exists()


def test_profiler_cost_per_node_is_taken_off_before_fitting(measured, fitted) -> None:
    profile, ms, _ = measured
    overhead = profiler_overhead_us(ms)
    # measured on this host: ORT's profiler charges each profiled kernel 2-3.5 us of its own bookkeeping
    assert 0.5 < overhead <= MAX_PROFILER_US
    clean = without_profiler(ms[0], overhead)
    timed = [(a.us, a.kernels, b.us) for a, b in zip(ms[0].samples, clean.samples) if a.us > 0]
    assert timed and all(b == max(a - overhead * k, 0.5) for a, k, b in timed)
    assert fitted.profiler_us == pytest.approx(overhead)
    # the whole-model times hold the runtime's per-run cost, which no kernel shows: with it taken off them, more of
    # the profiled time is the profiler's (by the run cost over each model's kernel count)
    assert overhead < profiler_overhead_us(ms, run_us=5.0) <= overhead + 5.0


def test_run_overhead_is_the_cost_of_a_run_of_nothing(measured, fitted) -> None:
    """The runtime's fixed cost per inference: the intercept of trivial-node chains' time against their length. A
    predictor keeps it as its overhead per model, and its residual trees fit the rest of each model's time."""
    profile, ms, paths = measured
    backend = OrtBackend(profile)
    run_us = run_overhead_us(profile, backend)
    one_node_us = target_ms(backend.measure(_chain(1).SerializeToString())) * 1e3
    # measured here: 4.8 us, and 0.2 us per trivial node on top
    assert 0.5 < run_us < MAX_RUN_US and run_us < 1.5 * one_node_us
    p = fit_measured(profile, ms, run_us)
    q = fitted
    assert p.run_overhead_ms == pytest.approx(run_us / 1e3) and q.run_overhead_ms == 0.0
    assert p.prior["overhead_ms"] == pytest.approx(run_us / 1e3)
    assert p.profiler_us > q.profiler_us  # the kernels' share of each model is less the run cost
    # a model's prediction is the run cost plus its nodes: nothing is left below the run cost
    assert all(p.predict_features(m.features) > 0.5 * p.run_overhead_ms for m in ms[:8])
    # stored and loaded with it, and the fitted-trees cache is keyed by it (the residual trees depend on it)
    d = store.to_dict(p)
    assert store.from_dict(d).run_overhead_ms == p.run_overhead_ms
    from hwprune.predict.fitted import node_digest

    assert node_digest(d["node_samples"], p.run_overhead_ms) != node_digest(d["node_samples"], 0.0)


def test_screening_adds_measurements_and_saves(measured, fitted, tmp_path: Path) -> None:
    import optuna
    import torch

    from hwprune.study.budgets import Budgets
    from hwprune.study.screening import Screening

    profile, ms, paths = measured
    p = fitted
    n = p.fitted_on
    scr = Screening(p, paths[0], ms[0].measured_ms, log=lambda _: None, root=tmp_path)
    trial = optuna.create_study().ask()
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    scr.check(trial, net, torch.zeros(1, 3, 16, 16), Budgets(latency_ms=1e6, memory_mb=None), "torchscript")
    assert "screened" not in trial.user_attrs  # far within the budget: measured
    # an incumbent measured again: one round settles it when predicted well inside the budget, never otherwise
    assert scr.settle_ms_for(paths[1], Budgets(latency_ms=1e6, memory_mb=None)) == pytest.approx(0.9e6)
    predicted = p.predict_ms(paths[1]) * ms[0].measured_ms / p.predict_ms(paths[0])
    assert scr.settle_ms_for(paths[1], Budgets(latency_ms=predicted, memory_mb=None)) is None
    scr.record(OrtBackend(profile).measure(paths[1]))
    path = scr.finish()
    assert path is not None and store.load(path).fitted_on == n + 1
    with pytest.raises(optuna.TrialPruned):  # a budget no model meets: screened, never measured
        scr.check(trial, net, torch.zeros(1, 3, 16, 16), Budgets(latency_ms=1e-6, memory_mb=None), "torchscript")
    assert trial.user_attrs["screened"] > 0 and trial.user_attrs["fail_reason"].startswith("screened")


def test_screen_learns_its_error_on_the_searched_models_candidates(measured, fitted, tmp_path: Path) -> None:
    import optuna
    import torch

    from hwprune.study.budgets import Budgets
    from hwprune.study.screening import MIN_STUDY_SAMPLES, STUDY_ERROR_FLOOR, Screening

    profile, ms, paths = measured
    scr = Screening(fitted, paths[0], ms[0].measured_ms, log=lambda _: None, root=tmp_path)
    net, x = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()), torch.zeros(1, 3, 16, 16)
    measurement = OrtBackend(profile).measure(export_onnx(net.eval(), x, tmp_path / "net.onnx", exporter="torchscript"))
    study = optuna.create_study()

    def check(budget_ms: float) -> optuna.Trial:
        trial = study.ask()
        scr.check(trial, net, x, Budgets(latency_ms=budget_ms, memory_mb=None), "torchscript")
        return trial

    predicted = check(1e6).user_attrs["predicted_ms"]
    assert scr.study_error() == (1.0, None)  # nothing measured yet: the predictor's validation error applies
    # a candidate that measures 1.3x its prediction, 20% over this budget: the validation error cannot rule it out
    assert "screened" not in check(1.3 * predicted / 1.2).user_attrs
    # this model's candidates all measure 1.3x their prediction: after a few, the screen rescales and narrows
    for _ in range(MIN_STUDY_SAMPLES):
        scr.record(measurement, judged_ms=1.3 * check(1e6).user_attrs["predicted_ms"])
    bias, error = scr.study_error()
    assert bias == pytest.approx(1.3) and error == STUDY_ERROR_FLOOR
    # the records refitted the predictor's correction: the rescaled prediction now, and a budget 20% under it
    rescaled = check(1e6).user_attrs["predicted_ms"]
    with pytest.raises(optuna.TrialPruned):
        check(rescaled / 1.2)
    # the trial a skip leaves: the rescaled prediction, never a measurement
    skipped = study.trials[-1]
    assert skipped.user_attrs["screened"] == pytest.approx(rescaled)
    assert skipped.state != optuna.trial.TrialState.COMPLETE
    assert "its p90 error on 5 of this search's candidates, 5%" in skipped.user_attrs["fail_reason"]


def test_a_candidate_a_measured_trial_dominates_is_settled_on_one_measurement(measured, fitted,
                                                                              tmp_path: Path) -> None:
    """Its accuracy known, a candidate predicted clearly slower than a measured feasible trial at least as accurate
    and no larger cannot be on the front: one measurement that agrees settles it, however near the budget."""
    import optuna
    import torch

    from hwprune.backends.memory import graph_memory
    from hwprune.study.budgets import Budgets
    from hwprune.study.screening import DOMINATED_MARGIN, Screening

    _, ms, paths = measured
    scr = Screening(fitted, paths[0], ms[0].measured_ms, log=lambda _: None, root=tmp_path)
    net, x = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval(), torch.zeros(1, 3, 16, 16)
    memory = graph_memory(export_onnx(net, x, tmp_path / "net.onnx", exporter="torchscript")).total_mb
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    predicted = study.ask()
    scr.check(predicted, net, x, Budgets(latency_ms=1e6, memory_mb=None), "torchscript")
    ms_ = predicted.user_attrs["predicted_ms"]
    budgets = Budgets(latency_ms=ms_, memory_mb=None)  # on the budget's edge: nothing settles it as inside
    scr.check(study.ask(), net, x, budgets, "torchscript")

    def done(accuracy: float, latency_ms: float, memory_mb: float) -> Any:
        study.tell(study.ask(), [accuracy, latency_ms, memory_mb])
        return study.trials[-1]

    fast = done(0.9, 0.1 * ms_, memory)  # clearly faster whatever the error allowed (under 85%)
    assert scr.settles_for(0.95, [fast], budgets) is None  # the candidate is more accurate: it may be on the front
    assert scr.settles_for(0.9, [done(0.9, 0.1 * ms_, 2 * memory)], budgets) is None  # the trial is larger
    # a trial this run's budgets do not admit (here under an accuracy guard that judges trials) dominates nothing;
    # the candidate, under that guard too, is settled as one that cannot be listed
    assert scr.settles_for(0.85, [fast], dataclasses.replace(budgets, accuracy_floor=0.95)) is not None
    assert scr.under_guard and scr.dominated_by(ms_) is None
    assert scr.settles_for(0.9, [done(0.9, 0.97 * ms_, memory)], budgets) is None  # not clearly faster
    settles = scr.settles_for(0.85, [done(0.9, 0.5 * ms_, memory), fast], budgets)
    assert settles is not None
    assert settles(ms_) and scr.dominated_by(ms_) == fast.number  # the fastest dominating trial is named
    # a measurement that does not put the candidate clearly slower than that trial settles nothing
    assert not settles(0.1 * ms_ * (1 + DOMINATED_MARGIN) * 0.99) and scr.dominated_by(0.105 * ms_) is None


def test_a_candidate_that_cannot_be_listed_is_settled_on_one_measurement(measured, fitted, tmp_path: Path) -> None:
    """Under the accuracy guard's floor, a candidate is listed only as a final candidate: where the guard judges each
    trial it is infeasible, and where it judges the final fine-tune the draw reaches it only with fewer than
    FINALIST_DEPTH x finalists distinct architectures at least as accurate and feasible ahead of it. Then its
    latency only guides the sampler and any one measurement settles it."""
    import optuna
    import torch

    from hwprune.study.budgets import Budgets
    from hwprune.study.screening import FINALIST_DEPTH, Screening

    _, ms, paths = measured
    scr = Screening(fitted, paths[0], ms[0].measured_ms, log=lambda _: None, root=tmp_path, finalists=1)
    net, x = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval(), torch.zeros(1, 3, 16, 16)
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    predicted = study.ask()
    scr.check(predicted, net, x, Budgets(latency_ms=1e6, memory_mb=None), "torchscript")
    ms_ = predicted.user_attrs["predicted_ms"]
    # on the budget's edge, so nothing settles the candidate as inside it; the guard judges the final fine-tune
    budgets = Budgets(latency_ms=ms_, memory_mb=None, accuracy_floor=0.8, guard_trials=False)
    scr.check(study.ask(), net, x, budgets, "torchscript")

    def done(accuracy: float, latency_ms: float, signature: str) -> Any:
        trial = study.ask()
        trial.set_user_attr("signature", signature)
        study.tell(trial, [accuracy, latency_ms, 1.0])
        return study.trials[-1]

    a, a_again, b = done(0.9, 0.5 * ms_, "a"), done(0.9, 0.5 * ms_, "a"), done(0.88, 0.6 * ms_, "b")
    over = done(0.95, 2 * ms_, "c")  # over the latency budget: not drawn before the candidate
    assert FINALIST_DEPTH * scr.finalists == 2
    assert scr.settles_for(0.85, [a, b], budgets) is None and not scr.under_guard  # above the floor
    assert scr.settles_for(0.7, [a, a_again, over], budgets) is None  # one architecture ahead, counted once
    settles = scr.settles_for(0.7, [a, a_again, b, over], budgets)
    assert settles is not None and scr.under_guard and settles(10 * ms_)  # any measurement settles it
    assert scr.settles_for(0.7, [a, b], budgets, uniform=True) is None  # a uniform model is the baseline finalist
    # the guard judging each trial: under its floor is infeasible, with nothing ahead; no guard: nothing settles
    assert scr.settles_for(0.7, [], dataclasses.replace(budgets, guard_trials=True)) is not None
    assert scr.settles_for(0.7, [a, b], dataclasses.replace(budgets, accuracy_floor=None)) is None
    assert scr.settles_for(0.7, [a, b], budgets) is not None
    scr.check(study.ask(), net, x, budgets, "torchscript")  # the next candidate starts afresh
    assert not scr.under_guard


def test_search_with_screen_on_records_screened_trials(measured, fitted, tmp_path: Path) -> None:
    import pandas as pd

    profile, ms, _ = measured
    store.save(fitted, tmp_path / "cache")
    out = tmp_path / "out"
    # 0.05x of the tiny CNN: no candidate comes near it, so every one is predicted far over and screened
    proc = run_cli("search", "--model", "tiny_subject:tiny_cnn", *GUARD_OFF_ARGS, "--latency-budget-ms", "0.05x",
                   "--trials", "3", "--screen", "on", "--out", str(out), "--quiet",
                   env={"HWPRUNE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode in (0, 3), proc.stderr
    assert "screening: candidates predicted well over" in proc.stderr
    run_dir = next(p.parent for p in out.rglob("trials.csv"))
    trials = pd.read_csv(run_dir / "trials.csv")
    screened = trials[trials.fail_reason.fillna("").str.startswith("screened")]
    assert len(screened) > 0 and (screened.state == "PRUNED").all()
    assert screened.latency_ms.isna().all()  # never a latency: a prediction is not a measurement
    # the summary and the report say what the screen spared the device
    summary = json.loads((run_dir / "summary.json").read_text())["search"]["screen"]
    assert summary["skipped"] == len(screened) and summary["predicted"] >= len(screened)
    assert summary["held_out_p90_error"] is not None and summary["held_out_models"] > 0
    assert f"{len(screened)} of {summary['predicted']} candidates skipped unmeasured" in \
        (run_dir / "report.html").read_text()



def test_a_device_without_a_predictor_is_screened_by_the_hosts_standing_in(measured, fitted, tmp_path: Path) -> None:
    """No predictor stored for the device: the host's screens, relative to the dense model measured on the device,
    allowing for an unvalidated predictor's error; it learns nothing from the device and is not saved over."""
    import pandas as pd

    from hwprune.profiles import load_profile as load

    cache = tmp_path / "cache"
    host_file = store.save(fitted, cache)
    before = host_file.read_bytes()
    text = budget_profile(tmp_path).read_text()
    device = tmp_path / "other-cpu.toml"
    device.write_text(text.replace('name = "host-cpu"', 'name = "other-cpu"', 1))
    assert load(device).name == "other-cpu"
    out = tmp_path / "out"
    proc = run_cli("search", "--model", "tiny_subject:tiny_cnn", *GUARD_OFF_ARGS, "--device", str(device),
                   "--latency-budget-ms", "0.05x", "--trials", "3", "--screen", "on", "--out", str(out), "--quiet",
                   env={"HWPRUNE_CACHE": str(cache)})
    assert proc.returncode in (0, 3), proc.stderr
    assert "no stored ort predictor for other-cpu; the host-cpu predictor stands in" in proc.stderr.replace("\n", " ")
    run_dir = next(p.parent for p in out.rglob("trials.csv"))
    trials = pd.read_csv(run_dir / "trials.csv")
    screened = trials[trials.fail_reason.fillna("").str.startswith("screened")]
    assert len(screened) > 0 and screened.fail_reason.str.contains("a predictor of another device").all()
    summary = json.loads((run_dir / "summary.json").read_text())["search"]["screen"]
    assert summary["stand_in"] == "host-cpu" and summary["held_out_p90_error"] is None
    assert "standing in for this device" in (run_dir / "report.html").read_text()
    # the host's predictor is as it was, and nothing was stored for the device
    assert host_file.read_bytes() == before
    assert not [f for f in (cache / "predictors").glob("*.json") if "other-cpu" in f.name]

def test_a_screened_search_settles_candidates_under_the_guard_on_one_measurement(fitted, tmp_path: Path) -> None:
    """With the guard judging each trial (no final fine-tune), a candidate under its floor is infeasible whatever its
    latency: the search settles each such candidate on one measurement or round and says so; a uniform model (the
    baseline finalist) and a candidate within the guard are judged in full."""
    import pandas as pd

    store.save(fitted, tmp_path / "cache")
    out = tmp_path / "out"
    # a guard a hair below the dense accuracy: most pruned candidates fall under it; at 0.8x some land near the
    # budget, where only this rule settles them on one measurement (measured: one at 0.79x alone, another within
    # the guard at 0.66x in three rounds)
    proc = run_cli("search", "--model", "tiny_subject:tiny_cnn", "--recovery", "none", "--max-accuracy-drop",
                   "0.0001", "--latency-budget-ms", "0.8x", "--screen", "on", "--out", str(out), "--quiet",
                   "--final-finetune-steps", "0", "--trials", "7", "--seed", "1",
                   env={"HWPRUNE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode in (0, 3), proc.stderr
    summary = json.loads(next(out.rglob("summary.json")).read_text())
    floor = summary["accuracy_guard"]["floor"]
    table = pd.read_csv(next(out.rglob("trials.csv")))
    rows = table[(table.state == "COMPLETE") & table.cached_from.isna()]
    sampled = rows[rows.uniform_ratio.isna()]
    under = sampled.accuracy < floor
    assert under.any(), sampled[["accuracy", "latency_rounds"]]  # what the test is about
    assert (sampled.under_guard.notna() == under).all(), sampled[["accuracy", "under_guard", "latency_rounds"]]
    assert (sampled[under].latency_rounds <= 1).all()
    assert rows[rows.uniform_ratio.notna()].under_guard.isna().all()
    assert summary["search"]["screen"]["under_guard"] == int(under.sum())


def test_a_resumed_screened_search_starts_from_its_earlier_errors(measured, fitted, tmp_path: Path) -> None:
    import optuna

    from hwprune.study.screening import RATIO_ATTR

    profile, ms, _ = measured
    store.save(fitted, tmp_path / "cache")
    out, env = tmp_path / "out", {"HWPRUNE_CACHE": str(tmp_path / "cache")}
    # a budget every candidate meets: each is predicted, measured, and keeps its measured / predicted ratio
    args = ("search", "--model", "tiny_subject:tiny_cnn", *GUARD_OFF_ARGS, "--latency-budget-ms", "20x",
            "--screen", "on", "--out", str(out), "--quiet", "--final-finetune-steps", "0")
    first = run_cli(*args, "--trials", "3", env=env)
    assert first.returncode == 0, first.stderr
    assert "earlier measured candidates" not in first.stderr
    db = next(out.rglob("*.db"))
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{db}")
    ratios = [t.user_attrs[RATIO_ATTR] for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
              if RATIO_ATTR in t.user_attrs]
    assert ratios and all(0.1 < r < 10 for r in ratios)
    # predicted and then measured far inside the budget, a candidate is settled by one measurement alone, judged
    # against the dense reference, instead of three rounds beside the dense model (fewer board-seconds); the trials
    # table says so, and its judged latency is then the measurement's own. (A measurement that falls in a slow spell
    # of a shared host does not settle and goes on to the rounds: not every candidate need settle alone.)
    import pandas as pd

    table = pd.read_csv(next(out.rglob("trials.csv")))
    measured_rows = table[(table.state == "COMPLETE") & table.cached_from.isna()]
    alone = measured_rows[measured_rows.latency_rounds == 0]
    assert len(alone), measured_rows.latency_rounds
    assert (alone.latency_judged_ms - alone.latency_ms).abs().max() < 1e-9
    summary = json.loads(next(out.rglob("summary.json")).read_text())["search"]["screen"]
    assert summary["alone"] == len(alone) and summary["skipped"] == 0
    # with the screen on, candidates are evaluated before they are measured, so a dominated one could be settled:
    # the table names the trial that dominated it, and the summary counts them
    assert "dominated_by" in table and summary["dominated"] == int(measured_rows.dominated_by.notna().sum())
    # with the accuracy guard off, no candidate is under it
    assert summary["under_guard"] == int(measured_rows.under_guard.notna().sum()) == 0
    again = run_cli(*args, "--trials", "4", env=env)  # the same command with more trials resumes the study
    assert again.returncode == 0, again.stderr
    assert f"screening: {len(ratios)} earlier measured candidates of this study" in again.stderr


def test_screen_bad_value_exits_2(tmp_path: Path) -> None:
    proc = run_cli("search", "--model", "tiny_subject:tiny_cnn", "--screen", "maybe", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_designs_that_fail_to_measure_three_in_a_row_end_the_measuring(tmp_path: Path) -> None:
    """The loop calibrations and transfers share: a design that fails to measure is skipped, but three in a row say
    the device went away, and the measuring ends with a one-line error instead of using up its budget."""
    profile = load_profile("host-cpu")
    backend = OrtBackend(profile)
    calls: list[str] = []

    def flaky(d, path: Path) -> float:
        calls.append(d.name)
        # the second design fails once (a glitch: skipped), then the device goes away from the fifth on
        if len(calls) == 2 or len(calls) >= 5:
            raise MeasurementError(f"{d.name}: board went away")
        return target_ms(backend.measure(path))

    skipped: list[str] = []
    taken = []
    with pytest.raises(HwpruneError, match="3 designed models in a row failed to measure"):
        for d, ms in measure_each(designs(20, profile.channel_multiple, 0), tmp_path, flaky, "board", skipped.append):
            taken.append((d.name, ms))
    backend.close()
    assert len(taken) == 3 and all(ms > 0 for _, ms in taken) and len(calls) == 7
    assert [line.split(":")[0] for line in skipped] == [calls[1], calls[4], calls[5], calls[6]]
