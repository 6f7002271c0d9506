"""The Optuna study: one trial = prune -> (cache lookup) -> export -> measure -> calibrate -> evaluate.

The study never imports a backend; it gets a ``measure(onnx_path) -> Measurement`` function. The budgets, the
storage, the uniform bracketing and the trials table live in their own modules; their names stay importable from
here.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from hwprune import train
from hwprune.backends.base import Measurement
from hwprune.errors import ExportError, HwpruneError, MeasurementError
from hwprune.pruning import PrunedModel, PruningSpace, prune
from hwprune.study import attrs, failfast
from hwprune.study.bracket import (  # noqa: F401
    BRACKET_SCAN,
    BRACKET_STEPS,
    DEPTH_PROBES,
    WARM_START,
    bracket_budget,
    probe_depth,
    uniform_architectures,
    uniform_architectures_between,
    warm_start,
)
from hwprune.study.budgets import (  # noqa: F401
    CONFIRMED_ATTR,
    NEAR_MISS,
    Budgets,
    ConfirmFn,
    confirmed_latency,
    is_feasible,
    judged_latency,
    latency_ratio,
)
from hwprune.study.precision import QuantResult, QuantSearch, has_int8, signature_with, split_params
from hwprune.study.reference import MeasurePair, interleaved_rounds
from hwprune.study.storage import DIRECTIONS, HEARTBEAT_S, make_sampler, open_study  # noqa: F401
from hwprune.study.trials import trials_table  # noqa: F401
from hwprune.subjects.base import Subject

MeasureFn = Callable[[Path], Measurement]
DENSE_TRIAL = -1  # ``cached_from`` of a candidate that is the dense architecture


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
    quant: QuantSearch | None = None  # --quantize int8: a precision per unit on top of the widths
    stage_seconds: dict[str, float] = field(default_factory=dict)
    screening: Any = None  # hwprune.study.screening.Screening with --screen on
    last_rounds: int | None = None  # interleaved rounds behind the last measure_file's ratio (None: no ratio)
    # signature -> ratios of this run's re-measures of an incumbent: the front's confirmation of the same
    # architecture counts them as rounds instead of measuring them again (never across runs: a night may differ)
    remeasured: dict[str, list[float]] = field(default_factory=dict)
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
            sig = t.user_attrs.get(attrs.SIGNATURE)
            if t.user_attrs.get(attrs.MEASURE_CONTEXT, "") != self.context:
                continue
            if sig and sig not in self._cache and attrs.MEASUREMENT in t.user_attrs:
                self._cache[sig] = {"trial": t.number, "values": list(t.values), "attrs": dict(t.user_attrs)}

    def add_dense(self, signature: str, values: list[float], user_attrs: dict[str, Any]) -> None:
        """Register the dense model: a candidate whose ratios all round to no pruning *is* the dense model, and gets
        its measurement instead of one of its own (which, on a noisy host, could come out under a tight budget)."""
        self._cache[signature] = {"trial": DENSE_TRIAL, "values": list(values),
                                  "attrs": {**user_attrs, attrs.MEASURE_CONTEXT: self.context}}

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

    def export_and_measure(self, module: Any, stages: dict[str, float],
                           settles: Callable[[float], bool] | None = None) -> tuple[Measurement, float | None]:
        """The candidate's measurement, and (with ``beside``) its latency divided by the dense model's
        (:meth:`measure_file`)."""
        from hwprune.export import export_onnx

        t = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="hwprune-") as tmp:
            path = export_onnx(module, self.subject.example_inputs, Path(tmp) / "candidate.onnx",
                               exporter=self.exporter)
            self._tick("export", t, stages)
            return self.measure_file(path, stages, settles)

    def export_quantize_measure(self, module: Any, choice: dict[str, str],
                                stages: dict[str, float]) -> tuple[Measurement, float | None, float, QuantResult]:
        """--quantize int8: export, quantize as ``choice`` says, check the outputs, measure the quantized file and
        score it through ONNX Runtime (the PyTorch module is not the INT8 model).

        Raises:
            QuantizationError: ORT cannot quantize it, or its outputs moved beyond the tolerance.
        """
        from hwprune.export import export_onnx

        assert self.quant is not None
        t = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="hwprune-") as tmp:
            path = export_onnx(module, self.subject.example_inputs, Path(tmp) / "candidate.onnx",
                               exporter=self.exporter)
            t = self._tick("export", t, stages)
            q = self.quant.apply(path, Path(tmp) / "candidate.int8.onnx", choice)
            self._tick("quantize", t, stages)
            m, ratio = self.measure_file(q.model.path, stages)
            t = time.perf_counter()
            acc = self.quant.evaluate(q.model.path, self.subject.evaluate)
            self._tick("evaluate", t, stages)
        return m, ratio, acc, q

    def measure_file(self, path: Path, stages: dict[str, float],
                     settles: Callable[[float], bool] | None = None) -> tuple[Measurement, float | None]:
        """The measurement of the exported ``path``, and (with ``beside``) its latency divided by the dense model's:
        the median ratio of ``ROUNDS`` interleaved rounds, the measurement then the round with the middle latency
        (fewer rounds once ``settles`` accepts the judged latency of those so far: ``--screen on``). With
        ``settles`` and a relative budget, the model is first measured alone and settled by that measurement against
        the dense reference when ``settles`` accepts it (:meth:`_settled_alone`). The rounds taken are in
        :attr:`last_rounds` (0: measured alone).

        One pair is not enough on a shared host: a slow spell as long as one measurement doubled a model's latency
        and not the dense model's beside it (the demo at 0.4x: a 0.35x model measured 0.67x once), which steered the
        bisection and the sampler; the median of three rounds drops such a round."""
        def timed(p: Path) -> Measurement:
            m = self.measure(p)
            if p == self.beside:
                self.book("dense_beside", sum(m.stage_seconds.values()), stages)
            else:
                for k, v in m.stage_seconds.items():
                    self.book(k, v, stages)
            return m

        def timed_pair(p: Path, reference: Path) -> tuple[Measurement, Measurement, list[float]]:
            assert self.measure_pair is not None
            m, dense, ratios = self.measure_pair(p, reference)
            self.book("dense_beside", sum(dense.stage_seconds.values()), stages)
            for k, v in m.stage_seconds.items():
                self.book(k, v, stages)
            return m, dense, ratios

        t = time.perf_counter()
        self.last_rounds = None
        if self.beside is None:
            m, ratio = timed(path), None
        elif (alone := self._settled_alone(path, timed, settles)) is not None:
            m, ratio = alone
            self.last_rounds = 0
        else:
            settled = None if settles is None else (lambda r: settles(r.judged_ms(self.budgets.now())))
            rounds = interleaved_rounds(timed, path, self.beside,
                                        measure_pair=timed_pair if self.measure_pair is not None else None,
                                        settled=settled)
            m, ratio = rounds.middle, rounds.ratio
            self.last_rounds = len(rounds.ratios)
        self._tick("measure", t, {})
        return m, ratio

    def _settled_alone(self, path: Path, timed: Callable[[Path], Measurement],
                       settles: Callable[[float], bool] | None) -> tuple[Measurement, float] | None:
        """``--screen on``, a candidate the screen predicts well inside a relative budget: measure it alone and
        judge its ratio against the dense reference (the middle of the dense sets), without the dense model beside
        it, which costs the board as much again as the candidate. Settled when that measurement is as far inside
        the budget as ``settles`` asks and not flagged noisy; the prediction and the measurement then agree that
        the model is far from the budget's edge, where a few percent of drift since the dense sets cannot put it
        over (a front model is confirmed beside the dense model all the same). Returns the measurement and its
        ratio, or None (the measurement is spent and the rounds beside the dense model follow)."""
        reference = self.budgets.now().reference_ms
        if settles is None or reference is None:
            return None
        m = timed(path)
        # judged against the dense reference, the ratio's latency is the measurement's own: budgets.judged_ms
        if m.latency.noisy or not settles(m.latency.median_ms):
            return None
        return m, m.latency.median_ms / reference

    def evaluate(self, module: Any, stages: dict[str, float]) -> float:
        t = time.perf_counter()
        score = float(self.subject.evaluate(module))
        self._tick("evaluate", t, stages)
        if math.isnan(score):
            raise HwpruneError("evaluate(model) returned NaN")
        return score

    def __call__(self, trial: optuna.Trial) -> tuple[float, float, float]:
        ratios = {k.name: trial.suggest_float(k.name, 0.0, k.max_ratio) for k in self.space.knobs}
        choice = self.quant.suggest(trial) if self.quant is not None else {}
        stages: dict[str, float] = {}
        # pruning, calibration and evaluation are torch work too: size its thread pool to the free cores, or a
        # busy host makes OpenMP workers wait on each other (measured: 14x slower BN re-calibration)
        torch.set_num_threads(train.training_threads())
        stage = failfast.PRUNE  # where a failure happened: the fail-fast check tells the model's faults apart
        try:
            t = time.perf_counter()
            # the signature is known before calibration, so a cached architecture skips all the expensive work
            pruned = prune(self.subject.model, self.subject.example_inputs, ratios, self.space)
            self._tick("prune", t, stages)
            signature = signature_with(pruned.signature, choice)  # fp32 and int8 variants are other candidates
            cached = self._cache.get(signature)
            if cached is not None:
                for key in attrs.CACHED_KEYS:
                    if key in cached["attrs"]:
                        trial.set_user_attr(key, cached["attrs"][key])
                trial.set_user_attr(attrs.CACHED_FROM, cached["trial"])
                trial.set_user_attr(attrs.STAGE_SECONDS, stages)
                acc, lat, mem = cached["values"]
                self._constrain(trial, lat, mem, cached["attrs"].get(attrs.LATENCY_RATIO), acc)
                return acc, lat, mem
            # --screen on: an FP32 candidate predicted well over budget is not measured (a predictor of FP32 graphs)
            if self.screening is not None and not has_int8(choice):
                t = time.perf_counter()
                try:
                    self.screening.check(trial, pruned.module, self.subject.example_inputs, self.budgets,
                                         self.exporter)
                finally:
                    self._tick("screen", t, stages)
            stage = failfast.FORWARD
            pruned = self.prepare(pruned, stages)  # the copy pruned for the signature; no second prune
            trial.set_user_attr(attrs.WIDTHS, {k: list(v) for k, v in pruned.widths.items()})
            trial.set_user_attr(attrs.MACS, int(pruned.macs))
            trial.set_user_attr(attrs.PARAMS, int(pruned.params))
            trial.set_user_attr(attrs.SIGNATURE, signature)
            stage = failfast.EXPORT_STAGE
            if has_int8(choice):
                m, ratio, acc, q = self.export_quantize_measure(pruned.module, choice, stages)
                trial.set_user_attr(attrs.PRECISION, q.model.label)
                if q.check is not None:
                    trial.set_user_attr(attrs.OUTPUT_ERROR, q.check.relative_error)
            elif self.screening is not None:
                # accuracy first: a candidate that a measured trial dominates needs no rounds (settles_for)
                stage = failfast.EVALUATE
                acc = self.evaluate(pruned.module, stages)
                stage = failfast.EXPORT_STAGE
                done = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                settles = self.screening.settles_for(acc, done, self.budgets,
                                                     uniform=attrs.UNIFORM_RATIO in trial.user_attrs)
                m, ratio = self.export_and_measure(pruned.module, stages, settles)
                judged = self.budgets.now().judged_ms(m.latency.median_ms, ratio)
                dominator = self.screening.dominated_by(judged) if self.last_rounds in (0, 1) else None
                if dominator is not None:
                    trial.set_user_attr(attrs.DOMINATED_BY, dominator)
                if self.last_rounds in (0, 1) and self.screening.under_guard:
                    trial.set_user_attr(attrs.UNDER_GUARD, True)
                own = self.screening.record(m, judged)
                if own is not None:
                    trial.set_user_attr(attrs.SCREEN_RATIO, own)
                if self.quant is not None:
                    trial.set_user_attr(attrs.PRECISION, "fp32")
            else:
                m, ratio = self.export_and_measure(pruned.module, stages)
                stage = failfast.EVALUATE
                acc = self.evaluate(pruned.module, stages)
                if self.quant is not None:
                    trial.set_user_attr(attrs.PRECISION, "fp32")
        except optuna.TrialPruned:
            trial.set_user_attr(attrs.STAGE_SECONDS, stages)
            raise
        except (MeasurementError, ExportError, HwpruneError) as exc:
            trial.set_user_attr(attrs.FAIL_REASON, str(exc))
            trial.set_user_attr(attrs.STAGE_SECONDS, stages)
            _record_failure(trial, exc, stage)
            raise
        except Exception as exc:  # noqa: BLE001 - one bad candidate must not end the study
            reason = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr(attrs.FAIL_REASON, reason)
            trial.set_user_attr(attrs.STAGE_SECONDS, stages)
            _record_failure(trial, exc, stage)
            raise HwpruneError(reason) from exc
        lat, mem = m.latency.median_ms, m.memory.total_mb
        trial.set_user_attr(attrs.MEASUREMENT, m.to_dict())
        if ratio is not None:
            trial.set_user_attr(attrs.LATENCY_RATIO, ratio)
            trial.set_user_attr(attrs.LATENCY_ROUNDS, self.last_rounds)
        trial.set_user_attr(attrs.MEASURE_CONTEXT, self.context)
        trial.set_user_attr(attrs.ACCURACY_PROXY, acc)
        trial.set_user_attr(attrs.STAGE_SECONDS, stages)
        self._constrain(trial, lat, mem, ratio, acc)
        self._cache[signature] = {"trial": trial.number, "values": [acc, lat, mem],
                                         "attrs": dict(trial.user_attrs)}
        return acc, lat, mem

    def split(self, params: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
        """A trial's parameters as pruning ratios and its precision choice (empty when the search is FP32 only)."""
        ratios, choice = split_params(params)
        return ratios, (choice if self.quant is not None else {})

    def _constrain(self, trial: optuna.Trial, lat: float, mem: float, ratio: float | None, acc: float) -> None:
        b = self.budgets.now()  # a relative latency budget follows the dense reference
        # what this trial was judged by: a resumed run may bring other budgets, and a relative one moves
        trial.set_user_attr(attrs.JUDGED_BY, b.judged_by())
        lat_v, mem_v = b.violations(lat, mem, ratio)
        trial.set_constraint("latency", lat_v)
        trial.set_constraint("memory", mem_v)
        if b.accuracy_floor is not None and b.guard_trials:
            trial.set_constraint("accuracy", b.accuracy_violation(acc))


def _record_failure(trial: optuna.Trial, exc: BaseException, stage: str) -> None:
    """The kind and stage of a failed trial, which :class:`~hwprune.study.failfast.FailFast` reads."""
    kind, stage = failfast.classify(exc, stage)
    trial.set_user_attr(failfast.FAIL_KIND, kind)
    trial.set_user_attr(failfast.FAIL_STAGE, stage)


def replay_seed(seed: int, signature: str) -> int:
    """The torch seed for preparing the candidate with architecture ``signature`` in a search seeded ``seed``."""
    return (int(signature[:15], 16) ^ (seed * 0x9E3779B1)) % (2**63 - 1)

