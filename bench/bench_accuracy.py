"""Benchmark: is the recommended model worth deploying? Accuracy retention on HELD-OUT data, and what it costs.

hwprune chooses among pruned candidates with the user's ``evaluate`` and, when the user gives no data of their own,
recovers them (BatchNorm re-calibration and distillation from the dense model) with inputs it records from that same
``evaluate`` or synthesises from the dense model's BatchNorm statistics (``hwprune.recovery``). Any accuracy
``evaluate`` then reports is optimistic. This benchmark scores every model on a held-out split that nothing chose,
calibrated or recovered on (``bench/accuracy_subjects.py``: demo mobilenet-tiny, the CIFAR-10 ResNet, a small ViT, a
small BERT).

Part A, "recovery at fixed architectures" (no search): each subject pruned uniformly (ratios 0.3 and 0.5 of every
coupled channel group, channel multiple 8) and recovered by

  none            the raw pruned model (the dense model's BatchNorm statistics);
  inputs          ``hwprune.recovery`` with the inputs ``evaluate`` feeds the dense model (recorded by a pre-hook):
                  BatchNorm re-calibration, then ``--recovery-steps`` steps distilled towards the dense outputs;
  synthetic       the same with inputs synthesised to match the dense model's BatchNorm statistics (no leak; BN models
                  only);
  labelled        reference: re-calibration on the labelled train split, then ``--recovery-steps`` steps of
                  ``hwprune.train.finetune`` on it, distilled from the dense model (what the rich form gets);

each with 0 steps (re-calibration only) and ``--recovery-steps`` steps. It reports held-out accuracy, accuracy on the
evaluate split (the split ``inputs`` recovered on: the gap to held-out is the leak), and the seconds spent.

Part B, "searches": ``hwprune.search`` on each subject, per latency budget, in the minimal form (``model,
example_inputs=, evaluate=``; with ``recovery="auto"`` and ``recovery="none"``) and the rich form (a
``hwprune.Subject`` with calibration and training data). A refusal (``BudgetUnreachable``: nothing met the budgets and
the accuracy guard; the CLI exits 3) is a valid outcome and is recorded with its message. For the recommended model:
held-out and evaluate accuracy, retention (recommended / dense, held-out), the latency ratio hwprune measured, and the
search's seconds per complete trial.

Outputs: Markdown tables on stdout (progress on stderr); ``<out>/recovery.csv``, ``<out>/searches.csv`` and
``<out>/bench_accuracy.json``; hwprune's run folders in ``<out>/runs/``.

    python -m bench.bench_accuracy --quick        # demo only: Part A at ratio 0.5 + one 4-trial search, 1-3 min
    python -m bench.bench_accuracy                # all subjects, both parts, budgets 0.6x and 0.4x: ~55 min
                                                  # (Part A ~12 min; a 16-trial search 0.5-3.5 min)
    python -m bench.bench_accuracy --render DIR1 DIR2   # the tables of earlier runs, merged
    python -m bench.bench_accuracy --parts A
    python -m bench.bench_accuracy --parts B --subjects demo,vit --budgets 0.6

Everything runs on one thread (``torch.set_num_threads(1)``; hwprune's training thread count is pinned to 1 too).
The first run trains the dense models it lacks (cached under ``~/.cache/hwprune``): demo ~2-3 min, CIFAR ResNet
(1,500 steps) ~9 min, ViT and BERT ~3-4 min each (measured on a busy 2-core host).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

import torch  # noqa: E402

from bench import accuracy_subjects  # noqa: E402
import hwprune  # noqa: E402
from bench.accuracy_subjects import AccuracySubject, say  # noqa: E402
from bench.common import git_commit  # noqa: E402
from hwprune import train  # noqa: E402
from hwprune.errors import BudgetUnreachable, HwpruneError  # noqa: E402
from hwprune.pruning import PruningSpace, prune  # noqa: E402

PROFILE = "host-cpu"
FINAL_LR = 0.02  # the search's final fine-tune learning rate (hwprune/study/run.py, _final_finetune)

try:  # the module this benchmark measures; without it Part A falls back to stand-ins, labelled as such
    from hwprune import recovery as hw_recovery
except ImportError:  # pragma: no cover
    hw_recovery = None


def pin_threads() -> None:
    torch.set_num_threads(1)
    train.training_threads = lambda: 1  # type: ignore[assignment]  # the search and finetune ask this


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), nd)


def _f(x: Any, fmt: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


# ---------------------------------------------------------------------------------------------------------------------
# Part A: recovery at fixed architectures


class StandInRecovery:
    """Used only when hwprune.recovery cannot be imported: BN re-calibration + distillation on recorded inputs."""

    @staticmethod
    def capture(model: torch.nn.Module, evaluate) -> list[torch.Tensor]:
        seen: list[torch.Tensor] = []
        h = model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
        try:
            evaluate(model)
        finally:
            h.remove()
        return seen


def make_plans(s: AccuracySubject, seed: int) -> dict[str, Any]:
    """Recovery plans from the dense model, made once per subject: {method: plan or error text}, with seconds."""
    plans: dict[str, Any] = {}
    if hw_recovery is None:
        t0 = time.perf_counter()
        inputs = StandInRecovery.capture(s.model, s.evaluate)
        plans["inputs"] = {"stand_in": inputs, "seconds": time.perf_counter() - t0}
        plans["synthetic"] = "hwprune.recovery missing: no stand-in"
        return plans
    t0 = time.perf_counter()
    _, recorded = hw_recovery.capture_inputs(s.model, s.evaluate)
    capture_s = time.perf_counter() - t0
    for method in ("inputs", "synthetic"):
        t0 = time.perf_counter()
        try:
            plan = hw_recovery.plan_recovery(s.model, s.example_inputs, recorded, method, seed=seed, log=say)
        except HwpruneError as exc:
            plans[method] = f"{type(exc).__name__}: {exc}"
            continue
        plans[method] = {"plan": plan, "seconds": time.perf_counter() - t0 + capture_s}
    return plans


def apply_recovery(method: str, steps: int, module: torch.nn.Module, s: AccuracySubject, plans: dict[str, Any],
                   seed: int) -> str:
    """Recover ``module`` in place; returns a note ('' when fine)."""
    torch.manual_seed(seed)
    if method == "none":
        return ""
    if method == "labelled":
        train.recalibrate_batchnorm(module, s.train_split, 8)
        if steps:
            train.finetune(module, s.train_split, steps, lr=FINAL_LR, teacher=s.model)
        return ""
    entry = plans[method]
    if isinstance(entry, str):
        raise RuntimeError(entry)
    if "stand_in" in entry:  # no hwprune.recovery: plain re-calibration + KL distillation on the recorded inputs
        batches = [(x, s.model(x).detach()) for x in entry["stand_in"]]
        train.recalibrate_batchnorm(module, batches, 8)
        if steps:
            import torch.nn.functional as F

            def kd(out, t):
                return F.kl_div(F.log_softmax(out / 4, -1), F.softmax(t / 4, -1), reduction="batchmean") * 16
            train.finetune(module, batches, steps, loss_fn=kd, lr=FINAL_LR)
        return "STAND-IN (hwprune.recovery missing)"
    plan = entry["plan"]
    hw_recovery.recover(module, plan, steps=steps, lr=FINAL_LR)
    return ""


def part_a(s: AccuracySubject, ratios: list[float], steps_list: list[int], methods: list[str], seed: int,
           dense: dict[str, float]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    space = PruningSpace.build(s.model, s.example_inputs, channel_multiple=8, max_ratio=0.85)
    say(f"[A] {s.key}: pruning space {len(space)} knobs ({time.perf_counter() - t0:.1f} s)")
    plans = make_plans(s, seed) if {"inputs", "synthetic"} & set(methods) else {}
    for m, entry in plans.items():
        if isinstance(entry, str):
            say(f"[A] {s.key}: {m} plan unavailable: {entry}")
        else:
            plan = entry.get("plan")
            say(f"[A] {s.key}: {m} plan in {entry['seconds']:.1f} s"
                + (f" ({plan.samples} samples, {plan.heldout_samples} held out, leak={plan.leak})" if plan else ""))
    for ratio in ratios:
        for method in methods:
            for steps in (steps_list if method != "none" else [0]):
                row: dict[str, Any] = {"subject": s.key, "family": s.family, "ratio": ratio, "method": method,
                                       "steps": steps, "dense_heldout": dense["heldout"], "dense_eval": dense["eval"]}
                entry = plans.get(method)
                if isinstance(entry, str):
                    rows.append({**row, "status": "n/a", "note": entry})
                    continue
                pruned = prune(s.model, s.example_inputs, space.uniform(ratio), space)
                module = pruned.module
                t1 = time.perf_counter()
                try:
                    note = apply_recovery(method, steps, module, s, plans, seed)
                except Exception as exc:  # noqa: BLE001  (the module under test is in flux: record, go on)
                    rows.append({**row, "status": "error", "note": f"{type(exc).__name__}: {exc}"})
                    say(f"[A] {s.key} r={ratio} {method}/{steps}: ERROR {exc}")
                    continue
                secs = time.perf_counter() - t1
                plan_s = entry["seconds"] if isinstance(entry, dict) else 0.0
                held, ev = s.heldout(module), s.evaluate(module)
                agree = None
                if isinstance(entry, dict) and entry.get("plan") is not None and entry["plan"].heldout:
                    agree = hw_recovery.agreement(module, entry["plan"].heldout)
                rows.append({**row, "status": "ok", "heldout": _r(held), "eval": _r(ev),
                             "retention": _r(held / dense["heldout"]) if dense["heldout"] else None,
                             "leak_gap": _r(ev - held), "agree_heldout_inputs": _r(agree),
                             "recover_s": _r(secs, 2), "plan_s": _r(plan_s, 2), "macs": pruned.macs,
                             "note": note})
                say(f"[A] {s.key} r={ratio} {method:9s} steps={steps:3d}: held-out {held:.4f}, eval {ev:.4f} "
                    f"({secs:.1f} s + plan {plan_s:.1f} s)")
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Part B: searches


def refused_details(run_dir: Path) -> dict[str, Any]:
    """What a refused search's run folder says (summary.json is written all the same)."""
    try:
        summ = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    srch, rec, guard = summ.get("search", {}), summ.get("recovery") or {}, summ.get("accuracy_guard") or {}
    n = srch.get("trials_complete") or 0
    best = guard.get("best_within_budgets") or {}
    return {"search_wall_s": _r(srch.get("wall_seconds"), 1), "trials_complete": n,
            "s_per_trial": _r(srch["wall_seconds"] / n, 2) if n and srch.get("wall_seconds") else None,
            "recovery_method": rec.get("method"), "recovery_leak": rec.get("leak"),
            "recovery_samples": rec.get("samples"), "guard_floor": _r(guard.get("floor")),
            "guard_judged_on": guard.get("judged_on"), "best_within_budgets": best,
            "rejected_on_remeasure": srch.get("rejected_on_remeasure"), "run_dir": str(run_dir)}


