"""The ssh-ort backend against a real OpenSSH server started on 127.0.0.1 (throwaway host and user keys).

The "board" is this machine: its python is this test's interpreter, so ONNX Runtime there is the one installed here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hwprune.errors import BackendUnavailable, MeasurementError
from hwprune.profiles import load_profile

SSHD = shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.path.exists(p)), None)

pytestmark = [
    pytest.mark.skipif(SSHD is None, reason="OpenSSH server (sshd) is not installed: apt-get install openssh-server"),
    pytest.mark.skipif(shutil.which("ssh") is None or shutil.which("ssh-keygen") is None,
                       reason="OpenSSH client (ssh, ssh-keygen) is not installed: apt-get install openssh-client"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSshd:
    """sshd on 127.0.0.1:<free port> with a throwaway host key, accepting one throwaway user key."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.user = os.environ.get("USER") or __import__("getpass").getuser()
        self.host_key = root / "ssh_host_ed25519_key"
        self.user_key = root / "id_ed25519"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "LocalSshd":
        for key in (self.host_key, self.user_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        (self.root / "authorized_keys").write_text(Path(f"{self.user_key}.pub").read_text())
        os.chmod(self.root / "authorized_keys", 0o600)
        config = self.root / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
            f"PidFile {self.root / 'sshd.pid'}",
            "StrictModes no",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            "AllowTcpForwarding no",
            "X11Forwarding no",
            "LogLevel ERROR",
            "Subsystem sftp internal-sftp",
            "",
        ]))
        if os.geteuid() == 0:
            # sshd's privilege separation needs this directory when started as root.
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        # -D: stay in the foreground (we own the process); -e: log to stderr (our log file).
        log = open(self.root / "sshd.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.root / 'sshd.log').read_text()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.1)
        raise RuntimeError("sshd did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def profile(self, **overrides: object):
        settings: dict[str, object] = {
            "backend": "ssh-ort", "ssh__host": "127.0.0.1", "ssh__port": self.port, "ssh__user": self.user,
            "ssh__key_file": str(self.user_key), "ssh__python": sys.executable,
            "measure__warmup": 2, "measure__repeats": 10}
        settings.update(overrides)
        return load_profile("host-cpu").with_overrides(**settings)

    def options(self) -> list[str]:
        # Keep the throwaway host key out of the user's ~/.ssh/known_hosts.
        return ["-o", f"UserKnownHostsFile={self.root / 'known_hosts'}"]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hwprune.doctor import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("sshd")
    server = LocalSshd(root)
    try:
        server.start()
    except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"cannot start a local sshd here: {exc}")
    yield server
    server.stop()


def test_ssh_ort_measures_and_matches_local_ort(sshd: LocalSshd, tiny_onnx: Path) -> None:
    from hwprune.export import input_feed
    from hwprune.backends.ort import OrtBackend
    from hwprune.backends.ssh import SshOrtBackend

    profile = sshd.profile()
    with SshOrtBackend(profile, ssh_options=sshd.options()) as backend:
        info = backend.probe()
        assert "CPUExecutionProvider" in info["available_providers"]
        m1 = backend.measure(tiny_onnx)
        m2 = backend.measure(tiny_onnx)  # same model: not copied again, same master connection
        feed = input_feed(tiny_onnx)
        remote_out = backend.run(tiny_onnx, feed)
    local_out = OrtBackend(load_profile("host-cpu")).run(tiny_onnx, feed)
    np.testing.assert_allclose(remote_out[0], local_out[0], rtol=1e-5, atol=1e-6)
    for m in (m1, m2):
        assert m.backend == "ssh-ort" and m.device == "host-cpu" and not m.estimated
        assert m.latency.repeats == 10 and m.latency.median_ms > 0 and m.latency.cpu_median_ms is not None
        assert m.memory.total_mb > 0
        assert m.extra["providers"] == ["CPUExecutionProvider"]
        assert set(m.stage_seconds) >= {"upload", "session", "timing"}
    assert m2.stage_seconds["upload"] < 0.05  # cached on the board by sha256


def test_ssh_missing_provider_is_a_clear_error(sshd: LocalSshd, tiny_onnx: Path) -> None:
    from hwprune.backends.ssh import SshOrtBackend

    profile = sshd.profile(ssh__providers=("TensorrtExecutionProvider",))
    with SshOrtBackend(profile, ssh_options=sshd.options()) as backend:
        with pytest.raises(MeasurementError, match="lacks TensorrtExecutionProvider"):
            backend.measure(tiny_onnx)


def test_ssh_wrong_key_is_backend_unavailable_with_fix(sshd: LocalSshd, tmp_path: Path) -> None:
    from hwprune.backends.ssh import SshOrtBackend

    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    profile = sshd.profile(ssh__key_file=str(other))
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable) as exc:
        SshOrtBackend(profile, ssh_options=sshd.options())
    assert time.monotonic() - t0 < 30
    assert "ssh-copy-id" in str(exc.value) and "\n" not in str(exc.value)


