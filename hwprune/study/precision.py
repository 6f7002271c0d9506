"""INT8 as a search dimension (``--quantize int8``): a precision per coupled channel group (and per weighted layer in
no group) chosen by each trial on top of its widths, the quantized file measured and evaluated through ONNX Runtime.

Units are read once from the dense ONNX file (:func:`hwprune.quant.plan.group_units`): pruning changes widths, not
node names, so a unit of the dense graph names the same layers in every candidate (a removed block's simply vanish).
Each unit is an Optuna categorical parameter ``precision:<unit>``; a trial without one (the uniform warm start and
bisection, the depth probes) runs in FP32. The calibration set is built once per study from the dense ONNX.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from hwprune.errors import HwpruneError
from hwprune.profiles import DeviceProfile
from hwprune.quant.base import FP32, INT8, QuantizationError, QuantizedModel
from hwprune.quant.calibration import CalibrationSet, calibration_set
from hwprune.quant.check import DEFAULT_TOLERANCE, OutputCheck, check_outputs
from hwprune.quant.device import int8_policy, require_int8
from hwprune.quant.plan import PrecisionPlan, group_units, weighted_nodes
from hwprune.study import attrs

log = logging.getLogger("hwprune")

OFF, ON = "off", "int8"
# uniform ratios (fractions of --max-ratio) of the INT8-everywhere warm-start trials: the unpruned model in INT8 (the
# "quantize it all" baseline) and the warm start's middle; without them a memory budget only INT8 meets waits for the
# sampler to draw every big group in INT8 at once
INT8_ANCHORS = (0.0, 2 / 3)
# ops whose units make the "dense layers in INT8" anchor: at batch 1 their weights, read once per inference, are the
# cost INT8 cuts 4x, while convs on small maps and squeeze-excite gates pay Q/DQ around little work (the CIFAR-10 SE
# CNN: Gemms alone in INT8 0.59x of FP32, everything 0.79x, the conv blocks alone 1.64x); a sampler drawing one
# precision per unit rarely draws that split among 2^units in a short study
GEMM_OPS = ("Gemm", "MatMul")
# an INT8 anchor this many times slower than its FP32 twin is beyond this host's noise (FP32 timed against itself
# reads 0.94-1.10, docs/benchmarks.md); the demo's anchors measured 3-3.5x
INT8_SLOWER = 1.25
FP32_LOCK, PRECISION_LOCKED = attrs.FP32_LOCK, attrs.PRECISION_LOCKED  # (hwprune.study.attrs)


@dataclass(frozen=True)
class QuantChoice:
    """Whether a search quantizes: ``mode`` off | int8, ``explicit`` when the user asked (``--quantize``), and why."""

    mode: str
    explicit: bool
    reason: str = ""

    @property
    def on(self) -> bool:
        return self.mode == ON


def resolve_quantize(asked: str | None, profile: DeviceProfile) -> QuantChoice:
    """``--quantize`` against the device profile: ``None`` takes the profile's default (on where it says search).

    Raises:
        QuantizationError: ``int8`` asked on a device or backend that refuses it (TVM, estimates, ``off``).
    """
    if asked == ON:
        policy = require_int8(profile)
        return QuantChoice(ON, True, policy.reason)
    if asked == OFF:
        return QuantChoice(OFF, True)
    policy = int8_policy(profile)
    return QuantChoice(ON if policy.default_on else OFF, False, policy.reason)


@dataclass(frozen=True)
class QuantResult:
    """A candidate's quantized file, how it was made, and how far its outputs moved (None: not checked)."""

    model: QuantizedModel
    check: OutputCheck | None
    choice: dict[str, str]


def has_int8(choice: Mapping[str, str]) -> bool:
    """Whether a precision choice puts any unit in INT8."""
    return any(p == INT8 for p in choice.values())


