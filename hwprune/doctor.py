"""``hwprune doctor``: can this profile measure? Each check says what it found and, when it fails, how to fix it.

For ``tvm-rpc``: TVM imports, the cross compiler exists, the tracker answers, a board is registered under the key
(queue status), and a tiny model compiled here runs on the board with outputs equal to ONNX Runtime's on the host.
For ``ssh-ort``: SSH login, the board's python with onnxruntime and the profile's providers, a tiny model run.
For ``ort`` / ``tvm`` (local): imports and a tiny model run (TVM's outputs checked against ONNX Runtime).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hwprune.errors import HwpruneError
from hwprune.backends.ort import OrtBackend
from hwprune.backends.ssh import SshOrtBackend
from hwprune.backends.tvm import (
    SERVER_FIX,
    TRACKER_FIX,
    TvmBackend,
    TvmRpcBackend,
    cost_model_name,
    cross_compiler_path,
    tuning_db_dir,
    tvm_versions,
)
from hwprune.export import input_feed
from hwprune.rpc_local import key_status, parse_hostport, tracker_summary
from hwprune.profiles import DeviceProfile, load_profile


@dataclass
class Check:
    """One diagnostic: ``ok`` with what was found (``detail``) and, if not ok, what to do (``fix``)."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "fix": self.fix}


