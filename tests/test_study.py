"""The study's pieces on real parts: replayable candidates, and uniform warm-start trials aimed at the budget."""

from __future__ import annotations

from pathlib import Path

import optuna
import torch
from torch.utils.data import DataLoader, TensorDataset

from hwprune.backends.base import Latency, Measurement, Memory
from hwprune.pruning import PruningSpace
from hwprune.study.objective import Budgets, TrialRunner, bracket_budget, warm_start
from hwprune.subjects.loader import load_subject
from hwprune.subjects.shapes import make_shapes


def _runner(seed: int = 0, finetune_steps: int = 6) -> TrialRunner:
    subject = load_subject("tiny_subject:tiny_cnn_trained")
    # shuffled by torch's global RNG, like most users' training data
    x, y = make_shapes(256, seed=5)
    subject.train_data = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    space = PruningSpace.build(subject.model, subject.example_inputs, channel_multiple=8, max_ratio=0.75)
    return TrialRunner(subject=subject, space=space, measure=lambda p: None, budgets=Budgets(None, None),  # type: ignore[arg-type,return-value]
                       calibration_batches=2, finetune_steps=finetune_steps, seed=seed)


def test_rebuilding_a_candidate_replays_its_fine_tune() -> None:
    """Finalize exports a rebuilt model: its weights must be the ones the trial evaluated, not a new fine-tune."""
    runner = _runner()
    ratios = runner.space.uniform(0.4)
    torch.manual_seed(123)  # whatever state the global RNG is in, the rebuild must not depend on it
    first = runner.build(ratios).module.state_dict()
    torch.randn(1000)
    again = runner.build(ratios).module.state_dict()
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    # the shuffled fine-tune really ran: another search seed sees other batches and ends elsewhere
    other_seed = _runner(seed=1).build(ratios).module.state_dict()
    assert any(not torch.equal(first[k], other_seed[k]) for k in first if first[k].is_floating_point())


def _measured(latency_ms: float) -> Measurement:
    lat = Latency.from_samples([latency_ms] * 5, warmup=1)
    return Measurement("ort", "host-cpu", lat, Memory(1.0, 1.0))


def test_warm_start_spans_the_space_and_bracket_aims_at_the_budget(tmp_path: Path) -> None:
    runner = _runner()
    space = runner.space
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", directions=["maximize", "minimize",
                                                                                     "minimize"])
    warm_start(study, space)
    queued = [t for t in study.get_trials(deepcopy=False)]
    assert [t.user_attrs["uniform_ratio"] for t in queued] == [0.25, 0.5, 0.75]

    # latencies a measurement could give for the three uniform models of a 10 ms dense model
    fake = {0.25: 8.0, 0.5: 6.0, 0.75: 4.0}

    def objective(trial: optuna.Trial) -> tuple[float, float, float]:
        for k in space.knobs:
            trial.suggest_float(k.name, 0.0, k.max_ratio)
        return 0.5, fake[trial.user_attrs["uniform_ratio"]], 1.0

    study.optimize(objective, n_trials=3)
    assert bracket_budget(study, space, 10.0, None) == []  # no latency budget: nothing to aim at
    ratios = bracket_budget(study, space, 10.0, 5.0)
    # 5 ms lies halfway between the 0.5 (6 ms) and 0.75 (4 ms) uniform models: aim at 0.625, and a step deeper
    assert ratios == [0.625, 0.6875]
    waiting = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.WAITING]
    assert sorted(t.user_attrs["uniform_ratio"] for t in waiting) == ratios
    assert all(set(t.system_attrs["fixed_params"].values()) == {t.user_attrs["uniform_ratio"]} for t in waiting)
    assert bracket_budget(study, space, 10.0, 5.0) == []  # once per study, also for resumed runs and other workers
    # a budget no uniform model reaches queues nothing
    fresh = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    warm_start(fresh, space)
    fresh.optimize(objective, n_trials=3)
    assert bracket_budget(fresh, space, 10.0, 3.0) == []


def test_dense_reference_takes_sets_over_the_search_and_reports_the_middle(tmp_path: Path) -> None:
    from hwprune.backends.ort import OrtBackend
    from hwprune.export import export_onnx
    from hwprune.profiles import load_profile
    from hwprune.study.reference import DenseReference

    subject = load_subject("tiny_subject:tiny_cnn_trained")
    path = export_onnx(subject.model, subject.example_inputs, tmp_path / "dense.onnx")
    backend = OrtBackend(load_profile("host-cpu").with_overrides(measure__repeats=5, measure__warmup=1))
    ref = DenseReference(path, backend.measure, every=4)
    ref.start()
    assert len(ref.sets) == 3
    assert [ref.after_trial(n) for n in range(1, 9)] == [False, False, False, True, False, False, False, True]
    assert len(ref.sets) == 5
    medians = sorted(ref.medians_ms)
    assert ref.measurement.latency.median_ms == medians[2]  # the middle set, whatever the order they came in
