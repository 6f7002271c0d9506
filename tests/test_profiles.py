"""Device profiles: every shipped profile validates, and bad ones fail naming the file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from hwprune.errors import ProfileError
from hwprune.profiles import available_profiles, load_profile
from conftest import run_cli

SHIPPED = ["host-cpu", "host-cpu-tvm", "raspberry-pi-4", "raspberry-pi-5", "android-sd8gen2", "jetson-nano",
           "jetson-orin-nano"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_are_data_complete(name: str) -> None:
    p = load_profile(name)
    hw = p.hardware
    assert hw.cores > 0 and hw.clock_ghz > 0 and hw.peak_gflops > 0 and hw.memory_bandwidth_gbs > 0 and hw.ram_gb > 0
    assert p.channel_multiple >= 1
    assert "kind" in p.tvm.target
    assert p.budgets.latency_ms and p.budgets.memory_mb
    if not p.local:
        assert p.backend == "tvm-rpc" and p.rpc.key and p.tvm.target.get("mtriple") or p.tvm.host


def test_tvm_targets_build_from_profile_dicts() -> None:
    tvm = pytest.importorskip("tvm")
    for name in SHIPPED:
        p = load_profile(name)
        host = tvm.target.Target(p.tvm.host) if p.tvm.host else None
        target = tvm.target.Target(p.tvm.target, host=host)
        assert target.kind.name == p.tvm.target["kind"]


def test_unknown_profile_lists_known_ones() -> None:
    with pytest.raises(ProfileError) as exc:
        load_profile("raspberry-pi-9")
    assert "host-cpu" in str(exc.value) and "raspberry-pi-4" in str(exc.value)


def _hw(**changes: object) -> str:
    """A valid profile's top and [hardware] table, with ``changes`` to its hardware fields."""
    hw = {"cores": 4, "clock_ghz": 1.5, "peak_gflops": 10, "memory_bandwidth_gbs": 4, "ram_gb": 2, **changes}
    return 'name = "x"\n[hardware]\ncpu = "c"\n' + "".join(f"{k} = {v}\n" for k, v in hw.items())


@pytest.mark.parametrize("body,field", [
    ('name = "x"\nbackend = "ort"\n', "hardware"),
    ('name = "x"\nbackend = "warp"\n[hardware]\ncpu="c"\ncores=1\nclock_ghz=1\npeak_gflops=1\n'
     'memory_bandwidth_gbs=1\nram_gb=1\n', "backend"),
    ('name = "x"\n[hardware]\ncpu="c"\ncores="four"\nclock_ghz=1\npeak_gflops=1\nmemory_bandwidth_gbs=1\n'
     'ram_gb=1\n', "hardware.cores"),
    ('name = "x"\n[hardware]\ncpu="c"\ncores=4\nclock_ghz=1\npeak_gflops=1\nmemory_bandwidth_gbs=1\nram_gb=1\n'
     '[measure]\nrepeatz=3\n', "measure.repeatz"),
    ('name = "x"\n[hardware]\ncpu="c"\ncores=4\nclock_ghz=1\npeak_gflops=1\nmemory_bandwidth_gbs=1\nram_gb=1\n'
     '[budgets]\nlatency_ms=-1\n', "budgets.latency_ms"),
    ('name = "x\n', "not valid TOML"),
    # zero is not a number of cores, a clock, a bandwidth or a repeat count (a roofline estimate divides by them)
    *[(_hw(**{field: value}), f"hardware.{field}: must be positive")
      for field, value in [("peak_gflops", 0), ("cores", 0), ("clock_ghz", 0.0), ("memory_bandwidth_gbs", 0),
                           ("ram_gb", 0)]],
    (_hw(cores=-2), "hardware.cores: must not be negative"),
    *[(_hw() + f"[measure]\n{field} = 0\n", f"measure.{field}: must be positive")
      for field in ("warmup", "repeats", "max_cv")],
    (_hw() + "[budgets]\nmemory_mb = 0\n", "budgets.memory_mb: must be positive"),
    ('channel_multiple = 0\n' + _hw(), "channel_multiple"),
])
def test_malformed_profile_names_file_and_field(tmp_path: Path, body: str, field: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ProfileError) as exc:
        load_profile(path)
    assert str(path) in str(exc.value) and field in str(exc.value)