def run_search(s: AccuracySubject, form: str, budget: float, recovery: str | None, args: argparse.Namespace,
               runs_dir: Path, dense: dict[str, float]) -> dict[str, Any]:
    label = form if recovery is None else f"{form}/{recovery}"
    row: dict[str, Any] = {"subject": s.key, "family": s.family, "form": form, "recovery_requested": recovery,
                           "budget": budget, "trials": args.trials, "dense_heldout": dense["heldout"],
                           "dense_eval": dense["eval"]}
    study = f"acc-{s.key}-{form}-{recovery or 'data'}-{budget:g}x-{time.strftime('%H%M%S')}"
    opts: dict[str, Any] = {"trials": args.trials, "out": str(runs_dir), "study": study, "progress": False,
                            "final_finetune_steps": args.finetune_steps, "seed": args.seed}
    if recovery is not None:
        opts["recovery"] = recovery
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    try:
        if form == "minimal":
            model, example_inputs, evaluate = s.minimal()
            result = hwprune.search(model, PROFILE, latency_budget_ms=f"{budget}x", example_inputs=example_inputs,
                                    evaluate=evaluate, **opts)
        else:
            result = hwprune.search(s.rich(), PROFILE, latency_budget_ms=f"{budget}x", **opts)
    except BudgetUnreachable as exc:
        wall = time.perf_counter() - t0
        say(f"[B] {s.key} {label} {budget}x: refused (exit 3) after {wall:.0f} s: {exc}")
        row.update({"status": "refused (exit 3)", "wall_s": _r(wall, 1), "note": str(exc)})
        return {**row, **refused_details(runs_dir / study)}
    except TypeError as exc:
        if "recovery" in str(exc):
            return {**row, "status": "skipped", "note": f"no recovery= option yet: {exc}"}
        raise
    except Exception as exc:  # noqa: BLE001
        wall = time.perf_counter() - t0
        say(f"[B] {s.key} {label} {budget}x: ERROR {type(exc).__name__}: {exc}")
        traceback.print_exc(file=sys.stderr)
        return {**row, "status": "error", "wall_s": _r(wall, 1), "note": f"{type(exc).__name__}: {exc}"}
    wall = time.perf_counter() - t0
    summ = result.summary
    srch = summ.get("search", {})
    n = srch.get("trials_complete") or 0
    rec = result.recommended
    rec_rec = summ.get("recovery") or {}
    guard = summ.get("accuracy_guard") or {}
    row.update({"status": "ok" if rec is not None else "no recommendation", "wall_s": _r(wall, 1),
                "search_wall_s": _r(srch.get("wall_seconds"), 1), "trials_complete": n,
                "s_per_trial": _r(srch["wall_seconds"] / n, 2) if n and srch.get("wall_seconds") else None,
                "recovery_method": rec_rec.get("method"), "recovery_leak": rec_rec.get("leak"),
                "recovery_samples": rec_rec.get("samples"), "recovery_s": rec_rec.get("seconds"),
                "guard_floor": _r(guard.get("floor")), "guard_met": guard.get("met"),
                "guard_judged_on": guard.get("judged_on"), "run_dir": str(result.run_dir)})
    if result.dense is not None:
        row["dense_reported"] = _r(result.dense.accuracy)
    if rec is not None and rec.module is not None:
        held, ev = s.heldout(rec.module), s.evaluate(rec.module)
        row.update({"rec_trial": rec.trial, "rec_reported": _r(rec.accuracy), "rec_eval": _r(ev),
                    "rec_heldout": _r(held), "retention_heldout": _r(held / dense["heldout"]),
                    "retention_eval": _r(ev / dense["eval"]), "leak_gap": _r(ev - held),
                    "latency_ratio": _r(rec.record.get("latency_ratio")),
                    "agreement": rec.record.get("agreement") or rec_rec.get("agreement")})
        say(f"[B] {s.key} {label} {budget}x: recommended trial {rec.trial}, held-out {held:.4f} "
            f"(dense {dense['heldout']:.4f}), eval {ev:.4f}, latency ratio {row['latency_ratio']}, "
            f"{wall:.0f} s, {n} trials")
    return row


