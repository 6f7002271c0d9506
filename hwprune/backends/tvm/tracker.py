"""TVM RPC tracker wire protocol with timeouts, and bounded remote calls."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from hwprune.backends.tvm._util import _first_line
from hwprune.rpc_local import key_status

TRACKER_FIX = (
    "start a tracker: python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {port}; "
    "on the board: python -m tvm.exec.rpc_server --tracker {host}:{port} --key {key}"
)
SERVER_FIX = "on the board run: python -m tvm.exec.rpc_server --tracker {host}:{port} --key {key}"


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
