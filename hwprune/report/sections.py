"""The sections of the deployment report (one function each) and :func:`report_document`, which puts them
together.
"""

from __future__ import annotations

from typing import Any

from hwprune.predict.labels import estimate_label
from hwprune.report.data import JUDGED_COLUMN, FileCheck, RunData, model_label
from hwprune.report.format import (
    DASH,
    _num,
    code,
    esc,
    fmt_bytes,
    fmt_count,
    fmt_int,
    fmt_mb,
    fmt_metric,
    fmt_ms,
    fmt_pct,
    fmt_s,
    fmt_x,
    sig,
)
from hwprune.report.document import Code, Document, Figure, Section, Table, Text, Tiles
from hwprune.report.cells import (
    STAGES,
    _budget_text,
    _capabilities,
    _final_finetuned,
    _flags,
    _guard_text,
    _meets,
    _pct_of,
    _warnings,
    judged_cell,
    latency_cell,
    latency_definition,
    metric_cell,
    model_cell,
    onnx_snippet,
)


def _summary_section(run: RunData) -> Section:
    s = Section("Summary")
    req, dense, rec = run.request, run.dense, run.recommended
    metric = run.metric
    lat_b, mem_b = req.get("latency_budget_ms"), req.get("memory_budget_mb")
    s.blocks.append(Text(
        f"hwprune searched per-layer pruning ratios for the model {code(req.get('model'))} on the device profile "
        f"{code(req.get('device'))} ({esc(req.get('backend') or run.summary.get('measurement', {}).get('backend'))} "
        f"backend): each candidate had whole channels removed, was exported to ONNX and timed on the device. "
        f"The goal: the most accurate model within the budgets (latency "
        f"{_budget_text(req.get('latency_budget'), lat_b, 'ms', 'median latency')}, memory "
        f"{_budget_text(req.get('memory_budget'), mem_b, 'MB', 'memory')})."))
    if rec is not None:
        s.blocks.append(Tiles([
            ("Recommended", model_label(rec), f"deploy {code(rec['files']['onnx']['path'])}"),
            ("Latency", judged_cell(rec), f"as the budget judges it; own median {latency_cell(rec)}; dense "
                                          f"{judged_cell(dense)}"),
            ("Speedup vs dense", fmt_x(rec.get("speedup")) + _flags(rec), ("1 / its latency ratio to the dense "
             "model, measured side by side = " if rec.get("latency_ratio") else "") + "dense latency / latency"),
            ("Memory", fmt_mb(rec["memory_mb"]["total"]),
             f"{_pct_of(rec['memory_mb']['total'], dense['memory_mb']['total'])}; dense "
             f"{fmt_mb(dense['memory_mb']['total'])}"),
            (metric.capitalize(), fmt_metric(rec.get("accuracy")), f"dense {fmt_metric(dense.get('accuracy'))}"
             + (f"; {fmt_pct(100 * rec['accuracy_retention'])} kept"
                if rec.get("accuracy_retention") is not None else "")),
        ]))
        met = []
        if lat_b is not None:
            met.append(("meets" if rec["meets"]["latency"] else "DOES NOT meet") + " the latency budget")
            if rec.get("latency_ratio"):
                met[-1] += (f" (judged on its latency over the dense model's, measured side by side: "
                            f"{rec['latency_ratio']:.3f}, budget {esc(req.get('latency_budget'))})")
        if mem_b is not None:
            met.append(("meets" if rec["meets"]["memory"] else "DOES NOT meet") + " the memory budget")
        s.blocks.append(Text(
            f"**Recommended: {model_label(rec)}.** {metric} {metric_cell(run, rec)} vs {fmt_metric(dense['accuracy'])} "
            f"for the dense model; latency {judged_cell(rec)} vs {judged_cell(dense)} "
            f"({fmt_x(rec.get('speedup'))} faster; own median {latency_cell(rec)}); memory "
            f"{fmt_mb(rec['memory_mb']['total'])} vs "
            f"{fmt_mb(dense['memory_mb']['total'])}; {fmt_int(rec.get('params'))} parameters vs "
            f"{fmt_int(dense.get('params'))}. It " + (" and ".join(met) if met else "had no budgets to meet") + ". "
            f"The Pareto front holds {len(run.pareto)} model(s) in all."))
    else:
        bi = run.summary.get("search", {}).get("best_infeasible")
        best = (run.summary.get("accuracy_guard") or {}).get("best_within_budgets")
        text = "**No model met the budgets**, so nothing is recommended."
        if best and run.summary["accuracy_guard"].get("refused"):
            guard = run.summary["accuracy_guard"]
            text = (f"**No model kept the accuracy guard**, so nothing is recommended: within the budgets the best "
                    f"{esc(metric)} was {fmt_metric(best['accuracy'])} (trial {best['trial']}), under the guard's "
                    f"{fmt_metric(guard['floor'])} ({esc(guard['max_drop'])} below the dense "
                    f"{fmt_metric(guard['dense'])}). Give calibration or training data, or loosen a budget.")
        elif bi:
            text += (f" The best any completed trial reached was {fmt_ms(bi.get('latency_ms'))} latency and "
                     f"{fmt_mb(bi.get('memory_mb'))} memory. Relax a budget, raise the maximum pruning ratio, or run "
                     "more trials.")
        s.blocks.append(Text(text, "warning"))
    for w in _warnings(run):
        s.blocks.append(Text(w, "warning"))
    return s


