"""Model folders: ``models/pid`` for PiD checkpoints, registered by merging with what the user configured."""

from __future__ import annotations

import os

import folder_paths

PID_FOLDER = "pid"
PID_EXTENSIONS = {".pth", ".safetensors"}
# Comfy-Org repacks for ComfyUI core live with the diffusion models; list those whose name says PiD.
REPACK_FOLDER = "diffusion_models"


def register_folders() -> None:
    """Add ``models/pid`` next to any paths ``extra_model_paths.yaml`` already set for it, never replacing them."""
    default = os.path.join(folder_paths.models_dir, PID_FOLDER)
    paths, extensions = folder_paths.folder_names_and_paths.get(PID_FOLDER, ([], set()))
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[PID_FOLDER] = (paths, set(extensions) | PID_EXTENSIONS)


def checkpoint_names() -> list[str]:
    names = folder_paths.get_filename_list(PID_FOLDER)
    repacks = [n for n in folder_paths.get_filename_list(REPACK_FOLDER) if "pid" in os.path.basename(n).lower()]
    return sorted(set(names) | set(repacks))


def checkpoint_path(name: str) -> str:
    path = folder_paths.get_full_path(PID_FOLDER, name) or folder_paths.get_full_path(REPACK_FOLDER, name)
    if path is None:
        raise FileNotFoundError(
            f"PiD checkpoint {name!r} not found in models/{PID_FOLDER} or models/{REPACK_FOLDER}; "
            "put the file there (see the pack's README) and refresh."
        )
    return path
