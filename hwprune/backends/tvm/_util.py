"""Shared helpers of the TVM backends: importing TVM, one-line errors, cache folders, file hashing and locks."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

from hwprune.errors import BackendUnavailable
from hwprune.profiles import DeviceProfile


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