def _hardware_text(hw: dict[str, Any]) -> str:
    """The profile's hardware facts in one line."""
    bits = []
    for key, label, unit in (("cpu", "CPU", ""), ("cores", "cores", ""), ("clock_ghz", "clock", " GHz"),
                             ("peak_gflops", "peak", " GFLOP/s"), ("memory_bandwidth_gbs", "memory bandwidth", " GB/s"),
                             ("ram_gb", "RAM", " GB"), ("accelerator", "accelerator", "")):
        if hw.get(key) not in (None, ""):
            bits.append(f"{label}: {esc(hw[key])}{unit}" if key != "cpu" else esc(hw[key]))
    return "; ".join(bits) or DASH


def _runtime_text(backend: Any, prof: dict[str, Any]) -> str:
    """The backend and the profile settings it reads (its ``capabilities.settings``), in one line."""
    runtime = [f"backend {code(backend)}"]
    settings = _capabilities(backend).settings
    if "ort" in settings and prof.get("ort"):
        o = prof["ort"]
        runtime.append(f"ONNX Runtime, {o.get('intra_op_threads')} intra-op / {o.get('inter_op_threads')} inter-op "
                       f"thread(s), graph optimization {code(o.get('graph_optimization_level'))}, providers "
                       f"{', '.join(code(p) for p in o.get('providers') or [])}")
    if "tvm" in settings and prof.get("tvm"):
        t = prof["tvm"]
        runtime.append(f"TVM target {code(t.get('target'))}, tuning trials {t.get('tuning_trials')}")
    if "rpc" in settings and prof.get("rpc"):
        runtime.append(f"RPC tracker {code(prof['rpc'].get('tracker'))} key {code(prof['rpc'].get('key'))}")
    if "ssh" in settings and prof.get("ssh"):
        runtime.append(f"over SSH to {code(prof['ssh'].get('host'))}")
    return "; ".join(runtime)


