#!/usr/bin/env bash
# Install hwprune into ./.venv (created if missing). Safe to re-run.
#   HWPRUNE_EXTRAS=dev  (default) also installs TVM, SSH, PostgreSQL, MLflow, optuna-dashboard and test extras;
#   "" for the core only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# --no-compile: pip byte-compiles every file of torch, TVM and the rest, which took half of this script's time (134 s
# against 68 s on a 2-core host); Python compiles the modules actually imported on first use instead (+6 s, once).
# torch first and pinned: the 2.13.0 CPU wheel; an unpinned torch would pull several GB of CUDA packages
.venv/bin/python -m pip install -q --no-compile "torch==2.13.0"
extras=${HWPRUNE_EXTRAS-dev}
.venv/bin/python -m pip install -q --no-compile -e ".${extras:+[$extras]}"
# Where the environment forbids writing bytecode (PYTHONDONTWRITEBYTECODE, set on some CI hosts) nothing would ever be
# compiled, and every process would compile torch and the rest again (the test suite took 916 s against 642 s). So
# compile, once, what a search and the tests import, by importing it with bytecode writing on. (Elsewhere the first
# process to import a module compiles it anyway: nothing to do here.)
[ -z "${PYTHONDONTWRITEBYTECODE:-}" ] || env -u PYTHONDONTWRITEBYTECODE .venv/bin/python - <<'EOF' || true
import importlib
for name in ("hwprune.cli", "hwprune.study.run", "hwprune.export", "hwprune.report", "hwprune.nightly",
             "hwprune.backends.ort", "hwprune.backends.tvm", "hwprune.backends.ssh", "torch._dynamo", "torch.export",
             "torch.onnx._internal.exporter._core", "onnxscript", "tvm.relax", "tvm.exec.rpc_server",
             "tvm.exec.rpc_tracker", "pytest", "mlflow", "optuna_integration.mlflow", "optuna_dashboard"):
    try:
        importlib.import_module(name)
    except Exception:  # optional extras not installed (HWPRUNE_EXTRAS=""): compiled on first use, if ever
        pass
EOF
echo "hwprune installed in $(pwd)/.venv ($(.venv/bin/hwprune --version 2>/dev/null || echo ok))" >&2
