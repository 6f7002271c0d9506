"""Apache TVM (Relax) backends: on this machine (``tvm``) and on a remote board through TVM's RPC tracker (``tvm-rpc``).

Pipeline: ONNX -> ``tvm.relax.frontend.onnx.from_onnx`` (static shapes) -> [MetaSchedule tuning against a persistent
per-profile database] -> ``tvm.compile`` for ``Target(profile.tvm.target, host=profile.tvm.host)`` -> exported shared
library (cross-compiled with the profile's compiler for a board) -> ``relax.VirtualMachine`` -> ``time_evaluator``.

Why the pieces are shaped this way (measured with TVM 0.27 on this project's 2-core host):

* Untuned TVM only legalizes ops (no vectorised, no parallel schedules): it ran 21-54x slower than ONNX Runtime. Every
  measurement therefore says ``tuned=True/False``; a search decides what it may rank on.
* MetaSchedule's stock ``LocalBuilder`` starts a fresh worker pool for every batch and each worker imports
  ``tvm.s_tir.tensor_intrin`` (24-55 s here). For CPU targets the candidates are built in this process instead (no
  tensor intrinsics are needed for fp32 LLVM code), which makes a tuning round seconds instead of a minute. GPU
  targets keep the stock builder with its timeout raised far above the 30 s default.
* The tuning database is a MetaSchedule JSON database per profile and target that outlives the process. Tasks that
  already have a record are not tuned again, so the second and later candidates of a search (and the next night's
  search) only pay for layer shapes they have not seen. Channel multiples bound the number of distinct shapes.
* Compiled libraries are cached by (ONNX sha256, profile, target, TVM version, tuning budget), so measuring the same
  model twice - a re-measure, a resumed search - does not compile again.
* Remote: one session per measurement (a board is held only while it measures, so many workers can share boards under
  one key), on-device ``time_evaluator`` (network time is excluded), bounded retries with backoff, and every remote
  step bounded in time, so a board that vanishes fails one trial with a one-line reason instead of hanging a study.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hwprune.errors import BackendUnavailable, MeasurementError
from hwprune.backends.base import Latency, Measurement, Memory
from hwprune.profiles import DeviceProfile, load_profile

log = logging.getLogger(__name__)

TRACKER_FIX = (
    "start a tracker: python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {port}; "
    "on the board: python -m tvm.exec.rpc_server --tracker {host}:{port} --key {key}"
)
SERVER_FIX = "on the board run: python -m tvm.exec.rpc_server --tracker {host}:{port} --key {key}"


# ---------------------------------------------------------------------------------------------------------------------
# small helpers


def _first_line(exc: BaseException | str) -> str:
    """The most informative single line of an error (TVM errors carry multi-line C++ backtraces)."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # TVM puts the message after the backtrace, on a line that starts with the error type.
    for ln in reversed(lines):
        if re.match(r"^(tvm\.\w+\.)?\w*(Error|Exception)\b.*:", ln) or ln.startswith(("TVMError", "InternalError")):
            return ln[:400]
    for ln in lines:
        if not ln.startswith(("Traceback", "File ", "  File")) and not re.match(r"^\d+:", ln):
            return ln[:400]
    return (lines[0] if lines else type(exc).__name__ if isinstance(exc, BaseException) else "error")[:400]


def _tvm() -> Any:
    """``import tvm`` with an actionable message when it is missing or broken."""
    try:
        import tvm  # noqa: F401
        from tvm import relax  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable(
            f"Apache TVM is not installed or does not import ({exc}); install the extra: "
            "pip install -e '.[tvm]' (apache-tvm==0.27.0.post1, apache-tvm-ffi==0.1.14.post1)"
        ) from None
    return tvm


def tvm_versions() -> dict[str, str]:
    """Versions of the TVM packages (part of every cache key and of ``extra`` in measurements)."""
    tvm = _tvm()
    out = {"tvm": str(tvm.__version__)}
    try:
        from importlib.metadata import version

        out["tvm_ffi"] = version("apache-tvm-ffi")
    except Exception:  # noqa: BLE001 - metadata is informative only
        pass
    return out


def cache_root() -> Path:
    """``$HWPRUNE_CACHE`` or ``~/.cache/hwprune``."""
    env = os.environ.get("HWPRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hwprune"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "profile"


def profile_cache_dir(profile: DeviceProfile) -> Path:
    """Per-profile TVM cache folder: ``<cache_root>/tvm/<profile.name>/``."""
    return cache_root() / "tvm" / _safe(profile.name)


def _canonical(d: Any) -> str:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)


def _resolve_native(target: dict[str, Any] | None) -> dict[str, Any] | None:
    """``target`` with ``mcpu = "native"`` replaced by the CPU LLVM detects on this machine."""
    if not target or target.get("mcpu") != "native":
        return target
    try:
        from tvm.target import codegen
    except ImportError:  # no TVM: nothing will be compiled, and "native" names the target well enough
        return target
    return {**target, "mcpu": str(codegen.llvm_get_system_cpu())}