def _request_section(run: RunData) -> Section:
    s = Section("What was asked")
    req = run.request
    prof = req.get("profile") or {}
    hw = prof.get("hardware") or {}
    s.blocks.append(Text("The search request, as recorded when the search started. Budgets typed relative to the "
                         "dense model (like `0.6x`) were resolved against the dense model's measured median latency "
                         "and memory."))
    rows: list[list[str]] = [
        ["Model", code(req.get("model"))],
        ["Device profile", code(req.get("device"))
         + (f" — {esc(prof['description'])}" if prof.get("description") else "")],
    ]
    rows.append(["Hardware (from the profile)", _hardware_text(hw)])
    rows.append(["Runtime", _runtime_text(req.get("backend") or prof.get("backend"), prof)])
    rows += [
        ["Latency budget", _budget_text(req.get("latency_budget"), req.get("latency_budget_ms"), "ms",
                                        "median latency")],
        ["Memory budget", _budget_text(req.get("memory_budget"), req.get("memory_budget_mb"), "MB",
                                       "memory (weights + peak activations)")],
        ["Accuracy guard", _guard_text(run)],
        ["Recovery data", esc((run.summary.get("recovery") or {}).get("note") or DASH)],
        ["Trials", f"{req.get('trials') if req.get('trials') is not None else 'until the timeout'}"
                   + (f", timeout {fmt_s(req.get('timeout_s'))}" if req.get("timeout_s") else "")],
        ["Seed", esc(req.get("seed"))],
        ["Sampler", code(req.get("sampler"))
         + (f" ({esc(req['sampler_repr'])})" if req.get("sampler_repr") else "")],
        ["Search space", f"at most {fmt_pct(100 * float(req.get('max_ratio') or 0))} of each channel group removed; "
                         f"kept widths rounded to multiples of {esc(req.get('channel_multiple') or 1)}"],
        ["Fine-tuning", f"{(req.get('finetune') or {}).get('trial_steps', 0)} steps per trial (after BatchNorm "
                        f"re-calibration on {esc(req.get('calibration_batches'))} batches); "
                        f"{(req.get('finetune') or {}).get('final_steps', 0)} steps for the recommended model"],
        ["ONNX exporter", code(req.get("exporter"))],
        ["Study", f"{code(req.get('study'))} in {code(req.get('storage'))}"],
        ["Started / finished", f"{esc(req.get('started') or DASH)} / {esc(run.summary.get('created') or DASH)}"],
    ]
    versions = req.get("versions") or {}
    rows.append(["Software", ", ".join(f"{esc(k)} {esc(v) if v else '(not installed)'}" for k, v in versions.items())
                 or DASH])
    s.blocks.append(Table(["Setting", "Value"], rows, align="ll"))
    command = str(req.get("command") or "")
    from_python = command.startswith("hwprune.search(")
    s.blocks.append(Text("The " + ("Python call" if from_python else "command") + " that started this search; run "
                         "it again to reproduce the search (with the same storage it resumes the study instead of "
                         "starting over):"))
    s.blocks.append(Code(command or "(not recorded)", "python" if from_python else "bash"))
    return s


def _answer_section(run: RunData) -> Section:
    s = Section("The answer")
    metric = run.metric
    req = run.request
    lat_b, mem_b = req.get("latency_budget_ms"), req.get("memory_budget_mb")
    m = run.summary.get("measurement", {})
    s.blocks.append(Text(
        f"The dense (unpruned) model, the recommended model and the rest of the **Pareto front**: the models no other "
        f"candidate beats on {metric}, latency and memory at once. The recommended model is the most accurate model "
        f"that meets every budget. {metric.capitalize()} during the search is a quick proxy (after BatchNorm "
        f"re-calibration" + (" and a short fine-tune" if (req.get("finetune") or {}).get("trial_steps") else "")
        + "); the most accurate models within the budgets by that proxy (up to "
        + str((req.get("finetune") or {}).get("final_candidates", 1)) + ") get the final fine-tune, and the most "
        "accurate after it is recommended"
        + ("" if _final_finetuned(run) else " (no final fine-tune here: no training data or 0 steps)") + ". "
        f"A model's own median and p90 are over {m.get('repeats')} timed runs after {m.get('warmup')} untimed "
        f"warm-up runs. " + latency_definition(run)))
    models = run.models()
    classes = ["dense" if r.get("trial") is None else "recommended" if r.get("recommended") else "" for r in models]
    rows = []
    for r in models:
        lat = r.get("latency_ms") or {}
        rows.append([model_cell(r), metric_cell(run, r), fmt_metric(r.get("accuracy_proxy")), judged_cell(r),
                     latency_cell(r), latency_cell(r, "p90"), f"± {sig(lat.get('std'))} ms (min {sig(lat.get('min'))})",
                     fmt_x(r.get("speedup")) + _flags(r), _meets(r, "latency", lat_b)])
    s.blocks.append(Table(
        ["Model", metric, f"{metric} (search proxy)", "Latency", "Own median", "Own p90", "Spread (std, min)",
         "Speedup", "Meets latency budget"], rows, row_classes=classes,
        caption=f"Accuracy and speed (latency budget: {fmt_ms(lat_b) if lat_b is not None else 'none'})"))
    rows = []
    for r in models:
        mem = r.get("memory_mb") or {}
        rows.append([model_cell(r), fmt_mb(mem.get("total")), fmt_mb(mem.get("weights")),
                     fmt_mb(mem.get("peak_activations")), fmt_int(r.get("params")), fmt_x(r.get("size_ratio")),
                     fmt_count(r.get("macs")), fmt_bytes(r.get("file_bytes")), _meets(r, "memory", mem_b)])
    s.blocks.append(Table(
        ["Model", "Memory", "Weights", "Peak activations", "Parameters", "Size ratio", "MACs", "ONNX file",
         "Meets memory budget"], rows, row_classes=classes,
        caption=f"Size (memory budget: {fmt_mb(mem_b) if mem_b is not None else 'none'}). Memory = weights + peak "
                "activations; size ratio = parameters / dense parameters; MACs = multiply-accumulates per inference"))
    from hwprune.report import plots

    s.blocks.append(Figure("pareto", plots.pareto_plot(run), "Pareto front: latency vs " + metric,
                           f"Every completed trial at the latency the budget judges (as in the tables) and the proxy "
                           f"{metric} the search measured. Colour = "
                           "memory (weights + peak activations); grey, faded = over a budget; outlined = Pareto front "
                           "(labels are trial numbers); X = dense model; star = recommended model as exported and "
                           "re-measured" + (", after its final fine-tune" if _final_finetuned(run) else "") +
                           ". Dotted line and the colour-bar mark = budgets. Failed trials are not plotted."))
    return s


