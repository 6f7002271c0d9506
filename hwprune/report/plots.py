"""The report's plots, drawn with matplotlib's Agg backend into PNG bytes.

PNGs are written without a "Software" tag or timestamps so the same run folder always gives byte-identical images
(a report rebuilt on another machine with the same matplotlib is the same file).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402

from hwprune.report.cells import by_ratio  # noqa: E402
from hwprune.report.data import JUDGED_COLUMN, RunData  # noqa: E402

DPI = 130
DENSE = "#222222"
RECOMMENDED = "#d62728"
INFEASIBLE = "#9e9e9e"
BUDGET = "#d62728"
COLOR_A = "#1f77b4"
COLOR_B = "#ff7f0e"
INT8_COLOR = "#ff7f0e"  # layers a model runs in INT8 (widths plot)
CMAP = "viridis"


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _style(ax: Any) -> None:
    ax.grid(True, color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _finite(v: Any) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class TradeOff:
    """What the trade-off plot draws, on one latency scale: the latency the budget judges (ms), as the tables show
    it, so every feasible trial lies at or left of the budget line."""

    done: pd.DataFrame  # completed trials: trial, x (judged ms), accuracy, memory_mb, feasible
    front: pd.DataFrame  # the Pareto models' trial points, by x
    budget_ms: float | None
    dense: tuple[float, float]  # (x, metric)
    recommended: tuple[float, float] | None  # the exported, re-measured recommended model
    arrow_from: tuple[float, float] | None  # its trial's point, where the re-measured model moved from it


def trade_off(run: RunData) -> TradeOff:
    """The points of the trade-off plot (:class:`TradeOff`)."""
    df = run.trials
    done = df[(df["state"] == "COMPLETE") & df["accuracy"].notna() & df[JUDGED_COLUMN].notna()] if len(df) else df
    done = done.assign(x=done[JUDGED_COLUMN]) if len(done) else done.assign(x=[])
    # the front as the trials measured it (proxy metric, trial latency), so it lines up with the other dots
    front = done[done["trial"].isin([m["trial"] for m in run.pareto])] if len(done) else done
    front = front.drop_duplicates("trial").sort_values("x") if len(front) else front
    budget = run.request.get("latency_budget_ms")
    rec, star, arrow = run.recommended, None, None
    if rec is not None:
        star = (float(rec["latency_ms"]["judged"]), float(rec["accuracy"]))
        row = front[front["trial"] == rec["trial"]] if len(front) else front
        if len(row):
            arrow = (float(row["x"].iloc[0]), float(row["accuracy"].iloc[0]))
            arrow = None if abs(arrow[0] - star[0]) <= 1e-12 and abs(arrow[1] - star[1]) <= 1e-12 else arrow
    d = run.dense
    return TradeOff(done, front, float(budget) if _finite(budget) else None,
                    (float(d["latency_ms"]["judged"]), float(d["accuracy"])), star, arrow)


def _dense_and_recommended(ax: Any, run: RunData, points: TradeOff) -> list[Any]:
    """The dense model's X and the recommended model's star, with an arrow from its trial's dot when the exported,
    re-measured model moved; returns their legend handles."""
    handles: list[Any] = []
    handles.append(ax.scatter([points.dense[0]], [points.dense[1]], marker="X", s=130, color=DENSE,
                              label="dense (unpruned)", zorder=6))
    rec = run.recommended
    if rec is not None and points.recommended is not None:
        x, y = points.recommended
        tuned = "final_finetune" in (run.summary.get("search", {}).get("stage_seconds") or {})
        handles.append(ax.scatter([x], [y], marker="*", s=330, color=RECOMMENDED, edgecolors="white", linewidths=0.8,
                                  label=f"recommended T{rec['trial']}: exported file, re-measured"
                                        + (", fine-tuned" if tuned else ""), zorder=7))
        if points.arrow_from is not None:
            ax.annotate("", xy=(x, y), xytext=points.arrow_from, zorder=6,
                        arrowprops={"arrowstyle": "->", "color": RECOMMENDED, "lw": 1.2, "shrinkA": 5,
                                    "shrinkB": 7})
    return handles


def latency_axis(run: RunData) -> str:
    """The latency axis's label: the latency the budget judges, and how it is made."""
    if by_ratio(run):
        return "latency (ms) = ratio to the dense model measured beside it x dense reference - lower is better"
    return "latency, own median (ms) - lower is better"


