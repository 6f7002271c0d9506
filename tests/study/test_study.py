"""The study's pieces on real parts: replayable candidates, and uniform warm-start trials aimed at the budget."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from hwprune.backends.base import Latency, Measurement, Memory
from hwprune.pruning import PruningSpace
from hwprune.study.objective import (BRACKET_STEPS, Budgets, TrialRunner, bracket_budget,
                                     uniform_architectures_between, warm_start)
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
    subject = _runner().subject
    # channel multiple 1: every ratio step is a new architecture (48 channels a group)
    space = PruningSpace.build(subject.model, subject.example_inputs, channel_multiple=1, max_ratio=0.75)
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
    assert bracket_budget(study, space, 10.0, Budgets(None, None)) == []  # no latency budget: nothing to aim at
    ratios = bracket_budget(study, space, 10.0, Budgets(5.0, None))
    # 5 ms lies halfway between the 0.5 (6 ms) and 0.75 (4 ms) uniform models: aim at 0.625
    assert ratios == [0.625]
    waiting = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.WAITING]
    assert [t.user_attrs["uniform_ratio"] for t in waiting] == ratios
    assert set(waiting[0].system_attrs["fixed_params"].values()) == {0.625}
    # one at a time: a uniform trial is still queued
    assert bracket_budget(study, space, 10.0, Budgets(5.0, None)) == []

    # bisection goes on as the queued trials are measured; a cliff (5.5 ms just above the budget, 4 ms below)
    # must not stop it short of the least pruning that meets the budget
    edge = sum(space.kept_widths(space.uniform(0.7)))

    def cliff(r: float) -> float:  # by architecture, as a measurement would be
        return 5.5 if sum(space.kept_widths(space.uniform(r))) > edge else 4.0

    fake[0.625] = cliff(0.625)
    steps = [0.625]
    while True:
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
            fake.setdefault(t.user_attrs["uniform_ratio"], cliff(t.user_attrs["uniform_ratio"]))
        study.optimize(objective, n_trials=1)
        queued = bracket_budget(study, space, 10.0, Budgets(5.0, None))
        if not queued:
            break
        fake[queued[0]] = cliff(queued[0])
        steps += queued
    assert steps == study.user_attrs["bracketed"] and len(steps) <= BRACKET_STEPS
    assert all(0.625 <= r < 0.75 for r in steps) and steps == sorted(steps)
    best = min(r for r, lat in fake.items() if lat <= 5.0)
    missed = max(r for r, lat in fake.items() if lat > 5.0 and r < best)
    # down to adjacent architectures: none lies between the least pruning that met the budget and the most that missed
    assert uniform_architectures_between(space, missed, best) == [] and len(steps) < BRACKET_STEPS
    assert space.kept_widths(space.uniform(best)) == space.kept_widths(space.uniform(0.7))  # the cliff's own edge
    assert bracket_budget(study, space, 10.0, Budgets(5.0, None)) == []  # done, also for resumed runs and other workers
    # ratios that round to the widths already measured at an end of the interval are skipped without a trial
    coarse = _runner().space  # multiple 8: uniform 0.5 keeps 24 channels, 0.625 and 0.75 keep 16
    twin = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    warm_start(twin, coarse)
    fake.update({0.25: 8.0, 0.5: 6.0, 0.75: 4.0})
    twin.optimize(objective, n_trials=3)
    assert bracket_budget(twin, coarse, 10.0, Budgets(5.0, None)) == []
    # a budget no uniform model reaches queues no uniform trial (the space has no blocks to probe here)
    fresh = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    warm_start(fresh, space)
    fresh.optimize(objective, n_trials=3)
    assert bracket_budget(fresh, space, 10.0, Budgets(3.0, None)) == []
    assert not fresh.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))


def test_relative_budgets_judge_the_ratio_to_the_dense_model_measured_beside(tmp_path: Path) -> None:
    relative = Budgets(4.0, None, latency_factor=0.4)  # "0.4x" of a 10 ms dense reference
    assert relative.judged_ms(3.5, 0.42) == pytest.approx(4.2)
    assert relative.meets(3.5, 1.0, ratio=0.42) == (False, True)  # fast as measured, but the host was fast too
    assert relative.meets(4.6, 1.0, ratio=0.38) == (True, True)  # slow as measured, during a slow spell
    assert relative.meets(3.5, 1.0) == (True, True)  # no ratio (an older trial): the latency as measured
    assert Budgets(4.0, None).meets(3.5, 1.0, ratio=0.42) == (True, True)  # absolute budgets ignore ratios
    # a front model is judged on its rounds' median plus the median's standard error
    from hwprune.study.reference import upper_ratio

    assert upper_ratio([0.4, 0.4, 0.4]) == pytest.approx(0.4)
    assert upper_ratio([0.38, 0.40, 0.42]) == pytest.approx(0.40 + 1.253 * 1.4826 * 0.02 / 3 ** 0.5)
    assert upper_ratio([0.38, 0.40, 0.42, 0.39, 0.41, 0.40, 0.60, 0.40, 0.39]) < 0.41  # one wild round barely counts

    # the bisection aims with the ratios: here every uniform trial was measured during a 1.3x slow spell
    subject = _runner().subject
    space = PruningSpace.build(subject.model, subject.example_inputs, channel_multiple=1, max_ratio=0.75)
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    warm_start(study, space)
    ratio = {0.25: 0.8, 0.5: 0.6, 0.75: 0.4}

    def objective(trial: optuna.Trial) -> tuple[float, float, float]:
        for k in space.knobs:
            trial.suggest_float(k.name, 0.0, k.max_ratio)
        r = ratio[trial.user_attrs["uniform_ratio"]]
        trial.set_user_attr("latency_ratio", r)
        return 0.5, 13.0 * r, 1.0

    study.optimize(objective, n_trials=3)
    assert bracket_budget(study, space, 10.0, Budgets(5.0, None)) == []  # on raw latencies no uniform trial fits
    assert bracket_budget(study, space, 10.0, Budgets(5.0, None, latency_factor=0.5)) == [0.625]


def test_bracket_measures_a_warm_start_model_just_over_the_budget_again_before_giving_up(tmp_path: Path) -> None:
    """Seen on the demo at 0.4x: the warm start's most pruned model (0.32x side by side) measured 0.418x in its trial
    during a slow spell, so no uniform trial met the budget and bisection never started."""
    from hwprune.study.objective import CONFIRMED_ATTR, NEAR_MISS
    from hwprune.study.refine import incumbent

    subject = _runner().subject
    space = PruningSpace.build(subject.model, subject.example_inputs, channel_multiple=1, max_ratio=0.75)
    budgets = Budgets(4.0, None)
    fake = {0.25: 8.0, 0.5: 6.0, 0.75: 4.0 * (1 + NEAR_MISS / 2)}  # the smallest model lands 2.5% over

    def objective(trial: optuna.Trial) -> tuple[float, float, float]:
        for k in space.knobs:
            trial.suggest_float(k.name, 0.0, k.max_ratio)
        lat = fake[trial.user_attrs["uniform_ratio"]]
        trial.set_constraint("latency", lat - 4.0)
        trial.set_constraint("memory", -1.0)
        return 0.5, lat, 1.0

    def study_of(name: str) -> optuna.Study:
        study = optuna.create_study(storage=f"sqlite:///{tmp_path / name}",
                                    directions=["maximize", "minimize", "minimize"])
        warm_start(study, space)
        study.optimize(objective, n_trials=3)
        return study

    study = study_of("a.db")
    assert bracket_budget(study, space, 10.0, budgets) == []  # without a second measurement nothing meets
    measured: list[float] = []

    def confirm_at(ms: float):  # noqa: ANN202
        def confirm(ratios: dict[str, float]) -> dict[str, float]:
            measured.append(next(iter(ratios.values())))
            return {"latency_ms": ms}
        return confirm

    # measured again, it meets the budget: bisection starts between 0.5 (6 ms) and it
    queued = bracket_budget(study, space, 10.0, budgets, confirm=confirm_at(3.8))
    assert measured == [0.75] and study.user_attrs[CONFIRMED_ATTR] == {"2": {"latency_ms": 3.8}}
    assert len(queued) == 1 and 0.5 < queued[0] < 0.75
    # and it is the refinement's incumbent, though its trial was over the budget
    best, ms = incumbent(study, budgets)
    assert best.number == 2 and ms == pytest.approx(3.8)

    # measured again, still over: nothing queued, and it is not measured a third time
    measured.clear()
    over = study_of("b.db")
    assert bracket_budget(over, space, 10.0, budgets, confirm=confirm_at(4.3)) == []
    assert bracket_budget(over, space, 10.0, budgets, confirm=confirm_at(3.8)) == []
    assert measured == [0.75] and incumbent(over, budgets) is None

    # a model clearly over the budget is not worth a second measurement
    measured.clear()
    fake[0.75] = 4.0 * (1 + 2 * NEAR_MISS)
    assert bracket_budget(study_of("c.db"), space, 10.0, budgets, confirm=confirm_at(3.8)) == []
    assert measured == []

    # the same inside the bisection: a lower end measured just over the budget is measured again, and when it meets
    # the budget the bisection searches below it, not above (seen at 0.4x: a 0.37x uniform model measured 0.41x)
    fake.update({0.5: 4.0 * (1 + NEAR_MISS / 2), 0.75: 3.0})
    mid = study_of("d.db")
    assert 0.5 < bracket_budget(mid, space, 10.0, budgets)[0] < 0.75  # without confirm: above the near miss
    measured.clear()
    mid = study_of("e.db")
    queued = bracket_budget(mid, space, 10.0, budgets, confirm=confirm_at(3.8))
    assert measured == [0.5] and len(queued) == 1 and 0.25 < queued[0] < 0.5

    # an upper end that a more pruned miss contradicts is measured again (seen at 0.6x: a 0.61x model measured
    # 0.45x once); here it goes over, the more pruned near miss is measured again and meets, and the bisection
    # aims between them
    fake.update({0.25: 8.0, 0.5: 3.0, 0.75: 4.0 * (1 + NEAR_MISS / 2)})
    again = {0.5: 4.8, 0.75: 3.6}
    measured.clear()

    def confirm_by_ratio(ratios: dict[str, float]) -> dict[str, float]:
        measured.append(next(iter(ratios.values())))
        return {"latency_ms": again[measured[-1]]}

    queued = bracket_budget(study_of("f.db"), space, 10.0, budgets, confirm=confirm_by_ratio)
    assert measured == [0.5, 0.75] and len(queued) == 1 and 0.5 < queued[0] < 0.75

    # a lower end slower than a less pruned one is measured again, however far over the budget (seen at 0.4x: a 0.35x
    # model measured 0.51x, and the bisection searched above it)
    fake.update({0.25: 8.0, 0.5: 9.0, 0.75: 3.0})
    again = {0.5: 3.5}
    measured.clear()
    queued = bracket_budget(study_of("g.db"), space, 10.0, budgets, confirm=confirm_by_ratio)
    assert measured == [0.5] and len(queued) == 1 and 0.25 < queued[0] < 0.5


def test_a_trial_is_judged_on_the_median_of_interleaved_rounds(tmp_path: Path) -> None:
    """Seen on the demo at 0.4x: a slow spell as long as one measurement put a 0.35x model at 0.67x in its trial."""
    from hwprune.study.reference import ROUNDS

    runner = _runner(finetune_steps=0)
    dense_path = tmp_path / "dense.onnx"  # never read: the scripted measure only tells the two paths apart
    order: list[str] = []
    model_ms = iter([1.0, 2.0, 1.1])  # the second round hit a slow spell the dense model beside it missed

    def measure(path: Path) -> Measurement:
        order.append("dense" if path == dense_path else "model")
        return _measured(4.0 if path == dense_path else next(model_ms))

    runner.measure, runner.beside = measure, dense_path
    stages: dict[str, float] = {}
    m, ratio = runner.export_and_measure(runner.build(runner.space.uniform(0.5)).module, stages)
    assert ratio == pytest.approx(1.1 / 4.0) and m.latency.median_ms == pytest.approx(1.1)  # not (1+2+1.1)/3 / 4
    assert order == ["model", "dense", "dense", "model", "model", "dense"] and len(order) == 2 * ROUNDS
    assert "export" in stages


def test_a_candidate_the_screen_settles_is_measured_alone_against_the_dense_reference(tmp_path: Path) -> None:
    """--screen on: a candidate predicted well inside a relative budget is measured without the dense model beside
    it, which costs the board as much again, when that measurement agrees; otherwise the rounds beside it follow."""
    runner = _runner(finetune_steps=0)
    dense_path = tmp_path / "dense.onnx"  # never read: the scripted measure only tells the two paths apart
    order: list[str] = []
    model: list[Measurement] = []

    def measure(path: Path) -> Measurement:
        order.append("dense" if path == dense_path else "model")
        return _measured(4.0) if path == dense_path else model.pop(0)

    # 0.5x of a 4 ms dense reference: a 2 ms budget, and the screen settles what is judged 10% inside it
    runner.measure, runner.beside = measure, dense_path
    runner.budgets = Budgets(None, None, latency_factor=0.5, follow=lambda: 4.0)
    module = runner.build(runner.space.uniform(0.5)).module

    def settles(judged_ms: float) -> bool:
        return judged_ms <= 1.8

    model[:] = [_measured(1.0)]
    m, ratio = runner.export_and_measure(module, {}, settles)
    assert order == ["model"] and runner.last_rounds == 0
    assert ratio == pytest.approx(1.0 / 4.0) and m.latency.median_ms == pytest.approx(1.0)
    # a measurement alone nearer the budget: the rounds beside the dense model follow (the first one settles it)
    order.clear()
    model[:] = [_measured(1.9), _measured(1.0)]
    m, ratio = runner.export_and_measure(module, {}, settles)
    assert order == ["model", "model", "dense"] and runner.last_rounds == 1 and ratio == pytest.approx(0.25)
    # a noisy measurement alone settles nothing, however fast
    order.clear()
    noisy = _measured(0.5)
    noisy.latency.noisy = True
    model[:] = [noisy, _measured(1.0)]
    runner.export_and_measure(module, {}, settles)
    assert order == ["model", "model", "dense"] and runner.last_rounds == 1
    # without the screen's word, never alone
    order.clear()
    model[:] = [_measured(1.0)] * 3
    runner.export_and_measure(module, {})
    assert order.count("dense") == 3 and runner.last_rounds == 3


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

    # a model beside the dense model: ROUNDS rounds, more while the ratio is close to the budget's factor
    from hwprune.study.reference import MAX_ROUNDS, ROUNDS, interleaved_rounds

    rounds = interleaved_rounds(backend.measure, path, path)
    assert len(rounds.ratios) == len(rounds.measurements) == ROUNDS
    assert rounds.ratio == statistics.median(rounds.ratios) and rounds.upper >= rounds.ratio
    lat = sorted(m.latency.median_ms for m in rounds.measurements)
    assert rounds.middle.latency.median_ms == lat[len(lat) // 2]
    far = interleaved_rounds(backend.measure, path, path, factor=0.1)  # a ratio near 1 is nowhere near 0.1x
    assert len(far.ratios) == ROUNDS
    near = interleaved_rounds(backend.measure, path, path, factor=statistics.median(rounds.ratios))
    assert ROUNDS <= len(near.ratios) <= MAX_ROUNDS
    # where the backend times two models in alternating samples, a round is one such measurement
    paired = interleaved_rounds(backend.measure, path, path, factor=1.0, measure_pair=backend.measure_beside)
    assert ROUNDS <= len(paired.ratios) <= MAX_ROUNDS and len(paired.measurements) == len(paired.ratios)
    assert all(0.6 < r < 1.6 for r in paired.ratios)  # the same model on both sides
    # --screen on: rounds stop early once they settle the model (a prediction and a round both well inside the
    # budget), and never before one round; a round that does not settle it is followed by the rest
    settled = interleaved_rounds(backend.measure, path, path, settled=lambda r: r.ratio < 1.6)
    assert len(settled.ratios) == len(settled.measurements) == 1
    unsettled = interleaved_rounds(backend.measure, path, path, settled=lambda r: r.ratio < 0.1)
    assert len(unsettled.ratios) == ROUNDS
    # the front's confirmation counts the rounds of this run's re-measure of the same architecture, and still
    # measures the exported file at least once
    pooled = interleaved_rounds(backend.measure, path, path, earlier=[1.0, 1.0])
    assert len(pooled.ratios) == ROUNDS and len(pooled.measurements) == 1 and pooled.ratios[:2] == [1.0, 1.0]
    pooled = interleaved_rounds(backend.measure, path, path, earlier=[1.0] * (ROUNDS + 2))
    assert len(pooled.measurements) == 1 and len(pooled.ratios) == ROUNDS + 3

    # within the band, the rounds end once the median is clearly on one side of the budget (here ratios scripted
    # onto real measurements: 0.55-0.56 against 0.58x), not before DECIDE_FROM rounds, and never while the median
    # sits on the budget
    from hwprune.study.reference import DECIDE_FROM, Rounds

    def scripted(ratios: list[float]) -> Any:
        it = iter(ratios)
        return lambda p, d: (*backend.measure_beside(p, d)[:2], [next(it)])

    clear = interleaved_rounds(backend.measure, path, path, factor=0.58,
                               measure_pair=scripted([0.555, 0.55, 0.56, 0.555, 0.552] + [0.555] * 9))
    assert len(clear.ratios) == DECIDE_FROM and clear.upper < 0.58
    on_it = interleaved_rounds(backend.measure, path, path, factor=0.58,
                               measure_pair=scripted([0.575, 0.585, 0.58, 0.578, 0.582] + [0.58] * 9))
    assert len(on_it.ratios) == MAX_ROUNDS

    # a listed model's own median comes from the round whose dense model ran fastest beside it; when every round ran
    # in a slow spell (here: a reference taken when the host was 3x faster than it is now), up to RETIME_ROUNDS more
    # rounds try to time it outside the spell and the remaining slowdown is returned; a host running at its
    # reference's pace measures nothing more
    from hwprune.study.reference import RETIME_ROUNDS, SLOW_SPELL, retime_in_slow_spell

    own = interleaved_rounds(backend.measure, path, path, measure_pair=backend.measure_beside)
    assert len(own.dense_ms) == len(own.measurements) == ROUNDS
    fastest = min(range(ROUNDS), key=own.dense_ms.__getitem__)
    assert own.steadiest is own.measurements[fastest]
    pace = max(own.dense_ms)
    assert retime_in_slow_spell(own, pace, backend.measure, path, path, backend.measure_beside) is None
    assert len(own.measurements) == ROUNDS
    # each try probes the dense model alone first: while it still runs slow, no round is spent on both models
    slow = retime_in_slow_spell(own, pace / 3, backend.measure, path, path, backend.measure_beside)
    assert slow is not None and slow >= SLOW_SPELL and slow == pytest.approx(min(own.dense_ms) / (pace / 3))
    assert len(own.measurements) == len(own.ratios) == len(own.dense_ms) == ROUNDS
    # a probe that finds the host back at the reference's pace is followed by a round (here that round runs at the
    # host's real pace, 3x the reference, so the spell outlasts the tries all the same)
    probes: list[Path] = []

    def back_at_pace_once(p: Path) -> Any:
        m = backend.measure(p)
        probes.append(p)
        return m if len(probes) > 1 else dataclasses.replace(m, latency=dataclasses.replace(m.latency,
                                                                                             median_ms=pace / 3))

    assert retime_in_slow_spell(own, pace / 3, back_at_pace_once, path, path, backend.measure_beside) is not None
    assert len(probes) == RETIME_ROUNDS and len(own.measurements) == len(own.dense_ms) == ROUNDS + 1
    # without the dense medians (pooled or older rounds) there is nothing to judge a spell by
    assert Rounds([own.measurements[0]], [1.0]).slowdown(pace) is None
    # a note when the own median and the judged latency (median ratio x reference) differ by more than DRIFT_NOTE,
    # either way, naming both factors: the host's pace at the round that timed it and that round's ratio against
    # the median; none when they agree; the slow-spell note when a spell outlasted the re-timing
    from hwprune.study.reference import DRIFT_NOTE, own_median_note

    def timed(ms: float) -> Any:
        return dataclasses.replace(own.measurements[0], latency=dataclasses.replace(own.measurements[0].latency,
                                                                                    median_ms=ms))

    # own 0.108 ms beside a dense 0.224 ms (1.12x a 0.2 ms reference; that round's ratio 0.482, 1.07x the median
    # 0.45 of the rounds, one pooled): judged 0.09 ms, 20% apart, though neither factor is 15% alone (the README
    # demo's case)
    demo = Rounds([timed(0.108), timed(0.1)], [0.45, 0.44, 0.5], dense_ms=[0.224, 0.23])
    note = own_median_note(demo, 0.2, False) or ""
    assert "0.108 ms, is 20% above its judged latency, 0.090 ms" in note
    assert "1.12x the reference" in note and "1.07x its median ratio" in note
    assert own_median_note(Rounds([timed(0.088)], [0.45], dense_ms=[0.2]), 0.2, False) is None
    below = own_median_note(Rounds([timed(0.07)], [0.45], dense_ms=[0.16]), 0.2, False) or ""
    assert "22% below" in below and "0.80x the reference" in below
    assert own_median_note(Rounds([timed(0.1)], [0.45]), 0.2, False) is None  # no dense medians: nothing to say
    assert own_median_note(demo, None, False) is None
    assert 1.0 + DRIFT_NOTE < 0.108 / 0.09
    outlasted = own_median_note(own, min(own.dense_ms) / slow, True) or ""
    assert "host ran slow" in outlasted and f"steadiest of {len(own.measurements)} rounds" in outlasted


def test_rounds_are_decided_by_the_median_and_its_standard_error() -> None:
    from hwprune.study.reference import DECIDE_FROM, decided, standard_error, upper_ratio

    assert not decided([0.5] * (DECIDE_FROM - 1), 0.6)  # too few rounds to trust their spread
    assert decided([0.5, 0.51, 0.49, 0.5, 0.5], 0.6)
    assert decided([0.7, 0.69, 0.71, 0.7, 0.7], 0.6)  # clearly over decides too
    assert not decided([0.59, 0.61, 0.60, 0.62, 0.58], 0.6)
    assert not decided([0.597] * 5, 0.6)  # rounds that agree exactly still leave a 1% standard error
    assert not decided([0.55, 0.45, 0.65, 0.50, 0.62], 0.6)  # a wide spread: t(4) x 5.8% > 5%
    ratios = [0.38, 0.40, 0.42]
    assert upper_ratio(ratios) == pytest.approx(0.40 + standard_error(ratios))


def test_edge_refinement_enqueues_untried_neighbours_of_the_best_feasible_that_fit_the_budget(tmp_path: Path) -> None:
    import random

    from hwprune.pruning import prune
    from hwprune.study.refine import BUDGET_MARGIN, REFINE_FROM, EdgeRefiner, neighbour

    runner = _runner()
    space, subject = runner.space, runner.subject

    def macs_of(ratios: dict[str, float]) -> int:
        return prune(subject.model, subject.example_inputs, ratios, space).macs

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}",
                                directions=["maximize", "minimize", "minimize"])
    assert neighbour(study, space, random.Random(0), macs_of, Budgets(5.5, None)) is None  # nothing feasible yet
    dist = {k.name: optuna.distributions.FloatDistribution(0.0, k.max_ratio) for k in space.knobs}
    best = space.uniform(0.5)
    best_macs = macs_of(best)
    # the most accurate trial is over budget; the best feasible one is the uniform 0.5 model, at 5 ms
    study.add_trial(optuna.trial.create_trial(values=[0.9, 9.0, 1.0], params=space.uniform(0.0), distributions=dist,
                                              constraints={"latency": 1.0}))
    study.add_trial(optuna.trial.create_trial(values=[0.8, 5.0, 1.0], params=best, distributions=dist,
                                              constraints={"latency": -1.0}, user_attrs={"macs": best_macs}))
    study.add_trial(optuna.trial.create_trial(values=[0.7, 4.0, 1.0], params=space.uniform(0.75), distributions=dist,
                                              constraints={"latency": -2.0}))
    base = [k.kept(best[k.name]) for k in space.knobs]
    rng = random.Random(0)
    seen = {tuple(base)}
    for budget in (5.7, 5.2, 5.2):
        found = neighbour(study, space, rng, macs_of, Budgets(budget, None))
        assert found is not None
        ratios, of = found
        assert of == 1
        widths = [k.kept(ratios[k.name]) for k in space.knobs]
        assert all(0.0 <= ratios[k.name] <= k.max_ratio for k in space.knobs)
        changed = [(k, b, w) for k, b, w in zip(space.knobs, base, widths) if b != w]
        # one group one allowed step wider, others unchanged or one step narrower
        assert len([1 for _, b, w in changed if w > b]) == 1
        for k, b, w in changed:
            assert not [c for c in k.widths() if min(b, w) < c < max(b, w)], "one allowed step, not more"
        # the estimated latency (5 ms scaled by MACs) fits inside the budget
        assert 5.0 * macs_of(ratios) / best_macs <= budget * (1 - BUDGET_MARGIN)
        assert tuple(widths) not in seen, "an architecture already tried or queued is not proposed again"
        seen.add(tuple(widths))
        study.enqueue_trial(ratios)

    # as a callback in a real optimize loop: quiet before REFINE_FROM of the trial target, then a neighbour of the
    # best feasible model after every other completed trial
    target = 20
    log: list[str] = []
    fresh = optuna.create_study(directions=["maximize", "minimize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    fresh.add_trial(optuna.trial.create_trial(values=[0.8, 5.0, 1.0], params=best, distributions=dist,
                                              constraints={"latency": -1.0}, user_attrs={"macs": best_macs}))

    def objective(trial: optuna.Trial) -> tuple[float, float, float]:
        for k in space.knobs:
            trial.suggest_float(k.name, 0.0, k.max_ratio)
        trial.set_constraint("latency", 1.0)  # the sampler's own trials miss the budget; trial 0 stays the best
        return 0.5, 6.0, 1.0

    fresh.optimize(objective, n_trials=target - 1,
                   callbacks=[EdgeRefiner(space, target, None, seed=0, macs_of=macs_of, budgets=Budgets(6.0, None),
                                          log=log.append)])
    refined = [t.number for t in fresh.get_trials() if "neighbour_of" in t.user_attrs]
    assert refined and min(refined) >= REFINE_FROM * target
    assert all(b - a == 2 for a, b in zip(refined, refined[1:]))
    assert all(fresh.trials[n].user_attrs["neighbour_of"] == 0 for n in refined)
    assert len(fresh.trials) == target and log and "refining" in log[0]


def test_refinement_measures_its_incumbent_again_and_drops_one_that_no_longer_fits(tmp_path: Path) -> None:
    from hwprune.pruning import prune
    from hwprune.study.refine import CONFIRMED_ATTR, EdgeRefiner, incumbent

    runner = _runner()
    space, subject = runner.space, runner.subject
    dist = {k.name: optuna.distributions.FloatDistribution(0.0, k.max_ratio) for k in space.knobs}
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}",
                                directions=["maximize", "minimize", "minimize"])
    budgets = Budgets(5.0, None, latency_factor=0.5)  # "0.5x" of a 10 ms dense reference
    # trial 0: the most accurate, feasible on a lucky measurement (ratio 0.48); trial 1: less accurate, well inside;
    # trials 2 and 3: over the budget
    for acc, ratio, r in ((0.9, 0.48, 0.3), (0.8, 0.40, 0.5), (0.95, 0.7, 0.1), (0.95, 0.7, 0.2)):
        study.add_trial(optuna.trial.create_trial(values=[acc, 10 * ratio, 1.0], params=space.uniform(r),
                                                  distributions=dist, constraints={"latency": ratio * 10 - 5.0},
                                                  user_attrs={"latency_ratio": ratio}))
    best, ms = incumbent(study, budgets)
    assert best.number == 0 and ms == pytest.approx(4.8)
    measured: list[dict[str, float]] = []
    again = {0.3: 0.53, 0.5: 0.41}  # measured again: trial 0 is over the budget after all

    def confirm(ratios: dict[str, float]) -> dict[str, float]:
        measured.append(ratios)
        return {"latency_ms": 99.0, "latency_ratio": again[next(iter(ratios.values()))]}

    lines: list[str] = []
    refiner = EdgeRefiner(space, target=6, timeout_s=None, seed=0, budgets=budgets, log=lines.append,
                          macs_of=lambda r: prune(subject.model, subject.example_inputs, r, space).macs,
                          confirm=confirm)
    refiner(study, study.trials[3])  # 4 of 6 complete: past REFINE_FROM
    assert [next(iter(r.values())) for r in measured] == [0.3, 0.5]  # trial 0 failed, so trial 1 was measured too
    # the log says what each re-measure found
    again_lines = [line for line in lines if "measured again as the incumbent" in line]
    assert again_lines == ["trial 0 measured again as the incumbent: 5.300 ms judged against the 5.000 ms budget; "
                           "over it, so the refinement turns to the next most accurate model",
                           "trial 1 measured again as the incumbent: 4.100 ms judged against the 5.000 ms budget"]
    assert set(study.user_attrs[CONFIRMED_ATTR]) == {"0", "1"}
    best, ms = incumbent(study, budgets)
    assert best.number == 1 and ms == pytest.approx(4.1)  # the judged latency comes from the ratio measured again
    neighbours = [t for t in study.get_trials(deepcopy=False) if "neighbour_of" in t.user_attrs]
    assert [t.user_attrs["neighbour_of"] for t in neighbours] == [1]
    # the neighbour runs (over the budget); the next refinement step builds on the same incumbent without
    # measuring it again
    def objective(trial: optuna.Trial) -> tuple[float, float, float]:
        for k in space.knobs:
            trial.suggest_float(k.name, 0.0, k.max_ratio)
        trial.set_user_attr("latency_ratio", 0.6)
        trial.set_constraint("latency", 1.0)
        return 0.85, 6.0, 1.0

    study.optimize(objective, n_trials=1)
    refiner.since = 0
    refiner(study, study.trials[-1])
    assert len(measured) == 2  # an incumbent is measured again once
    neighbours = [t for t in study.get_trials(deepcopy=False) if "neighbour_of" in t.user_attrs]
    assert [t.user_attrs["neighbour_of"] for t in neighbours] == [1, 1]


def test_depth_probes_follow_the_bracket() -> None:
    """Once the bisection is done, the least pruned uniform model over the budget is tried with one block removed."""
    from hwprune.subjects.models import mobilenet_tiny

    torch.manual_seed(0)
    model = mobilenet_tiny().eval()
    space = PruningSpace.build(model, torch.zeros(1, 3, 32, 32), channel_multiple=16)
    assert space.blocks == ["features.3", "features.5", "features.7"]
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    warm_start(study, space)

    def objective(trial: optuna.Trial) -> tuple[float, float, float]:
        for k in space.knobs:
            trial.suggest_float(k.name, 0.0, k.max_ratio)
        r = trial.user_attrs.get("uniform_ratio")
        return 0.5, (10.0 - 8.0 * r) if r is not None else 4.5, 1.0

    budgets = Budgets(5.0, None)  # met from uniform 0.625
    for _ in range(3 + BRACKET_STEPS):
        study.optimize(objective, n_trials=1)
        bracket_budget(study, space, 10.0, budgets)
        waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        if waiting and "depth_probe" in waiting[0].user_attrs:
            break
    uniform = {t.user_attrs["uniform_ratio"] for t in study.trials if "uniform_ratio" in t.user_attrs}
    lo = max(r for r in uniform if 10.0 - 8.0 * r > 5.0)
    probes = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    assert [t.user_attrs["depth_probe"] for t in probes] == space.blocks
    for t in probes:
        block = t.user_attrs["depth_probe"]
        ratios = t.system_attrs["fixed_params"]
        assert ratios == {**space.uniform(lo), block: space.knob(block).max_ratio}
        assert space.knob(block).kept(ratios[block]) == 0  # the block goes; every other knob is uniform at lo
    assert study.user_attrs["depth_probed"] == space.blocks
    study.optimize(objective, n_trials=len(probes))
    assert bracket_budget(study, space, 10.0, budgets) == []
    assert not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))  # probed once only

    # no uniform model meets the budget, not even the warm start's most pruned: that one is probed with a block out
    beyond = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    warm_start(beyond, space)
    beyond.optimize(objective, n_trials=2)
    assert bracket_budget(beyond, space, 10.0, Budgets(3.0, None)) == []
    assert "depth_probed" not in beyond.user_attrs  # the warm start's smallest model is not measured yet
    beyond.optimize(objective, n_trials=1)
    assert bracket_budget(beyond, space, 10.0, Budgets(3.0, None)) == []
    probes = beyond.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    top = max(k.max_ratio for k in space.knobs)
    assert [t.user_attrs["depth_probe"] for t in probes] == space.blocks
    assert all(t.system_attrs["fixed_params"] == {**space.uniform(top), t.user_attrs["depth_probe"]: top}
               for t in probes)


def test_model_and_summary_records_round_trip_through_json_and_read_older_forms(tmp_path: Path) -> None:
    from hwprune.errors import HwpruneError
    from hwprune.study.records import SCHEMA, UNSET, ModelRecord, Summary, model_record
    from hwprune.study.reference import Rounds

    budgets = Budgets(latency_ms=2.4, memory_mb=None, latency_factor=0.6)
    example = torch.zeros(1, 3, 8, 8)
    dense = model_record(trial=None, accuracy=0.9, accuracy_proxy=0.9, m=_measured(4.0), params=100, macs=1000,
                         widths={"conv": (8, 8)}, ratios=None, budgets=budgets, dense=None, example=example)
    m = _measured(1.9)
    pruned = model_record(trial=3, accuracy=0.8, accuracy_proxy=0.79, m=m, params=40, macs=300,
                          widths={"conv": (8, 4)}, ratios={"conv": 0.5}, budgets=budgets, dense=dense,
                          example=example, rounds=Rounds([m, m, m], [0.45, 0.5, 0.55]))
    pruned = pruned.replace(removed_blocks=[], accuracy_retention=None).with_file("onnx", {"path": "m.onnx"})
    d = pruned.to_dict()
    # the summary.json form: nested statistics, optional keys only when set (a None retention is written as null)
    assert d["latency_ms"]["median"] == 1.9 and d["memory_mb"]["total"] == 2.0 and d["speedup"] == 2.0
    assert d["latency_ratio"] == 0.5 and d["latency_ratio_rounds"] == [0.45, 0.5, 0.55]
    # the judged latency: the ratio x the dense reference (2.4 ms / 0.6), beside the model's own median
    assert d["latency_ms"]["judged"] == pytest.approx(0.5 * 4.0) and d["speedup"] == pytest.approx(1 / 0.5)
    assert d["latency_ms"]["judged_by"] == "ratio x dense reference"
    assert dense.latency_ms.judged == 4.0 and dense.latency_ms.judged_by == "own median"
    assert d["meets"] == {"latency": True, "memory": True} and d["accuracy_retention"] is None
    assert "remeasure_note" not in d and "agreement" not in d and "files" not in pruned.to_dict(files=False)
    assert json.loads(json.dumps(d)) == d and ModelRecord.from_dict(json.loads(json.dumps(d))) == pruned
    # keys in the order summary.json always had them
    assert list(d)[:7] == ["trial", "recommended", "accuracy", "accuracy_proxy", "final_finetune_steps",
                           "latency_ms", "memory_mb"]
    assert list(d).index("input") < list(d).index("latency_ratio_rounds") < list(d).index("speedup")

    summary = Summary(schema=SCHEMA, hwprune_version="0", created="now", request={"trials": 1}, metric="accuracy",
                      accuracy_guard={"max_drop": "off"}, recovery={"method": "data"}, dense=dense,
                      pareto=(pruned,), recommended=3, measurement={"backend": "ort"}, search={"trials_complete": 1})
    text = summary.to_json()
    path = tmp_path / "summary.json"
    path.write_text(text)
    assert Summary.read(path) == summary and Summary.read(path).to_json() == text
    # an older summary: a dense record without the statistics added since, and a key this hwprune no longer writes
    old = json.loads(text)
    del old["dense"]["latency_ms"]["robust_cv"], old["dense"]["size_ratio"]
    old["legacy"] = {"kept": True}
    back = Summary.from_dict(old)
    assert back.dense.latency_ms.robust_cv is None and back.dense.size_ratio is UNSET
    assert back.to_dict()["legacy"] == {"kept": True} and "size_ratio" not in back.to_dict()["dense"]
    # a summary from before the judged latency: read as absent (not written back), the own median stands in
    del old["pareto"][0]["latency_ms"]["judged"], old["pareto"][0]["latency_ms"]["judged_by"]
    before = Summary.from_dict(old).pareto[0]
    assert before.latency_ms.judged is UNSET and before.latency_ms.primary_ms == 1.9
    assert "judged" not in before.to_dict()["latency_ms"]
    newer = {**json.loads(text), "schema": SCHEMA + 1}
    with pytest.raises(HwpruneError, match="schema"):
        Summary.from_dict(newer)
    path.write_text("{not json")
    with pytest.raises(HwpruneError, match="not a readable summary"):
        Summary.read(path)


def test_a_relative_budget_follows_the_dense_reference_without_being_changed() -> None:
    dense_ms = [2.0]
    live = Budgets(latency_ms=1.0, memory_mb=None, latency_factor=0.5, follow=lambda: dense_ms[0])
    assert live.now().latency_ms == 1.0 and live.now().follow is None
    dense_ms[0] = 3.0  # a later dense set moved the reference
    assert live.now().latency_ms == 1.5 and live.latency_ms == 1.0  # derived, never written
    fixed = Budgets(latency_ms=4.0, memory_mb=None)
    assert fixed.now() is fixed
    with pytest.raises(dataclasses.FrozenInstanceError):
        live.latency_ms = 2.0  # type: ignore[misc]