def _widths_section(run: RunData) -> Section | None:
    rec = run.recommended
    if rec is None or not rec.get("widths"):
        return None
    from hwprune.report import plots

    s = Section("What was pruned")
    s.blocks.append(Text("Output channels of each prunable layer in the dense model and in the recommended model. "
                         "Pruning removes whole channels, so the pruned model is an ordinary, smaller dense model: no "
                         "sparse kernels are needed to run it fast."))
    if rec.get("removed_blocks"):
        s.blocks.append(Text("Residual blocks removed whole (each replaced by its skip connection, so its layers show "
                             "0 kept channels): " + ", ".join(code(b) for b in rec["removed_blocks"]) + "."))
    units = (rec.get("precision") or {}).get("units") or {}
    if any(v != "fp32" for v in units.values()):  # --quantize int8: the precision chosen per channel group / layer
        s.blocks.append(Text(f"Precision ({esc(rec['precision'].get('label'))}, ONNX Runtime static QDQ): INT8 "
                             + ", ".join(code(u) for u, v in units.items() if v == "int8") + "; FP32 the rest."))
    png = plots.widths_plot(run)
    if png:
        note = " (FP32), orange hatched = kept channels of INT8 layers" if plots.int8_layers(rec) else ""
        s.blocks.append(Figure("widths", png, "Per-layer widths",
                               f"Grey = original width, blue = kept channels{note}."))
    rows = []
    for name, (orig, kept) in rec["widths"].items():
        ratio = (rec.get("ratios") or {}).get(name)
        rows.append([code(name), fmt_int(orig), fmt_int(kept), fmt_pct(100 * kept / orig if orig else None),
                     fmt_pct(100 * ratio) if ratio is not None else DASH])
    s.blocks.append(Table(["Layer", "Original", "Kept", "Kept share", "Requested removal"], rows,
                          caption="Per-layer widths of the recommended model (requested removal = the sampled ratio "
                                  "before rounding to the channel multiple; coupled layers share one ratio)"))
    return s


