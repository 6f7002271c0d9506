"""The ``tvm-rpc`` backend: compile here, measure on a board registered with a TVM RPC tracker."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hwprune.errors import BackendUnavailable, MeasurementError
from hwprune.backends.base import Capabilities, EXPORTER_DYNAMO, Latency, Measurement
from hwprune.profiles import DeviceProfile, load_profile
from hwprune.backends.tvm.target import target_kind, target_threads
from hwprune.backends.tvm.compiler import CompiledModel, TvmCompiler
from hwprune.backends.tvm.vm import _device, _extra, _graph_memory, _ordered_args, _outputs, _time_vm
from hwprune.backends.tvm.tracker import (
    SERVER_FIX,
    TRACKER_FIX,
    _RemoteFailure,
    _oserror,
    _request_session,
    _rpc_reason,
    _run_bounded,
)
from hwprune.rpc_local import key_status, parse_hostport, tracker_summary

# a session that outlives the tracker wait plus the server's session timeout by this much (at most the session timeout
# itself) is a board that hangs without closing its socket: the server's own timeout would have ended it
HUNG_GRACE_S = 15.0


class TvmRpcBackend:
    """Measure on a board registered with a TVM RPC tracker under ``profile.rpc.key``.

    The model is compiled here (cross-compiled with the profile's compiler), uploaded, loaded into a VM on the board
    and timed there by ``time_evaluator`` (so network time is not part of the latency). Stage times: ``compile``
    (plus ``tune``), ``connect``, ``upload``, ``load``, ``timing``. A tracker that is down or a key without a board
    at construction -> :class:`BackendUnavailable` (with the commands that fix it); a failure while measuring ->
    :class:`MeasurementError` with a one-line reason, after ``profile.rpc.retries`` retries with backoff.
    """

    name = "tvm-rpc"
    capabilities = Capabilities(exporter=EXPORTER_DYNAMO, settings=("tvm", "rpc"))

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
        deadline = wait_s + r.session_timeout_s + min(HUNG_GRACE_S, r.session_timeout_s)
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
