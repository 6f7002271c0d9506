"""bench_search's Markdown tables and the lines under them.
"""

from __future__ import annotations

import math
import os
from typing import Any



from bench.common import JUDGED, NEAR, NOISE_TOL, ROOT, STAT_NAMES
from bench.search_baselines import Final


def near_table(finals: list[Final]) -> str:
    """The uniform-16 architectures near each hwprune pick, after the common fine-tune, measured side by side."""
    hw = {(f.subject, f.budget): f for f in finals if f.method == "hwprune"}
    lines = ["| model | budget | uniform-16 | MACs M | params K | accuracy | ÷ dense, alternating samples "
             "| hwprune's pick | no slower than hwprune's pick |", "|" + "---|" * 9]
    for f in finals:
        if f.method != NEAR or not f.latency:
            continue
        pick = hw.get((f.subject, f.budget))
        pick_lat = pick.latency.get(JUDGED) if pick is not None and pick.latency else None
        lines.append(f"| {f.subject} | {f.budget:g}x | {f.setting} | {f.macs / 1e6:.2f} | {f.params / 1e3:.1f} "
                     f"| {_f(f.accuracy, '.3f')} | {f.latency[JUDGED]:.3f} "
                     f"| {_f(pick.accuracy if pick else None, '.3f')} @ {_f(pick_lat, '.3f')}x, "
                     f"{pick.macs / 1e6 if pick else 0:.2f} M "
                     f"| {'–' if pick_lat is None else 'yes' if f.latency[JUDGED] <= pick_lat else 'no'} |")
    return "\n".join(lines)


# tables


