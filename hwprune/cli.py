"""The ``hwprune`` command line."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hwprune.config import SearchConfig, prepare_run_dir
from hwprune.errors import BudgetUnreachable, HwpruneError

if TYPE_CHECKING:  # the search's records import torch: only once a search has run
    from hwprune.study.records import ModelRecord

app = typer.Typer(
    name="hwprune",
    help="Hardware-aware structured pruning: search per-layer widths with Optuna, measure real latency on the target.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
profiles_app = typer.Typer(help="List device profiles, or show one.", invoke_without_command=True,
                           no_args_is_help=False)
app.add_typer(profiles_app, name="profiles")

out = Console()
err = Console(stderr=True)

EXIT_ERROR = 2
EXIT_BUDGET = 3
EXIT_REGRESSION = 4
EXIT_INTERRUPTED = 130

def _version(value: bool) -> None:
    if value:
        from hwprune import __version__

        out.print(f"hwprune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Hardware-aware structured pruning: search per-layer widths with Optuna, measure real latency on the target."""


# -- shared options -----------------------------------------------------------------------------------------------
BackendOpt = Annotated[Optional[str], typer.Option("--backend", help="Override the profile's backend: ort, tvm, tvm-rpc, ssh-ort, estimate.")]
TrackerOpt = Annotated[Optional[str], typer.Option("--tracker", help="TVM RPC tracker HOST:PORT (overrides the profile).")]
KeyOpt = Annotated[Optional[str], typer.Option("--key", help="Device key the board registered under at the tracker.")]
SshHostOpt = Annotated[Optional[str], typer.Option("--ssh-host", help="Board address for the ssh-ort backend.")]
SshUserOpt = Annotated[Optional[str], typer.Option("--ssh-user", help="SSH user on the board.")]
SshKeyOpt = Annotated[Optional[Path], typer.Option("--ssh-key", help="SSH private key file.")]
SshPortOpt = Annotated[Optional[int], typer.Option("--ssh-port", help="SSH port on the board.")]
TuningOpt = Annotated[Optional[int], typer.Option("--tuning-trials", help="TVM MetaSchedule trials per model (0 = untuned).")]


def _overrides(backend: str | None, tracker: str | None, key: str | None, ssh_host: str | None,
               ssh_user: str | None, ssh_key: Path | None, ssh_port: int | None,
               tuning_trials: int | None = None) -> dict[str, Any]:
    o: dict[str, Any] = {"backend": backend, "rpc__tracker": tracker, "rpc__key": key, "ssh__host": ssh_host,
                         "ssh__user": ssh_user, "ssh__key_file": str(ssh_key) if ssh_key else None,
                         "ssh__port": ssh_port, "tvm__tuning_trials": tuning_trials}
    if tracker is not None and (":" not in tracker or not tracker.rsplit(":", 1)[1].isdigit()):
        raise HwpruneError(f"--tracker {tracker!r}: expected HOST:PORT, e.g. 127.0.0.1:9190")
    if backend is None and tracker is not None:
        o["backend"] = "tvm-rpc"  # naming a tracker only makes sense for the RPC backend
    if backend is None and ssh_host is not None:
        o["backend"] = "ssh-ort"
    return {k: v for k, v in o.items() if v is not None}


def _profile(device: str, overrides: dict[str, Any]):
    from hwprune.profiles import load_profile

    return load_profile(device).with_overrides(**overrides)


