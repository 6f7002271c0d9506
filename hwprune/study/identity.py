"""Study identity: what a study's trials were measured and scored on, so a resumed run never mixes another model's
trials into its answer.

A study records a fingerprint of the model (architecture and weights), the example inputs, the device settings that
latencies depend on (the measurement context), the recovery data and the budgets. Resuming with another model,
inputs, device, recovery or channel ranking is refused with one line saying what changed; ``--resume-changed`` resumes
it anyway where the trials still apply (other weights, device settings, recovery or ranking; never another
architecture or inputs). A changed budget is allowed and announced (every trial keeps the budgets it was judged by).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import optuna
import torch
from torch import nn

from hwprune.errors import HwpruneError
from hwprune.study import attrs

FINGERPRINT_ATTR = attrs.FINGERPRINT  # study user attribute


@dataclass(frozen=True)
class Fingerprint:
    """What a study's trials depend on; the fields are short hashes or plain text."""

    architecture: str
    weights: str
    inputs: str
    device: str
    recovery: str
    importance: str  # the channel ranking: the same ratios keep other channels under another one
    budgets: str

    # the parts that make old trials wrong for this run (budgets only re-judge them)
    BINDING = ("architecture", "weights", "inputs", "device", "recovery", "importance")

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _sha(text: bytes) -> str:
    return hashlib.sha256(text).hexdigest()[:12]


def model_fingerprint(model: nn.Module) -> tuple[str, str]:
    """(architecture, weights) hashes of ``model``: its module tree and every parameter and buffer's values."""
    arch = _sha(repr(model).encode())
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        if isinstance(t, torch.Tensor):
            h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return arch, h.hexdigest()[:12]


def fingerprint(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], device: str, recovery: str,
                importance: str, budgets: str) -> Fingerprint:
    """The fingerprint of a search of ``model`` on ``example_inputs``; ``device`` is the measurement context,
    ``recovery`` what pruned models recover with, ``importance`` the channel ranking, ``budgets`` the budgets and
    accuracy guard as typed."""
    arch, weights = model_fingerprint(model)
    inputs = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in example_inputs)
    return Fingerprint(arch, weights, inputs, device, recovery, importance, budgets)


def load_existing(storage: str, name: str) -> optuna.Study | None:
    """The study ``name`` in ``storage`` if it exists, without creating anything in a storage that has none."""
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None
    except Exception:  # noqa: BLE001 - an unreachable storage is reported where the search opens it
        return None


def check_identity(study: optuna.Study, current: Fingerprint, *, resume_changed: bool, storage: str,
                   log: Callable[[str], None]) -> None:
    """Record ``current`` on a new study; on a resumed one, refuse a different model, inputs, device or recovery
    (unless ``resume_changed``) and announce changed budgets.

    Raises:
        HwpruneError: the study was made for something else, with what changed and how to go on.
    """
    stored: dict[str, Any] | None = study.user_attrs.get(FINGERPRINT_ATTR)
    has_trials = bool(study.get_trials(deepcopy=False))
    if stored is None or not has_trials:
        if stored is None and has_trials:
            log(f"study {study.study_name!r} has no fingerprint (made by an older hwprune): recording this run's")
        study.set_user_attr(FINGERPRINT_ATTR, current.to_dict())
        return
    mine = current.to_dict()
    changed = [k for k in Fingerprint.BINDING if stored.get(k) != mine[k]]
    if {"architecture", "inputs"} & set(changed):  # its trials' knobs and shapes are another model's: no resuming
        what = ", ".join(_describe(k, stored.get(k), mine[k]) for k in changed)
        raise HwpruneError(f"study {study.study_name!r} in {_short(storage)} was made for another {what}; its trials "
                           "cannot be resumed by this model. Start a new study with --study NEW")
    if changed and not resume_changed:
        what = ", ".join(_describe(k, stored.get(k), mine[k]) for k in changed)
        raise HwpruneError(
            f"study {study.study_name!r} in {_short(storage)} was made for another {what}; its trials would be mixed "
            "into this answer. Start a new study with --study NEW, or resume it anyway with --resume-changed")
    if changed:
        log(f"resuming study {study.study_name!r} although its " + ", ".join(changed) + " changed (--resume-changed)")
    if stored.get("budgets") != mine["budgets"]:
        log(f"budgets changed since the study's last run ({stored.get('budgets')} -> {mine['budgets']}): every "
            "trial is judged by the new ones; trials.csv keeps the budgets each was measured under")
    if changed or stored.get("budgets") != mine["budgets"]:
        study.set_user_attr(FINGERPRINT_ATTR, mine)


def _describe(key: str, old: Any, new: Any) -> str:
    if key in ("inputs", "recovery", "importance"):
        return f"{key} ({old} -> {new})"
    if key == "device":
        return "device or runtime (measurement settings, versions)"
    return {"architecture": "model architecture", "weights": "model (its weights differ)"}[key]


def _short(storage: str) -> str:
    return storage if len(storage) < 80 else "..." + storage[-77:]
