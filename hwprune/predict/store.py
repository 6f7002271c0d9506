"""Save and load fitted predictors as JSON, beside the measurement caches: ``<cache root>/predictors/<key>.json``.

The key names what a fitted latency depends on: the profile, the runtime and its version, and the threads. The cache
root is ``$HWPRUNE_CACHE`` or ``~/.cache/hwprune`` (``hwprune calibrate --out DIR`` uses DIR instead).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from hwprune.errors import HwpruneError
from hwprune.predict.fitted import FittedCache, node_digest
from hwprune.predict.model import ModelSample, NodeSample, Predictor, Validation

FORMAT_VERSION = 3  # 2: node samples carry tree features; 3: ORT's transformer fusions attributed


def cache_root() -> Path:
    """``$HWPRUNE_CACHE`` or ``~/.cache/hwprune``."""
    env = os.environ.get("HWPRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hwprune"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text) or "x"


def predictor_key(profile: str, runtime: str, runtime_version: str, threads: int) -> str:
    """File stem of a predictor: ``<profile>-<runtime>-<version>-t<threads>``."""
    return _safe(f"{profile}-{runtime}-{runtime_version}-t{threads}")


def predictor_path(p: Predictor, root: Path | None = None) -> Path:
    """Where ``p`` is stored under ``root`` (default :func:`cache_root`)."""
    key = predictor_key(p.profile, p.runtime, p.runtime_version, p.threads)
    return (root or cache_root()) / "predictors" / f"{key}.json"


def to_dict(p: Predictor) -> dict[str, Any]:
    """A JSON-ready dict of the predictor, samples included (so a later update can refit)."""
    d = dataclasses.asdict(dataclasses.replace(p, trees=None, residual=None))
    for name in ("trees", "residual", "fitted_cache"):
        d.pop(name)
    d["format"] = FORMAT_VERSION
    return d


def from_dict(d: dict[str, Any]) -> Predictor:
    """The predictor a :func:`to_dict` dict describes.

    Raises:
        HwpruneError: the dict is not a predictor of this format.
    """
    if d.get("format") != FORMAT_VERSION:
        raise HwpruneError(f"predictor format {d.get('format')!r} is not {FORMAT_VERSION}; calibrate again")
    d = {k: v for k, v in d.items() if k != "format"}
    d["node_samples"] = [NodeSample(tuple(s["keys"]), tuple(s["basis"]), s["us"], tuple(s["log_basis"]), s["weight"],
                                    tuple(s.get("x", ())), s.get("model", ""),
                                    float(s.get("model_ms", 0.0)), bool(s.get("fused", False)),
                                    float(s.get("kernels", 1)))
                         for s in d["node_samples"]]
    d["model_samples"] = [ModelSample(**s) for s in d["model_samples"]]
    d["validation"] = Validation(**d["validation"]) if d.get("validation") else None
    return Predictor(**d)


def save(p: Predictor, root: Path | None = None) -> Path:
    """Write the predictor atomically to :func:`predictor_path`; returns the path."""
    from hwprune.export import atomic_write_text

    path = predictor_path(p, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    d = to_dict(p)
    atomic_write_text(path, json.dumps(d))
    p.fitted_cache = FittedCache.beside(path, node_digest(d["node_samples"], p.run_overhead_ms))
    if p.trees is not None and p.residual is not None:  # fitted already: the next process need not refit
        p.fitted_cache.save(p.trees, p.residual)
    return path


def load(path: str | os.PathLike[str]) -> Predictor:
    """Read a predictor file.

    Raises:
        HwpruneError: unreadable or not a predictor.
    """
    try:
        d = json.loads(Path(path).read_text())
        p = from_dict(d)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HwpruneError(f"{path}: not a readable predictor ({exc})") from None
    p.fitted_cache = FittedCache.beside(Path(path), node_digest(d["node_samples"], p.run_overhead_ms))
    return p


def find(profile: str, threads: int, runtime_version: str | None = None, root: Path | None = None,
         runtime: str | None = None) -> Predictor | None:
    """The stored predictor for a profile and thread count (and ``runtime``, e.g. ``ort`` or ``tvm-rpc``, when
    given): the one fitted on ``runtime_version`` if given and present, else the newest. None when there is none (or
    none readable)."""
    folder = (root or cache_root()) / "predictors"
    if not folder.is_dir():
        return None
    stem = _safe(profile) + "-"
    found = [f for f in folder.glob("*.json") if f.name.startswith(stem) and f.stem.endswith(f"-t{threads}")]
    if runtime_version:
        exact = [f for f in found if f.stem.endswith(_safe(f"-{runtime_version}-t{threads}"))]
        found = exact or found
    for f in sorted(found, key=lambda f: f.stat().st_mtime, reverse=True):
        try:
            p = load(f)
        except HwpruneError:
            continue
        if p.profile == profile and runtime in (None, p.runtime):
            return p
    return None


def stale(profile: str, threads: int, root: Path | None = None) -> list[Path]:
    """Stored predictors for a profile and thread count that :func:`find` passes over because an older hwprune wrote
    them in another format (their node samples lack what the current features and attribution give): what a
    "calibrate again" message names, so an upgrade does not fall back to the roofline unexplained."""
    folder = (root or cache_root()) / "predictors"
    if not folder.is_dir():
        return []
    out = []
    for f in sorted(folder.glob(f"{_safe(profile)}-*-t{threads}.json")):
        try:
            fmt = json.loads(f.read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            continue
        if fmt != FORMAT_VERSION:
            out.append(f)
    return out


__all__ = ["cache_root", "find", "from_dict", "load", "predictor_key", "predictor_path", "save", "stale", "to_dict"]