def resolved_targets(profile: DeviceProfile) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The profile's (target, host) dicts as compiled for: ``mcpu = "native"`` becomes this machine's CPU (host-cpu
    ships with it: a fixed ``znver4`` ran AVX-512 code on an AVX2 host and died of an illegal instruction)."""
    return _resolve_native(dict(profile.tvm.target)) or {}, _resolve_native(profile.tvm.host)


def target_signature(profile: DeviceProfile) -> str:
    """A short hash of the target and host dicts as resolved here (a profile edited to a new target, or a native
    target on another CPU, gets a fresh database)."""
    return hashlib.sha256(_canonical(list(resolved_targets(profile))).encode()).hexdigest()[:12]


def tuning_db_dir(profile: DeviceProfile) -> Path:
    """Where the profile's MetaSchedule database lives.

    ``profile.tvm.tuning_db`` when set (used as given), else ``<cache_root>/tvm/<profile>/tuning/<target hash>/``,
    with ``-<rpc key>`` appended for ``tvm-rpc``: tuning records are timings of one kind of device, and a profile
    pointed at another board with ``--key`` must not mix its records with this machine's.
    """
    if profile.tvm.tuning_db:
        return Path(profile.tvm.tuning_db).expanduser()
    leaf = target_signature(profile)
    if profile.backend == "tvm-rpc" and profile.rpc.key:
        leaf += "-" + _safe(profile.rpc.key)
    return profile_cache_dir(profile) / "tuning" / leaf


def make_target(profile: DeviceProfile) -> Any:
    """``tvm.target.Target`` built from the profile's JSON dicts (TVM 0.27 rejects the old CLI target strings)."""
    tvm = _tvm()
    target, host_dict = resolved_targets(profile)
    try:
        host = tvm.target.Target(dict(host_dict)) if host_dict else None
        return tvm.target.Target(target, host=host)
    except Exception as exc:  # noqa: BLE001 - TVM raises its own error types for bad target dicts
        raise BackendUnavailable(
            f"profile {profile.name}: tvm.target {profile.tvm.target} is not a valid TVM target: {_first_line(exc)}"
        ) from None


def target_kind(profile: DeviceProfile) -> str:
    return str(profile.tvm.target.get("kind", "llvm"))


def target_threads(profile: DeviceProfile) -> int | None:
    """Cores the compiled code is parallelised for (``num-cores`` in the target), if the profile says."""
    n = profile.tvm.target.get("num-cores")
    return int(n) if isinstance(n, int) else None


_HOST_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def targets_this_machine(profile: DeviceProfile) -> bool:
    """Whether the profile's (host) target produces code this machine can run."""
    tgt = profile.tvm.host if profile.tvm.host else profile.tvm.target
    triple = str(tgt.get("mtriple", ""))
    if not triple:
        return True
    here = _HOST_ARCH.get(platform.machine().lower(), platform.machine().lower())
    return triple.split("-")[0] == here and "android" not in triple


def cross_compiler_path(profile: DeviceProfile) -> str | None:
    """The compiler that links libraries for the board, or None to use the host's default C++ compiler.

    ``tvm.cross_compiler_env`` (e.g. ``TVM_NDK_CC`` for the Android NDK clang) wins over ``tvm.cross_compiler``.
    Raises BackendUnavailable, saying how to install or name it, when it cannot be found.
    """
    t = profile.tvm
    if t.cross_compiler_env:
        value = os.environ.get(t.cross_compiler_env, "")
        if not value:
            raise BackendUnavailable(
                f"profile {profile.name} cross-compiles with the compiler named by ${t.cross_compiler_env}, which is "
                f"not set; export {t.cross_compiler_env}=$ANDROID_NDK/toolchains/llvm/prebuilt/linux-x86_64/bin/"
                "aarch64-linux-android33-clang++ (or the NDK clang for your API level)"
            )
        found = shutil.which(value)
        if not found:
            raise BackendUnavailable(f"${t.cross_compiler_env}={value} is not an executable compiler")
        return found
    if t.cross_compiler:
        found = shutil.which(t.cross_compiler)
        if not found:
            pkg = "g++-aarch64-linux-gnu" if "aarch64" in t.cross_compiler else t.cross_compiler
            raise BackendUnavailable(
                f"profile {profile.name} cross-compiles with {t.cross_compiler}, which is not installed here; "
                f"on Debian/Ubuntu: sudo apt-get install {pkg}"
            )
        return found
    return None


def _fcompile(cc: str | None) -> Any:
    if cc is None:
        return None
    from tvm.support import cc as tvm_cc

    return tvm_cc.cross_compiler(cc)


