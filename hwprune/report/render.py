"""The deployment report's rendering, re-exported from the modules that hold it (kept for importers of this name).

:mod:`hwprune.report.format` (numbers and inline text), :mod:`hwprune.report.document` (the document model, Markdown
and HTML), :mod:`hwprune.report.cells` (one model's cells and the report's warnings), :mod:`hwprune.report.sections`
(the sections and :func:`report_document`).
"""

from __future__ import annotations

from hwprune.report.cells import STAGES, judged_cell, latency_cell, metric_cell, model_cell, onnx_snippet
from hwprune.report.document import (
    Block,
    Bullets,
    Code,
    Document,
    Figure,
    Section,
    Table,
    Text,
    Tiles,
    figures,
    slug,
    to_html,
    to_markdown,
    write_document,
)
from hwprune.report.format import (
    DASH,
    code,
    esc,
    fmt_bytes,
    fmt_count,
    fmt_int,
    fmt_mb,
    fmt_metric,
    fmt_ms,
    fmt_pct,
    fmt_s,
    fmt_x,
    sig,
)
from hwprune.report.sections import report_document

__all__ = [
    "DASH", "STAGES", "Block", "Bullets", "Code", "Document", "Figure", "Section", "Table", "Text", "Tiles", "code",
    "esc", "figures", "fmt_bytes", "fmt_count", "fmt_int", "fmt_mb", "fmt_metric", "fmt_ms", "fmt_pct", "fmt_s",
    "fmt_x", "judged_cell", "latency_cell", "metric_cell", "model_cell", "onnx_snippet", "report_document", "sig",
    "slug", "to_html", "to_markdown", "write_document",
]
