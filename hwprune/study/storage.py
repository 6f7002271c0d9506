"""The Optuna storage and sampler of a study: create or resume it, fail the trials of dead workers."""

from __future__ import annotations

import os
import re
import time
import warnings

import optuna

from hwprune.errors import HwpruneError

DIRECTIONS = ("maximize", "minimize", "minimize")  # accuracy, latency ms, memory MB


def make_sampler(name: str, seed: int, n_knobs: int) -> optuna.samplers.BaseSampler:
    """The sampler for ``name``.

    The default ("tpe") was picked by bench/bench_samplers.py: on the demo at 30 trials under one common latency
    budget, multivariate TPE ranked first on hypervolume and best feasible accuracy across 3 seeds (see
    bench/README.md). "random", "nsga2" and "gp" stay available for comparison.
    """
    if name == "tpe":
        # multivariate TPE models the coupling between layers' widths; startup trials scale with the space size
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=max(8, min(16, n_knobs)))
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=16)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


# Every running trial records a heartbeat this often; one silent for twice as long belongs to a worker that was
# killed (kill -9, a lost machine), and is failed when any worker opens the study or starts a trial, instead of
# staying RUNNING forever. HWPRUNE_HEARTBEAT_S overrides it (tests; slow links to a shared database).
HEARTBEAT_S = 10


def _with_heartbeat(url: str) -> str | optuna.storages.BaseStorage:
    """An RDB storage URL as an RDBStorage that records heartbeats; other storages as they are."""
    if not re.match(r"(sqlite|postgresql|mysql)(\+\w+)?://", url):
        return url
    interval = int(os.environ.get("HWPRUNE_HEARTBEAT_S", HEARTBEAT_S))
    with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9, and stable in use
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=interval, grace_period=2 * interval)


def open_study(storage: str, name: str, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """Create or resume the study ``name``; a study of the same name with other objectives is an error. Trials left
    RUNNING by a worker that died are failed (heartbeats, :data:`HEARTBEAT_S`)."""
    attempt = 0
    while True:
        try:
            study = optuna.create_study(storage=_with_heartbeat(storage), study_name=name, sampler=sampler,
                                        directions=list(DIRECTIONS), load_if_exists=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            break
        except ImportError as exc:
            raise HwpruneError(f"storage {_redact(storage)}: its database driver is not installed ({exc}); for "
                               "PostgreSQL run `pip install -e '.[postgres]'`") from None
        except (optuna.exceptions.OptunaError, ValueError) as exc:
            raise HwpruneError(f"storage {_redact(storage)}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy errors carry pages of context
            # workers started together race to create the schema and the study; the loser retries and finds them
            attempt += 1
            if attempt >= 5:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise HwpruneError(f"cannot open storage {_redact(storage)}: {first}") from None
            time.sleep(0.5 * 2**attempt)
    if len(study.directions) != 3:
        raise HwpruneError(f"study {name!r} in {storage} was not made by hwprune search (it has "
                           f"{len(study.directions)} objectives); choose another --study name")
    return study


def _redact(url: str) -> str:
    """The storage URL without its password, for messages."""
    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", url)
