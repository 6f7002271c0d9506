"""The CPU hwprune runs on, detected: for profiles that say ``cpu = "detect"`` (host-cpu, host-cpu-tvm), so their
hardware text describes the machine that measured rather than the one the profile was written on."""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

DETECT = "detect"  # the profile value that asks for detection
CPUINFO = Path("/proc/cpuinfo")

# ISA features that decide which kernels run fast, by /proc/cpuinfo flag, in the order shown. x86: "flags"; Arm:
# "Features" (asimd = NEON, asimddp = int8 dot product, i8mm = int8 matrix multiply).
FEATURES: dict[str, tuple[tuple[str, str], ...]] = {
    "x86": (("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX512-VNNI"),
            ("avx_vnni", "AVX-VNNI"), ("avx512_bf16", "AVX512-BF16"), ("amx_tile", "AMX")),
    "arm": (("asimd", "NEON"), ("asimdhp", "FP16"), ("asimddp", "dotprod"), ("i8mm", "I8MM"), ("sve", "SVE"),
            ("sve2", "SVE2"), ("bf16", "BF16")),
}


@dataclass(frozen=True)
class HostCpu:
    """What was detected about this machine's CPU."""

    model: str  # e.g. "AMD EPYC 9R14 96-Core Processor"; the architecture name when the OS does not say
    arch: str  # platform.machine(): x86_64, aarch64, ...
    cores: int  # cores this process may run on (its affinity mask), not the machine's total
    features: tuple[str, ...]  # ISA extensions from FEATURES that the CPU has

    def describe(self) -> str:
        """One line for reports and ``hwprune profiles show``: model, architecture, cores, ISA features."""
        parts = [self.model, self.arch, f"{self.cores} core{'s' if self.cores != 1 else ''}"]
        if self.features:
            parts.append(" ".join(self.features))
        return ", ".join(parts)


def _fields(cpuinfo: str) -> dict[str, str]:
    """The first value of each ``key : value`` line (the first processor's block)."""
    out: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out.setdefault(key.strip().lower(), value.strip())
    return out


def parse_cpuinfo(cpuinfo: str, arch: str, cores: int) -> HostCpu:
    """The :class:`HostCpu` described by the text of a ``/proc/cpuinfo``.

    Args:
        cpuinfo: the file's text ("" when there is none: the model is then the architecture).
        arch: the machine architecture (``platform.machine()``).
        cores: the number of cores to report.

    Returns:
        The model name, architecture, cores and the FEATURES present.
    """
    f = _fields(cpuinfo)
    family = "arm" if arch.lower().startswith(("aarch64", "arm")) or "features" in f else "x86"
    flags = set((f.get("flags") or f.get("features") or "").split())
    # x86 names its CPU in "model name"; Arm kernels give "Model" (Raspberry Pi), "Hardware" or nothing
    model = f.get("model name") or f.get("model") if family == "x86" else f.get("model") or f.get("hardware")
    if not model or model.isdigit():  # x86 "model" alone is a number, not a name
        model = platform.processor() or arch or "unknown CPU"
    features = tuple(label for flag, label in FEATURES[family] if flag in flags)
    return HostCpu(model=" ".join(model.split()), arch=arch or "unknown", cores=max(1, cores), features=features)


def usable_cores() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def detect_host_cpu() -> HostCpu:
    """This machine's CPU (read once per process).

    Returns:
        The :class:`HostCpu` from ``/proc/cpuinfo``, or from :mod:`platform` where there is no such file.
    """
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:
        text = ""
    return parse_cpuinfo(text, platform.machine(), usable_cores())
