"""A stored predictor's fitted trees, cached beside its JSON file (``<key>.fitted.pkl``).

The JSON keeps the node samples, not the trees: refitting is deterministic, and a JSON file stays readable and
independent of the scikit-learn version. But refitting the kernel and residual trees of a few hundred calibration
models takes about 10 s, which every process paid on its first prediction: each ``hwprune measure --backend
estimate`` and every screened search. So the fitted trees are pickled beside the JSON, keyed by a digest of the node
samples they were fitted on (a search's own measurements change the whole-model samples, not the trees) and by the
scikit-learn and NumPy versions. Only a file hwprune wrote in the user's own cache is read, and one that does not
match, or does not load, is fitted again and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUFFIX = ".fitted.pkl"
FORMAT = 2  # 2: the digest covers the run overhead


def node_digest(node_samples: list[dict[str, Any]], run_overhead_ms: float = 0.0) -> str:
    """A digest of what the fitted trees depend on: a predictor's node samples as its JSON stores them, and the
    run overhead its residual trees take off every model."""
    data = {"nodes": node_samples, "run_overhead_ms": float(run_overhead_ms)}
    return hashlib.sha256(json.dumps(data, separators=(",", ":")).encode()).hexdigest()


def _versions() -> dict[str, str]:
    import numpy

    try:
        import sklearn
    except ImportError:  # no trees are fitted without it; the key still differs from a cache written with it
        sklearn_version = ""
    else:
        sklearn_version = sklearn.__version__
    return {"numpy": numpy.__version__, "sklearn": sklearn_version}


@dataclass(frozen=True)
class FittedCache:
    """Where a stored predictor's fitted trees are cached, and the digest of the node samples they must match."""

    path: Path
    digest: str

    @classmethod
    def beside(cls, json_path: Path, digest: str) -> FittedCache:
        """The cache beside the predictor file ``json_path``."""
        return cls(json_path.with_name(json_path.stem + SUFFIX), digest)

    def load(self) -> tuple[Any, Any] | None:
        """(kernel trees, residual trees) fitted on these node samples, or None when there is no matching file."""
        try:
            data = pickle.loads(self.path.read_bytes())
        except Exception:  # noqa: BLE001 - a missing, torn or foreign file is refitted, never fatal
            return None
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("digest") != self.digest \
                or data.get("versions") != _versions():
            return None
        return data["trees"], data["residual"]

    def save(self, trees: Any, residual: Any) -> None:
        """Write the fitted trees atomically; a cache that cannot be written is skipped (the next run refits)."""
        blob = pickle.dumps({"format": FORMAT, "digest": self.digest, "versions": _versions(), "trees": trees,
                             "residual": residual}, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, self.path)
        except OSError:
            return


__all__ = ["FittedCache", "SUFFIX", "node_digest"]
