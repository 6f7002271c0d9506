"""Measurement backends: ONNX Runtime, TVM (local and over the RPC tracker), ONNX Runtime over SSH, and estimates.

Backends are imported lazily so that a user without TVM installed can still measure with ONNX Runtime.
"""

from __future__ import annotations

import importlib

from hwprune.errors import BackendUnavailable
from hwprune.backends.base import Backend, Capabilities, Latency, Measurement, Memory
from hwprune.profiles import DeviceProfile

# backend name -> (module, class); each class is constructed as cls(profile)
_REGISTRY: dict[str, tuple[str, str]] = {
    "ort": ("hwprune.backends.ort", "OrtBackend"),
    "tvm": ("hwprune.backends.tvm", "TvmBackend"),
    "tvm-rpc": ("hwprune.backends.tvm", "TvmRpcBackend"),
    "ssh-ort": ("hwprune.backends.ssh", "SshOrtBackend"),
    "estimate": ("hwprune.backends.estimate", "EstimateBackend"),
}


def _backend_class(name: str, profile_name: str | None = None) -> type:
    """The class registered under ``name`` (its module imported; TVM itself is only imported when measuring).

    Raises:
        BackendUnavailable: an unknown name, or a module that does not import here.
    """
    try:
        module_name, class_name = _REGISTRY[name]
    except KeyError:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(_REGISTRY)}") from None
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        where = f" (profile {profile_name})" if profile_name else ""
        raise BackendUnavailable(
            f"backend {name!r}{where} is not available in this installation: {exc}. "
            "Install the extras with `pip install -e '.[tvm]'`."
        ) from None


def backend_capabilities(name: str) -> Capabilities:
    """What the backend called ``name`` can do, without constructing it (no device is contacted).

    Raises:
        BackendUnavailable: an unknown name, or a backend whose module does not import here.
    """
    return _backend_class(name).capabilities


def create_backend(profile: DeviceProfile) -> Backend:
    """The backend named by ``profile.backend``, configured from the profile."""
    return _backend_class(profile.backend, profile.name)(profile)


__all__ = ["Backend", "Capabilities", "Latency", "Measurement", "Memory", "backend_capabilities", "create_backend"]