def _node_section(run: RunData) -> Section | None:
    from hwprune.report import plots

    rec = run.recommended
    dense_prof, rec_prof = run.node_profiles
    if dense_prof is None and rec_prof is None:
        return None
    s = Section("Where the time goes")
    runs = (rec_prof or dense_prof or {}).get("runs")
    backend = (rec_prof or dense_prof or {}).get("backend", "ort")
    tool = "ONNX Runtime's profiler" if _capabilities(backend).node_profile else f"the {backend} profiler"
    s.blocks.append(Text(
        f"Time per node from {tool}, averaged over {runs} profiled runs, summed by operator type. Node names and op "
        "types are those of the runtime's optimized graph (fused nodes get new names). Profiled runs carry profiler "
        "overhead, so their sum is not the end-to-end latency above; use them to see which layers dominate."))
    label = ((rec or {}).get("precision") or {}).get("label", "fp32")
    if rec_prof and label != "fp32":  # --quantize int8: the deployed file is the quantized one, and so is its profile
        s.blocks.append(Text(f"The recommended model ({esc(label)}) is profiled as its deployed quantized file: its "
                             f"INT8 layers show as the runtime's quantized ops (e.g. {code('QLinearConv')}), with "
                             f"{code('QuantizeLinear')}/{code('DequantizeLinear')} nodes between INT8 and FP32 parts."))
    for prof, record in ((dense_prof, run.dense), (rec_prof, rec)):
        if not prof or record is None:
            continue
        total_us = sum(float(n.get("median_us") or 0) for n in prof.get("nodes", []))
        median_us = 1000.0 * float((record.get("latency_ms") or {}).get("median") or 0)
        if median_us and total_us > 2 * median_us:
            s.blocks.append(Text(
                f"The {model_label(record)} profile adds up to {total_us:.1f} µs per run, more than twice the model's "
                f"measured median latency ({median_us:.1f} µs): at least one profiled run was disturbed (e.g. by "
                "another process), so some nodes look slower than they are. Trust the latency tables over this "
                "breakdown.", "note"))
    png = plots.node_latency_plot(run)
    if png:
        s.blocks.append(Figure("node_latency", png, "Per-op-type latency, dense vs recommended"))
    dense_t = plots.op_type_totals(dense_prof) if dense_prof else {}
    rec_t = plots.op_type_totals(rec_prof) if rec_prof else {}
    ops = sorted(set(dense_t) | set(rec_t), key=lambda op: -max(dense_t.get(op, 0.0), rec_t.get(op, 0.0)))
    rows = [[code(op), f"{dense_t[op]:.1f}" if op in dense_t else DASH, f"{rec_t[op]:.1f}" if op in rec_t else DASH]
            for op in ops]
    rows.append(["**all nodes**", f"{sum(dense_t.values()):.1f}" if dense_t else DASH,
                 f"{sum(rec_t.values()):.1f}" if rec_t else DASH])
    label = f"trial {rec['trial']} (recommended), µs" if rec is not None else "recommended, µs"
    s.blocks.append(Table(["Op type", "dense, µs", label], rows, caption="Median time per inference by op type"))
    prof, who = (rec_prof, model_label(rec)) if rec_prof else (dense_prof, "dense")
    nodes = sorted(prof.get("nodes", []), key=lambda n: -float(n.get("median_us") or 0))[:10]
    total = sum(float(n.get("median_us") or 0) for n in prof.get("nodes", [])) or 1.0
    s.blocks.append(Table(["Node", "Op type", "Median µs", "Share"],
                          [[code(n.get("name")), code(n.get("op_type")), f"{float(n.get('median_us') or 0):.1f}",
                            fmt_pct(100 * float(n.get("median_us") or 0) / total)] for n in nodes],
                          align="llrr", caption=f"The slowest nodes of the {who} model"))
    return s


