"""Benchmark: hwprune's search against simple pruning baselines at equal *measured* latency, in one run.

For each subject (the demo ``mobilenet-tiny`` at 32x32, and a full-size MobileNetV2 at 224x224) and each latency
budget (a fraction of the dense model's latency on the ``host-cpu`` profile), it compares:

  (a) ``hwprune``        hwprune.search(...) with a fixed trial count; its recommended model;
  (b) ``uniform-16``     one pruning ratio for every channel group, rounded to the profile's channel multiple (16),
      ``uniform-1``      the same without rounding (channel multiple 1); the least pruning that meets the budget,
                         found by bisection over the ratio with real ONNX Runtime measurements;
  (c) ``tp-global-mag``  Torch-Pruning's global magnitude pruning (MagnitudePruner, global_pruning=True,
                         GroupMagnitudeImportance), its ratio bisected the same way until the measured latency meets
                         the budget (MACs are what the ratio controls; measured latency is what must meet the budget).

A baseline's bisected choice is then held to the rule hwprune holds its own picks to (``--confirm-tries``): measured
in interleaved rounds with the dense model, its median ratio plus standard error must meet the budget, else the next
more-pruned architecture on its curve is tried. Without this, one lucky probe let a baseline's pick run over its
budget side by side in most demo runs, while hwprune's met it, and "equal latency" favoured the baselines.

Every final model gets the same fine-tune: BatchNorm re-calibration, then ``--finetune-steps`` SGD steps distilled
from the dense model (lr 0.02, the recipe of hwprune's own final fine-tune), from the same data order. hwprune's
search runs with that same final fine-tune for its ``--final-candidates`` (its default: 3) and recommends the best of
them, as it does for a user; its recommended model is then rebuilt from its ratios and fine-tuned here like the
others (so it gets neither its search-time fine-tune steps nor an extra fine-tune). The time hwprune spends choosing,
its candidates' fine-tunes included, is its "select s".

The search evaluates on the subject's validation data; the table's accuracy is measured on test data that nothing
chose on (demo: 5,000 other generated images; cifar: the 10,000 test images, the search seeing 5,000 held-out
training images), so picking the best of several candidates earns no selection bias.

(b') ``uniform-16-matched`` asks for equal latency directly, free of any bisection's noise: the uniform-16
architectures nearest hwprune's pick by measured latency (``--near`` of them) get the common fine-tune and the
side-by-side re-measurement below, and hwprune is compared with the most accurate of those that ran no slower than
its pick (the best of several on the test data: a choice that favours the baseline).

All final models of a subject, and the dense model, are then re-measured interleaved (round-robin, ``--rounds``
rounds) and each model's median taken, so load drift from other processes hits every method alike, then each model
is measured beside the dense model in alternating 2 ms samples, ``--rounds`` times (``OrtBackend.measure_beside``).
Latencies are reported with the dense latency of the same rounds and as ratios to it: the median ratio of alternating
samples (what every comparison is judged on, as hwprune judges its picks), wall-clock median, thread CPU time and
fastest sample.

Outputs: Markdown tables on stdout, ``<out>/bench_search.csv`` (one row per model) and ``<out>/bench_search.json``
(everything, including the ratio-latency curves and each search's per-trial overhead and Pareto-front check).
hwprune's run folders go to ``<out>/runs/``.

    python bench/bench_search.py --quick            # demo subject only, ~10 min on 2 cores
    python bench/bench_search.py                    # demo + MobileNetV2 at 224, ~25 min on 2 cores (+13 min once)
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch_pruning as tp  # noqa: E402
from torch import nn  # noqa: E402

import hwprune  # noqa: E402
from hwprune import train  # noqa: E402
from hwprune.errors import BudgetUnreachable  # noqa: E402
from hwprune.export import atomic_torch_save, export_onnx  # noqa: E402
from hwprune.backends.base import Measurement  # noqa: E402
from hwprune.backends.ort import OrtBackend  # noqa: E402
from hwprune.pruning import PruningSpace, architecture_signature, count_macs_params, prune, read_widths  # noqa: E402
from hwprune.subjects import build_demo, models  # noqa: E402
from hwprune.subjects.base import Subject  # noqa: E402
from hwprune.subjects.demo import cache_dir  # noqa: E402
from hwprune.subjects.shapes import make_shapes  # noqa: E402
from hwprune.study.objective import uniform_architectures  # noqa: E402
from hwprune.study.reference import interleaved_rounds  # noqa: E402

PROFILE = "host-cpu"
METHODS = ("hwprune", "uniform-16", "uniform-1", "tp-global-mag")
NEAR = "uniform-16-near"  # the uniform-16 architectures nearest hwprune's pick (see near_uniform)
MATCHED = "uniform-16-matched"  # the most accurate of them no slower than hwprune's pick, side by side
FINAL_LR = 0.02  # hwprune's final fine-tune learning rate (hwprune/study/run.py, finalize)
NOISE_TOL = 0.05  # latency differences below 5% are treated as measurement noise in the Pareto check
STAT_NAMES = {"min": "fastest sample", "cpu": "median thread CPU time", "median": "wall median",
              "pair": "median ratio of alternating samples"}
# The side-by-side ratio every comparison is judged on: the median over rounds of each round's median ratio of
# alternating samples of the model and the dense model (OrtBackend.measure_beside), which cancels a shared host's
# short slow spells that whole measurements one after the other do not; the very statistic hwprune judges its picks on.
JUDGED = "ratio_pair"

# per-subject defaults (full mode / quick mode); any flag given on the command line overrides them
DEFAULTS: dict[str, dict[str, Any]] = {
    "demo": {"trials": 30, "quick_trials": 12, "finetune_steps": 150, "quick_finetune_steps": 40,
             "trial_finetune_steps": 20},
    "mobilenetv2": {"trials": 16, "quick_trials": 8, "finetune_steps": 20, "quick_finetune_steps": 10,
                    "trial_finetune_steps": 0},
    "cifar": {"trials": 40, "quick_trials": 10, "finetune_steps": 150, "quick_finetune_steps": 40,
              "trial_finetune_steps": 20},
}
# the lossy JPEG copy of CIFAR-10 in the workplace's shared datasets; pass --cifar-zip elsewhere
CIFAR_ZIP = ROOT.parent / "shared" / "datasets" / "cifar10_jpeg_lossy" / "cifar10_jpeg_yoongikim.zip"
CIFAR_MEAN, CIFAR_STD = (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)


def git_commit() -> str | None:
    """The checkout's commit, with "+changes" when tracked files differ from it; None outside a git checkout."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def say(msg: str) -> None:
    """Progress line on stderr, with a timestamp (stdout carries only the tables)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# subjects


class UpsampledBatches:
    """Re-iterable (inputs, targets) mini-batches of 32x32 'shapes' images, bilinearly upsampled to ``size`` on the
    fly (12,000 images at 224x224 would take 7 GB); shuffled with a per-epoch seed."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, size: int, shuffle: bool,
                 seed: int = 0) -> None:
        self.x, self.y, self.batch_size, self.size, self.shuffle, self.seed = x, y, batch_size, size, shuffle, seed
        self._epoch = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.x.shape[0]
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + self._epoch))
            self._epoch += 1
        else:
            order = torch.arange(n)
        for i in range(0, n, self.batch_size):
            idx = order[i: i + self.batch_size]
            xb = F.interpolate(self.x[idx], size=(self.size, self.size), mode="bilinear", align_corners=False)
            yield xb, self.y[idx]

    def __len__(self) -> int:
        return -(-self.x.shape[0] // self.batch_size)


def build_mobilenetv2(seed: int = 0, stage1_steps: int = 240, stage2_steps: int = 60) -> tuple[Subject, str]:
    """Full-size MobileNetV2 (3.5 M params, ~300 M MACs at 224x224) with 10 classes, trained briefly on generated
    'shapes' images: ``stage1_steps`` at 112x112 (batch 32), then ``stage2_steps`` at 224x224 (batch 16).
    Weights are cached after the first build. Returns the subject and a note on what its accuracy means."""
    torch.manual_seed(seed)
    model = models.mobilenet_v2(num_classes=10)
    x_train, y_train = make_shapes(6000, seed=1000 + seed)
    x_val, y_val = make_shapes(256, seed=2000 + seed)
    val = UpsampledBatches(x_val, y_val, 32, 224, shuffle=False)
    key = hashlib.sha256(f"mobilenetv2-224|shapes-v1|{stage1_steps}|{stage2_steps}|{seed}|{torch.__version__}"
                         .encode()).hexdigest()[:12]
    path = cache_dir() / "subjects" / f"bench-mobilenetv2-224-{key}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        note = f"weights cached at {path}"
    else:
        t0 = time.perf_counter()
        say(f"training the dense MobileNetV2: {stage1_steps} steps at 112x112, {stage2_steps} at 224x224 "
            "(first run only; cached afterwards)...")
        train.finetune(model, UpsampledBatches(x_train, y_train, 32, 112, shuffle=True, seed=seed), stage1_steps,
                       lr=0.05)
        train.finetune(model, UpsampledBatches(x_train, y_train, 16, 224, shuffle=True, seed=seed + 1),
                       stage2_steps, lr=0.02)
        atomic_torch_save(model.state_dict(), path)
        note = f"trained in {time.perf_counter() - t0:.0f} s and cached at {path}"
    model.eval()
    dense_acc = train.accuracy(model, val)
    verdict = ("ACCURACY IS MEANINGLESS for this subject (near the 0.10 of chance): read only its latency, MACs and "
               "params" if dense_acc < 0.5 else "its accuracies are only comparable with each other, not with any "
               "published MobileNetV2 figure; latency is the point of this subject")
    note = (f"MobileNetV2 at 224x224 trained only {stage1_steps}+{stage2_steps} steps on upsampled 32x32 'shapes' "
            f"images (dense accuracy {dense_acc:.3f} on 256 held-out images); {verdict} ({note})")
    subject = Subject(
        model=model,
        example_inputs=(torch.zeros(1, 3, 224, 224),),
        evaluate=lambda m: train.accuracy(m, val),
        name="mobilenetv2-224",
        calibration_data=UpsampledBatches(x_train[:128], y_train[:128], 32, 224, shuffle=False),
        train_data=UpsampledBatches(x_train, y_train, 16, 224, shuffle=True, seed=seed),
        loss_fn=nn.functional.cross_entropy,
        description="full-size MobileNetV2, 224x224, shapes data",
    )
    return subject, note


def load_cifar(zip_path: Path, per_class: dict[str, tuple[str, int, int]]) -> dict[str, tuple[torch.Tensor, ...]]:
    """Named splits of the CIFAR-10 JPEG zip (``train/<class>/NNNN.jpg``, ``test/...``), normalised: ``per_class``
    maps a split name to (folder, first index, count) taken from each class, in file-name order."""
    import zipfile

    import numpy as np
    from PIL import Image

    if not zip_path.is_file():
        raise SystemExit(f"no CIFAR-10 zip at {zip_path}; pass --cifar-zip PATH (train/<class>/NNNN.jpg inside)")
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    out: dict[str, tuple[torch.Tensor, ...]] = {}
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
        classes = sorted({n.split("/")[1] for n in names if n.startswith("train/") and n.count("/") == 2})
        for split, (folder, start, count) in per_class.items():
            xs, ys = [], []
            for label, cls in enumerate(classes):
                files = sorted(n for n in names if n.startswith(f"{folder}/{cls}/") and n.endswith(".jpg"))
                for n in files[start:start + count]:
                    with zf.open(n) as f:
                        xs.append(np.asarray(Image.open(f).convert("RGB"), dtype=np.uint8))
                    ys.append(label)
            x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float().div(255.0)
            out[split] = ((x - mean) / std, torch.tensor(ys))
    return out


class AugmentedBatches:
    """Shuffled mini-batches with the standard CIFAR augmentation (random 32x32 crop of the 4-pixel zero-padded
    image, random horizontal flip), reproducible per epoch from ``seed``: the dense model's training data."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self._epoch = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1000 + self._epoch)
        self._epoch += 1
        n = self.x.shape[0]
        order = torch.randperm(n, generator=g)
        for i in range(0, n, self.batch_size):
            idx = order[i: i + self.batch_size]
            xb = F.pad(self.x[idx], (4, 4, 4, 4))
            dx, dy = (int(v) for v in torch.randint(0, 9, (2,), generator=g))
            xb = xb[:, :, dy:dy + 32, dx:dx + 32]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)
            yield xb.contiguous(), self.y[idx]

    def __len__(self) -> int:
        return -(-self.x.shape[0] // self.batch_size)


def build_cifar(seed: int, zip_path: Path,
                steps: int = 3000) -> tuple[Subject, str, Callable[[nn.Module], torch.Tensor]]:
    """A ResNet (widths 32/64/128, ~5x the demo's MACs) trained on 40,000 CIFAR-10 images with augmentation.

    The search sees only a validation split (5,000 other training images); the table's accuracy is measured on the
    10,000 test images, which nothing chose on.
    """
    from hwprune.subjects.demo import _Batches

    splits = load_cifar(zip_path, {"train": ("train", 0, 4000), "val": ("train", 4000, 500),
                                   "test": ("test", 0, 1000)})
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = splits["train"], splits["val"], splits["test"]
    torch.manual_seed(seed)
    model = models.ResNet(10, widths=(32, 64, 128), blocks=2, stem_stride=2)
    key = hashlib.sha256(f"cifar-resnet|{zip_path.name}|40k-aug|{steps}|{seed}|{torch.__version__}".encode())
    path = cache_dir() / "subjects" / f"bench-cifar-resnet-{key.hexdigest()[:12]}.pt"
    val = _Batches(x_val, y_val, 1000, shuffle=False)
    test = _Batches(x_test, y_test, 1000, shuffle=False)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        say(f"training the CIFAR-10 ResNet ({steps} steps on 40,000 augmented images, first run only)...")
        train.finetune(model, AugmentedBatches(x_train, y_train, 128, seed=seed), steps, lr=0.1,
                       progress=lambda step, loss: step % 250 == 0 and say(f"  step {step}/{steps}, loss {loss:.3f}"))
        atomic_torch_save(model.state_dict(), path)
    model.eval()
    subject = Subject(
        model=model, example_inputs=(torch.zeros(1, 3, 32, 32),), evaluate=lambda m: train.accuracy(m, val),
        name="cifar-resnet", calibration_data=_Batches(x_train[:1024], y_train[:1024], 128, shuffle=False),
        train_data=_Batches(x_train, y_train, 128, shuffle=True), loss_fn=nn.functional.cross_entropy,
        description="ResNet 32/64/128 on CIFAR-10 (lossy JPEG copy)")
    acc_val, acc_test = train.accuracy(model, val), train.accuracy(model, test)
    return subject, (f"ResNet (widths 32/64/128) trained {steps} steps on 40,000 augmented CIFAR-10 images from the "
                     f"lossy JPEG copy (dense accuracy {acc_test:.3f} on the 10,000 test images, {acc_val:.3f} on the "
                     "5,000 validation images the search evaluates on; real data, relative comparisons only)"), \
        lambda m: train.correct(m, test)


def build_subject(name: str, seed: int,
                  cifar_zip: Path = CIFAR_ZIP) -> tuple[Subject, str, Callable[[nn.Module], torch.Tensor]]:
    """The subject for a ``--models`` entry, a note on what its accuracy means, and the test evaluation the table
    reports (per-image correctness): data no method selected on (hwprune's search evaluates with
    ``subject.evaluate``)."""
    if name == "demo":
        from hwprune.subjects.demo import _Batches

        subject = build_demo("mobilenet-tiny", seed=seed, log=say)
        test = _Batches(*make_shapes(5000, seed=3000 + seed), 500, shuffle=False)
        return subject, ("mobilenet-tiny, the built-in demo subject (32x32 generated 'shapes' images; the search "
                         "evaluates on its 2,000 held-out images, the table on 5,000 other generated ones)"), \
            lambda m: train.correct(m, test)
    if name == "mobilenetv2":
        subject, note = build_mobilenetv2(seed)
        val = UpsampledBatches(*make_shapes(256, seed=2000 + seed), 32, 224, shuffle=False)  # the subject's own
        return subject, note, lambda m: train.correct(m, val)
    if name == "cifar":
        return build_cifar(seed, cifar_zip)
    raise SystemExit(f"unknown model {name!r}; choose from demo, mobilenetv2, cifar")


def fresh_data(data: Any) -> Any:
    """A copy of a re-iterable batch source restarted at epoch 0, so every fine-tune sees the same batches."""
    data = copy.copy(data)
    if hasattr(data, "_epoch"):
        data._epoch = 0
    return data


def classifier_of(model: nn.Module) -> nn.Module:
    """The last Linear layer (the classifier, which keeps its outputs)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


# ---------------------------------------------------------------------------------------------------------------------
# measuring


def stat(m: Measurement, which: str) -> float:
    """The latency statistic used to decide a budget: ``median`` (wall clock), ``cpu`` (median thread CPU time) or
    ``min`` (fastest timed sample)."""
    if which == "cpu" and m.latency.cpu_median_ms is not None:
        return m.latency.cpu_median_ms
    if which == "min":
        return m.latency.min_ms
    return m.latency.median_ms


class LatencyProbe:
    """Measures a candidate between two measurements of the dense model (dense, candidate, dense), so drift in the
    host's load mostly cancels in the ratio."""

    MEASUREMENTS = 3

    def __init__(self, backend: OrtBackend, dense_onnx: Path, which: str) -> None:
        self.backend, self.dense_onnx, self.which = backend, dense_onnx, which

    def ratio(self, onnx_path: Path) -> float:
        """Candidate latency / mean of the two dense latencies around it; with statistic ``pair``, the median ratio of
        alternating samples of the two."""
        if self.which == "pair":
            return statistics.median(self.backend.measure_beside(onnx_path, self.dense_onnx)[2])
        before = stat(self.backend.measure(self.dense_onnx), self.which)
        cand = stat(self.backend.measure(onnx_path), self.which)
        after = stat(self.backend.measure(self.dense_onnx), self.which)
        return cand / ((before + after) / 2)


# ---------------------------------------------------------------------------------------------------------------------
# one-ratio methods: uniform and Torch-Pruning global magnitude


@dataclass
class CurvePoint:
    """One pruning ratio of a one-ratio method, built, exported and measured against the dense model."""

    ratio: float
    latency_ratio: float  # candidate / dense, by the probe's statistic
    macs: int
    params: int
    signature: str
    seconds: float  # prune + export + measure
    measured: bool  # False when an identical architecture was already measured
    module: nn.Module = field(repr=False)
    onnx: Path = field(repr=False)  # the exported file (the first ratio's, for an architecture already measured)


@dataclass
class Selection:
    """What :meth:`RatioCurve.select` chose, the points it consulted, whether the budget was met, and the latency
    ratio, extra measurements and seconds of the interleaved confirmation (None, 0 and 0 without one)."""

    choice: CurvePoint
    used: list[CurvePoint]
    met: bool
    confirmed_ratio: float | None = None
    confirm_measurements: int = 0
    confirm_seconds: float = 0.0


class RatioCurve:
    """Latency-to-dense of one method as a function of its single pruning ratio, measured on demand and cached
    (by ratio, and by achieved architecture, as hwprune does)."""

    def __init__(self, name: str, build: Callable[[float], nn.Module], subject: Subject, probe: LatencyProbe,
                 workdir: Path) -> None:
        self.name, self.build, self.subject, self.probe, self.workdir = name, build, subject, probe, workdir
        self.points: dict[float, CurvePoint] = {}
        self._by_signature: dict[str, tuple[float, Path]] = {}

    def at(self, ratio: float) -> CurvePoint:
        """The point for ``ratio`` (built and measured on first use)."""
        ratio = round(ratio, 4)
        if ratio in self.points:
            return self.points[ratio]
        t0 = time.perf_counter()
        module = self.build(ratio)
        macs, params = count_macs_params(module, self.subject.example_inputs)
        sig = architecture_signature(read_widths(module))
        if sig in self._by_signature:
            (lat, path), measured = self._by_signature[sig], False
        else:
            path = export_onnx(module, self.subject.example_inputs, self.workdir / f"{self.name}-{ratio:.4f}.onnx")
            lat, measured = self.probe.ratio(path), True
            self._by_signature[sig] = (lat, path)
        point = CurvePoint(ratio, lat, macs, params, sig, time.perf_counter() - t0, measured, module, path)
        self.points[ratio] = point
        say(f"  {self.name} ratio {ratio:.3f}: latency {lat:.3f}x dense, {macs / 1e6:.2f} M MACs"
            + ("" if measured else " (architecture already measured)"))
        return point

    def select(self, budget: float, grid: list[float], refine: int, confirm_tries: int = 0) -> Selection:
        """The least pruning whose measured latency meets ``budget`` (a fraction of dense): the first grid ratio that
        meets it, then ``refine`` bisection steps toward the grid ratio before it, then up to ``confirm_tries``
        interleaved confirmations (:meth:`confirm`). When no grid ratio meets the budget, the fastest grid point is
        returned, not met."""
        used: list[CurvePoint] = []
        lo, hi = 0.0, None
        for r in grid:
            p = self.at(r)
            used.append(p)
            if p.latency_ratio <= budget:
                hi = r
                break
            lo = r
        if hi is None:
            return Selection(min(used, key=lambda p: p.latency_ratio), used, False)
        for _ in range(refine):
            mid = (lo + hi) / 2
            p = self.at(mid)
            used.append(p)
            if p.latency_ratio <= budget:
                hi = mid
            else:
                lo = mid
        selection = Selection(self.at(hi), used, True)
        return self.confirm(selection, budget, confirm_tries) if confirm_tries else selection

    def confirm(self, selection: Selection, budget: float, tries: int, step: float = 0.01) -> Selection:
        """hwprune's rule for its own picks (hwprune.study.reference): the choice is measured in interleaved rounds
        with the dense model and must meet ``budget`` by its median ratio plus standard error; if it does not, the
        next more-pruned architecture (ratios in ``step`` increments) is tried, ``tries`` times at most."""
        choice = selection.choice
        for _ in range(tries):
            t0 = time.perf_counter()
            rounds = interleaved_rounds(self.probe.backend.measure, choice.onnx, self.probe.dense_onnx, budget,
                                        self.probe.backend.measure_beside)
            selection.confirm_seconds += time.perf_counter() - t0
            selection.confirm_measurements += 2 * len(rounds.ratios)
            selection.confirmed_ratio = rounds.ratio
            say(f"  {self.name} ratio {choice.ratio:.3f}: {rounds.ratio:.3f}x dense over {len(rounds.ratios)} "
                f"interleaved rounds, {rounds.upper:.3f}x with its standard error")
            if rounds.upper <= budget:
                selection.choice, selection.met = choice, True
                return selection
            nxt = self.next_architecture(choice, step)
            if nxt is None:
                break
            selection.used.append(nxt)
            choice = nxt
        selection.choice, selection.met = choice, False
        return selection

    def next_architecture(self, point: CurvePoint, step: float, limit: float = 0.95) -> CurvePoint | None:
        """The first point past ``point`` (in ``step`` ratio increments, up to ``limit``) with other widths."""
        r = point.ratio
        while r + step <= limit:
            r += step
            nxt = self.at(r)
            if nxt.signature != point.signature:
                return nxt
        return None


def uniform_space(subject: Subject, channel_multiple: int) -> PruningSpace:
    """The pruning space the uniform baselines prune in: every coupled channel group, up to 95%; widths only."""
    return PruningSpace.build(subject.model, subject.example_inputs, channel_multiple=channel_multiple,
                              max_ratio=0.95, ignored_layers=list(subject.ignored_layers), depth=False)


def uniform_builder(subject: Subject, channel_multiple: int,
                    space: PruningSpace | None = None) -> Callable[[float], nn.Module]:
    """ratio -> the model with every coupled channel group pruned by ``ratio`` (hwprune's pruner and importance),
    kept widths rounded to ``channel_multiple``."""
    space = space or uniform_space(subject, channel_multiple)

    def build(ratio: float) -> nn.Module:
        return prune(subject.model, subject.example_inputs, space.uniform(ratio), space).module

    return build


def tp_global_magnitude_builder(subject: Subject) -> Callable[[float], nn.Module]:
    """ratio -> Torch-Pruning's global magnitude pruning of a copy of the model (no channel rounding, as a user of
    Torch-Pruning would run it; no layer loses more than 90% of its channels; the classifier keeps its outputs)."""

    def build(ratio: float) -> nn.Module:
        model = copy.deepcopy(subject.model).eval()
        # fresh containers everywhere: Torch-Pruning's mutable defaults are shared between calls (DESIGN.md)
        pruner = tp.pruner.MagnitudePruner(
            model, subject.example_inputs[0], importance=tp.importance.GroupMagnitudeImportance(p=2),
            global_pruning=True, pruning_ratio=ratio, max_pruning_ratio=0.9,
            ignored_layers=[classifier_of(model)], round_to=None, in_channel_groups={}, out_channel_groups={},
            num_heads={}, channel_groups={}, customized_pruners={}, unwrapped_parameters={},
            root_module_types=[nn.modules.conv._ConvNd, nn.Linear])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner.step()
        return model.eval()

    return build


# ---------------------------------------------------------------------------------------------------------------------
# results


@dataclass
class Final:
    """One method's final model at one budget, and what choosing it cost."""

    subject: str
    budget: float | None  # None for the dense model
    method: str
    setting: str  # what was chosen: a ratio, or hwprune's trial number
    module: nn.Module | None
    macs: int = 0
    params: int = 0
    trials: int | None = None  # hwprune trials
    measurements: int = 0  # ORT measurements spent choosing (each one session + warm-up + timed runs)
    select_seconds: float = 0.0
    select_latency_ratio: float | None = None  # what the method itself saw when it chose
    budget_met_at_selection: bool | None = None
    accuracy_calibrated: float | None = None  # after BN re-calibration, before fine-tuning
    accuracy: float | None = None  # after the common fine-tune
    finetune_seconds: float = 0.0
    onnx: Path | None = None
    rounds: list[dict[str, float]] = field(default_factory=list)  # interleaved re-measurements
    latency: dict[str, float] = field(default_factory=dict)  # medians and ratios over the rounds
    extra: dict[str, Any] = field(default_factory=dict)  # hwprune: the dense latency and budget its search resolved
    note: str = ""
    correct: torch.Tensor | None = None  # per test image, after the common fine-tune

    @property
    def key(self) -> str:
        return f"{self.subject}|{self.budget}|{self.method}"


def run_uniform(subject: Subject, curve: RatioCurve, budget: float, grid: list[float], refine: int,
                method: str, confirm_tries: int = 0) -> Final:
    """(b) The least uniform pruning ratio that meets the budget, by measurement."""
    sel = curve.select(budget, grid, refine, confirm_tries)
    distinct = {id(p): p for p in sel.used}.values()
    choice = sel.choice
    if sel.met:
        note = ""
    elif sel.confirmed_ratio is not None:
        note = f"not confirmed within the budget after {confirm_tries} interleaved confirmations"
    else:
        note = "no ratio on the grid met the budget"
    return Final(subject.name, budget, method, f"ratio {choice.ratio:.3f}", copy.deepcopy(choice.module),
                 choice.macs, choice.params,
                 measurements=LatencyProbe.MEASUREMENTS * sum(p.measured for p in distinct) + sel.confirm_measurements,
                 select_seconds=round(sum(p.seconds for p in distinct) + sel.confirm_seconds, 2),
                 select_latency_ratio=sel.confirmed_ratio if sel.confirmed_ratio is not None else choice.latency_ratio,
                 budget_met_at_selection=sel.met, note=note)


def run_tp(subject: Subject, curve: RatioCurve, budget: float, grid: list[float], refine: int,
           confirm_tries: int = 0) -> Final:
    """(c) Torch-Pruning global magnitude pruning, its global ratio bisected to the latency budget."""
    return run_uniform(subject, curve, budget, grid, refine, "tp-global-mag", confirm_tries)


# ---------------------------------------------------------------------------------------------------------------------
# uniform-16 at hwprune's measured latency
#
# Each baseline above picks its model by its own noisy bisection to the budget, so at 0.4x on the demo (about 0.08 ms)
# the two picks being compared can run at 0.32x and 0.38x side by side. The matched comparison asks the question of
# equal latency directly: the uniform-16 architectures nearest hwprune's pick get the common fine-tune and the
# side-by-side re-measurement too, and hwprune is compared with the most accurate of those that ran no slower than
# its pick. Taking the best of several on the test data favours the baseline.


def uniform_architecture_ratios(space: PruningSpace, step: float = 0.0025, limit: float = 0.95) -> list[float]:
    """One uniform ratio per distinct uniform architecture of ``space`` (the middle of the ratio interval that builds
    it), in ratio order, so in falling MACs."""
    return [round((a + b) / 2, 4) for a, b in uniform_architectures(space, 0.0, limit, step)]


def near_uniform(subject: Subject, budget: float, curve: RatioCurve, ratios: list[float], target: float,
                 slower: int, faster: int) -> list[Final]:
    """The uniform architectures nearest the latency ratio ``target`` on ``curve`` (one ratio per architecture in
    ``ratios``, in ratio order): ``slower`` that the curve's probe measured over it, and ``faster`` measured at or
    below it, as finals of method ``NEAR``. Found by bisection over the architectures, whose latency falls as the
    ratio grows; the probe is noisy (one uniform model it put at 0.50x ran at 0.55x side by side), so the side-by-side
    re-measurement decides which are no slower, and more are taken on the faster side.

    By latency, not MACs: hwprune's picks run faster than uniform models of their MACs (one 2.32 M-MAC pick ran at
    0.58x, the uniform models of 2.2-2.6 M at 0.62-0.69x), so a bracket by MACs held nothing no slower."""
    lo, hi = 0, len(ratios)  # the first architecture the probe measured at or below target
    while lo < hi:
        mid = (lo + hi) // 2
        if curve.at(ratios[mid]).latency_ratio <= target:
            hi = mid
        else:
            lo = mid + 1
    out = []
    for i in range(max(lo - slower, 0), min(lo + faster, len(ratios))):
        point = curve.at(ratios[i])
        out.append(Final(subject.name, budget, NEAR, f"ratio {point.ratio:.3f}", copy.deepcopy(point.module),
                         point.macs, point.params, select_latency_ratio=point.latency_ratio))
    return out


def matched_uniform(near: list[Final], hw: Final) -> Final | None:
    """The most accurate of ``near`` whose side-by-side latency ratio is at or below that of hwprune's pick ``hw``, as
    a final of method ``MATCHED``; None without a measured pick or near architectures."""
    if not hw.latency or not near:
        return None
    limit = hw.latency[JUDGED]
    fits = [f for f in near if f.latency and f.accuracy is not None and f.latency[JUDGED] <= limit]
    if not fits:
        return Final(hw.subject, hw.budget, MATCHED, "none", None,
                     note=f"none of the {len(near)} uniform-16 architectures near hwprune's pick ran at or below its "
                          f"{limit:.3f}x")
    best = max(fits, key=lambda f: f.accuracy or 0.0)
    matched = copy.copy(best)
    matched.method = MATCHED
    matched.setting = f"{best.setting}, best of {len(fits)} of {len(near)} near"
    if max(near, key=lambda f: f.macs) in fits:
        matched.note = "every near uniform-16 architecture ran at or below hwprune's latency: a less pruned one may too"
    return matched


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


def run_hwprune(subject: Subject, budget: float, args: argparse.Namespace, conf: dict[str, Any],
                runs_dir: Path) -> tuple[Final, dict[str, Any] | None, Path]:
    """(a) hwprune's search with a fixed trial count; its recommended model, rebuilt from its ratios (so that its
    fine-tune below is exactly the one every other method gets). Returns the result, summary.json and the run
    folder."""
    study = f"{subject.name}-{budget:g}x-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    note = ""
    try:
        hwprune.search(subject, PROFILE, latency_budget_ms=f"{budget}x", trials=conf["trials"], out=runs_dir,
                       study=study, seed=args.seed if args.search_seed is None else args.search_seed,
                       max_ratio=args.max_ratio,
                       **({"sampler": args.sampler} if args.sampler else {}),
                       trial_finetune_steps=conf["trial_finetune_steps"], final_finetune_steps=conf["finetune_steps"],
                       final_candidates=args.final_candidates, progress=False)
    except BudgetUnreachable as exc:
        note = f"hwprune: {exc}"
    seconds = time.perf_counter() - t0
    run_dir = runs_dir / study
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    final = Final(subject.name, budget, "hwprune", "none", None, select_seconds=seconds, note=note)
    if summary is None:
        final.note = note or "hwprune wrote no summary.json"
        return final, None, run_dir
    s = summary["search"]
    final.extra = {"search_dense_ms": summary["dense"]["latency_ms"]["median"],
                   "search_budget_ms": summary["request"]["latency_budget_ms"], "run_dir": str(run_dir),
                   "sampler": summary["request"].get("sampler")}
    final.trials = int(s["trials_complete"])
    final.measurements = int(s["measurements"])  # dense sets, trials, and the confirmation of the front
    rec = next((m for m in summary["pareto"] if m["recommended"]), None)
    if rec is None:
        final.budget_met_at_selection = False
        final.note = final.note or "no feasible model"
        return final, summary, run_dir
    removed = rec.get("removed_blocks") or []
    final.setting = f"trial {rec['trial']}" + (f", {len(removed)} block{'s' * (len(removed) > 1)} removed"
                                               if removed else "")
    # under a relative budget hwprune judges (and records) the ratio to the dense model measured beside the model
    final.select_latency_ratio = rec.get("latency_ratio") or (rec["latency_ms"]["median"]
                                                              / summary["dense"]["latency_ms"]["median"])
    final.budget_met_at_selection = bool(rec["meets"]["latency"])
    space = PruningSpace.build(subject.model, subject.example_inputs,
                               channel_multiple=int(summary["request"]["channel_multiple"]),
                               max_ratio=args.max_ratio, ignored_layers=list(subject.ignored_layers),
                               depth=bool(summary["request"].get("depth", True)))
    pruned = prune(subject.model, subject.example_inputs, rec["ratios"], space)
    if {k: list(v) for k, v in pruned.widths.items()} != rec["widths"]:
        final.note = "WARNING: rebuilding the recommended ratios gave other widths than summary.json reports"
    final.module, final.macs, final.params = pruned.module, pruned.macs, pruned.params
    return final, summary, run_dir


def finetune_final(final: Final, subject: Subject, steps: int, seed: int,
                   test: Callable[[nn.Module], torch.Tensor]) -> None:
    """The fine-tune every final model gets: BN re-calibration, then ``steps`` steps distilled from the dense model,
    from the same data order and seed."""
    if final.module is None:
        return
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    if subject.calibration_data is not None:
        train.recalibrate_batchnorm(final.module, subject.calibration_data, 8)
    final.accuracy_calibrated = float(test(final.module).float().mean())
    if steps and subject.train_data is not None:
        train.finetune(final.module, fresh_data(subject.train_data), steps, loss_fn=subject.loss_fn, lr=FINAL_LR,
                       teacher=subject.teacher or subject.model)
    final.correct = test(final.module)
    final.accuracy = float(final.correct.float().mean())
    final.finetune_seconds = time.perf_counter() - t0


def remeasure_interleaved(finals: list[Final], backend: OrtBackend, rounds: int, dense_key: str) -> None:
    """Measure every model once per round, round-robin (each round starting one model later), and store per model
    the median over rounds of wall and CPU medians, and of its ratio to the dense model of the same round."""
    live = [f for f in finals if f.onnx is not None]
    for r in range(rounds):
        order = live[r % len(live):] + live[: r % len(live)]
        for f in order:
            m = backend.measure(f.onnx)
            f.rounds.append({"round": r, "wall_ms": m.latency.median_ms,
                             "cpu_ms": m.latency.cpu_median_ms or m.latency.median_ms, "min_ms": m.latency.min_ms,
                             "noisy": m.latency.noisy, "load1": (m.load_avg or (float("nan"),))[0]})
        say(f"  round {r + 1}/{rounds} measured ({len(live)} models)")
    dense = next(f for f in live if f.key == dense_key)
    for r in range(rounds):  # then each model beside the dense model, in alternating samples
        order = live[r % len(live):] + live[: r % len(live)]
        for f in order:
            f.rounds[r]["ratio_pair"] = 1.0 if f is dense else statistics.median(
                backend.measure_beside(f.onnx, dense.onnx)[2])
        say(f"  round {r + 1}/{rounds} measured beside the dense model")
    for f in live:
        wall = [x["wall_ms"] for x in f.rounds]
        cpu = [x["cpu_ms"] for x in f.rounds]
        f.latency = {
            "wall_ms": statistics.median(wall), "cpu_ms": statistics.median(cpu),
            "min_ms": min(x["min_ms"] for x in f.rounds),
            "dense_wall_ms": statistics.median(x["wall_ms"] for x in dense.rounds),
            "dense_cpu_ms": statistics.median(x["cpu_ms"] for x in dense.rounds),
            "ratio_wall": statistics.median(a["wall_ms"] / b["wall_ms"] for a, b in zip(f.rounds, dense.rounds)),
            "ratio_cpu": statistics.median(a["cpu_ms"] / b["cpu_ms"] for a, b in zip(f.rounds, dense.rounds)),
            "ratio_min": min(x["min_ms"] for x in f.rounds) / min(x["min_ms"] for x in dense.rounds),
            "ratio_pair": statistics.median(x["ratio_pair"] for x in f.rounds),
        }


def check_front(summary: dict[str, Any], run_dir: Path, backend: OrtBackend, rounds: int,
                which: str) -> dict[str, Any]:
    """hwprune's promise: no 'smaller but not faster' model on its Pareto front. Every front model must be faster
    than dense, and along the front sorted by latency, a model with fewer MACs must never be slower than one with
    more MACs. Checked on the latencies the search recorded and, with ``rounds`` > 0, on interleaved re-measurements
    (statistic ``which``, median over rounds) of the exported front models and the dense model."""
    front = summary["pareto"]
    result: dict[str, Any] = {"models": len(front)}
    if not front:
        return result
    if all(m.get("latency_ratio") for m in front):  # a relative budget: what the search judged and ranked on
        lat, dense_lat = {m["trial"]: m["latency_ratio"] for m in front}, 1.0
    else:
        lat = {m["trial"]: m["latency_ms"]["median"] for m in front}
        dense_lat = summary["dense"]["latency_ms"]["median"]
    result["search"] = _front_order(front, lat, dense_lat)
    if rounds > 0:
        paths = {m["trial"]: run_dir / m["files"]["onnx"]["path"] for m in front}
        paths[None] = run_dir / summary["dense"]["files"]["onnx"]["path"]
        samples: dict[Any, list[float]] = {k: [] for k in paths}
        keys = list(paths)
        for r in range(rounds):
            for k in keys[r % len(keys):] + keys[: r % len(keys)]:
                if which == "pair":  # ratios to the dense model, which is 1
                    samples[k].append(1.0 if k is None else statistics.median(
                        backend.measure_beside(paths[k], paths[None])[2]))
                else:
                    samples[k].append(stat(backend.measure(paths[k]), which))
        re_lat = {k: statistics.median(v) for k, v in samples.items() if k is not None}
        result["remeasured"] = _front_order(front, re_lat, statistics.median(samples[None]))
        result["remeasured"].update(rounds=rounds, statistic=which)
    return result


def _front_order(front: list[dict[str, Any]], lat: dict[Any, float], dense_lat: float) -> dict[str, Any]:
    """Counts of front models not faster than dense and of (fewer MACs, slower) pairs: raw, beyond noise, and beyond
    noise with nothing bought for it (the slower, smaller model is neither more accurate nor smaller in memory by
    more than the noise margin: a model that gave up accuracy and got nothing back). The promise holds when no model
    is slower than dense and no pair of the last kind exists: a slower model with fewer MACs that is more accurate
    or smaller in memory is a trade-off on the front, not a "smaller but not faster" model."""
    ordered = sorted(front, key=lambda m: lat[m["trial"]])
    not_faster = [m["trial"] for m in ordered if lat[m["trial"]] >= dense_lat]
    pairs = violations = beyond_noise = unexplained = 0
    examples: list[str] = []
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:  # lat[a] <= lat[b]
            pairs += 1
            if b["macs"] < a["macs"] and lat[b["trial"]] > lat[a["trial"]]:
                violations += 1
                if lat[b["trial"]] > lat[a["trial"]] * (1 + NOISE_TOL):
                    beyond_noise += 1
                    bought = (b["accuracy"] > a["accuracy"]
                              or b["memory_mb"]["total"] * (1 + NOISE_TOL) < a["memory_mb"]["total"])
                    unexplained += not bought
                    if not bought and len(examples) < 3:
                        examples.append(f"trial {b['trial']} ({b['macs'] / 1e6:.2f} M MACs, "
                                        f"{lat[b['trial']]:.4f} ms, acc {b['accuracy']:.3f}, "
                                        f"{b['memory_mb']['total']:.2f} MB) slower than trial {a['trial']} "
                                        f"({a['macs'] / 1e6:.2f} M MACs, {lat[a['trial']]:.4f} ms, acc "
                                        f"{a['accuracy']:.3f}, {a['memory_mb']['total']:.2f} MB)")
    return {"dense_ms": dense_lat, "not_faster_than_dense": not_faster, "pairs": pairs, "violations": violations,
            "violations_beyond_noise": beyond_noise, "unexplained_beyond_noise": unexplained, "examples": examples,
            "holds": not not_faster and unexplained == 0}


def overhead_row(subject: str, budget: float, summary: dict[str, Any]) -> dict[str, Any]:
    """hwprune's per-trial time per stage: summary.json's search.stage_seconds divided by the complete trials."""
    s = summary["search"]
    n = max(int(s["trials_complete"]), 1)
    row: dict[str, Any] = {"model": subject, "budget": budget, "trials": int(s["trials_complete"]),
                           "cached": int(s["trials_cached"]), "knobs": s.get("knobs")}
    stages = s["stage_seconds"]
    for k in ("prune", "export", "session", "timing", "dense_beside", "evaluate", "calibrate", "finetune"):
        row[k] = stages.get(k, 0.0) / n
    row["search_wall"] = float(s["wall_seconds"]) / n
    return row


# ---------------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------------
# driver


def subject_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Trials and fine-tune steps for one subject: the flag if given, else the subject's (quick) default."""
    d = DEFAULTS[name]
    return {
        "trials": args.trials or d["quick_trials" if args.quick else "trials"],
        "finetune_steps": args.finetune_steps if args.finetune_steps is not None
        else d["quick_finetune_steps" if args.quick else "finetune_steps"],
        "trial_finetune_steps": args.trial_finetune_steps if args.trial_finetune_steps is not None
        else d["trial_finetune_steps"],
    }


def bench_subject(name: str, args: argparse.Namespace, backend: OrtBackend, out: Path) -> dict[str, Any]:
    """Every method at every budget on one subject, fine-tuned alike and re-measured interleaved."""
    conf = subject_config(name, args)
    subject, note, test = build_subject(name, args.seed, Path(args.cifar_zip))
    say(f"{subject.name}: {note}")
    say(f"{subject.name}: trials {conf['trials']}, fine-tune steps {conf['finetune_steps']} for every final model, "
        f"hwprune trial fine-tune steps {conf['trial_finetune_steps']}")
    workdir = out / "runs" / f"{subject.name}-candidates"
    workdir.mkdir(parents=True, exist_ok=True)
    dense_onnx = export_onnx(subject.model, subject.example_inputs, workdir / "dense.onnx")
    macs, params = count_macs_params(subject.model, subject.example_inputs)
    dense = Final(subject.name, None, "dense", "–", subject.model, macs, params, onnx=dense_onnx)
    dense.correct = test(subject.model)
    dense.accuracy = float(dense.correct.float().mean())
    probe = LatencyProbe(backend, dense_onnx, args.select_stat)
    grid = [float(x) for x in args.grid.split(",")]
    refine = 2 if args.quick else 3
    space16 = uniform_space(subject, 16)
    architectures16 = uniform_architecture_ratios(space16) if args.near else []
    curves = {
        "uniform-16": RatioCurve("uniform-16", uniform_builder(subject, 16, space16), subject, probe, workdir),
        "uniform-1": RatioCurve("uniform-1", uniform_builder(subject, 1), subject, probe, workdir),
        "tp-global-mag": RatioCurve("tp-global-mag", tp_global_magnitude_builder(subject), subject, probe, workdir),
    }
    finals: list[Final] = [dense]
    overhead: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    for budget in args.budgets:
        say(f"{subject.name} {budget:g}x: hwprune search ({conf['trials']} trials)...")
        hw, summary, run_dir = run_hwprune(subject, budget, args, conf, out / "runs")
        finals.append(hw)
        if hw.module is not None and args.near:
            say(f"{subject.name} {budget:g}x: uniform-16 architectures near hwprune's pick "
                f"({hw.select_latency_ratio:.3f}x)...")
            near = near_uniform(subject, budget, curves["uniform-16"], architectures16, hw.select_latency_ratio,
                                slower=args.near // 3, faster=args.near - args.near // 3)
            finals += near
        if summary is not None:
            overhead.append(overhead_row(subject.name, budget, summary))
            say(f"{subject.name} {budget:g}x: checking hwprune's Pareto front ({len(summary['pareto'])} models)...")
            check = check_front(summary, run_dir, backend, args.front_rounds, args.select_stat)
            checks.append({"model": subject.name, "budget": budget, "run_dir": str(run_dir), **check})
        for method in ("uniform-16", "uniform-1"):
            say(f"{subject.name} {budget:g}x: {method} bisection...")
            finals.append(run_uniform(subject, curves[method], budget, grid, refine, method, args.confirm_tries))
        say(f"{subject.name} {budget:g}x: tp-global-mag bisection...")
        finals.append(run_tp(subject, curves["tp-global-mag"], budget, grid, refine, args.confirm_tries))

    for f in finals[1:]:
        if f.module is None:
            continue
        say(f"{subject.name} {f.budget:g}x {f.method}: BN re-calibration + {conf['finetune_steps']} fine-tune steps")
        finetune_final(f, subject, conf["finetune_steps"], args.seed, test)
        name = f"final-{f.budget:g}x-{f.method}" + (f"-{f.setting.removeprefix('ratio ')}" if f.method == NEAR else "")
        f.onnx = export_onnx(f.module, subject.example_inputs, workdir / f"{name}.onnx")
    say(f"{subject.name}: re-measuring {sum(f.onnx is not None for f in finals)} models interleaved, "
        f"{args.rounds} rounds...")
    remeasure_interleaved(finals, backend, args.rounds, dense.key)
    finals = with_matched(finals)
    return {
        "subject": subject.name, "note": note, "finals": finals, "overhead": overhead,
        "config": {**conf, "sampler": ", ".join(sorted({str(f.extra["sampler"]) for f in finals
                                                         if f.extra.get("sampler")})) or "?"},
        "checks": checks,
        "curves": {k: [{"ratio": p.ratio, "latency_ratio": p.latency_ratio, "macs": p.macs, "params": p.params,
                        "measured": p.measured, "seconds": p.seconds} for p in sorted(c.points.values(),
                                                                                        key=lambda p: p.ratio)]
                   for k, c in curves.items()},
    }


def with_matched(finals: list[Final]) -> list[Final]:
    """``finals`` with a ``MATCHED`` final after each budget's uniform-16 pick (:func:`matched_uniform`)."""
    out: list[Final] = []
    for f in finals:
        out.append(f)
        if f.method == "uniform-16":
            hw = next((h for h in finals if h.method == "hwprune" and (h.subject, h.budget) == (f.subject, f.budget)),
                      None)
            near = [n for n in finals if n.method == NEAR and (n.subject, n.budget) == (f.subject, f.budget)]
            matched = matched_uniform(near, hw) if hw is not None else None
            if matched is not None:
                out.append(matched)
    return out


def final_record(f: Final) -> dict[str, Any]:
    """A flat CSV/JSON row for one final model."""
    lat = f.latency
    return {
        "model": f.subject, "budget": f.budget, "method": f.method, "setting": f.setting,
        "accuracy": f.accuracy, "accuracy_bn_calibrated": f.accuracy_calibrated,
        "latency_wall_ms": lat.get("wall_ms"), "latency_cpu_ms": lat.get("cpu_ms"), "latency_min_ms": lat.get("min_ms"),
        "dense_wall_ms": lat.get("dense_wall_ms"), "dense_cpu_ms": lat.get("dense_cpu_ms"),
        "ratio_wall": lat.get("ratio_wall"), "ratio_cpu": lat.get("ratio_cpu"), "ratio_min": lat.get("ratio_min"),
        "ratio_pair": lat.get("ratio_pair"),
        "meets_pair": None if f.budget is None or not lat else lat["ratio_pair"] <= f.budget,
        "meets_wall": None if f.budget is None or not lat else lat["ratio_wall"] <= f.budget,
        "meets_cpu": None if f.budget is None or not lat else lat["ratio_cpu"] <= f.budget,
        "meets_min": None if f.budget is None or not lat else lat["ratio_min"] <= f.budget,
        "macs": f.macs, "params": f.params, "trials": f.trials, "measurements": f.measurements,
        "select_seconds": round(f.select_seconds, 2), "select_latency_ratio": f.select_latency_ratio,
        "budget_met_at_selection": f.budget_met_at_selection, "finetune_seconds": round(f.finetune_seconds, 2),
        "rounds": len(f.rounds), "note": f.note, **{f"hwprune_{k}": v for k, v in f.extra.items()},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="demo subject only, fewer trials and fine-tune steps")
    p.add_argument("--cifar-zip", default=str(CIFAR_ZIP),
                   help="the CIFAR-10 JPEG zip for --models cifar (train/<class>/NNNN.jpg, test/<class>/NNNN.jpg)")
    p.add_argument("--models", default=None,
                   help="comma-separated: demo,mobilenetv2,cifar (default: demo,mobilenetv2; demo with --quick; cifar "
                        "needs the CIFAR-10 JPEG zip, see --cifar-zip)")
    p.add_argument("--budgets", default="0.6,0.4", help="latency budgets as fractions of dense (default 0.6,0.4)")
    p.add_argument("--trials", type=int, default=None, help="hwprune trials per search (default: demo 30, "
                   "mobilenetv2 16; --quick: 12 and 8)")
    p.add_argument("--finetune-steps", type=int, default=None, help="fine-tune steps of every final model (default: "
                   "demo 150, mobilenetv2 20; --quick: 40 and 10)")
    p.add_argument("--final-candidates", type=int, default=hwprune.SearchConfig.final_candidates,
                   help="hwprune's final candidates: front models it fine-tunes (--finetune-steps) before it "
                        "recommends one (default: hwprune's default)")
    p.add_argument("--trial-finetune-steps", type=int, default=None,
                   help="hwprune's per-trial fine-tune steps (default: demo 20 = hwprune's default, mobilenetv2 0)")
    p.add_argument("--sampler", default=None, help="hwprune's sampler (default: hwprune's own default)")
    p.add_argument("--max-ratio", type=float, default=hwprune.SearchConfig.max_ratio,
                   help=f"hwprune's per-group max ratio (default: hwprune's, {hwprune.SearchConfig.max_ratio})")
    p.add_argument("--grid", default="0.15,0.3,0.45,0.6,0.75,0.9",
                   help="ratios scanned before bisecting, for the uniform and Torch-Pruning baselines")
    p.add_argument("--select-stat", choices=("pair", "cpu", "min", "median"), default="pair",
                   help="statistic the baselines' bisection compares with the budget: the median ratio of alternating "
                        "samples of the candidate and the dense model (default; what hwprune judges on), median "
                        "thread CPU time, fastest sample, or wall median (each between two dense measurements)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved re-measurement rounds (default 7; quick 5)")
    p.add_argument("--confirm-tries", type=int, default=4,
                   help="interleaved confirmations of each baseline's choice, as hwprune confirms its picks: median + "
                        "standard error within the budget, else the next more-pruned architecture (default 4; 0 = "
                        "choose on the bisection's probe alone, as before)")
    p.add_argument("--near", type=int, default=7,
                   help="uniform-16 architectures fine-tuned and re-measured around hwprune's pick (by measured "
                        "latency; a few more on the faster side), for the comparison at hwprune's side-by-side "
                        "latency ('uniform-16-matched'; default 7; 0 = off)")
    p.add_argument("--front-rounds", type=int, default=None,
                   help="rounds re-measuring hwprune's Pareto front for the check (default 3; quick 2; 0 = off)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads for BN re-calibration and evaluation (default 1: on a busy 2-core host, 2 "
                        "threads made them 4-10x slower; fine-tuning picks its own count)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the subjects' training (a new CIFAR-10 seed retrains its model), the final "
                        "fine-tunes and, unless --search-seed is given, hwprune's search")
    p.add_argument("--search-seed", type=int, default=None,
                   help="seed of hwprune's search only (default: --seed); repeats the comparison over search seeds "
                        "on the same trained models")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    args.models = (args.models or ("demo" if args.quick else "demo,mobilenetv2")).split(",")
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.rounds = args.rounds if args.rounds is not None else (5 if args.quick else 7)
    args.front_rounds = args.front_rounds if args.front_rounds is not None else (2 if args.quick else 3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    torch.set_num_threads(args.torch_threads)
    backend = OrtBackend(PROFILE)
    results = [bench_subject(name, args, backend, out) for name in args.models]
    finals = [f for r in results for f in r["finals"]]
    overhead = [o for r in results for o in r["overhead"]]
    checks = [c for r in results for c in r["checks"]]
    wall = time.perf_counter() - t0
    command = "python bench/bench_search.py " + " ".join(sys.argv[1:] if argv is None else argv)

    text = [f"## bench_search: hwprune vs. baselines at equal measured latency ({PROFILE}, ONNX Runtime, 1 thread)",
            "", f"`{command}` — {dt.datetime.now().isoformat(timespec='minutes')}, {wall / 60:.1f} min, load average "
            f"{load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end", ""]
    for r in results:
        c = r["config"]
        text.append(f"- **{r['subject']}**: {r['note']}. hwprune: {c['trials']} trials, sampler {c['sampler']}, "
                    f"{c['trial_finetune_steps']} fine-tune steps per trial. Every final model: BN re-calibration + "
                    f"{c['finetune_steps']} fine-tune steps distilled from the dense model.")
    text += ["", results_table(finals), "",
             "Latency: median over interleaved rounds, with the dense model's in the same rounds in brackets; the "
             "ratios are medians over rounds of (model ÷ dense of that round); 'alternating samples' times the model "
             "and the dense model in alternating 2 ms samples in each round, the ratio every comparison is judged "
             "on. 'chose' gives the latency ratio the "
             "method saw when it chose (baselines: "
             + (f"{STAT_NAMES[args.select_stat]} beside the dense model"
                if not args.confirm_tries else
                "the median ratio of the interleaved rounds with the dense model that confirmed the bisection's "
                "choice, which must meet the budget with its standard error as hwprune's picks must")
             + "; hwprune: the median ratio of the interleaved rounds with the dense model that confirmed its pick). "
             "'BN-cal' = accuracy after BN "
             "re-calibration only, before the common fine-tune.", "",
             "### hwprune per-trial overhead (seconds per trial, from summary.json `search.stage_seconds`)", "",
             overhead_table(overhead), ""]
    if any(f.method == NEAR for f in finals):
        text += ["### uniform-16 at hwprune's measured latency", "",
                 "The uniform-16 architectures nearest each hwprune pick by latency (the bisection probe's), given "
                 "the common fine-tune and re-measured in the same interleaved rounds; `uniform-16-matched` above "
                 "is the most accurate of those that ran no slower than hwprune's pick.", "", near_table(finals), ""]
    text += ["### Paired accuracy differences on the same test images", ""]
    pairs = paired_comparisons(finals)
    text += paired_lines(pairs)
    text += ["", "### The budgets hwprune's searches worked to", ""]
    text += budget_lines(finals)
    text += ["", "### No 'smaller but not faster' model on hwprune's Pareto front", ""]
    text += front_lines(checks)
    report = "\n".join(text)
    print(report)

    rows = [final_record(f) for f in finals]
    with open(out / "bench_search.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    payload = {
        "command": command, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(wall, 1), "load_avg_start": load0, "load_avg_end": os.getloadavg(),
        "host": platform.platform(), "commit": git_commit(), "args": {k: v for k, v in vars(args).items()},
        "versions": {"hwprune": hwprune.__version__, "torch": torch.__version__, "torch_pruning": tp.__version__,
                     "onnxruntime": __import__("onnxruntime").__version__, "optuna": __import__("optuna").__version__},
        "subjects": [{"subject": r["subject"], "note": r["note"], "config": r["config"], "curves": r["curves"]}
                     for r in results],
        "results": [{**final_record(f), "latency_rounds": f.rounds} for f in finals],
        "hwprune_overhead_per_trial_s": overhead, "paired": pairs, "pareto_checks": checks, "markdown": report,
    }
    (out / "bench_search.json").write_text(json.dumps(payload, indent=2, default=str))
    say(f"wrote {out / 'bench_search.csv'} and {out / 'bench_search.json'} ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
