"""A latency predictor: per-node regressors summed over a graph's nodes, then a whole-model correction.

Convolutions and matmuls are predicted by a tree per family (:mod:`hwprune.predict.trees`); other ops, and every op
when scikit-learn is missing, by per-op-type linear regressors (power laws where the nodes are timed kernels). Every
node prediction is then multiplied by a factor boosted on whole-model measurements (:mod:`hwprune.predict.residual`).

Node regressors are fitted on per-node kernel times (ONNX Runtime's profiler); the correction
``model_ms = scale x sum(node predictions) + overhead`` on whole-model medians, which also absorbs what the profiler
does not attribute to any ONNX node (layout reorders, session overhead). Every fit minimises *relative* error, as
the within +-10% goal counts it. A node whose finest key had too few samples falls back to a coarser key, and at
worst to the op type; an op never seen gets the roofline's share through the ``_fallback`` regressor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hwprune.predict.features import NodeFeatures, graph_features
from hwprune.predict.fitted import FittedCache
from hwprune.predict.residual import ResidualTrees, fit_residual, node_row
from hwprune.predict.trees import TREE_FAMILIES, fit_trees, predict_trees

MIN_SAMPLES = 6  # fewest node samples a key needs before it gets its own regressor
RIDGE = 1e-3  # small ridge on the node regressors: keeps rare keys from wild coefficients
PRIOR_STRENGTH = 0.5  # how many models' worth the correction's prior (1 per family, no overhead) weighs
FALLBACK_KEY = "_fallback"
LOG_MIN_US = 1.0  # nodes under a microsecond are timer resolution: left out of power-law fits
LOG_RIDGE = 1e-2
FAMILIES = ("conv", "conv-dw", "matmul", "other")
OVERHEAD = "overhead_ms"
CONST_SUFFIX = "@const"  # hwprune.predict.features keys a node ORT constant-folds <op>@const
MIN_NODE_SHARE = 0.5  # the residual trees' target: a model's ms less the run overhead, floored at this share of it


@dataclass(frozen=True)
class NodeSample:
    """One node's measured kernel time in microseconds, with its regressor keys and basis."""

    keys: tuple[str, ...]
    basis: tuple[float, ...]
    us: float
    log_basis: tuple[float, ...] = ()
    weight: float = 1.0  # 1 / its model's total us: a node's error counts as a share of its model's latency
    x: tuple[float, ...] = ()  # tree features (hwprune.predict.features.TREE_NAMES)
    model: str = ""  # the calibration model it was timed in (groups nodes for the residual trees)
    model_ms: float = 0.0  # that model's measured whole-model ms (what the residual trees fit to)
    fused: bool = False  # an elementwise node folded into the kernel before it
    # profiled kernels charged to it (the profiler's own cost is per kernel; a share where ORT's own kernels are
    # spread over a graph's nodes of their op)
    kernels: float = 1

    def as_features(self) -> NodeFeatures:
        """The node features a prediction needs (keys, bases, tree input, fused), for refits from stored samples."""
        return NodeFeatures("", self.keys[-1], self.keys, 0, 0, 0, 0, 0, 0, 0, 1, False, self.fused, self.basis,
                            self.log_basis, self.x)


@dataclass(frozen=True)
class ModelSample:
    """One whole-model median in ms, with the node-level sum per regressor family (to refit the correction)."""

    name: str
    measured_ms: float
    node_sums_ms: dict[str, float]


@dataclass(frozen=True)
class Validation:
    """Error of a predictor on models held out of its fit: shares within +-10% / +-25%, median and p90 |error|."""

    n_models: int
    within_10pct: float
    within_25pct: float
    median_abs_error: float
    p90_abs_error: float

    @classmethod
    def from_pairs(cls, predicted: list[float], measured: list[float]) -> "Validation":
        """Validation figures from predicted and measured latencies of the same models."""
        p, m = np.asarray(predicted, float), np.asarray(measured, float)
        if p.size == 0:
            return cls(0, float("nan"), float("nan"), float("nan"), float("nan"))
        err = np.abs(p / m - 1.0)
        return cls(int(p.size), float(np.mean(err <= 0.10)), float(np.mean(err <= 0.25)), float(np.median(err)),
                   float(np.percentile(err, 90)))


def family(key: str) -> str:
    """The regressor family a key belongs to (what a device transfer scales together)."""
    op = key.split("/", 1)[0].split("@", 1)[0]
    if op == "Conv":
        return "conv-dw" if "/dw" in key else "conv"
    if op in ("MatMul", "Gemm"):
        return "matmul"
    return "other"


