"""Compile ONNX files for a profile's target, with tuning and a persistent compile cache."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwprune.errors import BackendUnavailable, MeasurementError
from hwprune.export import sha256_file
from hwprune.profiles import DeviceProfile, load_profile
from hwprune.backends.tvm._util import (
    _canonical,
    _file_lock,
    _first_line,
    _tvm,
    profile_cache_dir,
    tvm_versions,
)
from hwprune.backends.tvm.target import _fcompile, cross_compiler_path, make_target, targets_this_machine, tuning_db_dir
from hwprune.backends.tvm.importer import _preprocess, graph_input_specs, import_onnx
from hwprune.backends.tvm.tuning import TuningReport, tune_module


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
        """The model's exported library: from the cache, or imported, tuned (if budgeted), compiled and exported.

        Raises:
            MeasurementError: no file, or TVM cannot import, tune, compile or link it.
        """
        path = Path(onnx_path)
        if not path.is_file():
            raise MeasurementError(f"no ONNX file at {path}")
        key = self.cache_key(sha256_file(path))
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
        tuned = self.profile.tvm.tuning_trials > 0
        if tuned:
            report = self._tune(mod, path)
            stages["tune"] = report.seconds
            info["tuning"] = report.to_dict()
        t1 = time.perf_counter()
        ex = self._compile(mod, path, tuned)
        stages["compile"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        self._export(ex, lib, key, path)
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

    def _tune(self, mod: Any, path: Path) -> TuningReport:
        """Tune ``mod`` against the profile's database; a crash of the tuner fails this model, not the study."""
        try:
            return tune_module(mod, self.profile, rpc=self.tune_rpc,
                               session_timeout_s=self.profile.rpc.session_timeout_s)
        except (BackendUnavailable, MeasurementError):
            raise
        except Exception as exc:  # noqa: BLE001 - a tuning crash fails this model, not the study
            err = MeasurementError(f"MetaSchedule tuning failed for {path.name}: {_first_line(exc)}")
            raise err from (exc if os.environ.get("HWPRUNE_DEBUG") else None)

    def _compile(self, mod: Any, path: Path, tuned: bool) -> Any:
        """The Relax executable: with the tuning database's schedules applied when ``tuned``."""
        try:
            if tuned:
                from tvm.s_tir import meta_schedule as ms

                with _file_lock(tuning_db_dir(self.profile) / ".lock"):
                    db = ms.database.JSONDatabase(work_dir=str(tuning_db_dir(self.profile)),
                                                  module_equality="structural")
                return ms.relax_integration.compile_relax(db, mod, self.target, params=None)
            return self.tvm.compile(mod, target=self.target)
        except Exception as exc:  # noqa: BLE001
            raise MeasurementError(f"TVM cannot compile {path.name} for {self.profile.name}: "
                                   f"{_first_line(exc)}") from None

    def _export(self, ex: Any, lib: Path, key: str, path: Path) -> None:
        """Link ``ex`` into ``lib`` (with the cross compiler, if any), atomically."""
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
