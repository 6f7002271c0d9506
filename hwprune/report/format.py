"""Number and text formatting shared by every report (the tests import these so they compare numbers exactly
as rendered). Text uses a tiny inline markup: ```code```, ``**bold**`` and backslash escapes (:func:`esc`).
"""

from __future__ import annotations

import math
import re
from typing import Any


DASH = "—"


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def sig(v: Any, digits: int = 3) -> str:
    """``v`` with ``digits`` significant digits and no exponent: 0.0348, 1.21, 12.3, 1235."""
    f = _num(v)
    if f is None:
        return DASH
    if f == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(f))))
    out = f"{f:.{decimals}f}"
    # rounding can add a digit (9.996 -> 10.00): redo with one decimal fewer
    if decimals and len(out.lstrip("-").replace(".", "").lstrip("0")) > digits:
        out = f"{f:.{decimals - 1}f}"
    return out


def fmt_ms(v: Any) -> str:
    """A latency in milliseconds."""
    return DASH if _num(v) is None else f"{sig(v)} ms"


def fmt_metric(v: Any) -> str:
    """The evaluator's metric (4 significant digits: enough to tell models apart, not noise)."""
    return sig(v, 4)


def fmt_mb(v: Any) -> str:
    """Memory in MB (10^6 bytes)."""
    return DASH if _num(v) is None else f"{sig(v)} MB"


def fmt_int(v: Any) -> str:
    """An integer with thousands separators."""
    f = _num(v)
    return DASH if f is None else f"{int(round(f)):,}"


def fmt_count(v: Any) -> str:
    """A large count with a unit: 4.61 M."""
    f = _num(v)
    if f is None:
        return DASH
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(f) >= scale:
            return f"{sig(f / scale)} {unit}"
    return f"{int(round(f))}"


def fmt_bytes(v: Any) -> str:
    """A file size in kB/MB/GB (powers of 1000, like the memory figures)."""
    f = _num(v)
    if f is None:
        return DASH
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(f) >= scale:
            return f"{sig(f / scale)} {unit}"
    return f"{int(f)} B"


def fmt_x(v: Any) -> str:
    """A ratio: 2.63×."""
    f = _num(v)
    return DASH if f is None else f"{f:.2f}×"


def fmt_pct(v: Any, signed: bool = False) -> str:
    """A percentage (``v`` already in percent)."""
    f = _num(v)
    if f is None:
        return DASH
    return f"{f:+.1f}%" if signed else f"{f:.1f}%"


def fmt_s(v: Any) -> str:
    """Seconds."""
    f = _num(v)
    return DASH if f is None else f"{sig(f)} s"


def esc(text: Any) -> str:
    """Escape data so the inline markup shows it literally (``*``, backticks, ``_``, ``<``, ``[``, ``\\``)."""
    return re.sub(r"([\\`*_<\[\]])", r"\\\1", str(text))


def code(text: Any) -> str:
    """Inline code; backticks inside become quotes (a code span cannot contain its delimiter here)."""
    return f"`{str(text).replace('`', chr(39))}`"
