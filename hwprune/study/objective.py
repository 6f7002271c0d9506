"""The Optuna study: one trial = prune -> (cache lookup) -> export -> measure -> calibrate -> evaluate.

The study never imports a backend; it gets a ``measure(onnx_path) -> Measurement`` function.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from hwprune.errors import ExportError, HwpruneError, MeasurementError
from hwprune.backends.base import Measurement
from hwprune.pruning import PrunedModel, PruningSpace, prune
from hwprune.study.reference import MeasurePair, interleaved_rounds
from hwprune.subjects.base import Subject
from hwprune import train

log = logging.getLogger("hwprune")

MeasureFn = Callable[[Path], Measurement]
DIRECTIONS = ("maximize", "minimize", "minimize")  # accuracy, latency ms, memory MB
DENSE_TRIAL = -1  # ``cached_from`` of a candidate that is the dense architecture


@dataclass
class Budgets:
    """The budgets of a search. A relative latency budget ("0.4x") also keeps its factor: a candidate is then judged
    on its latency divided by the dense model's measured right beside it (``ratio``), which a slow spell of a shared
    host moves far less than either latency alone (bench/README.md: the search's dense reference drifted 5-17% from
    side-by-side measurements, more than the margin between the best candidates and the budget)."""

    latency_ms: float | None
    memory_mb: float | None
    latency_factor: float | None = None  # set for relative latency budgets: ``latency_ms`` = factor x dense reference
    # the accuracy guard: the least accuracy a model may keep (None = no guard), and whether trials are judged on it
    # (their accuracy is the one reported when no final fine-tune follows; else the guard judges the finalists)
    accuracy_floor: float | None = None
    guard_trials: bool = True

    def accuracy_violation(self, accuracy: float) -> float:
        """Optuna constraint value of the accuracy guard: <= 0 means the guard is met."""
        return self.accuracy_floor - accuracy if self.accuracy_floor is not None else -1.0

    def meets_accuracy(self, accuracy: float) -> bool:
        """Whether ``accuracy`` keeps within the accuracy guard (always, without one)."""
        return self.accuracy_violation(accuracy) <= 0

    def feasible(self, latency_ms: float, memory_mb: float, ratio: float | None, accuracy: float) -> bool:
        """A trial within the budgets and, where trials are judged on it, the accuracy guard."""
        return all(self.meets(latency_ms, memory_mb, ratio)) and (not self.guard_trials
                                                                  or self.meets_accuracy(accuracy))

    def judged_ms(self, latency_ms: float, ratio: float | None = None) -> float:
        """The latency a budget is judged on: with a relative budget and a ``ratio`` to the dense model measured
        beside the candidate, that ratio times the dense reference; else ``latency_ms`` as measured."""
        if self.latency_factor and self.latency_ms is not None and ratio is not None:
            return ratio * self.latency_ms / self.latency_factor
        return latency_ms

    def meets(self, latency_ms: float, memory_mb: float, ratio: float | None = None) -> tuple[bool, bool]:
        """Whether the latency and the memory are within their budgets (a missing budget is always met)."""
        lat_v, mem_v = self.violations(latency_ms, memory_mb, ratio)
        return lat_v <= 0, mem_v <= 0

    def violations(self, latency_ms: float, memory_mb: float, ratio: float | None = None) -> tuple[float, float]:
        """Optuna constraint values: <= 0 means the budget is met."""
        lat = self.judged_ms(latency_ms, ratio) - self.latency_ms if self.latency_ms is not None else -1.0
        mem = memory_mb - self.memory_mb if self.memory_mb is not None else -1.0
        return lat, mem


CONFIRMED_ATTR = "edge_confirmed"  # study user attribute: trial number -> its latency measured again
# a trial measured over the latency budget by at most this fraction of it is measured again before it is given up:
# one measurement cannot tell 2% over from 2% under on a shared host. Seen on the demo at 0.4x: one architecture
# measured 0.410x in its trial and 0.395x over 4 interleaved rounds
NEAR_MISS = 0.05
# ratios -> {"latency_ms": .., "latency_ratio": ..}: a model measured again (the ratio under a relative budget)
ConfirmFn = Callable[[dict[str, float]], dict[str, float]]


def latency_ratio(trial: optuna.trial.FrozenTrial) -> float | None:
    """The trial's latency divided by the dense model's measured beside it (stored only under relative budgets)."""
    value = trial.user_attrs.get("latency_ratio")
    return float(value) if value is not None else None


def judged_latency(trial: optuna.trial.FrozenTrial, budgets: Budgets) -> float:
    """A complete trial's latency as ``budgets`` judge it (:meth:`Budgets.judged_ms`)."""
    return budgets.judged_ms(trial.values[1], latency_ratio(trial))


