"""TVM targets from device profiles: resolved target dicts, their signature, the tuning database folder,
whether a target runs here, and the cross compiler that links libraries for a board."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
from pathlib import Path
from typing import Any

from hwprune.errors import BackendUnavailable
from hwprune.profiles import DeviceProfile
from hwprune.backends.tvm._util import _canonical, _first_line, _safe, _tvm, profile_cache_dir


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
