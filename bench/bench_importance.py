"""Benchmark: which channel importance criterion should hwprune use, per model family?

For each subject and each uniform pruning ratio (every channel group and attention module pruned by the same
fraction, via ``PruningSpace.build(..., channel_multiple=8, max_ratio=0.85)`` and ``space.uniform(r)``), the same
architecture is pruned with each criterion of ``hwprune.pruning.importance``:

  ``l2`` / ``l1``  weight magnitude (hwprune's default until now: l2)
  ``bn-scale``     |BatchNorm gamma| of the group (network slimming); l2 for groups without BatchNorm
  ``taylor``       first-order Taylor |w * dL/dw|, gradients from 4 calibration batches of the dense model

and its held-out accuracy reported (a) after BatchNorm re-calibration only (8 calibration batches), which shows how
much of the network each criterion kept intact, and (b) after a ``--steps`` SGD fine-tune distilled from the dense
model (lr 0.02, hwprune's final fine-tune recipe), averaged over ``--seeds`` fine-tune seeds (the data order; every
criterion sees the same orders). The criteria only choose *which* channels go: the architectures, MACs and latency
are identical within a row.

Subjects: the demo ``mobilenet-tiny`` (depthwise + squeeze-excite, BatchNorm) and ``resnet-tiny`` (basic blocks,
BatchNorm), and ``vit-tiny``, a 4-block pre-norm transformer (LayerNorm, no BatchNorm) on 4x4 patches of the same
images, trained here once with AdamW (1,200 steps, ~0.6 held-out accuracy: a small ViT overfits 12,000 images) and
cached next to the demo subjects. ``--model-seed`` trains (and caches) other dense models. Held-out accuracy is
measured on 4,000 generated images (seed 4000) that no demo uses.

Outputs: a Markdown table on stdout, ``<out>/bench_importance.csv`` (one row per subject x ratio x criterion) and
``<out>/bench_importance.json`` (the rows, per-seed accuracies, timings and the run's settings).

    python -m bench.bench_importance --quick    # resnet-tiny, ratio 0.5, 1 seed, 30 steps: a smoke test (~1 min)
    python -m bench.bench_importance            # all three subjects, ratios 0.3/0.5/0.7, 2 seeds, 100 steps
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import hashlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

import torch  # noqa: E402
from torch import nn  # noqa: E402

from hwprune import train  # noqa: E402
from hwprune.export import atomic_torch_save  # noqa: E402
from hwprune.pruning import PruningSpace, prune  # noqa: E402
from hwprune.pruning.importance import taylor_importance  # noqa: E402
from hwprune.subjects.base import Subject  # noqa: E402
from hwprune.subjects.demo import _Batches, build_demo, cache_dir  # noqa: E402
from hwprune.subjects.shapes import make_shapes  # noqa: E402
from bench.accuracy_subjects import ViTBlock  # noqa: E402

CRITERIA = ("l2", "l1", "bn-scale", "taylor")
HELD_OUT_SEED = 4000  # the demo uses 1000+ (train) and 2000+ (val), bench_search 3000+ (test)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# a small transformer without BatchNorm


Block = ViTBlock  # the accuracy bench's pre-norm block: x + MHA(LN(x)), x + MLP(LN(x))


class TinyViT(nn.Module):
    """4 pre-norm transformer blocks (d=64, 4 heads of 16, MLP 128) over the 64 4x4 patches of a 32x32 image."""

    def __init__(self, d: int = 64, heads: int = 4, hidden: int = 128, depth: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 64, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d, heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


VIT_STEPS, VIT_LR = 1200, 3e-3  # AdamW: hwprune's SGD recipe reached only 0.53 held-out in 1,000 steps


def _train_vit(model: nn.Module, data: _Batches, steps: int, lr: float) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    batches = (b for _ in range(10**6) for b in data)
    for step in range(1, steps + 1):
        x, y = next(batches)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0:
            log(f"  step {step}, loss {float(loss):.3f}")
    model.eval()


def build_vit(seed: int = 0) -> Subject:
    torch.manual_seed(seed)
    model = TinyViT()
    x_train, y_train = make_shapes(12000, seed=1000 + seed)  # the demo's training images
    x_val, y_val = make_shapes(2000, seed=2000 + seed)
    val = _Batches(x_val, y_val, 500, shuffle=False)
    key = hashlib.sha256(f"vit-tiny|adamw|{VIT_STEPS}|{VIT_LR}|{seed}|{torch.__version__}".encode()).hexdigest()[:12]
    path = cache_dir() / "subjects" / f"bench-vit-tiny-{key}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        log(f"training vit-tiny ({VIT_STEPS} steps, first run only)...")
        start = time.perf_counter()
        _train_vit(model, _Batches(x_train, y_train, 128, shuffle=True, seed=seed), VIT_STEPS, VIT_LR)
        atomic_torch_save(model.state_dict(), path)
        log(f"trained in {time.perf_counter() - start:.0f} s, val accuracy {train.accuracy(model, val):.3f}")
    model.eval()
    return Subject(model=model, example_inputs=(torch.zeros(1, 3, 32, 32),), evaluate=lambda m: train.accuracy(m, val),
                   name="vit-tiny", calibration_data=_Batches(x_train[:1024], y_train[:1024], 128, shuffle=False),
                   train_data=_Batches(x_train, y_train, 128, shuffle=True), loss_fn=nn.functional.cross_entropy)


def build_subject(name: str, seed: int = 0) -> Subject:
    return build_vit(seed) if name == "vit-tiny" else build_demo(name, seed=seed, log=log)


FAMILY = {"mobilenet-tiny": "BN-CNN (depthwise, SE)", "resnet-tiny": "BN-CNN (residual)",
          "vit-tiny": "transformer (LayerNorm)"}


# ---------------------------------------------------------------------------------------------------------------------


def bench_subject(name: str, args: argparse.Namespace, held_out: _Batches) -> list[dict[str, Any]]:
    subject = build_subject(name, args.model_seed)
    dense = subject.model.eval()
    dense_acc = train.accuracy(dense, held_out)
    log(f"{name}: dense held-out accuracy {dense_acc:.4f}")
    space = PruningSpace.build(dense, subject.example_inputs, channel_multiple=8, max_ratio=0.85)
    t = time.perf_counter()
    importances: dict[str, Any] = {c: c for c in args.criteria if c != "taylor"}
    taylor_s = None
    if "taylor" in args.criteria:
        importances["taylor"] = taylor_importance(dense, subject.calibration_data, subject.loss_fn, max_batches=4)
        taylor_s = time.perf_counter() - t
        log(f"  taylor gradients: {taylor_s:.2f} s")
    rows = []
    for ratio in args.ratios:
        ratios = space.uniform(ratio)
        for crit in args.criteria:
            t = time.perf_counter()
            pm = prune(dense, subject.example_inputs, ratios, space, importance=importances[crit])
            prune_s = time.perf_counter() - t
            recal = copy.deepcopy(pm.module)
            train.recalibrate_batchnorm(recal, subject.calibration_data, 8)
            acc_recal = train.accuracy(recal, held_out)
            ft = []
            for seed in range(args.seeds):
                m = copy.deepcopy(recal)
                torch.manual_seed(seed)  # the data order: the same for every criterion
                train.finetune(m, subject.train_data, args.steps, loss_fn=subject.loss_fn, lr=0.02, teacher=dense)
                ft.append(train.accuracy(m, held_out))
            row = {"subject": name, "family": FAMILY[name], "model_seed": args.model_seed, "ratio": ratio,
                   "criterion": crit, "params": pm.params, "macs": pm.macs, "dense_acc": dense_acc,
                   "acc_recal": acc_recal, "acc_ft": statistics.fmean(ft), "acc_ft_seeds": ft, "prune_s": prune_s,
                   "taylor_grad_s": taylor_s if crit == "taylor" else None}
            rows.append(row)
            log(f"  r={ratio} {crit:8s} MACs {pm.macs / 1e6:.2f} M  recal {acc_recal:.4f}  "
                f"ft {' '.join(f'{a:.4f}' for a in ft)}  (prune {prune_s:.2f} s)")
    return rows


def table(rows: list[dict[str, Any]], criteria: list[str]) -> str:
    head = "| subject | ratio | MACs | " + " | ".join(f"{c} recal / ft" for c in criteria) + " |"
    lines = [head, "|" + "---|" * (3 + len(criteria))]
    keys = sorted({(r["subject"], r["ratio"]) for r in rows}, key=lambda k: (list(FAMILY).index(k[0]), k[1]))
    for subject, ratio in keys:
        by = {r["criterion"]: r for r in rows if r["subject"] == subject and r["ratio"] == ratio}
        any_row = next(iter(by.values()))
        cells = []
        best_ft = max(r["acc_ft"] for r in by.values())
        for c in criteria:
            r = by.get(c)
            if r is None:
                cells.append("-")
                continue
            ft = f"{r['acc_ft']:.3f}"
            cells.append(f"{r['acc_recal']:.3f} / {'**' + ft + '**' if r['acc_ft'] == best_ft else ft}")
        lines.append(f"| {subject} (dense {any_row['dense_acc']:.3f}) | {ratio} | {any_row['macs'] / 1e6:.2f} M | "
                     + " | ".join(cells) + " |")
    # mean difference to l2 over the ratios, per subject
    if "l2" in criteria:
        lines.append("")
        lines.append("| subject | " + " | ".join(f"{c} - l2 recal / ft (mean over ratios)" for c in criteria
                                              if c != "l2") + " |")
        lines.append("|" + "---|" * len(criteria))
        for subject in [s for s in FAMILY if any(r["subject"] == s for r in rows)]:
            cells = []
            for c in criteria:
                if c == "l2":
                    continue
                d_recal, d_ft = [], []
                for r in rows:
                    if r["subject"] == subject and r["criterion"] == c:
                        base = next(b for b in rows if b["subject"] == subject and b["ratio"] == r["ratio"]
                                     and b["criterion"] == "l2")
                        d_recal.append(r["acc_recal"] - base["acc_recal"])
                        d_ft.append(r["acc_ft"] - base["acc_ft"])
                cells.append(f"{statistics.fmean(d_recal):+.3f} / {statistics.fmean(d_ft):+.3f}" if d_ft else "-")
            lines.append(f"| {subject} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "importance")
    p.add_argument("--quick", action="store_true", help="resnet-tiny, ratio 0.5, 1 seed, 30 steps (a smoke test)")
    p.add_argument("--subjects", default="mobilenet-tiny,resnet-tiny,vit-tiny")
    p.add_argument("--criteria", default=",".join(CRITERIA))
    p.add_argument("--ratios", default="0.3,0.5,0.7")
    p.add_argument("--seeds", type=int, default=2, help="fine-tune seeds (data orders) per model")
    p.add_argument("--steps", type=int, default=100, help="fine-tune steps")
    p.add_argument("--held-out", type=int, default=4000, help="held-out images")
    p.add_argument("--model-seed", type=int, default=0,
                   help="seed of the dense model's training (another seed trains and caches another dense model)")
    p.add_argument("--torch-threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.quick:
        args.subjects, args.ratios, args.seeds, args.steps, args.held_out = "resnet-tiny", "0.5", 1, 30, 1000
    args.subjects = [s for s in args.subjects.split(",") if s]
    args.criteria = [c for c in args.criteria.split(",") if c]
    args.ratios = [float(r) for r in args.ratios.split(",") if r]
    unknown = [s for s in args.subjects if s not in FAMILY] + [c for c in args.criteria if c not in CRITERIA]
    if unknown:
        p.error(f"unknown subject or criterion: {', '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    train.training_threads = lambda: args.torch_threads  # finetune() would otherwise pick its own thread count
    held_out = _Batches(*make_shapes(args.held_out, seed=HELD_OUT_SEED), 500, shuffle=False)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name in args.subjects:
        rows += bench_subject(name, args, held_out)
    elapsed = time.perf_counter() - start
    text = table(rows, args.criteria)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    fields = ["subject", "family", "model_seed", "ratio", "criterion", "params", "macs", "dense_acc", "acc_recal",
              "acc_ft", "acc_ft_seeds", "prune_s", "taylor_grad_s"]
    with open(args.out / "bench_importance.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "acc_ft_seeds": " ".join(f"{a:.4f}" for a in r["acc_ft_seeds"])})
    meta = {"command": "python " + " ".join(sys.argv), "date": dt.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "elapsed_s": elapsed}
    (args.out / "bench_importance.json").write_text(json.dumps({**meta, "rows": rows, "table": text}, indent=2))
    log(f"done in {elapsed:.0f} s; wrote {args.out}/bench_importance.csv and .json")


if __name__ == "__main__":
    main()
