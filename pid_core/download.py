"""Downloads from the Hugging Face hub: official PiD checkpoints and the Gemma-2-2B-it caption encoder.

Files are saved under self-describing names inside the caller's models folder, where the pack looks:
- ``pid/<experiment>/model_ema_bf16.pth`` (the official folder name is kept: it tells which latent space and
  training resolution a 16-channel checkpoint is for);
- ``text_encoders/gemma_2_2b_it_elm_bf16.safetensors`` (Comfy-Org's repack of Efficient-Large-Model/gemma-2-2b-it,
  the Gemma PiD was trained with, tokenizer embedded; safetensors, so nothing is unpickled).
huggingface_hub does the transfer (resumable, ``HF_TOKEN`` honoured, ``HF_HUB_OFFLINE`` respected). A download
goes to a hidden staging folder beside its destination and is moved into place only when complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .config import RELEASED_CHECKPOINTS, LatentSpace, ReleasedCheckpoint

PID_REPO = "nvidia/PiD"
PID_FILE = "model_ema_bf16.pth"
PID_LICENCE = "NVIDIA's non-commercial research licence"
GEMMA_REPO = "Comfy-Org/PixelDiT"
GEMMA_FILES = {
    "bf16": "text_encoders/gemma_2_2b_it_elm_bf16.safetensors",  # 5.2 GB, the reference's precision
    "fp8_scaled": "text_encoders/gemma_2_2b_it_elm_fp8_scaled.safetensors",  # half the download, dequantized on load
}
GEMMA_LICENCE = "the Gemma terms of use, https://ai.google.dev/gemma/terms"
TRAININGS = ("2k", "2kto4k")
_STAGING = ".pid_download"


def released_checkpoint(
    space: LatentSpace | str, training: str | None = None, distilled: bool = True
) -> ReleasedCheckpoint:
    """The current official checkpoint for a latent space and training resolution (legacy files are skipped);
    ``training`` may be left out when the space has only one. ``distilled=False`` asks for the undistilled
    teacher (released for flux, flux2 and qwenimage, 2kto4k)."""
    space = LatentSpace.parse(space)
    if training is not None and training not in TRAININGS:
        raise ValueError(f"Unknown training resolution {training!r}; choose one of: {', '.join(TRAININGS)}.")
    matches = [c for c in RELEASED_CHECKPOINTS if space in c.spaces and not c.legacy and c.distilled == distilled]
    if not matches:
        kind = "" if distilled else "undistilled "
        raise ValueError(f"NVIDIA released no {kind}PiD checkpoint for {space.value} latents.")
    chosen = [c for c in matches if training in (None, c.training)]
    if len(chosen) != 1:
        options = " or ".join(c.training for c in matches)
        raise ValueError(
            f"PiD for {space.value} latents was released for {options} training resolution"
            f"{'' if training is None else f', not {training}'}; choose the training resolution ({options})."
        )
    return chosen[0]


def pid_destination(models_dir: str | Path, checkpoint: ReleasedCheckpoint) -> Path:
    return Path(models_dir) / "pid" / checkpoint.experiment / PID_FILE


def gemma_destination(models_dir: str | Path, variant: str = "bf16") -> Path:
    return Path(models_dir) / "text_encoders" / Path(_gemma_file(variant)).name


def _gemma_file(variant: str) -> str:
    if variant not in GEMMA_FILES:
        raise ValueError(f"Unknown Gemma variant {variant!r}; choose one of: {', '.join(GEMMA_FILES)}.")
    return GEMMA_FILES[variant]


def download_pid(
    space: LatentSpace | str, training: str | None, models_dir: str | Path, distilled: bool = True
) -> Path:
    """The official PiD checkpoint for (space, training) at ``models_dir/pid/<experiment>/model_ema_bf16.pth``,
    downloaded from nvidia/PiD unless it is already there (``distilled=False``: the undistilled teacher). Returns
    its path."""
    checkpoint = released_checkpoint(space, training, distilled)
    filename = f"checkpoints/{checkpoint.experiment}/{PID_FILE}"
    return fetch(PID_REPO, filename, pid_destination(models_dir, checkpoint), PID_LICENCE)


def download_gemma(models_dir: str | Path, variant: str = "bf16") -> Path:
    """Gemma-2-2B-it (Comfy-Org's repack) at ``models_dir/text_encoders/gemma_2_2b_it_elm_<variant>.safetensors``,
    downloaded unless it is already there. Returns its path."""
    return fetch(GEMMA_REPO, _gemma_file(variant), gemma_destination(models_dir, variant), GEMMA_LICENCE)


def fetch(repo: str, filename: str, destination: str | Path, licence: str) -> Path:
    """``filename`` of hub repository ``repo`` saved at ``destination`` (kept if present). Any hub failure
    (gated, offline, missing) becomes one ValueError sentence naming the file, its licence page and where
    to put it by hand."""
    destination = Path(destination)
    if destination.is_file():
        return destination
    page = f"https://huggingface.co/{repo}"
    try:
        import huggingface_hub
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise ValueError(
            f"Downloading needs the huggingface_hub package (pip install huggingface_hub); or download {filename} "
            f"from {page} by hand and put it at {destination}."
        ) from None
    staging = destination.parent / _STAGING
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        # looked up at call time, so tests can stand in a local fake hub
        downloaded = Path(huggingface_hub.hf_hub_download(repo_id=repo, filename=filename, local_dir=staging))
        os.replace(downloaded, destination)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        raise ValueError(
            f"Could not download {filename} from {repo} ({_reason(err)}); the file and its licence ({licence}) are at "
            f"{page}: accept the licence there and set HF_TOKEN, or download the file by hand and put it at {destination}."
        ) from None
    shutil.rmtree(staging, ignore_errors=True)  # only the hub's bookkeeping is left in it
    return destination


def _reason(err: Exception) -> str:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    if isinstance(err, GatedRepoError):
        return "the repository is gated and this account has not accepted its licence"
    if isinstance(err, RepositoryNotFoundError):
        return "the repository was not found, or it needs a login"
    if isinstance(err, LocalEntryNotFoundError):
        return "the hub could not be reached: offline, or HF_HUB_OFFLINE is set"
    if isinstance(err, EntryNotFoundError):
        return "the file is not in the repository"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, HfHubHTTPError) and status in (401, 403):
        return f"access denied (HTTP {status})"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


__all__ = [
    "GEMMA_FILES",
    "GEMMA_REPO",
    "PID_REPO",
    "download_gemma",
    "download_pid",
    "fetch",
    "gemma_destination",
    "pid_destination",
    "released_checkpoint",
]
