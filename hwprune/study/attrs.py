"""Keys of the user attributes hwprune stores on Optuna trials and studies (docs/run-folder.md lists them).

One name per key, so a reader and a writer cannot drift apart; the values are the strings already in every storage,
so old studies read the same.
"""

from __future__ import annotations

# -- trial user attributes --------------------------------------------------------------------------------------
WIDTHS = "widths"  # module name -> [original, kept] output channels
MACS = "macs"
PARAMS = "params"
SIGNATURE = "signature"  # architecture signature: trials with the same one share a measurement
MEASUREMENT = "measurement"  # Measurement.to_dict()
ACCURACY_PROXY = "accuracy_proxy"  # the trial's accuracy (after calibration and the short fine-tune)
MEASURE_CONTEXT = "measure_context"  # hash of what a latency depends on besides the architecture
LATENCY_RATIO = "latency_ratio"  # relative budgets: latency / the dense model's measured beside it
# relative budgets: the interleaved rounds behind latency_ratio (3+; --screen on: 1, or 0 when measured alone and
# judged against the dense reference)
LATENCY_ROUNDS = "latency_rounds"
CACHED_FROM = "cached_from"  # trial whose measurement was reused (-1: the dense model)
STAGE_SECONDS = "stage_seconds"
FAIL_REASON = "fail_reason"
FAIL_KIND = "fail_kind"  # what kind of failure (hwprune.study.failfast's kinds: shape, nan, export, other)
FAIL_STAGE = "fail_stage"  # the trial stage it failed in (prune, forward, export, measure, evaluate)
JUDGED_BY = "budgets"  # the budgets a trial's constraints were computed against
UNIFORM_RATIO = "uniform_ratio"  # warm-start and bisection trials
DEPTH_PROBE = "depth_probe"  # the block a depth probe removed
NEIGHBOUR_OF = "neighbour_of"  # the refinement's trials: the incumbent they neighbour
PRECISION = "precision"  # --quantize int8: fp32 / int8 / "mixed k/n" (INT8 weighted nodes / all), read from the file
OUTPUT_ERROR = "int8_output_error"  # the INT8 file's relative output error against the FP32 one (held-out inputs)
INT8_ANCHOR = "int8_anchor"  # the INT8-everywhere warm-start trials: their uniform ratio
GEMM_ANCHOR = "int8_gemm_anchor"  # the warm-start trial with only the Gemm/MatMul units in INT8
PRECISION_PARAM = "precision:"  # prefix of the precision parameters (one per unit: fp32 | int8)

# what a cached architecture's trial copies from the trial that measured it
CACHED_KEYS = (WIDTHS, MACS, PARAMS, SIGNATURE, MEASUREMENT, ACCURACY_PROXY, MEASURE_CONTEXT, LATENCY_RATIO,
               LATENCY_ROUNDS, PRECISION, OUTPUT_ERROR)

# -- study user attributes --------------------------------------------------------------------------------------
REQUEST = "request"  # request.json, as the search started
DENSE = "dense"  # the dense MODEL record, without files
BRACKETED = "bracketed"  # uniform ratios queued while bisecting for the budget
DEPTH_PROBED = "depth_probed"  # blocks the depth probes removed
CONFIRMED = "edge_confirmed"  # trial number -> its latency measured again
FINGERPRINT = "fingerprint"  # what the study's trials depend on (hwprune.study.identity)
FP32_LOCK = "int8_fp32_lock"  # study: why the rest of the study samples FP32 only (--quantize int8)
PRECISION_LOCKED = "precision_locked"  # trial: its precision was fixed to FP32 by that lock
SCREENED = "screened"  # trial: the predicted judged latency (ms) of a candidate --screen left unmeasured
PREDICTED = "predicted_ms"  # trial: --screen on, the judged latency (ms) predicted before it was measured
SCREEN_RATIO = "screen_ratio"  # trial: --screen on, measured / predicted judged latency (the screen's own error)
# trial: --screen on, the measured feasible trial, at least as accurate and no larger, that the candidate was predicted
# and then measured clearly slower than: settled on one measurement instead of the rounds (it cannot be on the front)
DOMINATED_BY = "dominated_by"
# trial: --screen on, settled on one measurement because it cannot be listed: its accuracy is under the guard's floor
# and, where the guard judges the final fine-tune, enough measured feasible trials are more accurate that the final
# candidates are drawn before it (hwprune.study.screening.Screening.settles_for)
UNDER_GUARD = "under_guard"
