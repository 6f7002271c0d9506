"""FP32 vs INT8 everywhere vs a per-layer (and per-group) choice of INT8, measured side by side on host-cpu ORT.

For each model: the FP32 file; static INT8 (QDQ, per-channel weights) of every weighted node; and a greedy choice
by measured gain: starting from INT8 everywhere, each unit (a layer, or a coupled channel group of the pruning space)
is put back to FP32 alone and timed beside the all-INT8 file; units whose return to FP32 is faster by more than
``MARGIN`` go back to FP32 together. Every variant's latency ratio to FP32 is the median of interleaved rounds of
alternating samples (``hwprune.study.reference.interleaved_rounds`` with the backend's ``measure_beside``), as a
search judges a relative budget. Output agreement is measured on held-out inputs; accuracy through ONNX Runtime where
the subject has an evaluator (the demo).

Run from the repository root: ``python -m bench.bench_quant`` (``--granularity both`` adds the per-layer choice;
``--quick``: the demo only; ``--models``: which models, e.g. ``cifar-widehead``). Results: a table on stdout and
``bench/results/bench_quant.{csv,json}``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hwprune.backends.ort import OrtBackend
from hwprune.export import export_onnx
from hwprune.profiles import load_profile
from hwprune.pruning import PruningSpace
from hwprune.quant import (CalibrationSet, PrecisionPlan, calibration_set, compare_outputs, evaluate_onnx,
                           group_units, layer_units, quantize, weighted_nodes)
from hwprune.quant.device import reduce_range
from hwprune.study.reference import interleaved_rounds
from hwprune.subjects import models
from hwprune.subjects.base import Subject
from hwprune.subjects.demo import build_demo

ROOT = Path(__file__).resolve().parent.parent
MARGIN = 0.02  # a unit goes back to FP32 only when that is >2% faster: one pair-median's noise is a few percent
SAMPLES = 128  # calibration samples per model
HELDOUT = 64  # held-out samples for the output check


@dataclass
class Row:
    model: str
    variant: str
    precision: str
    ratio: float  # latency / FP32 latency, median of interleaved rounds
    median_ms: float
    file_kb: float
    weight_mb: float
    rel_error: float
    top1_agree: float | None
    accuracy: float | None
    choice_s: float  # seconds spent choosing (quantizing and timing units)


@functools.cache
def _host_reduce_range() -> bool:
    return reduce_range("host-cpu")


def _quantize(*args: Any, **kwargs: Any) -> Any:
    """hwprune's quantize as a search on host-cpu calls it (7-bit weights where INT8 saturates there)."""
    return quantize(*args, reduce_range=_host_reduce_range(), **kwargs)


def _plain(name: str, model: torch.nn.Module, size: int) -> Subject:
    """An untrained plain-torch model with random calibration images (no evaluator: output agreement only)."""
    torch.manual_seed(0)
    images = [torch.rand(32, 3, size, size) * 2 - 1 for _ in range(8)]
    return Subject(model=model.eval(), example_inputs=(torch.zeros(1, 3, size, size),), evaluate=None,  # type: ignore[arg-type]
                   name=name, calibration_data=images)


def _widehead(se: bool) -> Subject:
    from bench.search_data import WideHeadCNN

    return _plain("cifar-se-widehead" if se else "cifar-widehead", WideHeadCNN(10, se=se), 32)


# the models of the table, by name; the demo is trained (accuracy measured), the others untrained (outputs only)
BUILDERS = {
    "mobilenet-tiny": lambda: build_demo("mobilenet-tiny", log=print),
    "resnet-cifar": lambda: _plain("resnet-cifar", models.ResNet(10, widths=(32, 64, 128), blocks=2, stem_stride=1),
                                   32),
    "mobilenetv2-0.5-96": lambda: _plain("mobilenetv2-0.5-96", models.MobileNetV2(1000, width=0.5), 96),
    "cifar-widehead": lambda: _widehead(False),
    "cifar-se-widehead": lambda: _widehead(True),
}
DEFAULT_MODELS = ("mobilenet-tiny", "resnet-cifar", "mobilenetv2-0.5-96")


def subjects(quick: bool, names: list[str] | None = None) -> list[Subject]:
    """The subjects of the table: ``names`` (default :data:`DEFAULT_MODELS`), or the demo alone when ``quick``."""
    chosen = ["mobilenet-tiny"] if quick else list(names or DEFAULT_MODELS)
    return [BUILDERS[n]() for n in chosen]


def _ratio(b: OrtBackend, path: Path, ref: Path) -> tuple[float, float]:
    rounds = interleaved_rounds(b.measure, path, ref, measure_pair=b.measure_beside)
    return rounds.ratio, rounds.middle.latency.median_ms


def _pair_ratio(b: OrtBackend, path: Path, ref: Path) -> float:
    return statistics.median(b.measure_beside(path, ref)[2])


