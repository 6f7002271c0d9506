"""Training steps hwprune needs: BatchNorm re-calibration after pruning, short fine-tunes, optional distillation."""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hwprune.small_map_convs import small_map_convs


def _inputs_of(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def call(model: nn.Module, inputs: Any) -> Any:
    """``model`` on a batch's inputs: a tuple of positional tensors, a dict of keyword tensors (as recorded from a
    call like ``model(input_ids=x)``), or one tensor."""
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def _forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    out = call(model, inputs)
    return out.logits if hasattr(out, "logits") else out


def training_threads() -> int:
    """Threads for torch training: all cores on a quiet host, one when other processes keep the CPUs busy.

    Measured on a 2-core host: with another process busy, a 2-thread training step took 3.7 s against 0.27 s for
    one thread, because OpenMP workers wait on a preempted sibling. One thread never collapses like that.
    """
    cores = os.cpu_count() or 1
    busy = _busy_cores_elsewhere()
    return max(1, min(cores, int(cores - busy + 0.5)))


_BUSY_CACHE: list[float] = []  # [monotonic time, busy cores]


def _busy_cores_elsewhere(window_s: float = 0.1, reuse_s: float = 5.0) -> float:
    """Cores kept busy by other processes: /proc/stat's non-idle time over a short window while this process waits.

    Not the load average: it counts this process's own work, so a search that trained on one thread would go on
    seeing one busy core and never use the second. Falls back to the load average where /proc/stat is missing.
    """
    now = time.monotonic()
    if _BUSY_CACHE and now - _BUSY_CACHE[0] < reuse_s:
        return _BUSY_CACHE[1]
    try:
        a = _cpu_jiffies()
        time.sleep(window_s)  # this process does nothing meanwhile: what is busy is someone else
        b = _cpu_jiffies()
        total, idle = b[0] - a[0], b[1] - a[1]
        busy = (os.cpu_count() or 1) * (1.0 - idle / total) if total > 0 else 0.0
    except (OSError, ValueError, IndexError):
        try:
            busy = os.getloadavg()[0]
        except OSError:
            busy = 0.0
    _BUSY_CACHE[:] = [now, busy]
    return busy


def _cpu_jiffies() -> tuple[int, int]:
    """(total, idle + iowait) jiffies over all CPUs, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields[:8]), fields[3] + fields[4]


@contextlib.contextmanager
def channels_last(*models: nn.Module | None) -> Iterator[None]:
    """Hold the 4-D weights of ``models`` in channels-last layout for the block, then put them back.

    oneDNN's CPU convolutions run channels-last much faster: a training step of the demo's MobileNetV2-like model
    took 0.14 s against 0.27 s on one thread (0.08 s against 0.13 s on two); the ResNet-like one gained 1.3x. The
    layout is undone afterwards because pruning, export and ``state_dict`` consumers expect contiguous tensors.
    Models without 4-D weights, or whose 4-D weights are not contiguous (a caller's own layout), are left alone.
    """
    def standard_4d(m: nn.Module) -> bool:
        weights = [p for p in m.parameters() if p.dim() == 4]
        return bool(weights) and all(w.is_contiguous() for w in weights)

    convs = [m for m in models if m is not None and standard_4d(m)]
    for m in convs:
        m.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for m in convs:
            m.to(memory_format=torch.contiguous_format)


def _cycle(data: Iterable[Any]):
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            return


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: Iterable[Any], batches: int = 8) -> int:
    """Re-estimate BatchNorm running statistics on ``batches`` batches; returns how many were used.

    Pruning removes channels whose contributions the old statistics averaged in, so a pruned model evaluated with
    stale statistics looks worse than it is. Cumulative averaging (momentum=None) makes the result order-independent.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    used = 0
    try:
        with channels_last(model):
            for batch in itertools.islice(data, batches):
                _forward(model, _inputs_of(batch))
                used += 1
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.train(was_training)
    model.eval()
    return used


def finetune(model: nn.Module, data: Iterable[Any], steps: int, *,
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
             lr: float = 0.01, teacher: nn.Module | None = None, distill_weight: float = 0.5,
             temperature: float = 4.0, progress: Callable[[int, float], None] | None = None) -> float:
    """Train ``model`` for ``steps`` SGD steps on (inputs, targets) batches; returns the mean loss of the last 10.

    With a ``teacher``, the loss mixes the task loss with KL divergence to the teacher's softened outputs
    (Hinton et al., 2015), which recovers pruned accuracy faster than labels alone.
    """
    if steps <= 0:
        return float("nan")
    loss_fn = loss_fn or F.cross_entropy
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=4e-5, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    if teacher is not None:
        teacher.eval()
    model.train()
    losses: list[float] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(training_threads())
    try:
        with channels_last(model, teacher), small_map_convs(model):
            _train_loop(model, data, steps, loss_fn, opt, sched, teacher, distill_weight, temperature, progress,
                        losses)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return sum(losses[-10:]) / len(losses[-10:])


def _train_loop(model, data, steps, loss_fn, opt, sched, teacher, distill_weight, temperature, progress,
                losses: list[float]) -> None:
    for step, batch in enumerate(itertools.islice(_cycle(data), steps)):
        inputs, targets = batch[0], batch[1]
        out = _forward(model, inputs)
        loss = loss_fn(out, targets)
        if teacher is not None:
            with torch.no_grad():
                t_out = _forward(teacher, inputs)
            kd = F.kl_div(F.log_softmax(out / temperature, -1), F.softmax(t_out / temperature, -1),
                          reduction="batchmean") * temperature**2
            loss = (1 - distill_weight) * loss + distill_weight * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, losses[-1])


@torch.no_grad()
def correct(model: nn.Module, data: Iterable[Any]) -> torch.Tensor:
    """Whether each target is predicted right (top-1; bool, in data order): what a paired comparison of two models
    on the same data needs."""
    model.eval()
    with channels_last(model):
        hits = [(_forward(model, inputs).argmax(-1) == targets).flatten() for inputs, targets in data]
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)


def accuracy(model: nn.Module, data: Iterable[Any]) -> float:
    """Top-1 accuracy over (inputs, targets) batches."""
    hits = correct(model, data)
    return int(hits.sum()) / max(hits.numel(), 1)