def _measurement_section(run: RunData) -> Section:
    s = Section("How it was measured")
    m = run.summary.get("measurement", {})
    prof = run.request.get("profile") or {}
    remeasure = (prof.get("measure") or {}).get("remeasure")
    inp = run.dense.get("input") or {}
    min_repeat = _num((prof.get("measure") or {}).get("min_repeat_ms")) or 0.0
    batching = (f" Each timed run calls the model back to back until at least {sig(min_repeat)} ms have passed and "
                "counts the mean time per call, so sub-millisecond models are not lost in timer resolution."
                if min_repeat > 0 else "")
    s.blocks.append(Text(
        f"Latency: each model's ONNX file was run {m.get('warmup')} times untimed (warm-up), then {m.get('repeats')} "
        f"timed runs with batch size 1 on an input of shape {code(inp.get('shape'))} ({esc(inp.get('dtype'))}); the "
        f"tables report the median and p90 of those runs.{batching} A measurement is **noisy** when its robust spread "
        f"(1.4826 × median absolute deviation / median) stays above {fmt_pct(100 * float(m.get('max_cv') or 0))} "
        f"after re-measuring up to {remeasure if remeasure is not None else '?'} times; noisy numbers are marked "
        "\"noisy\" wherever they appear."))
    s.blocks.append(Text(
        "Memory = **weights** (the model's parameter tensors) + **peak activations** (the largest total of "
        "intermediate tensors alive at once while the graph runs, input and output included). Both are computed from "
        "the ONNX graph, so they do not depend on the host."
        + (" The process peak is the peak resident-memory growth of a fresh process that loads the model with ONNX "
           "Runtime and runs it (over that process's baseline after its imports): what the runtime itself adds."
           if _process_peaks(run) else "")))
    est = m.get("estimated")
    tuned = m.get("tuned")
    rows = [
        ["Backend", code(m.get("backend"))],
        ["Threads", esc(m.get("threads") if m.get("threads") is not None else DASH)],
        ["Warm-up runs / timed runs", f"{m.get('warmup')} / {m.get('repeats')}"],
        ["Minimum duration of one timed run", f"{sig(min_repeat)} ms" if min_repeat > 0 else "none (one call per run)"],
        ["Noise limit (robust CV)", fmt_pct(100 * float(m.get("max_cv") or 0))],
        ["Latency source", f"**estimated**, not measured: {esc(estimate_label(m.get('predictor')))}" if est
         else "measured on the device"],
    ]
    if tuned is not None:
        rows.append(["TVM kernels", "tuned (MetaSchedule)" if tuned else "**untuned**"])
    s.blocks.append(Table(["Condition", "Value"], rows, align="ll"))
    rows = []
    for r in run.models():
        lat = r.get("latency_ms") or {}
        load = r.get("load_avg")
        rows.append([
            model_cell(r),
            f"{code(r.get('backend'))}, " + ("estimated" if r.get("estimated") else
                                             "measured, untuned" if r.get("tuned") is False else "measured"),
            f"{lat.get('repeats')} / {lat.get('warmup')}", fmt_int(lat.get("remeasured")),
            fmt_pct(100 * float(lat["cv"])) if _num(lat.get("cv")) is not None else DASH,
            "**yes**" if lat.get("noisy") else "no", fmt_ms(lat.get("cpu_median")),
            " / ".join(f"{float(x):.2f}" for x in load) if load else DASH,
        ] + ([fmt_mb((r.get("memory_mb") or {}).get("process_peak"))] if _process_peaks(run) else []))
    # the process peak only where measured in a fresh process: the measuring process's own growth read 0 MB for most
    # models (it already held the memory), so older run folders show no such column
    peak = ["Process peak (fresh process)"] if _process_peaks(run) else []
    s.blocks.append(Table(
        ["Model", "Latency source", "Runs (timed / warm-up)", "Re-measured", "CV (std / mean)", "Noisy",
         "CPU-time median", "Host load avg (1/5/15 min)"] + peak, rows, align="llrrrlrr" + "r" * len(peak),
        caption="Per-model measurement conditions. The recommended model was re-measured from its exported file; the "
                "other Pareto models keep their trial measurement. CPU-time median = thread CPU time per run (less "
                "sensitive to other processes than wall time). Load average: the measuring host's, at measurement"))
    return s


def _process_peaks(run: RunData) -> bool:
    """Whether any model's process peak was measured in a fresh process (``memory_mb.process_peak_by``)."""
    return any((r.get("memory_mb") or {}).get("process_peak_by") for r in run.models())


