"""Pruning only vs INT8 everywhere after pruning vs the joint search (``--quantize int8``), at equal budgets.

For each budget setting (relative latency budgets, and a tight memory budget where INT8's 4x smaller weights matter):

- ``prune only``: ``hwprune.search(..., quantize="off")``, its recommended model;
- ``int8 after pruning``: that model's FP32 file quantized everywhere (ORT static QDQ, per-channel weights, calibrated
  like the search does), as a user would quantize a pruned model afterwards;
- ``joint``: ``hwprune.search(..., quantize="int8")``, its recommended model (a precision per channel group chosen
  with the widths, each candidate measured as its quantized file).

The three deployed files are then timed side by side in one process, each beside the dense FP32 file in interleaved
rounds of alternating samples (``ratio``: the median ratio, as a search judges a relative budget); memory is the
backend's (INT8 weights at one byte); ``accuracy`` is the subject's evaluator (the data the searches chose on),
``test_accuracy`` the same file on held-out data no search saw, both through ONNX Runtime.

Subjects (``--model``): ``demo`` (mobilenet-tiny), ``cifar`` (bench_search's ResNet 32/64/128 trained on the CIFAR-10
JPEG zip, ``--cifar-zip``), ``mobilenetv2`` (full-size MobileNetV2 at 224x224 on generated images),
``cifar-widehead`` (two conv blocks and a 4096-1024-1024 classifier on CIFAR-10: INT8 pays in its head) and
``cifar-se-widehead`` (the same with depthwise + squeeze-excitation blocks, where INT8 costs); all but the demo are
trained on first use and cached.

Run from the repository root: ``python -m bench.bench_joint`` (``--model``, ``--trials``, ``--settings``). Results: a
table on stdout and ``bench/results/bench_joint-<model>.{csv,json}``; the searches' folders under
``bench/results/bench_joint-<model>/`` are replaced on every run.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import CIFAR_ZIP
from bench.search_data import build_subject
from hwprune import search
from hwprune.backends.ort import OrtBackend
from hwprune.errors import BudgetUnreachable
from hwprune.export import export_onnx
from hwprune.profiles import load_profile
from hwprune.quant import calibration_set, evaluate_onnx, plan_for, quantize
from hwprune.quant.device import reduce_range
from hwprune.study.reference import interleaved_rounds

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("demo", "cifar", "mobilenetv2", "cifar-widehead", "cifar-se-widehead")


@dataclass(frozen=True)
class Setting:
    """One budget setting: relative latency and memory budgets (None: none) and the accuracy guard."""

    latency: str | None
    memory: str | None
    guard: str = "off"
    trials: int | None = None  # None: --trials


# the memory-only setting is the one "only INT8 can meet": dense 3.3 MB (weights 3.15 MB), pruning alone reaches
# 0.07x only by pruning so hard that it loses more than the 2% guard, INT8 weights are 3.5x smaller. The CIFAR-10
# ResNet (2.9 MB) loses its 2% at 0.07x and 0.15x in either form (its dense INT8 file is 0.28x): its "only INT8"
# budget is 0.3x, and with a latency budget beside it INT8 must be chosen per layer (INT8 is slower on its early,
# compute-heavy layers; its late layers hold most of the weights). The CIFAR-10 wide-head CNN (21 MB, INT8 everywhere
# 0.26x) holds 98% of its weights in the head, whose Gemms run ~3x faster in INT8 while its convs run slower: at 0.1x
# FP32 pruning must cut the head to ~1/8 of its width, INT8 to ~1/2
SETTINGS = {"lat 0.6x": Setting("0.6x", None), "lat 0.4x": Setting("0.4x", None),
            "mem 0.07x, guard 2%": Setting(None, "0.07x", "2%", 16),
            "mem 0.15x, guard 2%": Setting(None, "0.15x", "2%", 16),
            "mem 0.3x, guard 2%": Setting(None, "0.3x", "2%", 16),
            "lat 0.7x + mem 0.3x, guard 2%": Setting("0.7x", "0.3x", "2%", 16),
            "mem 0.1x": Setting(None, "0.1x"), "lat 0.5x + mem 0.1x": Setting("0.5x", "0.1x"),
            "lat 0.6x + mem 0.1x": Setting("0.6x", "0.1x")}
TRIALS = 20


@dataclass
class Row:
    model: str
    setting: str
    arm: str
    trial: int | None
    precision: str
    accuracy: float | None  # the subject's evaluator (the data the searches chose on)
    test_accuracy: float | None  # held-out data no search saw (bench_search's test split)
    ratio: float | None  # latency / dense FP32 latency, measured beside it in this run
    memory_mb: float | None
    file_kb: float | None
    meets: bool | None  # within the setting's budgets, on this run's side-by-side measurement
    search_s: float
    note: str = ""


def _search(subject: Any, setting: str, quantize_mode: str, out: Path, trials: int) -> tuple[Any, float]:
    st = SETTINGS[setting]
    t0 = time.perf_counter()
    try:
        result = search(subject, "host-cpu", latency_budget_ms=st.latency, memory_budget_mb=st.memory,
                        trials=st.trials or trials, out=out, study=f"{_slug(setting)}-{quantize_mode}",
                        quantize=quantize_mode, max_accuracy_drop=st.guard, progress=False)
    except BudgetUnreachable as exc:
        print(f"{setting} {quantize_mode}: nothing within the budgets ({str(exc)[:120]})")
        return None, time.perf_counter() - t0
    return result, time.perf_counter() - t0


def _slug(setting: str) -> str:
    return "".join(c if c.isalnum() or c == "." else "_" for c in setting)


def _quantize_all(fp32: Path, subject: Any, out: Path) -> Path:
    cal = calibration_set(fp32, subject)
    # as the search quantizes on this host (7-bit weights where INT8 saturates: hwprune.quant.device.reduce_range)
    return quantize(fp32, out, plan_for(fp32), cal, reduce_range=reduce_range("host-cpu")).path


def _row(b: OrtBackend, model: str, setting: str, arm: str, path: Path | None, dense: Path, subject: Any,
         test: Callable[[Any], Any], trial: int | None, label: str, spent: float, note: str = "") -> Row:
    if path is None:
        return Row(model, setting, arm, None, "-", None, None, None, None, None, False, spent,
                   note or "nothing within budgets")
    rounds = interleaved_rounds(b.measure, path, dense, measure_pair=b.measure_beside)
    dense_mb = b.measure(dense).memory.total_mb
    mem = rounds.middle.memory.total_mb
    st = SETTINGS[setting]
    meets = (st.latency is None or rounds.ratio <= float(st.latency.rstrip("x"))) and \
        (st.memory is None or mem <= float(st.memory.rstrip("x")) * dense_mb)
    test_acc = evaluate_onnx(path, lambda m: float(test(m).float().mean()))
    return Row(model, setting, arm, trial, label, float(evaluate_onnx(path, subject.evaluate)), test_acc,
               rounds.ratio, mem, path.stat().st_size / 1e3, meets, spent, note)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=MODELS, default="demo")
    ap.add_argument("--cifar-zip", default=str(CIFAR_ZIP), help="the CIFAR-10 JPEG zip for --model cifar")
    ap.add_argument("--seed", type=int, default=0, help="seed of the cifar/mobilenetv2 subjects' training")
    ap.add_argument("--trials", type=int, default=TRIALS)
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    name = f"bench_joint-{args.model}"  # the run folder and the result files share it
    runs = out / name
    # the searches must start fresh: a study left by an earlier run would resume, and its trials would mix in
    shutil.rmtree(runs, ignore_errors=True)
    start = time.perf_counter()
    subject, note, test = build_subject(args.model, args.seed, Path(args.cifar_zip))
    print(note)
    dense = export_onnx(subject.model, subject.example_inputs, runs / "dense.onnx")
    found: dict[tuple[str, str], tuple[Any, float]] = {}
    for setting in args.settings:
        for mode in ("off", "int8"):
            found[setting, mode] = _search(subject, setting, mode, runs, args.trials)
    b = OrtBackend(load_profile("host-cpu"))  # the side-by-side measurements, after all searches
    rows: list[Row] = []
    for setting in args.settings:
        (pruned, s_off), (joint, s_int8) = found[setting, "off"], found[setting, "int8"]
        rec = pruned.recommended if pruned is not None else None
        rows.append(_row(b, args.model, setting, "prune only", rec.onnx_path if rec else None, dense, subject, test,
                         rec.trial if rec else None, "fp32", s_off))
        q = _quantize_all(rec.onnx_path, subject, runs / f"{_slug(setting)}-int8-after.onnx") \
            if rec else None
        rows.append(_row(b, args.model, setting, "int8 after pruning", q, dense, subject, test,
                         rec.trial if rec else None, "int8", 0.0))
        jrec = joint.recommended if joint is not None else None
        precision = jrec.entry.precision if jrec else None
        label = precision.get("label", "fp32") if isinstance(precision, dict) else "fp32"
        rows.append(_row(b, args.model, setting, "joint", jrec.onnx_path if jrec else None, dense, subject, test,
                         jrec.trial if jrec else None, label, s_int8))
    cols = list(asdict(rows[0]))
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(_fmt(v) for v in asdict(r).values()) + " |")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(asdict(r) for r in rows)
    (out / f"{name}.json").write_text(json.dumps({"rows": [asdict(r) for r in rows], "trials": args.trials,
                                                 "model": args.model, "subject": note,
                                                 "settings": {k: asdict(SETTINGS[k]) for k in args.settings},
                                                 "wall_s": time.perf_counter() - start}, indent=1))
    print(f"\nwall {time.perf_counter() - start:.0f} s; results in {out}/{name}.csv and .json")


if __name__ == "__main__":
    main()
