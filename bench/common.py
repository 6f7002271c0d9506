"""Constants and helpers shared by the benchmark scripts (``python -m bench.<script>``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any





ROOT = Path(__file__).resolve().parent.parent
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
# where bench_search looks for a CIFAR-10 JPEG zip (train/<class>/NNNN.jpg) unless --cifar-zip names one: inside the
# repository (bench/data/ is git-ignored); a copy elsewhere, e.g. a workplace's ../shared/datasets, is passed by flag
CIFAR_ZIP = ROOT / "bench" / "data" / "cifar10_jpeg.zip"
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
