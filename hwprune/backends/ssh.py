"""ONNX Runtime on a remote board over SSH (``ssh-ort``): for runtimes TVM does not cover (ORT with CUDA/TensorRT on a
Jetson, XNNPACK or QNN on a phone running Linux).

Uses the system OpenSSH client (no extra Python dependency). One master connection (``ControlMaster``) is opened when
the backend is created and reused by every copy and run, so a measurement costs no new handshake. Each model is copied
once (named by its sha256) into a private folder on the board, timed there by a small script run with the board's
``python`` (``profile.ssh.python``) and ``onnxruntime``, and the JSON it prints becomes a :class:`Measurement`.

The board needs: ``python3``, ``numpy`` and ``onnxruntime`` (``pip install onnxruntime``, or NVIDIA's
``onnxruntime-gpu`` wheel on a Jetson) and key-based SSH login for the user in the profile.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from hwprune.errors import BackendUnavailable, MeasurementError
from hwprune.backends.base import Capabilities, Latency, Measurement
from hwprune.profiles import DeviceProfile, load_profile
from hwprune.backends.memory import graph_memory
from hwprune.export import sha256_file

# The timing script that runs on the board. Only the standard library, numpy and onnxruntime: nothing of hwprune has
# to be installed there. It prints one JSON object on its last stdout line.
BOARD_SCRIPT = r'''
import json, os, platform, sys, time

def fail(msg):
    print(json.dumps({"error": msg}))
    sys.exit(3)

try:
    import numpy as np
except Exception as exc:
    fail("numpy is not installed on the board (%s): pip install numpy" % exc)
try:
    import onnxruntime as ort
except Exception as exc:
    fail("onnxruntime is not installed on the board (%s): pip install onnxruntime" % exc)

def status_kb(field):
    """A /proc/self/status figure in kB (VmRSS: resident now, VmHWM: peak), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None

cfg = json.loads(sys.argv[1])
if cfg.get("probe"):
    print(json.dumps({"python": sys.version.split()[0], "machine": platform.machine(), "onnxruntime": ort.__version__,
                      "numpy": np.__version__, "available_providers": ort.get_available_providers()}))
    sys.exit(0)

available = ort.get_available_providers()
missing = [p for p in cfg["providers"] if p not in available]
if missing:
    fail("onnxruntime on the board lacks %s (available: %s)" % (", ".join(missing), ", ".join(available)))
levels = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "all": "ORT_ENABLE_ALL"}
so = ort.SessionOptions()
so.intra_op_num_threads = cfg["intra_op_threads"]
so.inter_op_num_threads = cfg["inter_op_threads"]
so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, levels.get(cfg["opt_level"], "ORT_ENABLE_ALL"))
so.log_severity_level = 3
rss0 = status_kb("VmRSS")
t0 = time.perf_counter()
try:
    sess = ort.InferenceSession(cfg["model"], so, providers=cfg["providers"])
except Exception as exc:
    fail("onnxruntime cannot load the model: %s" % str(exc).strip().splitlines()[0])
load_s = time.perf_counter() - t0

np_types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
            "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
            "tensor(bool)": np.bool_}
if cfg.get("inputs"):
    data = np.load(cfg["inputs"])
    feed = {i.name: data[i.name] for i in sess.get_inputs()}
else:
    rng = np.random.default_rng(0)
    feed = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        dt = np_types.get(i.type, np.float32)
        if np.issubdtype(dt, np.floating):
            feed[i.name] = rng.standard_normal(shape).astype(dt)
        else:
            feed[i.name] = rng.integers(0, 10, size=shape).astype(dt)
try:
    outs = sess.run(None, feed)
except Exception as exc:
    fail("onnxruntime failed to run the model: %s" % str(exc).strip().splitlines()[0])
if cfg.get("outputs"):
    np.savez(cfg["outputs"], *outs)
    print(json.dumps({"outputs": len(outs), "providers": sess.get_providers()}))
    sys.exit(0)