def confirmed_latency(trial: optuna.trial.FrozenTrial, budgets: Budgets, confirmed: dict[str, Any]) -> float:
    """A complete trial's judged latency (:func:`judged_latency`), taken from its measurement again where
    ``confirmed`` (the study's ``CONFIRMED_ATTR``) holds one."""
    again = confirmed.get(str(trial.number))
    if again:
        return budgets.judged_ms(again["latency_ms"], again.get("latency_ratio"))
    return judged_latency(trial, budgets)


@dataclass
class TrialRunner:
    """Everything an objective needs, fixed for the whole search."""

    subject: Subject
    space: PruningSpace
    measure: MeasureFn
    budgets: Budgets
    exporter: str = "torchscript"
    calibration_batches: int = 8
    finetune_steps: int = 0
    seed: int = 0
    context: str = ""  # measurement context (device, runtime, versions): cached measurements must share it
    beside: Path | None = None  # the dense model's ONNX, measured right after each candidate (relative budgets)
    measure_pair: MeasurePair | None = None  # both models in alternating samples, where the backend can
    stage_seconds: dict[str, float] = field(default_factory=dict)
    _cache: dict[str, dict[str, Any]] = field(default_factory=dict)

    def book(self, stage: str, seconds: float, into: dict[str, float] | None = None) -> None:
        """Add ``seconds`` to ``stage`` in the whole search's stages, and in a trial's (``into``) when given."""
        if into is not None:
            into[stage] = into.get(stage, 0.0) + seconds
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    def _tick(self, stage: str, start: float, into: dict[str, float]) -> float:
        now = time.perf_counter()
        self.book(stage, now - start, into)
        return now

    def load_cache(self, study: optuna.Study) -> None:
        """Reuse the results of architectures an earlier run (or another worker) already measured in the same
        measurement context."""
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            sig = t.user_attrs.get("signature")
            if t.user_attrs.get("measure_context", "") != self.context:
                continue
            if sig and sig not in self._cache and "measurement" in t.user_attrs:
                self._cache[sig] = {"trial": t.number, "values": list(t.values), "attrs": dict(t.user_attrs)}

    def add_dense(self, signature: str, values: list[float], attrs: dict[str, Any]) -> None:
        """Register the dense model: a candidate whose ratios all round to no pruning *is* the dense model, and gets
        its measurement instead of one of its own (which, on a noisy host, could come out under a tight budget)."""
        self._cache[signature] = {"trial": DENSE_TRIAL, "values": list(values),
                                  "attrs": {**attrs, "measure_context": self.context}}

    def build(self, ratios: dict[str, float], stages: dict[str, float] | None = None) -> PrunedModel:
        """The pruned, BN-re-calibrated (and optionally fine-tuned) candidate for ``ratios``."""
        stages = stages if stages is not None else {}
        t = time.perf_counter()
        pruned = prune(self.subject.model, self.subject.example_inputs, ratios, self.space)
        self._tick("prune", t, stages)
        return self.prepare(pruned, stages)

    def prepare(self, pruned: PrunedModel, stages: dict[str, float]) -> PrunedModel:
        """BN re-calibration (and the optional short fine-tune) of an already pruned candidate.

        Torch's RNG is seeded from the search seed and the architecture, so that re-iterable data shuffled by torch
        (a ``DataLoader``, the demo's batches) replays the same batches: finalize rebuilds the weights a trial
        evaluated instead of training new ones.
        """
        torch.manual_seed(replay_seed(self.seed, pruned.signature))
        t = time.perf_counter()
        if self.subject.calibration_data is not None and self.calibration_batches:
            train.recalibrate_batchnorm(pruned.module, self.subject.calibration_data, self.calibration_batches)
            t = self._tick("calibrate", t, stages)
        if self.finetune_steps and self.subject.train_data is not None:
            train.finetune(pruned.module, self.subject.train_data, self.finetune_steps, loss_fn=self.subject.loss_fn,
                           lr=0.01)
            self._tick("finetune", t, stages)
        pruned.module.eval()
        return pruned

    def export_and_measure(self, module: Any, stages: dict[str, float]) -> tuple[Measurement, float | None]:
        """The candidate's measurement, and (with ``beside``) its latency divided by the dense model's: the median
        ratio of ``ROUNDS`` interleaved rounds, the measurement then the round with the middle latency.

        One pair is not enough on a shared host: a slow spell as long as one measurement doubled a model's latency
        and not the dense model's beside it (the demo at 0.4x: a 0.35x model measured 0.67x once), which steered the
        bisection and the sampler; the median of three rounds drops such a round."""
        from hwprune.export import export_onnx

        def timed(path: Path) -> Measurement:
            m = self.measure(path)
            if path == self.beside:
                self.book("dense_beside", sum(m.stage_seconds.values()), stages)
            else:
                for k, v in m.stage_seconds.items():
                    self.book(k, v, stages)
            return m

        def timed_pair(path: Path, reference: Path) -> tuple[Measurement, Measurement, list[float]]:
            assert self.measure_pair is not None
            m, dense, ratios = self.measure_pair(path, reference)
            self.book("dense_beside", sum(dense.stage_seconds.values()), stages)
            for k, v in m.stage_seconds.items():
                self.book(k, v, stages)
            return m, dense, ratios

        t = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="hwprune-") as tmp:
            path = export_onnx(module, self.subject.example_inputs, Path(tmp) / "candidate.onnx",
                               exporter=self.exporter)
            t = self._tick("export", t, stages)
            if self.beside is None:
                m, ratio = timed(path), None
            else:
                rounds = interleaved_rounds(timed, path, self.beside,
                                            measure_pair=timed_pair if self.measure_pair is not None else None)
                m, ratio = rounds.middle, rounds.ratio
        self._tick("measure", t, {})
        return m, ratio

    def evaluate(self, module: Any, stages: dict[str, float]) -> float:
        t = time.perf_counter()
        score = float(self.subject.evaluate(module))
        self._tick("evaluate", t, stages)
        if math.isnan(score):
            raise HwpruneError("evaluate(model) returned NaN")
        return score

    def __call__(self, trial: optuna.Trial) -> tuple[float, float, float]:
        ratios = {k.name: trial.suggest_float(k.name, 0.0, k.max_ratio) for k in self.space.knobs}
        stages: dict[str, float] = {}
        # pruning, calibration and evaluation are torch work too: size its thread pool to the free cores, or a
        # busy host makes OpenMP workers wait on each other (measured: 14x slower BN re-calibration)
        torch.set_num_threads(train.training_threads())
        try:
            t = time.perf_counter()
            # the signature is known before calibration, so a cached architecture skips all the expensive work
            pruned = prune(self.subject.model, self.subject.example_inputs, ratios, self.space)
            self._tick("prune", t, stages)
            cached = self._cache.get(pruned.signature)
            if cached is not None:
                for key in ("widths", "macs", "params", "signature", "measurement", "accuracy_proxy",
                            "measure_context", "latency_ratio"):
                    if key in cached["attrs"]:
                        trial.set_user_attr(key, cached["attrs"][key])
                trial.set_user_attr("cached_from", cached["trial"])
                trial.set_user_attr("stage_seconds", stages)
                acc, lat, mem = cached["values"]
                self._constrain(trial, lat, mem, cached["attrs"].get("latency_ratio"), acc)
                return acc, lat, mem
            pruned = self.prepare(pruned, stages)  # the copy pruned for the signature; no second prune
            trial.set_user_attr("widths", {k: list(v) for k, v in pruned.widths.items()})
            trial.set_user_attr("macs", int(pruned.macs))
            trial.set_user_attr("params", int(pruned.params))
            trial.set_user_attr("signature", pruned.signature)
            m, ratio = self.export_and_measure(pruned.module, stages)
            acc = self.evaluate(pruned.module, stages)
        except (MeasurementError, ExportError, HwpruneError) as exc:
            trial.set_user_attr("fail_reason", str(exc))
            trial.set_user_attr("stage_seconds", stages)
            raise
        except Exception as exc:  # noqa: BLE001 - one bad candidate must not end the study
            reason = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("fail_reason", reason)
            trial.set_user_attr("stage_seconds", stages)
            raise HwpruneError(reason) from exc
        lat, mem = m.latency.median_ms, m.memory.total_mb
        trial.set_user_attr("measurement", m.to_dict())
        if ratio is not None:
            trial.set_user_attr("latency_ratio", ratio)
        trial.set_user_attr("measure_context", self.context)
        trial.set_user_attr("accuracy_proxy", acc)
        trial.set_user_attr("stage_seconds", stages)
        self._constrain(trial, lat, mem, ratio, acc)
        self._cache[pruned.signature] = {"trial": trial.number, "values": [acc, lat, mem],
                                         "attrs": dict(trial.user_attrs)}
        return acc, lat, mem

    def _constrain(self, trial: optuna.Trial, lat: float, mem: float, ratio: float | None, acc: float) -> None:
        b = self.budgets
        # what this trial was judged by: a resumed run may bring other budgets, and a relative one moves
        trial.set_user_attr("budgets", {"latency_ms": b.latency_ms, "memory_mb": b.memory_mb,
                                        "accuracy_floor": b.accuracy_floor if b.guard_trials else None})
        lat_v, mem_v = self.budgets.violations(lat, mem, ratio)
        trial.set_constraint("latency", lat_v)
        trial.set_constraint("memory", mem_v)
        if self.budgets.accuracy_floor is not None and self.budgets.guard_trials:
            trial.set_constraint("accuracy", self.budgets.accuracy_violation(acc))