def _nonneg_lstsq(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least squares of x @ coef ~ y with coef >= 0 (negative ones dropped and the rest refitted)."""
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    for _ in range(x.shape[1]):
        xa, ya = x[:, active] * w[:, None], y * w
        reg = RIDGE * np.eye(len(active)) * max(float(np.mean(xa * xa)), 1e-12)
        sol = np.linalg.solve(xa.T @ xa + reg, xa.T @ ya)
        if (sol >= 0).all() or len(active) == 1:
            coef[active] = np.maximum(sol, 0.0)
            break
        active = [a for a, v in zip(active, sol) if v >= 0] or active[:1]
    return coef


def ridge_toward(x: np.ndarray, y: np.ndarray, prior: np.ndarray, strength: float) -> np.ndarray:
    """Relative least squares (rows weighted 1/y) of x @ coef ~ y, pulled toward ``prior`` with ``strength``."""
    w = 1.0 / np.maximum(y, 1e-9)
    xw, yw = x * w[:, None], y * w
    reg = strength * np.eye(x.shape[1])
    return np.linalg.solve(xw.T @ xw + reg, xw.T @ yw + reg @ prior)


def _log_fit(group: list[NodeSample]) -> list[float] | None:
    """A power law log(us) ~ coef . log_basis over the group's timed nodes, each weighted by its share of its model;
    None when the nodes are too few or mostly untimed (folded nodes: the linear fit gives them ~0)."""
    timed = [s for s in group if s.us >= LOG_MIN_US and s.log_basis]
    if len(timed) < max(MIN_SAMPLES, 0.8 * len(group)):
        return None
    x = np.asarray([s.log_basis for s in timed], float)
    y = np.log(np.asarray([s.us for s in timed], float))
    w = np.sqrt(np.asarray([s.us * s.weight for s in timed], float))
    xw = x * w[:, None]
    coef = np.linalg.solve(xw.T @ xw + LOG_RIDGE * np.eye(x.shape[1]), xw.T @ (y * w))
    return [float(c) for c in coef]


def fit_regressors(samples: list[NodeSample]) -> dict[str, list[float]]:
    """One coefficient vector per key (every level of every sample's key hierarchy with enough samples): a power law
    (stored under ``log:<key>``) where the nodes are timed kernels, else a non-negative line."""
    by_key: dict[str, list[NodeSample]] = {}
    for s in samples:
        for k in s.keys:
            by_key.setdefault(k, []).append(s)
        by_key.setdefault(FALLBACK_KEY, []).append(s)
    out: dict[str, list[float]] = {}
    for key, group in by_key.items():
        if len(group) < MIN_SAMPLES and key != FALLBACK_KEY and key != group[0].keys[-1]:
            continue
        x = np.asarray([s.basis for s in group], float)
        y = np.asarray([s.us for s in group], float)
        out[key] = [float(c) for c in _nonneg_lstsq(x, y, np.asarray([s.weight for s in group], float))]
        log = _log_fit(group) if key != FALLBACK_KEY else None
        if log is not None:
            out["log:" + key] = log
    return out


def default_correction() -> dict[str, float]:
    """The correction before any whole-model fit: node sums taken as they are."""
    return {**{f: 1.0 for f in FAMILIES}, OVERHEAD: 0.0}


@dataclass
class Predictor:
    """A fitted latency predictor for one device profile and runtime (see the module docstring).

    ``correction`` maps each family to the factor its node sum is multiplied by, plus ``overhead_ms`` per model:
    ``model_ms = sum_f correction[f] x node_sum_f + overhead_ms``. A transfer to another device refits only it.
    """

    profile: str
    runtime: str
    runtime_version: str
    threads: int
    channel_multiple: int
    regressors: dict[str, list[float]]
    correction: dict[str, float] = field(default_factory=default_correction)
    validation: Validation | None = None
    node_samples: list[NodeSample] = field(default_factory=list)
    model_samples: list[ModelSample] = field(default_factory=list)
    transferred_from: str | None = None
    profiler_us: float = 0.0  # the profiler's per-node cost taken off the node samples before fitting
    # the runtime's fixed cost per inference (the session call, binding inputs and outputs), which no node is
    # charged: the residual trees fit each model's measured ms less it, and the correction's prior overhead is it
    run_overhead_ms: float = 0.0
    prior: dict[str, float] = field(default_factory=default_correction)  # what fit_correction is pulled toward
    # fitted trees per family, rebuilt from node_samples on first use (not stored: refitting is deterministic)
    trees: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    # the residual trees, rebuilt likewise from the node samples (which carry their models' ms); False: none to fit
    residual: ResidualTrees | bool | None = field(default=None, repr=False, compare=False)
    # where a stored predictor's fitted trees are cached (set by hwprune.predict.store; not copied by replace())
    fitted_cache: FittedCache | None = field(default=None, init=False, repr=False, compare=False)

    def _trees(self) -> dict[str, Any]:
        if self.trees is None and self.residual is None and self.fitted_cache is not None:
            cached = self.fitted_cache.load()
            if cached is not None:
                self.trees, self.residual = cached
        if self.trees is None:
            groups: dict[str, list[tuple[tuple[float, ...], float, float]]] = {f: [] for f in TREE_FAMILIES}
            for s in self.node_samples:
                fam = family(s.keys[0])
                if fam in groups and s.x:
                    groups[fam].append((s.x, s.us, s.weight))
            self.trees = fit_trees(groups)
        return self.trees

    @property
    def has_residual(self) -> bool:
        """Whether the residual trees are fitted (enough calibration models, scikit-learn present)."""
        return self._residual() is not None

    @property
    def fitted_on(self) -> int:
        """Number of whole models the correction was fitted on."""
        return len(self.model_samples)

    def node_us(self, f: NodeFeatures) -> float:
        """Predicted kernel time of one node in microseconds (before the whole-model correction)."""
        for key in (*f.keys, FALLBACK_KEY):
            log = self.regressors.get("log:" + key)
            if log is not None and f.log_basis:
                return float(np.exp(np.clip(np.dot(log, f.log_basis), -20.0, 20.0)))
            coef = self.regressors.get(key)
            if coef is not None:
                return max(0.0, float(np.dot(coef, f.basis)))
        return 0.0

    def base_nodes_us(self, feats: list[NodeFeatures]) -> list[float]:
        """Kernel time of each node in microseconds as the node regressors predict it: the family's tree where there
        is one (folded elementwise nodes excepted), else the node's linear regressor."""
        # nodes computable from constants alone are folded when the session loads: they never run
        out = [0.0 if f.keys[0].endswith(CONST_SUFFIX) else self.node_us(f) for f in feats]
        trees = self._trees()
        for fam in trees:
            idx = [i for i, f in enumerate(feats) if family(f.keys[0]) == fam and f.x and not f.fused]
            pred = predict_trees(trees, fam, [feats[i].x for i in idx])
            for i, us in zip(idx, pred or []):
                out[i] = us
        return out

    def _residual_rows(self, feats: list[NodeFeatures]) -> tuple[np.ndarray, np.ndarray]:
        base = np.asarray(self.base_nodes_us(feats), float)
        rows = np.asarray([node_row(f.keys[-1], family(f.keys[0]), f.x, us) for f, us in zip(feats, base)], float)
        return rows, base

    def _residual(self) -> ResidualTrees | None:
        self._trees()  # loads both from the fitted cache where there is one
        if self.residual is None:
            by_model: dict[str, list[NodeSample]] = {}
            for s in self.node_samples:
                if s.model and s.model_ms > 0:
                    by_model.setdefault(s.model, []).append(s)
            models = []
            for group in by_model.values():
                rows, base = self._residual_rows([s.as_features() for s in group])
                # the nodes' share of the model: a per-model constant spread over its nodes as factors would make
                # every many-node model too slow (node count, not size, would carry it)
                ms = group[0].model_ms
                models.append((rows, base / 1e3, max(ms - self.run_overhead_ms, MIN_NODE_SHARE * ms)))
            self.residual = fit_residual(models) or False
            if self.fitted_cache is not None:
                self.fitted_cache.save(self.trees, self.residual)
        return self.residual or None

    def nodes_us(self, feats: list[NodeFeatures]) -> list[float]:
        """Predicted time of each node in microseconds: :meth:`base_nodes_us` times the residual trees' factor."""
        residual = self._residual()
        if residual is None or not feats:
            return self.base_nodes_us(feats)
        rows, base = self._residual_rows(feats)
        return [float(v) for v in base * residual.factors(rows)]

    def family_sums_ms(self, feats: list[NodeFeatures]) -> dict[str, float]:
        """Node predictions summed per family, in ms, before the correction (what the correction is fitted on)."""
        sums = dict.fromkeys(FAMILIES, 0.0)
        for f, us in zip(feats, self.nodes_us(feats)):
            sums[family(f.keys[0])] += us / 1e3
        return sums

    def predict_features(self, feats: list[NodeFeatures]) -> float:
        """Predicted whole-model latency in ms from node features."""
        return self.corrected(self.family_sums_ms(feats))

    def corrected(self, sums: dict[str, float]) -> float:
        """Whole-model ms from per-family node sums (floored at 1% of the raw sum: a fit never predicts <= 0)."""
        raw = sum(sums.values())
        ms = sum(self.correction.get(f, 1.0) * sums.get(f, 0.0) for f in FAMILIES) + self.correction.get(OVERHEAD, 0)
        return max(ms, 0.01 * raw, 1e-6)

    def predict_ms(self, onnx_path_or_model: Any) -> float:
        """Predicted median latency in ms of an ONNX model (a path, a ``ModelProto``, or its node features already
        computed by :func:`graph_features`) on this predictor's device."""
        if isinstance(onnx_path_or_model, list):
            return self.predict_features(onnx_path_or_model)
        return self.predict_features(graph_features(onnx_path_or_model, self.channel_multiple))

    def fit_correction(self, strength: float = PRIOR_STRENGTH) -> None:
        """Refit ``correction`` on the stored whole-model samples: relative least squares pulled toward ``prior``."""
        if not self.model_samples:
            return
        cols = [*FAMILIES, OVERHEAD]
        x = np.asarray([[s.node_sums_ms.get(f, 0.0) for f in FAMILIES] + [1.0] for s in self.model_samples])
        y = np.asarray([s.measured_ms for s in self.model_samples])
        prior = np.asarray([self.prior.get(c, 1.0 if c != OVERHEAD else 0.0) for c in cols])
        coef = ridge_toward(x, y, prior, strength)
        self.correction = {c: float(v) for c, v in zip(cols, coef)}

    def add_model(self, name: str, onnx_path_or_model: Any, measured_ms: float) -> ModelSample:
        """Record one whole-model measurement (its node sums under the current regressors); refit separately."""
        return self.add_features(name, graph_features(onnx_path_or_model, self.channel_multiple), measured_ms)

    def add_features(self, name: str, feats: list[NodeFeatures], measured_ms: float) -> ModelSample:
        """:meth:`add_model` from node features already computed."""
        sample = ModelSample(name, float(measured_ms), self.family_sums_ms(feats))
        self.model_samples.append(sample)
        return sample

    def update(self, measurements: list[tuple[Any, float]]) -> None:
        """Add a search's own measurements, ``[(onnx path or model, measured median ms), ...]``, and refit the
        whole-model correction on all samples, so the predictor tracks the device as a study grows."""
        for i, (model, ms) in enumerate(measurements):
            self.add_model(f"update-{len(self.model_samples)}-{i}", model, ms)
        self.fit_correction()

    def describe(self) -> dict[str, Any]:
        """What an estimate reports about its predictor (``Measurement.extra["predictor"]``)."""
        v = self.validation
        return {"kind": "fitted", "profile": self.profile, "runtime": f"{self.runtime} {self.runtime_version}",
                "threads": self.threads, "fitted_on": self.fitted_on,
                "within_10pct": None if v is None else v.within_10pct,
                "within_25pct": None if v is None else v.within_25pct,
                "median_abs_error": None if v is None else v.median_abs_error,
                "p90_abs_error": None if v is None else v.p90_abs_error,
                "validated_on": None if v is None else v.n_models, "profiler_us_per_node": self.profiler_us,
                "run_overhead_us": self.run_overhead_ms * 1e3,
                "residual_trees": self.has_residual,
                "transferred_from": self.transferred_from}


def fit_predictor(meta: dict[str, Any], node_samples: list[NodeSample],
                  models: list[tuple[str, list[NodeFeatures], float]], run_overhead_ms: float = 0.0) -> Predictor:
    """Fit node regressors on ``node_samples`` and the correction on ``models`` (name, features, measured ms).

    ``meta`` gives the identity fields: profile, runtime, runtime_version, threads, channel_multiple.
    ``run_overhead_ms`` is the runtime's fixed cost per inference (:attr:`Predictor.run_overhead_ms`): the
    correction starts from it as its overhead and is pulled toward it.
    """
    prior = {**default_correction(), OVERHEAD: float(run_overhead_ms)}
    p = Predictor(regressors=fit_regressors(node_samples), node_samples=list(node_samples), prior=prior,
                  correction=dict(prior), run_overhead_ms=float(run_overhead_ms), **meta)
    p.model_samples = [ModelSample(name, float(ms), p.family_sums_ms(feats)) for name, feats, ms in models]
    p.fit_correction()
    return p


__all__ = ["ModelSample", "NodeSample", "Predictor", "Validation", "family", "fit_predictor", "fit_regressors"]
