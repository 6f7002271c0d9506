"""A TVM RPC tracker and server on 127.0.0.1, started as subprocesses (loopback "board" for tests, benchmarks, demos).

This is TVM's own tracker and server (``python -m tvm.exec.rpc_tracker`` / ``rpc_server``), exactly what a real board
runs, only bound to the loopback interface. Ports are chosen free at runtime so parallel test runs do not collide.

    with LocalRpc(key="local") as rpc:
        profile = load_profile("host-cpu").with_overrides(backend="tvm-rpc", rpc__tracker=rpc.tracker, rpc__key="local")
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hwprune.errors import BackendUnavailable


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def parse_hostport(text: str, default_port: int = 9190) -> tuple[str, int]:
    """``"HOST:PORT"`` (or ``"HOST"``) -> ``(host, port)``; raises ValueError on a malformed port."""
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [ipv6]:port
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
        return host, int(port) if port else default_port
    if text.count(":") == 1:
        host, port = text.split(":")
        return host or "127.0.0.1", int(port)
    return text, default_port


def tracker_summary(host: str, port: int, timeout: float = 5.0) -> dict[str, Any]:
    """The tracker's ``summary()`` (``queue_info`` and ``server_info``), over a socket that cannot hang.

    TVM's own ``connect_tracker`` retries a refused connection for 60 s; a check must answer in seconds.
    Raises OSError (refused, timed out) or RuntimeError (something else answers on that port).
    """
    from tvm.rpc import base

    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
        if magic != base.RPC_TRACKER_MAGIC:
            raise RuntimeError(f"{host}:{port} answers, but it is not a TVM RPC tracker")
        base.sendjson(sock, [base.TrackerCode.SUMMARY])
        value = base.recvjson(sock)
        if value[0] != base.TrackerCode.SUCCESS:
            raise RuntimeError(f"tracker at {host}:{port} returned {value!r}")
        return value[1]


def key_status(summary: dict[str, Any], key: str) -> dict[str, int]:
    """``{"total": servers registered under key, "free": idle ones, "pending": queued requests}``."""
    total = 0
    for item in summary.get("server_info", []):
        k = str(item.get("key", ""))
        if k.split(":", 1)[-1] == key:
            total += 1
    q = summary.get("queue_info", {}).get(key, {})
    return {"total": total, "free": int(q.get("free", 0)), "pending": int(q.get("pending", 0))}


# ``python -m MODULE ARGS`` with torch hidden. TVM's FFI imports torch whenever it is installed (for DLPack
# interop a tracker or a board never uses): 4-5 s of every start on a 2-core host, against 2.5 s for TVM alone. A
# real board has no torch either.
_RUN_WITHOUT_TORCH = ("import runpy, sys; sys.modules['torch'] = None; module = sys.argv[1]; "
                      "sys.argv = [module] + sys.argv[2:]; runpy.run_module(module, run_name='__main__', "
                      "alter_sys=True)")


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    # The server forks per session and imports tvm; keep its logs readable and its output unbuffered.
    env["PYTHONUNBUFFERED"] = "1"
    return env


class LocalRpc:
    """A tracker plus ``servers`` RPC servers registered under ``key``, all on 127.0.0.1.

    ``start()`` returns once every server is listed in the tracker's queue status; ``stop()`` (or leaving the
    ``with`` block) terminates them. ``kill_servers()`` / ``kill_tracker()`` simulate a board or tracker vanishing.
    Logs go to ``log_dir`` (a temporary directory by default). ``python`` is the interpreter of the servers (e.g. an
    AArch64 python under qemu-aarch64, to emulate a Raspberry Pi); the tracker always runs on this interpreter.
    """

    def __init__(self, key: str = "local", servers: int = 1, *, python: str | None = None,
                 log_dir: str | os.PathLike[str] | None = None, start_timeout: float = 60.0,
                 port: int = 0) -> None:
        self.key = key
        self.n_servers = servers
        self.python = python or sys.executable
        self.host = "127.0.0.1"
        self.requested_port = port  # 0: a free port chosen at start
        self.port = 0
        self.start_timeout = start_timeout
        self._tmp = None if log_dir else tempfile.TemporaryDirectory(prefix="hwprune-rpc-")
        self.log_dir = Path(log_dir) if log_dir else Path(self._tmp.name)  # type: ignore[union-attr]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.tracker_proc: subprocess.Popen[bytes] | None = None
        self.server_procs: list[subprocess.Popen[bytes]] = []
        self._killed: set[int] = set()  # pids of servers killed on purpose

    @property
    def tracker(self) -> str:
        """``"127.0.0.1:PORT"``, the value for ``rpc.tracker`` / ``--tracker``."""
        return f"{self.host}:{self.port}"

    def _spawn(self, args: list[str], log_name: str, python: str | None = None) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / log_name, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        try:
            # A new session: stop() can signal the whole group (the server forks a child per RPC session).
            return subprocess.Popen([python or sys.executable, "-c", _RUN_WITHOUT_TORCH, *args], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_python_env(),
                                    start_new_session=True)
        finally:
            log.close()

    def start_tracker(self) -> None:
        """Start the tracker on a free port and wait until it answers."""
        self.port = self.requested_port or free_port(self.host)
        # --port-end = port + 1: the tracker must bind exactly this port, not search for another one.
        self.tracker_proc = self._spawn(["tvm.exec.rpc_tracker", "--host", self.host, "--port", str(self.port),
                                         "--port-end", str(self.port + 1), "--silent"], "tracker.log")
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                tracker_summary(self.host, self.port, timeout=2.0)
                return
            except (OSError, RuntimeError) as exc:
                if self.tracker_proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise BackendUnavailable(f"the local TVM RPC tracker did not start ({exc}); see "
                                             f"{self.log_dir / 'tracker.log'}") from None
                time.sleep(0.2)

    def start_server(self) -> subprocess.Popen[bytes]:
        """Start one more RPC server registered under ``key`` (waits for its registration)."""
        idx = len(self.server_procs)
        before = self.status()["total"]
        port = free_port(self.host)
        proc = self._spawn(["tvm.exec.rpc_server", "--tracker", self.tracker, "--key", self.key,
                            "--host", self.host, "--port", str(port), "--port-end", str(port + 1)],
                           f"server-{idx}.log", python=self.python)
        self.server_procs.append(proc)
        self.wait_for_servers(before + 1)
        return proc

    def start(self) -> "LocalRpc":
        """Start the tracker and the servers; returns when all servers are registered.

        A server that does not register stops everything started so far (its log stays for the error message):
        ``with LocalRpc(...)`` never reaches ``__exit__`` when ``__enter__`` raises.
        """
        self.start_tracker()
        try:
            for _ in range(self.n_servers):
                self.start_server()
        except BaseException:
            self.stop()
            raise
        return self

    def status(self) -> dict[str, int]:
        """Queue status of ``key``: total / free servers and pending requests."""
        return key_status(tracker_summary(self.host, self.port), self.key)

    def wait_for_servers(self, count: int, timeout: float | None = None) -> None:
        """Block until ``count`` servers are registered under ``key`` (raises BackendUnavailable on timeout)."""
        deadline = time.monotonic() + (timeout or self.start_timeout)
        last = None
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, RuntimeError):
                last = self.status()
                if last["total"] >= count and last["free"] >= count:
                    return
            # a server that died by itself will never register (one killed on purpose is not waited for)
            dead = [p for p in self.server_procs if p.poll() is not None and p.pid not in self._killed]
            if dead:
                break
            time.sleep(0.2)
        logs = ", ".join(str(self.log_dir / f"server-{i}.log") for i in range(len(self.server_procs)))
        raise BackendUnavailable(f"the local TVM RPC server did not register with the tracker (status {last}); "
                                 f"see {logs}")

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)  # the server's forked session children die with it
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # TVM runs the tracker and server loops in a popen_worker child that ignores SIGTERM; the group was created
        # for this process alone (start_new_session), so whatever is left of it goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def kill_servers(self, sig: int = signal.SIGKILL) -> None:
        """Kill every server (a board vanishing); the tracker notices the closed connection."""
        for p in self.server_procs:
            self._killed.add(p.pid)
            self._kill(p, sig)

    def kill_tracker(self, sig: int = signal.SIGKILL) -> None:
        """Kill the tracker (servers keep running, but no new session can be requested)."""
        if self.tracker_proc is not None:
            self._kill(self.tracker_proc, sig)

    def stop(self) -> None:
        """Terminate the servers and the tracker."""
        for p in self.server_procs:
            self._kill(p)
        if self.tracker_proc is not None:
            self._kill(self.tracker_proc)

    def close(self) -> None:
        """Stop everything and remove the temporary log directory."""
        self.stop()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()

    def __enter__(self) -> "LocalRpc":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m hwprune.rpc_local [--key K] [--servers N] [--port P]``: loopback tracker + servers until Ctrl-C."""
    import argparse

    ap = argparse.ArgumentParser(description="Start a TVM RPC tracker and server(s) on 127.0.0.1 (loopback board).")
    ap.add_argument("--key", default="local")
    ap.add_argument("--servers", type=int, default=1)
    ap.add_argument("--port", type=int, default=0, help="tracker port (default: a free one)")
    args = ap.parse_args(argv)

    def _stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # Ctrl-C and `kill` both stop the tracker and servers (a shell's background job otherwise ignores SIGINT).
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    rpc = LocalRpc(args.key, args.servers, log_dir=None, port=args.port)
    try:
        rpc.start()
        print(f"tracker {rpc.tracker}, {args.servers} server(s) under key {args.key!r}; Ctrl-C to stop", flush=True)
        print(f"  hwprune measure MODEL.onnx --device host-cpu --backend tvm-rpc --tracker {rpc.tracker} "
              f"--key {args.key}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    except BackendUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        rpc.close()


if __name__ == "__main__":
    raise SystemExit(main())
