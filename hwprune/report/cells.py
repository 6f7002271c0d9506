"""Cells, captions and warnings of the deployment report: how one model's figures read in its tables.
"""

from __future__ import annotations

from typing import Any

from hwprune.backends import backend_capabilities
from hwprune.backends.base import Capabilities
from hwprune.errors import HwpruneError
from hwprune.report.data import JUDGED_BY_RATIO, RunData, model_label
from hwprune.report.format import DASH, _num, code, esc, fmt_metric, fmt_ms, fmt_pct, sig


STAGES = {
    "prune": "removing channels from a copy of the model",
    "calibrate": "re-estimating BatchNorm statistics of the pruned model",
    "finetune": "short fine-tune of each trial",
    "export": "exporting each candidate to ONNX",
    "session": "creating the runtime session (part of measure)",
    "compile": "compiling the model for the target (part of measure)",
    "upload": "copying the model to the device (part of measure)",
    "timing": "the timed runs themselves (part of measure)",
    "measure": "the whole measurement of each candidate",
    "evaluate": "scoring each candidate with the evaluator",
    "final_finetune": "the final fine-tune of the front's most accurate models, before the recommendation",
}


def _final_finetuned(run: RunData) -> bool:
    return "final_finetune" in (run.summary.get("search", {}).get("stage_seconds") or {})


def _flags(record: dict[str, Any]) -> str:
    """Qualifiers every latency-derived cell of a model carries: estimated / untuned / noisy."""
    flags = []
    if record.get("estimated"):
        flags.append("estimated")
    if record.get("tuned") is False:
        flags.append("untuned")
    if (record.get("latency_ms") or {}).get("noisy"):
        flags.append("noisy")
    return f" ({', '.join(flags)})" if flags else ""


def latency_cell(record: dict[str, Any], key: str = "median") -> str:
    """A model's latency statistic with its qualifiers, as the report's tables show it."""
    return fmt_ms((record.get("latency_ms") or {}).get(key)) + _flags(record)


def judged_cell(record: dict[str, Any]) -> str:
    """The latency the budget judges (the report's primary latency), with the model's qualifiers."""
    return latency_cell(record, "judged")


def by_ratio(run: RunData) -> bool:
    """Whether the run's latencies were judged on ratios to the dense model measured beside each model."""
    return any((r.get("latency_ms") or {}).get("judged_by") == JUDGED_BY_RATIO for r in run.pareto) or \
        bool(len(run.trials) and run.trials["latency_ratio"].notna().any())


def latency_definition(run: RunData) -> str:
    """One sentence saying what the judged latency and the own median are, and how the speedup follows."""
    dense_ms = fmt_ms((run.dense.get("latency_ms") or {}).get("median"))
    if by_ratio(run):
        return ("**Latency** is what the latency budget is judged on: the model's latency ratio to the dense model, "
                f"measured side by side, × the dense reference ({dense_ms}, the dense model's median); the **own "
                "median** is the model's median timed on its own, which a busy host moves more. "
                "Speedup = 1 / that ratio = dense latency / latency.")
    return ("**Latency** is what the latency budget is judged on, here each model's own median (timed on its own); "
            "speedup = dense latency / latency.")


def model_cell(record: dict[str, Any]) -> str:
    """The Model column: ``dense``, ``**trial 17 (recommended)**`` or ``trial 17``."""
    label = model_label(record)
    return f"**{label} (recommended)**" if record.get("recommended") else label


def metric_cell(run: RunData, record: dict[str, Any]) -> str:
    """The reported metric with what it is: unpruned, after the final fine-tune, or the search's proxy."""
    value = fmt_metric(record.get("accuracy"))
    if record.get("trial") is None:
        return f"{value} (unpruned)"
    steps = record.get("final_finetune_steps")
    if steps is None and record.get("recommended") and _final_finetuned(run):  # summaries before final candidates
        steps = (run.request.get("finetune") or {}).get("final_steps")
    if steps:
        return f"{value} (fine-tuned, {steps} steps)"
    return f"{value} (search proxy)"


def _meets(record: dict[str, Any], kind: str, budget: Any) -> str:
    if budget is None:
        return "no budget"
    return "yes" if (record.get("meets") or {}).get(kind) else "**NO**"


def _budget_text(typed: Any, resolved: Any, unit: str, what: str) -> str:
    if resolved is None:
        return "none"
    out = f"{sig(resolved)} {unit}"
    t = str(typed).strip() if typed is not None else ""
    if t.lower().endswith("x"):
        out += f" (typed {code(t)}: {t[:-1]}× the dense model's {what})"
    elif t:
        out += f" (typed {code(t)})"
    return out


def _pct_of(v: Any, ref: Any) -> str:
    a, b = _num(v), _num(ref)
    return DASH if a is None or not b else f"{100 * a / b:.0f}% of dense"


