"""Calibrate a predictor on a profile's ONNX Runtime: measure the designed set (per-node profiles and whole-model
medians), hold a fifth of the models out to validate, then fit on all of them.

ONNX Runtime's profiler names the nodes of its *optimized* graph; :func:`attribute_node_times` maps them back to the
exported graph's nodes (a fused ``Conv+Add+Relu`` is charged to the Conv, its folded elementwise nodes get 0), so
the regressors work on graphs a remote device's runtime would never optimize the same way.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from hwprune.errors import ExportError, HwpruneError, MeasurementError
from hwprune.predict.designs import Design, designs, reference_design
from hwprune.predict.features import FUSED_KERNEL_OWNERS, NodeFeatures, graph_features
from hwprune.predict.model import CONST_SUFFIX, NodeSample, Predictor, Validation, fit_predictor
from hwprune.profiles import DeviceProfile, load_profile

PROFILE_RUNS = 10  # profiled runs per model (median per node); the profiler's timings are whole microseconds
VALIDATION_EVERY = 4  # every fourth calibration model (i % 4 == 1) is held out of the validation fit
DEFAULT_BUDGET_S = 300.0
MIN_MODELS = 6
MAX_FAILURES_IN_A_ROW = 3  # designs that failed to measure, one after another: the device is gone
# the profiler's own cost per timed node: estimated on models under this latency (in larger ones the run-to-run
# spread of big kernels swamps a few microseconds per node), and never taken above MAX_PROFILER_US
PROFILER_SMALL_MS = 2.0
MAX_PROFILER_US = 10.0
MAX_RUN_US = 100.0  # the runtime's per-run cost is never taken above this (ORT's session call: ~5 us here)
RUN_CHAIN = (1, 2, 4, 8, 16, 32)  # lengths of the trivial-node chains that measure the per-run cost
MIN_NODE_US = 0.5  # a timed node keeps at least this much after the profiler's cost is taken off
T = TypeVar("T")
_ORT_ALIASES = {"FusedConv": "Conv", "FusedGemm": "Gemm", "FusedMatMul": "MatMul", "NhwcConv": "Conv"}


@dataclass(frozen=True)
class Measured:
    """One model measured for calibration: its node features, per-node samples and whole-model median."""

    name: str
    features: list[NodeFeatures]
    samples: list[NodeSample]
    measured_ms: float
    attributed_share: float  # share of the profiled kernel time mapped onto exported nodes
    # profiled kernels mapped onto no exported node (ORT's own reshapes around a fused Gemm): they carry the
    # profiler's cost per kernel too
    lost_kernels: float = 0
    profiled: tuple[dict[str, Any], ...] = ()  # the profiler's kernels as measured (for re-attribution)
    # timed beside the reference model (:func:`relative_to_reference`): the model's own time and the reference's in
    # the same alternating samples; measured_ms is then raw_ms / reference_ms x the reference's calibration median
    raw_ms: float = 0.0
    reference_ms: float = 0.0


def _meta(profile: DeviceProfile) -> dict[str, Any]:
    from hwprune.predict.transfer import device_runtime

    runtime, version = device_runtime(profile)  # ort here, or ONNX Runtime on a board over SSH
    return {"profile": profile.name, "runtime": runtime, "runtime_version": version,
            "threads": profile.ort.intra_op_threads, "channel_multiple": profile.channel_multiple}


def attribute_node_times(model: Any, feats: list[NodeFeatures], profiled: list[dict[str, Any]],
                         counts: dict[str, float] | None = None) -> tuple[dict[str, float], float]:
    """Map ORT profiler nodes onto the exported graph's node names: by name (a kernel renamed by a fusion belongs to
    the node it starts from), else by op type (:func:`_kernel_owners`).

    Args:
        model: the exported ONNX model (path or proto).
        feats: its node features.
        profiled: ORT profiler nodes (``name``, ``median_us``).
        counts: if given, filled with the number of profiled kernels charged to each exported node (the profiler's
            own cost is per kernel).

    Returns:
        (microseconds per exported node name, microseconds that could not be attributed).
    """
    from hwprune.backends.memory import load_model

    graph = load_model(model).graph
    names = {n.name for n in graph.node}
    producer = {o: n for n in graph.node for o in n.output}
    inputs0 = {n.name: n.input[0] if n.input else "" for n in graph.node}
    fused = {f.name for f in feats if f.fused}
    times: dict[str, float] = {}
    unnamed: dict[str, list[float]] = {}  # op type -> kernels matching no exported node by name
    lost = 0.0
    for p in profiled:
        name = str(p["name"]).removesuffix("_nchwc")
        target = name if name in names else None
        if target is None and name in producer:
            node = producer[name]
            while node.name in fused and inputs0[node.name] in producer:  # back to the kernel it was folded into
                node = producer[inputs0[node.name]]
            target = node.name
        if target is None:
            target = _owner(name, names)
        if target is None:
            unnamed.setdefault(str(p.get("op_type", "")), []).append(float(p["median_us"]))
            continue
        times[target] = times.get(target, 0.0) + float(p["median_us"])
        if counts is not None:
            counts[target] = counts.get(target, 0) + 1
    for op, kernels in unnamed.items():
        owners = _kernel_owners(op, feats)
        if not owners:
            lost += sum(kernels)
            continue
        # one kernel per owner in a fused block; kernels ORT adds of an op the graph has (reshapes around a Gemm it
        # made from a MatMul, squeezes of a split) are spread over that op's nodes by size
        total_bytes = sum(max(f.bytes_moved, 1) for f in owners)
        for f in owners:
            share = max(f.bytes_moved, 1) / total_bytes
            times[f.name] = times.get(f.name, 0.0) + sum(kernels) * share
            if counts is not None:  # the same share of the kernels: the profiler's cost in that time
                counts[f.name] = counts.get(f.name, 0) + len(kernels) * share
    return times, lost


def _kernel_owners(op: str, feats: list[NodeFeatures]) -> list[NodeFeatures]:
    """The exported nodes a kernel of ``op`` that matched no node by name is charged to: the owners of an ORT
    fusion, by their key (:data:`~hwprune.predict.features.FUSED_KERNEL_OWNERS`), else the graph's own nodes of that
    op that run (not folded into another kernel, not constant-folded)."""
    if op in FUSED_KERNEL_OWNERS:
        return [f for f in feats if f.keys[0] == FUSED_KERNEL_OWNERS[op]]
    return [f for f in feats if f.op_type == op and not f.fused and not f.keys[0].endswith(CONST_SUFFIX)]


def _owner(name: str, names: set[str]) -> str | None:
    """The exported node an ORT-renamed kernel belongs to: the longest node name it extends with ``_`` (a rewritten
    node, ``/attn/Reshape_5_new_reshape``) or ``/`` (a fusion named under the node it starts from,
    ``/attn/MatMul_1/MatMulScaleFusion//MatmulTransposeFusion/``). The longest, since a first match charged that
    attention MatMul to ``/attn/MatMul``, the QKV projection, and left the attention's own MatMuls at 0."""
    owners = [n for n in names if n and (name.startswith(n + "_") or name.startswith(n + "/"))]
    return max(owners, key=len) if owners else None


def measure_model(name: str, onnx_path: Path, profile: DeviceProfile, backend: Any,
                  reference: Path | None = None) -> Measured:
    """Profile one exported model per node and time it whole with the profile's settings; with ``reference``, in
    alternating samples beside that model (``raw_ms`` and ``reference_ms`` are set, see :func:`relative_to_reference`).
    """
    prof = backend.node_profile(onnx_path, runs=PROFILE_RUNS)  # local ORT's profiler, or the board's over SSH
    if reference is None:
        return measured_from(name, onnx_path, profile, prof["nodes"], target_ms(backend.measure(onnx_path)))
    own, ref, _ = backend.measure_beside(onnx_path, reference)
    ms = target_ms(own)
    m = measured_from(name, onnx_path, profile, prof["nodes"], ms)
    return dataclasses.replace(m, raw_ms=ms, reference_ms=target_ms(ref))


def with_measured_ms(m: Measured, ms: float) -> Measured:
    """``m`` with its whole-model time, and its samples' (what the residual trees fit to), set to ``ms``."""
    return dataclasses.replace(m, measured_ms=ms, samples=[dataclasses.replace(s, model_ms=ms) for s in m.samples])


def reference_median(measured: list[Measured]) -> float:
    """The median of the reference model's times beside the measured models; 0 when none was timed beside it."""
    refs = [m.reference_ms for m in measured if m.reference_ms > 0 and m.raw_ms > 0]
    return float(np.median(refs)) if refs else 0.0


def relative_to_reference(measured: list[Measured]) -> list[Measured]:
    """Each model's time taken relative to the reference model timed beside it, at the reference's median over the
    calibration: ``raw_ms / reference_ms x median(reference_ms)``.

    Why: a shared host's speed drifts through a calibration (other tenants' load, its share of the L3 cache): the
    same models measured before and after one calibration moved more than 10% for up to half of them, and a design
    timed in a slow spell taught the fit that its kernels are slow. Timed in alternating samples, a model and the
    reference see the same spell, so their ratio does not move with it. Models measured without the reference are
    left as they are.

    Args:
        measured: the calibration's measured models.

    Returns:
        The models with ``measured_ms`` (and their samples' ``model_ms``) relative to the reference.
    """
    typical = reference_median(measured)
    return [with_measured_ms(m, m.raw_ms / m.reference_ms * typical) if m.reference_ms > 0 and m.raw_ms > 0 else m
            for m in measured]


def measured_from(name: str, onnx_model: Any, profile: DeviceProfile, profiled: list[dict[str, Any]],
                  ms: float) -> Measured:
    """A :class:`Measured` from a model's profiled kernels and whole-model ms: its node features, and the kernels
    charged to its nodes. Also what re-attributes a stored calibration's kernels after a change to features or
    attribution, without measuring again (``bench_predict --replay --reattribute``).

    Args:
        name: the model's name.
        onnx_model: the exported model (path or proto).
        profile: the profile it was measured on (its channel multiple keys the features).
        profiled: ORT's profiled kernels (``name``, ``median_us``), as :func:`hwprune.backends.ort.node_profile`.
        ms: the whole-model latency (:func:`target_ms`).

    Returns:
        The measured model.
    """
    feats = graph_features(onnx_model, profile.channel_multiple)
    counts: dict[str, float] = {}
    times, lost = attribute_node_times(onnx_model, feats, profiled, counts)
    total = sum(times.values()) + lost
    samples = [NodeSample(f.keys, f.basis, times.get(f.name, 0.0), f.log_basis, 1.0 / max(total, 1.0), f.x, name,
                          ms, f.fused, counts.get(f.name, 1)) for f in feats]
    return Measured(name, feats, samples, ms, sum(times.values()) / total if total > 0 else 1.0,
                    round(len(profiled) - sum(counts.values()), 6), tuple(profiled))


def target_ms(m: Any) -> float:
    """The latency a predictor learns from a measurement: with one thread, the thread's CPU time (other processes on
    a shared host stretch wall time 2x and more, not the CPU time the model needs); else the wall-time median."""
    lat = m.latency
    return lat.cpu_median_ms if lat.cpu_median_ms and m.threads == 1 else lat.median_ms


def export_design(d: Design, folder: Path) -> Path:
    """Export a design to ``folder/<name>.onnx``."""
    from hwprune.export import export_onnx

    return export_onnx(d.module, (d.example,), folder / f"{d.name}.onnx")


def profiler_overhead_us(measured: list[Measured], run_us: float = 0.0) -> float:
    """The profiler's cost per profiled kernel in microseconds: the median over small models of (profiled kernel
    time - (whole-model time - ``run_us``)) / profiled kernels.

    ORT's per-node profiler charges every kernel a few microseconds of its own bookkeeping (measured here: a
    mobilenet-tiny's 48 kernels summed to 2.2x the unprofiled run, ~2-3 us per node, and the same per node in a
    ResNet-18, where it is lost in the noise); fitted as they are, the trees predicted every small model 20-90% too
    slow, which the whole-model correction cannot remove (it scales; this is a count). The whole-model time also
    holds the runtime's per-run cost, which no kernel shows: left in, it lowered the estimate per kernel by the run
    cost over a model's kernel count.

    Args:
        measured: the calibration's measured models.
        run_us: the runtime's per-run cost (:func:`run_overhead_us`), taken off each whole-model time first.

    Returns:
        Microseconds per profiled kernel, within [0, :data:`MAX_PROFILER_US`].
    """
    excess = []
    for m in measured:
        timed = sum(s.kernels for s in m.samples if s.us > 0) + m.lost_kernels
        if timed and m.measured_ms < PROFILER_SMALL_MS and m.attributed_share > 0:
            total_us = sum(s.us for s in m.samples) / m.attributed_share
            excess.append((total_us - (m.measured_ms * 1e3 - run_us)) / timed)
    return float(np.clip(np.median(excess), 0.0, MAX_PROFILER_US)) if excess else 0.0


def _chain(n: int) -> Any:
    """An ONNX model of ``n`` trivial elementwise nodes on 8 floats (alternating Neg and Relu: nothing to fuse)."""
    from onnx import TensorProto, helper

    nodes, prev = [], "x"
    for i in range(n):
        nodes.append(helper.make_node("Relu" if i % 2 else "Neg", [prev], [f"t{i}"]))
        prev = f"t{i}"
    graph = helper.make_graph(nodes, f"chain{n}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 8])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def run_overhead_us(profile: DeviceProfile | str, backend: Any = None) -> float:
    """The runtime's fixed cost per inference in microseconds (the session call, binding inputs and outputs), which
    no profiled kernel shows: chains of 1-32 trivial nodes are measured as calibration measures a model, and the
    intercept of their time against their length (a Theil-Sen line, which one slowed chain does not move) is the
    cost of a run of nothing, never more than the one-node chain's time. Measured here: 4.8 us, plus 0.2 us
    per trivial node.

    Args:
        profile: the device profile (measured through local ONNX Runtime).
        backend: an :class:`~hwprune.backends.ort.OrtBackend` for it (built when None).

    Returns:
        The intercept in microseconds, at least 0.
    """
    profile = load_profile(profile)
    own = backend is None
    backend = backend or _calibration_backend(profile)
    try:
        with tempfile.TemporaryDirectory(prefix="hwprune-chain-") as tmp:
            us = []
            for n in RUN_CHAIN:  # as files: a board over SSH is sent the model's file
                path = Path(tmp) / f"chain{n}.onnx"
                path.write_bytes(_chain(n).SerializeToString())
                us.append(target_ms(backend.measure(path)) * 1e3)
    finally:
        if own:
            backend.close()
    # Theil-Sen, not least squares: one chain slowed by a neighbour on a shared machine moved a least-squares
    # intercept to twice a one-node run. A run of nothing costs no more than the shortest chain's run.
    from scipy.stats import theilslopes

    _, intercept, _, _ = theilslopes(np.asarray(us), np.asarray(RUN_CHAIN, float))
    return float(np.clip(intercept, 0.0, min(us[0], MAX_RUN_US)))


def _calibration_backend(profile: DeviceProfile) -> Any:
    """The backend a calibration measures through: ONNX Runtime here, or on a board over SSH (``ssh-ort``)."""
    from hwprune.backends import create_backend

    if profile.backend == "ssh-ort":
        return create_backend(profile)
    return create_backend(profile.with_overrides(backend="ort"))


def without_profiler(m: Measured, overhead_us: float) -> Measured:
    """``m`` with ``overhead_us`` taken off every profiled kernel of every timed node (floored at
    :data:`MIN_NODE_US`)."""
    samples = [dataclasses.replace(s, us=max(s.us - overhead_us * s.kernels, MIN_NODE_US)) if s.us > 0 else s
               for s in m.samples]
    return dataclasses.replace(m, samples=samples)


def _fit(meta: dict[str, Any], measured: list[Measured], run_us: float) -> Predictor:
    """A predictor fitted on ``measured`` with the profiler's per-node cost (estimated on them) taken off, and the
    runtime's per-run cost ``run_us`` as its whole-model overhead."""
    overhead = profiler_overhead_us(measured, run_us)
    clean = [without_profiler(m, overhead) for m in measured]
    p = fit_predictor(meta, [s for m in clean for s in m.samples],
                      [(m.name, m.features, m.measured_ms) for m in clean], run_overhead_ms=run_us / 1e3)
    p.profiler_us = overhead
    return p


def fit_measured(profile: DeviceProfile, measured: list[Measured], run_us: float = 0.0) -> Predictor:
    """Fit a predictor on every measured model, with its validation from a fit that left every fourth one out.

    Args:
        profile: the profile the models were measured on.
        measured: the measured designs.
        run_us: the runtime's per-run cost (:func:`run_overhead_us`); 0 leaves it to the node predictions.

    Returns:
        The fitted :class:`Predictor`.
    """
    meta = _meta(profile)
    held = [m for i, m in enumerate(measured) if i % VALIDATION_EVERY == 1]
    train = [m for m in measured if m not in held]
    validation = None
    if held and len(train) >= 3:
        part = _fit(meta, train, run_us)
        validation = Validation.from_pairs([part.predict_features(m.features) for m in held],
                                           [m.measured_ms for m in held])
    p = _fit(meta, measured, run_us)
    p.validation = validation
    return p


def calibrate(profile: DeviceProfile | str, budget_s: float = DEFAULT_BUDGET_S, seed: int = 0,
              log: Callable[[str], None] | None = None, max_models: int = 1000) -> Predictor:
    """Measure designed models on the profile's ONNX Runtime until ``budget_s`` runs out, then fit.

    Args:
        profile: a device profile measured through ONNX Runtime on this machine (backend ``ort``).
        budget_s: wall seconds to spend measuring (the fit after it takes a few seconds more).
        seed: seed of the designed set.
        log: called with one progress line per model.
        max_models: stop after this many models even with budget left.

    Returns:
        The fitted :class:`Predictor`, its ``validation`` from held-out calibration models.

    Raises:
        HwpruneError: the profile is not measured through local ONNX Runtime, or too few models fit the budget.
    """
    profile, measured = measure_designs(profile, budget_s, seed, log, max_models)
    run_us = run_overhead_us(profile)
    if log:
        refs = [m.reference_ms for m in measured if m.reference_ms > 0]
        if refs:
            log(f"each model timed beside a reference model ({reference_median(measured):.3f} ms median, "
                f"{min(refs):.3f}-{max(refs):.3f} ms as the host's speed moved): times taken relative to it")
        log(f"the runtime's own cost per inference (no node's): {run_us:.1f} us")
    return fit_measured(profile, measured, run_us)


def measure_designs(profile: DeviceProfile | str, budget_s: float = DEFAULT_BUDGET_S, seed: int = 0,
                    log: Callable[[str], None] | None = None, max_models: int = 1000,
                    backend: Any = None) -> tuple[DeviceProfile, list[Measured]]:
    """The measuring half of :func:`calibrate` (same arguments and errors; ``backend``: one to measure through
    instead of the profile's own): returns the profile as measured (backend ``ort``, or ``ssh-ort`` for a board
    running ONNX Runtime) and the measured designs in the order measured, for :func:`fit_measured`. Here each design
    is timed beside :func:`~hwprune.predict.designs.reference_design` and its time taken relative to it
    (:func:`relative_to_reference`); a board over SSH times one model at a time, so its designs are not."""
    profile = load_profile(profile)
    if profile.backend not in ("ort", "estimate", "ssh-ort"):
        raise HwpruneError(f"profile {profile.name} uses backend {profile.backend!r}; calibrate profiles kernels "
                           "through ONNX Runtime (here, or on a board over SSH: backend 'ssh-ort'); for another "
                           "device, transfer a host predictor with a few device measurements (`hwprune calibrate "
                           f"--device {profile.name}`)")
    if budget_s <= 0:
        raise HwpruneError(f"--budget-seconds {budget_s:g}: must be positive")
    if profile.backend != "ssh-ort":
        profile = profile.with_overrides(backend="ort")
    own = backend is None
    backend = backend or _calibration_backend(profile)
    try:
        return profile, relative_to_reference(_measure_all(profile, backend, budget_s, seed, log, max_models))
    finally:
        if own:
            backend.close()


def measure_each(designed: Iterable[Design], folder: Path, measure: Callable[[Design, Path], T], device: str,
                 log: Callable[[str], None] | None = None) -> Iterator[tuple[Design, T]]:
    """Each design exported into ``folder`` and measured by ``measure(design, path)``, as it comes: the one loop that
    calibrations and transfers measure designed models with. A design that fails to export or to measure is skipped
    with a line to ``log``; the caller stops taking when its budget is spent.

    Args:
        designed: the designs, in the order to measure them.
        folder: where their ONNX files are written.
        measure: measures one exported design.
        device: the device's name, for the error.
        log: called with one line per skipped design.

    Yields:
        Each measured design with what ``measure`` returned.

    Raises:
        HwpruneError: :data:`MAX_FAILURES_IN_A_ROW` designs in a row failed to measure (the device, not the design:
            a board that went away). Export failures do not count: a random design can shrink a map to nothing.
    """
    failures = 0
    for d in designed:
        try:
            path = export_design(d, folder)
        except ExportError as exc:
            if log:
                log(f"{d.name}: skipped ({exc})")
            continue
        try:
            result = measure(d, path)
        except MeasurementError as exc:
            failures += 1
            if log:
                log(f"{d.name}: skipped ({exc})")
            if failures >= MAX_FAILURES_IN_A_ROW:
                raise HwpruneError(f"{device}: {failures} designed models in a row failed to measure "
                                   f"(last: {exc})") from None
            continue
        failures = 0
        yield d, result


def _measure_all(profile: DeviceProfile, backend: Any, budget_s: float, seed: int,
                 log: Callable[[str], None] | None, max_models: int) -> list[Measured]:
    """The designs measured through ``backend`` until ``budget_s`` runs out (see :func:`measure_designs`)."""
    measured: list[Measured] = []
    t0 = time.monotonic()
    beside = getattr(backend, "capabilities", None) is not None and backend.capabilities.beside
    with tempfile.TemporaryDirectory(prefix="hwprune-calibrate-") as tmp:
        ref = export_design(reference_design(), Path(tmp)) if beside else None
        for _, m in measure_each(designs(max_models, profile.channel_multiple, seed), Path(tmp),
                                 lambda d, path: measure_model(d.name, path, profile, backend, ref), profile.name,
                                 log):
            measured.append(m)
            elapsed = time.monotonic() - t0
            if log:
                # the budget bounds the measuring: what is left of it is the ETA (the fit adds seconds)
                log(f"[{elapsed:4.0f} s, ~{max(budget_s - elapsed, 0):.0f} s left] model {len(measured)} "
                    f"{m.name}: {m.measured_ms:.3f} ms, {len(m.samples)} nodes, "
                    f"{m.attributed_share:.0%} of kernel time mapped")
            if elapsed > budget_s and len(measured) >= MIN_MODELS:
                break
    return measured


__all__ = ["Measured", "attribute_node_times", "calibrate", "export_design", "fit_measured", "measure_designs",
           "measure_each", "measure_model", "measured_from", "profiler_overhead_us", "reference_median",
           "relative_to_reference", "run_overhead_us", "target_ms", "with_measured_ms", "without_profiler"]