# -- search -------------------------------------------------------------------------------------------------------
@app.command()
def search(
    model: Annotated[str, typer.Option("--model", "-m", help="Built-in demo (mobilenet-tiny, resnet-tiny) or package.module:factory (or path/file.py:factory).")] = SearchConfig.model,
    device: Annotated[str, typer.Option("--device", "-d", help="Device profile name (see `hwprune profiles`) or a .toml path.")] = SearchConfig.device,
    latency_budget_ms: Annotated[Optional[str], typer.Option("--latency-budget-ms", help="Latency budget in ms (median), or a fraction of the dense model's latency like 0.6x. Default: the profile's.")] = None,
    memory_budget_mb: Annotated[Optional[str], typer.Option("--memory-budget-mb", help="Memory budget in MB (weights + peak activations), or a fraction like 0.5x. Default: the profile's.")] = None,
    trials: Annotated[Optional[int], typer.Option("--trials", "-n", help="Complete trials the study should have (a resumed study runs the rest).")] = None,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="Stop starting new trials after this many seconds.")] = None,
    storage: Annotated[Optional[str], typer.Option("--storage", help="Optuna storage URL (sqlite:///x.db, postgresql://...). Default: study.db in the run folder.")] = None,
    study: Annotated[Optional[str], typer.Option("--study", help="Study name. Default: <model>-<device>.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Parent folder of the run folder.")] = SearchConfig.out,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the sampler and the per-trial calibration and fine-tune (not for the demo model itself).")] = SearchConfig.seed,
    sampler: Annotated[str, typer.Option("--sampler", help="tpe (default), random, gp or nsga2; see bench/README.md.")] = SearchConfig.sampler,
    max_ratio: Annotated[float, typer.Option("--max-ratio", help="Largest fraction of a group's channels to remove; a residual block can be removed from 0.5.")] = SearchConfig.max_ratio,
    depth: Annotated[bool, typer.Option("--depth/--no-depth", help="Also search over removing whole residual blocks (y = x + f(x) becomes y = x); --no-depth prunes channel widths only.")] = SearchConfig.depth,
    importance: Annotated[str, typer.Option("--importance", metavar="[auto|l2|l1|bn-scale|taylor]", help="How channels are ranked for removal: l2/l1 (weight magnitude), bn-scale (|BatchNorm gamma|; l2 where a group has none), taylor (|weight x gradient| on calibration batches), or auto (picks per model family, by the benchmark in docs/benchmarks.md, Channel importance).")] = SearchConfig.importance,
    channel_multiple: Annotated[Optional[int], typer.Option("--channel-multiple", help="Round kept widths to this multiple (default: the profile's).")] = None,
    trial_finetune: Annotated[int, typer.Option("--trial-finetune-steps", help="Fine-tune steps per trial before evaluation (0 = BN re-calibration only); used when the model source provides training data.")] = SearchConfig.trial_finetune_steps,
    final_finetune: Annotated[int, typer.Option("--final-finetune-steps", help="Fine-tune steps of the final fine-tune (distilled from the dense model) before the recommendation.")] = SearchConfig.final_finetune_steps,
    final_candidates: Annotated[int, typer.Option("--final-candidates", help="The K most accurate models within the budgets (by the search's proxy, on the Pareto front or not, including trials measured up to 5% over the latency budget once re-measured within it) each get the final fine-tune, and so does the most accurate uniform model within the budgets if they leave it out; the most accurate afterwards is recommended.")] = SearchConfig.final_candidates,
    allow_untuned: Annotated[bool, typer.Option("--allow-untuned", help="Let untuned TVM latencies drive the search.")] = SearchConfig.allow_untuned,
    tune_final: Annotated[int, typer.Option("--tune-final", help="TVM backends: after the search, MetaSchedule-tune the recommended model with N trials on the device and report its tuned latency (0 = off).")] = SearchConfig.tune_final_trials,
    allow_estimate: Annotated[bool, typer.Option("--allow-estimate", help="Let roofline estimates drive the search.")] = SearchConfig.allow_estimate,
    max_accuracy_drop: Annotated[str, typer.Option("--max-accuracy-drop", help="The accuracy guard: the most a model may lose against the dense one, absolute (0.01) or relative (1%); 'off' to switch it off. A model under it is infeasible; when none keeps it the search exits 3.")] = str(SearchConfig.max_accuracy_drop),
    recovery: Annotated[str, typer.Option("--recovery", help="When the model source gives no data: auto (default), inputs (the inputs evaluate feeds the dense model), synthetic (fitted to its BatchNorm statistics) or none; used for BatchNorm re-calibration and distillation from the dense model.")] = SearchConfig.recovery,
    resume_changed: Annotated[bool, typer.Option("--resume-changed", help="Resume the study even though it was made for another model, example inputs, device or recovery (refused otherwise, since its trials would be mixed into this answer).")] = SearchConfig.resume_changed,
    data: Annotated[Optional[Path], typer.Option("--data", help="A .pt or .npz file of inputs, or inputs and targets (keys inputs/x and targets/y), for BatchNorm re-calibration and fine-tuning.")] = None,
    quantize: Annotated[Optional[str], typer.Option("--quantize", metavar="[off|int8]", help="int8: each trial also chooses FP32 or INT8 (ONNX Runtime static QDQ) per channel group, measured and evaluated as the quantized file; off: FP32 only. Default: the profile's quantize.int8 (on where it says search; host-cpu: off).")] = None,
    screen: Annotated[str, typer.Option("--screen", metavar="[off|on]", help="on: a latency predictor stored for the profile (`hwprune calibrate`) predicts each candidate first, and one predicted over the latency budget by more than the predictor's p90 error (on held-out models; from the 5th measured candidate on, on this search's candidates, whose median error also rescales the predictions) is recorded as screened, not measured; one predicted well inside it is judged on one measurement alone against the dense reference when that measurement agrees, else on one round beside the dense model instead of three when that round agrees (an incumbent re-measured: one round); candidates are evaluated before they are measured, and one clearly slower than a measured model at least as accurate and no larger, or under the accuracy guard with enough more accurate models ahead that it cannot be listed, is settled on one measurement too; the search's measurements are added to the predictor. Default off: in the search-cost benchmark whole searches took 0.45-0.90x the board-seconds (median 0.72x over nineteen 0.6x pairs), half or less in three pairs of twenty-three, with the recommended model up to 2.2 points apart either way, and it costs an export per candidate on the host (docs/benchmarks.md).")] = SearchConfig.screen,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    mlflow: Annotated[Optional[str], typer.Option("--mlflow", metavar="URI", help="Log every trial as an MLflow run (metrics, constraints, ratios; profile and budgets as tags) to this tracking URI (file:./mlruns, sqlite:///mlflow.db, http://host:5000). Needs the mlflow extra: mlflow-skinny and optuna-integration.")] = None,
    backend: BackendOpt = None, tracker: TrackerOpt = None, key: KeyOpt = None, ssh_host: SshHostOpt = None,
    ssh_user: SshUserOpt = None, ssh_key: SshKeyOpt = None, ssh_port: SshPortOpt = None,
    tuning_trials: TuningOpt = None,
) -> None:
    """Search per-layer pruning ratios under latency/memory budgets; re-running the same command resumes."""
    overrides = _overrides(backend, tracker, key, ssh_host, ssh_user, ssh_key, ssh_port, tuning_trials)
    # without a budget flag the profile's budget applies: Search sets it (hwprune.profiles.default_budgets)
    if trials is None and timeout is None:
        trials = SearchConfig.trials
    config = SearchConfig(
        model=model, device=device, latency_budget_ms=latency_budget_ms, memory_budget_mb=memory_budget_mb,
        trials=trials, timeout_s=timeout, storage=storage, study=study, out=out_dir, seed=seed, sampler=sampler,
        max_ratio=max_ratio, depth=depth, channel_multiple=channel_multiple, trial_finetune_steps=trial_finetune,
        importance=importance,
        final_finetune_steps=final_finetune, final_candidates=final_candidates, allow_untuned=allow_untuned,
        allow_estimate=allow_estimate, tune_final_trials=tune_final, max_accuracy_drop=max_accuracy_drop,
        recovery=recovery, data=data, resume_changed=resume_changed, mlflow=mlflow, quantize=quantize, screen=screen,
        profile_overrides=overrides, progress=not quiet and sys.stderr.isatty(),
        command="hwprune " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    # imported once the flags are checked (SearchConfig): the search imports torch, a bad flag fails in half a second
    from hwprune.study.run import Search

    result = None
    try:
        result = Search(config, log_fn=_log).run()
    except BudgetUnreachable:
        _print_summary_file(config.run_dir)
        raise
    _print_result(result.summary, result.run_dir)


def _log(message: str) -> None:
    """A progress line of a search on stderr (its text is data, never markup)."""
    err.print(f"[dim]hwprune:[/] {escape(message)}", highlight=False)


def _print_summary_file(run_dir: Path) -> None:
    path = run_dir / "summary.json"
    if path.is_file():
        _print_result(json.loads(path.read_text()), run_dir)


def _print_result(data: dict[str, Any], run_dir: Path) -> None:
    """The result of a search (its summary.json) as a table and a few lines."""
    from hwprune.study.records import JUDGED_BY_RATIO, UNSET, Summary

    summary = Summary.from_dict(data)
    dense, metric, req = summary.dense, summary.metric, summary.request
    table = Table(title=escape(f"Pareto front: {req['model']} on {req['device']} ({summary.measurement['backend']})"))
    # latency ms = what the budget judges (the same figure as the report's and summary.json's latency_ms.judged)
    for col in ("trial", metric, "latency ms", "own median (p90)", "memory MB", "params", "MMACs", "speedup",
                "budgets"):
        table.add_column(col, justify="right")
    est = " (estimated)" if summary.measurement.get("estimated") else ""
    if est:  # every estimate says how far off such estimates were
        label = _predictor_line(summary.measurement.get("predictor"))
        table.caption = escape(f"latencies estimated, not measured: {label}")

    def row(r: ModelRecord, label: str) -> list[str]:
        meets = r.meets.to_dict()
        verdict = "ok" if all(meets.values()) else \
            ", ".join(("under guard" if k == "accuracy" else f"{k} over") for k, v in meets.items() if not v)
        noisy = " noisy" if r.latency_ms.noisy else ""
        speedup = 1.0 if r.speedup is UNSET else r.speedup
        return [label, f"{r.accuracy:.4f}", f"{r.latency_ms.primary_ms:.3f}{noisy}{est}",
                f"{r.latency_ms.median:.3f} ({r.latency_ms.p90:.3f})", f"{r.memory_mb.total:.2f}", f"{r.params:,}",
                f"{r.macs / 1e6:.2f}", f"{speedup:.2f}x", verdict]

    table.add_row(*row(dense, "dense"), style="dim")
    for r in summary.pareto:
        precision = r.precision.get("label", "fp32") if isinstance(r.precision, dict) else "fp32"
        shown = f"{r.trial}" + (f" ({precision})" if precision != "fp32" else "")  # --quantize int8: "17 (int8)"
        table.add_row(*row(r, f"{shown}{' *' if r.recommended else ''}"), style="bold green" if r.recommended else None)
    out.print(table)
    s = summary.search
    def budget(value: Any, unit: str, typed: Any) -> str:
        if value is None:
            return "none"
        return f"{value:.3f} {unit}" + (f" ({typed} dense)" if typed and str(typed).endswith("x") else "")

    out.print(f"budgets: latency {budget(req.get('latency_budget_ms'), 'ms', req.get('latency_budget'))}, memory "
              f"{budget(req.get('memory_budget_mb'), 'MB', req.get('memory_budget'))} | "
              f"trials: {s['trials_complete']} complete ({s['trials_cached']} reused a measured architecture), "
              f"{s['trials_failed']} failed, {s['trials_feasible']} feasible | {s['wall_seconds']:.0f} s")
    if any(r.latency_ms.judged_by == JUDGED_BY_RATIO for r in summary.pareto):
        out.print(f"latency ms: what the budget judges, the latency ratio measured side by side with the dense model "
                  f"(interleaved rounds, which a busy host slows alike) x the dense reference "
                  f"({dense.latency_ms.median:.3f} ms); speedup = 1 / that ratio; own median: each model timed on "
                  "its own")
    else:
        out.print("latency ms: what the budget judges, here each model's own median; speedup = dense latency / "
                  "latency")
    rec = next((r for r in summary.pareto if r.recommended), None)
    _print_accuracy_story(data, rec.to_dict() if rec else None, metric)
    if rec:
        _print_recommended(rec, dense, metric, run_dir)
    out.print(f"run folder: {run_dir} (summary.json, pareto.csv{', report.html' if (run_dir / 'report.html').exists() else ''})")


def _print_recommended(rec: ModelRecord, dense: ModelRecord, metric: str, run_dir: Path) -> None:
    """The recommended model in a few lines: its figures beside the dense model's and where its file is."""
    from hwprune.study.records import UNSET

    kept = None if rec.accuracy_retention is UNSET else rec.accuracy_retention
    speedup = 1.0 if rec.speedup is UNSET else rec.speedup
    out.print(f"[bold]recommended:[/] trial {rec.trial}: {metric} {rec.accuracy:.4f} (dense "
              f"{dense.accuracy:.4f}" + (f", {kept:.1%} kept" if kept is not None else "") + "), "
              f"{rec.latency_ms.primary_ms:.3f} ms ({speedup:.2f}x faster; own median "
              f"{rec.latency_ms.median:.3f} ms), {rec.memory_mb.total:.2f} MB -> "
              f"{run_dir / rec.files['onnx']['path']}")
    if rec.removed_blocks is not UNSET and rec.removed_blocks:
        out.print(f"  residual blocks removed whole: {', '.join(rec.removed_blocks)}")
    if rec.remeasure_note is not UNSET and rec.remeasure_note:
        out.print(f"  note: {escape(rec.remeasure_note)}")
    tuned = None if rec.final_tuned is UNSET else rec.final_tuned
    if tuned and "latency_ms" in tuned:
        out.print(f"tuned on the device ({tuned['tuning_trials']} MetaSchedule trials, {tuned['seconds']:.0f} s): "
                  f"{tuned['latency_ms']['median']:.3f} ms (p90 {tuned['latency_ms']['p90']:.3f})")
    elif tuned:
        out.print(f"tuning the recommended model failed: {escape(tuned['error'])}")


def _print_accuracy_story(summary: dict[str, Any], rec: dict[str, Any] | None, metric: str) -> None:
    """The accuracy guard and the recovery, in a line each, with a warning where the answer needs one."""
    guard = summary.get("accuracy_guard") or {}
    recovery = summary.get("recovery") or {}
    if guard.get("floor") is not None:
        out.print(f"accuracy guard: {metric} >= {guard['floor']:.4f} (at most {guard['max_drop']} below dense "
                  f"{guard['dense']:.4f}), judged on the {guard['judged_on']}")
    else:
        out.print("[yellow]warning:[/] the accuracy guard is off (--max-accuracy-drop off): the recommendation may "
                  "have lost any amount of accuracy")
    method = recovery.get("method")
    if method == "none":
        out.print("[yellow]warning:[/] no data was given and recovery is off (--recovery none): pruned models keep the "
                  "dense model's BatchNorm statistics. Give data for a better answer (README, 'Your own model').")
    elif method and method != "data":
        agree = recovery.get("agreement") or {}
        held = agree.get("heldout")
        out.print(f"[yellow]warning:[/] no data was given: pruned models were recovered with {method} "
                  f"({recovery.get('samples', 0)} samples)"
                  + ("; evaluate's own inputs were among them, so its accuracy may be optimistic" if recovery.get("leak")
                     else "")
                  + (f"; the recommended model agrees with the dense one on {held:.1%} of held-out inputs"
                     if held is not None else "")
                  + ". Give data for a better answer (README, 'Your own model').")
    if rec is None and guard.get("refused"):
        best = guard["best_within_budgets"]
        out.print(f"[red]no model kept the accuracy guard:[/] the best within the budgets was trial {best['trial']} "
                  f"at {metric} {best['accuracy']:.4f}")


# -- measure ------------------------------------------------------------------------------------------------------
@app.command()
def measure(
    model: Annotated[Path, typer.Argument(help="An ONNX model file.")],
    device: Annotated[str, typer.Option("--device", "-d", help="Device profile name or .toml path.")] = "host-cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print the measurement as JSON.")] = False,
    beside: Annotated[Optional[Path], typer.Option(
        "--beside", help="A reference ONNX model, e.g. a run folder's dense/model.onnx: also measure the model's "
                         "latency ratio to it in interleaved rounds, as a search judges a relative budget "
                         "(latency_ratio and latency_ratio_upper in summary.json).")] = None,
    backend: BackendOpt = None, tracker: TrackerOpt = None, key: KeyOpt = None, ssh_host: SshHostOpt = None,
    ssh_user: SshUserOpt = None, ssh_key: SshKeyOpt = None, ssh_port: SshPortOpt = None,
    tuning_trials: TuningOpt = None,
) -> None:
    """Latency (median, p90, spread) and memory of an ONNX model on a device; with --beside, its latency ratio to
    another model."""
    from hwprune.backends import create_backend
    from hwprune.study.reference import interleaved_rounds

    for path in (model, beside):
        if path is not None and not path.is_file():
            raise HwpruneError(f"{path}: no such ONNX file")
    profile = _profile(device, _overrides(backend, tracker, key, ssh_host, ssh_user, ssh_key, ssh_port,
                                          tuning_trials))
    b = create_backend(profile)
    rounds = None
    try:
        if beside is None:
            m = b.measure(model)
        else:
            pair = b.measure_beside if b.capabilities.beside else None  # type: ignore[attr-defined]
            rounds = interleaved_rounds(b.measure, model, beside, measure_pair=pair)
            m = rounds.steadiest  # the round a slow spell disturbed least, as a search reports a model's own median
    finally:
        b.close()
    ratio = None if rounds is None else {"reference": str(beside), "ratio": rounds.ratio, "ratio_upper": rounds.upper,
                                         "round_ratios": rounds.ratios}
    if as_json:
        d = m.to_dict()
        d["model"] = str(model)
        if ratio is not None:
            d["beside"] = ratio
        out.print_json(json.dumps(d))
        return
    lat = m.latency
    label = " (estimated)" if m.estimated else ""
    if m.estimated and m.extra.get("predictor"):
        label = f" (estimated: {_predictor_line(m.extra['predictor'])})"
    tuned = "" if m.tuned is None else (" tuned" if m.tuned else " untuned")
    out.print(f"{model} on {profile.name} via {m.backend}{tuned}{label}")
    out.print(f"  latency: median {lat.median_ms:.3f} ms, p90 {lat.p90_ms:.3f} ms, min {lat.min_ms:.3f} ms, "
              f"std {lat.std_ms:.3f} ms ({_spread(lat, profile.measure.max_cv)}) over {lat.repeats} runs after "
              f"{lat.warmup} warm-up" + _noisy(lat, profile.measure.max_cv), highlight=False, markup=False)
    mem = m.memory
    out.print(f"  memory: {mem.total_mb:.3f} MB = weights {mem.weights_mb:.3f} MB + peak activations "
              f"{mem.peak_activations_mb:.3f} MB" + (f"; process peak +{mem.process_peak_mb:.1f} MB"
                                                      if mem.process_peak_mb is not None else ""))
    if rounds is not None:
        out.print(f"  beside {beside}: {rounds.ratio:.3f}x its latency (median of {len(rounds.ratios)} interleaved "
                  f"rounds; {rounds.upper:.3f}x with its standard error); the latency above is the middle round's")


