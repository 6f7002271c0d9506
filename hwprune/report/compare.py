"""What changed between two runs of the same job: deltas, Pareto front shift, differing settings, regressions.

:func:`compare_runs` returns plain data for code (nightly jobs check its ``regressions`` list);
:func:`comparison_document` renders the same data for people.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hwprune.report.data import RunData, load_run, model_label
from hwprune.report.cells import judged_cell, latency_cell
from hwprune.report.document import Document, Figure, Section, Table, Text
from hwprune.report.format import DASH, code, esc, fmt_count, fmt_int, fmt_mb, fmt_metric, fmt_ms, fmt_pct, fmt_x, sig

# (key, getter, lower is better: True / False / None = neither) of the numbers compared for a model
_FIELDS: list[tuple[str, Any, bool | None]] = [
    ("accuracy", lambda m: m.get("accuracy"), False),
    ("accuracy_proxy", lambda m: m.get("accuracy_proxy"), False),
    ("latency_ms_judged", lambda m: m["latency_ms"]["judged"], True),  # what the budget judges: regressions
    ("latency_ms_median", lambda m: m["latency_ms"]["median"], True),
    ("latency_ms_p90", lambda m: m["latency_ms"]["p90"], True),
    ("latency_ms_std", lambda m: m["latency_ms"].get("std"), None),
    ("memory_mb_total", lambda m: m["memory_mb"]["total"], True),
    ("weights_mb", lambda m: m["memory_mb"]["weights"], True),
    ("peak_activations_mb", lambda m: m["memory_mb"]["peak_activations"], True),
    ("params", lambda m: m.get("params"), True),
    ("macs", lambda m: m.get("macs"), True),
    ("file_bytes", lambda m: m.get("file_bytes"), True),
    ("speedup", lambda m: m.get("speedup"), False),
]
_FORMAT = {"accuracy": fmt_metric, "accuracy_proxy": fmt_metric, "latency_ms_judged": fmt_ms,
           "latency_ms_median": fmt_ms, "latency_ms_p90": fmt_ms,
           "latency_ms_std": fmt_ms, "memory_mb_total": fmt_mb, "weights_mb": fmt_mb, "peak_activations_mb": fmt_mb,
           "params": fmt_int, "macs": fmt_count, "file_bytes": fmt_int, "speedup": fmt_x}
_LABEL = {"accuracy": "{metric} (reported)", "accuracy_proxy": "{metric} (search proxy)",
          "latency_ms_judged": "latency (as the budget judges it)", "latency_ms_median": "own median",
          "latency_ms_p90": "own p90", "latency_ms_std": "latency std",
          "memory_mb_total": "memory (weights + peak activations)", "weights_mb": "weights",
          "peak_activations_mb": "peak activations", "params": "parameters", "macs": "MACs",
          "file_bytes": "ONNX file bytes", "speedup": "speedup vs own dense"}


def _get(fn: Any, m: dict[str, Any]) -> float | None:
    try:
        v = fn(m)
        return None if v is None else float(v)
    except (KeyError, TypeError, ValueError):
        return None


def _delta(a: float | None, b: float | None) -> dict[str, float | None]:
    d = None if a is None or b is None else b - a
    pct = None if d is None or not a else 100.0 * d / abs(a)
    return {"a": a, "b": b, "delta": d, "delta_pct": pct}


def _model_deltas(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    if a is None or b is None:
        return None
    return {key: _delta(_get(fn, a), _get(fn, b)) for key, fn, _ in _FIELDS}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _dominates(p: tuple[float, float, float], q: tuple[float, float, float]) -> bool:
    """p (accuracy up, latency down, memory down) is at least as good as q everywhere and better somewhere."""
    ge = p[0] >= q[0] and p[1] <= q[1] and p[2] <= q[2]
    return ge and (p[0] > q[0] or p[1] < q[1] or p[2] < q[2])


def _point(m: dict[str, Any]) -> tuple[float, float, float]:
    return float(m["accuracy"]), float(m["latency_ms"]["judged"]), float(m["memory_mb"]["total"])


_REQUEST_KEYS = ("model", "device", "backend", "latency_budget", "latency_budget_ms", "memory_budget",
                 "memory_budget_mb", "trials", "timeout_s", "seed", "sampler", "max_ratio", "channel_multiple",
                 "exporter", "finetune", "calibration_batches")


def compare_runs(a: str | Path | RunData, b: str | Path | RunData, *, accuracy_tolerance: float = 0.0,
                 memory_tolerance: float = 0.0, latency_tolerance: float = 0.0) -> dict[str, Any]:
    """Compare run ``b`` (new) with run ``a`` (baseline).

    Returns ``{"a", "b", "recommended", "dense", "pareto", "differences", "regressions", "notes"}``: per-model
    deltas (``{"a", "b", "delta", "delta_pct"}`` per number), the fronts and how many points of each the other
    dominates, the settings that differ, and ``regressions``, a list of ``{"kind", "message", "a", "b"}``:
    the recommended model's latency up by more than the larger of the two runs' standard deviations (and more than
    ``latency_tolerance``, a fraction of run A's, which a shared host needs), its
    ``accuracy`` down by more than ``accuracy_tolerance``, its memory up by more than ``memory_tolerance``
    (a fraction), a budget it no longer meets, no recommended model any more, or artifacts failing their checksums.
    """
    ra = a if isinstance(a, RunData) else load_run(a)
    rb = b if isinstance(b, RunData) else load_run(b)
    out: dict[str, Any] = {
        "a": {"run": ra.name, "path": str(ra.run_dir), "recommended": ra.summary.get("recommended"),
              "created": ra.summary.get("created")},
        "b": {"run": rb.name, "path": str(rb.run_dir), "recommended": rb.summary.get("recommended"),
              "created": rb.summary.get("created")},
        "metric": ra.metric,
        "recommended": _model_deltas(ra.recommended, rb.recommended),
        "dense": _model_deltas(ra.dense, rb.dense),
    }
    out["pareto"] = _pareto_shift(ra, rb)
    out["differences"] = _differences(ra, rb)
    out["regressions"] = _regressions(ra, rb, out, accuracy_tolerance, memory_tolerance, latency_tolerance)
    out["notes"] = _notes(ra, rb, out)
    return out


def _pareto_shift(ra: RunData, rb: RunData) -> dict[str, Any]:
    """Both fronts, how many points of each the other dominates, and the final hypervolumes."""
    fa, fb = [_point(m) for m in ra.pareto], [_point(m) for m in rb.pareto]
    hv_a = (ra.summary.get("search", {}).get("hypervolume") or [[None, None]])[-1][1]
    hv_b = (rb.summary.get("search", {}).get("hypervolume") or [[None, None]])[-1][1]
    return {
        "a": [{"trial": m["trial"], "accuracy": p[0], "latency_ms": p[1], "memory_mb": p[2]}
              for m, p in zip(ra.pareto, fa)],
        "b": [{"trial": m["trial"], "accuracy": p[0], "latency_ms": p[1], "memory_mb": p[2]}
              for m, p in zip(rb.pareto, fb)],
        "a_dominated_by_b": sum(any(_dominates(q, p) for q in fb) for p in fa),
        "b_dominated_by_a": sum(any(_dominates(p, q) for p in fa) for q in fb),
        "hypervolume": _delta(hv_a, hv_b),
    }


def _differences(ra: RunData, rb: RunData) -> list[dict[str, Any]]:
    """The request fields, software versions, profile settings and measurement settings that differ."""
    differences = []
    for key in _REQUEST_KEYS:
        va, vb = ra.request.get(key), rb.request.get(key)
        if va != vb:
            differences.append({"field": f"request.{key}", "a": va, "b": vb})
    for prefix, da, db in (("versions", ra.request.get("versions") or {}, rb.request.get("versions") or {}),
                           ("profile", _flatten(ra.request.get("profile") or {}),
                            _flatten(rb.request.get("profile") or {})),
                           ("measurement", ra.summary.get("measurement") or {}, rb.summary.get("measurement") or {})):
        for key in sorted(set(da) | set(db)):
            if prefix == "profile" and key == "source":
                continue  # where the profile file lived says nothing about the device
            if da.get(key) != db.get(key):
                differences.append({"field": f"{prefix}.{key}", "a": da.get(key), "b": db.get(key)})
    return differences


def _regressions(ra: RunData, rb: RunData, out: dict[str, Any], accuracy_tolerance: float, memory_tolerance: float,
                 latency_tolerance: float) -> list[dict[str, Any]]:
    """The regressions of run B against run A (see :func:`compare_runs`)."""
    rec_a, rec_b = ra.recommended, rb.recommended
    regressions: list[dict[str, Any]] = []
    if rec_a is not None and rec_b is None:
        regressions.append({"kind": "no_recommendation", "a": rec_a["trial"], "b": None,
                            "message": "run B found no model that meets the budgets; run A did"})
    if rec_a is not None and rec_b is not None:
        regressions += _recommended_regressions(ra.metric, rec_a, rec_b, out["recommended"], accuracy_tolerance,
                                                memory_tolerance, latency_tolerance)
    bad = [c for c in rb.file_checks if not c.ok]
    if bad:
        regressions.append({"kind": "artifacts", "a": None, "b": [c.path for c in bad],
                            "message": f"{len(bad)} artifact(s) of run B fail their checksum or are missing"})
    return regressions


def _recommended_regressions(metric: str, rec_a: dict[str, Any], rec_b: dict[str, Any], d: dict[str, Any],
                             accuracy_tolerance: float, memory_tolerance: float,
                             latency_tolerance: float) -> list[dict[str, Any]]:
    """Latency, accuracy, memory and budget regressions of B's recommended model against A's (deltas ``d``)."""
    regressions: list[dict[str, Any]] = []
    lat = d["latency_ms_judged"]
    spread = max(_get(lambda m: m["latency_ms"].get("std"), rec_a) or 0.0,
                 _get(lambda m: m["latency_ms"].get("std"), rec_b) or 0.0,
                 latency_tolerance * (lat["a"] or 0.0))
    if lat["delta"] is not None and lat["delta"] > spread:
        regressions.append({"kind": "latency", "a": lat["a"], "b": lat["b"], "message": (
            f"recommended model's latency (as the budget judges it) rose {fmt_ms(lat['delta'])} "
            f"({fmt_pct(lat['delta_pct'], True)}), "
            f"more than the allowed spread ({fmt_ms(spread)}: the larger run std or the tolerance)")})
    acc = d["accuracy"]
    if acc["delta"] is not None and acc["delta"] < -accuracy_tolerance:
        regressions.append({"kind": "accuracy", "a": acc["a"], "b": acc["b"], "message": (
            f"recommended model's {metric} fell from {fmt_metric(acc['a'])} to {fmt_metric(acc['b'])} "
            f"({fmt_pct(acc['delta_pct'], True)})")})
    mem = d["memory_mb_total"]
    if mem["delta"] is not None and mem["a"] is not None and mem["delta"] > memory_tolerance * mem["a"] + 1e-12:
        regressions.append({"kind": "memory", "a": mem["a"], "b": mem["b"], "message": (
            f"recommended model's memory rose from {fmt_mb(mem['a'])} to {fmt_mb(mem['b'])} "
            f"({fmt_pct(mem['delta_pct'], True)})")})
    for kind in ("latency", "memory"):
        if rec_a.get("meets", {}).get(kind) and not rec_b.get("meets", {}).get(kind):
            regressions.append({"kind": f"budget_{kind}", "a": True, "b": False,
                                "message": f"recommended model of run B misses the {kind} budget; run A's met it"})
    return regressions


def _notes(ra: RunData, rb: RunData, out: dict[str, Any]) -> list[str]:
    """What a reader should know before trusting the deltas (host changed, different profiles, noisy runs...)."""
    notes: list[str] = []
    differences = out["differences"]
    dense = out["dense"]
    dense_pct = dense["latency_ms_median"]["delta_pct"] if dense else None
    if dense_pct is not None and abs(dense_pct) > 5:
        notes.append(f"the dense model's latency also changed by {fmt_pct(dense_pct, True)}: the host or runtime may "
                     "be slower/faster, not the pruned model")
    if any(x["field"].startswith("profile.") or x["field"] == "request.device" for x in differences):
        notes.append("the runs used different device profiles, so latencies compare different hardware or settings")
    if any(x["field"].startswith("versions.") for x in differences):
        notes.append("the runs used different software versions")
    if any(x["field"].startswith(("request.latency_budget", "request.memory_budget")) for x in differences):
        notes.append("the runs had different budgets, so their recommended models answer different questions")
    for run, tag in ((ra, "A"), (rb, "B")):
        noisy = [model_label(r) for r in run.models() if (r.get("latency_ms") or {}).get("noisy")]
        if noisy:
            notes.append(f"run {tag} has noisy latency measurements ({', '.join(noisy)})")
    return notes


def _fmt_value(v: Any) -> str:
    if v is None:
        return DASH
    if isinstance(v, float):
        return sig(v, 4)
    if isinstance(v, (dict, list)):
        return code(json.dumps(v, sort_keys=True))
    return esc(v)


def comparison_document(ra: RunData, rb: RunData, result: dict[str, Any]) -> Document:
    """The comparison of two loaded runs as a report document."""
    from hwprune import __version__  # hwprune/__init__ imports this package: not at module level

    label_a, label_b = f"A ({ra.name})", f"B ({rb.name})"
    if ra.name == rb.name:
        label_a, label_b = "A (baseline)", "B (new)"
    regs = result["regressions"]
    sections = [_cmp_summary(ra, rb, result), _cmp_recommended(ra, rb, result),
                _cmp_fronts(ra, rb, result, label_a, label_b), _cmp_settings(result)]

    return Document(title=f"Run comparison: {esc(ra.request.get('model'))} on {esc(ra.request.get('device'))}",
                    subtitle=f"{esc(label_a)} vs {esc(label_b)}: {len(regs)} regression(s).", sections=sections,
                    footer=f"Built by hwprune {__version__} from the two run folders alone.")


def _cmp_summary(ra: RunData, rb: RunData, result: dict[str, Any]) -> Section:
    s = Section("Summary")
    s.blocks.append(Text(f"Run **A** = {code(ra.name)} (search finished {esc(ra.summary.get('created'))}) is the "
                         f"baseline; run **B** = {code(rb.name)} (finished {esc(rb.summary.get('created'))}) is "
                         "compared with it. Deltas are B − A."))
    regs = result["regressions"]
    if regs:
        for r in regs:
            s.blocks.append(Text(f"**Regression ({esc(r['kind'])}):** {esc(r['message'])}.", "warning"))
    else:
        s.blocks.append(Text("No regressions: the recommended model's latency did not rise beyond the measurement "
                             f"spread, its {ra.metric} and memory did not get worse, and every budget it met is still "
                             "met.",
                             "ok"))
    for n in result["notes"]:
        s.blocks.append(Text(esc(n) + ".", "note"))
    return s


def _cmp_recommended(ra: RunData, rb: RunData, result: dict[str, Any]) -> Section:
    metric = ra.metric
    s = Section("Recommended model")
    rec_a, rec_b = ra.recommended, rb.recommended
    s.blocks.append(Text(f"Run A recommends {model_label(rec_a) if rec_a else 'nothing'}, run B "
                         f"{model_label(rec_b) if rec_b else 'nothing'}. The regression rule for latency: B's latency "
                         "as its budget judges it exceeds A's by more than the larger of the two runs' latency "
                         "standard deviations (and the tolerance); own median = each model timed on its own."))
    for key, title in (("recommended", "Recommended model, A vs B"), ("dense", "Dense model, A vs B (a change here "
                                                                             "means the host or runtime changed)")):
        d = result[key]
        if not d:
            continue
        rows = []
        for field, _, lower in _FIELDS:
            v = d[field]
            f = _FORMAT[field]
            delta = DASH if v["delta"] is None else (f(v["delta"]) if field not in ("file_bytes", "params")
                                                     else f"{int(v['delta']):+,}")
            if v["delta"] is not None and v["delta"] > 0 and field not in ("file_bytes", "params"):
                delta = "+" + delta
            worse = (lower is True and (v["delta"] or 0) > 0) or (lower is False and (v["delta"] or 0) < 0)
            verdict = "" if lower is None else "worse" if worse else "better" if v["delta"] else "same"
            rows.append([_LABEL[field].format(metric=metric), f(v["a"]), f(v["b"]), delta,
                         fmt_pct(v["delta_pct"], True), verdict])
        s.blocks.append(Table(["Number", "A", "B", "Δ (B − A)", "Δ %", ""], rows, align="lrrrrl", caption=title))
    return s


def _cmp_fronts(ra: RunData, rb: RunData, result: dict[str, Any], label_a: str, label_b: str) -> Section:
    from hwprune.report import plots  # matplotlib: imported only when a comparison is drawn

    s = Section("Pareto front shift")
    p = result["pareto"]
    hv = p["hypervolume"]
    s.blocks.append(Text(
        f"Run A's front has {len(p['a'])} model(s), run B's {len(p['b'])}. {p['a_dominated_by_b']} of A's models are "
        f"beaten on every objective by a model of B; {p['b_dominated_by_a']} of B's are beaten by one of A. Final "
        f"hypervolume (each run normalised by its own dense model): A {sig(hv['a'], 4)}, B {sig(hv['b'], 4)}."))
    s.blocks.append(Figure("fronts", plots.compare_fronts_plot(ra, rb, label_a, label_b), "Both Pareto fronts",
                           "Circles = run A, squares = run B; X = dense models; stars = recommended models; dashed "
                           "steps = the best accuracy of each front at or below a latency; dotted lines = latency "
                           "budgets."))
    rows = []
    for run, tag in ((ra, "A"), (rb, "B")):
        for m in sorted(run.pareto, key=lambda m: m["latency_ms"]["judged"]):
            rows.append([tag, model_label(m) + (" (recommended)" if m.get("recommended") else ""),
                         fmt_metric(m["accuracy"]), judged_cell(m), latency_cell(m), fmt_mb(m["memory_mb"]["total"]),
                         fmt_x(m.get("speedup"))])
    s.blocks.append(Table(["Run", "Model", ra.metric, "Latency", "Own median", "Memory", "Speedup"], rows,
                          align="llrrrrr"))
    return s


def _cmp_settings(result: dict[str, Any]) -> Section:
    s = Section("What differs between the runs")
    diffs = result["differences"]
    if diffs:
        s.blocks.append(Table(["Setting", "A", "B"], [[code(x["field"]), _fmt_value(x["a"]), _fmt_value(x["b"])]
                                                      for x in diffs], align="lll"))
    else:
        s.blocks.append(Text("Same request, device profile, measurement settings and software versions."))
    return s