def _sha256_file(path: Path) -> str:
    try:
        from hwprune.export import sha256_file

        return sha256_file(path)
    except ImportError:  # pragma: no cover - export.py ships with hwprune
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path):  # type: ignore[no-untyped-def]
    """An exclusive lock between processes (workers sharing one tuning database or compile cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - Windows: single worker assumed
            pass
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                import fcntl

                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------------------------
# ONNX -> Relax


def graph_input_specs(onnx_model: Any) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(name, static shape, dtype) of each real graph input; dynamic dimensions are pinned to 1."""
    from hwprune.export import graph_inputs

    return graph_inputs(onnx_model)


def _ort_constant_fold(onnx_path: Path, shapes: dict[str, tuple[int, ...]]) -> Any:
    """The graph after ONNX Runtime's *basic* optimisations (constant folding with static input shapes).

    The legacy TorchScript exporter writes runtime-computed Pad amounts (TF-style "same" padding) that TVM's importer
    rejects ("Dynamic pads are not supported yet"); with the input shapes fixed, those subgraphs are constants, and the
    basic level only folds and removes nodes - it introduces no ORT-specific ops.
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    for vi in model.graph.input:
        if vi.name in shapes:
            dims = vi.type.tensor_type.shape.dim
            for d, n in zip(dims, shapes[vi.name]):
                d.Clear()
                d.dim_value = int(n)
    with tempfile.TemporaryDirectory(prefix="hwprune-fold-") as tmp:
        src = Path(tmp) / "in.onnx"
        dst = Path(tmp) / "folded.onnx"
        onnx.save(model, str(src))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(dst)
        so.log_severity_level = 3
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        return onnx.load(str(dst))


def import_onnx(onnx_path: str | os.PathLike[str]) -> Any:
    """The Relax ``IRModule`` of an ONNX file with static input shapes (weights bound as constants).

    Raises MeasurementError with one line when TVM's importer cannot take the graph.
    """
    tvm = _tvm()
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    path = Path(onnx_path)
    model = onnx.load(str(path))
    specs = graph_input_specs(model)
    shapes = {name: shape for name, shape, _ in specs}
    dtypes = {name: str(dtype) for name, _, dtype in specs}
    try:
        return from_onnx(model, shape_dict={k: list(v) for k, v in shapes.items()}, dtype_dict=dtypes)
    except Exception as first:  # noqa: BLE001 - the importer raises many types; retry once on a folded graph
        try:
            folded = _ort_constant_fold(path, shapes)
            return from_onnx(folded, shape_dict={k: list(v) for k, v in shapes.items()}, dtype_dict=dtypes)
        except Exception:  # noqa: BLE001
            pass
        hint = ""
        if "Dynamic" in str(first):
            hint = " (export the model with the dynamo exporter: export_onnx(..., exporter='dynamo'))"
        raise MeasurementError(f"TVM {tvm.__version__} cannot import {path.name}: {_first_line(first)}{hint}") from None


def _preprocess(mod: Any) -> Any:
    """Inference-time decompositions shared by the tuned and the untuned path (batch norm -> scale/shift)."""
    tvm = _tvm()
    from tvm import relax

    return tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                     relax.transform.CanonicalizeBindings()])(mod)


def _fuse_for_tasks(mod: Any, target: Any) -> Any:
    """Legalize + fuse exactly as ``compile_relax`` does, so extracted tasks match the database keys it applies."""
    tvm = _tvm()
    from tvm import relax
    from tvm.relax import pipeline as rp

    try:
        dispatch = rp.library_dispatch_passes(target)
    except (ValueError, AttributeError):
        dispatch = []
    with target:
        return tvm.transform.Sequential([
            *dispatch,
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ])(mod)


# ---------------------------------------------------------------------------------------------------------------------
# MetaSchedule


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


# ---------------------------------------------------------------------------------------------------------------------
# compile (with cache)


@dataclass
class CompiledModel:
    """An exported TVM library for one model and profile."""

    path: Path
    key: str
    tuned: bool
    cached: bool
    stage_seconds: dict[str, float]
    info: dict[str, Any]
    input_specs: list[tuple[str, tuple[int, ...], Any]]


class TvmCompiler:
    """Compiles ONNX files for a profile's target, with MetaSchedule tuning and a persistent compile cache.

    ``tune_rpc`` (tracker host, port, key) makes tuning measure candidates on the board; without it they are measured
    here, which is only right when the profile targets this machine.
    """

    def __init__(self, profile: DeviceProfile | str, *, cache_dir: str | os.PathLike[str] | None = None,
                 tune_rpc: tuple[str, int, str] | None = None) -> None:
        self.profile = load_profile(profile)
        self.tvm = _tvm()
        self.target = make_target(self.profile)
        self.cc = cross_compiler_path(self.profile)
        if self.cc is None and not targets_this_machine(self.profile):
            raise BackendUnavailable(
                f"profile {self.profile.name} targets {self.profile.tvm.target.get('mtriple')} but names no cross "
                "compiler; set tvm.cross_compiler (e.g. aarch64-linux-gnu-g++) or tvm.cross_compiler_env"
            )
        self.cache_dir = Path(cache_dir) if cache_dir else profile_cache_dir(self.profile) / "compiled"
        self.tune_rpc = tune_rpc
        self.versions = tvm_versions()

    def cache_key(self, onnx_sha256: str) -> str:
        """Hash of (model, profile name, target, host, compiler, TVM versions, tuning budget)."""
        p = self.profile
        parts = [onnx_sha256, p.name, p.tvm.target, p.tvm.host, self.cc or "", self.versions,
                 p.tvm.tuning_trials, str(tuning_db_dir(p)) if p.tvm.tuning_trials > 0 else ""]
        return hashlib.sha256(_canonical(parts).encode()).hexdigest()[:32]

    def build(self, onnx_path: str | os.PathLike[str], *, use_cache: bool = True) -> CompiledModel:
        """The model's exported library: from the cache, or imported, tuned (if budgeted), compiled and exported."""
        path = Path(onnx_path)
        if not path.is_file():
            raise MeasurementError(f"no ONNX file at {path}")
        key = self.cache_key(_sha256_file(path))
        lib = self.cache_dir / f"{key}.so"
        meta = self.cache_dir / f"{key}.json"
        specs = graph_input_specs(str(path))
        if use_cache and lib.is_file() and meta.is_file():
            with contextlib.suppress(OSError, ValueError):
                info = json.loads(meta.read_text())
                return CompiledModel(lib, key, bool(info.get("tuned")), True, {"compile": 0.0}, info, specs)
        stages: dict[str, float] = {}
        t0 = time.perf_counter()
        mod = _preprocess(import_onnx(path))
        stages["import"] = time.perf_counter() - t0
        info: dict[str, Any] = {"target": self.profile.tvm.target, "host": self.profile.tvm.host,
                                "cross_compiler": self.cc, **self.versions, "onnx": path.name}
        tuned = False
        if self.profile.tvm.tuning_trials > 0:
            try:
                report = tune_module(mod, self.profile, rpc=self.tune_rpc,
                                     session_timeout_s=self.profile.rpc.session_timeout_s)
            except (BackendUnavailable, MeasurementError):
                raise
            except Exception as exc:  # noqa: BLE001 - a tuning crash fails this model, not the study
                err = MeasurementError(f"MetaSchedule tuning failed for {path.name}: {_first_line(exc)}")
                raise err from (exc if os.environ.get("HWPRUNE_DEBUG") else None)
            stages["tune"] = report.seconds
            info["tuning"] = report.to_dict()
            tuned = True
        t1 = time.perf_counter()
        try:
            if tuned:
                from tvm.s_tir import meta_schedule as ms

                with _file_lock(tuning_db_dir(self.profile) / ".lock"):
                    db = ms.database.JSONDatabase(work_dir=str(tuning_db_dir(self.profile)),
                                                  module_equality="structural")
                ex = ms.relax_integration.compile_relax(db, mod, self.target, params=None)
            else:
                ex = self.tvm.compile(mod, target=self.target)
        except Exception as exc:  # noqa: BLE001
            raise MeasurementError(f"TVM cannot compile {path.name} for {self.profile.name}: "
                                   f"{_first_line(exc)}") from None
        stages["compile"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_dir / f".{key}.{os.getpid()}.{threading.get_ident()}.so"
        try:
            fcompile = _fcompile(self.cc)
            if fcompile is None:
                ex.export_library(str(tmp))
            else:
                ex.export_library(str(tmp), fcompile=fcompile)
            os.replace(tmp, lib)  # atomic: a parallel worker never loads half a library
        except Exception as exc:  # noqa: BLE001
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise MeasurementError(f"cannot link the TVM library for {path.name} with "
                                   f"{self.cc or 'the host compiler'}: {_first_line(exc)}") from None
        stages["export"] = time.perf_counter() - t2
        info.update({"tuned": tuned, "stage_seconds": stages, "created": time.time()})
        tmp_meta = meta.with_suffix(f".{os.getpid()}.tmp")
        tmp_meta.write_text(json.dumps(info, indent=1, default=str))
        os.replace(tmp_meta, meta)
        # Measurements report one "compile" figure (import + build + link: the time to get a library) and "tune";
        # the split stays in the library's metadata (extra["compile_detail"]).
        summary = {"compile": stages["import"] + stages["compile"] + stages["export"]}
        if "tune" in stages:
            summary["tune"] = stages["tune"]
        return CompiledModel(lib, key, tuned, False, summary, info, specs)


# ---------------------------------------------------------------------------------------------------------------------
# timing on a VM (local or remote: the same time_evaluator runs on the device either way)


def _ordered_args(specs: list[tuple[str, tuple[int, ...], Any]], inputs: dict[str, np.ndarray] | None,
                  label: str) -> list[np.ndarray]:
    if inputs is None:
        rng = np.random.default_rng(0)
        arrays = []
        for _, shape, dtype in specs:
            dt = np.dtype(dtype)
            if np.issubdtype(dt, np.floating):
                arrays.append(rng.standard_normal(shape).astype(dt))
            elif np.issubdtype(dt, np.integer):
                arrays.append(rng.integers(0, 10, size=shape).astype(dt))
            else:
                arrays.append(np.zeros(shape, dtype=dt))
        return arrays
    missing = [n for n, _, _ in specs if n not in inputs]
    if missing:
        raise MeasurementError(f"inputs for {label} lack {', '.join(missing)} "
                               f"(the graph takes {', '.join(n for n, _, _ in specs)})")
    return [np.ascontiguousarray(inputs[n]) for n, _, _ in specs]


def _device(session_or_tvm: Any, kind: str) -> Any:
    """The device a target kind runs on, from ``tvm`` (local) or an RPC session (remote)."""
    names = {"llvm": "cpu", "c": "cpu", "cuda": "cuda", "opencl": "cl", "vulkan": "vulkan", "metal": "metal",
             "rocm": "rocm"}
    attr = names.get(kind, "cpu")
    return getattr(session_or_tvm, attr)(0)


def _outputs(value: Any) -> list[np.ndarray]:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    out: list[np.ndarray] = []
    for v in value:
        out.extend(_outputs(v))
    return out


def _time_vm(vm: Any, dev: Any, args: list[Any], profile: DeviceProfile,
             progress: dict[str, str] | None = None) -> Latency:
    """Warm-up, then ``repeats`` on-device samples via ``time_evaluator``; noisy sets are re-taken (kept if best)."""
    m = profile.measure
    if progress is not None:
        progress["stage"] = "warm-up"
    if m.warmup > 0:
        vm.time_evaluator("main", dev, number=m.warmup, repeat=1)(*args)
    evaluator = vm.time_evaluator("main", dev, number=1, repeat=m.repeats, min_repeat_ms=int(m.min_repeat_ms))
    best: Latency | None = None
    attempts = 0
    if progress is not None:
        progress["stage"] = "timing"
    while True:
        res = evaluator(*args)
        lat = Latency.from_samples([r * 1e3 for r in res.results], warmup=m.warmup)
        if best is None or lat.robust_cv < best.robust_cv:
            best = lat
        if best.robust_cv <= m.max_cv or attempts >= m.remeasure:
            break
        attempts += 1
    best.remeasured = attempts
    best.noisy = best.robust_cv > m.max_cv
    return best


def _graph_memory(onnx_path: Path) -> Memory:
    from hwprune.backends.memory import graph_memory

    return graph_memory(str(onnx_path))


def _load_avg() -> tuple[float, float, float] | None:
    return tuple(float(x) for x in os.getloadavg()) if hasattr(os, "getloadavg") else None  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------------
# local backend


class TvmBackend:
    """Measure with TVM on this machine, for the profile's target (which must be this machine's architecture)."""

    name = "tvm"

    def __init__(self, profile: DeviceProfile | str) -> None:
        self.profile = load_profile(profile)
        if not targets_this_machine(self.profile):
            raise BackendUnavailable(
                f"profile {self.profile.name} targets {self.profile.tvm.target.get('mtriple')}, which cannot run on "
                f"this {platform.machine()} machine; measure on the board with --backend tvm-rpc "
                "--tracker HOST:PORT --key KEY"
            )
        if target_kind(self.profile) != "llvm":
            raise BackendUnavailable(
                f"the local tvm backend runs CPU (llvm) targets; profile {self.profile.name} targets "
                f"{target_kind(self.profile)}: use --backend tvm-rpc against the device"
            )
        self.compiler = TvmCompiler(self.profile)
        self.tvm = self.compiler.tvm

    def _vm(self, built: CompiledModel) -> tuple[Any, Any]:
        from tvm import relax

        dev = _device(self.tvm, target_kind(self.profile))
        try:
            lib = self.tvm.runtime.load_module(str(built.path))
            return relax.VirtualMachine(lib, dev), dev
        except Exception as exc:  # noqa: BLE001
            raise MeasurementError(f"TVM cannot load {built.path.name}: {_first_line(exc)}") from None

    def measure(self, onnx_path: str | os.PathLike[str], inputs: dict[str, np.ndarray] | None = None) -> Measurement:
        """Compile (or take from the cache), load into a VM, time with ``time_evaluator``."""
        path = Path(onnx_path)
        built = self.compiler.build(path)
        stages = dict(built.stage_seconds)
        t0 = time.perf_counter()
        vm, dev = self._vm(built)
        args = [self.tvm.runtime.tensor(a, dev) for a in _ordered_args(built.input_specs, inputs, path.name)]
        stages["load"] = time.perf_counter() - t0
        load_avg = _load_avg()
        t1 = time.perf_counter()
        try:
            latency = _time_vm(vm, dev, args, self.profile)
        except Exception as exc:  # noqa: BLE001
            raise MeasurementError(f"TVM failed to run {path.name}: {_first_line(exc)}") from None
        stages["timing"] = time.perf_counter() - t1
        return Measurement(
            backend=self.name, device=self.profile.name, latency=latency, memory=_graph_memory(path),
            threads=target_threads(self.profile), estimated=False, tuned=built.tuned, load_avg=load_avg,
            stage_seconds=stages,
            extra={**_extra(built), "timer": "tvm time_evaluator"},
        )

    def run(self, onnx_path: str | os.PathLike[str], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run once and return the outputs (for checking against ONNX Runtime)."""
        path = Path(onnx_path)
        built = self.compiler.build(path)
        vm, dev = self._vm(built)
        args = [self.tvm.runtime.tensor(a, dev) for a in _ordered_args(built.input_specs, inputs, path.name)]
        try:
            return _outputs(vm["main"](*args))
        except Exception as exc:  # noqa: BLE001
            raise MeasurementError(f"TVM failed to run {path.name}: {_first_line(exc)}") from None

    def close(self) -> None:
        """Nothing is held between calls (the compile cache is on disk)."""

    def __enter__(self) -> "TvmBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _extra(built: CompiledModel) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "tvm": built.info.get("tvm"), "tvm_ffi": built.info.get("tvm_ffi"), "target": built.info.get("target"),
        "compile_cached": built.cached, "library_key": built.key,
        "compile_detail": built.info.get("stage_seconds"),
    }
    if built.info.get("tuning"):
        extra["tuning"] = built.info["tuning"]
    if built.info.get("cross_compiler"):
        extra["cross_compiler"] = built.info["cross_compiler"]
    return extra


# ---------------------------------------------------------------------------------------------------------------------
# remote backend (TVM RPC tracker)


class _RemoteFailure(Exception):
    """A remote step failed; ``retry`` says whether another attempt can help."""

    def __init__(self, reason: str, retry: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry


def _request_session(host: str, port: int, key: str, priority: int, session_timeout: float,
                     wait_s: float) -> Any:
    """Ask the tracker for a board under ``key`` and connect to it, never waiting longer than ``wait_s``.

    Same protocol as ``TrackerSession.request``, but over a socket with a timeout: TVM's own client retries a refused
    tracker for 60 s and waits for a free board forever.
    """
    from tvm import rpc
    from tvm.rpc import base

    try:
        sock = socket.create_connection((host, port), timeout=min(10.0, wait_s))
    except OSError as exc:
        raise _RemoteFailure(f"tracker {host}:{port} is not reachable ({_oserror(exc)})") from None
    try:
        sock.settimeout(min(10.0, wait_s))
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        if struct.unpack("<i", base.recvall(sock, 4))[0] != base.RPC_TRACKER_MAGIC:
            raise _RemoteFailure(f"{host}:{port} is not a TVM RPC tracker", retry=False)
        base.sendjson(sock, [base.TrackerCode.SUMMARY])
        summary = base.recvjson(sock)[1]
        from hwprune.rpc_local import key_status

        status = key_status(summary, key)
        if status["total"] == 0:
            raise _RemoteFailure(f"no board is registered under key {key!r} at tracker {host}:{port} "
                                 "(the board's rpc_server stopped, crashed or lost its network)")
        sock.settimeout(wait_s)
        base.sendjson(sock, [base.TrackerCode.REQUEST, key, "", priority])
        try:
            value = base.recvjson(sock)
        except socket.timeout:
            raise _RemoteFailure(f"no free board under key {key!r} within {wait_s:.0f} s "
                                 f"({status['total']} registered, all busy)") from None
        if value[0] != base.TrackerCode.SUCCESS:
            raise _RemoteFailure(f"tracker {host}:{port} refused the request: {value!r}")
        url, sport, matchkey = value[1]
    except _RemoteFailure:
        raise
    except (OSError, struct.error, ValueError, IndexError) as exc:
        raise _RemoteFailure(f"tracker {host}:{port} dropped the connection ({_oserror(exc)})") from None
    finally:
        sock.close()
    try:
        return rpc.connect(url, sport, matchkey, session_timeout=session_timeout)
    except Exception as exc:  # noqa: BLE001
        raise _RemoteFailure(f"board {url}:{sport} under key {key!r} did not accept the session: "
                             f"{_first_line(exc)}") from None


def _oserror(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return _first_line(exc)


def _rpc_reason(exc: BaseException) -> str:
    """A remote error in words a user can act on (TVM reports a dropped socket as an RPC protocol check)."""
    msg = _first_line(exc)
    low = msg.lower()
    if "kshutdown" in low or "reset by peer" in low or "broken pipe" in low or "connection closed" in low \
            or "rpccode" in low:
        return "the connection to the board was closed (rpc_server killed, board rebooted or lost power/network)"
    if "session timeout" in low or "timed out" in low:
        return f"session timed out ({msg})"
    return msg


def _run_bounded(fn: Callable[[dict[str, str]], Any], deadline_s: float, what: str) -> Any:
    """Run ``fn(progress)`` in a daemon thread; a call that outlives ``deadline_s`` becomes a ``_RemoteFailure``.

    TVM's RPC client blocks in C++ on a board that vanished without closing its socket; a thread we can walk away
    from is the only bound that always works. (The server's own session timeout normally ends it first.)
    """
    progress = {"stage": "connect"}
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(progress)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    th = threading.Thread(target=target, name=f"hwprune-rpc-{what}", daemon=True)
    th.start()
    th.join(deadline_s)
    if th.is_alive():
        raise _RemoteFailure(f"the board did not answer within {deadline_s:.0f} s during {progress['stage']}")
    if "error" in box:
        raise box["error"]
    return box["value"]


class TvmRpcBackend:
    """Measure on a board registered with a TVM RPC tracker under ``profile.rpc.key``.

    The model is compiled here (cross-compiled with the profile's compiler), uploaded, loaded into a VM on the board
    and timed there by ``time_evaluator`` (so network time is not part of the latency). Stage times: ``compile``
    (plus ``tune``), ``connect``, ``upload``, ``load``, ``timing``. A tracker that is down or a key without a board
    at construction -> :class:`BackendUnavailable` (with the commands that fix it); a failure while measuring ->
    :class:`MeasurementError` with a one-line reason, after ``profile.rpc.retries`` retries with backoff.
    """

    name = "tvm-rpc"

    def __init__(self, profile: DeviceProfile | str, *, check: bool = True) -> None:
        self.profile = load_profile(profile)
        r = self.profile.rpc
        if not r.tracker:
            raise BackendUnavailable(
                f"profile {self.profile.name} has no rpc.tracker; pass --tracker HOST:PORT --key KEY, or "
                + TRACKER_FIX.format(host="HOST", port=9190, key=r.key or "KEY")
            )
        if not r.key:
            raise BackendUnavailable(f"profile {self.profile.name} has no rpc.key; pass --key KEY (the key the "
                                     "board's rpc_server registered under)")
        from hwprune.rpc_local import parse_hostport

        try:
            self.host, self.port = parse_hostport(r.tracker)
        except ValueError:
            raise BackendUnavailable(f"rpc.tracker {r.tracker!r} is not HOST:PORT") from None
        self.key = r.key
        self.compiler = TvmCompiler(self.profile, tune_rpc=(self.host, self.port, self.key))
        self.tvm = self.compiler.tvm
        if check:
            self.check()

    # -- status ---------------------------------------------------------------------------------------------------

    def fix_text(self) -> str:
        return TRACKER_FIX.format(host=self.host, port=self.port, key=self.key)

    def queue_status(self, timeout: float = 5.0) -> dict[str, int]:
        """``{"total", "free", "pending"}`` for the key; raises BackendUnavailable when the tracker is unreachable."""
        from hwprune.rpc_local import key_status, tracker_summary

        try:
            return key_status(tracker_summary(self.host, self.port, timeout=timeout), self.key)
        except (OSError, RuntimeError, ValueError) as exc:
            raise BackendUnavailable(
                f"cannot reach the TVM RPC tracker at {self.host}:{self.port} ({_oserror(exc)}); {self.fix_text()}"
            ) from None

    def check(self) -> dict[str, int]:
        """Raise BackendUnavailable unless the tracker answers and at least one board is registered under the key."""
        status = self.queue_status()
        if status["total"] == 0:
            raise BackendUnavailable(
                f"no board is registered under key {self.key!r} at tracker {self.host}:{self.port}; "
                + SERVER_FIX.format(host=self.host, port=self.port, key=self.key)
            )
        return status

    # -- measuring ------------------------------------------------------------------------------------------------

    def _with_board(self, fn: Callable[[Any, dict[str, str], dict[str, float]], Any],
                    stages: dict[str, float], what: str) -> Any:
        r = self.profile.rpc
        attempts = 1 + max(0, r.retries)
        # The wait for a free board is bounded by the socket timeout below and a session by the server's
        # session_timeout_s; this outer bound only catches a board that hangs without closing its socket.
        wait_s = max(5.0, r.session_timeout_s)
        deadline = wait_s + r.session_timeout_s + 15.0
        reason = first = ""
        for attempt in range(attempts):
            def body(progress: dict[str, str]) -> Any:
                t0 = time.perf_counter()
                progress["stage"] = "connect"
                sess = _request_session(self.host, self.port, self.key, r.priority, r.session_timeout_s,
                                        wait_s=wait_s)
                stages["connect"] = time.perf_counter() - t0
                try:
                    return fn(sess, progress, stages)
                except _RemoteFailure:
                    raise
                except Exception as exc:  # noqa: BLE001 - RPC errors come as TVMError/RuntimeError/OSError
                    raise _RemoteFailure(f"the board under key {self.key!r} failed during {progress['stage']}: "
                                         f"{_rpc_reason(exc)}") from None
                finally:
                    del sess  # closes the session: the board goes back to the tracker's pool
            try:
                return _run_bounded(body, deadline, what)
            except _RemoteFailure as exc:
                # The first failure is usually the cause (the board died during timing); the last says how it
                # stands now (no board registered). Report both when they differ.
                first = first or exc.reason
                reason = exc.reason if exc.reason == first else f"{first}; on retry: {exc.reason}"
                if not exc.retry or attempt == attempts - 1:
                    break
                time.sleep(min(8.0, 1.0 * 2 ** attempt))  # 1, 2, 4, 8 s: a rebooting board or a busy tracker
        raise MeasurementError(f"tvm-rpc ({self.profile.name}, key {self.key!r} at {self.host}:{self.port}): "
                               f"{reason} [after {attempt + 1} attempt(s)]")

    def _remote_vm(self, sess: Any, built: CompiledModel, progress: dict[str, str],
                   stages: dict[str, float]) -> tuple[Any, Any, str]:
        from tvm import relax

        progress["stage"] = "upload"
        t0 = time.perf_counter()
        name = f"hwprune-{built.key[:16]}.so"
        sess.upload(str(built.path), target=name)
        stages["upload"] = time.perf_counter() - t0
        progress["stage"] = "load"
        t1 = time.perf_counter()
        rlib = sess.load_module(name)
        dev = _device(sess, target_kind(self.profile))
        vm = relax.VirtualMachine(rlib, dev)
        stages["load"] = time.perf_counter() - t1
        return vm, dev, name

    def measure(self, onnx_path: str | os.PathLike[str], inputs: dict[str, np.ndarray] | None = None) -> Measurement:
        """Compile here, upload, load and time on the board; see the class docstring."""
        path = Path(onnx_path)
        built = self.compiler.build(path)
        arrays = _ordered_args(built.input_specs, inputs, path.name)
        stages: dict[str, float] = dict(built.stage_seconds)

        def on_board(sess: Any, progress: dict[str, str], st: dict[str, float]) -> Latency:
            vm, dev, name = self._remote_vm(sess, built, progress, st)
            progress["stage"] = "input copy"
            args = [self.tvm.runtime.tensor(a, dev) for a in arrays]
            t0 = time.perf_counter()
            lat = _time_vm(vm, dev, args, self.profile, progress)
            st["timing"] = time.perf_counter() - t0
            with contextlib.suppress(Exception):
                sess.remove(name)
            return lat

        latency = self._with_board(on_board, stages, "measure")
        return Measurement(
            backend=self.name, device=self.profile.name, latency=latency, memory=_graph_memory(path),
            threads=target_threads(self.profile), estimated=False, tuned=built.tuned, load_avg=None,
            stage_seconds=stages,
            extra={**_extra(built), "timer": "tvm time_evaluator on the board (network time excluded)",
                   "tracker": f"{self.host}:{self.port}", "key": self.key},
        )

    def run(self, onnx_path: str | os.PathLike[str], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run once on the board and return the outputs (for checking against ONNX Runtime on the host)."""
        path = Path(onnx_path)
        built = self.compiler.build(path)
        arrays = _ordered_args(built.input_specs, inputs, path.name)

        def on_board(sess: Any, progress: dict[str, str], st: dict[str, float]) -> list[np.ndarray]:
            vm, dev, name = self._remote_vm(sess, built, progress, st)
            progress["stage"] = "run"
            out = _outputs(vm["main"](*[self.tvm.runtime.tensor(a, dev) for a in arrays]))
            with contextlib.suppress(Exception):
                sess.remove(name)
            return out

        return self._with_board(on_board, {}, "run")

    def close(self) -> None:
        """Sessions are per measurement; nothing stays open."""

    def __enter__(self) -> "TvmRpcBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = [
    "CompiledModel",
    "TuningReport",
    "TvmBackend",
    "TvmCompiler",
    "TvmRpcBackend",
    "cache_root",
    "cost_model_name",
    "cross_compiler_path",
    "import_onnx",
    "make_target",
    "profile_cache_dir",
    "tune_module",
    "tuning_db_dir",
    "tvm_versions",
]
