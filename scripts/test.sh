#!/usr/bin/env bash
# The test command: set up (or update) the local environment, then run pytest in it.
#   bash scripts/test.sh                      # the default suite, then the kernel matrix
#   bash scripts/test.sh tests/comfy -x -q    # any pytest arguments (no kernel matrix)
#
# The kernel matrix reruns the numeric tests of tests/core (parity, teacher, RAE and Gemma parity, sampler,
# memory, tiling, runtime: tiny networks, seconds each) under other CPU kernels than this machine's own:
# ATen's AVX2 and plain (default) kernels, and one thread. A comparison bound that holds only on the CPU that
# made the golden data fails here on any x86 machine. PID_KERNEL_MATRIX=0 skips it.
#
# The exit code is pytest's (5 means no test was collected, and is not turned into a success); with the
# matrix, the first failing run's.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup_env.sh"
bash "$ROOT/scripts/setup_frontend.sh"   # chromium + playwright-core (.frontend/) for tests/workflows
cd "$ROOT"
PYTEST=("$ROOT/.venv/bin/python" -m pytest)
if [ $# -gt 0 ] || [ "${PID_KERNEL_MATRIX:-1}" = 0 ]; then
  exec "${PYTEST[@]}" "$@"
fi

NUMERIC_TESTS=(tests/core/test_parity.py tests/core/test_teacher.py tests/core/test_rae_parity.py
               tests/core/test_gemma.py tests/core/test_sampler.py tests/core/test_memory.py
               tests/core/test_tiling.py tests/core/test_runtime.py)
KERNEL_SETTINGS=("ATEN_CPU_CAPABILITY=default" "ATEN_CPU_CAPABILITY=avx2" "OMP_NUM_THREADS=1")
status=0
"${PYTEST[@]}" || status=$?
for setting in "${KERNEL_SETTINGS[@]}"; do
  echo "[kernel matrix] $setting"
  env "$setting" "${PYTEST[@]}" -q "${NUMERIC_TESTS[@]}" || { rc=$?; [ "$status" != 0 ] || status=$rc; }
done
exit "$status"
