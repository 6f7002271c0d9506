"""Shared by the report tests: one small real search (made once per session) and reading rendered tables back."""

from __future__ import annotations

import html.parser
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import hwprune


# ---------------------------------------------------------------------------------------------------------------------
# the real search


def tiny_factory() -> dict[str, Any]:
    """A 3-conv net trained for a few steps on generated shapes, with training data so the final fine-tune runs."""
    from hwprune.subjects.shapes import make_shapes
    from hwprune.train import accuracy, finetune

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 48, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(48), nn.ReLU(),
        nn.Conv2d(48, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )
    xt, yt = make_shapes(256, seed=3)
    batches = [(xt[i:i + 64], yt[i:i + 64]) for i in range(0, 256, 64)]
    finetune(model, batches, 12, lr=0.05)
    xv, yv = make_shapes(256, seed=7)
    return {"model": model.eval(), "example_inputs": (xv[:1].clone(),),
            "evaluate": lambda m: accuracy(m, [(xv, yv)]), "train_data": batches, "calibration_data": batches,
            "loss_fn": nn.functional.cross_entropy}


_RUNS: dict[str, Path] = {}


def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of a small real search, made once per test session (shared with the browser test)."""
    if "run" not in _RUNS:
        out = tmp_path_factory.mktemp("search")
        result = hwprune.search(model=tiny_factory, device="host-cpu", latency_budget_ms="0.9x", trials=5, out=out,
                                seed=0, trial_finetune_steps=2, final_finetune_steps=2, channel_multiple=8,
                                max_accuracy_drop="off", progress=False, study="tiny")
        _RUNS["run"] = result.run_dir
    return _RUNS["run"]


# ---------------------------------------------------------------------------------------------------------------------
# reading the rendered tables back


def _unmark(cell: str) -> str:
    """A Markdown cell as the HTML shows it: no ** or backticks, escapes resolved."""
    cell = cell.replace("**", "").replace("`", "")
    return re.sub(r"\\(.)", r"\1", cell).strip()


def md_tables(text: str) -> list[list[list[str]]]:
    """Every pipe table of a Markdown text as rows of cells (header row first, separator dropped)."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                current.append([c.replace("\\|", "|") for c in cells])
        elif current:
            tables.append(current)
            current = []
    return tables


class _HtmlTables(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None
        self._in_caption = False

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "caption":
            self._in_caption = True

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "caption":
            self._in_caption = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None and not self._in_caption:
            self._cell.append(data)


def html_tables(text: str) -> list[list[list[str]]]:
    p = _HtmlTables()
    p.feed(text)
    return p.tables


def find_table(tables: list[list[list[str]]], *headers: str) -> list[dict[str, str]]:
    """The first table whose header row starts with ``headers``, as dicts keyed by header."""
    for t in tables:
        if t and t[0][:len(headers)] == list(headers):
            return [dict(zip(t[0], row)) for row in t[1:]]
    raise AssertionError(f"no table with headers {headers}")


def row_of(rows: list[dict[str, str]], label: str) -> dict[str, str]:
    match = [r for r in rows if _unmark(r["Model"]) == _unmark(label)]
    assert len(match) == 1, f"{label}: {[r['Model'] for r in rows]}"
    return match[0]
