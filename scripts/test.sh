#!/usr/bin/env bash
# The test command: installs what the tests need, then runs the default (not slow) test suite.
#   bash scripts/test.sh            default suite (under 15 minutes on 2 cores)
#   bash scripts/test.sh -m slow    only the slow tests (TVM tuning); -m 'slow or not slow' for all; any pytest
#                                   arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system-deps.sh
bash scripts/setup.sh
# an emulated Raspberry Pi (AArch64 python under qemu-aarch64) for tests/backends/test_cross_compile.py: built once (root,
# network), then reused; prints nothing and the test is skipped where it cannot be built. A value you set is kept.
if [ -z "${HWPRUNE_AARCH64_PYTHON:-}" ]; then
  aarch64_python=$(bash scripts/setup-aarch64-emulator.sh | tail -n 1) || aarch64_python=""
  [ -z "$aarch64_python" ] || export HWPRUNE_AARCH64_PYTHON=$aarch64_python
fi
# the tests start hundreds of Python processes: let the first one that imports a module compile it for the rest, even
# where the environment says not to write bytecode (setup.sh compiles the common imports; this catches the others)
unset PYTHONDONTWRITEBYTECODE
# lint is part of the test command: a lint error fails CI in seconds, before the slow tests
.venv/bin/ruff check hwprune tests bench
exec .venv/bin/python -m pytest "$@"
