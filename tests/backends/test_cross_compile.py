"""Cross-compilation for the boards: an AArch64 shared object for the Raspberry Pi profiles (ELF e_machine 183 =
EM_AARCH64, NEON code in it), an AArch64 host library with CUDA kernels for the Jetson profiles, and a clear error
when the Android NDK compiler is not named.

The Raspberry Pi 4 path also runs end to end on an emulated board: the AArch64 library is uploaded through a real
tracker to an AArch64 ``rpc_server`` under ``qemu-aarch64``, run there, and its outputs are compared with ONNX
Runtime's. That test needs ``HWPRUNE_AARCH64_PYTHON`` (``scripts/test.sh`` sets it from
``scripts/setup-aarch64-emulator.sh``, which builds an arm64 sysroot and the AArch64 wheels once, about 130 MB of
downloads, and needs root); without it the test is skipped. Emulated timing is never asserted or reported.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("tvm", reason="Apache TVM is not installed (pip install -e '.[tvm]')")

from hwprune.errors import BackendUnavailable  # noqa: E402
from hwprune.profiles import load_profile  # noqa: E402

AARCH64_GXX = shutil.which("aarch64-linux-gnu-g++")
needs_cross = pytest.mark.skipif(
    AARCH64_GXX is None,
    reason="aarch64-linux-gnu-g++ is not installed (Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu)",
)
EM_AARCH64 = 183


pytestmark = pytest.mark.usefixtures("private_cache")


def _elf_header(path: Path) -> tuple[bytes, int, int, int]:
    """(magic, EI_CLASS, EI_DATA, e_machine) of an ELF file."""
    head = path.read_bytes()[:20]
    (machine,) = struct.unpack("<H", head[18:20])
    return head[:4], head[4], head[5], machine


@needs_cross
@pytest.mark.parametrize("name", ["raspberry-pi-4", "raspberry-pi-5"])
def test_raspberry_pi_target_gives_aarch64_shared_object(name: str, tiny_onnx: Path) -> None:
    from hwprune.backends.tvm import TvmCompiler

    profile = load_profile(name)
    built = TvmCompiler(profile).build(tiny_onnx)
    magic, ei_class, ei_data, machine = _elf_header(built.path)
    assert magic == b"\x7fELF" and ei_class == 2 and ei_data == 1  # 64-bit little-endian
    assert machine == EM_AARCH64
    assert built.info["cross_compiler"] == AARCH64_GXX and built.tuned is False
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump:  # NEON: 128-bit vector registers (v0.4s ...) in the generated kernels
        asm = subprocess.run([objdump, "-d", str(built.path)], capture_output=True, text=True, check=True).stdout
        assert ".4s" in asm


@needs_cross
@pytest.mark.parametrize("name", ["jetson-nano", "jetson-orin-nano"])
def test_jetson_cuda_target_compiles_with_aarch64_host(name: str, tiny_onnx: Path) -> None:
    """CUDA kernels plus AArch64 host code. The apache-tvm wheel has no CUDA runtime: it embeds the kernels' CUDA
    source, which the board's CUDA-enabled TVM runtime compiles when it loads the library."""
    from hwprune.backends.tvm import TvmCompiler

    built = TvmCompiler(load_profile(name)).build(tiny_onnx)
    _, ei_class, _, machine = _elf_header(built.path)
    assert ei_class == 2 and machine == EM_AARCH64
    assert b"__global__" in built.path.read_bytes()


def test_android_needs_the_ndk_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    from hwprune.backends.tvm import TvmCompiler

    monkeypatch.delenv("TVM_NDK_CC", raising=False)
    with pytest.raises(BackendUnavailable, match="export TVM_NDK_CC="):
        TvmCompiler(load_profile("android-sd8gen2"))


def test_missing_cross_compiler_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from hwprune.backends.tvm import TvmCompiler

    profile = load_profile("raspberry-pi-4").with_overrides(tvm__cross_compiler="aarch64-no-such-g++")
    with pytest.raises(BackendUnavailable, match="apt-get install"):
        TvmCompiler(profile)


QEMU_PYTHON = os.environ.get("HWPRUNE_AARCH64_PYTHON", "")


def _logs(log_dir: Path) -> str:
    """The RPC server's and tracker's logs, for a failure message (the server is the emulated board)."""
    parts = []
    for name in ("server-0.log", "tracker.log"):
        path = log_dir / name
        text = path.read_text(errors="replace")[-6000:] if path.exists() else "(no log written)"
        parts.append(f"--- {name} ---\n{text.rstrip() or '(empty)'}")
    return "\n".join(parts)


@needs_cross
@pytest.mark.skipif(not QEMU_PYTHON, reason="set HWPRUNE_AARCH64_PYTHON to an AArch64 python (e.g. a wrapper running "
                    "qemu-aarch64 -L SYSROOT python3) that has apache-tvm, numpy, tornado, cloudpickle and psutil; "
                    "scripts/setup-aarch64-emulator.sh builds one (scripts/test.sh runs it as root); see "
                    "docs/real-boards.md, 'Emulated board'")
@pytest.mark.timeout(1500)  # over the bounds below: server start 300 s + 2 attempts x (240 s wait + 240 s session)
def test_raspberry_pi_path_end_to_end_under_qemu(tiny_onnx: Path, tmp_path: Path) -> None:
    """Cross-compile for the Pi 4, upload to an AArch64 rpc_server running under qemu, run, compare with ORT.

    Correctness only: emulated timing means nothing and is not asserted or reported. Takes about 30 s here (each
    start of the emulated python imports tvm in about 8 s); the timeouts are many times that.
    """
    from hwprune.export import input_feed
    from hwprune.backends.ort import OrtBackend
    from hwprune.backends.tvm import TvmCompiler, TvmRpcBackend
    from hwprune.rpc_local import LocalRpc

    import numpy as np

    logs = tmp_path / "rpc-logs"  # kept after the servers stop, for the failure message
    feed = input_feed(tiny_onnx)
    failure = ""
    try:
        with LocalRpc(key="rpi4", python=QEMU_PYTHON, start_timeout=300.0, log_dir=logs) as rpc:
            profile = load_profile("raspberry-pi-4").with_overrides(rpc__tracker=rpc.tracker, rpc__key="rpi4",
                                                                   rpc__session_timeout_s=240.0, rpc__retries=1)
            out = TvmRpcBackend(profile).run(tiny_onnx, feed)
    except Exception as exc:  # noqa: BLE001 - the emulated board's log says why
        failure = f"{type(exc).__name__}: {exc}"
    if failure:
        pytest.fail(f"{failure}\n{_logs(logs)}", pytrace=False)
    # what ran on the board is the cross-compiled AArch64 library (taken from the compile cache run() filled)
    built = TvmCompiler(profile).build(tiny_onnx)
    assert _elf_header(built.path)[3] == EM_AARCH64 and built.info["cross_compiler"] == AARCH64_GXX
    ref = OrtBackend(load_profile("host-cpu")).run(tiny_onnx, feed)
    assert len(out) == len(ref)
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-4, atol=1e-5)
