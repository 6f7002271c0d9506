"""The ``tvm`` backend: compile and measure on this machine."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from hwprune.errors import BackendUnavailable, MeasurementError
from hwprune.backends.base import Capabilities, EXPORTER_DYNAMO, Measurement
from hwprune.profiles import DeviceProfile, load_profile
from hwprune.backends.tvm._util import _first_line
from hwprune.backends.tvm.target import target_kind, target_threads, targets_this_machine
from hwprune.backends.tvm.compiler import CompiledModel, TvmCompiler
from hwprune.backends.tvm.vm import _device, _extra, _graph_memory, _load_avg, _ordered_args, _outputs, _time_vm


class TvmBackend:
    """Measure with TVM on this machine, for the profile's target (which must be this machine's architecture)."""

    name = "tvm"
    capabilities = Capabilities(exporter=EXPORTER_DYNAMO, settings=("tvm",))

    def __init__(self, profile: DeviceProfile | str) -> None:
        self.profile = load_profile(profile)
        if not targets_this_machine(self.profile):
            raise BackendUnavailable(
                f"profile {self.profile.name} targets {self.profile.tvm.target.get('mtriple')}, which cannot run on "
                f"this {platform.machine()} machine; measure on the board with --backend tvm-rpc "
                "--tracker HOST:PORT --key KEY"
            )
        if target_kind(self.profile) != "llvm":
            raise BackendUnavailable(
                f"the local tvm backend runs CPU (llvm) targets; profile {self.profile.name} targets "
                f"{target_kind(self.profile)}: use --backend tvm-rpc against the device"
            )
        self.compiler = TvmCompiler(self.profile)
        self.tvm = self.compiler.tvm

    def _vm(self, built: CompiledModel) -> tuple[Any, Any]:
        from tvm import relax

        dev = _device(self.tvm, target_kind(self.profile))
        try:
            lib = self.tvm.runtime.load_module(str(built.path))
            return relax.VirtualMachine(lib, dev), dev
        except Exception as exc:  # noqa: BLE001
            raise MeasurementError(f"TVM cannot load {built.path.name}: {_first_line(exc)}") from None

    def measure(self, onnx_path: str | os.PathLike[str], inputs: dict[str, np.ndarray] | None = None) -> Measurement:
        """Compile (or take from the cache), load into a VM, time with ``time_evaluator``."""
        path = Path(onnx_path)
        built = self.compiler.build(path)
        stages = dict(built.stage_seconds)
        t0 = time.perf_counter()
        vm, dev = self._vm(built)
        args = [self.tvm.runtime.tensor(a, dev) for a in _ordered_args(built.input_specs, inputs, path.name)]
        stages["load"] = time.perf_counter() - t0
        load_avg = _load_avg()
        t1 = time.perf_counter()
        try:
            latency = _time_vm(vm, dev, args, self.profile)
        except Exception as exc:  # noqa: BLE001
            raise MeasurementError(f"TVM failed to run {path.name}: {_first_line(exc)}") from None
        stages["timing"] = time.perf_counter() - t1
        return Measurement(
            backend=self.name, device=self.profile.name, latency=latency, memory=_graph_memory(path),
            threads=target_threads(self.profile), estimated=False, tuned=built.tuned, load_avg=load_avg,
            stage_seconds=stages,
            extra={**_extra(built), "timer": "tvm time_evaluator"},
        )

    def run(self, onnx_path: str | os.PathLike[str], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run once and return the outputs (for checking against ONNX Runtime)."""
        path = Path(onnx_path)
        built = self.compiler.build(path)
        vm, dev = self._vm(built)
        args = [self.tvm.runtime.tensor(a, dev) for a in _ordered_args(built.input_specs, inputs, path.name)]
        try:
            return _outputs(vm["main"](*args))
        except Exception as exc:  # noqa: BLE001
            raise MeasurementError(f"TVM failed to run {path.name}: {_first_line(exc)}") from None

    def close(self) -> None:
        """Nothing is held between calls (the compile cache is on disk)."""

    def __enter__(self) -> "TvmBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
