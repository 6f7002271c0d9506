#!/usr/bin/env bash
# The test command: installs what the tests need, then runs the default (not slow) test suite.
#   bash scripts/test.sh            default suite (under 15 minutes on 2 cores)
#   bash scripts/test.sh -m slow    only the slow tests (TVM tuning); -m 'slow or not slow' for all; any pytest
#                                   arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system-deps.sh
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
