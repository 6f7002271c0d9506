"""A small document model rendered to Markdown and to self-contained HTML, and the deployment report built with it.

Both outputs come from the same :class:`Document`, so the HTML and the Markdown say exactly the same things. Text
blocks use a tiny inline markup shared by both renderers: ```code```, ``**bold**`` and backslash escapes (see
:func:`esc`). Nothing in a report depends on when or where it was built, so rebuilding a run folder that was copied
elsewhere gives identical files.
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from hwprune.backends import backend_capabilities
from hwprune.backends.base import Capabilities
from hwprune.errors import HwpruneError
from hwprune.report.data import FileCheck, RunData, model_label

DASH = "—"

# ---------------------------------------------------------------------------------------------------------------------
# number formatting (the tests import these so they compare numbers exactly as rendered)


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


# ---------------------------------------------------------------------------------------------------------------------
# document model


@dataclass
class Text:
    """A paragraph; ``kind`` p | note | warning | ok (callouts are boxed)."""

    text: str
    kind: str = "p"


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    align: str = ""  # one letter per column, l or r; default: first column left, others right
    caption: str = ""
    row_classes: list[str] = field(default_factory=list)  # e.g. "recommended", "dense"


@dataclass
class Figure:
    name: str  # file stem for the Markdown copy: <stem>_files/<name>.png
    png: bytes
    alt: str
    caption: str = ""


@dataclass
class Code:
    text: str
    lang: str = ""


@dataclass
class Tiles:
    """Headline numbers: (label, value, detail)."""

    items: list[tuple[str, str, str]]


Block = Union[Text, Bullets, Table, Figure, Code, Tiles]


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return slug(self.title)


@dataclass
class Document:
    title: str
    subtitle: str
    sections: list[Section]
    footer: str = ""


def slug(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    s = re.sub(r"[^\w\- ]", "", title.lower())
    return s.replace(" ", "-")


# ---------------------------------------------------------------------------------------------------------------------
# renderers

_INLINE = re.compile(r"\\([\\`*_<\[\]|])|`([^`]+)`|\*\*(.+?)\*\*")


def _html_inline(text: str) -> str:
    out: list[str] = []
    pos = 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos:m.start()]))
        if m.group(1) is not None:
            out.append(html.escape(m.group(1)))
        elif m.group(2) is not None:
            out.append(f"<code>{html.escape(m.group(2))}</code>")
        else:
            out.append(f"<strong>{_html_inline(m.group(3))}</strong>")
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _align(table: Table) -> str:
    n = len(table.headers)
    return (table.align or ("l" + "r" * (n - 1))).ljust(n, "l")


def to_markdown(doc: Document, files_dir: str) -> str:
    """The document as GitHub-flavoured Markdown; figures reference ``files_dir/<name>.png``."""
    out = [f"# {doc.title}", "", doc.subtitle, ""]
    out += ["**Contents:** " + " · ".join(f"[{s.title}](#{s.anchor})" for s in doc.sections), ""]
    for s in doc.sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Text):
                label = {"warning": "**Warning:** ", "note": "**Note:** ", "ok": "**OK:** "}.get(b.kind)
                out += [f"> {label}{b.text}" if label else b.text, ""]
            elif isinstance(b, Bullets):
                out += [f"- {item}" for item in b.items] + [""]
            elif isinstance(b, Tiles):
                out += [f"- **{label}:** {value}" + (f" ({detail})" if detail else "")
                        for label, value, detail in b.items]
                out.append("")
            elif isinstance(b, Table):
                if b.caption:
                    out += [f"*{b.caption}*", ""]
                align = _align(b)
                out.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
                out.append("|" + "|".join("---:" if a == "r" else ":---" for a in align) + "|")
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
                out.append("")
            elif isinstance(b, Figure):
                out += [f"![{b.alt}]({files_dir}/{b.name}.png)", ""]
                if b.caption:
                    out += [f"*{b.caption}*", ""]
            elif isinstance(b, Code):
                out += [f"```{b.lang}", b.text.rstrip("\n"), "```", ""]
    if doc.footer:
        out += ["---", "", doc.footer, ""]
    return "\n".join(out)


_CSS = """
:root{--fg:#1d1d1f;--muted:#5f6368;--line:#e3e5e8;--accent:#1f77b4}
*{box-sizing:border-box}
body{margin:0;background:#eef0f3;color:var(--fg);
 font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"DejaVu Sans",sans-serif}
main{max-width:1200px;margin:0 auto;padding:28px 36px 48px;background:#fff;min-height:100vh}
h1{font-size:26px;margin:0 0 4px;line-height:1.25}
h2{font-size:20px;margin:38px 0 10px;padding-bottom:5px;border-bottom:2px solid var(--line)}
p{margin:8px 0}
.sub{color:var(--muted);margin:0 0 14px}
nav.toc{font-size:13.5px;margin:0 0 8px;color:var(--muted)}
nav.toc a{color:var(--accent);text-decoration:none;margin-right:14px;white-space:nowrap}
.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(200px,1fr));gap:12px;margin:14px 0}
.tile{border:1px solid var(--line);border-radius:8px;padding:10px 14px;background:#fafbfc}
.tile .label{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:var(--muted)}
.tile .value{font-size:22px;font-weight:650;margin:2px 0}
.tile .detail{font-size:12.5px;color:var(--muted)}
.table-wrap{overflow-x:auto;margin:8px 0 4px}
table{border-collapse:collapse;font-size:13.5px}
p.caption{color:var(--muted);font-size:13px;margin:14px 0 2px}
th,td{padding:5px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:#f1f3f5;font-weight:600;vertical-align:bottom}
td.r,th.r{text-align:right;font-variant-numeric:tabular-nums}
td.r{white-space:nowrap}
tr.recommended td{background:#fff4dc}
tr.dense td{background:#f6f6f6}
tr.faded td{color:#8a8f96}
.callout{border-left:4px solid;padding:8px 12px;margin:10px 0;border-radius:4px}
.callout.warning{border-color:#d93025;background:#fdecea}
.callout.note{border-color:#1a73e8;background:#e8f0fe}
.callout.ok{border-color:#188038;background:#e6f4ea}
figure{margin:16px 0}
figure img{max-width:100%;height:auto;border:1px solid var(--line);border-radius:4px}
figcaption{color:var(--muted);font-size:13px;margin-top:4px}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace;font-size:.9em;
 background:#f3f4f6;padding:0 3px;border-radius:3px;overflow-wrap:anywhere}
pre{background:#0f172a;color:#e2e8f0;padding:12px 14px;border-radius:6px;overflow-x:auto;font-size:13px;
 line-height:1.45}
pre code{background:none;padding:0;color:inherit}
ul{margin:6px 0;padding-left:22px}
footer{margin-top:40px;padding-top:10px;border-top:1px solid var(--line);color:var(--muted);font-size:12.5px}
"""

# Nothing in a report may load from anywhere: the policy makes the browser refuse it even if a value slipped through.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _html_block(b: Block) -> str:
    if isinstance(b, Text):
        if b.kind == "p":
            return f"<p>{_html_inline(b.text)}</p>"
        label = {"warning": "Warning: ", "note": "Note: ", "ok": "OK: "}[b.kind]
        return f'<div class="callout {b.kind}"><strong>{label}</strong>{_html_inline(b.text)}</div>'
    if isinstance(b, Bullets):
        return "<ul>" + "".join(f"<li>{_html_inline(i)}</li>" for i in b.items) + "</ul>"
    if isinstance(b, Tiles):
        tiles = "".join(
            f'<div class="tile"><div class="label">{_html_inline(label)}</div><div class="value">{_html_inline(value)}'
            f'</div><div class="detail">{_html_inline(detail)}</div></div>' for label, value, detail in b.items)
        return f'<div class="tiles">{tiles}</div>'
    if isinstance(b, Table):
        align = _align(b)
        cls = lambda i: ' class="r"' if align[i] == "r" else ""  # noqa: E731
        head = "".join(f"<th{cls(i)}>{_html_inline(h)}</th>" for i, h in enumerate(b.headers))
        rows = []
        for j, row in enumerate(b.rows):
            rc = b.row_classes[j] if j < len(b.row_classes) and b.row_classes[j] else ""
            cells = "".join(f"<td{cls(i)}>{_html_inline(c)}</td>" for i, c in enumerate(row))
            rows.append(f'<tr class="{rc}">{cells}</tr>' if rc else f"<tr>{cells}</tr>")
        # a paragraph, not <caption>: a caption is only as wide as its (often narrow) table
        caption = f'<p class="caption">{_html_inline(b.caption)}</p>' if b.caption else ""
        return (f'{caption}<div class="table-wrap"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}'
                "</tbody></table></div>")
    if isinstance(b, Figure):
        data = base64.b64encode(b.png).decode("ascii")
        cap = f"<figcaption>{_html_inline(b.caption)}</figcaption>" if b.caption else ""
        return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b.alt)}">{cap}</figure>'
    if isinstance(b, Code):
        return f'<pre><code class="language-{html.escape(b.lang)}">{html.escape(b.text.rstrip(chr(10)))}</code></pre>'
    raise TypeError(f"unknown block {type(b).__name__}")


def to_html(doc: Document) -> str:
    """The document as one self-contained HTML page: inline CSS, images as data URIs, no scripts, no requests."""
    toc = "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in doc.sections)
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # an empty data: icon stops browsers asking for /favicon.ico
        '<link rel="icon" href="data:,">',
        f"<title>{html.escape(doc.title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>", "<main>",
        f"<h1>{_html_inline(doc.title)}</h1>", f'<p class="sub">{_html_inline(doc.subtitle)}</p>',
        f'<nav class="toc">{toc}</nav>',
    ]
    for s in doc.sections:
        parts.append(f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>')
        parts += [_html_block(b) for b in s.blocks]
        parts.append("</section>")
    if doc.footer:
        parts.append(f"<footer>{_html_inline(doc.footer)}</footer>")
    parts += ["</main>", "</body>", "</html>", ""]
    return "\n".join(parts)


def figures(doc: Document) -> list[Figure]:
    """Every figure of the document, in order."""
    return [b for s in doc.sections for b in s.blocks if isinstance(b, Figure)]


def write_document(doc: Document, out_dir: Path, stem: str) -> list[Path]:
    """Write ``<stem>.html``, ``<stem>.md`` and the Markdown's PNGs under ``<stem>_files/``, each atomically."""
    from hwprune.export import atomic_write_bytes, atomic_write_text

    out_dir = Path(out_dir)
    files_dir = f"{stem}_files"
    written = [atomic_write_text(out_dir / f"{stem}.html", to_html(doc)),
               atomic_write_text(out_dir / f"{stem}.md", to_markdown(doc, files_dir))]
    names = set()
    for fig in figures(doc):
        written.append(atomic_write_bytes(out_dir / files_dir / f"{fig.name}.png", fig.png))
        names.add(f"{fig.name}.png")
    # drop images of an earlier build the new one no longer has (e.g. a node profile that went away)
    folder = out_dir / files_dir
    if folder.is_dir():
        for old in folder.glob("*.png"):
            if old.name not in names:
                old.unlink()
    return written


# ---------------------------------------------------------------------------------------------------------------------
# the deployment report

STAGES = {
    "prune": "removing channels from a copy of the model",
    "calibrate": "re-estimating BatchNorm statistics of the pruned model",
    "finetune": "short fine-tune of each trial",
    "export": "exporting each candidate to ONNX",
    "session": "creating the runtime session (part of measure)",
    "compile": "compiling the model for the target (part of measure)",
    "upload": "copying the model to the device (part of measure)",
    "timing": "the timed runs themselves (part of measure)",
    "measure": "the whole measurement of each candidate",
    "evaluate": "scoring each candidate with the evaluator",
    "final_finetune": "the final fine-tune of the front's most accurate models, before the recommendation",
}


def _final_finetuned(run: RunData) -> bool:
    return "final_finetune" in (run.summary.get("search", {}).get("stage_seconds") or {})


def _flags(record: dict[str, Any]) -> str:
    """Qualifiers every latency-derived cell of a model carries: estimated / untuned / noisy."""
    flags = []
    if record.get("estimated"):
        flags.append("estimated")
    if record.get("tuned") is False:
        flags.append("untuned")
    if (record.get("latency_ms") or {}).get("noisy"):
        flags.append("noisy")
    return f" ({', '.join(flags)})" if flags else ""


def latency_cell(record: dict[str, Any], key: str = "median") -> str:
    """A model's latency statistic with its qualifiers, as the report's tables show it."""
    return fmt_ms((record.get("latency_ms") or {}).get(key)) + _flags(record)


def model_cell(record: dict[str, Any]) -> str:
    """The Model column: ``dense``, ``**trial 17 (recommended)**`` or ``trial 17``."""
    label = model_label(record)
    return f"**{label} (recommended)**" if record.get("recommended") else label


def metric_cell(run: RunData, record: dict[str, Any]) -> str:
    """The reported metric with what it is: unpruned, after the final fine-tune, or the search's proxy."""
    value = fmt_metric(record.get("accuracy"))
    if record.get("trial") is None:
        return f"{value} (unpruned)"
    steps = record.get("final_finetune_steps")
    if steps is None and record.get("recommended") and _final_finetuned(run):  # summaries before final candidates
        steps = (run.request.get("finetune") or {}).get("final_steps")
    if steps:
        return f"{value} (fine-tuned, {steps} steps)"
    return f"{value} (search proxy)"


def _meets(record: dict[str, Any], kind: str, budget: Any) -> str:
    if budget is None:
        return "no budget"
    return "yes" if (record.get("meets") or {}).get(kind) else "**NO**"


def _budget_text(typed: Any, resolved: Any, unit: str, what: str) -> str:
    if resolved is None:
        return "none"
    out = f"{sig(resolved)} {unit}"
    t = str(typed).strip() if typed is not None else ""
    if t.lower().endswith("x"):
        out += f" (typed {code(t)}: {t[:-1]}× the dense model's {what})"
    elif t:
        out += f" (typed {code(t)})"
    return out


def _pct_of(v: Any, ref: Any) -> str:
    a, b = _num(v), _num(ref)
    return DASH if a is None or not b else f"{100 * a / b:.0f}% of dense"


def onnx_snippet(record: dict[str, Any]) -> str:
    """Python that loads ``record``'s ONNX file with ONNX Runtime and runs it on a random input of the recorded
    shape and dtype (deterministic: ``default_rng(0)``). Run it from the run folder."""
    path = record["files"]["onnx"]["path"]
    inp = record.get("input") or {}
    shape = tuple(int(s) for s in inp.get("shape") or [1])
    dtype = str(inp.get("dtype") or "float32")
    if dtype == "bool":
        make = f"rng.integers(0, 2, size={shape!r}).astype(bool)"
    elif dtype.startswith(("int", "uint")):
        make = f"rng.integers(0, 10, size={shape!r}).astype({dtype!r})"
    else:
        make = f"rng.standard_normal({shape!r}).astype({dtype!r})"
    return "\n".join([
        "# run from the run folder (the folder that holds summary.json)",
        "import numpy as np",
        "import onnxruntime as ort",
        "",
        f'session = ort.InferenceSession("{path}", providers=["CPUExecutionProvider"])',
        "name = session.get_inputs()[0].name",
        "rng = np.random.default_rng(0)",
        f"x = {make}  # the recorded input shape and dtype",
        "outputs = session.run(None, {name: x})",
        "print(name, x.shape, [o.shape for o in outputs])",
    ]) + "\n"


def _summary_section(run: RunData) -> Section:
    s = Section("Summary")
    req, dense, rec = run.request, run.dense, run.recommended
    metric = run.metric
    lat_b, mem_b = req.get("latency_budget_ms"), req.get("memory_budget_mb")
    s.blocks.append(Text(
        f"hwprune searched per-layer pruning ratios for the model {code(req.get('model'))} on the device profile "
        f"{code(req.get('device'))} ({esc(req.get('backend') or run.summary.get('measurement', {}).get('backend'))} "
        f"backend): each candidate had whole channels removed, was exported to ONNX and timed on the device. "
        f"The goal: the most accurate model within the budgets (latency "
        f"{_budget_text(req.get('latency_budget'), lat_b, 'ms', 'median latency')}, memory "
        f"{_budget_text(req.get('memory_budget'), mem_b, 'MB', 'memory')})."))
    if rec is not None:
        s.blocks.append(Tiles([
            ("Recommended", model_label(rec), f"deploy {code(rec['files']['onnx']['path'])}"),
            ("Latency (median)", latency_cell(rec), f"dense {latency_cell(dense)}"),
            ("Speedup vs dense", fmt_x(rec.get("speedup")) + _flags(rec),
             ("1 / its latency ratio to the dense model, measured side by side (not the ratio of the ms figures, "
              "each timed on its own)") if rec.get("latency_ratio") else "dense latency / this latency"),
            ("Memory", fmt_mb(rec["memory_mb"]["total"]),
             f"{_pct_of(rec['memory_mb']['total'], dense['memory_mb']['total'])}; dense "
             f"{fmt_mb(dense['memory_mb']['total'])}"),
            (metric.capitalize(), fmt_metric(rec.get("accuracy")), f"dense {fmt_metric(dense.get('accuracy'))}"
             + (f"; {fmt_pct(100 * rec['accuracy_retention'])} kept"
                if rec.get("accuracy_retention") is not None else "")),
        ]))
        met = []
        if lat_b is not None:
            met.append(("meets" if rec["meets"]["latency"] else "DOES NOT meet") + " the latency budget")
            if rec.get("latency_ratio"):
                met[-1] += (f" (judged on its latency over the dense model's, measured side by side: "
                            f"{rec['latency_ratio']:.3f}, budget {esc(req.get('latency_budget'))})")
        if mem_b is not None:
            met.append(("meets" if rec["meets"]["memory"] else "DOES NOT meet") + " the memory budget")
        s.blocks.append(Text(
            f"**Recommended: {model_label(rec)}.** {metric} {metric_cell(run, rec)} vs {fmt_metric(dense['accuracy'])} "
            f"for the dense model; latency {latency_cell(rec)} median vs {latency_cell(dense)} "
            f"({fmt_x(rec.get('speedup'))} faster); memory {fmt_mb(rec['memory_mb']['total'])} vs "
            f"{fmt_mb(dense['memory_mb']['total'])}; {fmt_int(rec.get('params'))} parameters vs "
            f"{fmt_int(dense.get('params'))}. It " + (" and ".join(met) if met else "had no budgets to meet") + ". "
            f"The Pareto front holds {len(run.pareto)} model(s) in all."))
    else:
        bi = run.summary.get("search", {}).get("best_infeasible")
        best = (run.summary.get("accuracy_guard") or {}).get("best_within_budgets")
        text = "**No model met the budgets**, so nothing is recommended."
        if best and run.summary["accuracy_guard"].get("refused"):
            guard = run.summary["accuracy_guard"]
            text = (f"**No model kept the accuracy guard**, so nothing is recommended: within the budgets the best "
                    f"{esc(metric)} was {fmt_metric(best['accuracy'])} (trial {best['trial']}), under the guard's "
                    f"{fmt_metric(guard['floor'])} ({esc(guard['max_drop'])} below the dense "
                    f"{fmt_metric(guard['dense'])}). Give calibration or training data, or loosen a budget.")
        elif bi:
            text += (f" The best any completed trial reached was {fmt_ms(bi.get('latency_ms'))} latency and "
                     f"{fmt_mb(bi.get('memory_mb'))} memory. Relax a budget, raise the maximum pruning ratio, or run "
                     "more trials.")
        s.blocks.append(Text(text, "warning"))
    for w in _warnings(run):
        s.blocks.append(Text(w, "warning"))
    return s


def _accuracy_warnings(run: RunData) -> list[str]:
    """Banners for an answer whose accuracy needs a second look: the guard off or broken, no data given."""
    out = []
    guard = run.summary.get("accuracy_guard")
    rec = run.recommended
    if guard is not None and guard.get("floor") is None:
        out.append("The **accuracy guard was off** (`--max-accuracy-drop off`): the models here may have lost any "
                   "amount of accuracy against the dense model.")
    elif guard is not None and rec is not None and guard.get("met") is False:
        out.append(f"The recommended model **lost more accuracy than the guard allows** ({esc(guard['max_drop'])}).")
    recovery = run.summary.get("recovery") or {}
    if recovery.get("method") == "none":
        out.append("**No data was given and recovery was off**: pruned models kept the dense model's BatchNorm "
                   "statistics. Give calibration/training data for a better answer.")
    elif recovery.get("method") not in (None, "data"):
        held = (recovery.get("agreement") or {}).get("heldout")
        text = (f"**No data was given**: pruned models were recovered with *{esc(recovery['method'])}* "
                f"({recovery.get('samples', 0)} samples). ")
        if recovery.get("leak"):
            text += ("Those are inputs `evaluate` itself scores, so the accuracy above may be optimistic. ")
        if held is not None:
            text += (f"On held-out recorded inputs the recommended model agrees with the dense one on "
                     f"{fmt_pct(100 * held)}. ")
        out.append(text + "Give calibration/training data for a better and surer answer.")
    return out


def _warnings(run: RunData) -> list[str]:
    out = [esc(w) for w in run.warnings] + _accuracy_warnings(run)
    bad = [c for c in run.file_checks if not c.ok]
    if bad:
        out.append(f"{len(bad)} artifact file(s) do not match what the search recorded, so they may not be the "
                   "models measured here: " + "; ".join(esc(c.problem()) for c in bad) + ".")
    m = run.summary.get("measurement", {})
    if m.get("estimated"):
        out.append("Latencies in this report are **estimated** (roofline model), not measured on the device.")
    if m.get("tuned") is False:
        out.append("Latencies were measured with **untuned** TVM kernels, which can be many times slower than tuned "
                   "ones; compare them only with each other.")
    noisy = [model_label(r) for r in run.models() if (r.get("latency_ms") or {}).get("noisy")]
    if noisy:
        out.append(f"Noisy latency measurements (spread above the profile's limit after re-measuring): "
                   f"{', '.join(noisy)}. Treat small latency differences between these models with caution.")
    for r in run.pareto:
        if r.get("remeasure_note"):
            out.append(f"{model_label(r)}: {esc(r['remeasure_note'])}.")
        tuned = r.get("final_tuned")
        if tuned and "latency_ms" in tuned:
            out.append(f"{model_label(r)} was tuned on the device after the search ({tuned['tuning_trials']} "
                       f"MetaSchedule trials, {tuned['seconds']:.0f} s): {tuned['latency_ms']['median']:.3f} ms median "
                       f"(p90 {tuned['latency_ms']['p90']:.3f}); the tables show the search's measurement.")
        elif tuned:
            out.append(f"Tuning {model_label(r)} on the device after the search failed: {esc(tuned['error'])}.")
    srch = run.summary.get("search", {})
    if srch.get("interrupted"):
        out.append("The search was interrupted; this report covers the trials completed before that.")
    if srch.get("trials_failed"):
        out.append(f"{srch['trials_failed']} trial(s) failed; their reasons are under Search health.")
    return out


def _guard_text(run: RunData) -> str:
    guard = run.summary.get("accuracy_guard")
    if guard is None:
        return DASH
    if guard.get("floor") is None:
        return "off"
    return (f"{esc(run.metric)} at least {fmt_metric(guard['floor'])} ({esc(guard['max_drop'])} below the dense "
            f"{fmt_metric(guard['dense'])}), judged on the {esc(guard['judged_on'])}")


def _capabilities(backend: Any) -> Capabilities:
    """The capabilities of the backend a run folder names; none for a name this installation does not know."""
    try:
        return backend_capabilities(str(backend))
    except HwpruneError:
        return Capabilities()


def _request_section(run: RunData) -> Section:
    s = Section("What was asked")
    req = run.request
    prof = req.get("profile") or {}
    hw = prof.get("hardware") or {}
    s.blocks.append(Text("The search request, as recorded when the search started. Budgets typed relative to the "
                         "dense model (like `0.6x`) were resolved against the dense model's measured median latency "
                         "and memory."))
    rows: list[list[str]] = [
        ["Model", code(req.get("model"))],
        ["Device profile", code(req.get("device"))
         + (f" — {esc(prof['description'])}" if prof.get("description") else "")],
    ]
    hw_bits = []
    for key, label, unit in (("cpu", "CPU", ""), ("cores", "cores", ""), ("clock_ghz", "clock", " GHz"),
                             ("peak_gflops", "peak", " GFLOP/s"), ("memory_bandwidth_gbs", "memory bandwidth", " GB/s"),
                             ("ram_gb", "RAM", " GB"), ("accelerator", "accelerator", "")):
        if hw.get(key) not in (None, ""):
            hw_bits.append(f"{label}: {esc(hw[key])}{unit}" if key != "cpu" else esc(hw[key]))
    rows.append(["Hardware (from the profile)", "; ".join(hw_bits) or DASH])
    backend = req.get("backend") or prof.get("backend")
    runtime = [f"backend {code(backend)}"]
    settings = _capabilities(backend).settings
    if "ort" in settings and prof.get("ort"):
        o = prof["ort"]
        runtime.append(f"ONNX Runtime, {o.get('intra_op_threads')} intra-op / {o.get('inter_op_threads')} inter-op "
                       f"thread(s), graph optimization {code(o.get('graph_optimization_level'))}, providers "
                       f"{', '.join(code(p) for p in o.get('providers') or [])}")
    if "tvm" in settings and prof.get("tvm"):
        t = prof["tvm"]
        runtime.append(f"TVM target {code(t.get('target'))}, tuning trials {t.get('tuning_trials')}")
    if "rpc" in settings and prof.get("rpc"):
        runtime.append(f"RPC tracker {code(prof['rpc'].get('tracker'))} key {code(prof['rpc'].get('key'))}")
    if "ssh" in settings and prof.get("ssh"):
        runtime.append(f"over SSH to {code(prof['ssh'].get('host'))}")
    rows.append(["Runtime", "; ".join(runtime)])
    rows += [
        ["Latency budget", _budget_text(req.get("latency_budget"), req.get("latency_budget_ms"), "ms",
                                        "median latency")],
        ["Memory budget", _budget_text(req.get("memory_budget"), req.get("memory_budget_mb"), "MB",
                                       "memory (weights + peak activations)")],
        ["Accuracy guard", _guard_text(run)],
        ["Recovery data", esc((run.summary.get("recovery") or {}).get("note") or DASH)],
        ["Trials", f"{req.get('trials') if req.get('trials') is not None else 'until the timeout'}"
                   + (f", timeout {fmt_s(req.get('timeout_s'))}" if req.get("timeout_s") else "")],
        ["Seed", esc(req.get("seed"))],
        ["Sampler", code(req.get("sampler"))
         + (f" ({esc(req['sampler_repr'])})" if req.get("sampler_repr") else "")],
        ["Search space", f"at most {fmt_pct(100 * float(req.get('max_ratio') or 0))} of each channel group removed; "
                         f"kept widths rounded to multiples of {esc(req.get('channel_multiple') or 1)}"],
        ["Fine-tuning", f"{(req.get('finetune') or {}).get('trial_steps', 0)} steps per trial (after BatchNorm "
                        f"re-calibration on {esc(req.get('calibration_batches'))} batches); "
                        f"{(req.get('finetune') or {}).get('final_steps', 0)} steps for the recommended model"],
        ["ONNX exporter", code(req.get("exporter"))],
        ["Study", f"{code(req.get('study'))} in {code(req.get('storage'))}"],
        ["Started / finished", f"{esc(req.get('started') or DASH)} / {esc(run.summary.get('created') or DASH)}"],
    ]
    versions = req.get("versions") or {}
    rows.append(["Software", ", ".join(f"{esc(k)} {esc(v) if v else '(not installed)'}" for k, v in versions.items())
                 or DASH])
    s.blocks.append(Table(["Setting", "Value"], rows, align="ll"))
    command = str(req.get("command") or "")
    from_python = command.startswith("hwprune.search(")
    s.blocks.append(Text("The " + ("Python call" if from_python else "command") + " that started this search; run "
                         "it again to reproduce the search (with the same storage it resumes the study instead of "
                         "starting over):"))
    s.blocks.append(Code(command or "(not recorded)", "python" if from_python else "bash"))
    return s


def _answer_section(run: RunData) -> Section:
    s = Section("The answer")
    metric = run.metric
    req = run.request
    lat_b, mem_b = req.get("latency_budget_ms"), req.get("memory_budget_mb")
    m = run.summary.get("measurement", {})
    s.blocks.append(Text(
        f"The dense (unpruned) model, the recommended model and the rest of the **Pareto front**: the models no other "
        f"candidate beats on {metric}, latency and memory at once. The recommended model is the most accurate model "
        f"that meets every budget. {metric.capitalize()} during the search is a quick proxy (after BatchNorm "
        f"re-calibration" + (" and a short fine-tune" if (req.get("finetune") or {}).get("trial_steps") else "")
        + "); the most accurate models within the budgets by that proxy (up to "
        + str((req.get("finetune") or {}).get("final_candidates", 1)) + ") get the final fine-tune, and the most "
        "accurate after it is recommended"
        + ("" if _final_finetuned(run) else " (no final fine-tune here: no training data or 0 steps)") + ". "
        f"Latency is the median of {m.get('repeats')} timed runs after {m.get('warmup')} untimed warm-up runs; p90 is "
        f"the 90th percentile. "
        + ("Speedup = 1 / the model's latency ratio to the dense model measured side by side (the budget is judged "
           "on that ratio); the ms figures are each model's own median, timed on its own."
           if any(r.get("latency_ratio") for r in run.pareto) else "Speedup = dense latency / model latency.")))
    models = run.models()
    classes = ["dense" if r.get("trial") is None else "recommended" if r.get("recommended") else "" for r in models]
    rows = []
    for r in models:
        lat = r.get("latency_ms") or {}
        rows.append([model_cell(r), metric_cell(run, r), fmt_metric(r.get("accuracy_proxy")), latency_cell(r),
                     latency_cell(r, "p90"), f"± {sig(lat.get('std'))} ms (min {sig(lat.get('min'))})",
                     fmt_x(r.get("speedup")) + _flags(r), _meets(r, "latency", lat_b)])
    s.blocks.append(Table(
        ["Model", metric, f"{metric} (search proxy)", "Latency median", "Latency p90", "Spread (std, min)",
         "Speedup", "Meets latency budget"], rows, row_classes=classes,
        caption=f"Accuracy and speed (latency budget: {fmt_ms(lat_b) if lat_b is not None else 'none'})"))
    rows = []
    for r in models:
        mem = r.get("memory_mb") or {}
        rows.append([model_cell(r), fmt_mb(mem.get("total")), fmt_mb(mem.get("weights")),
                     fmt_mb(mem.get("peak_activations")), fmt_int(r.get("params")), fmt_x(r.get("size_ratio")),
                     fmt_count(r.get("macs")), fmt_bytes(r.get("file_bytes")), _meets(r, "memory", mem_b)])
    s.blocks.append(Table(
        ["Model", "Memory", "Weights", "Peak activations", "Parameters", "Size ratio", "MACs", "ONNX file",
         "Meets memory budget"], rows, row_classes=classes,
        caption=f"Size (memory budget: {fmt_mb(mem_b) if mem_b is not None else 'none'}). Memory = weights + peak "
                "activations; size ratio = parameters / dense parameters; MACs = multiply-accumulates per inference"))
    from hwprune.report import plots

    s.blocks.append(Figure("pareto", plots.pareto_plot(run), "Pareto front: latency vs " + metric,
                           f"Every completed trial at the latency and proxy {metric} the search measured. Colour = "
                           "memory (weights + peak activations); grey, faded = over a budget; outlined = Pareto front "
                           "(labels are trial numbers); X = dense model; star = recommended model as exported and "
                           "re-measured" + (", after its final fine-tune" if _final_finetuned(run) else "") +
                           ". Dotted line and the colour-bar mark = budgets. Failed trials are not plotted."))
    return s


def _widths_section(run: RunData) -> Section | None:
    rec = run.recommended
    if rec is None or not rec.get("widths"):
        return None
    from hwprune.report import plots

    s = Section("What was pruned")
    s.blocks.append(Text("Output channels of each prunable layer in the dense model and in the recommended model. "
                         "Pruning removes whole channels, so the pruned model is an ordinary, smaller dense model: no "
                         "sparse kernels are needed to run it fast."))
    if rec.get("removed_blocks"):
        s.blocks.append(Text("Residual blocks removed whole (each replaced by its skip connection, so its layers show "
                             "0 kept channels): " + ", ".join(code(b) for b in rec["removed_blocks"]) + "."))
    png = plots.widths_plot(run)
    if png:
        s.blocks.append(Figure("widths", png, "Per-layer widths", "Grey = original width, blue = kept channels."))
    rows = []
    for name, (orig, kept) in rec["widths"].items():
        ratio = (rec.get("ratios") or {}).get(name)
        rows.append([code(name), fmt_int(orig), fmt_int(kept), fmt_pct(100 * kept / orig if orig else None),
                     fmt_pct(100 * ratio) if ratio is not None else DASH])
    s.blocks.append(Table(["Layer", "Original", "Kept", "Kept share", "Requested removal"], rows,
                          caption="Per-layer widths of the recommended model (requested removal = the sampled ratio "
                                  "before rounding to the channel multiple; coupled layers share one ratio)"))
    return s


def _node_section(run: RunData) -> Section | None:
    from hwprune.report import plots

    rec = run.recommended
    dense_prof, rec_prof = run.node_profiles
    if dense_prof is None and rec_prof is None:
        return None
    s = Section("Where the time goes")
    runs = (rec_prof or dense_prof or {}).get("runs")
    backend = (rec_prof or dense_prof or {}).get("backend", "ort")
    tool = "ONNX Runtime's profiler" if _capabilities(backend).node_profile else f"the {backend} profiler"
    s.blocks.append(Text(
        f"Time per node from {tool}, averaged over {runs} profiled runs, summed by operator type. Node names and op "
        "types are those of the runtime's optimized graph (fused nodes get new names). Profiled runs carry profiler "
        "overhead, so their sum is not the end-to-end latency above; use them to see which layers dominate."))
    for prof, record in ((dense_prof, run.dense), (rec_prof, rec)):
        if not prof or record is None:
            continue
        total_us = sum(float(n.get("median_us") or 0) for n in prof.get("nodes", []))
        median_us = 1000.0 * float((record.get("latency_ms") or {}).get("median") or 0)
        if median_us and total_us > 2 * median_us:
            s.blocks.append(Text(
                f"The {model_label(record)} profile adds up to {total_us:.1f} µs per run, more than twice the model's "
                f"measured median latency ({median_us:.1f} µs): at least one profiled run was disturbed (e.g. by "
                "another process), so some nodes look slower than they are. Trust the latency tables over this "
                "breakdown.", "note"))
    png = plots.node_latency_plot(run)
    if png:
        s.blocks.append(Figure("node_latency", png, "Per-op-type latency, dense vs recommended"))
    dense_t = plots.op_type_totals(dense_prof) if dense_prof else {}
    rec_t = plots.op_type_totals(rec_prof) if rec_prof else {}
    ops = sorted(set(dense_t) | set(rec_t), key=lambda op: -max(dense_t.get(op, 0.0), rec_t.get(op, 0.0)))
    rows = [[code(op), f"{dense_t[op]:.1f}" if op in dense_t else DASH, f"{rec_t[op]:.1f}" if op in rec_t else DASH]
            for op in ops]
    rows.append(["**all nodes**", f"{sum(dense_t.values()):.1f}" if dense_t else DASH,
                 f"{sum(rec_t.values()):.1f}" if rec_t else DASH])
    label = f"trial {rec['trial']} (recommended), µs" if rec is not None else "recommended, µs"
    s.blocks.append(Table(["Op type", "dense, µs", label], rows, caption="Median time per inference by op type"))
    prof, who = (rec_prof, model_label(rec)) if rec_prof else (dense_prof, "dense")
    nodes = sorted(prof.get("nodes", []), key=lambda n: -float(n.get("median_us") or 0))[:10]
    total = sum(float(n.get("median_us") or 0) for n in prof.get("nodes", [])) or 1.0
    s.blocks.append(Table(["Node", "Op type", "Median µs", "Share"],
                          [[code(n.get("name")), code(n.get("op_type")), f"{float(n.get('median_us') or 0):.1f}",
                            fmt_pct(100 * float(n.get("median_us") or 0) / total)] for n in nodes],
                          align="llrr", caption=f"The slowest nodes of the {who} model"))
    return s


def _measurement_section(run: RunData) -> Section:
    s = Section("How it was measured")
    m = run.summary.get("measurement", {})
    prof = run.request.get("profile") or {}
    remeasure = (prof.get("measure") or {}).get("remeasure")
    inp = run.dense.get("input") or {}
    min_repeat = _num((prof.get("measure") or {}).get("min_repeat_ms")) or 0.0
    batching = (f" Each timed run calls the model back to back until at least {sig(min_repeat)} ms have passed and "
                "counts the mean time per call, so sub-millisecond models are not lost in timer resolution."
                if min_repeat > 0 else "")
    s.blocks.append(Text(
        f"Latency: each model's ONNX file was run {m.get('warmup')} times untimed (warm-up), then {m.get('repeats')} "
        f"timed runs with batch size 1 on an input of shape {code(inp.get('shape'))} ({esc(inp.get('dtype'))}); the "
        f"tables report the median and p90 of those runs.{batching} A measurement is **noisy** when its robust spread "
        f"(1.4826 × median absolute deviation / median) stays above {fmt_pct(100 * float(m.get('max_cv') or 0))} "
        f"after re-measuring up to {remeasure if remeasure is not None else '?'} times; noisy numbers are marked "
        "\"noisy\" wherever they appear."))
    s.blocks.append(Text(
        "Memory = **weights** (the model's parameter tensors) + **peak activations** (the largest total of "
        "intermediate tensors alive at once while the graph runs, input and output included). Both are computed from "
        "the ONNX graph, so they do not depend on the host; the process peak is the measured growth of the measuring "
        "process's resident memory, shown for reference only."))
    est = m.get("estimated")
    tuned = m.get("tuned")
    rows = [
        ["Backend", code(m.get("backend"))],
        ["Threads", esc(m.get("threads") if m.get("threads") is not None else DASH)],
        ["Warm-up runs / timed runs", f"{m.get('warmup')} / {m.get('repeats')}"],
        ["Minimum duration of one timed run", f"{sig(min_repeat)} ms" if min_repeat > 0 else "none (one call per run)"],
        ["Noise limit (robust CV)", fmt_pct(100 * float(m.get("max_cv") or 0))],
        ["Latency source", "**estimated** (roofline model, not measured)" if est else "measured on the device"],
    ]
    if tuned is not None:
        rows.append(["TVM kernels", "tuned (MetaSchedule)" if tuned else "**untuned**"])
    s.blocks.append(Table(["Condition", "Value"], rows, align="ll"))
    rows = []
    for r in run.models():
        lat = r.get("latency_ms") or {}
        load = r.get("load_avg")
        rows.append([
            model_cell(r),
            f"{code(r.get('backend'))}, " + ("estimated" if r.get("estimated") else
                                             "measured, untuned" if r.get("tuned") is False else "measured"),
            f"{lat.get('repeats')} / {lat.get('warmup')}", fmt_int(lat.get("remeasured")),
            fmt_pct(100 * float(lat["cv"])) if _num(lat.get("cv")) is not None else DASH,
            "**yes**" if lat.get("noisy") else "no", fmt_ms(lat.get("cpu_median")),
            " / ".join(f"{float(x):.2f}" for x in load) if load else DASH,
            fmt_mb((r.get("memory_mb") or {}).get("process_peak")),
        ])
    s.blocks.append(Table(
        ["Model", "Latency source", "Runs (timed / warm-up)", "Re-measured", "CV (std / mean)", "Noisy",
         "CPU-time median", "Host load avg (1/5/15 min)", "Process peak"], rows, align="llrrrlrrr",
        caption="Per-model measurement conditions. The recommended model was re-measured from its exported file; the "
                "other Pareto models keep their trial measurement. CPU-time median = thread CPU time per run (less "
                "sensitive to other processes than wall time). Load average: the measuring host's, at measurement"))
    return s


def _artifact_section(run: RunData) -> Section:
    s = Section("Files to deploy")
    checks = run.file_checks
    bad = [c for c in checks if not c.ok]
    rec = run.recommended
    s.blocks.append(Text(
        "The files the search wrote, with the sizes and SHA-256 checksums recorded in `summary.json`. Each was "
        "hashed again when this report was built. `model.onnx` is what you deploy; `weights.pt` is the PyTorch "
        "state_dict of the pruned model and `model.pt` the whole pruned `torch.nn.Module` (load it with "
        "`torch.load(path, weights_only=False)`) for further training. Paths are relative to the run folder."))
    if bad:
        s.blocks.append(Text(f"{len(bad)} of {len(checks)} files do NOT match the search's record: "
                             + "; ".join(esc(c.problem()) for c in bad) + ".", "warning"))
    else:
        s.blocks.append(Text(f"All {len(checks)} files match their recorded SHA-256.", "ok"))
    status = {"ok": "ok", "missing": "**MISSING**", "mismatch": "**MISMATCH**", "outside": "**NOT IN RUN FOLDER**"}

    def row(c: FileCheck) -> list[str]:
        label = f"**{c.model} (recommended)**" if rec is not None and c.model == model_label(rec) else c.model
        return [label, esc(c.kind), code(c.path), fmt_bytes(c.bytes), code(c.sha256 or DASH), status[c.status]]

    s.blocks.append(Table(["Model", "File", "Path", "Size", "SHA-256", "Check"], [row(c) for c in checks],
                          align="lllrll"))
    if rec is not None:
        inp = rec.get("input") or {}
        s.blocks.append(Text(
            f"Load and run the recommended model with ONNX Runtime (`pip install onnxruntime numpy`). The snippet "
            f"feeds a random input of the recorded shape {code(inp.get('shape'))} and dtype {esc(inp.get('dtype'))}; "
            "replace it with real, identically pre-processed data."))
        s.blocks.append(Code(onnx_snippet(rec), "python"))
    return s


def _health_section(run: RunData) -> Section:
    from hwprune.report import plots

    s = Section("Search health")
    srch = run.summary.get("search", {})
    s.blocks.append(Text(
        "How the search went. A trial is one candidate: prune, export, measure, evaluate. Trials whose architecture "
        "(kept widths) had already been measured reuse that measurement (cached) instead of timing the same model "
        "again. Feasible = met every budget."))
    rows = [
        ["Completed trials", fmt_int(srch.get("trials_complete"))],
        ["of which reused an earlier measurement (cached)", fmt_int(srch.get("trials_cached"))],
        ["of which feasible", fmt_int(srch.get("trials_feasible"))],
        ["Failed trials", fmt_int(srch.get("trials_failed"))],
        ["Pruned (stopped early) trials", fmt_int(srch.get("trials_pruned"))],
        ["Pareto-optimal feasible models", fmt_int(len(run.pareto))],
        ["Prunable channel groups (search dimensions)", fmt_int(srch.get("knobs"))],
        ["Wall time of the whole search", fmt_s(srch.get("wall_seconds"))],
    ]
    if srch.get("interrupted"):
        rows.append(["Interrupted", "**yes**"])
    s.blocks.append(Table(["Trials", "Count"], rows))
    failures = srch.get("failures") or []
    if failures:
        s.blocks.append(Table(["Failed trial", "Reason"], [[str(f.get("trial")), esc(f.get("reason"))]
                                                           for f in failures], align="rl",
                              caption="Why trials failed"))
    stages = srch.get("stage_seconds") or {}
    if stages:
        s.blocks.append(Table(["Stage", "Seconds", "What it is"],
                              [[code(k), fmt_s(v), STAGES.get(k, DASH)] for k, v in stages.items()], align="lrl",
                              caption="Time spent per stage, summed over all trials (stages marked 'part of measure' "
                                      "are included in measure)"))
    hv = srch.get("hypervolume") or []
    png = plots.hypervolume_plot(hv)
    if png:
        s.blocks.append(Figure(
            "hypervolume", png, "Hypervolume over trials",
            f"Hypervolume of the feasible front after each completed trial (last: {sig(hv[-1][1], 4)}): the volume of "
            f"objective space the front dominates, with {run.metric}, latency and memory normalised by the dense "
            "model's. It rises when a trial improves the front; a long flat tail means more trials are unlikely to "
            "help."))
    df = run.trials
    if len(df):
        pareto_trials = {m["trial"] for m in run.pareto}
        rec_trial = run.summary.get("recommended")
        rows, classes = [], []
        for _, t in df.iterrows():
            n = int(t["trial"])
            notes = []
            if n == rec_trial:
                notes.append("**recommended**")
            elif n in pareto_trials:
                notes.append("Pareto front")
            if _num(t.get("cached_from")) == -1:
                notes.append("no channel removed: the dense model, with its measurement")
            elif _num(t.get("cached_from")) is not None:
                notes.append(f"reused trial {int(t['cached_from'])}'s measurement")
            if t.get("fail_reason"):
                notes.append(f"failed: {esc(t['fail_reason'])}")
            done = t["state"] == "COMPLETE"
            rows.append([str(n), esc(t["state"]).lower(), fmt_metric(t["accuracy"]) if done else DASH,
                         fmt_ms(t["latency_ms"]) if done else DASH, fmt_mb(t["memory_mb"]) if done else DASH,
                         ("yes" if t["feasible"] else "no") if done else DASH, fmt_s(t.get("duration_s")),
                         "; ".join(notes)])
            classes.append("recommended" if n == rec_trial else "" if done and t["feasible"] else "faded")
        est = " (estimated)" if run.summary.get("measurement", {}).get("estimated") else ""
        s.blocks.append(Table(
            ["Trial", "State", f"{run.metric} (proxy)", f"Latency{est}", "Memory", "Feasible", "Duration", "Notes"],
            rows, align="rlrrrlrl", row_classes=classes,
            caption=f"Every trial, from {run.trials_source}. Latency and {run.metric} are the trial's own "
                    "measurements (the recommended model was re-measured and fine-tuned afterwards)"))
    return s


def report_document(run: RunData) -> Document:
    """The deployment report of a loaded run folder."""
    req = run.request
    # the answer first: whoever ships the model reads the summary, the tables and the files; the rest is evidence
    sections = [_summary_section(run), _answer_section(run), _artifact_section(run), _widths_section(run),
                _node_section(run), _request_section(run), _measurement_section(run), _health_section(run)]
    from hwprune import __version__

    return Document(
        title=f"Deployment report: {esc(req.get('model'))} on {esc(req.get('device'))}",
        subtitle=(f"Study {code(run.name)}, hwprune {esc(run.summary.get('hwprune_version'))}, search finished "
                  f"{esc(run.summary.get('created') or DASH)}. Every number below comes from this run folder "
                  "(`summary.json`, `trials.csv`, per-node profiles)."),
        sections=[s for s in sections if s is not None],
        footer=(f"Built by hwprune {__version__} from the run folder alone; rebuild it any time with "
                "`hwprune report RUN_FOLDER`."),
    )