def split_params(params: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """A trial's parameters as pruning ratios and a precision choice (unit -> fp32/int8)."""
    prefix = attrs.PRECISION_PARAM
    ratios = {k: float(v) for k, v in params.items() if not k.startswith(prefix)}
    choice = {k[len(prefix):]: str(v) for k, v in params.items() if k.startswith(prefix)}
    return ratios, choice


def signature_with(signature: str, choice: Mapping[str, str]) -> str:
    """The cache key of an architecture in a precision: the architecture's own when all FP32 (so an FP32 candidate
    still is the dense model when its widths are), else with a hash of the INT8 units appended."""
    int8 = sorted(u for u, p in choice.items() if p == INT8)
    if not int8:
        return signature
    return f"{signature}-int8-{hashlib.sha256(json.dumps(int8).encode()).hexdigest()[:10]}"


@dataclass(frozen=True)
class QuantSearch:
    """What the trials quantize with, fixed for the whole study."""

    units: Mapping[str, tuple[str, ...]]  # unit (knob name or layer) -> weighted nodes of the dense graph
    groups: Mapping[str, Any]  # knob name -> GroupSpec: units of the candidates' graphs
    calibration: CalibrationSet
    tolerance: float = DEFAULT_TOLERANCE
    reduce_range: bool = False  # 7-bit weights (the device's profile: hwprune.quant.device.reduce_range)
    gemm_units: frozenset[str] = frozenset()  # units whose weighted nodes are all Gemm/MatMul (GEMM_OPS)

    def param(self, unit: str) -> str:
        return attrs.PRECISION_PARAM + unit

    def suggest(self, trial: optuna.Trial) -> dict[str, str]:
        """The trial's precision per unit; FP32 throughout for the uniform and depth-probe trials (the baselines the
        bisection reasons about are FP32 models)."""
        if attrs.UNIFORM_RATIO in trial.user_attrs or attrs.DEPTH_PROBE in trial.user_attrs:
            return {u: FP32 for u in self.units}
        anchor = attrs.INT8_ANCHOR in trial.user_attrs or attrs.GEMM_ANCHOR in trial.user_attrs
        if not anchor and fp32_lock(trial.study) is not None:
            trial.set_user_attr(PRECISION_LOCKED, True)
            return {u: FP32 for u in self.units}
        return {u: str(trial.suggest_categorical(self.param(u), (FP32, INT8))) for u in self.units}

    def enqueue_anchors(self, study: optuna.Study, uniform: Callable[[float], dict[str, float]],
                        max_ratio: float) -> None:
        """Queue the INT8-everywhere warm-start trials (:data:`INT8_ANCHORS`), once per study, and where the units
        mix Gemm/MatMul units with others, the unpruned model with only those in INT8 (:data:`GEMM_OPS`)."""
        int8 = {self.param(u): INT8 for u in self.units}
        for f in INT8_ANCHORS:
            study.enqueue_trial({**uniform(f * max_ratio), **int8}, user_attrs={attrs.INT8_ANCHOR: f * max_ratio},
                                skip_if_exists=True)
        if self.gemm_units and set(self.units) - self.gemm_units:
            gemm = {self.param(u): INT8 if u in self.gemm_units else FP32 for u in self.units}
            study.enqueue_trial({**uniform(0.0), **gemm}, user_attrs={attrs.GEMM_ANCHOR: 0.0}, skip_if_exists=True)

    def apply(self, fp32_path: Path, out: Path, choice: Mapping[str, str], check: bool = True) -> QuantResult:
        """Quantize ``fp32_path`` into ``out`` as ``choice`` says, and check its outputs against the FP32 file.

        Raises:
            QuantizationError: ORT cannot quantize it, or its outputs moved beyond the tolerance (the reason).
        """
        from hwprune.quant.quantize import quantize

        units = group_units(weighted_nodes(fp32_path), self.groups)
        plan = PrecisionPlan(units, {u: choice.get(u, FP32) for u in units})
        q = quantize(fp32_path, out, plan, self.calibration, reduce_range=self.reduce_range)
        result = check_outputs(fp32_path, q.path, self.calibration.heldout, self.tolerance) if check else None
        return QuantResult(q, result, dict(plan.choice))

    def evaluate(self, path: Path, evaluate: Callable[[Any], float]) -> float:
        """The subject's evaluator on the quantized file, through ONNX Runtime.

        Raises:
            HwpruneError: the score is NaN; QuantizationError: the file does not load.
        """
        from hwprune.quant.evaluate import evaluate_onnx

        score = evaluate_onnx(path, evaluate)
        if score != score:
            raise HwpruneError("evaluate(model) returned NaN on the INT8 file")
        return score


def _slowdown(anchor: optuna.trial.FrozenTrial, trials: list[optuna.trial.FrozenTrial]) -> float | None:
    """How many times slower an INT8 anchor ran than its FP32 twin (same architecture): the dense model, whose
    latency its own ratio is relative to, or a complete FP32 trial; None without a comparable twin."""
    sig = str(anchor.user_attrs.get(attrs.SIGNATURE, "")).split("-int8-")[0]
    ratio = anchor.user_attrs.get(attrs.LATENCY_RATIO)
    if float(anchor.user_attrs[attrs.INT8_ANCHOR]) == 0.0 and ratio is not None:
        return float(ratio)  # the unpruned architecture: its twin is the dense model it was measured beside
    twin = next((t for t in trials if t.user_attrs.get(attrs.SIGNATURE) == sig and t.values
                 and t.user_attrs.get(attrs.PRECISION, FP32) == FP32), None)
    if twin is None:
        return None
    twin_ratio = twin.user_attrs.get(attrs.LATENCY_RATIO)
    if ratio is not None and twin_ratio is not None:
        return float(ratio) / float(twin_ratio)
    return float(anchor.values[1]) / float(twin.values[1])


def memory_budget_binds(study: optuna.Study) -> bool:
    """Whether the study's memory budget excludes the dense FP32 model (so INT8 weights may be what meets it).

    A budget the dense model already meets (host-cpu's default 64 MB against a 3 MB model) leaves INT8 nothing to win
    there; unknown dense memory counts as binding, which keeps INT8 searched."""
    request = study.user_attrs.get(attrs.REQUEST) or {}
    budget, dense = request.get("memory_budget_mb"), request.get("dense_memory_mb")
    if budget is None:
        return False
    return dense is None or float(dense) > float(budget)


def fp32_lock(study: optuna.Study) -> dict[str, Any] | None:
    """The study's FP32 lock: once every INT8 anchor is done and each measured more than :data:`INT8_SLOWER` times
    its FP32 twin while no memory budget binds (:func:`memory_budget_binds`: INT8 then only costs latency), the
    sampler's trials run in FP32 for the rest of the study instead of spending trials on precision parameters that
    never pay. Decided once, logged and stored (:data:`FP32_LOCK`); None while INT8 is still searched."""
    lock = study.user_attrs.get(FP32_LOCK)
    if lock is not None or memory_budget_binds(study):
        return lock
    trials = study.get_trials(deepcopy=False)
    anchors = [t for t in trials if attrs.INT8_ANCHOR in t.user_attrs]
    if not anchors or any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in anchors):
        return None
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    slow = {t.number: _slowdown(t, complete) for t in anchors if t.state == TrialState.COMPLETE}
    measured = {n: round(v, 3) for n, v in slow.items() if v is not None}
    if not measured or min(measured.values()) <= INT8_SLOWER:
        return None
    lock = {"after_trial": max(t.number for t in anchors), "slowdown": measured, "threshold": INT8_SLOWER}
    study.set_user_attr(FP32_LOCK, lock)
    log.info("INT8 anchors ran %s x their FP32 twins (threshold %.2f) and no memory budget binds: the rest of the "
             "study samples FP32 only", ", ".join(f"{v:.2f}" for v in measured.values()), INT8_SLOWER)
    return lock