def test_ssh_unreachable_board_is_backend_unavailable(tiny_onnx: Path, tmp_path: Path) -> None:
    from hwprune.backends.ssh import SshOrtBackend

    profile = load_profile("host-cpu").with_overrides(backend="ssh-ort", ssh__host="127.0.0.1",
                                                      ssh__port=_free_port(), ssh__user="nobody")
    with pytest.raises(BackendUnavailable, match="cannot log in"):
        SshOrtBackend(profile, ssh_options=["-o", f"UserKnownHostsFile={tmp_path / 'kh'}"])


def test_ssh_board_vanishing_mid_run_is_measurement_error(tmp_path: Path, tiny_onnx: Path) -> None:
    from hwprune.backends.ssh import SshOrtBackend

    server = LocalSshd(tmp_path).start()
    try:
        backend = SshOrtBackend(server.profile(), ssh_options=server.options())
        backend.measure(tiny_onnx)
        # The board goes away: sshd and the master connection's session process both die.
        server.stop()
        subprocess.run(["ssh", *backend._ssh_opts, "-O", "exit", backend.destination], capture_output=True)
        with pytest.raises(MeasurementError, match="ssh-ort"):
            backend.measure(tiny_onnx)
        backend.close()
    finally:
        server.stop()


def test_doctor_ssh_ort(sshd: LocalSshd) -> None:
    from hwprune.doctor import doctor, format_checks

    checks = doctor(sshd.profile(), ssh_options=sshd.options())
    assert all(c.ok for c in checks), format_checks(checks)
    assert [c.name for c in checks] == ["profile", "ssh login", "board python + onnxruntime",
                                        "tiny model runs on the board"]

    bad = doctor(sshd.profile(ssh__providers=("CUDAExecutionProvider",)), ssh_options=sshd.options())
    failed = [c for c in bad if not c.ok]
    assert [c.name for c in failed] == ["board python + onnxruntime"]
    assert "lacks CUDAExecutionProvider" in failed[0].detail and "pip install" in failed[0].fix


def test_calibrate_profiles_kernels_on_a_board_over_ssh(sshd: LocalSshd, tiny_onnx: Path) -> None:
    from hwprune.backends.ort import OrtBackend
    from hwprune.backends.ssh import SshOrtBackend
    from hwprune.predict.calibrate import fit_measured, measure_designs, run_overhead_us

    profile = sshd.profile()
    with SshOrtBackend(profile, ssh_options=sshd.options()) as backend:
        # the board's own profiler: the same kernels as ONNX Runtime's here (the "board" runs this machine's ORT)
        remote = backend.node_profile(tiny_onnx, runs=5)
        measured_profile, measured = measure_designs(profile, 1.0, seed=7, backend=backend)
        run_us = run_overhead_us(profile, backend)
    local = OrtBackend(load_profile("host-cpu")).node_profile(tiny_onnx, runs=5)
    assert remote["backend"] == "ssh-ort" and remote["nodes"] and all(n["median_us"] > 0 for n in remote["nodes"])
    assert {n["name"] for n in remote["nodes"]} == {n["name"] for n in local["nodes"]}
    assert measured_profile.backend == "ssh-ort" and len(measured) >= 6
    # every design's kernels mapped onto its exported nodes, timed whole on the board (not beside a reference)
    assert all(m.samples and m.attributed_share > 0.5 and m.measured_ms > 0 and m.reference_ms == 0
               for m in measured)
    p = fit_measured(measured_profile, measured, run_us)
    assert (p.runtime, p.runtime_version, p.profile) == ("ssh-ort", "remote", "host-cpu")
    assert p.fitted_on == len(measured) and p.node_samples and p.validation is not None
    assert 0 <= run_us < 1000