def _artifact_section(run: RunData) -> Section:
    s = Section("Files to deploy")
    checks = run.file_checks
    bad = [c for c in checks if not c.ok]
    rec = run.recommended
    s.blocks.append(Text(
        "The files the search wrote, with the sizes and SHA-256 checksums recorded in `summary.json`. Each was "
        "hashed again when this report was built. `model.onnx` is what you deploy; `weights.pt` is the PyTorch "
        "state_dict of the pruned model and `model.pt` the whole pruned `torch.nn.Module` (load it with "
        "`torch.load(path, weights_only=False)`) for further training. Paths are relative to the run folder."))
    if bad:
        s.blocks.append(Text(f"{len(bad)} of {len(checks)} files do NOT match the search's record: "
                             + "; ".join(esc(c.problem()) for c in bad) + ".", "warning"))
    else:
        s.blocks.append(Text(f"All {len(checks)} files match their recorded SHA-256.", "ok"))
    status = {"ok": "ok", "missing": "**MISSING**", "mismatch": "**MISMATCH**", "outside": "**NOT IN RUN FOLDER**"}

    def row(c: FileCheck) -> list[str]:
        label = f"**{c.model} (recommended)**" if rec is not None and c.model == model_label(rec) else c.model
        return [label, esc(c.kind), code(c.path), fmt_bytes(c.bytes), code(c.sha256 or DASH), status[c.status]]

    s.blocks.append(Table(["Model", "File", "Path", "Size", "SHA-256", "Check"], [row(c) for c in checks],
                          align="lllrll"))
    if rec is not None:
        inp = rec.get("input") or {}
        s.blocks.append(Text(
            f"Load and run the recommended model with ONNX Runtime (`pip install onnxruntime numpy`). The snippet "
            f"feeds a random input of the recorded shape {code(inp.get('shape'))} and dtype {esc(inp.get('dtype'))}; "
            "replace it with real, identically pre-processed data."))
        s.blocks.append(Code(onnx_snippet(rec), "python"))
    return s


def _health_section(run: RunData) -> Section:
    from hwprune.report import plots

    s = Section("Search health")
    srch = run.summary.get("search", {})
    s.blocks.append(Text(
        "How the search went. A trial is one candidate: prune, export, measure, evaluate. Trials whose architecture "
        "(kept widths) had already been measured reuse that measurement (cached) instead of timing the same model "
        "again. Feasible = met every budget."))
    rows = [
        ["Completed trials", fmt_int(srch.get("trials_complete"))],
        ["of which reused an earlier measurement (cached)", fmt_int(srch.get("trials_cached"))],
        ["of which feasible", fmt_int(srch.get("trials_feasible"))],
        ["Failed trials", fmt_int(srch.get("trials_failed"))],
        ["Pruned (stopped early) trials", fmt_int(srch.get("trials_pruned"))],
        ["Pareto-optimal feasible models", fmt_int(len(run.pareto))],
        ["Prunable channel groups (search dimensions)", fmt_int(srch.get("knobs"))],
        ["Wall time of the whole search", fmt_s(srch.get("wall_seconds"))],
    ]
    if srch.get("board_seconds") is not None:  # runs before it was recorded have none
        rows.append(["Device time measuring (board-seconds, for the measurements of this run)",
                     f"{fmt_s(srch['board_seconds'])} for {fmt_int(srch.get('measurements'))} measurements"])
    screen = srch.get("screen")
    if screen:  # --screen on: what the predictor spared the device, and how far it is to be trusted on this model
        own = (f"; on this search's candidates it measured {screen['study_ratio']:.2f}x the prediction, p90 error "
               f"{screen['study_p90_error']:.0%}" if screen.get("study_p90_error") is not None else "")
        held = (f" (p90 error {screen['held_out_p90_error']:.0%} on {screen['held_out_models']} held-out models)"
                if screen.get("held_out_p90_error") is not None else "")
        by = (f"Screened by the {screen['stand_in']} latency predictor, standing in for this device's"
              if screen.get("stand_in") else "Screened by the fitted latency predictor")
        rows.append([by + held,
                     f"{fmt_int(screen.get('skipped'))} of {fmt_int(screen.get('predicted'))} candidates skipped "
                     f"unmeasured (predicted over the latency budget), {fmt_int(screen.get('alone', 0))} judged on "
                     f"one measurement alone and {fmt_int(screen.get('one_round'))} on one round beside the dense "
                     f"model (predicted and measured well inside it, or clearly slower than a measured trial at "
                     f"least as accurate: {fmt_int(screen.get('dominated', 0))} such; or under the accuracy "
                     f"guard with enough more accurate models ahead of it that it could not be listed: "
                     f"{fmt_int(screen.get('under_guard', 0))} such){own}"])
    if srch.get("interrupted"):
        rows.append(["Interrupted", "**yes**"])
    s.blocks.append(Table(["Trials", "Count"], rows))
    failures = srch.get("failures") or []
    if failures:
        s.blocks.append(Table(["Failed trial", "Reason"], [[str(f.get("trial")), esc(f.get("reason"))]
                                                           for f in failures], align="rl",
                              caption="Why trials failed"))
    stages = srch.get("stage_seconds") or {}
    if stages:
        s.blocks.append(Table(["Stage", "Seconds", "What it is"],
                              [[code(k), fmt_s(v), STAGES.get(k, DASH)] for k, v in stages.items()], align="lrl",
                              caption="Time spent per stage, summed over all trials (stages marked 'part of measure' "
                                      "are included in measure)"))
    hv = srch.get("hypervolume") or []
    png = plots.hypervolume_plot(hv)
    if png:
        s.blocks.append(Figure(
            "hypervolume", png, "Hypervolume over trials",
            f"Hypervolume of the feasible front after each completed trial (last: {sig(hv[-1][1], 4)}): the volume of "
            f"objective space the front dominates, with {run.metric}, latency and memory normalised by the dense "
            "model's. It rises when a trial improves the front; a long flat tail means more trials are unlikely to "
            "help."))
    table = _trials_table(run)
    if table is not None:
        s.blocks.append(table)
    return s


