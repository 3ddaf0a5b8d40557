#!/usr/bin/env bash
# What the workflow tests (tests/workflows) need to drive the real ComfyUI frontend headless:
#   chromium         Debian's package (apt-get), when no chromium is on PATH (or PID_CHROMIUM names one)
#   playwright-core  from npm, into .frontend/ (gitignored), used by tests/workflows/frontend.js
# Safe to re-run: what is already there is skipped, so a run with nothing to do is instant. Needs no
# input (CI-safe); installing chromium needs root or password-less sudo.
#
# Environment: PID_CHROMIUM   a chromium/chrome binary to use instead of apt's (tests read it too)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FRONTEND="$ROOT/.frontend"
PLAYWRIGHT_VERSION=1.65.1  # any 1.4x+ works; pinned so that every run drives the browser the same way

T0=$SECONDS
step() { printf '[frontend +%3ds] %s\n' $((SECONDS - T0)) "$*"; }
die() { printf '[frontend] ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then
    "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo -n "$@"
  else
    die "installing $* needs root: run as root, allow password-less sudo, or install it yourself"
  fi
}

# Quiet unless it fails: then its whole output is shown.
quietly() {
  local log
  log=$(mktemp)
  if ! "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    die "failed: $*"
  fi
  rm -f "$log"
}

apt_install() {
  command -v apt-get >/dev/null || die "no apt-get: install $* with your system's package manager"
  step "apt-get install $*"
  # Waits for another apt/dpkg run to finish instead of failing on its lock.
  local wait_lock=(-o DPkg::Lock::Timeout=300)
  quietly as_root env DEBIAN_FRONTEND=noninteractive apt-get "${wait_lock[@]}" update -q
  quietly as_root env DEBIAN_FRONTEND=noninteractive apt-get "${wait_lock[@]}" install -y -q --no-install-recommends "$@"
}

# --- chromium -------------------------------------------------------------------------------------
if [ -n "${PID_CHROMIUM:-}" ]; then
  [ -x "$PID_CHROMIUM" ] || die "PID_CHROMIUM=$PID_CHROMIUM is not an executable"
  step "chromium: $PID_CHROMIUM (PID_CHROMIUM)"
elif command -v chromium >/dev/null; then
  step "chromium is installed ($(command -v chromium))"
else
  apt_install chromium
  command -v chromium >/dev/null || die "apt-get installed chromium, but no chromium is on PATH"
fi

# --- node, npm and playwright-core ----------------------------------------------------------------
command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
installed=$(node -p "require('$FRONTEND/node_modules/playwright-core/package.json').version" 2>/dev/null || true)
if [ "$installed" = "$PLAYWRIGHT_VERSION" ]; then
  step "playwright-core $PLAYWRIGHT_VERSION is in .frontend/"
else
  step "npm install playwright-core@$PLAYWRIGHT_VERSION into .frontend/"
  mkdir -p "$FRONTEND"
  # A package.json of its own keeps npm from walking up into any project above this checkout.
  [ -f "$FRONTEND/package.json" ] || echo '{"name": "pid-frontend-tests", "private": true}' >"$FRONTEND/package.json"
  quietly npm install --prefix "$FRONTEND" --no-audit --no-fund --loglevel=error --save-exact \
    "playwright-core@$PLAYWRIGHT_VERSION"
fi
step "done"
