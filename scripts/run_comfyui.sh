#!/usr/bin/env bash
# Quick start: set up ComfyUI with this pack and run it in the foreground (Ctrl-C stops it).
#
#   bash scripts/run_comfyui.sh [more ComfyUI arguments]
#       e.g. --extra-model-paths-config ~/my_model_paths.yaml   to use model folders you already have
#
# With your own ComfyUI:  COMFYUI_DIR=/path/to/ComfyUI [COMFYUI_PYTHON=/path/to/its/python] bash scripts/run_comfyui.sh
#   links this folder into its custom_nodes as comfyui-pid, installs requirements.txt into its
#   python if something is missing, copies workflows/*.json into its workflow browser, starts it.
# Without COMFYUI_DIR: runs scripts/setup_env.sh (local ComfyUI 0.3.75 in .comfyui/, Python in
#   .venv/) and starts it with its models, outputs and settings in COMFYUI_BASE (default .comfyui/base/).
#
# Environment: PORT (default 8188), LISTEN (default 127.0.0.1; 0.0.0.0 exposes it to your network).
# --cpu is added when the python has no CUDA, ROCm, MPS or XPU device.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PACK_DIR_NAME=comfyui-pid
PORT=${PORT:-8188}
LISTEN=${LISTEN:-127.0.0.1}
# Model folders created up front, with what goes in each (printed at start).
MODEL_FOLDERS=(
  "pid|PiD decoder checkpoints (.pth, .safetensors)"
  "pid/rae|one folder per RAE (encoder, decoder, statistics) for the DINOv2 and SigLIP checkpoints"
  "vae|the VAE of your diffusion model (also used by PiD Encode Image)"
  "diffusion_models|diffusion models: Flux, Z-Image, SD3, Flux.2, Qwen-Image"
  "checkpoints|all-in-one checkpoints (SDXL)"
  "text_encoders|text encoders: T5-XXL, CLIP, Qwen, and Gemma-2-2B-it for PiD captions"
)

say() { printf '[run_comfyui] %s\n' "$*"; }
die() { printf '[run_comfyui] ERROR: %s\n' "$*" >&2; exit 1; }

# Link this checkout into <custom_nodes>/comfyui-pid, refusing to replace anything that is not ours.
link_pack() {
  local custom_nodes=$1 link="$1/$PACK_DIR_NAME"
  mkdir -p "$custom_nodes"
  if [ -e "$link" ] && [ ! -L "$link" ]; then
    [ "$(cd "$link" && pwd -P)" = "$(cd "$ROOT" && pwd -P)" ] && return 0
    die "$link already exists and is not this checkout ($ROOT); move it away first"
  fi
  ln -sfn "$ROOT" "$link"
}

# Copy workflows/*.json into the workflow browser; a copy the user changed since is left alone.
copy_workflows() {
  local dest=$1 wf n=0
  mkdir -p "$dest"
  for wf in "$ROOT"/workflows/*.json; do
    [ -f "$wf" ] || continue
    if [ ! -e "$dest/$(basename "$wf")" ] || [ "$wf" -nt "$dest/$(basename "$wf")" ]; then
      cp -p "$wf" "$dest/" && n=$((n + 1))
    fi
  done
  say "workflows: $n updated in $dest"
}

make_model_folders() {
  local models=$1 entry
  for entry in "${MODEL_FOLDERS[@]}"; do mkdir -p "$models/${entry%%|*}"; done
}

print_model_folders() {
  local models=$1 entry
  say "model files go in $models/ (download links: README.md):"
  for entry in "${MODEL_FOLDERS[@]}"; do
    printf '    %-18s %s\n' "${entry%%|*}/" "${entry#*|}"
  done
}

# Prints --cpu when torch in "$1" sees no accelerator.
cpu_flag() {
  "$1" - <<'EOF'
import torch
accelerated = torch.cuda.is_available()  # also true for ROCm builds
accelerated |= getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
accelerated |= hasattr(torch, "xpu") and torch.xpu.is_available()
print("" if accelerated else "--cpu")
EOF
}

# Installs requirements.txt into "$1" when one of its distributions is missing (never upgrades).
ensure_requirements() {
  local missing
  missing=$("$1" - "$ROOT/requirements.txt" <<'EOF'
import re, sys
from importlib import metadata
for line in open(sys.argv[1]):
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line.split("#")[0])
    if name:
        try:
            metadata.distribution(name.group(1))
        except metadata.PackageNotFoundError:
            print(name.group(1))
EOF
  )
  if [ -n "$missing" ]; then
    say "installing the pack's requirements (missing: ${missing//$'\n'/ })"
    "$1" -m pip install -r "$ROOT/requirements.txt"
  fi
}

if [ -n "${COMFYUI_DIR:-}" ]; then
  COMFY=$(cd "$COMFYUI_DIR" 2>/dev/null && pwd) || die "COMFYUI_DIR=$COMFYUI_DIR is not a folder"
  [ -f "$COMFY/main.py" ] || die "$COMFY has no main.py; point COMFYUI_DIR at the ComfyUI folder itself"
  PY=${COMFYUI_PYTHON:-}
  if [ -z "$PY" ]; then
    for candidate in "$COMFY/.venv/bin/python" "$COMFY/venv/bin/python" "$(command -v python3 || true)"; do
      if [ -n "$candidate" ] && [ -x "$candidate" ]; then PY=$candidate; break; fi
    done
  fi
  if [ -z "$PY" ] || ! "$PY" -c 'import torch' 2>/dev/null; then
    die "no python with torch found for $COMFY; set COMFYUI_PYTHON to the python that runs your ComfyUI"
  fi
  say "ComfyUI in $COMFY, python $PY"
  link_pack "$COMFY/custom_nodes"
  ensure_requirements "$PY"
  make_model_folders "$COMFY/models"
  copy_workflows "$COMFY/user/default/workflows"
  ARGS=(--listen "$LISTEN" --port "$PORT")
  MODELS="$COMFY/models"
else
  bash "$ROOT/scripts/setup_env.sh"
  COMFY="$ROOT/.comfyui/ComfyUI"
  BASE=${COMFYUI_BASE:-$ROOT/.comfyui/base}
  mkdir -p "$BASE" && BASE=$(cd "$BASE" && pwd)  # absolute: ComfyUI runs from its own folder
  PY="$ROOT/.venv/bin/python"
  link_pack "$BASE/custom_nodes"
  make_model_folders "$BASE/models"
  mkdir -p "$BASE"/{input,output,temp,user/default}
  copy_workflows "$BASE/user/default/workflows"
  # Skip the templates dialog a new user gets on first load; any other setting stays the user's.
  settings="$BASE/user/default/comfy.settings.json"
  [ -f "$settings" ] || echo '{"Comfy.TutorialCompleted": true}' >"$settings"
  ARGS=(--listen "$LISTEN" --port "$PORT" --base-directory "$BASE"
    --database-url "sqlite:///$BASE/user/comfyui.db" --disable-auto-launch)
  MODELS="$BASE/models"
fi

cpu=$(cpu_flag "$PY")
if [ -n "$cpu" ]; then
  ARGS+=("$cpu")
  say "no GPU visible to torch: running on the CPU (slow, but it works)"
fi
print_model_folders "$MODELS"
say "starting ComfyUI on http://$LISTEN:$PORT  (Ctrl-C stops it)"
cd "$COMFY"
exec "$PY" main.py "${ARGS[@]}" "$@"