def _trials_table(run: RunData) -> Table | None:
    """Every trial with its state, figures and notes (None when the run has no trials table)."""
    df = run.trials
    if not len(df):
        return None
    pareto_trials = {m["trial"] for m in run.pareto}
    rec_trial = run.summary.get("recommended")
    rows, classes = [], []
    for _, t in df.iterrows():
        n = int(t["trial"])
        notes = []
        if n == rec_trial:
            notes.append("**recommended**")
        elif n in pareto_trials:
            notes.append("Pareto front")
        if _num(t.get("cached_from")) == -1:
            notes.append("no channel removed: the dense model, with its measurement")
        elif _num(t.get("cached_from")) is not None:
            notes.append(f"reused trial {int(t['cached_from'])}'s measurement")
        if t.get("fail_reason"):
            notes.append(f"failed: {esc(t['fail_reason'])}")
        done = t["state"] == "COMPLETE"
        rows.append([str(n), esc(t["state"]).lower(), fmt_metric(t["accuracy"]) if done else DASH,
                     fmt_ms(t[JUDGED_COLUMN]) if done else DASH, fmt_ms(t["latency_ms"]) if done else DASH,
                     fmt_mb(t["memory_mb"]) if done else DASH,
                     ("yes" if t["feasible"] else "no") if done else DASH, fmt_s(t.get("duration_s")),
                     "; ".join(notes)])
        classes.append("recommended" if n == rec_trial else "" if done and t["feasible"] else "faded")
    est = " (estimated)" if run.summary.get("measurement", {}).get("estimated") else ""
    return Table(
        ["Trial", "State", f"{run.metric} (proxy)", f"Latency{est}", "Own median", "Memory", "Feasible", "Duration",
         "Notes"], rows, align="rlrrrrlrl", row_classes=classes,
        caption=f"Every trial, from {run.trials_source}. Latency (as the budget judged it) and {run.metric} are the "
                "trial's own measurements (the recommended model was re-measured and fine-tuned afterwards)")


def report_document(run: RunData) -> Document:
    """The deployment report of a loaded run folder."""
    req = run.request
    # the answer first: whoever ships the model reads the summary, the tables and the files; the rest is evidence
    sections = [_summary_section(run), _answer_section(run), _artifact_section(run), _widths_section(run),
                _node_section(run), _request_section(run), _measurement_section(run), _health_section(run)]
    from hwprune import __version__

    return Document(
        title=f"Deployment report: {esc(req.get('model'))} on {esc(req.get('device'))}",
        subtitle=(f"Study {code(run.name)}, hwprune {esc(run.summary.get('hwprune_version'))}, search finished "
                  f"{esc(run.summary.get('created') or DASH)}. Every number below comes from this run folder "
                  "(`summary.json`, `trials.csv`, per-node profiles)."),
        sections=[s for s in sections if s is not None],
        footer=(f"Built by hwprune {__version__} from the run folder alone; rebuild it any time with "
                "`hwprune report RUN_FOLDER`."),
    )
