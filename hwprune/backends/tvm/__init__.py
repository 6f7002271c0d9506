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

Modules: ``target`` (profile -> TVM target, cross compiler), ``importer`` (ONNX -> Relax), ``tuning`` (MetaSchedule),
``compiler`` (build + compile cache), ``vm`` (running and timing a VM), ``local`` (``tvm``), ``tracker`` (RPC tracker
protocol), ``rpc`` (``tvm-rpc``). Every name other modules import is re-exported here.
"""

from __future__ import annotations

from hwprune.backends.tvm._util import cache_root, profile_cache_dir, tvm_versions
from hwprune.backends.tvm.compiler import CompiledModel, TvmCompiler
from hwprune.backends.tvm.importer import graph_input_specs, import_onnx
from hwprune.backends.tvm.local import TvmBackend
from hwprune.backends.tvm.rpc import TvmRpcBackend
from hwprune.backends.tvm.target import (
    cross_compiler_path,
    make_target,
    resolved_targets,
    target_kind,
    target_signature,
    target_threads,
    targets_this_machine,
    tuning_db_dir,
)
from hwprune.backends.tvm.tracker import SERVER_FIX, TRACKER_FIX
from hwprune.backends.tvm.tuning import TuningReport, cost_model_name, tune_module

__all__ = [
    "SERVER_FIX",
    "TRACKER_FIX",
    "CompiledModel",
    "TuningReport",
    "TvmBackend",
    "TvmCompiler",
    "TvmRpcBackend",
    "cache_root",
    "cost_model_name",
    "cross_compiler_path",
    "graph_input_specs",
    "import_onnx",
    "make_target",
    "profile_cache_dir",
    "resolved_targets",
    "target_kind",
    "target_signature",
    "target_threads",
    "targets_this_machine",
    "tune_module",
    "tuning_db_dir",
    "tvm_versions",
]
