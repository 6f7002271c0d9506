"""A whole search: dense baseline -> Optuna trials -> Pareto front -> finalize -> run folder.

Every stage writes what the next one reads, so the report can be rebuilt from the run folder and the storage alone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import logging
import platform
import shlex
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import torch
from optuna.trial import TrialState

from hwprune import __version__, train
from hwprune.config import SearchConfig, prepare_run_dir
from hwprune.errors import BudgetUnreachable, HwpruneError
from hwprune.backends import create_backend
from hwprune.backends.base import Measurement
from hwprune.profiles import DeviceProfile, default_budgets, load_profile
from hwprune.pruning import PruningSpace, architecture_signature, count_macs_params, prune, read_widths
from hwprune.pruning.importance import auto_importance, resolve_importance
from hwprune.study import pareto as pareto_mod
from hwprune.study.progress import SearchProgress
from hwprune.study.refine import EdgeRefiner
from hwprune.study.reference import ROUNDS, START_SETS, DenseReference, Rounds, interleaved_rounds
from hwprune.study.objective import (NEAR_MISS, Budgets, TrialRunner, bracket_budget, latency_ratio, make_sampler,
                                     open_study, trials_table, warm_start)
from hwprune.recovery import RecoveryPlan, agreement
from hwprune.study.accuracy import (UNDER_GUARD, DenseScore, accuracy_floor, best_within_budgets, guard_record,
                                    guard_refused, retention, score_dense, unreachable_message)
from hwprune.study.identity import Fingerprint, check_identity, fingerprint, load_existing
from hwprune.subjects.base import Subject
from hwprune.subjects.data import load_data_file
from hwprune.subjects.loader import attach_data, load_subject

log = logging.getLogger("hwprune")
SCHEMA = 1
OVER_BUDGET = "over budget when re-measured"  # a rejected_on_remeasure reason
# when front models go over a budget on re-measure, the trials behind them get up to this many times the first
# front's size in extra confirmations (each a rebuild and a few interleaved measurements)
REFILL_CONFIRMATIONS = 2


@dataclass
class ParetoModel:
    """One model of the Pareto front, as exported into the run folder."""

    trial: int | None
    record: dict[str, Any]  # the MODEL record of summary.json
    run_dir: Path
    module: torch.nn.Module | None = None
    measurement: Measurement | None = None

    @property
    def onnx_path(self) -> Path:
        return self.run_dir / self.record["files"]["onnx"]["path"]

    @property
    def accuracy(self) -> float:
        return float(self.record["accuracy"])

    @property
    def latency_ms(self) -> float:
        return float(self.record["latency_ms"]["median"])

    @property
    def memory_mb(self) -> float:
        return float(self.record["memory_mb"]["total"])


@dataclass
class SearchResult:
    """What :func:`hwprune.search` returns: the Pareto front as a DataFrame and the recommended model."""

    run_dir: Path
    summary: dict[str, Any]
    pareto: pd.DataFrame
    models: list[ParetoModel] = field(default_factory=list)
    dense: ParetoModel | None = None
    study: optuna.Study | None = None

    @property
    def recommended(self) -> ParetoModel | None:
        rec = self.summary.get("recommended")
        return next((m for m in self.models if m.trial == rec), None)


# module name -> distributions that install it (the first one installed is reported)
_DISTRIBUTIONS = {"torch": ("torch",), "onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "optuna": ("optuna",),
                  "torch_pruning": ("torch-pruning",), "onnx": ("onnx",), "tvm": ("apache-tvm", "tlcpack", "tvm")}


def versions() -> dict[str, str | None]:
    """Versions of the packages a run depends on, read from their installed metadata.

    Not ``__import__(mod).__version__``: importing TVM takes seconds (it imports torch on the way) and an ONNX
    Runtime search never needs it.
    """
    out: dict[str, str | None] = {"hwprune": __version__, "python": platform.python_version()}
    for mod, dists in _DISTRIBUTIONS.items():
        out[mod] = None
        for dist in dists:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                out[mod] = importlib.metadata.version(dist)
                break
    return out


def resolve_profile(config: SearchConfig) -> DeviceProfile:
    profile = load_profile(config.device)
    if config.profile_overrides:
        profile = profile.with_overrides(**config.profile_overrides)
    if config.channel_multiple:
        profile = profile.with_overrides(channel_multiple=config.channel_multiple)
    return profile


def measurement_context(profile: DeviceProfile, exporter: str) -> str:
    """A short hash of what a latency depends on besides the architecture: the device and how it is measured (backend,
    hardware, runtime settings, board key or host), the runtime versions and the exporter. Cached measurements are
    reused only under the same context, so a resumed or nightly search after an upgrade measures again."""
    import hashlib

    p = profile.to_dict()
    key = {k: p[k] for k in ("backend", "hardware", "ort", "tvm", "measure")}
    key["rpc_key"], key["ssh_host"] = p["rpc"].get("key"), p["ssh"].get("host")
    key["tvm"] = {k: v for k, v in key["tvm"].items() if k != "tuning_db"}
    v = versions()
    key["versions"] = {m: v.get(m) for m in ("onnxruntime", "tvm", "onnx", "torch")}
    key["exporter"] = exporter
    key["ratios"] = "alternating samples"  # how ratios to the dense model are taken (whole measurements before)
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def check_rankable(profile: DeviceProfile, config: SearchConfig) -> None:
    """Refuse latencies that rank nothing a user would deploy, unless asked for explicitly."""
    if profile.backend == "estimate" and not config.allow_estimate:
        raise HwpruneError(f"profile {profile.name} uses estimated latency; pass --allow-estimate to search on "
                           "roofline estimates (they are labelled 'estimated' in every output)")
    if profile.backend in ("tvm", "tvm-rpc") and profile.tvm.tuning_trials == 0 and not config.allow_untuned:
        raise HwpruneError(
            f"profile {profile.name} measures with untuned TVM, which runs 20-50x slower than tuned kernels and ranks "
            "candidates wrongly; set tvm.tuning_trials in the profile (e.g. --tuning-trials 64) or pass "
            "--allow-untuned to search on untuned numbers anyway")


def _model_record(*, trial: int | None, accuracy: float, accuracy_proxy: float | None, m: Measurement,
                  params: int, macs: int, widths: dict[str, Any], ratios: dict[str, float] | None,
                  budgets: Budgets, dense: dict[str, Any] | None, example: torch.Tensor,
                  rounds: Rounds | None = None) -> dict[str, Any]:
    """The summary.json record of one model. ``rounds`` are its measurements beside the dense model (relative
    budgets): the speed-up is then the inverse of their median ratio, and the latency budget is judged on that median
    plus its standard error (:attr:`~hwprune.study.reference.Rounds.upper`)."""
    md = m.to_dict()
    ratio = rounds.ratio if rounds else None
    upper = rounds.upper if rounds else None
    lat = md["latency"]
    record: dict[str, Any] = {
        "trial": trial,
        "recommended": False,
        "accuracy": accuracy,
        "accuracy_proxy": accuracy_proxy,
        "final_finetune_steps": 0,  # set when the model was one of the final candidates
        "latency_ms": {"median": lat["median_ms"], "p90": lat["p90_ms"], "min": lat["min_ms"],
                       "mean": lat["mean_ms"], "std": lat["std_ms"], "cv": lat["cv"],
                       "robust_cv": lat["robust_cv"], "mad": lat["mad_ms"],
                       "cpu_median": lat["cpu_median_ms"], "repeats": lat["repeats"], "warmup": lat["warmup"],
                       "noisy": lat["noisy"], "remeasured": lat["remeasured"]},
        "memory_mb": {"weights": m.memory.weights_mb, "peak_activations": m.memory.peak_activations_mb,
                      "total": m.memory.total_mb, "process_peak": m.memory.process_peak_mb},
        "params": int(params),
        "macs": int(macs),
        "widths": {k: list(v) for k, v in widths.items()},
        "ratios": ratios,
        "latency_ratio": ratio,
        "meets": dict(zip(("latency", "memory"), budgets.meets(m.latency.median_ms, m.memory.total_mb, upper))),
        "estimated": m.estimated,
        "tuned": m.tuned,
        "backend": m.backend,
        "load_avg": list(m.load_avg) if m.load_avg else None,
        "files": {},
        "input": {"name": "input", "shape": list(example.shape), "dtype": str(example.dtype).replace("torch.", "")},
    }
    if rounds:
        record["latency_ratio_rounds"], record["latency_ratio_upper"] = rounds.ratios, upper
    if dense is not None:
        record["speedup"] = 1.0 / ratio if ratio else dense["latency_ms"]["median"] / m.latency.median_ms
        record["size_ratio"] = params / max(dense["params"], 1)
    else:
        record["speedup"], record["size_ratio"] = 1.0, 1.0
    return record


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
        if config.tune_final_trials and self.profile.backend not in ("tvm", "tvm-rpc"):
            raise HwpruneError(f"--tune-final tunes TVM kernels, but profile {self.profile.name} measures with "
                               f"{self.profile.backend}; add --backend tvm or --backend tvm-rpc")
        self.run_dir = config.run_dir
        prepare_run_dir(self.run_dir)  # a folder that cannot be written is an error now, not after the dense model
        self.storage = config.storage or f"sqlite:///{(self.run_dir / 'study.db').resolve()}"
        self.exporter = config.exporter or ("dynamo" if self.profile.backend in ("tvm", "tvm-rpc") else "torchscript")
        self._subject = subject
        self.backend = None
        self.recovery: RecoveryPlan | None = None  # what pruned models recover with when the subject has no data
        self.fingerprint: Fingerprint | None = None  # what the study's trials depend on, set once the subject loads
        # models the backend measured in this run (dense sets, trials, front confirmation; a pair counts two)
        self.measurements = 0

    # -- stages ---------------------------------------------------------------------------------------------------
    def measure(self, onnx_path: Path) -> Measurement:
        assert self.backend is not None
        self.measurements += 1
        return self.backend.measure(onnx_path)

    def measure_pair(self, onnx_path: Path, reference: Path) -> tuple[Measurement, Measurement, list[float]]:
        """Both models timed in alternating samples (the backend's ``measure_beside``)."""
        assert self.backend is not None
        self.measurements += 2  # two models measured, as a round of two whole measurements counts
        return self.backend.measure_beside(onnx_path, reference)

    @property
    def pair_measure(self) -> Any:
        """:meth:`measure_pair` when the backend can time two models in alternating samples, else None."""
        return self.measure_pair if hasattr(self.backend, "measure_beside") else None

    def _fingerprint(self, subject: Subject) -> Fingerprint:
        """What this run's trials depend on (:mod:`hwprune.study.identity`)."""
        c = self.config
        has_data = any(x is not None for x in (subject.calibration_data, subject.train_data, subject.data))
        budgets = (f"latency {c.latency_budget_ms or 'none'}, memory {c.memory_budget_mb or 'none'}, "
                   f"accuracy drop {c.max_accuracy_drop or 'off'}")
        importance = auto_importance(subject.model) if c.importance == "auto" else c.importance
        return fingerprint(subject.model, subject.example_inputs, measurement_context(self.profile, self.exporter),
                           "data" if has_data else c.recovery, importance, budgets)

    def _write_request(self) -> dict[str, Any]:
        from hwprune.export import atomic_write_text

        c = self.config
        request = {
            "model": str(c.model) if isinstance(c.model, str) else getattr(c.model, "__name__", "model"),
            "device": self.profile.name,
            "profile": self.profile.to_dict(),
            "backend": self.profile.backend,
            "latency_budget": str(c.latency_budget_ms) if c.latency_budget_ms else None,
            "memory_budget": str(c.memory_budget_mb) if c.memory_budget_mb else None,
            "trials": c.trials, "timeout_s": c.timeout_s, "seed": c.seed,
            "study": c.study_name, "storage": self.storage,
            "sampler": c.sampler, "max_ratio": c.max_ratio, "depth": c.depth,
            "channel_multiple": self.profile.channel_multiple,
            "exporter": self.exporter,
            "finetune": {"trial_steps": c.trial_finetune_steps, "final_steps": c.final_finetune_steps,
                         "final_candidates": c.final_candidates},
            "calibration_batches": c.calibration_batches,
            "max_accuracy_drop": str(c.max_accuracy_drop) if c.max_accuracy_drop else "off",
            "recovery": c.recovery,
            "data": str(c.data) if c.data else None,
            "fingerprint": self.fingerprint.to_dict(),
            "tune_final_trials": c.tune_final_trials,
            "command": c.command or " ".join(shlex.quote(a) for a in sys.argv),
            "versions": versions(),
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_text(self.run_dir / "request.json", json.dumps(request, indent=2))
        return request

    def _dense(self, subject: Subject) -> tuple[dict[str, Any], DenseReference, DenseScore]:
        from hwprune.export import export_onnx

        path = export_onnx(subject.model, subject.example_inputs, self.run_dir / "dense" / "model.onnx",
                           exporter=self.exporter)
        reference = DenseReference(path, self.measure)
        reference.start()
        scored = score_dense(subject, self.config, self.log)
        macs, params = count_macs_params(subject.model, subject.example_inputs)
        widths = read_widths(subject.model)
        return {"path": path, "accuracy": scored.accuracy, "macs": macs, "params": params,
                "signature": architecture_signature(widths),
                "widths": {k: (v, v) for k, v in widths.items()}}, reference, scored

    def run(self) -> SearchResult:
        c = self.config
        t_start = time.perf_counter()
        self.log(f"device {self.profile.name}: backend {self.profile.backend}, channel multiple "
                 f"{self.profile.channel_multiple}")
        # the search seed drives sampling and fine-tuning only: the demo subject is the same model for every seed
        subject = self._subject or load_subject(c.model, log=self.log)
        if c.data is not None:
            attach_data(subject, load_data_file(c.data))
        self.fingerprint = self._fingerprint(subject)
        existing = load_existing(self.storage, c.study_name)
        if existing is not None:  # before anything is written into a run folder that may be another model's
            check_identity(existing, self.fingerprint, resume_changed=c.resume_changed, storage=self.storage,
                           log=self.log)
        request = self._write_request()
        self.backend = create_backend(self.profile)
        try:
            return self._run(subject, request, t_start)
        finally:
            self.backend.close()

    def _run(self, subject: Subject, request: dict[str, Any], t_start: float) -> SearchResult:
        c = self.config
        torch.manual_seed(c.seed)
        torch.set_num_threads(train.training_threads())
        dense_info, reference, scored = self._dense(subject)
        subject, self.recovery = scored.subject, scored.recovery
        dense_m = reference.measurement
        budgets = Budgets(
            latency_ms=c.latency_budget_ms.resolve(dense_m.latency.median_ms) if c.latency_budget_ms else None,
            memory_mb=c.memory_budget_mb.resolve(dense_m.memory.total_mb) if c.memory_budget_mb else None,
            latency_factor=c.latency_budget_ms.value if c.latency_budget_ms and c.latency_budget_ms.relative else None,
            accuracy_floor=accuracy_floor(c.max_accuracy_drop, dense_info["accuracy"]),
            # a final fine-tune recovers what the per-trial proxy lacks: then the guard judges the finalists after it
            guard_trials=not (c.final_finetune_steps and subject.train_data is not None),
        )
        request["latency_budget_ms"] = budgets.latency_ms
        request["memory_budget_mb"] = budgets.memory_mb
        request["accuracy_floor"] = budgets.accuracy_floor
        guard = ("off" if budgets.accuracy_floor is None else
                 f"{subject.metric} >= {budgets.accuracy_floor:.4f} (at most {c.max_accuracy_drop} below dense)")
        self.log(f"dense {subject.name}: {subject.metric} {dense_info['accuracy']:.4f}, latency "
                 f"{dense_m.latency.median_ms:.3f} ms (p90 {dense_m.latency.p90_ms:.3f}), memory "
                 f"{dense_m.memory.total_mb:.2f} MB; budgets: latency "
                 f"{_fmt(budgets.latency_ms, 'ms')}, memory {_fmt(budgets.memory_mb, 'MB')}; accuracy guard {guard}")

        # taylor ranks by the task loss on inputs: recovery batches hold the dense outputs as targets, whose
        # distillation loss has no gradient at the dense model, so it gets their inputs alone (pseudo-labels)
        ranking_data = ([x for x, _ in self.recovery.batches] if self.recovery is not None and self.recovery.active
                        else subject.calibration_data)
        importance = resolve_importance(self.fingerprint.importance, subject.model, ranking_data,
                                        None if self.recovery is not None else subject.loss_fn)
        request["importance"] = self.fingerprint.importance
        space = PruningSpace.build(subject.model, subject.example_inputs,
                                   channel_multiple=self.profile.channel_multiple, max_ratio=c.max_ratio,
                                   ignored_layers=list(subject.ignored_layers), depth=c.depth, importance=importance)
        if not space.knobs:
            raise HwpruneError(f"{subject.name}: found no prunable channel groups (nothing but the output layer?)")
        sampler = make_sampler(c.sampler, c.seed, len(space.knobs))
        request["sampler_repr"] = f"{type(sampler).__name__}"
        study = open_study(self.storage, c.study_name, sampler)
        check_identity(study, self.fingerprint, resume_changed=c.resume_changed, storage=self.storage, log=self.log)
        if study.metric_names is None:  # named objectives for optuna-dashboard and trials_dataframe()
            with warnings.catch_warnings():  # "experimental" since Optuna 3.2, and stable in use
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([subject.metric, "latency_ms", "memory_mb"])
        study.set_user_attr("request", request)
        warm_start(study, space)
        runner = TrialRunner(subject=subject, space=space, measure=self.measure, budgets=budgets,
                             exporter=self.exporter, calibration_batches=c.calibration_batches,
                             finetune_steps=c.trial_finetune_steps, seed=c.seed,
                             context=measurement_context(self.profile, self.exporter),
                             beside=dense_info["path"] if budgets.latency_factor else None,
                             measure_pair=self.pair_measure)
        runner.load_cache(study)
        runner.add_dense(dense_info["signature"],
                         [dense_info["accuracy"], dense_m.latency.median_ms, dense_m.memory.total_mb],
                         {"widths": {k: list(v) for k, v in dense_info["widths"].items()}, "macs": dense_info["macs"],
                          "params": dense_info["params"], "signature": dense_info["signature"],
                          "measurement": dense_m.to_dict(), "accuracy_proxy": dense_info["accuracy"],
                          **({"latency_ratio": 1.0} if budgets.latency_factor else {})})

        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        remaining = None if c.trials is None else max(0, c.trials - done)
        blocks = len(space.blocks)
        self.log(f"{len(space.knobs)} knobs ({len(space.knobs) - blocks} coupled channel groups, {blocks} removable "
                 f"residual blocks); study {c.study_name!r} has {done} complete "
                 f"trials; running {remaining if remaining is not None else 'until timeout'} more")
        interrupted = False
        if remaining != 0:
            progress = SearchProgress(total=remaining, enabled=c.progress, budgets=budgets, log=self.log)
            completed = [0]

            def follow_reference(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
                if trial.state != TrialState.COMPLETE:
                    return
                completed[0] += 1
                if reference.after_trial(completed[0]) and c.latency_budget_ms and c.latency_budget_ms.relative:
                    # the runner holds this same Budgets object: later trials are constrained by the new value
                    budgets.latency_ms = c.latency_budget_ms.resolve(reference.measurement.latency.median_ms)

            def measure_again(ratios: dict[str, float]) -> dict[str, float]:
                return self._measure_again(ratios, subject, space, runner)

            def aim_at_budget(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
                if trial.state == TrialState.COMPLETE and "uniform_ratio" in trial.user_attrs:
                    probed = study.user_attrs.get("depth_probed") is not None
                    ratios = bracket_budget(study, space, reference.measurement.latency.median_ms, budgets,
                                            confirm=measure_again)
                    if ratios:
                        self.log(f"uniform ratio {ratios[0]:.3f} queued: bisecting for the least uniform pruning "
                                 "that meets the latency budget")
                    elif not probed and study.user_attrs.get("depth_probed"):
                        self.log("probing depth: a uniform model over the budget (the least pruned one, or the "
                                 "most pruned when none meets it), with one of "
                                 f"{', '.join(study.user_attrs['depth_probed'])} removed")

            callbacks: list[Any] = [follow_reference, progress.callback, aim_at_budget,
                                    EdgeRefiner(space, c.trials, c.timeout_s, c.seed,
                                                macs_of=lambda r: prune(subject.model, subject.example_inputs, r,
                                                                        space).macs,
                                                budgets=budgets, log=self.log,
                                                confirm=measure_again)]
            if c.trials is not None:
                callbacks.append(optuna.study.MaxTrialsCallback(c.trials, states=(TrialState.COMPLETE,)))
            try:
                with progress:
                    study.optimize(runner, n_trials=remaining, timeout=c.timeout_s, callbacks=callbacks,
                                   catch=(HwpruneError,), gc_after_trial=False, show_progress_bar=False)
            except KeyboardInterrupt:
                # Optuna has already marked the trial in flight as failed; completed trials are in the storage
                interrupted = True
                self.log("interrupted: completed trials are saved; the final phase (confirming the front, final "
                         "fine-tunes, report) is skipped: run the same command again to resume and finish it")

        dense_m = reference.measurement
        if c.latency_budget_ms:
            budgets.latency_ms = c.latency_budget_ms.resolve(dense_m.latency.median_ms)
            request["latency_budget_ms"] = budgets.latency_ms
        if len(reference.sets) > START_SETS:
            self.log(f"dense latency over {len(reference.sets)} sets spread over the search: "
                     f"{dense_m.latency.median_ms:.3f} ms (sets {min(reference.medians_ms):.3f}-"
                     f"{max(reference.medians_ms):.3f}); latency budget {_fmt(budgets.latency_ms, 'ms')}")
        request["dense_latency_sets_ms"] = reference.medians_ms
        result = self.finalize(study, subject, space, runner, dense_info, dense_m, budgets, request, t_start,
                               interrupted)
        if interrupted:
            raise KeyboardInterrupt
        return result

    # -- finalize -------------------------------------------------------------------------------------------------
    def finalize(self, study: optuna.Study, subject: Subject, space: PruningSpace, runner: TrialRunner,
                 dense_info: dict[str, Any], dense_m: Measurement, budgets: Budgets, request: dict[str, Any],
                 t_start: float, interrupted: bool = False) -> SearchResult:
        from hwprune.export import atomic_write_text, file_record

        rows = trials_table(study)
        trials_df = pd.DataFrame(rows)
        if not trials_df.empty:
            # feasibility against this run's budgets: a resumed or nightly run may have other ones (a relative
            # budget follows the dense model's latency of the night) than the run that stored a trial's constraints
            trials_df["feasible"] = [
                state == "COMPLETE" and budgets.feasible(lat, mem, None if pd.isna(ratio) else ratio, acc)
                for state, lat, mem, ratio, acc in zip(trials_df["state"], trials_df["latency_ms"],
                                                       trials_df["memory_mb"], trials_df["latency_ratio"],
                                                       trials_df["accuracy"])]
        atomic_write_text(self.run_dir / "trials.csv", trials_df.to_csv(index=False))
        complete = trials_df[trials_df["state"] == "COMPLETE"] if not trials_df.empty else trials_df
        # latency is ranked as the budget judges it: under a relative budget, by the ratio to the dense model
        # measured beside each trial (a trial measured in a slow spell is not slower for it)
        ranked = complete
        if not complete.empty:
            ranked = complete.assign(latency_ms=[
                budgets.judged_ms(lat, None if pd.isna(ratio) else ratio)
                for lat, ratio in zip(complete["latency_ms"], complete["latency_ratio"])])

        dense_record = _model_record(trial=None, accuracy=dense_info["accuracy"], accuracy_proxy=dense_info["accuracy"],
                                     m=dense_m, params=dense_info["params"], macs=dense_info["macs"],
                                     widths=dense_info["widths"], ratios=None, budgets=budgets, dense=None,
                                     example=subject.example_inputs[0])
        dense_record["files"]["onnx"] = file_record(dense_info["path"], self.run_dir)
        dense_model = ParetoModel(None, dense_record, self.run_dir, subject.model)
        models: list[ParetoModel] = []
        rejected: list[dict[str, Any]] = []
        under: list[dict[str, Any]] = []
        rec_trial = None
        if not interrupted:  # after Ctrl-C the final phase is left to the next run, which resumes the study
            self._node_profile(dense_info["path"], dense_record)
            study.set_user_attr("dense", {k: v for k, v in dense_record.items() if k != "files"})
            # per-trial stage times must stay per trial: the front's rebuilds are booked as one stage of their own
            trial_stages = dict(runner.stage_seconds)
            t_confirm = time.perf_counter()
            models, rejected = self._confirm_front(ranked, study, subject, runner, budgets, dense_record)
            runner.stage_seconds = {**trial_stages, "confirm_front": time.perf_counter() - t_confirm}
            over = {r["trial"] for r in rejected if r["reason"] == OVER_BUDGET}
            models, dropped = self._final_candidates(models, ranked, over, study, subject, runner, dense_record)
            # a trial the front's confirmation left out as dominated may come back as a final candidate
            listed = {pm.trial for pm in models}
            rejected = [r for r in rejected if r["trial"] not in listed] + dropped
            models, under = self._guard(models, budgets, dense_info["accuracy"], subject.metric)
            rejected += under
            rec_trial = self._recommend(models, budgets)
            for pm in models:
                self._write_model_files(pm)
                self._agreement(pm)
        dense_record["file_bytes"] = dense_record["files"]["onnx"]["bytes"]

        failed = trials_df[trials_df["state"] == "FAIL"] if not trials_df.empty else trials_df
        best_infeasible = None
        if not models and not complete.empty:
            best_infeasible = {"latency_ms": float(complete["latency_ms"].min()),
                               "memory_mb": float(complete["memory_mb"].min())}
        best = best_within_budgets(ranked, budgets, under)
        rec_record = next((pm.record for pm in models if pm.trial == rec_trial), None)
        hv = pareto_mod.hypervolume_history(
            ranked, (dense_info["accuracy"], dense_m.latency.median_ms, dense_m.memory.total_mb)
        ) if not complete.empty else []
        summary = {
            "schema": SCHEMA,
            "hwprune_version": __version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "request": request,
            "metric": subject.metric,
            "accuracy_guard": guard_record(self.config.max_accuracy_drop, budgets, dense_info["accuracy"], rec_record,
                                           best, under),
            "recovery": self._recovery_record(rec_record),
            "dense": dense_record,
            "pareto": [m.record for m in models],
            "recommended": rec_trial,
            "measurement": {"backend": dense_m.backend, "threads": dense_m.threads,
                            "warmup": self.profile.measure.warmup, "repeats": self.profile.measure.repeats,
                            "max_cv": self.profile.measure.max_cv, "estimated": dense_m.estimated,
                            "tuned": dense_m.tuned},
            "search": {
                "trials_complete": int(len(complete)),
                "trials_failed": int(len(failed)),
                "trials_pruned": int((trials_df["state"] == "PRUNED").sum()) if not trials_df.empty else 0,
                "trials_cached": int(complete["cached_from"].notna().sum()) if not complete.empty else 0,
                "measurements": self.measurements,
                "trials_feasible": int(complete["feasible"].sum()) if not complete.empty else 0,
                "failures": [{"trial": int(r["trial"]), "reason": r["fail_reason"] or "unknown"}
                             for _, r in failed.iterrows()],
                "stage_seconds": {k: round(v, 3) for k, v in runner.stage_seconds.items()},
                "wall_seconds": round(time.perf_counter() - t_start, 2),
                "hypervolume": hv,
                "best_infeasible": best_infeasible,
                "rejected_on_remeasure": rejected,
                "interrupted": interrupted,
                "knobs": len(space.knobs),
                "blocks": space.blocks,
            },
        }
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
        pareto_df = pareto_table(summary)
        atomic_write_text(self.run_dir / "pareto.csv", pareto_df.to_csv(index=False))
        if not interrupted:
            self._report()
        result = SearchResult(self.run_dir, summary, pareto_df, models, dense_model, study)
        if not models and not interrupted:
            if best_infeasible is None:
                raise BudgetUnreachable("no trial completed; see the failures in "
                                        f"{self.run_dir / 'trials.csv'}")
            over = [r for r in rejected if r["reason"] == OVER_BUDGET]
            if guard_refused(budgets, best, under):
                raise BudgetUnreachable(unreachable_message(
                    self.config.max_accuracy_drop, budgets, dense_info["accuracy"], subject.metric, best,
                    self.recovery is None or self.recovery.method == "data", self.storage))
            if over:
                raise BudgetUnreachable(_none_held(over, budgets, self.storage))
            raise BudgetUnreachable(
                f"no candidate met the budgets (latency {_fmt(budgets.latency_ms, 'ms')}, memory "
                f"{_fmt(budgets.memory_mb, 'MB')}); the best reached were {best_infeasible['latency_ms']:.3f} ms and "
                f"{best_infeasible['memory_mb']:.2f} MB. Relax a budget, raise --max-ratio, or run more --trials; "
                f"completed trials are kept in {self.storage}")
        return result

    def _confirm_front(self, ranked: pd.DataFrame, study: optuna.Study, subject: Subject, runner: TrialRunner,
                       budgets: Budgets, dense_record: dict[str, Any]) -> tuple[list[ParetoModel], list[dict]]:
        """Confirm every front model of ``ranked`` (:meth:`_confirm_trial`); keep those that still meet the budgets
        and are still non-dominated on the confirmed numbers.

        A front model that goes over a budget when re-measured may have hidden feasible trials behind it, so the
        front of the trials left is confirmed in turn, up to ``REFILL_CONFIRMATIONS`` x the first front's size in
        extra confirmations. Seen on a noisy host: a 0.4x search's three-model front went over on re-measure while
        trials at 0.30x sat behind it, and the run recommended nothing.
        """
        by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
        candidates: list[ParetoModel] = []
        rejected: list[dict[str, Any]] = []
        over: set[int] = set()
        done: set[int] = set()
        front = pareto_mod.pareto_front(ranked) if not ranked.empty else ranked
        cap = len(front) * (1 + REFILL_CONFIRMATIONS)
        while True:
            todo = [int(n) for n in front["trial"] if int(n) not in done][: max(cap - len(done), 0)]
            if not todo:
                break
            for number in todo:
                done.add(number)
                confirmed = self._confirm_trial(by_number[number], subject, runner, budgets, dense_record)
                if isinstance(confirmed, ParetoModel):
                    candidates.append(confirmed)
                else:
                    rejected.append(confirmed)
                    over.add(number)
            if not over & set(todo):
                break
            front = pareto_mod.pareto_front(ranked[~ranked["trial"].isin(over)])
            if any(int(n) not in done for n in front["trial"]):
                self.log(f"{len(over)} front model(s) over a budget when re-measured: confirming the trials "
                         "behind them")
        if not candidates:
            return [], rejected
        models, dominated = self._drop_dominated(candidates, budgets, "dominated when re-measured",
                                                 "dominated once re-measured and re-evaluated")
        models.sort(key=lambda pm: (_judged_ms(pm, budgets), -pm.accuracy))
        return models, rejected + dominated

    def _confirm_trial(self, t: optuna.trial.FrozenTrial, subject: Subject, runner: TrialRunner, budgets: Budgets,
                       dense_record: dict[str, Any]) -> ParetoModel | dict[str, Any]:
        """Rebuild, export, re-measure and re-evaluate one trial's model: the model, or a ``rejected_on_remeasure``
        entry when it no longer meets the budgets.

        The rebuild replays the trial's seeded calibration and fine-tune, so the exported weights are the ones the
        trial evaluated; the accuracy reported is measured again on them anyway. A re-measure that disagrees with
        the trial about a budget is settled by a third measurement (the median of three), so one preempted run on
        a shared host neither admits nor rejects a model.
        """
        from hwprune.export import export_onnx

        number = t.number
        ratios = {k: float(v) for k, v in t.params.items()}
        pruned = runner.build(ratios)
        acc_proxy = float(t.user_attrs.get("accuracy_proxy", t.values[0]))
        accuracy = runner.evaluate(pruned.module, {})
        folder = self.run_dir / "models" / f"trial-{number:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        onnx_path = export_onnx(pruned.module, subject.example_inputs, folder / "model.onnx", exporter=self.exporter)
        m, rounds, note = self._confirm_latency(Measurement.from_dict(t.user_attrs["measurement"]), latency_ratio(t),
                                                onnx_path, budgets, runner.beside)
        record = _model_record(trial=number, accuracy=accuracy, accuracy_proxy=acc_proxy, m=m, params=pruned.params,
                               macs=pruned.macs, widths=pruned.widths, ratios=ratios, budgets=budgets,
                               dense=dense_record, example=subject.example_inputs[0], rounds=rounds)
        record["removed_blocks"] = list(pruned.removed)
        if note:
            record["remeasure_note"] = note
        if not (record["meets"]["latency"] and record["meets"]["memory"]):
            beside = (f" ({record['latency_ratio']:.3f}x the dense model beside it, "
                      f"{record['latency_ratio_upper']:.3f}x with its standard error)") if rounds else ""
            self.log(f"trial {number} left out: re-measured at {m.latency.median_ms:.3f} ms{beside} / "
                     f"{m.memory.total_mb:.2f} MB, over a budget it met during the search")
            shutil.rmtree(folder, ignore_errors=True)
            entry = {"trial": number, "latency_ms": m.latency.median_ms, "memory_mb": m.memory.total_mb,
                     "reason": OVER_BUDGET}
            if rounds:
                entry.update(latency_ratio=record["latency_ratio"], latency_ratio_upper=record["latency_ratio_upper"])
            return entry
        record["files"] = {"onnx": {"path": onnx_path.relative_to(self.run_dir).as_posix()}}
        return ParetoModel(number, record, self.run_dir, pruned.module, m)

    def _drop_dominated(self, models: list[ParetoModel], budgets: Budgets, reason: str, why: str,
                        accuracies: tuple[str, ...] = ("accuracy",)) -> tuple[list[ParetoModel], list[dict[str, Any]]]:
        """Models no other of ``models`` dominates (with the front's tie tolerance, on each of ``accuracies``:
        ``accuracy`` and/or ``accuracy_proxy``), and a ``rejected_on_remeasure`` entry for each one left out, whose
        exported files are removed."""
        keep = pareto_mod.pareto_mask(_objectives(models, budgets), pareto_mod.TIE_TOLERANCE, accuracies)
        kept_models, rejected = [], []
        for pm, kept in zip(models, keep, strict=True):
            if kept:
                kept_models.append(pm)
                continue
            self.log(f"trial {pm.trial} left out: {why}")
            rejected.append({"trial": pm.trial, "latency_ms": pm.latency_ms, "memory_mb": pm.memory_mb,
                             "reason": reason})
            shutil.rmtree(self.run_dir / "models" / f"trial-{pm.trial:04d}", ignore_errors=True)
        return kept_models, rejected

    def _measure_again(self, ratios: dict[str, float], subject: Subject, space: PruningSpace,
                       runner: TrialRunner) -> dict[str, float]:
        """The latency of the model pruned to ``ratios``, measured again: interleaved with the dense model under a
        relative budget (``latency_ratio`` is then the median ratio), else the median of ``ROUNDS`` measurements.
        Latency does not depend on the weights, so the model is neither calibrated nor fine-tuned."""
        import tempfile

        from hwprune.export import export_onnx

        t0 = time.perf_counter()
        pruned = prune(subject.model, subject.example_inputs, ratios, space)
        pruned.module.eval()
        with tempfile.TemporaryDirectory(prefix="hwprune-") as tmp:
            path = export_onnx(pruned.module, subject.example_inputs, Path(tmp) / "incumbent.onnx",
                               exporter=self.exporter)
            if runner.beside is not None:
                rounds = interleaved_rounds(self.measure, path, runner.beside, runner.budgets.latency_factor,
                                            self.pair_measure)
                again = {"latency_ms": rounds.middle.latency.median_ms, "latency_ratio": rounds.ratio}
            else:
                again = {"latency_ms": statistics.median(self.measure(path).latency.median_ms
                                                         for _ in range(ROUNDS))}
        runner.book("measure_incumbent", time.perf_counter() - t0)
        return again

    def _confirm_latency(self, trial_m: Measurement, trial_ratio: float | None, onnx_path: Path, budgets: Budgets,
                         beside: Path | None) -> tuple[Measurement, Rounds | None, str | None]:
        """The measurement to report for an exported front model, its rounds beside the dense model (with ``beside``,
        the dense model's ONNX, under a relative budget; they are judged), and a note when the figures are not fresh
        ones.

        Under a relative budget the model and the dense model are measured in interleaved rounds
        (:func:`~hwprune.study.reference.interleaved_rounds`): the most accurate trials at the budget's edge are also
        the ones whose single measurement came out lucky, so one more single measurement is not enough.
        """
        def meets(m: Measurement) -> bool:
            return budgets.meets(m.latency.median_ms, m.memory.total_mb)[0]

        try:
            if beside is not None:
                rounds = interleaved_rounds(self.measure, onnx_path, beside, budgets.latency_factor, self.pair_measure)
                return rounds.middle, rounds, None
            fresh = self.measure(onnx_path)
            if meets(fresh) == meets(trial_m):
                return fresh, None, None
            third = self.measure(onnx_path)
        except HwpruneError as exc:  # a board that vanished must not cost the search its answer
            self.log(f"re-measuring {onnx_path.parent.name} failed ({exc}); reporting its trial measurement")
            return trial_m, Rounds([trial_m], [trial_ratio]) if trial_ratio is not None else None, (
                f"re-measuring the exported file failed ({exc}); the figures are the trial's measurement of the "
                "same architecture")
        trio = sorted([trial_m, fresh, third], key=lambda m: m.latency.median_ms)
        return trio[1], None, ("the trial and the first re-measure disagreed about the latency budget; the figures "
                               "are the median of three measurements")

    def _final_candidates(self, models: list[ParetoModel], ranked: pd.DataFrame, left_out: set[int],
                          study: optuna.Study, subject: Subject, runner: TrialRunner,
                          dense_record: dict[str, Any]) -> tuple[list[ParetoModel], list[dict[str, Any]]]:
        """Give the ``final_candidates`` most accurate feasible models (by the search's proxy) the final fine-tune,
        and return the front with those that are not dominated afterwards, and the models left out.

        A 20-step proxy cannot rank models whose accuracies differ by a point, and the final fine-tune is what the
        user deploys. The candidates are drawn from every feasible trial, not only from the front: the
        recommendation is the most accurate model within the budgets, however fast, and on the front a model a hair
        more accurate by the proxy and a hair faster hides the ones beside it, which after the fine-tune may be
        the more accurate (bench/README.md). Trials measured just over the latency budget (``NEAR_MISS``) are
        candidates too. A candidate not yet confirmed is confirmed like a front model first, and only a confirmed
        one is fine-tuned; ``left_out`` are trials whose confirmation put them over a budget already.

        The most accurate uniform model within the budgets (the bisection's, see
        :func:`~hwprune.study.objective.bracket_budget`) is always a finalist, one more when the proxy did not rank
        it among the first: it is the baseline a user would otherwise deploy, so the recommendation is never a model
        the same fine-tune leaves less accurate than it."""
        c = self.config
        if not (c.final_finetune_steps and subject.train_data is not None and not ranked.empty):
            return models, []
        confirmed = {pm.trial: pm for pm in models if pm.module is not None}
        if not confirmed:
            return models, []
        by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
        near = _near_miss(ranked, runner.budgets)
        pool = (ranked[ranked["feasible"] | near].sort_values("trial").drop_duplicates("signature", keep="first")
                .sort_values(["accuracy", "latency_ms"], ascending=[False, True]))
        near_numbers = set(ranked.loc[near, "trial"].astype(int))  # over the budget, so none is feasible
        want = max(1, c.final_candidates)
        finalists: list[ParetoModel] = []
        rejected: list[dict[str, Any]] = []
        tries = 0

        def take(number: int) -> bool:
            """Add trial ``number`` to the finalists if it holds within the budgets (confirming it if need be)."""
            nonlocal tries
            if number in confirmed:
                finalists.append(confirmed[number])
                return True
            if number in left_out:
                return False
            tries += 1
            t0 = time.perf_counter()
            found = self._confirm_trial(by_number[number], subject, runner, runner.budgets, dense_record)
            runner.book("confirm_front", time.perf_counter() - t0)
            if not isinstance(found, ParetoModel):
                rejected.append(found)
                return False
            where = ("measured just over the latency budget in its trial, within it on re-measure"
                     if number in near_numbers else "off the front")
            self.log(f"trial {number} joins the final candidates ({where}, {subject.metric} "
                     f"{found.record['accuracy_proxy']:.4f} by the proxy)")
            finalists.append(found)
            return True

        for number in (int(n) for n in pool["trial"]):
            if len(finalists) == want or tries >= 2 * want:
                break
            take(number)
        uniform = [int(n) for n, u in zip(pool["trial"], pool["uniform_ratio"]) if pd.notna(u)]
        if finalists and not any(pm.trial in uniform for pm in finalists):
            for number in uniform[:2]:
                if take(number):
                    self.log(f"trial {number}, the most accurate uniform model within the budgets, is a final "
                             "candidate too: the baseline the recommendation must beat")
                    break
        t0 = time.perf_counter()
        for i, pm in enumerate(finalists, 1):
            self.log(f"final fine-tune {i}/{len(finalists)}: trial {pm.trial} ({subject.metric} "
                     f"{pm.accuracy:.4f} before), {c.final_finetune_steps} steps distilled from the dense model...")
            self._final_finetune(pm, subject, runner)
        runner.stage_seconds["final_finetune"] = time.perf_counter() - t0
        if len(finalists) > 1:
            self.log("after the final fine-tune: " + ", ".join(f"trial {pm.trial} {pm.accuracy:.4f}"
                                                              for pm in finalists))
        kept, dominated = self._drop_dominated(finalists, runner.budgets, "dominated after the final fine-tune",
                                               "dominated by another final candidate after the final fine-tune")
        gone = {pm.trial for pm in finalists} - {pm.trial for pm in kept}
        front = [pm for pm in models if pm.trial not in gone] + [pm for pm in kept if pm.trial not in confirmed]
        # a finalist from off the front can dominate front models it never met; one more accurate after its final
        # fine-tune and by the proxy both (which every model got alike), and as fast and small, leaves no reason to
        # deploy them: a demo run at 0.4x listed a model with 6% fewer MACs that ran 6% slower than the recommended
        front, behind = self._drop_dominated(front, runner.budgets, "dominated by a final candidate",
                                             "dominated by a final candidate after the final fine-tune",
                                             accuracies=("accuracy", "accuracy_proxy"))
        front.sort(key=lambda pm: (_judged_ms(pm, runner.budgets), -pm.accuracy))
        return front, rejected + dominated + behind

    def _guard(self, models: list[ParetoModel], budgets: Budgets, dense_accuracy: float,
               metric: str) -> tuple[list[ParetoModel], list[dict[str, Any]]]:
        """The models that keep within the accuracy guard, and a ``rejected_on_remeasure`` entry for each other one
        (whose exported files are removed). Every model's record gets ``meets.accuracy`` and its retention."""
        kept, under = [], []
        for pm in models:
            pm.record["accuracy_retention"] = retention(pm.accuracy, dense_accuracy)
            pm.record["meets"]["accuracy"] = budgets.meets_accuracy(pm.accuracy)
            if pm.record["meets"]["accuracy"]:
                kept.append(pm)
                continue
            self.log(f"trial {pm.trial} left out: {metric} {pm.accuracy:.4f} is under the accuracy guard "
                     f"({budgets.accuracy_floor:.4f})")
            under.append({"trial": pm.trial, "latency_ms": pm.latency_ms, "memory_mb": pm.memory_mb,
                          "accuracy": pm.accuracy, "reason": UNDER_GUARD})
            shutil.rmtree(self.run_dir / "models" / f"trial-{pm.trial:04d}", ignore_errors=True)
        return kept, under

    def _agreement(self, pm: ParetoModel) -> None:
        """The model's top-1 agreement with the dense model on recorded inputs recovery never saw, and on those it
        did (a gap between the two shows how much the recovery fitted its own inputs)."""
        plan = self.recovery
        if plan is None or pm.module is None:
            return
        pm.record["agreement"] = {"heldout": agreement(pm.module, plan.heldout),
                                  "recovery_inputs": agreement(pm.module, plan.batches)}

    def _recovery_record(self, recommended: dict[str, Any] | None) -> dict[str, Any]:
        """The ``recovery`` record of summary.json: what the search recovered pruned models with."""
        if self.recovery is None:
            return {"method": "data", "requested": self.config.recovery, "leak": False,
                    "note": "the subject's own calibration/training data"}
        return {**self.recovery.to_dict(),
                "agreement": (recommended or {}).get("agreement")}

    def _recommend(self, models: list[ParetoModel], budgets: Budgets) -> int | None:
        """The most accurate model that meets the budgets; among the final candidates when there were some (their
        accuracy, after the final fine-tune, is not comparable with the others' proxy)."""
        if not models:
            return None
        pool = [pm for pm in models if pm.record.get("final_finetune_steps")] or models
        number = pareto_mod.recommend(_objectives(pool, budgets))
        pm = next(p for p in models if p.trial == number)
        pm.record["recommended"] = True
        self.log(f"recommending trial {number}")
        if self.config.tune_final_trials:
            self._tune_final(pm, self.config.tune_final_trials)
        return number

    def _final_finetune(self, pm: ParetoModel, subject: Subject, runner: TrialRunner) -> None:
        """The long distilled fine-tune, seeded alike for every finalist; the exported file gets the new weights."""
        from hwprune.export import export_onnx

        assert subject.train_data is not None and pm.module is not None
        torch.manual_seed(self.config.seed)
        train.finetune(pm.module, subject.train_data, self.config.final_finetune_steps, loss_fn=subject.loss_fn,
                       lr=0.02, teacher=subject.teacher or subject.model)
        pm.record["accuracy"] = runner.evaluate(pm.module, {})
        pm.record["final_finetune_steps"] = self.config.final_finetune_steps
        # same architecture, new weights: the measured latency and memory still hold
        export_onnx(pm.module, subject.example_inputs, pm.onnx_path, exporter=self.exporter)

    def _tune_final(self, pm: ParetoModel, trials: int) -> None:
        """MetaSchedule-tune the recommended model on the device and record its tuned latency beside the search's
        (which stays the figure the front was ranked on). A failure is recorded, never fatal."""
        tuned_profile = self.profile.with_overrides(tvm__tuning_trials=trials)
        self.log(f"tuning the recommended model (trial {pm.trial}) with {trials} MetaSchedule trials on "
                 f"{self.profile.name}...")
        t0 = time.perf_counter()
        backend = None
        try:
            backend = create_backend(tuned_profile)
            m = backend.measure(pm.onnx_path)
        except HwpruneError as exc:
            self.log(f"tuning the recommended model failed: {exc}")
            pm.record["final_tuned"] = {"tuning_trials": trials, "error": str(exc)}
            return
        finally:
            if backend is not None:
                backend.close()
        pm.record["final_tuned"] = {
            "tuning_trials": trials, "tuned": m.tuned, "seconds": round(time.perf_counter() - t0, 2),
            "latency_ms": {"median": m.latency.median_ms, "p90": m.latency.p90_ms, "min": m.latency.min_ms},
            "tuning": m.extra.get("tuning"),
        }
        self.log(f"tuned: {m.latency.median_ms:.3f} ms (search measurement {pm.latency_ms:.3f} ms)")

    def _write_model_files(self, pm: ParetoModel) -> None:
        from hwprune.export import atomic_torch_save, atomic_write_text, file_record

        assert pm.module is not None and pm.trial is not None
        folder = self.run_dir / "models" / f"trial-{pm.trial:04d}"
        atomic_torch_save(pm.module.state_dict(), folder / "weights.pt")
        atomic_torch_save(pm.module, folder / "model.pt")
        assert pm.measurement is not None
        atomic_write_text(folder / "measurement.json", json.dumps(pm.measurement.to_dict(), indent=2))
        pm.record["files"] = {"onnx": file_record(folder / "model.onnx", self.run_dir),
                              "weights": file_record(folder / "weights.pt", self.run_dir),
                              "module": file_record(folder / "model.pt", self.run_dir)}
        self._node_profile(folder / "model.onnx", pm.record)
        pm.record["file_bytes"] = pm.record["files"]["onnx"]["bytes"]

    def _node_profile(self, onnx_path: Path, record: dict[str, Any]) -> None:
        """Per-node latency for the report (ONNX Runtime's profiler); skipped for backends it does not describe."""
        if self.profile.backend != "ort":
            return
        from hwprune.export import atomic_write_text, file_record
        from hwprune.backends.ort import node_profile

        try:
            prof = node_profile(onnx_path, self.profile, runs=10)
        except Exception as exc:  # noqa: BLE001 - a profile is a nicety; never lose a search over it
            self.log(f"per-node profile of {onnx_path.name} failed: {exc}")
            return
        path = onnx_path.parent / "node_latency.json"
        atomic_write_text(path, json.dumps(prof, indent=1))
        record["files"]["node_latency"] = file_record(path, self.run_dir)

    def _report(self) -> None:
        try:
            from hwprune.report import build_report
        except ImportError:
            return
        try:
            build_report(self.run_dir)
        except Exception as exc:  # noqa: BLE001 - the search result is already saved
            self.log(f"report failed ({type(exc).__name__}: {exc}); rebuild it with `hwprune report {self.run_dir}`")


def _none_held(over: list[dict[str, Any]], budgets: Budgets, storage: str) -> str:
    """The error for a search whose feasible trials all went over a budget when re-measured: which ones, by how much,
    and that the same command confirms them again (its trials are kept)."""
    def figure(r: dict[str, Any]) -> str:
        if r.get("latency_ratio_upper") is not None:
            return f"trial {r['trial']} at {r['latency_ratio_upper']:.3f}x"
        return f"trial {r['trial']} at {r['latency_ms']:.3f} ms, {r['memory_mb']:.2f} MB"

    limit = (f"{budgets.latency_factor:g}x the dense model measured beside it" if budgets.latency_factor
             else f"latency {_fmt(budgets.latency_ms, 'ms')}, memory {_fmt(budgets.memory_mb, 'MB')}")
    shown = ", ".join(figure(r) for r in over[:4]) + (", ..." if len(over) > 4 else "")
    return (f"{len(over)} trial(s) met the budgets during the search, but none held when re-measured ({shown}; "
            f"budget {limit}). On a shared host a slow spell can do this: run the same command again to re-confirm "
            f"them, or relax the budget; completed trials are kept in {storage}")


def _near_miss(ranked: pd.DataFrame, budgets: Budgets) -> pd.Series:
    """Rows of ``ranked`` (latency as the budget judges it) over the latency budget by at most ``NEAR_MISS`` of it
    and within the memory budget."""
    if budgets.latency_ms is None or ranked.empty:
        return pd.Series(False, index=ranked.index)
    memory_ok = [budgets.meets(0.0, mem)[1] for mem in ranked["memory_mb"]]
    latency = ranked["latency_ms"]
    over = (latency > budgets.latency_ms) & (latency <= budgets.latency_ms * (1 + NEAR_MISS))
    return over & pd.Series(memory_ok, index=ranked.index)


def _judged_ms(pm: ParetoModel, budgets: Budgets) -> float:
    """A confirmed model's latency as ``budgets`` judge it (:meth:`Budgets.judged_ms`)."""
    return budgets.judged_ms(pm.latency_ms, pm.record.get("latency_ratio"))


def _objectives(models: list[ParetoModel], budgets: Budgets) -> pd.DataFrame:
    """trial, accuracy, accuracy_proxy, latency_ms (as ``budgets`` judge it) and memory_mb of confirmed models, the
    columns the Pareto helpers read."""
    return pd.DataFrame({"trial": [pm.trial for pm in models], "accuracy": [pm.accuracy for pm in models],
                         "accuracy_proxy": [float(pm.record.get("accuracy_proxy", pm.accuracy)) for pm in models],
                         "latency_ms": [_judged_ms(pm, budgets) for pm in models],
                         "memory_mb": [pm.memory_mb for pm in models]})


def pareto_table(summary: dict[str, Any]) -> pd.DataFrame:
    """The ``pareto.csv`` table: one flat row per Pareto model (see docs/run-folder.md)."""
    rows = []
    for r in summary["pareto"]:
        rows.append({
            "trial": r["trial"], "recommended": r["recommended"], "accuracy": r["accuracy"],
            "accuracy_proxy": r["accuracy_proxy"], "final_finetune_steps": r.get("final_finetune_steps", 0),
            "latency_ms_median": r["latency_ms"]["median"],
            "latency_ms_p90": r["latency_ms"]["p90"], "latency_ms_std": r["latency_ms"]["std"],
            "latency_ratio": r.get("latency_ratio"),
            "latency_noisy": r["latency_ms"]["noisy"], "memory_mb_total": r["memory_mb"]["total"],
            "weights_mb": r["memory_mb"]["weights"], "peak_activations_mb": r["memory_mb"]["peak_activations"],
            "params": r["params"], "macs": r["macs"], "speedup": r["speedup"],
            "meets_latency": r["meets"]["latency"], "meets_memory": r["meets"]["memory"],
            "estimated": r["estimated"], "onnx_path": r["files"]["onnx"]["path"],
            "weights_path": r["files"]["weights"]["path"], "widths": json.dumps(r["widths"]),
        })
    columns = ["trial", "recommended", "accuracy", "accuracy_proxy", "final_finetune_steps", "latency_ms_median",
               "latency_ms_p90", "latency_ms_std", "latency_ratio", "latency_noisy", "memory_mb_total", "weights_mb",
               "peak_activations_mb", "params", "macs", "speedup", "meets_latency", "meets_memory", "estimated",
               "onnx_path", "weights_path", "widths"]
    return pd.DataFrame(rows, columns=columns)


def _fmt(value: float | None, unit: str) -> str:
    return "none" if value is None else f"{value:.3f} {unit}"


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
