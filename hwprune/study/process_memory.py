"""The memory a listed model really takes to run: the peak resident memory of a fresh process that loads it with
ONNX Runtime and runs it, over that process's own baseline after its imports.

Why a fresh process: the search's own process had already held the memory earlier sessions freed (the allocator
keeps it), so the resident-memory growth it saw while measuring a model read 0 MB for most models. A new process
holds nothing of the search's, so its growth is what the model costs a process that serves only it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hwprune.profiles import DeviceProfile

PEAK_FRESH_PROCESS = "fresh process"  # MemoryStats.process_peak_by: measured here, one new process per model
PEAK_TIMEOUT_S = 120.0  # a fresh process loads onnxruntime and numpy in about a second; a stuck one must not hang
PEAK_RUNS = 3  # runs after the session is created: the first run allocates the arena, later ones reuse it

# run by a fresh interpreter: argv = model path, settings JSON. Prints {"peak_mb": ..} (MB = 10^6 bytes).
_SCRIPT = r'''
import json, sys
import numpy as np
import onnxruntime as ort

def status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None

path, cfg = sys.argv[1], json.loads(sys.argv[2])
try:  # the peak so far (imports) is not the model's: start the high-water mark from here where the kernel allows
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
base = status_kb("VmRSS")
so = ort.SessionOptions()
so.intra_op_num_threads = cfg["intra"]
so.inter_op_num_threads = cfg["inter"]
so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, cfg["level"])
so.log_severity_level = 3
sess = ort.InferenceSession(path, so, providers=cfg["providers"])
types = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
         "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
         "tensor(bool)": np.bool_}
rng = np.random.default_rng(0)
feed = {}
for i in sess.get_inputs():
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
    feed[i.name] = rng.standard_normal(shape).astype(types.get(i.type, np.float32))
for _ in range(cfg["runs"]):
    sess.run(None, feed)
hwm = status_kb("VmHWM")
print(json.dumps({"peak_mb": max(0, hwm - base) * 1024 / 1e6 if hwm is not None and base is not None else None}))
'''


def fresh_process_peak_mb(onnx_path: Path, profile: DeviceProfile) -> float | None:
    """The peak resident-memory growth (MB) of a new Python process that creates ``onnx_path``'s ONNX Runtime session
    with ``profile``'s settings and runs it ``PEAK_RUNS`` times on random inputs, over its baseline after imports.

    Returns:
        The growth in MB, or None where it cannot be measured (no /proc, the process failed or timed out).
    """
    from hwprune.backends.ort import _OPT_LEVELS

    level = _OPT_LEVELS.get(profile.ort.graph_optimization_level.lower(), "ORT_ENABLE_ALL")
    cfg = {"intra": profile.ort.intra_op_threads, "inter": profile.ort.inter_op_threads, "level": level,
           "providers": list(profile.ort.providers), "runs": PEAK_RUNS}
    if not Path("/proc/self/status").is_file():
        return None
    try:
        proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(onnx_path), json.dumps(cfg)], capture_output=True,
                              text=True, timeout=PEAK_TIMEOUT_S, check=False)
        value = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"] if proc.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError, KeyError):
        return None
    return float(value) if value is not None else None