def greedy(b: OrtBackend, fp32: Path, units: dict[str, tuple[str, ...]], cal: CalibrationSet,
           folder: Path) -> tuple[PrecisionPlan, float]:
    """The fastest, measured beside FP32, of: FP32, INT8 everywhere, INT8 minus the units whose return to FP32 alone
    was faster by more than MARGIN, and FP32 plus the units whose INT8 alone was faster by more than MARGIN.

    Both directions, because a lone INT8 unit among FP32 ones pays its Q/DQ boundaries and a lone FP32 unit among
    INT8 ones does too: the two starts disagree exactly where the boundaries cost more than the kernels gain.
    """
    start = time.perf_counter()
    everything = PrecisionPlan.uniform(units, "int8")
    all8 = _quantize(fp32, folder / "all8.onnx", everything, cal).path
    drop, add = [], []
    for unit in units:
        alone_fp32 = _quantize(fp32, folder / "unit.onnx", PrecisionPlan.only(units, set(units) - {unit}), cal).path
        if _pair_ratio(b, alone_fp32, all8) < 1.0 - MARGIN:
            drop.append(unit)
        alone_int8 = _quantize(fp32, folder / "unit.onnx", PrecisionPlan.only(units, [unit]), cal).path
        if _pair_ratio(b, alone_int8, fp32) < 1.0 - MARGIN:
            add.append(unit)
    candidates = [PrecisionPlan.uniform(units, "fp32"), everything,
                  PrecisionPlan.only(units, set(units) - set(drop)), PrecisionPlan.only(units, add)]
    timed: list[tuple[float, int]] = []
    for i, plan in enumerate(candidates):
        path = _quantize(fp32, folder / f"candidate{i}.onnx", plan, cal).path
        timed.append((_ratio(b, path, fp32)[0], i))
    return candidates[min(timed)[1]], time.perf_counter() - start


def bench_subject(b: OrtBackend, subject: Subject, folder: Path, granularities: list[str]) -> list[Row]:
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(subject.model, subject.example_inputs, folder / "fp32.onnx")
    cal = calibration_set(fp32, subject, samples=SAMPLES, heldout=HELDOUT)
    nodes = weighted_nodes(fp32)
    plans: list[tuple[str, PrecisionPlan, float]] = [("int8 everywhere", PrecisionPlan.uniform(layer_units(nodes),
                                                                                              "int8"), 0.0)]
    for g in granularities:
        if g == "layer":
            units = layer_units(nodes)
        else:
            space = PruningSpace.build(subject.model, subject.example_inputs, channel_multiple=16, max_ratio=0.9)
            # channel groups only: a removable block's knob spans layers that channel groups already own
            units = group_units(nodes, {k: v for k, v in space.specs.items() if space.knob(k).kind != "block"})
        plan, spent = greedy(b, fp32, units, cal, folder)
        plans.append((f"best per {g} ({len(units)} units)", plan, spent))
    rows = [_row(b, subject, "fp32", fp32, fp32, cal, 0.0, "fp32")]
    for i, (variant, plan, spent) in enumerate(plans):
        q = _quantize(fp32, folder / f"variant{i}.onnx", plan, cal)
        rows.append(_row(b, subject, variant, q.path, fp32, cal, spent, q.label))
    return rows


def _row(b: OrtBackend, subject: Subject, variant: str, path: Path, fp32: Path, cal: CalibrationSet, spent: float,
         label: str) -> Row:
    from hwprune.backends.memory import graph_memory

    ratio, ms = _ratio(b, path, fp32)
    check = compare_outputs(fp32, path, cal.heldout)
    acc = evaluate_onnx(path, subject.evaluate) if subject.evaluate is not None else None
    return Row(subject.name, variant, label, ratio, ms, path.stat().st_size / 1e3, graph_memory(path).weights_mb,
               check.relative_error, check.top1_agreement, acc, spent)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the demo only")
    ap.add_argument("--models", nargs="*", choices=list(BUILDERS), default=list(DEFAULT_MODELS),
                    help="the models of the table (cifar-widehead: convs 32/64 and a 4096-1024-1024 classifier; "
                         "cifar-se-widehead: depthwise + squeeze-excitation blocks before it)")
    ap.add_argument("--granularity", choices=("group", "layer", "both"), default="group",
                    help="units of the choice (both: ~800 s on the loaded 2-core build host, group alone ~400 s)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    start = time.perf_counter()
    b = OrtBackend(load_profile("host-cpu"))
    rows: list[Row] = []
    for s in subjects(args.quick, args.models):
        grains = ["layer", "group"] if args.granularity == "both" else [args.granularity]
        rows += bench_subject(b, s, out / "bench_quant" / s.name, grains)
    cols = list(asdict(rows[0]))
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(_fmt(v) for v in asdict(r).values()) + " |")
    with open(out / "bench_quant.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(asdict(r) for r in rows)
    (out / "bench_quant.json").write_text(json.dumps({"rows": [asdict(r) for r in rows], "margin": MARGIN,
                                                      "wall_s": time.perf_counter() - start}, indent=1))
    print(f"\nwall {time.perf_counter() - start:.0f} s; results in {out}/bench_quant.csv and .json")


if __name__ == "__main__":
    main()
