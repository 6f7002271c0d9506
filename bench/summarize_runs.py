"""Pool several runs of bench_search.py: hwprune against its baselines, run by run, per subject and budget.

    python -m bench.summarize_runs RUN_A/bench_search.json RUN_B/bench_search.json ... \
        [--baseline uniform-16,uniform-16-matched]

For each baseline, one row per run (its search seed, hwprune's pick and the baseline's, both with their side-by-side
latency ratios, and the paired difference on the same test images), then a line per subject and budget: in how many
runs hwprune was more accurate at p < 0.05, tied, or less accurate, and the mean difference. The runs share the
trained model and the baseline's pick (neither depends on the search seed), so the differences are not independent
samples: read the mean as a description, the per-run McNemar tests as the evidence. Writes CSV + JSON next to
``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import pandas as pd

ALPHA = 0.05


def _judged(row: dict[str, Any]) -> float | None:
    """The side-by-side ratio a run judged on: alternating samples where the run has them (runs before 2026-11-23
    judged on the wall-clock median over rounds)."""
    return row["ratio_pair"] if row.get("ratio_pair") is not None else row.get("ratio_wall")


def _meets(row: dict[str, Any]) -> bool | None:
    return row["meets_pair"] if row.get("meets_pair") is not None else row.get("meets_wall")


def run_rows(path: Path, baseline: str) -> list[dict[str, Any]]:
    """One row per (subject, budget) of one bench_search.json: hwprune's pick, the baseline's, the paired test."""
    data = json.loads(path.read_text())
    if "paired" not in data or "args" not in data:
        raise SystemExit(f"{path}: not a bench_search.json with paired test results (written by an older "
                         "bench_search.py?)")
    args = data["args"]
    seed = args["search_seed"] if args.get("search_seed") is not None else args["seed"]
    picks = {(r["model"], r["budget"], r["method"]): r for r in data["results"]}
    rows = []
    for pair in data["paired"]:
        if pair["baseline"] != baseline:
            continue
        key = (pair["model"], pair["budget"])
        hw, base = picks[key + ("hwprune",)], picks[key + (baseline,)]
        diff, p = pair["difference"], pair["p_two_sided"]
        rows.append({
            "run": str(path), "created": data["created"], "commit": data.get("commit"), "search_seed": seed,
            "model": pair["model"], "budget": pair["budget"],
            "hwprune_accuracy": hw["accuracy"], "hwprune_ratio": _judged(hw), "hwprune_meets": _meets(hw),
            "baseline": baseline, "baseline_accuracy": base["accuracy"], "baseline_ratio": _judged(base),
            "baseline_meets": _meets(base),
            "difference_points": 100 * diff, "paired_se_points": 100 * pair["paired_se"], "p": p,
            "verdict": "lead" if diff > 0 and p < ALPHA else "behind" if diff < 0 and p < ALPHA else "tie",
        })
    # a search that recommended nothing has no paired test, and is a run hwprune did not win
    paired = {(r["model"], r["budget"]) for r in rows}
    for (model, budget, method), hw in picks.items():
        base = picks.get((model, budget, baseline))
        if method != "hwprune" or (model, budget) in paired or base is None or base.get("accuracy") is None:
            continue
        rows.append({
            "run": str(path), "created": data["created"], "commit": data.get("commit"), "search_seed": seed,
            "model": model, "budget": budget, "hwprune_accuracy": None, "hwprune_ratio": None,
            "hwprune_meets": False, "baseline": baseline, "baseline_accuracy": base["accuracy"],
            "baseline_ratio": _judged(base), "baseline_meets": _meets(base), "difference_points": None,
            "paired_se_points": None, "p": None, "verdict": "no model", "note": hw.get("note"),
        })
    return rows


def pick(accuracy: float | None, ratio: float | None, meets: bool) -> str:
    if accuracy is None or pd.isna(accuracy):
        return "no model"
    return f"{accuracy:.3f} @ {ratio:.2f}x" + ("" if meets else " (over)")


def markdown(df: pd.DataFrame) -> str:
    lines = []
    for (model, budget, base), group in df.groupby(["model", "budget", "baseline"], sort=False):
        lines += [f"**{model} {budget:g}x, hwprune vs `{base}`** (latency as ratio to the dense model, side by side)",
                  "", f"| search seed | commit | hwprune | {base} | difference (paired SE) | p | |",
                  "|---|---|---|---|---|---|---|"]
        for _, r in group.sort_values("search_seed").iterrows():
            if pd.isna(r["p"]):
                p = diff = "–"
            else:
                p = "< 0.001" if r["p"] < 0.001 else f"{r['p']:.3f}"
                diff = f"{r['difference_points']:+.2f} ({r['paired_se_points']:.2f})"
            lines.append(f"| {r['search_seed']} | {r['commit'] or '?'}"
                         f" | {pick(r['hwprune_accuracy'], r['hwprune_ratio'], r['hwprune_meets'])}"
                         f" | {pick(r['baseline_accuracy'], r['baseline_ratio'], r['baseline_meets'])}"
                         f" | {diff} | {p} | {r['verdict']} |")
        counts = group["verdict"].value_counts()
        diffs = group["difference_points"].dropna()
        missing = f", no model in {counts['no model']}" if counts.get("no model") else ""
        mean = f"{statistics.mean(diffs):+.2f} points" if len(diffs) else "–"
        lines += ["", f"{len(group)} runs: hwprune more accurate (p < {ALPHA}) in {counts.get('lead', 0)}, tied in "
                      f"{counts.get('tie', 0)}, less accurate in {counts.get('behind', 0)}{missing}; mean difference "
                      f"{mean}{' (over the runs with a model)' if missing else ''}; picks within the budget side by "
                      f"side: hwprune {int(group['hwprune_meets'].fillna(False).astype(bool).sum())} of {len(group)}, "
                      f"{base} {int(group['baseline_meets'].fillna(False).astype(bool).sum())} of {len(group)}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="bench_search.json files (or the folders holding them)")
    parser.add_argument("--baseline", default="uniform-16,uniform-16-matched",
                        help="the methods to compare hwprune with, comma-separated (default: uniform-16, the "
                             "budget's bisected pick, and uniform-16-matched, the best uniform-16 model no slower "
                             "than hwprune's pick side by side; runs without one are skipped for it)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "runs_summary",
                        help="writes OUT.csv and OUT.json")
    args = parser.parse_args(argv)
    rows = []
    for path in args.runs:
        path = path / "bench_search.json" if path.is_dir() else path
        if not path.is_file():
            parser.error(f"no bench_search.json at {path}")
        for baseline in args.baseline.split(","):
            rows += run_rows(path, baseline)
    if not rows:
        parser.error(f"none of the runs compares hwprune with {args.baseline!r}")
    order = {b: i for i, b in enumerate(args.baseline.split(","))}
    df = pd.DataFrame(rows)
    df = df.assign(_order=df["baseline"].map(order)).sort_values(
        ["model", "budget", "_order", "search_seed"], ascending=[True, False, True, True]).drop(columns="_order")
    text = markdown(df)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out.with_suffix(".csv"), index=False)
    args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "markdown": text}, indent=2, default=str))
    print(f"wrote {args.out.with_suffix('.csv')} and {args.out.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
