"""Deployment reports: ``report.html`` (self-contained) and ``report.md`` built from a run folder alone.

``build_report(run_dir)`` renders one run; ``build_comparison(run_a, run_b, out_dir)`` renders what changed between
two runs, and ``compare_runs(a, b)`` returns the same comparison as data (with a ``regressions`` list) for code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hwprune.report.compare import compare_runs, comparison_document
from hwprune.report.data import RunData, load_run
from hwprune.report.document import write_document
from hwprune.report.sections import report_document
from hwprune.export import atomic_write_text


def build_report(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``report.html``, ``report.md`` and the Markdown's images (``report_files/``) into ``run_dir``.

    Reads only the run folder (the Optuna storage only if ``trials.csv`` is missing); never re-runs anything.
    Returns the written paths, the HTML and Markdown first.
    """
    run_dir = Path(run_dir)
    return write_document(report_document(load_run(run_dir)), run_dir, "report")


def build_comparison(run_a: str | os.PathLike[str], run_b: str | os.PathLike[str],
                     out_dir: str | os.PathLike[str], **tolerances: float) -> list[Path]:
    """Write ``compare.html``, ``compare.md`` (+ ``compare_files/``) and ``compare.json`` (the data of
    :func:`compare_runs`, given ``tolerances``) into ``out_dir``, comparing ``run_b`` with the baseline ``run_a``."""
    ra, rb = load_run(run_a), load_run(run_b)
    result = compare_runs(ra, rb, **tolerances)
    out = Path(out_dir)
    paths = write_document(comparison_document(ra, rb, result), out, "compare")
    paths.insert(2, atomic_write_text(out / "compare.json", json.dumps(result, indent=2, default=str) + "\n"))
    return paths


__all__ = ["RunData", "build_comparison", "build_report", "compare_runs", "load_run"]
