#!/usr/bin/env bash
# The test command: set up (or update) the local environments, then run pytest in them.
#   bash scripts/test.sh                      # the default suite, the kernel matrix, then the ComfyUI 0.33 leg
#   bash scripts/test.sh tests/comfy -x -q    # any pytest arguments, against ComfyUI 0.3.75 (no matrix, no 0.33)
#   PID_COMFYUI=0.33 bash scripts/test.sh tests/comfy -x -q   # the same against ComfyUI 0.33
#
# The kernel matrix reruns the numeric tests of tests/core (parity, teacher, RAE and Gemma parity, sampler,
# memory, tiling, runtime: tiny networks, seconds each) under other CPU kernels than this machine's own:
# ATen's AVX2 and plain (default) kernels, and one thread. A comparison bound that holds only on the CPU that
# made the golden data fails here on any x86 machine. PID_KERNEL_MATRIX=0 skips it.
#
# The ComfyUI 0.33 leg reruns tests/comfy and tests/workflows in a ComfyUI 0.33 environment (current ComfyUI,
# with core's own PiD nodes). Its source comes from ../shared/comfyui/ beside this checkout (or
# PID_COMFYUI_033_SOURCE), which CI has; without it the leg is skipped with a one-line reason.
# PID_COMFYUI_033=0 skips it.
#
# The exit code is pytest's (5 means no test was collected, and is not turned into a success); with the
# matrix and the 0.33 leg, the first failing run's.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup_env.sh"
bash "$ROOT/scripts/setup_frontend.sh"   # chromium + playwright-core (.frontend/) for tests/workflows
cd "$ROOT"
PYTEST=("$ROOT/.venv/bin/python" -m pytest)
if [ "${PID_COMFYUI:-0.3.75}" != 0.3.75 ]; then
  bash "$ROOT/scripts/setup_env.sh" --comfyui "$PID_COMFYUI"
  exec "$ROOT/.venv-comfyui-0.33/bin/python" -m pytest "$@"
fi
if [ $# -gt 0 ] || { [ "${PID_KERNEL_MATRIX:-1}" = 0 ] && [ "${PID_COMFYUI_033:-1}" = 0 ]; }; then
  exec "${PYTEST[@]}" "$@"
fi

NUMERIC_TESTS=(tests/core/test_parity.py tests/core/test_teacher.py tests/core/test_rae_parity.py
               tests/core/test_gemma.py tests/core/test_sampler.py tests/core/test_memory.py
               tests/core/test_tiling.py tests/core/test_runtime.py)
KERNEL_SETTINGS=("ATEN_CPU_CAPABILITY=default" "ATEN_CPU_CAPABILITY=avx2" "OMP_NUM_THREADS=1")
status=0
"${PYTEST[@]}" || status=$?
failed() { [ "$status" != 0 ] || status=$1; }
if [ "${PID_KERNEL_MATRIX:-1}" != 0 ]; then
  for setting in "${KERNEL_SETTINGS[@]}"; do
    echo "[kernel matrix] $setting"
    env "$setting" "${PYTEST[@]}" -q "${NUMERIC_TESTS[@]}" || failed $?
  done
fi
if [ "${PID_COMFYUI_033:-1}" != 0 ]; then
  echo "[ComfyUI 0.33] tests/comfy and tests/workflows"
  setup_rc=0
  bash "$ROOT/scripts/setup_env.sh" --comfyui 0.33 || setup_rc=$?
  if [ "$setup_rc" = 3 ]; then
    echo "[ComfyUI 0.33] skipped: its source is not beside this checkout (../shared/comfyui/ComfyUI-0.33.0.tar.gz)"
  elif [ "$setup_rc" != 0 ]; then
    failed "$setup_rc"
  else
    PID_COMFYUI=0.33 "$ROOT/.venv-comfyui-0.33/bin/python" -m pytest -q tests/comfy tests/workflows || failed $?
  fi
fi
exit "$status"