def replay_seed(seed: int, signature: str) -> int:
    """The torch seed for preparing the candidate with architecture ``signature`` in a search seeded ``seed``."""
    return (int(signature[:15], 16) ^ (seed * 0x9E3779B1)) % (2**63 - 1)


def make_sampler(name: str, seed: int, n_knobs: int) -> optuna.samplers.BaseSampler:
    """The sampler for ``name``.

    The default ("tpe") was picked by bench/bench_samplers.py: on the demo at 30 trials under one common latency
    budget, multivariate TPE ranked first on hypervolume and best feasible accuracy across 3 seeds (see
    bench/README.md). "random", "nsga2" and "gp" stay available for comparison.
    """
    if name == "tpe":
        # multivariate TPE models the coupling between layers' widths; startup trials scale with the space size
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=max(8, min(16, n_knobs)))
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=16)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


# Every running trial records a heartbeat this often; one silent for twice as long belongs to a worker that was
# killed (kill -9, a lost machine), and is failed when any worker opens the study or starts a trial, instead of
# staying RUNNING forever. HWPRUNE_HEARTBEAT_S overrides it (tests; slow links to a shared database).
HEARTBEAT_S = 10


def _with_heartbeat(url: str) -> str | optuna.storages.BaseStorage:
    """An RDB storage URL as an RDBStorage that records heartbeats; other storages as they are."""
    if not re.match(r"(sqlite|postgresql|mysql)(\+\w+)?://", url):
        return url
    interval = int(os.environ.get("HWPRUNE_HEARTBEAT_S", HEARTBEAT_S))
    with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9, and stable in use
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=interval, grace_period=2 * interval)


