"""Device profiles: what a target is, how to reach it and how to measure on it.

A profile is data (a TOML file in ``device_profiles/``), validated on load; every error names the file and the field.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwprune.config import Budget, read_toml
from hwprune.errors import ProfileError
from hwprune.hostinfo import DETECT

BACKENDS = ("ort", "tvm", "tvm-rpc", "ssh-ort", "estimate")


@dataclass(frozen=True)
class Hardware:
    """Facts about the device, used in reports and by the roofline estimate."""

    cpu: str  # "detect" in a profile: this machine's CPU, model, cores and ISA features (hwprune.hostinfo)
    cores: int  # "detect" in a profile: the cores this process may run on
    clock_ghz: float
    peak_gflops: float
    memory_bandwidth_gbs: float
    ram_gb: float
    accelerator: str = ""


@dataclass(frozen=True)
class OrtSettings:
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    graph_optimization_level: str = "all"  # disable | basic | extended | all
    providers: tuple[str, ...] = ("CPUExecutionProvider",)


@dataclass(frozen=True)
class TvmSettings:
    target: dict[str, Any] = field(default_factory=lambda: {"kind": "llvm"})
    host: dict[str, Any] | None = None  # host target for CUDA devices (Jetson)
    cross_compiler: str = ""  # e.g. aarch64-linux-gnu-g++; "" compiles for the host
    cross_compiler_env: str = ""  # environment variable naming the compiler (Android NDK clang)
    tuning_trials: int = 0  # MetaSchedule trials per candidate; 0 = untuned
    tuning_db: str = ""  # directory of the persistent MetaSchedule database; "" = ~/.cache/hwprune/tvm/<profile>


@dataclass(frozen=True)
class RpcSettings:
    tracker: str = ""  # HOST:PORT of a TVM RPC tracker
    key: str = ""  # device key the board registered under
    session_timeout_s: float = 120.0
    retries: int = 3
    priority: int = 1


@dataclass(frozen=True)
class SshSettings:
    host: str = ""
    port: int = 22
    user: str = ""
    key_file: str = ""
    python: str = "python3"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)


@dataclass(frozen=True)
class MeasureSettings:
    warmup: int = 10
    repeats: int = 50
    min_repeat_ms: float = 0.0
    max_cv: float = 0.10  # coefficient of variation above which a measurement is "noisy" and re-measured
    remeasure: int = 2  # how many times a noisy measurement is repeated before it is kept, flagged


INT8_MODES = ("search", "measure", "off")
REDUCE_RANGE_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class QuantizeSettings:
    """Whether INT8 is worth searching on the device: ``search`` (a precision knob by default), ``measure`` (only when
    asked, its gain being doubtful there) or ``off``; ``reason`` says why (see :mod:`hwprune.quant.device`). A
    profile without the table says ``measure``: INT8 is searched by default only where a profile says it pays."""

    int8: str = "measure"
    reason: str = ""
    reduce_range: str = "auto"  # 7-bit weights: on | off | auto (on for x86 CPUs without VNNI, hwprune.quant.device)


@dataclass(frozen=True)
class Budgets:
    latency_ms: float | None = None
    memory_mb: float | None = None


@dataclass(frozen=True)
class DeviceProfile:
    """A target device as described by a TOML file in ``device_profiles/``."""

    name: str
    description: str
    hardware: Hardware
    backend: str
    channel_multiple: int
    ort: OrtSettings = OrtSettings()
    tvm: TvmSettings = TvmSettings()
    rpc: RpcSettings = RpcSettings()
    ssh: SshSettings = SshSettings()
    measure: MeasureSettings = MeasureSettings()
    budgets: Budgets = Budgets()
    quantize: QuantizeSettings = QuantizeSettings()
    local: bool = True  # True when the profile measures on the machine hwprune runs on
    source: str = ""  # the file it was loaded from

    def with_overrides(self, **changes: Any) -> "DeviceProfile":
        """A copy with top-level fields or ``section__field`` keys replaced (None values are ignored)."""
        top: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {}
        for key, value in changes.items():
            if value is None:
                continue
            if "__" in key:
                sec, fld = key.split("__", 1)
                sections.setdefault(sec, {})[fld] = value
            else:
                top[key] = value
        for sec, vals in sections.items():
            top[sec] = dataclasses.replace(getattr(self, sec), **vals)
        profile = dataclasses.replace(self, **top)
        if profile.backend not in BACKENDS:
            raise ProfileError(f"unknown backend {profile.backend!r}; choose one of {', '.join(BACKENDS)}")
        return profile

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _bundled_dirs() -> list[Path]:
    dirs: list[Path] = []
    env = os.environ.get("HWPRUNE_PROFILES")
    if env:
        dirs.extend(Path(p) for p in env.split(os.pathsep) if p)
    dirs.append(Path.cwd() / "device_profiles")
    dirs.append(Path(__file__).resolve().parent.parent / "device_profiles")
    seen: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [s.resolve() for s in seen]:
            seen.append(d)
    return seen


def available_profiles() -> dict[str, Path]:
    """Profile names mapped to their files, first match winning (``$HWPRUNE_PROFILES``, ./device_profiles, bundled)."""
    found: dict[str, Path] = {}
    for d in _bundled_dirs():
        for p in sorted(d.glob("*.toml")):
            found.setdefault(p.stem, p)
    return found


def load_profile(name_or_path: str | os.PathLike[str] | DeviceProfile) -> DeviceProfile:
    """Load a device profile by name (``host-cpu``) or by path to a TOML file."""
    if isinstance(name_or_path, DeviceProfile):
        return name_or_path
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith(".toml") or path.is_file()):
        known = available_profiles()
        if text not in known:
            raise ProfileError(
                f"unknown device profile {text!r}; known profiles: {', '.join(sorted(known)) or '(none found)'}"
                " (or pass a path to a .toml file)"
            )
        path = known[text]
    data = read_toml(path, "device profile", ProfileError)
    return profile_from_dict(data, source=str(path), default_name=path.stem)


def default_budgets(profile: DeviceProfile, latency: Budget | None,
                    memory: Budget | None) -> tuple[Budget | None, Budget | None]:
    """The budgets a search runs under: each one given, else the profile's ``[budgets]`` default (else none).

    The one place this rule lives: ``hwprune search``, :func:`hwprune.search` and nightly jobs all get it from
    :class:`hwprune.study.run.Search`.
    """
    if latency is None and profile.budgets.latency_ms is not None:
        latency = Budget(float(profile.budgets.latency_ms))
    if memory is None and profile.budgets.memory_mb is not None:
        memory = Budget(float(profile.budgets.memory_mb))
    return latency, memory


# fields that must be above zero (other numbers must not be negative): a zero here divides, or measures nothing
_POSITIVE: dict[str, tuple[str, ...]] = {
    "hardware": ("cores", "clock_ghz", "peak_gflops", "memory_bandwidth_gbs", "ram_gb"),
    "measure": ("warmup", "repeats", "max_cv"),
    "rpc": ("session_timeout_s",),
    "ssh": ("port",),
}

_SECTIONS: dict[str, type] = {
    "hardware": Hardware,
    "ort": OrtSettings,
    "tvm": TvmSettings,
    "rpc": RpcSettings,
    "ssh": SshSettings,
    "measure": MeasureSettings,
    "budgets": Budgets,
    "quantize": QuantizeSettings,
}


def _coerce(where: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: expected a table, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ProfileError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(fields)})")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                raise ProfileError(f"{where}.{name}: required field is missing")
            continue
        values[name] = _check_type(f"{where}.{name}", f.type, raw[name])
    return cls(**values)


def _check_type(where: str, annotation: Any, value: Any) -> Any:
    ann = str(annotation)
    if ann.startswith("tuple"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ProfileError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    if ann.startswith("dict"):
        if value is not None and not isinstance(value, dict):
            raise ProfileError(f"{where}: expected a table, got {value!r}")
        return value
    if ann == "bool":
        if not isinstance(value, bool):
            raise ProfileError(f"{where}: expected true or false, got {value!r}")
        return value
    if ann == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProfileError(f"{where}: expected an integer, got {value!r}")
        if value < 0:
            raise ProfileError(f"{where}: must not be negative, got {value}")
        return value
    if ann.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProfileError(f"{where}: expected a number, got {value!r}")
        if value <= 0 and "None" in ann:  # budgets
            raise ProfileError(f"{where}: must be positive, got {value}")
        if value < 0:
            raise ProfileError(f"{where}: must not be negative, got {value}")
        return float(value)
    if ann == "str":
        if not isinstance(value, str):
            raise ProfileError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _detect_hardware(raw: Any) -> Any:
    """A ``[hardware]`` table with ``cpu = "detect"`` / ``cores = "detect"`` replaced by this machine's CPU
    (hwprune.hostinfo); anything else as it is, for :func:`_coerce` to check."""
    if not isinstance(raw, dict) or DETECT not in (raw.get("cpu"), raw.get("cores")):
        return raw
    from hwprune.hostinfo import detect_host_cpu

    host = detect_host_cpu()
    return {**raw, **({"cpu": host.describe()} if raw.get("cpu") == DETECT else {}),
            **({"cores": host.cores} if raw.get("cores") == DETECT else {})}


def profile_from_dict(data: dict[str, Any], *, source: str = "<dict>", default_name: str = "") -> DeviceProfile:
    """Validate a parsed profile; errors name ``source`` and the offending field."""
    top_fields = {"name", "description", "backend", "channel_multiple", "local", *_SECTIONS}
    unknown = sorted(set(data) - top_fields)
    if unknown:
        raise ProfileError(f"{source}: {unknown[0]}: unknown field (known: {', '.join(sorted(top_fields))})")
    if "hardware" not in data:
        raise ProfileError(f"{source}: hardware: required table is missing")
    backend = data.get("backend", "ort")
    if backend not in BACKENDS:
        raise ProfileError(f"{source}: backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    multiple = data.get("channel_multiple", 8)
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ProfileError(f"{source}: channel_multiple: expected a positive integer, got {multiple!r}")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise ProfileError(f"{source}: name: expected a non-empty string")
    raw = {**data, "hardware": _detect_hardware(data["hardware"])}
    sections = {key: _coerce(f"{source}: {key}", cls, raw.get(key, {})) for key, cls in _SECTIONS.items()}
    for key, names in _POSITIVE.items():
        for fld in names:
            value = getattr(sections[key], fld)
            if value <= 0:
                raise ProfileError(f"{source}: {key}.{fld}: must be positive, got {value}")
    int8 = sections["quantize"].int8
    if int8 not in INT8_MODES:
        raise ProfileError(f"{source}: quantize.int8: {int8!r} is not one of {', '.join(INT8_MODES)}")
    if sections["quantize"].reduce_range not in REDUCE_RANGE_MODES:
        raise ProfileError(f"{source}: quantize.reduce_range: {sections['quantize'].reduce_range!r} is not one of "
                           f"{', '.join(REDUCE_RANGE_MODES)}")
    tvm: TvmSettings = sections["tvm"]
    if "kind" not in tvm.target:
        raise ProfileError(f"{source}: tvm.target: needs a 'kind' (e.g. {{kind = \"llvm\"}})")
    local = data.get("local", backend in ("ort", "tvm", "estimate"))
    if not isinstance(local, bool):
        raise ProfileError(f"{source}: local: expected true or false")
    return DeviceProfile(
        name=name,
        description=str(data.get("description", "")),
        backend=backend,
        channel_multiple=multiple,
        local=local,
        source=source,
        **sections,
    )
