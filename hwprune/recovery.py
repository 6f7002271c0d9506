"""Recovery data for a pruned model when the user gave none: BatchNorm re-calibration and distillation inputs.

A pruned copy of a BatchNorm network evaluated with the dense model's running statistics collapses (a model pruned
uniformly by 0.28 scored 0.117 raw and 0.672 after re-calibration on 640 real images): the statistics, not the
architecture, destroyed it. Re-calibration and distillation from the dense model need inputs but no labels, so when
the subject brings no data hwprune finds some:

- ``inputs``: the inputs the user's ``evaluate`` feeds the dense model, recorded by a forward pre-hook. Part of them
  (every ``HELDOUT_EVERY``-th chunk) is never used for recovery, so the pruned model's agreement with the dense model
  can be measured on inputs recovery did not see. The reported accuracy still comes from ``evaluate``, whose inputs
  recovery saw: that is recorded as a leak, never hidden.
- ``synthetic``: inputs optimised so that every BatchNorm layer of the dense model sees its own running statistics
  (ZeroQ / DeepInversion). No leak, but only for BatchNorm models with floating-point inputs.
- ``none``: nothing; the pruned model keeps the dense model's statistics.

The chosen inputs become (inputs, dense outputs) batches with a distillation loss, so the search's re-calibration,
per-trial fine-tune and final fine-tune use them exactly as they use a user's labelled data.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hwprune.config import DEFAULT_RECOVERY, RECOVERY_METHODS
from hwprune import train
from hwprune.errors import HwpruneError, SubjectError

MAX_CAPTURED_SAMPLES = 2048  # inputs recorded from evaluate at most
MAX_CAPTURED_BYTES = 256 * 2**20  # ... and at most this much memory
HELDOUT_EVERY = 4  # every 4th recorded chunk is never used for recovery: agreement is measured on those
CHUNK = 64  # samples per re-calibration / distillation batch
SYNTHETIC_SAMPLES = 64
SYNTHETIC_STEPS = 100
SYNTHETIC_LR = 0.1
DISTILL_TEMPERATURE = 4.0
MIN_RECOVERY_SAMPLES = 16  # fewer recorded inputs than this are not worth using

Inputs = Any  # a tensor, a tuple of positional tensors, or a dict of keyword tensors


@dataclass(frozen=True)
class RecoveryPlan:
    """What a search re-calibrates and fine-tunes pruned candidates on, and where it came from.

    ``batches`` are (inputs, dense outputs) pairs for :func:`distill_loss`; ``heldout`` are recorded inputs no
    recovery step saw. ``leak`` says whether ``evaluate``'s own inputs were used for recovery.
    """

    method: str  # "data" (the user's), "inputs", "synthetic" or "none"
    requested: str
    batches: list[tuple[Inputs, torch.Tensor]] = field(default_factory=list, repr=False)
    heldout: list[tuple[Inputs, torch.Tensor]] = field(default_factory=list, repr=False)
    samples: int = 0
    heldout_samples: int = 0
    leak: bool = False
    seconds: float = 0.0
    note: str = ""

    @property
    def active(self) -> bool:
        """Whether the plan gives the search anything to recover with."""
        return bool(self.batches)

    def to_dict(self) -> dict[str, Any]:
        """The ``recovery`` record of summary.json."""
        return {"method": self.method, "requested": self.requested, "samples": self.samples,
                "heldout_samples": self.heldout_samples, "leak": self.leak, "seconds": round(self.seconds, 2),
                "note": self.note}


def output_tensor(out: Any) -> torch.Tensor | None:
    """The tensor to distil from a model output: the tensor itself, ``.logits``, or the first tensor of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def distill_loss(student: Any, teacher: torch.Tensor) -> torch.Tensor:
    """Distillation towards recorded dense outputs: KL divergence of the softened class scores (Hinton et al.,
    2015) when the last dimension holds several classes, mean squared error otherwise."""
    s = output_tensor(student)
    if s is None:
        raise HwpruneError("cannot distil: the model output holds no tensor")
    if teacher.dim() >= 2 and teacher.shape[-1] > 1:
        t = DISTILL_TEMPERATURE
        return F.kl_div(F.log_softmax(s.reshape(-1, s.shape[-1]) / t, -1),
                        F.softmax(teacher.reshape(-1, teacher.shape[-1]) / t, -1),
                        reduction="batchmean") * t * t
    return F.mse_loss(s.float(), teacher.float())


