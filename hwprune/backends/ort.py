"""ONNX Runtime backend: times a model on this machine with the session settings of a device profile.

Every call opens a fresh session (nothing is shared between models, so one candidate cannot warm caches for the
next); what is built once per backend is only the recipe for the session options.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hwprune.errors import BackendUnavailable, MeasurementError, ProfileError
from hwprune.export import input_feed
from hwprune.backends.base import Capabilities, Measurement
from hwprune.backends.memory import MB, graph_memory, load_model
from hwprune.backends.timing import timed_pair, timed_runs
from hwprune.profiles import DeviceProfile, load_profile

_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "layout": "ORT_ENABLE_LAYOUT",  # newer ORT releases only
    "all": "ORT_ENABLE_ALL",
}

OnnxSource = str | os.PathLike[str] | bytes | Any  # a path, serialized bytes or an onnx.ModelProto


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - onnxruntime is a hard dependency
        raise BackendUnavailable(f"onnxruntime is not installed: {exc}; `pip install onnxruntime`") from None
    return onnxruntime


def optimization_level(name: str) -> Any:
    """The ``onnxruntime.GraphOptimizationLevel`` for a profile's ``ort.graph_optimization_level`` string."""
    ort = _ort()
    attr = _OPT_LEVELS.get(name.lower())
    if attr is None or not hasattr(ort.GraphOptimizationLevel, attr):
        known = [k for k, v in _OPT_LEVELS.items() if hasattr(ort.GraphOptimizationLevel, v)]
        raise ProfileError(f"ort.graph_optimization_level: {name!r} is not one of {', '.join(known)}")
    return getattr(ort.GraphOptimizationLevel, attr)


def session_options(profile: DeviceProfile, *, profiling_prefix: str | None = None) -> Any:
    """``onnxruntime.SessionOptions`` for a profile: threads, optimization level, quiet logging, optional profiler."""
    ort = _ort()
    so = ort.SessionOptions()
    so.intra_op_num_threads = profile.ort.intra_op_threads
    so.inter_op_num_threads = profile.ort.inter_op_threads
    so.graph_optimization_level = optimization_level(profile.ort.graph_optimization_level)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # ORT's warnings (e.g. unused initializers removed) are noise to a user of hwprune.
    so.log_severity_level = 0 if os.environ.get("HWPRUNE_DEBUG") else 3
    if profiling_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profiling_prefix
    return so


def _providers(profile: DeviceProfile) -> list[str]:
    ort = _ort()
    available = ort.get_available_providers()
    missing = [p for p in profile.ort.providers if p not in available]
    if missing:
        raise BackendUnavailable(
            f"profile {profile.name}: ONNX Runtime here has no {', '.join(missing)} "
            f"(available: {', '.join(available)}); install the matching onnxruntime package or edit ort.providers"
        )
    return list(profile.ort.providers) or ["CPUExecutionProvider"]


def _model_arg(onnx_model: OnnxSource) -> str | bytes:
    import onnx

    if isinstance(onnx_model, onnx.ModelProto):
        return onnx_model.SerializeToString()
    if isinstance(onnx_model, bytes):
        return onnx_model
    return os.fspath(onnx_model)