def _predictor_line(p: dict[str, Any] | None) -> str:
    """How an estimate was made and how far off such estimates were on held-out models."""
    from hwprune.predict.labels import estimate_label

    return estimate_label(p)


# -- calibrate ----------------------------------------------------------------------------------------------------
@app.command()
def calibrate(
    device: Annotated[str, typer.Option("--device", "-d", help="Device profile name or .toml path. A profile measured through ONNX Runtime (on this machine, or on a board over SSH: ssh-ort) is calibrated from scratch, its kernels profiled on the device; any other (a board over TVM RPC, local TVM) gets the host's stored predictor transferred to it with --samples measurements on the device.")] = "host-cpu",
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Cache root to store the predictor under (DIR/predictors/; a transfer also finds the host's there); default $HWPRUNE_CACHE or ~/.cache/hwprune, where --backend estimate and --screen look.")] = None,
    budget_seconds: Annotated[float, typer.Option("--budget-seconds", help="Seconds to spend measuring designed models (a calibration measures at least 6, a transfer at least 4).")] = 300.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the designed calibration models.")] = 0,
    from_profile: Annotated[Optional[str], typer.Option("--from", help="Transfer from this profile's stored predictor instead of calibrating from scratch (default for devices not measured through ONNX Runtime, here or over SSH: host-cpu).")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", help="Device measurements a transfer takes (default 30, at least 4); a quarter validate a fit on the rest.")] = None,
    backend: BackendOpt = None, tracker: TrackerOpt = None, key: KeyOpt = None, ssh_host: SshHostOpt = None,
    ssh_user: SshUserOpt = None, ssh_key: SshKeyOpt = None, ssh_port: SshPortOpt = None,
    tuning_trials: TuningOpt = None,
) -> None:
    """Fit a latency predictor for a device: measure designed models (per-node and whole), fit, validate, store; or,
    for a board, transfer the host's predictor with a few dozen measurements on the board."""
    from hwprune.predict import store
    from hwprune.predict.calibrate import calibrate as run_calibrate
    from hwprune.predict.transfer import (
        DEFAULT_HOST_PROFILE,
        DEFAULT_TRANSFER_SAMPLES,
        MIN_TRANSFER_SAMPLES,
        calibrate_transfer,
    )
    from hwprune.profiles import load_profile

    if budget_seconds <= 0:
        raise HwpruneError(f"--budget-seconds {budget_seconds:g}: must be positive")
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise HwpruneError(f"--out {out_dir}: not a folder")
    profile = _profile(device, _overrides(backend, tracker, key, ssh_host, ssh_user, ssh_key, ssh_port,
                                          tuning_trials))
    if from_profile is None and profile.backend not in ("ort", "estimate", "ssh-ort"):
        from_profile = DEFAULT_HOST_PROFILE
    if from_profile is None:
        if samples is not None:
            raise HwpruneError("--samples counts a transfer's device measurements: add --from PROFILE, or calibrate "
                               "this profile from scratch without it")
        _predictor_folder(out_dir)
        predictor = run_calibrate(profile, budget_seconds, seed=seed, log=_log)
    else:
        if samples is not None and samples < MIN_TRANSFER_SAMPLES:
            raise HwpruneError(f"--samples {samples}: a transfer needs at least {MIN_TRANSFER_SAMPLES}")
        host_profile = load_profile(from_profile)
        if _predictor_identity(host_profile) == _predictor_identity(profile):
            raise HwpruneError(f"--from {from_profile}: that is the device itself; calibrate it without --from")
        host = store.find(host_profile.name, host_profile.ort.intra_op_threads, root=out_dir,
                          runtime=_predictor_identity(host_profile)[1])
        if host is None:
            root = out_dir or store.cache_root()
            old = store.stale(host_profile.name, host_profile.ort.intra_op_threads, out_dir)
            what = (f"the predictor stored for {host_profile.name}, {old[0]}, was fitted by an older hwprune"
                    if old else f"no predictor stored for {host_profile.name} under {root}/predictors")
            raise HwpruneError(f"{what}: nothing to transfer from; run `hwprune calibrate --device "
                               f"{host_profile.name}" + (f" --out {out_dir}" if out_dir else "") + "` first")
        _log(f"transferring {host.profile} ({host.runtime} {host.runtime_version}, {host.threads} thread(s), fitted "
             f"on {host.fitted_on} models) to {profile.name} via {profile.backend}")
        _predictor_folder(out_dir)
        predictor = calibrate_transfer(profile, host, samples or DEFAULT_TRANSFER_SAMPLES, budget_seconds, seed,
                                       log=_log)
    path = store.save(predictor, out_dir)
    how = (f"{predictor.fitted_on} device measurements" if predictor.transferred_from
           else f"fitted on {predictor.fitted_on} models ({len(predictor.node_samples)} nodes)")
    out.print(f"{how}: {_predictor_line(predictor.describe())}", highlight=False)
    out.print(f"wrote {path}", highlight=False)


def _predictor_folder(out_dir: Path | None) -> None:
    """Create and write-check the folder a calibration will save its predictor in, once the input is known to be
    good and before minutes of measurements that a folder unable to take the predictor would lose.

    Raises:
        HwpruneError: the folder cannot be created or written.
    """
    from hwprune.predict import store

    prepare_run_dir((out_dir or store.cache_root()) / "predictors",
                    "choose an --out folder you can write to (or set $HWPRUNE_CACHE)", what="predictor folder")


def _predictor_identity(profile: Any) -> tuple[str, str, int]:
    """What a stored predictor of ``profile`` is keyed by (its profile, runtime and threads)."""
    from hwprune.predict.transfer import device_runtime

    return profile.name, device_runtime(profile)[0], profile.ort.intra_op_threads


def _spread(lat: Any, max_cv: float) -> str:
    """The spread as hwprune judges it: the robust CV (what ``noisy`` is decided on) against the profile's max_cv."""
    where = "above" if lat.robust_cv > max_cv else "within"
    return f"cv {lat.cv:.1%}; robust cv {lat.robust_cv:.1%}, {where} the profile's max_cv {max_cv * 100:g}%"


def _noisy(lat: Any, max_cv: float) -> str:
    """' [noisy]' when the robust CV is above max_cv or the measurement is flagged (then why), else ''."""
    if lat.robust_cv > max_cv:
        return " [noisy]"
    if lat.noisy:  # the spread is fine, but the thread waited for a core all along (backends/timing.py)
        slow = f": wall time {lat.median_ms / lat.cpu_median_ms:.2f}x its CPU time" if lat.cpu_median_ms else ""
        return f" [noisy{slow}, another process held the core]"
    return ""


# -- profiles -----------------------------------------------------------------------------------------------------
@profiles_app.callback()
def profiles_list(ctx: typer.Context) -> None:
    """List the device profiles hwprune can find."""
    if ctx.invoked_subcommand is not None:
        return
    from hwprune.profiles import available_profiles, load_profile

    table = Table(title="device profiles")
    for col in ("name", "backend", "where", "cores", "multiple", "budgets ms / MB"):
        table.add_column(col, no_wrap=True)
    for name, path in available_profiles().items():
        try:
            p = load_profile(path)
        except HwpruneError as exc:
            table.add_row(name, "[red]invalid[/]", str(exc), "", "", "")
            continue
        table.add_row(name, p.backend, "local" if p.local else "remote board", str(p.hardware.cores),
                      str(p.channel_multiple), f"{p.budgets.latency_ms} / {p.budgets.memory_mb}")
    out.print(table)
    out.print("show one with `hwprune profiles show NAME`; profiles are read from $HWPRUNE_PROFILES, "
              "./device_profiles and the bundled folder")


@profiles_app.command("show")
def profiles_show(name: Annotated[str, typer.Argument(help="Profile name or .toml path.")],
                  as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False) -> None:
    """Show one device profile, validated."""
    from hwprune.profiles import load_profile

    p = load_profile(name)
    if as_json:
        out.print_json(json.dumps(p.to_dict()))
        return
    out.print(f"[bold]{p.name}[/]: {p.description}\n  file: {p.source}\n  backend: {p.backend}"
              f"{'' if p.local else ' (remote board)'}, channel multiple {p.channel_multiple}")
    for section in ("hardware", "ort", "tvm", "rpc", "ssh", "measure", "budgets", "quantize"):
        values = getattr(p, section).__dict__
        # escaped: rich would take "[hardware]" for markup and drop it
        out.print(escape(f"  [{section}] " + ", ".join(f"{k}={v!r}" for k, v in values.items())), highlight=False)


# -- report -------------------------------------------------------------------------------------------------------
@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `hwprune search`.")],
    compare: Annotated[Optional[Path], typer.Option("--compare", help="A second run folder to compare RUN_DIR with (RUN_DIR is the baseline).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Where to write the comparison report (default: the second run folder).")] = None,
) -> None:
    """Build report.html and report.md for a run folder, or compare two runs."""
    try:
        from hwprune import report as report_mod
    except ImportError as exc:
        raise HwpruneError(f"the report module is not available: {exc}") from None
    if not (run_dir / "summary.json").is_file():
        raise HwpruneError(f"{run_dir}: no summary.json; is this a folder written by `hwprune search`?")
    if compare is not None:
        if not (compare / "summary.json").is_file():
            raise HwpruneError(f"{compare}: no summary.json; is this a folder written by `hwprune search`?")
        paths = report_mod.build_comparison(run_dir, compare, out_dir or compare)
    else:
        paths = report_mod.build_report(run_dir)
    for p in paths:
        out.print(f"wrote {p}")


# -- nightly ------------------------------------------------------------------------------------------------------
@app.command()
def nightly(
    job_file: Annotated[Path, typer.Argument(help="A nightly job file (TOML; see README, 'Nightly jobs').")],
    night: Annotated[Optional[str], typer.Option("--night", help="Which night to run or resume (YYYY-MM-DD; default: today, UTC).")] = None,
) -> None:
    """Run tonight's search of a job: resume its study, compare with the previous night, flag regressions.

    Exit status: 0 no regression; 4 regressions (listed, and in compare.json); 3 nothing met the budgets tonight (nor
    the night before); 2 bad input; 130 interrupted (run the same command again to resume the night).
    """
    from hwprune.nightly import check_night, load_job, run_night

    night = check_night(night)  # a real date first: it names the night's folder
    job = load_job(job_file)
    result = run_night(job, night, log=_log)
    _print_summary_file(result.run_dir)
    if result.previous is None:
        out.print(f"night {result.night}: first night of job {job.name}; nothing to compare with yet")
    else:
        cmp = result.comparison or {}
        out.print(f"night {result.night} vs {result.previous.name}: {len(result.regressions)} regression(s) "
                  f"-> {result.run_dir / 'compare.html'}")
        for r in result.regressions:
            out.print(f"  [bold red]regression[/] ({r['kind']}): {escape(r['message'])}")
        for note in cmp.get("notes", []):
            out.print(f"  note: {escape(note)}")
    out.print(f"history: {job.folder / 'history.csv'}")
    if result.regressions:
        raise typer.Exit(EXIT_REGRESSION)
    if result.budget_unreachable:
        raise BudgetUnreachable(result.budget_unreachable)


# -- doctor -------------------------------------------------------------------------------------------------------
@app.command()
def doctor(
    device: Annotated[str, typer.Option("--device", "-d", help="Device profile name or .toml path.")] = "host-cpu",
    backend: BackendOpt = None, tracker: TrackerOpt = None, key: KeyOpt = None, ssh_host: SshHostOpt = None,
    ssh_user: SshUserOpt = None, ssh_key: SshKeyOpt = None, ssh_port: SshPortOpt = None,
) -> None:
    """Check that a device can be measured: reachable, compiles and runs a tiny model; says how to fix what isn't."""
    try:
        from hwprune.doctor import doctor as run_doctor, format_checks
    except ImportError as exc:
        raise HwpruneError(f"doctor is not available in this installation: {exc}") from None
    profile = _profile(device, _overrides(backend, tracker, key, ssh_host, ssh_user, ssh_key, ssh_port))
    checks = run_doctor(profile)
    out.print(format_checks(checks), highlight=False, markup=False)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


def _one_line(message: object) -> str:
    """An error message on one line: messages quoted from torch or ONNX Runtime can hold newlines."""
    return " ".join(str(message).split())


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and a non-zero exit code, never a traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError:
        pass
    try:
        # outside standalone mode typer returns exit codes (130 for Ctrl-C, N for typer.Exit(N)) instead of exiting
        rc = app(args=argv, standalone_mode=False, prog_name="hwprune")
        if rc == EXIT_INTERRUPTED:
            raise KeyboardInterrupt
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except BudgetUnreachable as exc:
        # soft_wrap: the error stays one line however narrow the terminal, for people and for scripts that grep it
        err.print(f"[bold red]hwprune: no model met the budgets:[/] {escape(_one_line(exc))}", highlight=False,
                  soft_wrap=True)
        sys.exit(EXIT_BUDGET)
    except HwpruneError as exc:
        err.print(f"[bold red]hwprune: error:[/] {escape(_one_line(exc))}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        err.print("hwprune: interrupted; completed trials are saved, run the same command to resume")
        sys.exit(EXIT_INTERRUPTED)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors and aborts
        # typer 0.2x vendors its own copy of click (typer._click), whose exceptions are not click's: recognise a
        # usage error by what it can do (an unknown option once ended in a traceback here)
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            if callable(getattr(exc, "format_message", None)) and type(exc).__name__ != "NoArgsIsHelpError":
                # one line, like every other error, with where to look instead of click's usage block
                where = getattr(getattr(exc, "ctx", None), "command_path", None) or "hwprune"
                message = _one_line(exc.format_message())  # type: ignore[attr-defined]
                err.print(f"[bold red]hwprune: error:[/] {escape(message)} (see `{escape(where)} --help`)",
                          highlight=False, soft_wrap=True)
            else:
                exc.show()  # type: ignore[attr-defined]
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        if isinstance(exc, typer.Abort) or type(exc).__name__ == "Abort":
            sys.exit(EXIT_INTERRUPTED)
        raise


if __name__ == "__main__":
    main()