if cfg.get("profile_runs"):
    # ONNX Runtime's own profiler on the board: the kernel events of warm-up + profile_runs runs and the run markers
    # (what hwprune.backends.ort.parse_node_trace reads), without the rest of the trace
    so.enable_profiling = True
    so.profile_file_prefix = cfg["profile_prefix"]
    try:
        psess = ort.InferenceSession(cfg["model"], so, providers=cfg["providers"])
        for _ in range(max(1, cfg["warmup"]) + cfg["profile_runs"]):
            psess.run(None, feed)
    except Exception as exc:
        fail("onnxruntime failed to profile the model: %s" % str(exc).strip().splitlines()[0])
    trace = psess.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    os.remove(trace)
    if isinstance(events, dict):
        events = events.get("traceEvents", [])
    keep = []
    for e in events:
        if not isinstance(e, dict):
            continue
        kernel = e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")
        if kernel or (e.get("cat") == "Session" and e.get("name") == "model_run"):
            keep.append({"cat": e.get("cat"), "name": e.get("name"), "ts": e.get("ts", 0), "dur": e.get("dur", 0),
                         "args": {"op_name": (e.get("args") or {}).get("op_name", "")}})
    print(json.dumps({"events": keep, "onnxruntime": ort.__version__}))
    sys.exit(0)

run = sess.run
threads = cfg["intra_op_threads"]
cpu_clock = time.thread_time_ns if threads <= 1 else time.process_time_ns
for _ in range(cfg["warmup"]):
    run(None, feed)
number = 1
if cfg["min_repeat_ms"] > 0:
    while True:
        t = time.perf_counter()
        for _ in range(number):
            run(None, feed)
        ms = (time.perf_counter() - t) * 1e3
        if ms >= cfg["min_repeat_ms"] or number >= 1000000:
            break
        number = min(1000000, max(number * 2, int(number * cfg["min_repeat_ms"] / max(ms, 1e-6) * 1.1) + 1))

def take():
    wall, cpu = [], []
    for _ in range(cfg["repeats"]):
        c0 = cpu_clock(); t0 = time.perf_counter_ns()
        for _ in range(number):
            run(None, feed)
        t1 = time.perf_counter_ns(); c1 = cpu_clock()
        wall.append((t1 - t0) / 1e6 / number); cpu.append((c1 - c0) / 1e6 / number)
    return wall, cpu

def cv(xs):
    a = np.asarray(xs); m = a.mean()
    return float(a.std(ddof=1) / m) if a.size > 1 and m > 0 else 0.0

t1 = time.perf_counter()
best = None
attempts = 0
while True:
    wall, cpu = take()
    if best is None or cv(wall) < cv(best[0]):
        best = (wall, cpu)
    if cv(best[0]) <= cfg["max_cv"] or attempts >= cfg["remeasure"]:
        break
    attempts += 1