def precision_record(result: QuantResult | None, choice: Mapping[str, str]) -> dict[str, Any]:
    """The ``precision`` record of a model in summary.json: label, mode, unit choice, node precision, calibration,
    output check and weight bytes (FP32 models of a quantizing search get the label and the choice only)."""
    if result is None or result.model.mode == "none":
        return {"label": FP32, "units": dict(choice)}
    q = result.model
    return {"label": q.label, "mode": q.mode, "units": dict(result.choice), "nodes": dict(q.precision),
            "calibration": q.calibration.to_dict() if q.calibration else None, "reduce_range": q.reduce_range,
            "output_check": result.check.to_dict() if result.check else None,
            "weight_bytes": q.weight_bytes, "fp32_weight_bytes": q.fp32_weight_bytes, "notes": list(q.notes)}


def write_calibration(result: QuantResult, folder: Path) -> Path:
    """calibration.json beside a deployed INT8 file: what its ranges came from, and the output check."""
    from hwprune.export import atomic_write_text

    record = {"calibration": result.model.calibration.to_dict() if result.model.calibration else None,
              "mode": result.model.mode, "precision": dict(result.model.precision),
              "reduce_range": result.model.reduce_range,
              "output_check": result.check.to_dict() if result.check else None}
    return atomic_write_text(folder / "calibration.json", json.dumps(record, indent=2))


def channel_groups(space: Any) -> dict[str, Any]:
    """The pruning space's coupled groups (knob name -> GroupSpec) whose layers form precision units; removable
    blocks are no unit (their layers belong to the groups inside them)."""
    return {k.name: space.specs[k.name] for k in space.knobs if k.kind != "block" and k.name in space.specs}


def recorded_inputs(recovery: Any) -> list[Any] | None:
    """The inputs recovery recorded (or synthesized), to calibrate on when the subject brought no data."""
    if recovery is None or not getattr(recovery, "active", False):
        return None
    return [x for x, _ in recovery.batches] or None


def setup_quant(choice: QuantChoice, dense_path: Path, subject: Any, groups: Mapping[str, Any],
                recorded: list[Any] | None, tolerance: float, log: Callable[[str], None],
                reduce_range: bool = False) -> QuantSearch | None:
    """The study's :class:`QuantSearch`, or None when it does not quantize; ``reduce_range``: 7-bit weights (the
    device's, :func:`hwprune.quant.device.reduce_range`).

    Nothing to calibrate on refuses an explicit ``--quantize int8``; a profile's default falls back to FP32 with a
    warning.

    Raises:
        QuantizationError: ``--quantize int8`` asked and no calibration inputs.
    """
    if not choice.on:
        return None
    try:
        cal = calibration_set(dense_path, subject, recorded=recorded)
    except QuantizationError as exc:
        if choice.explicit:
            raise
        log(f"warning: INT8 is not searched ({exc}); pass --quantize off to silence this")
        return None
    nodes = weighted_nodes(dense_path)
    units = group_units(nodes, groups)
    ops = {n.name: n.op_type for n in nodes}
    gemm_units = frozenset(u for u, names in units.items() if names and all(ops.get(n) in GEMM_OPS for n in names))
    rec = cal.record("MinMax")
    log(f"INT8 searched per unit: {len(units)} units ({len(groups)} channel groups, the rest single layers), "
        f"calibrated on {rec.samples} samples ({cal.source})"
        + ("; 7-bit weights (the profile's quantize.reduce_range)" if reduce_range else ""))
    return QuantSearch(units=units, groups=groups, calibration=cal, tolerance=tolerance, reduce_range=reduce_range,
                       gemm_units=gemm_units)