def pareto_plot(run: RunData) -> bytes:
    """Latency vs metric for every completed trial; colour = memory, Pareto models outlined, budgets drawn."""
    from matplotlib.lines import Line2D

    metric = run.metric
    mem_budget = run.request.get("memory_budget_mb")
    points = trade_off(run)
    done, front = points.done, points.front
    feasible = done[done["feasible"]] if len(done) else done
    infeasible = done[~done["feasible"]] if len(done) else done

    # the colour scale spans the models, not the budget: a generous budget would squash every model into one colour
    mems = [float(v) for v in done["memory_mb"] if _finite(v)] if len(done) else []
    mems += [float(m["memory_mb"]["total"]) for m in run.models()]
    lo, hi = min(mems), max(mems)
    norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-9)

    fig, ax = plt.subplots(figsize=(8.6, 4.8))
    _style(ax)
    handles: list[Any] = []
    if len(infeasible):
        handles.append(ax.scatter(infeasible["x"], infeasible["accuracy"], s=28, color=INFEASIBLE,
                                  alpha=0.35, linewidths=0, label="trial over a budget (infeasible)", zorder=2))
    if len(feasible):
        handles.append(ax.scatter(feasible["x"], feasible["accuracy"], s=34, c=feasible["memory_mb"],
                                  cmap=CMAP, norm=norm, alpha=0.8, linewidths=0, label="feasible trial", zorder=3))
    # not joined by a line: with memory as a third objective the front is not a staircase in this projection
    if len(front):
        handles.append(ax.scatter(front["x"], front["accuracy"], s=80, c=front["memory_mb"], cmap=CMAP,
                                  norm=norm, edgecolors="black", linewidths=1.3, label="Pareto front (T = trial)",
                                  zorder=4))
        for _, r in front.iterrows():
            ax.annotate(f"T{int(r['trial'])}", (r["x"], r["accuracy"]), textcoords="offset points",
                        xytext=(7, -3), fontsize=7.5, color="#333333", zorder=5)

    handles += _dense_and_recommended(ax, run, points)
    if points.budget_ms is not None:
        handles.append(ax.axvline(points.budget_ms, color=BUDGET, linestyle=":", linewidth=1.6,
                                  label=f"latency budget {points.budget_ms:.3g} ms"))
    cb = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=CMAP), ax=ax, pad=0.02)
    cb.set_label("memory: weights + peak activations (MB)")
    if _finite(mem_budget):
        mb = float(mem_budget)
        if lo <= mb <= hi:
            cb.ax.axhline(mb, color=BUDGET, linewidth=2)
        where = "every model is under it" if mb > hi else "every model is over it" if mb < lo else \
            "red mark on the colour bar"
        handles.append(Line2D([], [], color=BUDGET, linewidth=2, label=f"memory budget {mb:.3g} MB ({where})"))
    ax.set_xlabel(latency_axis(run))
    ax.set_ylabel(f"{metric} - higher is better")
    est = " (ESTIMATED latency)" if run.summary.get("measurement", {}).get("estimated") else ""
    ax.set_title(f"Trade-off of every completed trial{est}", fontsize=11, loc="left")
    # below the axes, so it never hides a point
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    return _png(fig)


def int8_layers(record: dict[str, Any]) -> set[str]:
    """The layers (qualified module names) whose weighted nodes a model runs in INT8, from its ``precision`` record's
    node precision (empty for FP32 models and searches that do not quantize)."""
    nodes = (record.get("precision") or {}).get("nodes") or {}
    if not any(p == "int8" for p in nodes.values()):
        return set()
    from hwprune.quant.plan import module_of  # lazy: the report's import stays light

    return {module_of(n) or n for n, p in nodes.items() if p == "int8"}


def widths_plot(run: RunData) -> bytes | None:
    """Per-layer output channels: original (grey) and kept by the recommended model (coloured; hatched in orange
    where the layer runs in INT8)."""
    rec = run.recommended
    if rec is None or not rec.get("widths"):
        return None
    layers = list(rec["widths"].items())
    n = len(layers)
    fig, ax = plt.subplots(figsize=(8.6, min(0.26 * n + 1.2, 30)))
    ax.grid(True, axis="x", color="#e5e5e5")
    ax.set_axisbelow(True)
    ys = list(range(n))
    orig = [int(w[0]) for _, w in layers]
    kept = [int(w[1]) for _, w in layers]
    ax.barh(ys, orig, color="#d9d9d9", height=0.75, label="original (dense)")
    int8 = int8_layers(rec)
    q = [name in int8 for name, _ in layers]
    suffix = " in FP32" if any(q) else ""
    ax.barh([y for y, i in zip(ys, q) if not i], [k for k, i in zip(kept, q) if not i], color=COLOR_A, height=0.45,
            label=f"kept by trial {rec['trial']} (recommended){suffix}")
    if any(q):  # --quantize int8: the same widths, marked by precision
        ax.barh([y for y, i in zip(ys, q) if i], [k for k, i in zip(kept, q) if i], color=INT8_COLOR, height=0.45,
                hatch="///", edgecolor="white", label="kept, INT8")
    for y, o, k in zip(ys, orig, kept):
        ax.text(o, y, f" {k}/{o}", va="center", fontsize=7.5, color="#333333")
    ax.set_yticks(ys, [name for name, _ in layers], fontsize=8 if n < 40 else 6)
    ax.invert_yaxis()
    ax.set_xlim(0, max(orig) * 1.15)
    return _finish_bars(fig, ax, "output channels", "Per-layer widths: original vs recommended")