timing_s = time.perf_counter() - t1
hwm = status_kb("VmHWM")
print(json.dumps({
    "samples_ms": best[0], "cpu_ms": best[1], "number": number, "remeasured": attempts,
    "providers": sess.get_providers(), "onnxruntime": ort.__version__, "python": sys.version.split()[0],
    "machine": platform.machine(), "load_s": load_s, "timing_s": timing_s,
    "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    "process_peak_mb": (hwm - rss0) * 1024 / 1e6 if hwm is not None and rss0 is not None else None,
    "cpu_clock": "thread" if threads <= 1 else "process",
}))
'''


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                return json.loads(line)
    return None


def _tail(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


class SshOrtBackend:
    """Measure with ONNX Runtime on a board reached over SSH (host/user/port/key from ``profile.ssh``).

    ``ssh_options`` (or ``$HWPRUNE_SSH_OPTIONS``, shell-split) are extra ``ssh``/``scp`` options, e.g.
    ``-o UserKnownHostsFile=...``. ``timeout_s`` bounds every remote command.
    """

    name = "ssh-ort"
    capabilities = Capabilities(node_profile=True, settings=("ort", "ssh"))

    def __init__(self, profile: DeviceProfile | str, *, ssh_options: list[str] | None = None,
                 timeout_s: float = 600.0, connect_timeout_s: int = 10) -> None:
        self.profile = load_profile(profile)
        s = self.profile.ssh
        if not s.host:
            raise BackendUnavailable(
                f"profile {self.profile.name} has no ssh.host; pass --ssh-host HOST [--ssh-user USER "
                "--ssh-key KEYFILE] or set [ssh] host in the profile"
            )
        for tool in ("ssh", "scp"):
            if shutil.which(tool) is None:
                raise BackendUnavailable(f"the OpenSSH client ({tool}) is not installed here; "
                                         "on Debian/Ubuntu: sudo apt-get install openssh-client")
        if s.key_file and not Path(s.key_file).expanduser().is_file():
            raise BackendUnavailable(f"ssh.key_file {s.key_file} does not exist; create a key with "
                                     f"ssh-keygen -t ed25519 -f {s.key_file} and copy it to the board with "
                                     f"ssh-copy-id -i {s.key_file}.pub {self.destination}")
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        extra = list(ssh_options or []) + shlex.split(os.environ.get("HWPRUNE_SSH_OPTIONS", ""))
        # The control socket path must stay short (unix sockets allow ~100 bytes).
        self._local = tempfile.mkdtemp(prefix="hwprune-ssh-")
        self._control = os.path.join(self._local, "cm")
        common = [
            "-o", "BatchMode=yes",  # never prompt for a password: a board without key login is a clear error
            "-o", f"ConnectTimeout={connect_timeout_s}",
            "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",  # a vanished board fails in ~15 s
            "-o", "StrictHostKeyChecking=accept-new",
            "-o", f"ControlPath={self._control}",
        ]
        if s.key_file:
            common += ["-i", str(Path(s.key_file).expanduser()), "-o", "IdentitiesOnly=yes"]
        self._ssh_opts = common + ["-p", str(s.port)] + extra
        self._scp_opts = common + ["-P", str(s.port)] + extra
        self._remote_dir: str | None = None
        self._uploaded: set[str] = set()
        self._master: bool = False
        self._open()

    # -- connection -------------------------------------------------------------------------------------------------

    @property
    def destination(self) -> str:
        s = self.profile.ssh
        return f"{s.user}@{s.host}" if s.user else s.host

    def _where(self) -> str:
        return f"{self.destination}:{self.profile.ssh.port}"

    def fix_text(self) -> str:
        s = self.profile.ssh
        key = s.key_file or "~/.ssh/id_ed25519"
        return (f"check that the board is on and reachable (ssh -p {s.port} {self.destination} true), that key login "
                f"works (ssh-copy-id -i {key}.pub -p {s.port} {self.destination}), and the [ssh] host/user/port/"
                "key_file of the profile (or --ssh-host/--ssh-user/--ssh-key)")

    def _open(self) -> None:
        """Start the master connection (ControlMaster) and make the board-side work folder."""
        # ControlPersist with an idle limit: if this process dies without close(), the master exits by itself.
        # (Commands after an idle expiry simply connect directly: ControlMaster=no falls back to a new connection.)
        cmd = ["ssh", *self._ssh_opts, "-o", "ControlMaster=yes", "-o", "ControlPersist=900", "-f", "-N",
               self.destination]
        try:
            # -f: ssh forks into the background after authenticating; output goes to files, not to pipes, so this
            # call does not wait on the background master.
            with open(os.path.join(self._local, "master.log"), "wb") as logf:
                proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                      timeout=self.connect_timeout_s + 20)
        except subprocess.TimeoutExpired:
            self._cleanup_local()
            raise BackendUnavailable(f"ssh to {self._where()} timed out; {self.fix_text()}") from None
        if proc.returncode != 0:
            reason = _tail(Path(self._local, "master.log").read_text(errors="replace"))
            self._cleanup_local()
            reason = reason or f"exit {proc.returncode}"
            raise BackendUnavailable(f"cannot log in to {self._where()} over ssh ({reason}); {self.fix_text()}")
        self._master = True
        r = self._ssh("mktemp -d /tmp/hwprune-ort.XXXXXX", timeout=60)
        if r.returncode != 0:
            self.close()
            raise BackendUnavailable(f"cannot create a work folder on {self._where()}: {_tail(r.stderr)}")
        self._remote_dir = r.stdout.strip().splitlines()[-1]
        self._put_text(BOARD_SCRIPT, "hwprune_ort_timer.py")

    def _ssh(self, command: str, *, timeout: float | None = None, input_text: str | None = None
             ) -> subprocess.CompletedProcess[str]:
        cmd = ["ssh", *self._ssh_opts, "-o", "ControlMaster=no", self.destination, command]
        try:
            if input_text is not None:
                return subprocess.run(cmd, input=input_text, capture_output=True, text=True,
                                      timeout=timeout or self.timeout_s)
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout or self.timeout_s,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise MeasurementError(f"ssh-ort: {self._where()} did not finish {command.split()[0]!r} within "
                                   f"{timeout or self.timeout_s:.0f} s") from None

    def _put_text(self, text: str, name: str) -> None:
        assert self._remote_dir is not None
        r = self._ssh(f"cat > {shlex.quote(self._remote_dir + '/' + name)}", input_text=text, timeout=60)
        if r.returncode != 0:
            raise MeasurementError(f"ssh-ort: cannot write {name} on {self._where()}: {_tail(r.stderr)}")

    def _scp(self, src: str, dst: str, timeout: float | None = None) -> None:
        cmd = ["scp", "-q", *self._scp_opts, "-o", "ControlMaster=no", src, dst]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout or self.timeout_s,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise MeasurementError(f"ssh-ort: copying to/from {self._where()} timed out") from None
        if r.returncode != 0:
            raise MeasurementError(f"ssh-ort: copy to/from {self._where()} failed: {_tail(r.stderr)}")

    def _remote(self, name: str) -> str:
        assert self._remote_dir is not None
        return f"{self._remote_dir}/{name}"

    def _upload_model(self, path: Path) -> tuple[str, float]:
        digest = sha256_file(path)
        name = f"m-{digest[:24]}.onnx"
        t0 = time.perf_counter()
        if digest not in self._uploaded:
            if path.with_name(f"{path.name}.data").exists():
                raise MeasurementError(f"ssh-ort: {path.name} keeps its weights in an external file; models over "
                                       "2 GB are not supported over ssh")
            self._scp(str(path), f"{self.destination}:{self._remote(name)}")
            self._uploaded.add(digest)
        return self._remote(name), time.perf_counter() - t0

    def _run_script(self, cfg: dict[str, Any]) -> dict[str, Any]:
        py = self.profile.ssh.python or "python3"
        command = f"{py} {shlex.quote(self._remote('hwprune_ort_timer.py'))} {shlex.quote(json.dumps(cfg))}"
        last = ""
        for attempt in range(3):
            r = self._ssh(command)
            data = _last_json(r.stdout)
            if data is not None and "error" in data:
                raise MeasurementError(f"ssh-ort ({self._where()}): {data['error']}")
            if r.returncode == 0 and data is not None:
                return data
            if r.returncode == 127 or "not found" in r.stderr:
                raise MeasurementError(f"ssh-ort ({self._where()}): the board has no {py!r}; set ssh.python in the "
                                       "profile to the board's Python 3 that has onnxruntime")
            last = _tail(r.stderr) or _tail(r.stdout) or f"exit {r.returncode}"
            if r.returncode != 255 or attempt == 2:  # 255 = ssh itself failed (connection); others do not heal
                break
            time.sleep(1.0 * 2 ** attempt)
        raise MeasurementError(f"ssh-ort ({self._where()}): {last}")

    def _cfg(self, model: str) -> dict[str, Any]:
        o, m = self.profile.ort, self.profile.measure
        return {"model": model, "providers": list(self.profile.ssh.providers) or ["CPUExecutionProvider"],
                "intra_op_threads": o.intra_op_threads, "inter_op_threads": o.inter_op_threads,
                "opt_level": o.graph_optimization_level, "warmup": m.warmup, "repeats": m.repeats,
                "min_repeat_ms": m.min_repeat_ms, "max_cv": m.max_cv, "remeasure": m.remeasure}

    # -- protocol ---------------------------------------------------------------------------------------------------

    def probe(self) -> dict[str, Any]:
        """Python, machine, onnxruntime version and available providers on the board."""
        return self._run_script({"probe": True})

    def measure(self, onnx_path: str | os.PathLike[str], inputs: dict[str, np.ndarray] | None = None) -> Measurement:
        """Copy the model (once), time it on the board with ORT, and parse the result."""
        path = Path(onnx_path)
        if not path.is_file():
            raise MeasurementError(f"no ONNX file at {path}")
        remote_model, upload_s = self._upload_model(path)
        cfg = self._cfg(remote_model)
        if inputs is not None:
            cfg["inputs"] = self._upload_inputs(inputs)
        t0 = time.perf_counter()
        data = self._run_script(cfg)
        wall = time.perf_counter() - t0
        m = self.profile.measure
        lat = Latency.from_samples(data["samples_ms"], warmup=m.warmup, cpu_samples_ms=data.get("cpu_ms"))
        lat.remeasured = int(data.get("remeasured", 0))
        lat.noisy = lat.robust_cv > m.max_cv
        memory = graph_memory(str(path))
        memory.process_peak_mb = data.get("process_peak_mb")
        load_avg = tuple(data["load_avg"]) if data.get("load_avg") else None
        return Measurement(
            backend=self.name, device=self.profile.name, latency=lat, memory=memory,
            threads=self.profile.ort.intra_op_threads, estimated=False, tuned=None,
            load_avg=load_avg,  # type: ignore[arg-type]
            stage_seconds={"upload": upload_s, "session": float(data.get("load_s", 0.0)),
                           "timing": float(data.get("timing_s", 0.0)),
                           "remote_overhead": max(0.0, wall - float(data.get("load_s", 0.0))
                                                  - float(data.get("timing_s", 0.0)))},
            extra={"onnxruntime": data.get("onnxruntime"), "providers": data.get("providers"),
                   "board_python": data.get("python"), "board_machine": data.get("machine"),
                   "ssh": self._where(), "calls_per_sample": data.get("number"), "cpu_clock": data.get("cpu_clock")},
        )

    def node_profile(self, onnx_path: str | os.PathLike[str], runs: int = 20,
                     inputs: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        """Per-node latency from ONNX Runtime's profiler on the board, in the format of
        :func:`hwprune.backends.ort.node_profile` (the median over ``runs`` runs after the warm-up)."""
        from hwprune.backends.ort import parse_node_trace

        path = Path(onnx_path)
        if not path.is_file():
            raise MeasurementError(f"no ONNX file at {path}")
        if runs < 1:
            raise ValueError("runs must be at least 1")
        remote_model, _ = self._upload_model(path)
        cfg = self._cfg(remote_model)
        cfg.update(profile_runs=runs, profile_prefix=self._remote("ort_profile"))
        if inputs is not None:
            cfg["inputs"] = self._upload_inputs(inputs)
        data = self._run_script(cfg)
        warmup = max(1, self.profile.measure.warmup)
        return {"backend": self.name, "runs": runs, "nodes": parse_node_trace(data.get("events", []), runs, warmup)}

    def _upload_inputs(self, inputs: dict[str, np.ndarray]) -> str:
        with tempfile.TemporaryDirectory(prefix="hwprune-ssh-in-") as tmp:
            local = os.path.join(tmp, "inputs.npz")
            np.savez(local, **{k: np.ascontiguousarray(v) for k, v in inputs.items()})
            remote = self._remote(f"inputs-{os.getpid()}-{time.monotonic_ns()}.npz")
            self._scp(local, f"{self.destination}:{remote}")
        return remote

    def run(self, onnx_path: str | os.PathLike[str], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run once on the board with the given inputs and bring the outputs back."""
        path = Path(onnx_path)
        remote_model, _ = self._upload_model(path)
        cfg = self._cfg(remote_model)
        cfg["inputs"] = self._upload_inputs(inputs)
        cfg["outputs"] = self._remote(f"outputs-{os.getpid()}-{time.monotonic_ns()}.npz")
        self._run_script(cfg)
        with tempfile.TemporaryDirectory(prefix="hwprune-ssh-out-") as tmp:
            local = os.path.join(tmp, "outputs.npz")
            self._scp(f"{self.destination}:{cfg['outputs']}", local)
            with np.load(local) as data:
                return [data[f"arr_{i}"] for i in range(len(data.files))]

    def close(self) -> None:
        """Remove the board-side folder and end the master connection."""
        if self._master:
            if self._remote_dir:
                with contextlib.suppress(Exception):
                    self._ssh(f"rm -rf {shlex.quote(self._remote_dir)}", timeout=30)
            with contextlib.suppress(Exception):
                subprocess.run(["ssh", *self._ssh_opts, "-O", "exit", self.destination], capture_output=True,
                               timeout=15, stdin=subprocess.DEVNULL)
            self._master = False
            self._remote_dir = None
        self._cleanup_local()

    def _cleanup_local(self) -> None:
        shutil.rmtree(self._local, ignore_errors=True)

    def __enter__(self) -> "SshOrtBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


__all__ = ["BOARD_SCRIPT", "SshOrtBackend"]