def write_tiny_model(path: str | os.PathLike[str], *, channels: int = 8, size: int = 16, seed: int = 0) -> Path:
    """A tiny CNN as ONNX (Conv 3->C 3x3, Relu, Conv C->C stride 2, Relu, GlobalAveragePool, Flatten, Gemm -> 10).

    Built with ``onnx.helper`` (no torch, no exporter), static shapes, opset 17: it imports into every backend.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int) -> Any:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    c = channels
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["output"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "hwprune_tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 10])],
        [init("w1", c, 3, 3, 3), init("b1", c), init("w2", c, c, 3, 3), init("b2", c), init("w3", 10, c),
         init("b3", 10)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="hwprune")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _attempt(checks: list[Check], name: str, fn: Callable[[], str], fix: str | Callable[[BaseException], str]
             ) -> bool:
    """Run one check; an exception becomes a failed Check with its first line (never a traceback)."""
    try:
        detail = fn()
        checks.append(Check(name, True, detail))
        return True
    except Exception as exc:  # noqa: BLE001 - a doctor reports every failure as a line
        f = fix(exc) if callable(fix) else fix
        checks.append(Check(name, False, _reason(exc), f))
        return False


def _ort_reference(model: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _compare(out: list[np.ndarray], ref: list[np.ndarray]) -> float:
    err = max(float(np.max(np.abs(a - b))) for a, b in zip(out, ref))
    if not np.isfinite(err) or err > 1e-3:
        raise RuntimeError(f"outputs differ from ONNX Runtime on the host by {err:.3g} (tolerance 1e-3)")
    return err


def _tvm_import_check(checks: list[Check]) -> bool:
    def go() -> str:
        v = tvm_versions()
        detail = f"apache-tvm {v.get('tvm')}, apache-tvm-ffi {v.get('tvm_ffi', '?')}"
        if v.get("tvm_ffi", "").startswith("0.1.15"):
            raise RuntimeError(detail + ": MetaSchedule segfaults with apache-tvm-ffi 0.1.15.x")
        return detail

    return _attempt(checks, "tvm installed", go,
                    "pip install 'apache-tvm==0.27.0.post1' 'apache-tvm-ffi==0.1.14.post1' tornado cloudpickle psutil")


def _tuning_check(checks: list[Check], profile: DeviceProfile) -> None:
    trials = profile.tvm.tuning_trials
    if trials > 0:
        db = tuning_db_dir(profile)
        n = 0
        with contextlib.suppress(OSError):
            n = sum(1 for _ in open(db / "database_tuning_record.json"))
        checks.append(Check("tvm tuning", True, f"MetaSchedule, {trials} trials per candidate, cost model "
                                                f"{cost_model_name()}, database {db} ({n} records)"))
    else:
        checks.append(Check("tvm tuning", True, "untuned (tvm.tuning_trials = 0): TVM latencies will be labelled "
                                                "untuned and are not representative of a deployed model; set "
                                                "tvm.tuning_trials > 0 to rank on them"))


def _doctor_ort(profile: DeviceProfile, model: Path, feed: dict[str, np.ndarray], checks: list[Check]) -> None:
    def imp() -> str:
        import onnxruntime as ort

        missing = [p for p in profile.ort.providers if p not in ort.get_available_providers()]
        if missing:
            raise RuntimeError(f"onnxruntime {ort.__version__} lacks {', '.join(missing)}")
        return f"onnxruntime {ort.__version__}, providers {', '.join(profile.ort.providers)}"

    if not _attempt(checks, "onnxruntime installed", imp,
                    "pip install onnxruntime (or the package with the profile's providers)"):
        return

    def run() -> str:
        m = OrtBackend(profile).measure(model)
        return f"tiny model: median {m.latency.median_ms:.3f} ms over {m.latency.repeats} runs"

    _attempt(checks, "tiny model runs", run, "see the error above; HWPRUNE_DEBUG=1 shows more")


def _doctor_tvm(profile: DeviceProfile, model: Path, feed: dict[str, np.ndarray], checks: list[Check]) -> None:
    if not _tvm_import_check(checks):
        return
    _tuning_check(checks, profile)
    untuned = profile.with_overrides(tvm__tuning_trials=0)  # a doctor must not spend minutes tuning

    def run() -> str:
        backend = TvmBackend(untuned)
        err = _compare(backend.run(model, feed), _ort_reference(model, feed))
        m = backend.measure(model)
        return (f"tiny model compiled for {profile.tvm.target} and run: max |TVM - ORT| = {err:.1e}, "
                f"median {m.latency.median_ms:.3f} ms (untuned)")

    _attempt(checks, "tiny model compiles and runs", run,
             lambda e: "use --backend tvm-rpc for a board" if "cannot run on this" in str(e)
             else "see the error above; HWPRUNE_DEBUG=1 shows more")


def lan_address() -> str | None:
    """This host's address on its network as best guessed (the source address of its default route), or None.

    A UDP socket's connect only picks the outgoing interface: no packet is sent. 192.0.2.1 is TEST-NET-1 (RFC 5737),
    an address no host has, so a guess never depends on one answering.
    """
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            address = s.getsockname()[0]
    except OSError:  # no route at all: no network to guess an address on
        return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def board_tracker(host: str) -> tuple[str, str]:
    """The tracker host a board's ``rpc_server --tracker`` should name, and a note on it ('' when none is needed).

    hwprune on this host may reach the tracker at 127.0.0.1, but that is the board's own loopback on the board: there
    the tracker is this host's LAN address.
    """
    if not _is_loopback(host):
        return host, ""
    lan = lan_address()
    if lan is None:
        return "HOST_IP", (f" (HOST_IP: this host's address as the board reaches it; {host} works only for an "
                           "rpc_server on this host)")
    return lan, (f" ({lan} is this host's LAN address as best guessed: replace it if the board reaches this host at "
                 f"another; {host} works only for an rpc_server on this host)")


def _doctor_tvm_rpc(profile: DeviceProfile, model: Path, feed: dict[str, np.ndarray], checks: list[Check]) -> None:
    if not _tvm_import_check(checks):
        return
    r = profile.rpc
    if not r.tracker or not r.key:
        checks.append(Check("rpc settings", False, f"rpc.tracker = {r.tracker!r}, rpc.key = {r.key!r}",
                            "pass --tracker HOST:PORT --key KEY or set [rpc] tracker and key in the profile"))
        return
    try:
        host, port = parse_hostport(r.tracker)
    except ValueError:
        checks.append(Check("rpc settings", False, f"rpc.tracker {r.tracker!r} is not HOST:PORT",
                            "use the form 192.168.1.10:9190"))
        return
    board_host, note = board_tracker(host)  # the board cannot reach this host's 127.0.0.1
    fix_tracker = TRACKER_FIX.format(host=board_host, port=port, key=r.key) + note

    def cc() -> str:
        path = cross_compiler_path(profile)
        return f"{path} for {profile.tvm.target.get('mtriple', 'the host')}" if path else \
            "none needed (the board has this machine's architecture)"

    cc_ok = _attempt(checks, "cross compiler", cc,
                     lambda e: str(e).split("; ", 1)[-1] if "; " in str(e) else "install the cross compiler")

    summary: dict[str, Any] = {}

    def tracker() -> str:
        summary.update(tracker_summary(host, port, timeout=5.0))
        return f"TVM RPC tracker at {host}:{port} answers"

    if not _attempt(checks, "tracker reachable", tracker, fix_tracker):
        return

    def queue() -> str:
        st = key_status(summary, r.key)
        keys = sorted(summary.get("queue_info", {}))
        if st["total"] == 0:
            raise RuntimeError(f"no board registered under key {r.key!r} (keys seen: {', '.join(keys) or 'none'})")
        return f"key {r.key!r}: {st['total']} board(s), {st['free']} free, {st['pending']} request(s) pending"

    if not _attempt(checks, "board registered", queue, SERVER_FIX.format(host=board_host, port=port, key=r.key) + note):
        return
    if not cc_ok:
        return
    _tuning_check(checks, profile)
    untuned = profile.with_overrides(tvm__tuning_trials=0, measure__repeats=min(profile.measure.repeats, 10),
                                     measure__min_repeat_ms=0.0)

    def run() -> str:
        backend = TvmRpcBackend(untuned)
        t0 = time.perf_counter()
        err = _compare(backend.run(model, feed), _ort_reference(model, feed))
        m = backend.measure(model)
        st = m.stage_seconds
        return (f"tiny model compiled here, run on the board: max |TVM - ORT| = {err:.1e}; median "
                f"{m.latency.median_ms:.3f} ms (untuned); upload {st.get('upload', 0):.2f} s, load "
                f"{st.get('load', 0):.2f} s, total {time.perf_counter() - t0:.1f} s")

    _attempt(checks, "tiny model runs on the board", run,
             "check the board's rpc_server log; the board needs the same apache-tvm version as this host "
             "(pip install apache-tvm==0.27.0.post1 on the board)")


def _doctor_ssh(profile: DeviceProfile, model: Path, feed: dict[str, np.ndarray], checks: list[Check],
                ssh_options: list[str] | None) -> None:
    s = profile.ssh
    if not s.host:
        checks.append(Check("ssh settings", False, "ssh.host is empty",
                            "pass --ssh-host HOST [--ssh-user USER --ssh-key KEYFILE] or set [ssh] in the profile"))
        return
    holder: dict[str, SshOrtBackend] = {}

    def login() -> str:
        holder["b"] = SshOrtBackend(profile, ssh_options=ssh_options)
        return f"logged in to {holder['b'].destination} (port {s.port}) with key authentication"

    if not _attempt(checks, "ssh login", login, lambda e: str(e).split("; ", 1)[-1]):
        return
    backend = holder["b"]
    try:
        def probe() -> str:
            info = backend.probe()
            missing = [p for p in s.providers if p not in info.get("available_providers", [])]
            if missing:
                raise RuntimeError(f"onnxruntime {info.get('onnxruntime')} on the board lacks {', '.join(missing)} "
                                   f"(has {', '.join(info.get('available_providers', []))})")
            return (f"{s.python}: Python {info.get('python')} on {info.get('machine')}, onnxruntime "
                    f"{info.get('onnxruntime')}, providers {', '.join(s.providers)}")

        if not _attempt(checks, "board python + onnxruntime", probe,
                        f"on the board: {s.python} -m pip install numpy onnxruntime (onnxruntime-gpu from NVIDIA's "
                        "Jetson wheels for CUDA/TensorRT); or set ssh.python to the right interpreter"):
            return

        def run() -> str:
            err = _compare(backend.run(model, feed), _ort_reference(model, feed))
            m = backend.measure(model)
            return f"tiny model on the board: max |board - host| = {err:.1e}, median {m.latency.median_ms:.3f} ms"

        _attempt(checks, "tiny model runs on the board", run, "see the error above")
    finally:
        backend.close()


def doctor(profile: DeviceProfile | str, *, ssh_options: list[str] | None = None) -> list[Check]:
    """Diagnose whether ``profile`` (with its ``backend``) can measure; never raises for a broken setup."""
    try:
        profile = load_profile(profile)
    except HwpruneError as exc:
        return [Check("profile", False, str(exc), "hwprune profiles lists the known profiles")]
    checks = [Check("profile", True, f"{profile.name} ({profile.source or 'in memory'}), backend {profile.backend}, "
                                      f"CPU {profile.hardware.cpu}")]
    with tempfile.TemporaryDirectory(prefix="hwprune-doctor-") as tmp:
        model = write_tiny_model(Path(tmp) / "tiny.onnx")
        feed = input_feed(model)
        if profile.backend == "ort":
            _doctor_ort(profile, model, feed, checks)
        elif profile.backend == "tvm":
            _doctor_tvm(profile, model, feed, checks)
        elif profile.backend == "tvm-rpc":
            _doctor_tvm_rpc(profile, model, feed, checks)
        elif profile.backend == "ssh-ort":
            _doctor_ssh(profile, model, feed, checks, ssh_options)
        elif profile.backend == "estimate":
            checks.append(Check("estimate", True, "estimates need no device; every figure is labelled estimated"))
        else:
            checks.append(Check("backend", False, f"unknown backend {profile.backend!r}",
                                "choose one of ort, tvm, tvm-rpc, ssh-ort, estimate"))
    return checks


def format_checks(checks: list[Check]) -> str:
    """Human-readable report: one line per check, the fix indented under each failure, a verdict at the end."""
    lines = []
    for c in checks:
        lines.append(f"[{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"       fix: {c.fix}")
    failed = [c for c in checks if not c.ok]
    lines.append("all checks passed" if not failed else f"{len(failed)} check(s) failed")
    return "\n".join(lines)


__all__ = ["Check", "doctor", "format_checks", "write_tiny_model"]
