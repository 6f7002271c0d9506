"""Measurement backends: ONNX Runtime, TVM (local and over the RPC tracker), ONNX Runtime over SSH, and estimates.

Backends are imported lazily so that a user without TVM installed can still measure with ONNX Runtime.
"""

from __future__ import annotations

import importlib

from hwprune.errors import BackendUnavailable
from hwprune.backends.base import Backend, Latency, Measurement, Memory
from hwprune.profiles import DeviceProfile

# backend name -> (module, class); each class is constructed as cls(profile)
_REGISTRY: dict[str, tuple[str, str]] = {
    "ort": ("hwprune.backends.ort", "OrtBackend"),
    "tvm": ("hwprune.backends.tvm", "TvmBackend"),
    "tvm-rpc": ("hwprune.backends.tvm", "TvmRpcBackend"),
    "ssh-ort": ("hwprune.backends.ssh", "SshOrtBackend"),
    "estimate": ("hwprune.backends.estimate", "EstimateBackend"),
}


def create_backend(profile: DeviceProfile) -> Backend:
    """The backend named by ``profile.backend``, configured from the profile."""
    try:
        module_name, class_name = _REGISTRY[profile.backend]
    except KeyError:
        raise BackendUnavailable(
            f"unknown backend {profile.backend!r}; choose one of {', '.join(_REGISTRY)}"
        ) from None
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        raise BackendUnavailable(
            f"backend {profile.backend!r} (profile {profile.name}) is not available in this installation: {exc}. "
            "Install the extras with `pip install -e '.[tvm]'`."
        ) from None
    return cls(profile)


__all__ = ["Backend", "Latency", "Measurement", "Memory", "create_backend"]