def open_study(storage: str, name: str, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """Create or resume the study ``name``; a study of the same name with other objectives is an error. Trials left
    RUNNING by a worker that died are failed (heartbeats, :data:`HEARTBEAT_S`)."""
    attempt = 0
    while True:
        try:
            study = optuna.create_study(storage=_with_heartbeat(storage), study_name=name, sampler=sampler,
                                        directions=list(DIRECTIONS), load_if_exists=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            break
        except ImportError as exc:
            raise HwpruneError(f"storage {_redact(storage)}: its database driver is not installed ({exc}); for "
                               "PostgreSQL run `pip install -e '.[postgres]'`") from None
        except (optuna.exceptions.OptunaError, ValueError) as exc:
            raise HwpruneError(f"storage {_redact(storage)}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy errors carry pages of context
            # workers started together race to create the schema and the study; the loser retries and finds them
            attempt += 1
            if attempt >= 5:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise HwpruneError(f"cannot open storage {_redact(storage)}: {first}") from None
            time.sleep(0.5 * 2**attempt)
    if len(study.directions) != 3:
        raise HwpruneError(f"study {name!r} in {storage} was not made by hwprune search (it has "
                           f"{len(study.directions)} objectives); choose another --study name")
    return study


def _redact(url: str) -> str:
    """The storage URL without its password, for messages."""
    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", url)


WARM_START = (1 / 3, 2 / 3, 1.0)  # fractions of the space's max ratio


def warm_start(study: optuna.Study, space: PruningSpace, fractions: tuple[float, ...] = WARM_START) -> None:
    """Enqueue uniform-ratio candidates (the baseline a user would try first) when the study is new.

    They span the space up to its smallest model, which tells the search (and the user, when nothing fits) the
    fastest latency reachable; :func:`bracket_budget` then aims uniform candidates at the budget itself.
    """
    if study.get_trials(deepcopy=False):
        return
    top = _warm_start_top(space)
    for f in fractions:
        r = round(f * top, 4)
        study.enqueue_trial(space.uniform(r), user_attrs={"uniform_ratio": r}, skip_if_exists=True)


def _warm_start_top(space: PruningSpace) -> float:
    """The warm start's largest uniform ratio: all of the space's max ratio."""
    return round(max((k.max_ratio for k in space.knobs), default=0.0), 4)


BRACKET_STEPS = 6  # uniform trials spent at most on aiming at the latency budget
BRACKET_SCAN = 0.0005  # ratio step of the scan for the uniform architectures between two measured ones


def bracket_budget(study: optuna.Study, space: PruningSpace, dense_latency_ms: float, budgets: Budgets,
                   confirm: ConfirmFn | None = None) -> list[float]:
    """The next uniform ratio aimed at the latency budget, enqueued, by bisection over the uniform trials measured
    so far, so that the search always holds the best uniform model that meets the budget: the baseline it must beat.

    A safeguarded regula falsi between the least-pruned uniform trial that meets the budget and the most-pruned one
    below it that misses: latency falls off cliffs where a group's rounded width drops a whole channel multiple, so
    each step keeps to the middle half of the interval, and lands on a ratio whose rounded widths differ from both
    ends'. Returns the ratio enqueued, or nothing when no measured pair straddles the budget, no uniform architecture
    lies between the two ends (the best uniform model is found), a uniform trial is still queued, or
    ``BRACKET_STEPS`` were spent. The search stops at adjacent architectures, not at a ratio tolerance: on the demo
    two uniform architectures 0.04 apart in ratio differ by 20% in MACs, and the rounded baseline finds the one
    between. Once the bisection is done, :func:`probe_depth` tries its lower end with one block removed; when no
    uniform model meets the budget, not even the warm start's most pruned one, it tries that one so.
    Latencies are the ones ``budgets`` judges (:meth:`Budgets.judged_ms`), measured again where the study holds a
    second measurement (``CONFIRMED_ATTR``).

    With ``confirm`` (see :class:`~hwprune.study.refine.EdgeRefiner`), the lower end, when it missed the budget by
    at most ``NEAR_MISS``, is measured again first (once per trial), and so in turn is the end that replaces it if
    that measurement meets the budget: on a shared host the warm start's smallest model can land just over a budget
    it meets, and then bisection never starts; and a 0.37x uniform model once measured 0.41x at 0.4x, after which
    the bisection searched above it and never tried the less pruned models between it and the last miss. So is a
    lower end measured slower than a less pruned uniform trial (a 0.35x model once measured 0.51x). An upper
    end that a more pruned uniform trial's miss contradicts is measured again too: a 0.61x model once measured 0.45x
    at 0.6x, and the bisection spent its steps below it.
    """
    queued = list(study.user_attrs.get("bracketed") or [])
    budget_ms = budgets.latency_ms
    if budget_ms is None:
        return []
    exhausted = len(queued) >= BRACKET_STEPS
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING and "uniform_ratio" in t.user_attrs for t in trials):
        return []
    uniform = [t for t in trials if t.state == TrialState.COMPLETE and "uniform_ratio" in t.user_attrs and t.values]
    confirmed = dict(study.user_attrs.get(CONFIRMED_ATTR) or {})
    by_ratio = {float(t.user_attrs["uniform_ratio"]): t for t in uniform}

    def ends() -> tuple[tuple[float, float] | None, tuple[float, float] | None, bool, bool]:
        """(most pruned miss below the least pruned meet, least pruned meet) as (ratio, latency), or None; whether a
        more pruned uniform trial than that meet missed the budget, and whether a less pruned one (or the dense model)
        than that miss ran faster than it (either way, one of the two measurements is off)."""
        measured = [(0.0, budgets.judged_ms(dense_latency_ms, 1.0))]
        measured += [(r, confirmed_latency(t, budgets, confirmed)) for r, t in by_ratio.items()]
        hi = min((p for p in measured if p[1] <= budget_ms), default=None)
        lo = max((p for p in measured if p[1] > budget_ms and (hi is None or p[0] < hi[0])), default=None)
        contradicted = hi is not None and any(p[1] > budget_ms and p[0] > hi[0] for p in measured)
        inverted = lo is not None and any(p[0] < lo[0] and p[1] < lo[1] for p in measured)
        return lo, hi, contradicted, inverted

    def suspect() -> optuna.trial.FrozenTrial | None:
        """The end to measure again: a lower end just over the budget or slower than a less pruned uniform trial,
        else an upper end a more pruned miss contradicts; each is measured again once at most."""
        ends_ = []
        if lo is not None and lo[0] in by_ratio and (lo[1] <= budget_ms * (1 + NEAR_MISS) or inverted):
            ends_.append(by_ratio[lo[0]])
        if contradicted and hi is not None and hi[0] in by_ratio:
            ends_.append(by_ratio[hi[0]])
        return next((t for t in ends_ if str(t.number) not in confirmed), None)

    lo, hi, contradicted, inverted = ends()
    while confirm is not None and not exhausted and (edge := suspect()) is not None:
        try:
            confirmed[str(edge.number)] = confirm(edge.params)
        except HwpruneError as exc:  # aiming at the budget is not worth a search
            log.warning("measuring uniform trial %d again failed (%s)", edge.number, exc)
            break
        study.set_user_attr(CONFIRMED_ATTR, confirmed)
        lo, hi, contradicted, inverted = ends()
    if hi is None:
        # every measured model missed, so ``lo`` is the most pruned one; once that is the warm start's smallest,
        # what is left to try there is trading blocks for width (seed 0 of the demo at 0.4x once spent all 30
        # trials without a model in budget)
        if lo is not None and lo[0] >= _warm_start_top(space) - 1e-9:
            probe_depth(study, space, lo[0])
        return []
    if lo is None:
        return []

    between = [] if exhausted else uniform_architectures_between(space, lo[0], hi[0])
    if not between:
        probe_depth(study, space, lo[0])
        return []
    span = hi[0] - lo[0]
    target = lo[0] + span * (lo[1] - budget_ms) / max(lo[1] - hi[1], 1e-12)
    target = min(max(target, lo[0] + 0.25 * span), hi[0] - 0.25 * span)
    # the architecture whose ratio interval holds the target, else the nearest one
    first, last = min(between, key=lambda iv: max(iv[0] - target, target - iv[1], 0.0))
    r = round(target, 4) if first <= round(target, 4) <= last else round((first + last) / 2, 4)
    study.set_user_attr("bracketed", queued + [r])
    study.enqueue_trial(space.uniform(r), user_attrs={"uniform_ratio": r}, skip_if_exists=True)
    return [r]


DEPTH_PROBES = 4  # blocks probed one at a time once the bracket is done


def probe_depth(study: optuna.Study, space: PruningSpace, ratio: float) -> list[str]:
    """Once per study, enqueue the uniform model of ``ratio`` (the bracket's lower end: the least pruned uniform
    model that missed the budget; or the warm start's most pruned one when none met it) with one residual block
    removed, for up to ``DEPTH_PROBES`` blocks spread over the model; returns the blocks probed.

    Each trades a block for the widths one uniform step buys, right at the budget: near the per-operator floor that
    is the trade left (on the demo at 0.4x, two blocks out and uniform 0.5-0.6 beat uniform 0.7-0.75 at the same
    latency by 2-3 points after fine-tuning). The sampler alone meets few of them: a random block choice at random
    widths is rarely near the budget, and the edge refinement keeps the incumbent's blocks."""
    blocks = space.blocks
    if not blocks or study.user_attrs.get("depth_probed") is not None:
        return []
    n = min(DEPTH_PROBES, len(blocks))
    picked = [blocks[round(i * (len(blocks) - 1) / (n - 1))] if n > 1 else blocks[-1] for i in range(n)]
    study.set_user_attr("depth_probed", picked)
    base = space.uniform(ratio)
    for name in picked:
        study.enqueue_trial({**base, name: space.knob(name).max_ratio}, user_attrs={"depth_probe": name},
                            skip_if_exists=True)
    return picked


def uniform_architectures(space: PruningSpace, lo: float, hi: float,
                          step: float = BRACKET_SCAN) -> list[tuple[float, float]]:
    """The uniform architectures of ratios ``lo`` to ``hi`` (both included, scanned in ``step`` increments), as the
    ratio interval ``(first, last)`` of the scan that builds each, in ratio order (so in falling widths)."""
    found: list[tuple[float, float]] = []
    last: tuple[int, ...] | None = None
    for i in range(int(round((hi - lo) / step)) + 1):
        r = round(lo + i * step, 4)
        if r > hi:
            break
        w = space.kept_widths(space.uniform(r))
        if w == last:
            found[-1] = (found[-1][0], r)
        else:
            found.append((r, r))
            last = w
    return found


def uniform_architectures_between(space: PruningSpace, lo: float, hi: float) -> list[tuple[float, float]]:
    """The uniform architectures strictly between uniform ratios ``lo`` and ``hi``, as the ratio interval
    ``(first, last)`` that builds each (scanned in ``BRACKET_SCAN`` steps), in ratio order; their rounded widths
    differ from those of ``lo`` and ``hi``."""
    ends = {space.kept_widths(space.uniform(lo)), space.kept_widths(space.uniform(hi))}
    return [iv for iv in uniform_architectures(space, lo, hi)
            if space.kept_widths(space.uniform(iv[0])) not in ends]


def is_feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial has values and met every constraint it stored (the budgets of the run that measured it)."""
    return bool(trial.values) and all(v <= 0 for v in (trial.constraints or {}).values())


def trials_table(study: optuna.Study) -> list[dict[str, Any]]:
    """One plain record per trial (state, values, feasibility, user attributes) for tables and reports."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        constraints = dict(t.constraints or {})
        row: dict[str, Any] = {
            "trial": t.number,
            "state": t.state.name,
            "accuracy": t.values[0] if t.values else None,
            "latency_ms": t.values[1] if t.values else None,
            "memory_mb": t.values[2] if t.values else None,
            "feasible": is_feasible(t),
            "constraint_latency": constraints.get("latency"),
            "constraint_memory": constraints.get("memory"),
            "constraint_accuracy": constraints.get("accuracy"),
            "judged_by": json.dumps(t.user_attrs["budgets"]) if "budgets" in t.user_attrs else None,
            "latency_ratio": latency_ratio(t),
            "uniform_ratio": t.user_attrs.get("uniform_ratio"),
            "signature": t.user_attrs.get("signature"),
            "macs": t.user_attrs.get("macs"),
            "params": t.user_attrs.get("params"),
            "cached_from": t.user_attrs.get("cached_from"),
            "fail_reason": t.user_attrs.get("fail_reason") or (
                "its worker stopped without finishing it (interrupted, killed, or its heartbeat was lost)"
                if t.state == TrialState.FAIL else None),
            "duration_s": t.duration.total_seconds() if t.duration else None,
            "stage_seconds": json.dumps(t.user_attrs.get("stage_seconds", {})),
            "ratios": json.dumps(t.params),
        }
        rows.append(row)
    return rows
