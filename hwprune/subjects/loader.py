"""Resolve a model SPEC: a built-in demo name, ``package.module:factory`` or ``path/to/file.py:factory``."""

from __future__ import annotations

import importlib
import math
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hwprune.errors import SubjectError
from hwprune.subjects.base import Subject
from hwprune.subjects.data import UserData, as_user_data
from hwprune.subjects.demo import DEMOS, build_demo

FACTORY_CONTRACT = (
    "a factory takes no arguments and returns (model, example_inputs, evaluate), (model, example_inputs, evaluate, "
    "data) or a hwprune.Subject; see README, 'Your own model'"
)


def _import_factory(spec: str) -> Callable[[], Any]:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise SubjectError(
            f"model {spec!r} is neither a built-in demo ({', '.join(DEMOS)}) nor 'package.module:factory'"
        )
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise SubjectError(f"model file {path} does not exist")
        mod_name = f"hwprune_user_{path.stem}"
        try:
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            assert loader_spec and loader_spec.loader
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module  # so the pruned module can be pickled and reloaded in this process
            loader_spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - user code may raise anything
            raise SubjectError(f"cannot import {path}: {type(exc).__name__}: {exc}") from None
    else:
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # a user's module next to where they run hwprune
        try:
            module = importlib.import_module(target)
        except Exception as exc:  # noqa: BLE001
            raise SubjectError(f"cannot import module {target!r}: {type(exc).__name__}: {exc}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise SubjectError(f"module {target!r} has no attribute {attr!r}")
    if not callable(factory):
        raise SubjectError(f"{spec} is not callable; {FACTORY_CONTRACT}")
    return factory


def subject_from_value(value: Any, name: str) -> Subject:
    """Accept what a factory returned: a Subject, a dict of Subject fields, or a (model, inputs, evaluate) tuple."""
    if isinstance(value, Subject):
        subject = value
    elif isinstance(value, dict):
        try:
            subject = Subject(**{"name": name, **value})
        except TypeError as exc:
            raise SubjectError(f"{name} returned a dict hwprune cannot use ({exc}); {FACTORY_CONTRACT}") from None
    elif isinstance(value, (tuple, list)) and len(value) in (3, 4):
        model, example_inputs, evaluate, *data = value
        subject = Subject(model=model, example_inputs=example_inputs, evaluate=evaluate, name=name,
                          data=data[0] if data else None)
    else:
        raise SubjectError(f"{name} returned {type(value).__name__}; {FACTORY_CONTRACT}")
    if not isinstance(subject.model, nn.Module):
        raise SubjectError(f"{name}: the model is {type(subject.model).__name__}, not a torch.nn.Module")
    if not subject.example_inputs or not all(isinstance(t, torch.Tensor) for t in subject.example_inputs):
        raise SubjectError(f"{name}: example_inputs must be a tensor or a tuple of tensors (batch of 1)")
    if not callable(subject.evaluate):
        raise SubjectError(f"{name}: evaluate must be a callable evaluate(model) -> float (higher is better)")
    if subject.name == "model":
        subject.name = name
    subject.model.eval()
    if subject.data is not None:
        attach_data(subject, subject.data)
    return subject


def attach_data(subject: Subject, data: Any) -> Subject:
    """Give ``subject`` the user's ``data`` (see :func:`hwprune.subjects.data.as_user_data`): labelled data becomes
    its calibration and training data where it has none; inputs alone are kept in ``subject.data`` for the search's
    recovery (re-calibration and distillation from the dense model).

    Raises:
        SubjectError: the data is malformed, or the model fails on its first batch.
    """
    user = data if isinstance(data, UserData) else as_user_data(data, subject.example_inputs)
    try:
        with torch.no_grad():
            subject.model(user.inputs[0][:2])
    except Exception as exc:  # noqa: BLE001 - user code may raise anything
        raise SubjectError(f"{subject.name}: the model fails on the given data's first batch: "
                           f"{type(exc).__name__}: {exc}") from None
    subject.data = user
    if user.labelled:
        if subject.calibration_data is None:
            subject.calibration_data = user.batches()
        if subject.train_data is None:
            subject.train_data = user.batches()
    return subject


def load_subject(spec: str | Subject | Callable[[], Any], *, seed: int = 0,
                 log: Callable[[str], None] | None = None) -> Subject:
    """Build the subject named by ``spec`` (a demo name, ``pkg.mod:factory``, a factory callable or a Subject)."""
    if isinstance(spec, Subject):
        return subject_from_value(spec, spec.name)
    if callable(spec):
        return subject_from_value(_call_factory(spec, getattr(spec, "__name__", "factory")),
                                  getattr(spec, "__name__", "model"))
    if spec in DEMOS:
        return build_demo(spec, seed=seed, log=log)
    factory = _import_factory(spec)
    return subject_from_value(_call_factory(factory, spec), spec)


def _call_factory(factory: Callable[[], Any], spec: str) -> Any:
    try:
        return factory()
    except Exception as exc:  # noqa: BLE001
        raise SubjectError(f"factory {spec} failed: {type(exc).__name__}: {exc}") from None


def check_evaluate(subject: Subject, *, record: bool = False) -> tuple[float, list[Any]]:
    """Score the dense model once, with a clear error when the evaluator misbehaves.

    Args:
        subject: the subject whose dense model is scored.
        record: also record the inputs ``evaluate`` feeds the model (:func:`hwprune.recovery.capture_inputs`).

    Returns:
        The score, and the recorded inputs (empty unless ``record``).

    Raises:
        SubjectError: ``evaluate`` raised, or returned something that is not a finite number.
    """
    from hwprune.recovery import capture_inputs

    try:
        if record:
            score, recorded = capture_inputs(subject.model, subject.evaluate)
        else:
            score, recorded = subject.evaluate(subject.model), []
    except Exception as exc:  # noqa: BLE001
        raise SubjectError(f"{subject.name}: evaluate(model) failed on the dense model: "
                           f"{type(exc).__name__}: {exc}") from None
    try:
        value = float(score)
    except (TypeError, ValueError):
        raise SubjectError(f"{subject.name}: evaluate(model) returned {score!r}, not a number") from None
    if not math.isfinite(value):
        raise SubjectError(f"{subject.name}: evaluate(model) returned {value} on the dense model; it must return a "
                           "finite score (higher is better)")
    return value, recorded
