"""MetaSchedule tuning against a persistent per-profile database (see the package docstring for why it is
shaped this way)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from hwprune.profiles import DeviceProfile
from hwprune.backends.tvm._util import _file_lock, _first_line, _tvm
from hwprune.backends.tvm.target import _fcompile, cross_compiler_path, make_target, target_kind, tuning_db_dir
from hwprune.backends.tvm.importer import _fuse_for_tasks


def cost_model_name() -> str:
    """``"xgb"`` when xgboost imports (MetaSchedule's learned cost model), else ``"random"``."""
    try:
        import xgboost  # noqa: F401

        return "xgb"
    except Exception:  # noqa: BLE001 - a broken xgboost install must not stop tuning
        return "random"


def _cost_model(name: str) -> Any:
    """MetaSchedule's cost model; the XGBoost one with early stopping suited to tens of samples per task."""
    from tvm.s_tir import meta_schedule as ms

    cores = max(1, (os.cpu_count() or 2) // 2)
    if name == "xgb":
        return ms.cost_model.XGBModel(num_tuning_cores=cores, early_stopping_rounds=10, verbose_eval=25,
                                      num_warmup_samples=32, tree_method="auto")
    return ms.cost_model.RandomModel()


def _in_process_builder(fcompile: Any) -> Any:
    """A MetaSchedule builder that compiles candidates in this process (see the module docstring for why)."""
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.ir.utils import derived_object

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs: list[Any]) -> list[Any]:
            from tvm.driver import build as tvm_build
            from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

            results = []
            for bi in build_inputs:
                folder = None
                try:
                    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(bi.mod)
                    rt_mod = tvm_build(mod, target=bi.target)
                    # MetaSchedule's default RemoveBuildArtifact callback deletes this folder once it is measured.
                    folder = tempfile.mkdtemp(prefix="hwprune-ms-")
                    path = os.path.join(folder, "candidate.so")
                    if fcompile is None:
                        rt_mod.export_library(path)
                    else:
                        rt_mod.export_library(path, fcompile=fcompile)
                    results.append(BuilderResult(path, None))
                except Exception as exc:  # noqa: BLE001 - a bad candidate is a failed sample, not a failed tuning
                    if folder is not None:
                        shutil.rmtree(folder, ignore_errors=True)
                    results.append(BuilderResult(None, f"hwprune in-process builder: {_first_line(exc)}"))
            return results

    return InProcessBuilder()


@dataclass
class TuningReport:
    """What one tuning call did: how many tasks the model has, how many the database already covered."""

    tasks: int = 0
    tasks_tuned: int = 0
    tasks_reused: int = 0
    trials: int = 0
    seconds: float = 0.0
    database: str = ""
    cost_model: str = ""
    untuned_tasks: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def tune_module(mod: Any, profile: DeviceProfile, *, trials: int | None = None,
                rpc: tuple[str, int, str] | None = None, session_timeout_s: float = 60.0) -> TuningReport:
    """Tune the tasks of ``mod`` that the profile's database has no record for, with ``trials`` in total.

    ``rpc = (tracker_host, tracker_port, key)`` measures candidates on the board through the tracker (the numbers must
    come from the device); otherwise on this machine. The database is locked while tuning, so workers sharing it take
    turns and each sees the others' records.
    """
    _tvm()
    from tvm.s_tir import meta_schedule as ms

    trials = profile.tvm.tuning_trials if trials is None else trials
    target = make_target(profile)
    # MetaSchedule logs every round at INFO on stdout; keep the console for hwprune (its files still get DEBUG).
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    if not os.environ.get("HWPRUNE_DEBUG"):
        ms_logger.setLevel(logging.WARNING)
    # MetaSchedule rebuilds its logging config from the names of the handlers on its logger and fails on an unnamed
    # one (as added by pytest's log capture or an application's own logging setup): set those aside while tuning.
    unnamed = [h for h in ms_logger.handlers if not h.get_name()]
    for h in unnamed:
        ms_logger.removeHandler(h)
    try:
        return _tune_module(mod, profile, ms, target, trials, rpc, session_timeout_s)
    finally:
        for h in unnamed:
            ms_logger.addHandler(h)


def _tune_module(mod: Any, profile: DeviceProfile, ms: Any, target: Any, trials: int,
                 rpc: tuple[str, int, str] | None, session_timeout_s: float) -> TuningReport:
    from tvm.s_tir.meta_schedule.runner.config import EvaluatorConfig

    db_dir = tuning_db_dir(profile)
    db_dir.mkdir(parents=True, exist_ok=True)
    report = TuningReport(database=str(db_dir), cost_model=cost_model_name())
    t0 = time.perf_counter()
    fused = _fuse_for_tasks(mod, target)
    tasks = ms.relax_integration.extract_tasks(fused, target)
    report.tasks = len(tasks)
    with _file_lock(db_dir / ".lock"):
        db = ms.database.JSONDatabase(work_dir=str(db_dir), module_equality="structural")
        new = []
        for task in tasks:
            if db.query_tuning_record(task.dispatched[0], target, task.task_name) is None:
                new.append(task)
        report.tasks_reused = len(tasks) - len(new)
        report.tasks_tuned = len(new)
        if new and trials > 0:
            per_task = max(1, math.ceil(trials / len(new)))
            # A smaller evolutionary population than MetaSchedule's default (512): per-candidate budgets are tens of
            # trials, and on a small host generating 512 candidates per round costs more than measuring them.
            strategy = ms.search_strategy.EvolutionarySearch(
                population_size=128, init_measured_ratio=0.2, init_min_unmeasured=32, genetic_num_iters=3)
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                new, work_dir=str(db_dir), strategy=strategy, num_threads="physical", seed=0)
            cc = cross_compiler_path(profile) if rpc is not None else None
            builder = (_in_process_builder(_fcompile(cc)) if target_kind(profile) == "llvm"
                       # GPU kernels need the tensor-core intrinsics, whose import alone is ~35 s per worker here.
                       else ms.builder.LocalBuilder(timeout_sec=600.0, max_workers=1))
            evaluator = EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20, enable_cpu_cache_flush=False)
            if rpc is not None:
                host, port, key = rpc
                runner: Any = ms.runner.RPCRunner(
                    ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                        session_priority=profile.rpc.priority,
                                        session_timeout_sec=int(session_timeout_s)),
                    evaluator_config=evaluator, max_workers=1)
            else:
                runner = ms.runner.LocalRunner(timeout_sec=120.0, evaluator_config=evaluator)
            ms.tune.tune_tasks(
                tasks=contexts, task_weights=weights, work_dir=str(db_dir),
                max_trials_global=trials, max_trials_per_task=per_task,
                num_trials_per_iter=max(1, min(32, per_task)),
                builder=builder, runner=runner, database=db, cost_model=_cost_model(report.cost_model),
            )
            report.trials = trials
            with contextlib.suppress(Exception):
                del runner  # its worker pool holds a process; drop it now rather than at interpreter exit
        report.untuned_tasks = [t.task_name for t in tasks
                                if db.query_tuning_record(t.dispatched[0], target, t.task_name) is None]
    report.seconds = time.perf_counter() - t0
    return report
