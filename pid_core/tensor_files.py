"""Files the command line reads and writes: latents, caption embeddings, pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoint import damaged_file

COMFY_LATENT_KEY = "latent_tensor"  # what ComfyUI's SaveLatent writes (a .latent is a safetensors file)


def _single_tensor(path: str | Path, preferred: str, what: str) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} file not found: {path}.")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError):
        raise ValueError(damaged_file(path.name, "safetensors/.latent")) from None
    if preferred in tensors:
        return tensors[preferred]
    candidates = {k: v for k, v in tensors.items() if v.ndim >= 2}
    if len(candidates) != 1:
        raise ValueError(
            f"{path.name} holds {len(candidates)} tensors ({', '.join(sorted(tensors)) or 'none'}); "
            f"expected a '{preferred}' tensor or exactly one tensor."
        )
    return next(iter(candidates.values()))


def read_latent_file(path: str | Path) -> torch.Tensor:
    """A ComfyUI ``.latent`` (key ``latent_tensor``) or a safetensors file with one tensor, in ComfyUI's convention."""
    return _single_tensor(path, COMFY_LATENT_KEY, "Latent")


def read_caption_file(path: str | Path) -> torch.Tensor:
    """A caption embedding [B, 300, D] (key ``caption`` or the only tensor)."""
    return _single_tensor(path, "caption", "Caption embedding")


def write_image(image: torch.Tensor, out: str | Path) -> list[Path]:
    """Write an image [B, 3, H, W] in [-1, 1]: ``.png`` as 8-bit pictures (one file per batch item, numbered
    when B > 1), ``.safetensors`` as the float tensor under the key ``image``. Returns the paths written."""
    out = Path(out)
    if out.suffix == ".safetensors":
        save_file({"image": image.float().contiguous()}, str(out))
        return [out]
    if out.suffix != ".png":
        raise ValueError(f"Unsupported output {out.name}: use a .png or .safetensors file name.")
    pixels = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    paths = [out] if len(pixels) == 1 else [out.with_name(f"{out.stem}_{i:02d}.png") for i in range(len(pixels))]
    for path, picture in zip(paths, pixels):
        Image.fromarray(np.ascontiguousarray(picture)).save(path)
    return paths