def _f(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def results_table(finals: list[Final]) -> str:
    """The main Markdown table: one row per model."""
    lines = ["| model | budget | method | chose (its own latency ratio) | accuracy (BN-cal → fine-tuned) "
             "| latency ms, median (dense) | ÷ dense: alternating samples / wall median / CPU median / min "
             "| meets budget (alt./wall/CPU/min) "
             "| MACs M (÷ dense) | params K | trials / ORT meas. | select s | fine-tune s |",
             "|" + "---|" * 13]
    dense_macs = {f.subject: f.macs for f in finals if f.method == "dense"}
    for f in finals:
        if f.method == NEAR:
            continue
        lat = f.latency
        if f.budget is None:
            meets = "–"
        elif not lat:
            meets = "no model"
        else:
            meets = "/".join("yes" if lat[k] <= f.budget else "NO"
                             for k in ("ratio_pair", "ratio_wall", "ratio_cpu", "ratio_min"))
        acc = "–" if f.accuracy is None else (
            f"{_f(f.accuracy_calibrated, '.3f')} → {f.accuracy:.3f}" if f.accuracy_calibrated is not None
            else f"{f.accuracy:.3f}")
        lat_txt = f"{lat['wall_ms']:.3f} ({lat['dense_wall_ms']:.3f})" if lat else "–"
        cost = "–" if f.method == "dense" else (f"{f.trials} / {f.measurements}" if f.trials is not None
                                                else f"– / {f.measurements}")
        macs = f"{f.macs / 1e6:.2f} ({f.macs / max(dense_macs.get(f.subject, 1), 1):.2f})" if f.macs else "–"
        chose = f.setting if f.select_latency_ratio is None else f"{f.setting} ({f.select_latency_ratio:.2f}x)"
        ratios = " / ".join(_f(lat.get(k), ".3f") for k in ("ratio_pair", "ratio_wall", "ratio_cpu", "ratio_min")) \
            if lat else "–"
        params = f"{f.params / 1e3:.1f}" if f.params else "–"
        seconds = "– | –" if f.method == "dense" else f"{f.select_seconds:.0f} | {f.finetune_seconds:.0f}"
        lines.append(
            f"| {f.subject} | {'–' if f.budget is None else f'{f.budget:g}x'} | {f.method} | {chose} | {acc} "
            f"| {lat_txt} | {ratios} | {meets} | {macs} | {params} | {cost} | {seconds} |")
    return "\n".join(lines)


def overhead_table(rows: list[dict[str, Any]]) -> str:
    """hwprune's per-trial overhead split by stage."""
    lines = ["| model | budget | trials (cached) | prune | export | session | timing | dense beside | evaluate "
             "| calibrate | finetune | whole search ÷ trials |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['model']} | {r['budget']:g}x | {r['trials']} ({r['cached']}) | {r['prune']:.2f} "
                     f"| {r['export']:.2f} | {r['session']:.2f} | {r['timing']:.2f} "
                     f"| {r.get('dense_beside', 0.0):.2f} | {r['evaluate']:.2f} "
                     f"| {r['calibrate']:.2f} | {r['finetune']:.2f} | {r['search_wall']:.2f} |")
    return "\n".join(lines)


def budget_lines(finals: list[Final]) -> list[str]:
    """How each hwprune search resolved its relative budget, against the interleaved dense median of this run."""
    out = []
    dense = {f.subject: f.latency.get("wall_ms") for f in finals if f.method == "dense"}
    for f in finals:
        if f.method != "hwprune" or not f.extra or not dense.get(f.subject):
            continue
        ref, seen = dense[f.subject], f.extra["search_dense_ms"]
        out.append(f"- {f.subject} {f.budget:g}x: the search measured the dense model at {seen:.4f} ms"
                   f" ({seen / ref:.2f}x this run's interleaved dense median {ref:.4f} ms), "
                   f"so its budget was {f.extra['search_budget_ms']:.4f} ms = {f.extra['search_budget_ms'] / ref:.2f}x"
                   f" of the interleaved dense median ({os.path.relpath(f.extra['run_dir'], ROOT)})")
    return out


def paired_comparisons(finals: list[Final]) -> list[dict[str, Any]]:
    """hwprune against each baseline at each budget, on the same test images: the accuracy difference, its paired
    standard error, and McNemar's test (normal approximation) on the images exactly one of the two gets right."""
    out = []
    for hw in (f for f in finals if f.method == "hwprune" and f.correct is not None):
        for other in finals:
            if other.method in ("hwprune", "dense", NEAR) or other.budget != hw.budget or other.subject != hw.subject \
                    or other.correct is None:
                continue
            only_hw = int((hw.correct & ~other.correct).sum())
            only_other = int((other.correct & ~hw.correct).sum())
            n = int(hw.correct.numel())
            disc = only_hw + only_other
            z = (only_hw - only_other) / math.sqrt(disc) if disc else 0.0
            out.append({"model": hw.subject, "budget": hw.budget, "baseline": other.method, "images": n,
                        "difference": (only_hw - only_other) / n, "paired_se": math.sqrt(disc) / n,
                        "only_hwprune_right": only_hw, "only_baseline_right": only_other, "z": z,
                        "p_two_sided": math.erfc(abs(z) / math.sqrt(2.0))})
    return out


def paired_lines(pairs: list[dict[str, Any]]) -> list[str]:
    return [f"- {p['model']} {p['budget']:g}x, hwprune vs {p['baseline']}: {100 * p['difference']:+.2f} points "
            f"(paired SE {100 * p['paired_se']:.2f}; {p['only_hwprune_right']} images only hwprune gets right, "
            f"{p['only_baseline_right']} only {p['baseline']}, of {p['images']}; McNemar z {p['z']:+.2f}, "
            f"p {p['p_two_sided']:.3f})" for p in pairs]


def front_lines(checks: list[dict[str, Any]]) -> list[str]:
    """One line per search and latency source: does 'no smaller-but-not-faster model' hold on the Pareto front?"""
    out = []
    for c in checks:
        for source in ("search", "remeasured"):
            r = c.get(source)
            if r is None:
                continue
            label = "latencies recorded by the search (wall median, or its ratio to the dense model measured " \
                    "beside it)" if source == "search" else \
                f"re-measured interleaved ({r['rounds']} rounds, {STAT_NAMES[r['statistic']]})"
            out.append(
                f"- {c['model']} {c['budget']:g}x, {c['models']} Pareto models, {label}: "
                f"{'HOLDS' if r['holds'] else 'VIOLATED'} — not faster than dense: {len(r['not_faster_than_dense'])}"
                f"{' ' + str(r['not_faster_than_dense']) if r['not_faster_than_dense'] else ''}; fewer-MACs-but-slower "
                f"pairs: {r['violations']} of {r['pairs']} ({r['violations_beyond_noise']} beyond {NOISE_TOL:.0%} "
                f"noise, {r['unexplained_beyond_noise']} of them buying nothing: neither more accurate nor smaller)"
                f"{'; e.g. ' + '; '.join(r['examples']) if r['examples'] else ''}")
        if c["models"] == 0:
            out.append(f"- {c['model']} {c['budget']:g}x: no Pareto model (nothing met the budget)")
    return out