# -- recording what evaluate feeds the dense model -----------------------------------------------------------------
def _batch_size(inputs: Inputs) -> int:
    tensors = _tensors(inputs)
    return int(tensors[0].shape[0]) if tensors and tensors[0].dim() > 0 else 1


def _tensors(inputs: Inputs) -> list[torch.Tensor]:
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else [inputs]
    return [v for v in values if isinstance(v, torch.Tensor)]


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return tuple(_detach(v) for v in value)
    return value


def capture_inputs(model: nn.Module, evaluate: Callable[[nn.Module], Any],
                   max_samples: int = MAX_CAPTURED_SAMPLES, seed: int = 0) -> tuple[Any, list[Inputs]]:
    """Call ``evaluate(model)`` and record the inputs of the forward calls of ``model`` it makes: chunks of ``CHUNK``
    samples drawn uniformly from the whole evaluation (reservoir sampling), at most ``max_samples`` samples and
    ``MAX_CAPTURED_BYTES``.

    Uniform, not the first ones: an evaluation set sorted by class (as an image folder is) would otherwise give
    recovery a few classes only (on CIFAR-10 that made distillation worse than re-calibration alone).

    Returns:
        What ``evaluate`` returned, and the recorded chunks (each a tensor, a tuple of positional arguments, or a
        dict when the call had keyword arguments), in the order they were fed.
    """
    kept: list[tuple[int, Inputs]] = []  # (position in the evaluation, chunk)
    seen = [0]
    capacity = [max(1, max_samples // CHUNK)]
    rng = random.Random(seed)

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if kwargs:
            names = _positional_names(model, len(args))
            if names is None:
                return
            inputs: Inputs = {**dict(zip(names, args)), **kwargs}
        else:
            inputs = args[0] if len(args) == 1 else tuple(args)
        if not _tensors(inputs):
            return
        for chunk in _chunks(inputs):
            i = seen[0]
            seen[0] += 1
            slot = len(kept) if len(kept) < capacity[0] else rng.randrange(i + 1)
            if slot >= capacity[0]:
                continue
            copy = (i, _detach(chunk))
            if i == 0:  # the memory bound, from the first chunk's size
                size = sum(t.numel() * t.element_size() for t in _tensors(copy[1]))
                capacity[0] = max(1, min(capacity[0], MAX_CAPTURED_BYTES // max(size, 1)))
            if slot == len(kept):
                kept.append(copy)
            else:
                kept[slot] = copy

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        score = evaluate(model)
    finally:
        handle.remove()
    return score, [chunk for _, chunk in sorted(kept, key=lambda ic: ic[0])]


def _positional_names(model: nn.Module, n: int) -> list[str] | None:
    """The names of ``model.forward``'s first ``n`` parameters, so a call mixing positional and keyword arguments can
    be replayed with keywords only; None when they cannot be named."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names[:n] if len(names) >= n else None


def _chunks(inputs: Inputs, size: int = CHUNK) -> list[Inputs]:
    """``inputs`` split along the batch dimension into pieces of at most ``size`` samples."""
    n = _batch_size(inputs)
    if n <= size:
        return [inputs]

    def cut(value: Any, a: int, b: int) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            return value[a:b]
        if isinstance(value, dict):
            return {k: cut(v, a, b) for k, v in value.items()}
        if isinstance(value, tuple):
            return tuple(cut(v, a, b) for v in value)
        return value

    return [cut(inputs, a, min(a + size, n)) for a in range(0, n, size)]


@torch.no_grad()
def with_dense_outputs(model: nn.Module, inputs: Iterable[Inputs]) -> list[tuple[Inputs, torch.Tensor]]:
    """(inputs, dense output) pairs: the distillation targets, computed once."""
    model.eval()
    pairs = []
    for x in inputs:
        out = output_tensor(train.call(model, x))
        if out is None:
            raise HwpruneError("the model's output holds no tensor to distil from")
        pairs.append((x, out.detach().clone()))
    return pairs


# -- synthesising inputs from BatchNorm statistics -----------------------------------------------------------------
def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that track running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None]


def synthesize_inputs(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], *,
                      samples: int = SYNTHETIC_SAMPLES, steps: int = SYNTHETIC_STEPS, seed: int = 0,
                      batch: int = CHUNK) -> list[torch.Tensor]:
    """Inputs that make each BatchNorm layer of ``model`` see its running mean and variance (ZeroQ, Cai et al. 2020;
    DeepInversion, Yin et al. 2020): random images optimised with Adam for ``steps`` steps per batch.

    Returns:
        Batches of synthetic inputs, ``samples`` in all.

    Raises:
        HwpruneError: the model has no BatchNorm layer or more than one input, or its input is not floating point.
    """
    bns = batchnorm_layers(model)
    if not bns:
        raise HwpruneError("synthetic recovery inputs need BatchNorm statistics, and the model has no BatchNorm layer")
    if len(example_inputs) != 1 or not example_inputs[0].is_floating_point():
        raise HwpruneError("synthetic recovery inputs need a single floating-point input tensor")
    shape = tuple(example_inputs[0].shape[1:])
    losses: list[torch.Tensor] = []

    def hook(module: nn.modules.batchnorm._BatchNorm, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]
        dims = [0] + list(range(2, x.dim()))
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        losses.append(torch.norm(mean - module.running_mean, 2) + torch.norm(var - module.running_var, 2))

    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in grads:
        p.requires_grad_(False)
    handles = [m.register_forward_pre_hook(hook) for m in bns]
    out: list[torch.Tensor] = []
    try:
        for start in range(0, samples, batch):
            x = torch.randn((min(batch, samples - start), *shape), generator=generator).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=SYNTHETIC_LR)
            for _ in range(steps):
                losses.clear()
                train.call(model, x)
                loss = torch.stack(losses).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            out.append(x.detach())
    finally:
        for h in handles:
            h.remove()
        for p, g in grads:
            p.requires_grad_(g)
        model.train(was_training)
    return out


# -- the plan ----------------------------------------------------------------------------------------------------
def auto_method(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], recorded_samples: int) -> str:
    """The recovery ``auto`` picks: the recorded evaluation inputs when there are enough of them, else synthetic
    inputs for a BatchNorm model with one floating-point input, else none (see docs/benchmarks.md, "Recovery")."""
    if recorded_samples >= MIN_RECOVERY_SAMPLES:
        return "inputs"
    if batchnorm_layers(model) and len(example_inputs) == 1 and example_inputs[0].is_floating_point():
        return "synthetic"
    return "none"


def plan_recovery(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], recorded: list[Inputs],
                  method: str = DEFAULT_RECOVERY, *, seed: int = 0,
                  log: Callable[[str], None] | None = None) -> RecoveryPlan:
    """The recovery data for a subject without data of its own, from the inputs recorded while ``evaluate`` scored
    the dense model (:func:`capture_inputs`).

    Args:
        model: the dense model (the distillation teacher).
        example_inputs: its example inputs.
        recorded: inputs recorded from ``evaluate``.
        method: ``auto``, ``inputs``, ``synthetic`` or ``none``.
        seed: seed of the synthetic inputs.
        log: progress lines.

    Returns:
        The plan; its ``heldout`` are recorded inputs recovery never uses (every ``HELDOUT_EVERY``-th chunk of
        ``CHUNK`` samples; all of them when recovery does not use recorded inputs).

    Raises:
        SubjectError: ``method`` is unknown, or cannot be done for this model (e.g. ``synthetic`` without BatchNorm).
    """
    if method not in RECOVERY_METHODS:
        raise SubjectError(f"recovery {method!r} is not one of {', '.join(RECOVERY_METHODS)}")
    t0 = time.perf_counter()
    chunks = [c for x in recorded for c in _chunks(x)]
    heldout_chunks = chunks[HELDOUT_EVERY - 1::HELDOUT_EVERY] if len(chunks) >= 2 else []
    seen_chunks = [c for i, c in enumerate(chunks) if (i + 1) % HELDOUT_EVERY or len(chunks) < 2]
    seen = sum(_batch_size(c) for c in seen_chunks)
    chosen = auto_method(model, example_inputs, seen) if method == "auto" else method
    try:
        if chosen == "none":
            heldout = with_dense_outputs(model, chunks)
            return RecoveryPlan("none", method, heldout=heldout, heldout_samples=_count(heldout),
                                seconds=time.perf_counter() - t0,
                                note="no recovery: pruned models keep the dense model's BatchNorm statistics")
        if chosen == "inputs":
            if seen < MIN_RECOVERY_SAMPLES:
                raise SubjectError(f"recovery 'inputs': evaluate fed the model {seen} usable samples; at least "
                                   f"{MIN_RECOVERY_SAMPLES} are needed (give data instead)")
            return plan_from_inputs(model, seen_chunks, heldout_chunks, "inputs", method, leak=True, t0=t0,
                                    note=("inputs recorded from evaluate re-calibrate BatchNorm and are distilled on; "
                                          "evaluate scores those same inputs, so its accuracy may be optimistic: "
                                          "agreement with the dense model is also measured on held-out recorded "
                                          "inputs"))
        if log:
            log(f"synthesising {SYNTHETIC_SAMPLES} recovery inputs from the dense model's BatchNorm statistics...")
        try:
            synthetic = synthesize_inputs(model, example_inputs, seed=seed)
        except HwpruneError as exc:
            raise SubjectError(f"recovery 'synthetic': {exc}") from None
        return plan_from_inputs(model, synthetic, chunks, "synthetic", method, leak=False, t0=t0,
                                note="inputs synthesised from the dense model's BatchNorm statistics; evaluate's "
                                     "inputs are not used for recovery")
    except SubjectError:
        raise
    except HwpruneError as exc:
        raise SubjectError(f"recovery {chosen!r}: {exc}") from None


def plan_from_inputs(model: nn.Module, inputs: list[Inputs], heldout: list[Inputs], method: str, requested: str, *,
                     leak: bool, note: str, t0: float | None = None) -> RecoveryPlan:
    """A plan that re-calibrates and distils on ``inputs`` (re-batched to ``CHUNK`` samples), with the dense model's
    outputs on them as targets; ``heldout`` inputs only measure agreement."""
    t0 = time.perf_counter() if t0 is None else t0
    batches = with_dense_outputs(model, [c for x in inputs for c in _chunks(x)])
    held = with_dense_outputs(model, heldout)
    return RecoveryPlan(method, requested, batches, held, _count(batches), _count(held), leak=leak,
                        seconds=time.perf_counter() - t0, note=note)


def _count(pairs: list[tuple[Inputs, torch.Tensor]]) -> int:
    return sum(_batch_size(x) for x, _ in pairs)


@torch.no_grad()
def agreement(model: nn.Module, pairs: list[tuple[Inputs, torch.Tensor]]) -> float | None:
    """The share of samples on which ``model`` predicts the dense model's class (argmax of the last dimension) on
    recorded (inputs, dense output) ``pairs``; None without pairs or for outputs without classes."""
    hits = total = 0
    model.eval()
    for x, dense in pairs:
        if dense.dim() < 2 or dense.shape[-1] < 2:
            return None
        out = output_tensor(train.call(model, x))
        if out is None or out.shape != dense.shape:
            return None
        same = out.argmax(-1) == dense.argmax(-1)
        hits += int(same.sum())
        total += same.numel()
    return hits / total if total else None


def recover(module: nn.Module, plan: RecoveryPlan, *, steps: int = 0, lr: float = 0.01,
            calibration_batches: int = 8) -> nn.Module:
    """Re-calibrate ``module``'s BatchNorm statistics on the plan's inputs and distil ``steps`` SGD steps towards the
    recorded dense outputs (a standalone use of what a search does per candidate); returns ``module``."""
    if not plan.active:
        return module
    batches = iterate(plan)  # shuffled, as the search gives them: chunks come in evaluation order
    train.recalibrate_batchnorm(module, batches, calibration_batches)
    if steps:
        train.finetune(module, batches, steps, loss_fn=distill_loss, lr=lr)
    return module


def iterate(plan: RecoveryPlan) -> Iterable[tuple[Inputs, torch.Tensor]]:
    """The plan's batches in a fresh order each pass (drawn from torch's global RNG, so a seeded search replays
    them), as a ``DataLoader(shuffle=True)`` would."""
    return _Shuffled(plan.batches)


class _Shuffled:
    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self):
        order = torch.randperm(len(self.batches)).tolist()
        return (self.batches[i] for i in order)

    def __len__(self) -> int:
        return len(self.batches)
