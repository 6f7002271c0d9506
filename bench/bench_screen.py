"""Search cost with and without screening (issue #22): board-seconds and trials to reach the recommended model.

Run from the repository root, after a predictor is stored for host-cpu (``hwprune calibrate --device host-cpu``):

    python -m bench.bench_screen [--model mobilenet-tiny] [--budget 0.6x] [--trials 30] [--out DIR]
                                 [--device-threads N]

``--device-threads N`` (N > 1) searches on a "device" with no predictor of its own: host-cpu's profile renamed
``host-cpu-ortNt`` with N ONNX Runtime threads, so the screen is the host's predictor standing in.

Runs the same search (same seed) twice, ``--screen off`` then ``--screen on``, each with a private copy of the stored
predictor (the screened run adds its measurements to its copy, not to the stored one). Board-seconds are the
seconds the backend spent measuring, over the whole search (summary.json's ``board_seconds``: dense sets, trials,
the dense model beside them, re-measures of the incumbent and the front's confirmation); ``trials_board_s`` is the
trials' share (their ``stage_seconds``: session, timing, dense beside); ``alone`` counts the trials judged on one
measurement alone against the dense reference and ``one_round`` those judged on one round beside the dense model
(predicted and measured well inside the budget, or clearly slower than a measured trial at least as accurate:
``dominated`` counts those, ``under_guard`` those that could not be listed: under the accuracy guard with more
accurate trials ahead). ``incumbent_s`` and ``confirm_s`` are the wall seconds of re-measuring the incumbent and of
confirming the front (rebuilds, fine-tune replays and evaluation included: host work, not only the board's);
``confirmed`` counts the models confirmed (listed or left out on re-measure). Prints a table and writes
screen.csv / screen.json, and each run's trials.csv, summary.json and log as trials-off.csv / trials-on.csv,
summary-off.json / summary-on.json and log-off.txt / log-on.txt, to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from hwprune.config import SearchConfig
from hwprune.predict import store
from hwprune.profiles import load_profile

# backend measuring time per trial (trials.csv stage_seconds keys)
TRIAL_BOARD = ("session", "timing", "dense_beside")


def _run(mode: str, args: argparse.Namespace, cache: Path, out: Path) -> dict[str, object]:
    env = {**os.environ, "HWPRUNE_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "hwprune.cli", "search", "--model", args.model, "--device", args.device,
           "--latency-budget-ms", args.budget,
           "--trials", str(args.trials), "--final-finetune-steps", str(args.final_finetune), "--screen", mode,
           "--seed", str(args.seed), "--out", str(out), "--quiet"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    run_dir = next(p.parent for p in out.rglob("summary.json"))
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(run_dir / "trials.csv", args.out / f"trials-{mode}.csv")  # per trial, to read the two runs apart
    shutil.copy(run_dir / "summary.json", args.out / f"summary-{mode}.json")
    (args.out / f"log-{mode}.txt").write_text(proc.stderr)  # the search's log: which incumbents were measured again
    summary = json.loads((run_dir / "summary.json").read_text())
    trials = pd.read_csv(run_dir / "trials.csv")
    rec = summary.get("recommended")
    # the backend's own seconds on the device, not the stages' wall times (those count host work too)
    board = summary["search"]["board_seconds"]
    per_trial = [sum(json.loads(s).get(k, 0.0) for k in TRIAL_BOARD) for s in trials.stage_seconds]
    row = trials[trials.trial == rec].iloc[0] if rec is not None else None
    rec_entry = next((r for r in summary["pareto"] if r["trial"] == rec), None)
    screened = trials.fail_reason.astype(str).str.startswith("screened").sum()
    left_out = summary["search"].get("rejected_on_remeasure", [])
    # what the screen decided, and its own error on this model's candidates (null under 5 measured)
    screen = summary["search"].get("screen") or {}
    return {"screen": mode, "exit": proc.returncode, "recommended_trial": rec,
            "signature": None if row is None else str(row.signature)[:12],
            "accuracy": None if rec_entry is None else rec_entry["accuracy"],
            "latency_ms": None if rec_entry is None else rec_entry["latency_ms"]["median"],
            "trials_to_recommended": None if rec is None else int(rec) + 1,
            "board_s_to_recommended": None if rec is None else sum(per_trial[: int(rec) + 1]),
            "measured_trials": int((trials.state == "COMPLETE").sum()), "screened": int(screened),
            # measured trials the screen settled on one round beside the dense model (predicted and measured well
            # inside the budget) instead of three, as the search counts them (cached trials left out)
            "one_round": screen.get("one_round", 0),
            # measured trials settled by one measurement alone against the dense reference (no dense model beside)
            "alone": screen.get("alone", 0),
            # of those settled on one measurement or round, the ones a measured, more accurate trial dominated
            "dominated": screen.get("dominated", 0),
            # ... and the ones that could not be listed (under the accuracy guard, more accurate trials ahead)
            "under_guard": screen.get("under_guard", 0),
            "board_s": board, "trials_board_s": sum(per_trial),
            # the fixed part, as wall seconds (host work included): the incumbent measured again while refining,
            # the front confirmed at the end
            "incumbent_s": summary["search"]["stage_seconds"].get("measure_incumbent", 0.0),
            "confirm_s": summary["search"]["stage_seconds"].get("confirm_front", 0.0), "wall_s": wall,
            # models confirmed at the end (listed, and left out on re-measure): the confirmation's board cost
            # grows with them
            "confirmed": len(summary["pareto"]) + sum(r.get("remeasured", True) for r in left_out),
            # front models left out under the accuracy guard on their trial accuracy, never rebuilt or measured
            "not_remeasured": sum(not r.get("remeasured", True) for r in left_out),
            "in_study_ratio": screen.get("study_ratio"),
            "in_study_p90": screen.get("study_p90_error"),
            "stand_in": screen.get("stand_in")}


def _device_profile(threads: int, folder: Path) -> str:
    """host-cpu, or (``threads`` > 1) a copy renamed host-cpu-ort<threads>t with that many ORT threads: a device
    with no predictor of its own, screened by the host's standing in."""
    if threads <= 1:
        return "host-cpu"
    from hwprune.profiles import available_profiles

    text = available_profiles()["host-cpu"].read_text()
    name = f"host-cpu-ort{threads}t"
    text = text.replace('name = "host-cpu"', f'name = "{name}"', 1).replace("intra_op_threads = 1",
                                                                            f"intra_op_threads = {threads}", 1)
    path = folder / f"{name}.toml"
    path.write_text(text)
    if load_profile(path).ort.intra_op_threads != threads:
        sys.exit(f"could not make a {threads}-thread profile from host-cpu's")
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenet-tiny")
    ap.add_argument("--budget", default="0.6x")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--final-finetune", type=int, default=SearchConfig.final_finetune_steps,
                    help="final fine-tune steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/screen"))
    ap.add_argument("--device-threads", type=int, default=1,
                    help="N > 1: search on host-cpu with N ORT threads as a device with no predictor of its own")
    args = ap.parse_args()
    profile = load_profile("host-cpu")
    predictor = store.find(profile.name, profile.ort.intra_op_threads)
    if predictor is None:
        sys.exit("no stored predictor for host-cpu: run `hwprune calibrate --device host-cpu` first")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-screen-") as tmp:
        args.device = _device_profile(args.device_threads, Path(tmp))
        for mode in ("off", "on"):
            cache = Path(tmp) / f"cache-{mode}"
            store.save(predictor, cache)
            subjects = store.cache_root() / "subjects"  # the trained demo weights, not trained again
            if subjects.is_dir():
                os.symlink(subjects, cache / "subjects")
            rows.append(_run(mode, args, cache, Path(tmp) / f"out-{mode}"))
        shutil.rmtree(tmp, ignore_errors=True)
    df = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "screen.csv", index=False)
    (args.out / "screen.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                      "predictor": predictor.describe(), "rows": rows},
                                                     indent=1, default=float))
    print(df.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    off, on = rows
    same = off["signature"] is not None and off["signature"] == on["signature"]
    print(f"\nboard-seconds with / without screening: {on['board_s'] / off['board_s']:.2f}; same recommended "
          f"architecture: {same}")


if __name__ == "__main__":
    main()
