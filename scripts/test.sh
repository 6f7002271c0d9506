#!/usr/bin/env bash
# The test command: installs what the tests need, then runs the default (not slow) test suite.
#   bash scripts/test.sh            default suite (under 15 minutes on 2 cores)
#   bash scripts/test.sh -m slow    the slow tests too (full searches, TVM tuning); any pytest arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system-deps.sh
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
