"""Model folders: ``models/pid`` for PiD checkpoints and ``models/pid/rae/<name>/`` for RAEs, registered by
merging with what the user configured."""

from __future__ import annotations

import os

import folder_paths

PID_FOLDER = "pid"
PID_EXTENSIONS = {".pth", ".safetensors"}
# Comfy-Org repacks for ComfyUI core live with the diffusion models; list those whose name says PiD.
REPACK_FOLDER = "diffusion_models"
RAE_SUBFOLDER = "rae"  # one folder per RAE inside it, holding its encoder, decoder and statistics
RAE_FILE_SUFFIXES = (".safetensors", ".pt", ".pth")


def register_folders() -> None:
    """Add ``models/pid`` next to any paths ``extra_model_paths.yaml`` already set for it, never replacing them."""
    default = os.path.join(folder_paths.models_dir, PID_FOLDER)
    paths, extensions = folder_paths.folder_names_and_paths.get(PID_FOLDER, ([], set()))
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[PID_FOLDER] = (paths, set(extensions) | PID_EXTENSIONS)


def _in_rae_folder(name: str) -> bool:
    return name.replace("\\", "/").split("/", 1)[0] == RAE_SUBFOLDER


def checkpoint_names() -> list[str]:
    names = [n for n in folder_paths.get_filename_list(PID_FOLDER) if not _in_rae_folder(n)]
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


def _rae_folders() -> dict[str, str]:
    found: dict[str, str] = {}
    for base in folder_paths.get_folder_paths(PID_FOLDER):
        root = os.path.join(base, RAE_SUBFOLDER)
        if os.path.isdir(root):
            for name in sorted(os.listdir(root)):
                if os.path.isdir(os.path.join(root, name)):
                    found.setdefault(name, os.path.join(root, name))
    return found


def rae_names() -> list[str]:
    return sorted(_rae_folders())


def rae_parts(name: str) -> list[str]:
    """The folders that hold an RAE's files: ``models/pid/rae/<name>/`` and its subfolders with weight files
    (e.g. the Hugging Face encoder folder dropped in as downloaded)."""
    folder = _rae_folders().get(name)
    if folder is None:
        raise FileNotFoundError(
            f"RAE folder {name!r} not found in models/{PID_FOLDER}/{RAE_SUBFOLDER}/; put the RAE's files in a folder "
            "there (see the pack's README) and refresh."
        )
    candidates = [folder] + [os.path.join(folder, d) for d in sorted(os.listdir(folder))]
    parts = [d for d in candidates if os.path.isdir(d) and any(f.endswith(RAE_FILE_SUFFIXES) for f in os.listdir(d))]
    if not parts:
        raise FileNotFoundError(
            f"The RAE folder {folder} holds no .safetensors or .pt file; put the RAE's encoder, decoder and (DINOv2) "
            "statistics there (see the pack's README)."
        )
    return parts