def onnx_snippet(record: dict[str, Any]) -> str:
    """Python that loads ``record``'s ONNX file with ONNX Runtime and runs it on a random input of the recorded
    shape and dtype (deterministic: ``default_rng(0)``). Run it from the run folder."""
    path = record["files"]["onnx"]["path"]
    inp = record.get("input") or {}
    shape = tuple(int(s) for s in inp.get("shape") or [1])
    dtype = str(inp.get("dtype") or "float32")
    if dtype == "bool":
        make = f"rng.integers(0, 2, size={shape!r}).astype(bool)"
    elif dtype.startswith(("int", "uint")):
        make = f"rng.integers(0, 10, size={shape!r}).astype({dtype!r})"
    else:
        make = f"rng.standard_normal({shape!r}).astype({dtype!r})"
    return "\n".join([
        "# run from the run folder (the folder that holds summary.json)",
        "import numpy as np",
        "import onnxruntime as ort",
        "",
        f'session = ort.InferenceSession("{path}", providers=["CPUExecutionProvider"])',
        "name = session.get_inputs()[0].name",
        "rng = np.random.default_rng(0)",
        f"x = {make}  # the recorded input shape and dtype",
        "outputs = session.run(None, {name: x})",
        "print(name, x.shape, [o.shape for o in outputs])",
    ]) + "\n"


def _accuracy_warnings(run: RunData) -> list[str]:
    """Banners for an answer whose accuracy needs a second look: the guard off or broken, no data given."""
    out = []
    guard = run.summary.get("accuracy_guard")
    rec = run.recommended
    if guard is not None and guard.get("floor") is None:
        out.append("The **accuracy guard was off** (`--max-accuracy-drop off`): the models here may have lost any "
                   "amount of accuracy against the dense model.")
    elif guard is not None and rec is not None and guard.get("met") is False:
        out.append(f"The recommended model **lost more accuracy than the guard allows** ({esc(guard['max_drop'])}).")
    recovery = run.summary.get("recovery") or {}
    if recovery.get("method") == "none":
        out.append("**No data was given and recovery was off**: pruned models kept the dense model's BatchNorm "
                   "statistics. Give calibration/training data for a better answer.")
    elif recovery.get("method") not in (None, "data"):
        held = (recovery.get("agreement") or {}).get("heldout")
        text = (f"**No data was given**: pruned models were recovered with *{esc(recovery['method'])}* "
                f"({recovery.get('samples', 0)} samples). ")
        if recovery.get("leak"):
            text += ("Those are inputs `evaluate` itself scores, so the accuracy above may be optimistic. ")
        if held is not None:
            text += (f"On held-out recorded inputs the recommended model agrees with the dense one on "
                     f"{fmt_pct(100 * held)}. ")
        out.append(text + "Give calibration/training data for a better and surer answer.")
    return out


def _warnings(run: RunData) -> list[str]:
    out = [esc(w) for w in run.warnings] + _accuracy_warnings(run)
    bad = [c for c in run.file_checks if not c.ok]
    if bad:
        out.append(f"{len(bad)} artifact file(s) do not match what the search recorded, so they may not be the "
                   "models measured here: " + "; ".join(esc(c.problem()) for c in bad) + ".")
    m = run.summary.get("measurement", {})
    if m.get("estimated"):
        out.append("Latencies in this report are **estimated** (roofline model), not measured on the device.")
    if m.get("tuned") is False:
        out.append("Latencies were measured with **untuned** TVM kernels, which can be many times slower than tuned "
                   "ones; compare them only with each other.")
    noisy = [model_label(r) for r in run.models() if (r.get("latency_ms") or {}).get("noisy")]
    if noisy:
        out.append(f"Noisy latency measurements (spread above the profile's limit after re-measuring): "
                   f"{', '.join(noisy)}. Treat small latency differences between these models with caution.")
    for r in run.pareto:
        if r.get("remeasure_note"):
            out.append(f"{model_label(r)}: {esc(r['remeasure_note'])}.")
        tuned = r.get("final_tuned")
        if tuned and "latency_ms" in tuned:
            out.append(f"{model_label(r)} was tuned on the device after the search ({tuned['tuning_trials']} "
                       f"MetaSchedule trials, {tuned['seconds']:.0f} s): {tuned['latency_ms']['median']:.3f} ms median "
                       f"(p90 {tuned['latency_ms']['p90']:.3f}); the tables show the search's measurement.")
        elif tuned:
            out.append(f"Tuning {model_label(r)} on the device after the search failed: {esc(tuned['error'])}.")
    srch = run.summary.get("search", {})
    if srch.get("interrupted"):
        out.append("The search was interrupted; this report covers the trials completed before that.")
    if srch.get("trials_failed"):
        out.append(f"{srch['trials_failed']} trial(s) failed; their reasons are under Search health.")
    return out


def _guard_text(run: RunData) -> str:
    guard = run.summary.get("accuracy_guard")
    if guard is None:
        return DASH
    if guard.get("floor") is None:
        return "off"
    return (f"{esc(run.metric)} at least {fmt_metric(guard['floor'])} ({esc(guard['max_drop'])} below the dense "
            f"{fmt_metric(guard['dense'])}), judged on the {esc(guard['judged_on'])}")


def _capabilities(backend: Any) -> Capabilities:
    """The capabilities of the backend a run folder names; none for a name this installation does not know."""
    try:
        return backend_capabilities(str(backend))
    except HwpruneError:
        return Capabilities()
