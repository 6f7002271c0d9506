"""Subjects for bench/bench_accuracy.py: trained dense models with three disjoint labelled splits each.

Every subject comes with

* ``eval_split``    the batches the user's ``evaluate(model)`` scores (what the search chooses on, and what a
                    recovery step that captures the inputs ``evaluate`` feeds gets to see);
* ``heldout_split`` batches only the benchmark looks at: nothing chooses, calibrates or recovers on them;
* ``train_split``   labelled training batches, given to hwprune only in the rich form (``Subject.train_data``).

``minimal()`` returns what a user with nothing but a model and an evaluation function passes to ``hwprune.search``:
``(model, example_inputs, evaluate)``; ``rich()`` a :class:`hwprune.Subject` with calibration and training data.
The ``evaluate`` functions compute top-1 accuracy themselves (no hwprune helpers), as a user's would.

Subjects (``SUBJECTS``):

* ``demo``  hwprune's built-in ``mobilenet-tiny`` (BatchNorm CNN on generated 32x32 "shapes"), trained and cached by
            ``hwprune.subjects.demo.build_demo``; held-out: 2,000 images from a seed the demo does not use.
* ``cifar`` bench/bench_search.py's CIFAR-10 ResNet (BatchNorm CNN, widths 32/64/128), trained on the first 4,000
            training images per class; evaluate: the next 500 per class; held-out: the 10,000 test images.
* ``vit``   a small ViT (conv stem to 16 patch tokens, 4 pre-norm blocks with ``nn.MultiheadAttention``, LayerNorm
            only) trained
            here on generated shapes; cached under ``~/.cache/hwprune/bench/``.
* ``bert``  a 4-layer ``transformers.BertForSequenceClassification`` from a small ``BertConfig`` (no download),
            trained here to tell which of 8 ordered 3-token motifs a random token sequence contains; cached likewise.

Dense training runs on one thread (``torch.set_num_threads(1)``) the first time only.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent

import hwprune  # noqa: E402
from hwprune.export import atomic_torch_save  # noqa: E402
from hwprune.subjects.demo import cache_dir  # noqa: E402
from hwprune.subjects.shapes import make_shapes  # noqa: E402


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Batches:
    """Re-iterable (inputs, targets) mini-batches over in-memory tensors; ``shuffle`` draws each epoch's order from
    torch's global RNG (as ``DataLoader(shuffle=True)`` does)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False) -> None:
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle

    def __iter__(self):
        n = self.x.shape[0]
        order = torch.randperm(n) if self.shuffle else torch.arange(n)
        for i in range(0, n, self.batch_size):
            idx = order[i:i + self.batch_size]
            yield self.x[idx], self.y[idx]

    def __len__(self) -> int:
        return -(-self.x.shape[0] // self.batch_size)

    @property
    def size(self) -> int:
        return int(self.x.shape[0])


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def user_accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy, written as a user's ``evaluate`` would be (no hwprune helpers)."""
    model.eval()
    hits = total = 0
    for x, y in batches:
        pred = _logits(model(x)).argmax(-1)
        hits += int((pred == y).sum())
        total += int(y.numel())
    return hits / max(total, 1)


@dataclass
class AccuracySubject:
    key: str  # demo | cifar | vit | bert
    name: str
    family: str  # "bn-cnn" | "transformer"
    model: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    eval_split: Batches
    heldout_split: Batches
    train_split: Batches
    calibration_split: Batches
    description: str
    train_seconds: float = 0.0  # dense training this run (0 when loaded from the cache)

    def evaluate(self, model: nn.Module) -> float:
        return user_accuracy(model, self.eval_split)

    def heldout(self, model: nn.Module) -> float:
        return user_accuracy(model, self.heldout_split)

    def minimal(self) -> tuple[nn.Module, tuple[torch.Tensor, ...], Callable[[nn.Module], float]]:
        split = self.eval_split
        return self.model, self.example_inputs, lambda m: user_accuracy(m, split)

    def rich(self) -> "hwprune.Subject":
        split = self.eval_split
        return hwprune.Subject(model=self.model, example_inputs=self.example_inputs,
                               evaluate=lambda m: user_accuracy(m, split), calibration_data=self.calibration_split,
                               train_data=self.train_split, loss_fn=None, name=self.name,
                               description=self.description)


def _cache_path(name: str, *parts: Any) -> Path:
    key = hashlib.sha256("|".join(str(p) for p in (name, *parts, torch.__version__)).encode()).hexdigest()[:12]
    return cache_dir() / "bench" / f"{name}-{key}.pt"


def _one_thread_training():
    """hwprune.train.finetune picks its own thread count; the benchmark shares the host, so pin it to one."""
    from hwprune import train

    train.training_threads = lambda: 1  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------------------------------
# a. the demo

DEMO_HELDOUT_SEED = 7777  # the demo trains on seed 1000 and evaluates on seed 2000 (hwprune/subjects/demo.py)


def demo_subject(seed: int = 0) -> AccuracySubject:
    from hwprune.subjects.demo import _data, build_demo

    _one_thread_training()
    t0 = time.perf_counter()
    s = build_demo("mobilenet-tiny", seed=seed, log=say)
    trained = time.perf_counter() - t0
    x_train, y_train, x_val, y_val = _data(seed)
    xh, yh = make_shapes(2000, seed=DEMO_HELDOUT_SEED)
    return AccuracySubject(
        key="demo", name="mobilenet-tiny", family="bn-cnn", model=s.model, example_inputs=s.example_inputs,
        eval_split=Batches(x_val, y_val, 500), heldout_split=Batches(xh, yh, 500),
        train_split=Batches(x_train, y_train, 128, shuffle=True),
        calibration_split=Batches(x_train[:1024], y_train[:1024], 128),
        description="demo mobilenet-tiny (BN CNN) on generated shapes: eval = the demo's 2,000 validation images, "
                    f"held-out = 2,000 images of seed {DEMO_HELDOUT_SEED}",
        train_seconds=trained if trained > 20 else 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# b. CIFAR-10 ResNet (bench/bench_search.py's)

# bench_search.py trains 3,000 steps (9 min on 2 threads); on one shared thread that is ~15 min, so the accuracy bench
# trains 1,500 (its own cache entry: build_cifar keys the cache by steps)
CIFAR_STEPS = 1500


def _closure_var(fn: Callable[..., Any], name: str) -> Any:
    """The variable ``name`` a closure captured (build_cifar's splits live only in its lambdas)."""
    return fn.__closure__[fn.__code__.co_freevars.index(name)].cell_contents  # type: ignore[index]


def cifar_subject(seed: int = 0, steps: int = CIFAR_STEPS) -> AccuracySubject:
    from bench import search_data
    from bench.common import CIFAR_ZIP

    _one_thread_training()
    t0 = time.perf_counter()
    # trains on the first run (its cache is keyed by steps), else loads the cached weights; the zip is decoded once
    subject, note, correct_test = search_data.build_cifar(seed, CIFAR_ZIP, steps=steps)
    took = time.perf_counter() - t0
    val, test = _closure_var(subject.evaluate, "val"), _closure_var(correct_test, "test")
    train_data, calib = subject.train_data, subject.calibration_data
    return AccuracySubject(
        key="cifar", name="cifar-resnet", family="bn-cnn", model=subject.model,
        example_inputs=subject.example_inputs, eval_split=Batches(val.x, val.y, 1000),
        heldout_split=Batches(test.x, test.y, 1000), train_split=Batches(train_data.x, train_data.y, 128, shuffle=True),
        calibration_split=Batches(calib.x, calib.y, 128),
        description=f"{note}. Trained {steps} steps here (bench_search.py: 3,000) to fit the time budget; "
                    "eval = 5,000 training images not trained on, held-out = the 10,000 test images",
        train_seconds=took if took > 120 else 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# c. a small ViT on shapes


class ViTBlock(nn.Module):
    """Pre-norm encoder block: x + MHA(LN(x)), x + MLP(LN(x))."""

    def __init__(self, d: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, mlp)
        self.fc2 = nn.Linear(mlp, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class SmallViT(nn.Module):
    """A ViT with a small convolutional stem (Xiao et al., 2021, "Early convolutions help transformers see better"):
    two stride-2 convs and a 2x2 patch conv (no BatchNorm) turn a 32x32 image into 4x4 = 16 tokens of width ``d``,
    a LayerNorm on the patch embeddings, ``depth`` pre-norm blocks, a final LayerNorm and mean pooling over tokens.
    Plain 8x8 patches with a class token reached only 0.56 on shapes in 1,500 steps (4x4 patches, 64 tokens, trained
    4x slower); the conv stem with a class token 0.70."""

    def __init__(self, d: int = 64, heads: int = 4, depth: int = 4, mlp: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU())
        self.patch = nn.Conv2d(64, d, 2, 2)
        self.patch_norm = nn.LayerNorm(d)
        self.pos = nn.Parameter(torch.randn(1, 16, d) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(d, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_norm(self.patch(self.stem(x)).flatten(2).transpose(1, 2)) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


def _train_adamw(model: nn.Module, data: Batches, steps: int, lr: float, label: str,
                 weight_decay: float = 0.05, hflip: bool = False) -> float:
    """AdamW with warm-up and cosine decay: the transformers' dense training (SGD suits them poorly)."""
    torch.set_num_threads(1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + np.cos(np.pi * (s - warm) / max(1, steps - warm))))
    model.train()
    t0 = time.perf_counter()
    step = 0
    losses: list[float] = []
    while step < steps:
        for x, y in data:
            if hflip:  # shapes' classes are all mirror-symmetric left-right
                x = torch.where(torch.rand(x.shape[0], 1, 1, 1) < 0.5, x.flip(3), x)
            loss = F.cross_entropy(_logits(model(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            step += 1
            if step % 200 == 0 or step == steps:
                el = time.perf_counter() - t0
                say(f"  {label} step {step}/{steps}, loss {np.mean(losses[-50:]):.3f}, {el:.0f} s elapsed, "
                    f"~{el / step * (steps - step):.0f} s left")
            if step >= steps:
                break
    model.eval()
    return time.perf_counter() - t0


VIT_STEPS = 1800
VIT_SEEDS = {"train": 3100, "eval": 3200, "heldout": 3300}


def vit_subject(seed: int = 0, steps: int = VIT_STEPS) -> AccuracySubject:
    x_train, y_train = make_shapes(30000, seed=VIT_SEEDS["train"] + seed)
    x_val, y_val = make_shapes(2000, seed=VIT_SEEDS["eval"] + seed)
    xh, yh = make_shapes(2000, seed=VIT_SEEDS["heldout"] + seed)
    torch.manual_seed(seed)
    model = SmallViT()
    path = _cache_path("vit-shapes", "convstem-pn-meanpool-d64-h4-L4-mlp128-t16-hflip", steps, seed, "adamw3e-3")
    trained = 0.0
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        say(f"training the small ViT on shapes ({steps} steps, first run only)...")
        trained = _train_adamw(model, Batches(x_train, y_train, 128, shuffle=True), steps, 3e-3, "vit", hflip=True)
        atomic_torch_save(model.state_dict(), path)
    model.eval()
    return AccuracySubject(
        key="vit", name="vit-shapes", family="transformer", model=model, example_inputs=(torch.zeros(1, 3, 32, 32),),
        eval_split=Batches(x_val, y_val, 500), heldout_split=Batches(xh, yh, 500),
        train_split=Batches(x_train, y_train, 128, shuffle=True),
        calibration_split=Batches(x_train[:1024], y_train[:1024], 128),
        description=f"ViT (conv stem to 16 patch tokens, d 64, 4 heads, 4 pre-norm blocks, MLP 128, mean pooling; "
                    f"LayerNorm only, no BatchNorm) trained {steps} AdamW steps on 30,000 generated shapes; eval and "
                    "held-out: 2,000 images each from other seeds",
        train_seconds=trained)


# ---------------------------------------------------------------------------------------------------------------------
# d. a BERT-style encoder on a generated motif task

SEQ_LEN = 32
VOCAB = 40
CLS_ID, PAD_ID = 1, 0
MOTIF_ALPHABET = (4, 5, 6, 7, 8)  # motifs are ordered triples of distinct tokens of these; the background never
N_MOTIFS = 8  # uses them (with them as background noise too, 1,500 steps reached only 0.51)
BACKGROUND = (9, VOCAB)
DISTRACTORS = 2  # motif tokens dropped at random places besides the motif (without 2, the task saturated at 1.000)


def _motifs() -> np.ndarray:
    rng = np.random.default_rng(12345)
    triples = [(a, b, c) for a in MOTIF_ALPHABET for b in MOTIF_ALPHABET for c in MOTIF_ALPHABET if len({a, b, c}) == 3]
    pick = rng.choice(len(triples), size=N_MOTIFS, replace=False)
    return np.array([triples[i] for i in pick], dtype=np.int64)


def make_motif_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences ([CLS] + 31 tokens) each containing exactly one of the 8 motifs (its label) once, at a random
    place in random background tokens. Several motifs share their set of tokens, so the order matters."""
    motifs = _motifs()
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    have = 0
    while have < n:
        m = 2 * (n - have) + 16
        body = rng.integers(*BACKGROUND, size=(m, SEQ_LEN - 1))
        labels = rng.integers(0, N_MOTIFS, size=m)
        pos = rng.integers(0, SEQ_LEN - 1 - 2, size=m)
        for _ in range(DISTRACTORS):
            body[np.arange(m), rng.integers(0, SEQ_LEN - 1, size=m)] = rng.choice(MOTIF_ALPHABET, size=m)
        for k in range(3):
            body[np.arange(m), pos + k] = motifs[labels, k]
        windows = np.lib.stride_tricks.sliding_window_view(body, 3, axis=1)  # m x (L-3) x 3
        occurs = (windows[:, :, None, :] == motifs[None, None]).all(-1).sum(1)  # m x K: occurrences per motif
        ok = (occurs.sum(1) == 1)  # only the planted motif, once
        xs.append(body[ok])
        ys.append(labels[ok])
        have += int(ok.sum())
    body = np.concatenate(xs)[:n]
    ids = np.concatenate([np.full((n, 1), CLS_ID), body], axis=1)
    return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(np.concatenate(ys)[:n].astype(np.int64))


def bert_model(seed: int = 0) -> nn.Module:
    import transformers

    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=SEQ_LEN, type_vocab_size=1, num_labels=N_MOTIFS, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config)


BERT_STEPS = 1500
BERT_SEEDS = {"train": 4100, "eval": 4200, "heldout": 4300}


def bert_subject(seed: int = 0, steps: int = BERT_STEPS) -> AccuracySubject:
    x_train, y_train = make_motif_data(20000, seed=BERT_SEEDS["train"] + seed)
    x_val, y_val = make_motif_data(2000, seed=BERT_SEEDS["eval"] + seed)
    xh, yh = make_motif_data(2000, seed=BERT_SEEDS["heldout"] + seed)
    model = bert_model(seed)
    tag = f"v{VOCAB}-L{SEQ_LEN}-K{N_MOTIFS}-a{len(MOTIF_ALPHABET)}-bg{BACKGROUND[0]}-x{DISTRACTORS}-d64-h4-L4"
    path = _cache_path("bert-motifs", tag, steps, seed,
                       "adamw2e-3")
    trained = 0.0
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        say(f"training the BERT-style encoder on the motif task ({steps} steps, first run only)...")
        trained = _train_adamw(model, Batches(x_train, y_train, 128, shuffle=True), steps, 2e-3, "bert",
                               weight_decay=0.01)
        atomic_torch_save(model.state_dict(), path)
    model.eval()
    return AccuracySubject(
        key="bert", name="bert-motifs", family="transformer", model=model, example_inputs=(x_val[:1].clone(),),
        eval_split=Batches(x_val, y_val, 500), heldout_split=Batches(xh, yh, 500),
        train_split=Batches(x_train, y_train, 128, shuffle=True),
        calibration_split=Batches(x_train[:1024], y_train[:1024], 128),
        description=f"BertForSequenceClassification (4 layers, hidden 64, 4 heads, intermediate 128, vocab {VOCAB}) "
                    f"trained {steps} AdamW steps to tell which of {N_MOTIFS} ordered 3-token motifs a random "
                    f"{SEQ_LEN}-token sequence contains; eval and held-out: 2,000 sequences each from other seeds",
        train_seconds=trained)


SUBJECTS: dict[str, Callable[..., AccuracySubject]] = {
    "demo": demo_subject,
    "cifar": cifar_subject,
    "vit": vit_subject,
    "bert": bert_subject,
}


def load(key: str, seed: int = 0) -> AccuracySubject:
    if key not in SUBJECTS:
        raise SystemExit(f"unknown subject {key!r}; choose from {', '.join(SUBJECTS)}")
    torch.set_num_threads(1)
    return SUBJECTS[key](seed)


if __name__ == "__main__":  # build (train once) and score the named subjects
    torch.set_num_threads(1)
    for key in sys.argv[1:] or list(SUBJECTS):
        t0 = time.perf_counter()
        s = load(key)
        print(f"{key}: eval {s.evaluate(s.model):.4f}, held-out {s.heldout(s.model):.4f}, "
              f"train split {user_accuracy(s.model, Batches(s.train_split.x[:2000], s.train_split.y[:2000], 500)):.4f}"
              f" ({time.perf_counter() - t0:.0f} s)")