def test_overrides_replace_sections() -> None:
    p = load_profile("raspberry-pi-4").with_overrides(backend="tvm-rpc", rpc__tracker="127.0.0.1:9999", rpc__key="k")
    assert (p.rpc.tracker, p.rpc.key) == ("127.0.0.1:9999", "k")
    with pytest.raises(ProfileError):
        p.with_overrides(backend="nope")


def test_profiles_cli_list_and_show() -> None:
    listing = run_cli("profiles", check=True)
    for name in SHIPPED:
        assert name in listing.stdout
    shown = run_cli("profiles", "show", "raspberry-pi-4", check=True)
    assert "cortex-a72" in shown.stdout and "tvm-rpc" in shown.stdout
    bad = run_cli("profiles", "show", "nope")
    assert bad.returncode == 2 and "unknown device profile" in bad.stderr and "Traceback" not in bad.stderr


def test_profiles_from_env_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = Path(load_profile("host-cpu").source).read_text().replace('name = "host-cpu"', 'name = "my-box"')
    (tmp_path / "my-box.toml").write_text(text)
    monkeypatch.setenv("HWPRUNE_PROFILES", str(tmp_path))
    assert "my-box" in available_profiles()
    assert load_profile("my-box").name == "my-box"


def test_doctor_cli_says_what_is_wrong_and_how_to_fix_it() -> None:
    ok = run_cli("doctor", "--device", "host-cpu")
    assert ok.returncode == 0 and "[ok]" in ok.stdout and "all checks passed" in ok.stdout
    pytest.importorskip("tvm")
    bad = run_cli("doctor", "--device", "raspberry-pi-4", "--tracker", "127.0.0.1:9", timeout=120)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "[FAIL] tracker reachable" in bad.stdout and "python -m tvm.exec.rpc_server --tracker" in bad.stdout


# /proc/cpuinfo as Linux writes it on an x86 server and on a Raspberry Pi 5 (first processor's block, trimmed)
X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx fma avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_tile
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0b

Revision\t: d04170
Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""


def test_cpuinfo_gives_model_cores_and_isa_features() -> None:
    from hwprune.hostinfo import parse_cpuinfo

    x86 = parse_cpuinfo(X86_CPUINFO, "x86_64", 8)
    assert x86.describe() == "Intel(R) Xeon(R) Platinum 8480+, x86_64, 8 cores, AVX2 FMA AVX-512 AVX512-VNNI " \
                             "AVX512-BF16 AMX"
    arm = parse_cpuinfo(ARM_CPUINFO, "aarch64", 4)
    assert arm.model == "Raspberry Pi 5 Model B Rev 1.0" and arm.features == ("NEON", "FP16", "dotprod")
    bare = parse_cpuinfo("", "riscv64", 1)  # no /proc/cpuinfo (macOS, Windows): the architecture at least
    assert bare.arch == "riscv64" and bare.cores == 1 and bare.features == ()


def test_host_profiles_detect_this_cpu() -> None:
    import os
    import platform

    from hwprune.hostinfo import detect_host_cpu

    host = detect_host_cpu()
    assert host.cores == len(os.sched_getaffinity(0)) and host.arch == platform.machine()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert ("AVX2" in host.features) == (" avx2" in flags)
    for name in ("host-cpu", "host-cpu-tvm"):
        hw = load_profile(name).hardware
        assert hw.cpu == host.describe() and hw.cores == host.cores and hw.cpu != "detect"
    shown = run_cli("profiles", "show", "host-cpu", check=True)  # as `hwprune profiles show` prints it
    assert f"cpu={host.describe()!r}" in shown.stdout and "cpu='detect'" not in shown.stdout


def test_detect_only_where_a_profile_asks(tmp_path: Path) -> None:
    path = tmp_path / "fixed.toml"
    path.write_text(_hw().replace('cpu = "c"', 'cpu = "detect"'))
    assert load_profile(path).hardware.cpu != "detect" and load_profile(path).hardware.cores == 4
    path.write_text(_hw(cores='"several"'))
    with pytest.raises(ProfileError, match="hardware.cores: expected an integer"):
        load_profile(path)
