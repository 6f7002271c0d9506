"""A small document model rendered to Markdown and to self-contained HTML.

Both outputs come from the same :class:`Document`, so the HTML and the Markdown say exactly the same things.
Nothing in a document depends on when or where it was built, so rebuilding a run folder that was copied
elsewhere gives identical files. The page's style sheet is package data (``report.css``).
"""

from __future__ import annotations

import base64
import html
import re
from importlib import resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from hwprune.export import atomic_write_bytes, atomic_write_text


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


# The page's style sheet, shipped as package data next to this module (pyproject: [tool.setuptools.package-data]).
_CSS = resources.files("hwprune.report").joinpath("report.css").read_text(encoding="utf-8")

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