# ---------------------------------------------------------------------------------------------------------------------
# tables


def subjects_table(subjects: list[dict[str, Any]]) -> str:
    lines = ["| subject | family | dense eval acc | dense held-out acc | eval / held-out samples | trained now (s) |",
             "|---|---|---|---|---|---|"]
    for d in subjects:
        lines.append(f"| {d['key']} | {d['family']} | {d['dense_eval']:.4f} | {d['dense_heldout']:.4f} | "
                     f"{d['eval_samples']} / {d['heldout_samples']} | {d['train_seconds']:.0f} |")
    return "\n".join(lines)


def excess_gap(r: dict[str, Any], ev: float | None, held: float | None) -> float | None:
    """How much more a model scores on the evaluate split than on held-out data than the dense model does: the part of
    the gap that recovery or selection on the evaluate split put there (the dense model's own gap is the splits')."""
    if ev is None or held is None:
        return None
    return ev - held - (r["dense_eval"] - r["dense_heldout"])


def table_a(rows: list[dict[str, Any]]) -> str:
    lines = ["| subject | ratio | method | steps | held-out acc | retention | eval acc | eval - held-out | "
             "excess over dense gap | agreement (held-out recorded) | recover s | plan s | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['subject']} | {r['ratio']} | {r['method']} | {r['steps']} | {r['status']} | | | | | "
                         f"| | | {r.get('note', '')[:90]} |")
            continue
        lines.append(f"| {r['subject']} | {r['ratio']} | {r['method']} | {r['steps']} | {_f(r['heldout'], '.4f')} | "
                     f"{_f(r['retention'])} | {_f(r['eval'], '.4f')} | {_f(r['leak_gap'], '+.4f')} | "
                     f"{_f(excess_gap(r, r['eval'], r['heldout']), '+.4f')} | {_f(r['agree_heldout_inputs'])} | "
                     f"{_f(r['recover_s'], '.1f')} | {_f(r['plan_s'], '.1f')} | "
                     f"{r.get('note', '')} |")
    return "\n".join(lines)