def op_type_totals(profile: dict[str, Any]) -> dict[str, float]:
    """Median microseconds per inference (per node, over the profiled runs) summed by ONNX op type."""
    out: dict[str, float] = {}
    for node in profile.get("nodes", []):
        op = str(node.get("op_type") or "?")
        out[op] = out.get(op, 0.0) + float(node.get("median_us") or 0.0)
    return out


def node_latency_plot(run: RunData) -> bytes | None:
    """Per-op-type time, dense vs recommended, from the per-node profiles."""
    rec = run.recommended
    dense_prof, rec_prof = run.node_profiles
    if dense_prof is None and rec_prof is None:
        return None
    series = [("dense", dense_prof, DENSE)]
    if rec_prof is not None:
        series.append((f"trial {rec['trial']} (recommended)", rec_prof, COLOR_A))
    totals = [(label, op_type_totals(p) if p else {}, color) for label, p, color in series]
    ops = sorted({op for _, t, _ in totals for op in t}, key=lambda op: -max(t.get(op, 0.0) for _, t, _ in totals))
    n = len(ops)
    fig, ax = plt.subplots(figsize=(8.6, min(0.42 * n + 1.3, 14)))
    ax.grid(True, axis="x", color="#e5e5e5")
    ax.set_axisbelow(True)
    h = 0.8 / len(totals)
    for i, (label, t, color) in enumerate(totals):
        ys = [j - 0.4 + h * (i + 0.5) for j in range(n)]
        vals = [t.get(op, 0.0) for op in ops]
        ax.barh(ys, vals, height=h * 0.92, color=color, label=label)
        for y, v in zip(ys, vals):
            ax.text(v, y, f" {v:.1f}", va="center", fontsize=7)
    ax.set_yticks(range(n), ops, fontsize=8)
    ax.invert_yaxis()
    return _finish_bars(fig, ax, "median time per inference (µs), summed over the nodes of each op type",
                        "Where the time goes: per-op-type latency, dense vs recommended")


def _finish_bars(fig: Any, ax: Any, xlabel: str, title: str) -> bytes:
    """Label, frame and title a horizontal bar chart; the legend sits above the axes, so it never hides a bar."""
    ax.set_xlabel(xlabel)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title(title, fontsize=11, loc="left", pad=22)
    ax.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False)
    return _png(fig)


def hypervolume_plot(history: Sequence[Sequence[float]]) -> bytes | None:
    """Hypervolume of the feasible front after each completed trial."""
    if not history:
        return None
    xs = [int(p[0]) for p in history]
    ys = [float(p[1]) for p in history]
    fig, ax = plt.subplots(figsize=(8.6, 2.8))
    _style(ax)
    ax.step(xs, ys, where="post", color=COLOR_A, linewidth=1.8)
    ax.scatter(xs, ys, s=12, color=COLOR_A, zorder=3)
    ax.set_xlabel("trial number")
    ax.set_ylabel("hypervolume")
    ax.set_title("Search progress: hypervolume of the feasible front (higher is better)", fontsize=11, loc="left")
    if len(xs) < 15:
        ax.set_xticks(xs)
    return _png(fig)


def compare_fronts_plot(a: RunData, b: RunData, label_a: str, label_b: str) -> bytes:
    """Both runs' Pareto fronts and recommended models on one latency vs metric plot."""
    fig, ax = plt.subplots(figsize=(8.6, 4.6))
    _style(ax)
    for run, label, color, marker in ((a, label_a, COLOR_A, "o"), (b, label_b, COLOR_B, "s")):
        front = sorted(run.pareto, key=lambda m: m["latency_ms"]["judged"])
        if front:
            xs = [m["latency_ms"]["judged"] for m in front]
            ys = [m["accuracy"] for m in front]
            # the best accuracy available at or below each latency: how the front moved, read along the x axis
            best = [max(ys[:i + 1]) for i in range(len(ys))]
            ax.plot(xs, best, color=color, linewidth=1.2, linestyle="--", drawstyle="steps-post")
            ax.scatter(xs, ys, s=60, color=color, marker=marker, edgecolors="black", linewidths=0.8,
                       label=f"{label}: Pareto front", zorder=4)
        d = run.dense
        ax.scatter([d["latency_ms"]["judged"]], [d["accuracy"]], marker="X", s=110, color=color,
                   edgecolors="black", linewidths=0.8, label=f"{label}: dense", zorder=5)
        rec = run.recommended
        if rec is not None:
            ax.scatter([rec["latency_ms"]["judged"]], [rec["accuracy"]], marker="*", s=300, color=color,
                       edgecolors="black", linewidths=0.8, label=f"{label}: recommended (T{rec['trial']})", zorder=6)
        budget = run.request.get("latency_budget_ms")
        if _finite(budget):
            ax.axvline(float(budget), color=color, linestyle=":", linewidth=1.3,
                       label=f"{label}: latency budget {float(budget):.3g} ms")
    ax.set_xlabel(latency_axis(a) if latency_axis(a) == latency_axis(b) else
                  "latency as each run's budget judges it (ms) - lower is better")
    ax.set_ylabel(f"{a.metric} - higher is better")
    ax.set_title("Pareto fronts of both runs", fontsize=11, loc="left")
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    return _png(fig)