def _label(onnx_model: OnnxSource) -> str:
    return "the model" if isinstance(onnx_model, bytes) or not isinstance(onnx_model, (str, os.PathLike)) \
        else str(onnx_model)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def open_session(onnx_model: OnnxSource, profile: DeviceProfile, *, profiling_prefix: str | None = None) -> Any:
    """A new ``InferenceSession`` configured from the profile; load failures become :class:`MeasurementError`."""
    ort = _ort()
    so = session_options(profile, profiling_prefix=profiling_prefix)
    providers = _providers(profile)
    try:
        return ort.InferenceSession(_model_arg(onnx_model), so, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types for a bad model
        raise MeasurementError(f"ONNX Runtime cannot load {_label(onnx_model)}: {_first_line(exc)}") from None


def _feed(sess: Any, onnx_model: OnnxSource, inputs: dict[str, np.ndarray] | None,
          label: str | None = None) -> dict[str, np.ndarray]:
    import onnx

    label = label or _label(onnx_model)
    if inputs is None:
        src = onnx_model if not isinstance(onnx_model, bytes) else onnx.load_from_string(onnx_model)
        inputs = input_feed(src)
    expected = [i.name for i in sess.get_inputs()]
    missing = [n for n in expected if n not in inputs]
    if missing:
        raise MeasurementError(
            f"inputs for {label} lack {', '.join(missing)} (the graph takes {', '.join(expected)})"
        )
    return {n: np.ascontiguousarray(inputs[n]) for n in expected}


def _run_once(sess: Any, feed: dict[str, np.ndarray], label: str) -> list[np.ndarray]:
    try:
        return sess.run(None, feed)
    except Exception as exc:  # noqa: BLE001
        raise MeasurementError(f"ONNX Runtime failed to run {label}: {_first_line(exc)}") from None


def _rss() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - best effort: psutil may be missing or forbidden
        return None


@dataclass
class _Prepared:
    """An open session, its feed and parsed graph, and what its opening cost (seconds, resident-set samples)."""

    sess: Any
    feed: dict[str, np.ndarray]
    proto: Any
    session_s: float
    rss0: int | None
    rss: list[int | None]


def _load_avg() -> tuple[float, float, float] | None:
    return tuple(float(x) for x in os.getloadavg()) if hasattr(os, "getloadavg") else None  # type: ignore[return-value]


class OrtBackend:
    """Measure ONNX models with ONNX Runtime on this machine, configured by ``profile.ort`` and ``profile.measure``."""

    name = "ort"
    capabilities = Capabilities(beside=True, node_profile=True, settings=("ort",))

    def __init__(self, profile: DeviceProfile | str) -> None:
        self.profile = load_profile(profile)
        # Fail at construction, not after a trial's export, when the profile asks for what this ORT lacks.
        optimization_level(self.profile.ort.graph_optimization_level)
        _providers(self.profile)

    def session_options(self) -> Any:
        """The session options every session of this backend is created with."""
        return session_options(self.profile)

    def session(self, onnx_path: OnnxSource) -> Any:
        """A new ONNX Runtime session for one model."""
        return open_session(onnx_path, self.profile)

    def _clock(self) -> tuple[Any, str]:
        # With one intra-op thread ORT computes on the calling thread, so its CPU time is the model's; with a pool,
        # only the whole process's CPU time covers the work.
        if self.profile.ort.intra_op_threads <= 1:
            return time.thread_time_ns, "thread"
        return time.process_time_ns, "process"

    def _open(self, onnx_path: OnnxSource, inputs: dict[str, np.ndarray] | None) -> _Prepared:
        """A session with its feed, run once (run errors surface as one line before any timing)."""
        rss0 = _rss()
        t0 = time.perf_counter()
        sess = self.session(onnx_path)
        session_s = time.perf_counter() - t0
        rss = [_rss()]
        # Parsed once (weights left on disk) for both the random inputs and the graph memory.
        proto = load_model(onnx_path if not isinstance(onnx_path, bytes) else _proto(onnx_path))
        label = _label(onnx_path)
        feed = _feed(sess, proto, inputs, label)
        _run_once(sess, feed, label)
        rss.append(_rss())
        return _Prepared(sess, feed, proto, session_s, rss0, rss)

    def _measurement(self, prep: _Prepared, latency: Any, timing_s: float, load_avg: Any,
                     rss_after: bool = True) -> Measurement:
        if rss_after:  # not when another session was opened since (its memory would count as this model's)
            prep.rss.append(_rss())
        memory = graph_memory(prep.proto)
        seen = [r for r in prep.rss if r is not None]
        if prep.rss0 is not None and seen:
            memory.process_peak_mb = max(0, max(seen) - prep.rss0) / MB
        return Measurement(
            backend=self.name,
            device=self.profile.name,
            latency=latency,
            memory=memory,
            threads=self.profile.ort.intra_op_threads,
            estimated=False,
            tuned=None,
            load_avg=load_avg,
            stage_seconds={"session": prep.session_s, "timing": timing_s},
            extra={
                "onnxruntime": _ort().__version__,
                "providers": prep.sess.get_providers(),
                "graph_optimization_level": self.profile.ort.graph_optimization_level,
                "inter_op_threads": self.profile.ort.inter_op_threads,
                "cpu_clock": self._clock()[1],
            },
        )

    def measure(self, onnx_path: OnnxSource, inputs: dict[str, np.ndarray] | None = None) -> Measurement:
        """Time the model: new session (stage ``session``), warm-up and timed runs (stage ``timing``), memory."""
        m = self.profile.measure
        cpu_clock, clock_name = self._clock()
        prep = self._open(onnx_path, inputs)
        run, feed = prep.sess.run, prep.feed
        load_avg = _load_avg()
        t1 = time.perf_counter()
        latency = timed_runs(lambda: run(None, feed), m.warmup, m.repeats, m.max_cv, m.remeasure,
                             min_repeat_ms=m.min_repeat_ms, cpu_clock=cpu_clock,
                             max_starvation=1.25 if clock_name == "thread" else None)
        return self._measurement(prep, latency, time.perf_counter() - t1, load_avg)

    def measure_beside(self, onnx_path: OnnxSource, reference: OnnxSource,
                       inputs: dict[str, np.ndarray] | None = None) -> tuple[Measurement, Measurement, list[float]]:
        """Time the model and a reference model in alternating samples (:func:`timed_pair`): both measurements
        (each with half the timing seconds) and the per-pair latency ratios model / reference."""
        m = self.profile.measure
        cpu_clock, _ = self._clock()
        prep = self._open(onnx_path, inputs)
        ref = self._open(reference, None)
        run_a, feed_a, run_b, feed_b = prep.sess.run, prep.feed, ref.sess.run, ref.feed
        load_avg = _load_avg()
        t1 = time.perf_counter()
        lat, ref_lat, ratios = timed_pair(lambda: run_a(None, feed_a), lambda: run_b(None, feed_b), m.warmup,
                                          m.repeats, m.max_cv, min_repeat_ms=m.min_repeat_ms, cpu_clock=cpu_clock)
        half = (time.perf_counter() - t1) / 2
        return (self._measurement(prep, lat, half, load_avg, rss_after=False),
                self._measurement(ref, ref_lat, half, load_avg, rss_after=False), ratios)

    def run(self, onnx_path: OnnxSource, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the model once in a new session and return its outputs."""
        sess = self.session(onnx_path)
        return _run_once(sess, _feed(sess, onnx_path, inputs), _label(onnx_path))

    def node_profile(self, onnx_path: OnnxSource, runs: int = 20,
                     inputs: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        """Per-node latency from ONNX Runtime's profiler; see :func:`node_profile`."""
        return node_profile(onnx_path, self.profile, runs=runs, inputs=inputs)

    def close(self) -> None:
        """Nothing is held between calls."""

    def __enter__(self) -> "OrtBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _proto(data: bytes) -> Any:
    import onnx

    return onnx.load_from_string(data)


def _trace_events(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict):
        data = data.get("traceEvents", [])
    return [e for e in data if isinstance(e, dict)]


def parse_node_trace(events: list[dict[str, Any]], runs: int, warmup: int) -> list[dict[str, Any]]:
    """Per-run kernel time of each node from ORT profiler events (median over runs), warm-up runs dropped.

    Node events (``cat == "Node"``, name ``<node>_kernel_time``) are attributed to runs by the ``model_run`` session
    events: only kernels that started at or after the first of the last ``runs`` model runs count. The median over
    runs, not the mean, because on a shared host one preempted run would otherwise dominate a node's figure. Names
    are those of ONNX Runtime's optimized graph (fused nodes get new names, e.g. ``..._nchwc``).
    """
    import bisect
    import statistics

    suffix = "_kernel_time"
    kernels = sorted((e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith(suffix)),
                     key=lambda e: e.get("ts", 0))
    model_runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e.get("ts", 0))
    per_run: dict[tuple[str, str], dict[int, float]] = {}
    order: dict[tuple[str, str], int] = {}
    seen: dict[tuple[str, str], int] = {}
    use_markers = len(model_runs) >= runs > 0
    starts = [e["ts"] for e in model_runs[-runs:]] if use_markers else []
    for e in kernels:
        args = e.get("args", {}) or {}
        op = str(args.get("op_name", ""))
        name = e["name"][: -len(suffix)] or f"{op}_{args.get('node_index', '')}"
        key = (name, op)
        if use_markers:
            if e.get("ts", 0) < starts[0]:
                continue
            run = bisect.bisect_right(starts, e.get("ts", 0)) - 1
        else:
            # no run markers: each node runs once per run, so its k-th occurrence belongs to run k
            seen[key] = seen.get(key, 0) + 1
            if seen[key] <= warmup:
                continue
            run = seen[key] - warmup - 1
        runs_of_key = per_run.setdefault(key, {})
        runs_of_key[run] = runs_of_key.get(run, 0.0) + float(e.get("dur", 0))
        order.setdefault(key, len(order))
    n = max(runs, 1)
    nodes = [{"name": name, "op_type": op,
              "median_us": statistics.median([by_run.get(r, 0.0) for r in range(n)])}
             for (name, op), by_run in per_run.items()]
    nodes.sort(key=lambda d: (-d["median_us"], order[(d["name"], d["op_type"])]))
    return nodes


def node_profile(onnx_path: OnnxSource, profile: DeviceProfile | str, runs: int = 20,
                 inputs: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Per-node latency from ONNX Runtime's built-in profiler, in the ``node_latency.json`` format.

    Returns ``{"backend": "ort", "runs": runs, "nodes": [{"name", "op_type", "median_us"}, ...]}`` sorted by
    ``median_us`` descending, the median over ``runs`` profiled runs after the profile's warm-up runs. The trace file is
    written to a temporary folder and deleted after reading.
    """
    profile = load_profile(profile)
    if runs < 1:
        raise ValueError("runs must be at least 1")
    warmup = max(1, profile.measure.warmup)
    with tempfile.TemporaryDirectory(prefix="hwprune-ort-prof-") as tmp:
        sess = open_session(onnx_path, profile, profiling_prefix=str(Path(tmp) / "ort_profile"))
        trace: str | None = None
        try:
            feed = _feed(sess, onnx_path, inputs)
            label = _label(onnx_path)
            for _ in range(warmup + runs):
                _run_once(sess, feed, label)
        finally:
            with contextlib.suppress(Exception):
                trace = sess.end_profiling()
        if not trace or not os.path.exists(trace):
            raise MeasurementError(f"ONNX Runtime wrote no profile for {_label(onnx_path)}")
        try:
            events = _trace_events(trace)
        finally:
            with contextlib.suppress(OSError):
                os.remove(trace)
    return {"backend": "ort", "runs": runs, "nodes": parse_node_trace(events, runs, warmup)}


__all__ = ["OrtBackend", "node_profile", "open_session", "optimization_level", "parse_node_trace",
           "session_options"]