def table_b(rows: list[dict[str, Any]]) -> str:
    lines = ["| subject | budget | form | recovery (asked -> used) | outcome | latency ratio | dense held-out | "
             "rec held-out | retention (held-out) | rec eval | eval - held-out (excess over dense) | "
             "hwprune's reported acc | trials | s / trial | search s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rec = f"{r.get('recovery_requested') or '-'} -> {r.get('recovery_method') or '-'}"
        if r["status"] not in ("ok",):
            best = (r.get("best_within_budgets") or {}).get("accuracy")
            finals = [x["accuracy"] for x in r.get("rejected_on_remeasure") or []
                      if x.get("reason") == "under the accuracy guard" and x.get("accuracy") is not None]
            why = (f"best within budgets {best:.4f}" if best is not None else str(r.get("note", ""))[:160])
            if finals and r.get("guard_judged_on") == "accuracy after the final fine-tune":
                why += f" ({max(finals):.4f} after the final fine-tune)"
            if best is not None and r.get("guard_floor") is not None:
                why += f" < floor {r['guard_floor']:.4f}"
            lines.append(f"| {r['subject']} | {r['budget']}x | {r['form']} | {rec} | {r['status']}: {why} | | "
                         f"{_f(r['dense_heldout'], '.4f')} | | | | | | "
                         f"{r.get('trials_complete', '-')} | {_f(r.get('s_per_trial'), '.1f')} | "
                         f"{_f(r.get('wall_s'), '.0f')} |")
            continue
        lines.append(f"| {r['subject']} | {r['budget']}x | {r['form']} | {rec} | recommended #{r.get('rec_trial')} | "
                     f"{_f(r.get('latency_ratio'))} | {_f(r['dense_heldout'], '.4f')} | "
                     f"{_f(r.get('rec_heldout'), '.4f')}"
                     f" | {_f(r.get('retention_heldout'))} | {_f(r.get('rec_eval'), '.4f')} | "
                     f"{_f(r.get('leak_gap'), '+.4f')} "
                     f"({_f(excess_gap(r, r.get('rec_eval'), r.get('rec_heldout')), '+.4f')}) | "
                     f"{_f(r.get('rec_reported'), '.4f')} | "
                     f"{r.get('trials_complete')} | {_f(r.get('s_per_trial'), '.1f')} | {_f(r.get('wall_s'), '.0f')} |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()})


# ---------------------------------------------------------------------------------------------------------------------


def print_tables(info: dict[str, Any]) -> None:
    a = info["args"]
    print("## Subjects\n")
    print(subjects_table(info["subjects"]))
    for d in info["subjects"]:
        print(f"\n- `{d['key']}`: {d['description']}")
    if info["part_a"]:
        print(f"\n## Part A: recovery at fixed architectures (uniform ratios, channel multiple 8; "
              f"{a.get('recovery_steps')} recovery steps)\n")
        print(table_a(info["part_a"]))
    for w in info.get("workarounds") or []:
        print(f"\nWorkaround in this run: {w}.")
    if info["part_b"]:
        print(f"\n## Part B: searches ({PROFILE}, {a.get('trials')} trials, final fine-tune {a.get('finetune_steps')} "
              "steps)\n")
        print(table_b(info["part_b"]))


def render(paths: list[Path]) -> int:
    """Print the tables of earlier runs (their bench_accuracy.json, or folders holding one), merged."""
    merged: dict[str, Any] = {"subjects": [], "part_a": [], "part_b": [], "args": {}, "workarounds": []}
    for path in paths:
        info = json.loads((path / "bench_accuracy.json" if path.is_dir() else path).read_text())
        known = {d["key"] for d in merged["subjects"]}
        merged["subjects"] += [d for d in info["subjects"] if d["key"] not in known]
        merged["part_a"] += info["part_a"]
        merged["part_b"] += info["part_b"]
        merged.setdefault("workarounds", [])
        merged["workarounds"] += [w for w in info.get("workarounds", []) if w not in merged["workarounds"]]
        merged["args"] = {**info["args"], **{k: v for k, v in merged["args"].items() if v}}
        if info["part_a"]:
            merged["args"]["recovery_steps"] = info["args"]["recovery_steps"]
        if info["part_b"]:
            merged["args"].update(trials=info["args"]["trials"], finetune_steps=info["args"]["finetune_steps"])
        print(f"<!-- {path}: started {info.get('started')}, commit {info.get('commit')}, wall {info.get('wall_s')} s "
              f"-->")
    print_tables(merged)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Tables on stdout, progress on stderr; CSV + JSON in --out.")
    p.add_argument("--subjects", default="demo,cifar,vit,bert", help="comma list of demo,cifar,vit,bert")
    p.add_argument("--budgets", default="0.6,0.4", help="latency budgets, fractions of the dense latency (Part B)")
    p.add_argument("--trials", type=int, default=16, help="trials per search (Part B)")
    p.add_argument("--parts", default="A,B", help="A (recovery at fixed architectures), B (searches), or A,B")
    p.add_argument("--forms", default="minimal,rich", help="Part B forms: minimal (model, example_inputs, "
                   "evaluate), rich (Subject with calibration and training data)")
    p.add_argument("--recoveries", default="auto,none", help="Part B recovery= values for the minimal form")
    p.add_argument("--ratios", default="0.3,0.5", help="Part A uniform pruning ratios")
    p.add_argument("--methods", default="none,inputs,synthetic,labelled", help="Part A recovery methods")
    p.add_argument("--recovery-steps", type=int, default=150,
                   help="Part A distillation / fine-tune steps (each method also runs with 0: re-calibration only)")
    p.add_argument("--finetune-steps", type=int, default=150, help="Part B: the search's final_finetune_steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke run (~5 min once the demo is cached): demo only, Part A at ratio 0.5 with 40 steps, "
                        "one 4-trial minimal/auto search at 0.6x with 40 final fine-tune steps")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "accuracy")
    p.add_argument("--render", type=Path, nargs="+", metavar="JSON_OR_DIR",
                   help="only print the tables of earlier runs (their --out folders or bench_accuracy.json), merged")
    args = p.parse_args(argv)
    if args.quick:
        args.subjects, args.ratios, args.recovery_steps = "demo", "0.5", 40
        args.budgets, args.trials, args.finetune_steps = "0.6", 4, 40
        args.forms, args.recoveries = "minimal", "auto"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return render(args.render)
    pin_threads()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    args.out.mkdir(parents=True, exist_ok=True)
    keys = [k.strip() for k in args.subjects.split(",") if k.strip()]
    parts = {p.strip().upper() for p in args.parts.split(",")}
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    recoveries = [r.strip() for r in args.recoveries.split(",") if r.strip()]
    steps_list = sorted({0, args.recovery_steps})
    t_start = time.perf_counter()
    info: dict[str, Any] = {"started": dt.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
                            "host": platform.node(), "python": platform.python_version(),
                            "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
                            "recovery_module": hw_recovery is not None, "workarounds": [],
                            "subjects": [], "part_a": [], "part_b": []}
    runs_dir = args.out / "runs"  # hwprune's run folders (each search's study name is unique)
    runs_dir.mkdir(parents=True, exist_ok=True)
    out_json = args.out / "bench_accuracy.json"

    def save() -> None:
        info["wall_s"] = round(time.perf_counter() - t_start, 1)
        out_json.write_text(json.dumps(info, indent=1, default=str))
        write_csv(args.out / "recovery.csv", info["part_a"])
        write_csv(args.out / "searches.csv", info["part_b"])

    for key in keys:
        t0 = time.perf_counter()
        s = accuracy_subjects.load(key, seed=args.seed)
        pin_threads()
        dense = {"heldout": s.heldout(s.model), "eval": s.evaluate(s.model)}
        info["subjects"].append({"key": key, "name": s.name, "family": s.family, "description": s.description,
                                 "dense_heldout": dense["heldout"], "dense_eval": dense["eval"],
                                 "eval_samples": s.eval_split.size, "heldout_samples": s.heldout_split.size,
                                 "train_seconds": s.train_seconds, "load_s": round(time.perf_counter() - t0, 1)})
        say(f"{key}: dense eval {dense['eval']:.4f}, held-out {dense['heldout']:.4f} "
            f"(loaded in {time.perf_counter() - t0:.0f} s)")
        if "A" in parts:
            info["part_a"] += part_a(s, ratios, steps_list, methods, args.seed, dense)
            save()
        if "B" in parts:
            for budget in budgets:
                for form in forms:
                    for rec in (recoveries if form == "minimal" else [None]):
                        info["part_b"].append(run_search(s, form, budget, rec, args, runs_dir, dense))
                        save()
        del s
    save()
    print_tables(info)
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s; commit {info['commit']}; "
          f"results in {args.out} (run folders in {runs_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
