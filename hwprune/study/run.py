"""A whole search, as a short list of stages, each in its own module with a typed state passed along:

1. :mod:`~hwprune.study.context`: the device profile, the checks, request.json (:class:`RunContext`)
2. :mod:`~hwprune.study.optimize`: the dense model (:mod:`~hwprune.study.dense`), budgets, space, the Optuna trials
   (:class:`~hwprune.study.optimize.Trials`)
3. :mod:`~hwprune.study.run_folder`: trials.csv (:class:`~hwprune.study.run_folder.TrialsTable`)
4. :mod:`~hwprune.study.front`: confirm the front (:mod:`~hwprune.study.confirm`), final candidates, accuracy guard,
   recommendation (:mod:`~hwprune.study.finalists`) (:class:`~hwprune.study.front.Front`)
5. :mod:`~hwprune.study.run_folder`: summary.json (:class:`~hwprune.study.records.Summary`), pareto.csv, the report

Every stage writes what the next one reads, so the report can be rebuilt from the run folder and the storage alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch

from hwprune.backends import backend_capabilities, create_backend
from hwprune.backends.base import Measurement
from hwprune.config import SearchConfig, prepare_run_dir
from hwprune.errors import HwpruneError
from hwprune.profiles import DeviceProfile, default_budgets
from hwprune.pruning.importance import auto_importance
from hwprune.recovery import RecoveryPlan
from hwprune.study import attrs, run_folder
from hwprune.study.budgets import NEAR_MISS, Budgets  # noqa: F401 - importable from here, as before
from hwprune.study.confirm import OVER_BUDGET, REFILL_CONFIRMATIONS  # noqa: F401
from hwprune.study.context import (  # noqa: F401
    RunContext,
    check_rankable,
    measurement_context,
    resolve_profile,
    versions,
    write_request,
)
from hwprune.study.front import Front, select_front
from hwprune.study.identity import Fingerprint, check_identity, fingerprint, load_existing
from hwprune.study.optimize import Trials, run_trials
from hwprune.study.precision import resolve_quantize
from hwprune.study.records import SCHEMA  # noqa: F401
from hwprune.study.result import ParetoModel, SearchResult
from hwprune.study.run_folder import pareto_table  # noqa: F401
from hwprune.subjects.base import Subject
from hwprune.subjects.data import load_data_file
from hwprune.subjects.loader import attach_data, load_subject

log = logging.getLogger("hwprune")

__all__ = ["ParetoModel", "Search", "SearchResult", "search"]


class Search:
    """One search run. Use :func:`hwprune.search` unless you need the pieces."""

    def __init__(self, config: SearchConfig, subject: Subject | None = None,
                 log_fn: Callable[[str], None] | None = None) -> None:
        self.config = config
        # hwprune reports progress and failed trials itself, without Optuna's tracebacks
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        self.log = log_fn or (lambda msg: log.info(msg))
        self.profile = resolve_profile(config)
        config.latency_budget_ms, config.memory_budget_mb = default_budgets(  # the profile's where none is given
            self.profile, config.latency_budget_ms, config.memory_budget_mb)
        check_rankable(self.profile, config)
        self.quantize = resolve_quantize(config.quantize, self.profile)  # int8 refused here: one line, exit 2
        if config.tune_final_trials and self.profile.backend not in ("tvm", "tvm-rpc"):
            raise HwpruneError(f"--tune-final tunes TVM kernels, but profile {self.profile.name} measures with "
                               f"{self.profile.backend}; add --backend tvm or --backend tvm-rpc")
        self.run_dir = config.run_dir
        prepare_run_dir(self.run_dir)  # a folder that cannot be written is an error now, not after the dense model
        self.storage = config.storage or f"sqlite:///{(self.run_dir / 'study.db').resolve()}"
        self.capabilities = backend_capabilities(self.profile.backend)
        self.exporter = config.exporter or self.capabilities.exporter
        self._subject = subject
        self.backend = None
        self.recovery: RecoveryPlan | None = None  # what pruned models recover with when the subject has no data
        self.fingerprint: Fingerprint | None = None  # what the study's trials depend on, set once the subject loads
        # models the backend measured in this run (dense sets, trials, front confirmation; a pair counts two)
        self.measurements = 0
        # the backend's own seconds on the device for them (session + timing): what a shared board was busy for
        self.board_seconds = 0.0

    def measure(self, onnx_path: Path) -> Measurement:
        """One whole measurement by the backend (counted)."""
        assert self.backend is not None
        self.measurements += 1
        m = self.backend.measure(onnx_path)
        self._busy(m)
        return m

    def measure_pair(self, onnx_path: Path, reference: Path) -> tuple[Measurement, Measurement, list[float]]:
        """Both models timed in alternating samples (the backend's ``measure_beside``)."""
        assert self.backend is not None
        self.measurements += 2  # two models measured, as a round of two whole measurements counts
        m, ref, ratios = self.backend.measure_beside(onnx_path, reference)
        self._busy(m, ref)
        return m, ref, ratios

    def _busy(self, *measurements: Measurement) -> None:
        """Add the backend's own seconds for ``measurements`` to :attr:`board_seconds`."""
        self.board_seconds += sum(sum(m.stage_seconds.values()) for m in measurements)

    @property
    def pair_measure(self) -> Any:
        """:meth:`measure_pair` when the backend can time two models in alternating samples, else None."""
        return self.measure_pair if self.capabilities.beside else None

    def context(self) -> RunContext:
        """What the stages read, once the backend is open."""
        return RunContext(config=self.config, profile=self.profile, run_dir=self.run_dir, storage=self.storage,
                          exporter=self.exporter, log=self.log, measure=self.measure, pair_measure=self.pair_measure,
                          quantize=self.quantize,
                          node_profile=self.backend.node_profile
                          if self.capabilities.node_profile and self.backend is not None else None)

    def _fingerprint(self, subject: Subject) -> Fingerprint:
        """What this run's trials depend on (:mod:`hwprune.study.identity`)."""
        c = self.config
        has_data = any(x is not None for x in (subject.calibration_data, subject.train_data, subject.data))
        budgets = (f"latency {c.latency_budget_ms or 'none'}, memory {c.memory_budget_mb or 'none'}, "
                   f"accuracy drop {c.max_accuracy_drop or 'off'}" + (", int8" if self.quantize.on else ""))
        importance = auto_importance(subject.model) if c.importance == "auto" else c.importance
        return fingerprint(subject.model, subject.example_inputs, measurement_context(self.profile, self.exporter),
                           "data" if has_data else c.recovery, importance, budgets)

    def run(self) -> SearchResult:
        """Run the search: load the subject, check the study is its own, then the stages.

        Raises:
            hwprune.errors.BudgetUnreachable: nothing met the budgets and the guard (the run folder is written).
            hwprune.errors.HwpruneError: bad input, or a study made for another model or device.
            KeyboardInterrupt: after Ctrl-C, once completed trials and the run folder are saved.
        """
        c = self.config
        t_start = time.perf_counter()
        # the search seed drives sampling and fine-tuning only: the demo subject is the same model for every seed
        subject = self._subject or load_subject(c.model, log=self.log)
        if c.data is not None:
            attach_data(subject, load_data_file(c.data))
        # after the model loads: an error in the model, factory or data is then the only line on stderr
        self.log(f"device {self.profile.name}: backend {self.profile.backend}, channel multiple "
                 f"{self.profile.channel_multiple}")
        self.fingerprint = self._fingerprint(subject)
        existing = load_existing(self.storage, c.study_name)
        if existing is not None:  # before anything is written into a run folder that may be another model's
            check_identity(existing, self.fingerprint, resume_changed=c.resume_changed, storage=self.storage,
                           log=self.log)
        request = write_request(c, self.profile, self.storage, self.exporter, self.fingerprint, self.run_dir,
                                self.quantize)
        self.backend = create_backend(self.profile)
        try:
            trials = run_trials(self.context(), subject, request, self.fingerprint)
            self.recovery = trials.recovery
            result = self.finalize(trials, t_start)
        finally:
            self.backend.close()
        if trials.interrupted:
            raise KeyboardInterrupt
        return result

    def finalize(self, trials: Trials, t_start: float) -> SearchResult:
        """The final stages on ``trials``: trials.csv, the front (skipped after Ctrl-C: the next run resumes the
        study and does it), summary.json, pareto.csv and the report.

        Raises:
            hwprune.errors.BudgetUnreachable: no model listed (after the run folder is written).
        """
        ctx = self.context()
        table = run_folder.write_trials(ctx, trials)
        dense = run_folder.dense_model(ctx, trials)
        front = Front()
        if not trials.interrupted:
            dense.entry = run_folder.node_profile(ctx, trials.dense.path, dense.entry)
            trials.study.set_user_attr(attrs.DENSE, dense.entry.to_dict(files=False))
            front = select_front(ctx, trials, table.ranked, dense.entry)
        dense.entry = dense.entry.replace(file_bytes=dense.entry.files["onnx"]["bytes"])
        summary = run_folder.summary(ctx, trials, table, dense.entry, front, self.measurements, t_start,
                                     self.board_seconds)
        data, pareto_df = run_folder.write_summary(ctx, summary)
        if not trials.interrupted:
            run_folder.build_report(ctx)
        result = SearchResult(self.run_dir, data, pareto_df, front.models, dense, trials.study)
        if not front.models and not trials.interrupted:
            raise run_folder.unreachable(ctx, trials, table, front)
        return result


def search(model: str | Subject | torch.nn.Module | Callable[[], Any] = "mobilenet-tiny",
           device: str | DeviceProfile = "host-cpu", *,
           latency_budget_ms: float | str | None = None, memory_budget_mb: float | str | None = None,
           trials: int | None = 40, timeout: float | None = None, storage: str | None = None,
           study: str | None = None, out: str | Path = "reports", seed: int = 0, progress: bool = False,
           example_inputs: Any = None, evaluate: Callable[[torch.nn.Module], float] | None = None,
           data: Any = None, **options: Any) -> SearchResult:
    """Search per-layer pruning ratios for ``model`` on ``device``; see :class:`hwprune.SearchConfig` for options.

    Args:
        model: a demo name, ``"package.module:factory"``, a factory callable, a :class:`hwprune.Subject`, or an
            ``nn.Module`` given with ``example_inputs`` and ``evaluate``.
        device: a profile name, a .toml path or a :class:`hwprune.DeviceProfile`.
        latency_budget_ms: absolute (``20``) or relative to the dense model (``"0.6x"``).
        memory_budget_mb: likewise.
        example_inputs: with an ``nn.Module``: a batch of 1 (a tensor or a tuple of tensors).
        evaluate: with an ``nn.Module``: ``evaluate(model) -> float``, higher is better.
        data: inputs or (inputs, targets) (tensors, a list of batches, or a .pt/.npz path) for BatchNorm
            re-calibration and fine-tuning; without it hwprune recovers pruned models as ``recovery=`` says.
        **options: the other fields of :class:`hwprune.SearchConfig` (``max_accuracy_drop="1%"``, ``recovery=``,
            ``sampler=``, ``max_ratio=``, ...).

    Returns:
        A :class:`SearchResult`: ``pareto`` lists the feasible Pareto-optimal models, ``recommended`` the one to
        deploy.

    Raises:
        hwprune.errors.BudgetUnreachable: no candidate met the budgets and the accuracy guard (the run folder is
            written all the same).
        hwprune.errors.HwpruneError: bad input (one line saying what is wrong).
    """
    subject = None
    spec: Any = model
    if isinstance(model, torch.nn.Module):
        if example_inputs is None or evaluate is None:
            raise HwpruneError("an nn.Module needs example_inputs= (a batch of 1) and evaluate= (model -> score)")
        model = Subject(model=model, example_inputs=example_inputs, evaluate=evaluate, name=type(model).__name__)
    elif example_inputs is not None or evaluate is not None:
        raise HwpruneError("example_inputs= and evaluate= go with an nn.Module; a factory or Subject brings its own")
    if isinstance(data, (str, Path)):
        options["data"], data = Path(data), None
    if not isinstance(model, str) or data is not None:
        subject = load_subject(model, seed=seed)
        spec = subject.name if not isinstance(model, str) else model
        if data is not None:
            attach_data(subject, data)
    device_name = device.source or device.name if isinstance(device, DeviceProfile) else device
    shown = {"latency_budget_ms": latency_budget_ms, "memory_budget_mb": memory_budget_mb, "trials": trials,
             "timeout": timeout, "storage": storage, "study": study, "out": str(out), "seed": seed, **options}
    command = options.pop("command", None) or "hwprune.search({}, {}{})".format(
        repr(spec), repr(device_name), "".join(f", {k}={v!r}" for k, v in shown.items() if v is not None))
    config = SearchConfig(model=spec, device=device_name, latency_budget_ms=latency_budget_ms,
                          memory_budget_mb=memory_budget_mb, trials=trials, timeout_s=timeout, storage=storage,
                          study=study, out=Path(out), seed=seed, progress=progress, command=command, **options)
    return Search(config, subject=subject).run()
