#!/usr/bin/env bash
# The test command: set up (or update) the local environment, then run pytest in it.
#   bash scripts/test.sh                      # the default suite
#   bash scripts/test.sh tests/comfy -x -q    # any pytest arguments
# The exit code is pytest's (5 means no test was collected, and is not turned into a success).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup_env.sh"
bash "$ROOT/scripts/setup_frontend.sh"   # chromium + playwright-core (.frontend/) for tests/workflows
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
