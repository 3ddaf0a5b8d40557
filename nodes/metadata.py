"""PiD metadata carried inside a LATENT dict: the PiD sigma of each item, the latent space, and a fingerprint.

Stock nodes copy unknown keys of a LATENT (``out = latent.copy()``), so metadata may outlive the tensor
it described: a later KSampler, an upscale or a batch node replaces ``samples`` but keeps our keys. The
fingerprint of the tensor tells the two apart; metadata whose fingerprint no longer matches is ignored.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

SIGMA_KEY = "pid_sigma"
SPACE_KEY = "pid_space"
FINGERPRINT_KEY = "pid_fingerprint"
CROP_KEY = "pid_crop"  # PiD Encode Image: where the encoded picture was cut from its source


def fingerprint(samples: torch.Tensor) -> str:
    """A hash of the tensor's shape and bytes (latents are small: 1 MB for a 1024 px Flux latent)."""
    data = samples.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.blake2b(str(tuple(data.shape)).encode(), digest_size=16)
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def tag(latent: dict, sigmas: list[float], space: str) -> dict:
    """A copy of ``latent`` carrying PiD metadata for its current ``samples`` (inputs are never mutated)."""
    out = latent.copy()
    out[SIGMA_KEY] = [float(s) for s in sigmas]
    out[SPACE_KEY] = space
    out[FINGERPRINT_KEY] = fingerprint(latent["samples"])
    return out


@dataclass(frozen=True)
class Metadata:
    sigmas: list[float]
    space: str


def read(latent: dict) -> tuple[Metadata | None, str | None]:
    """(metadata, None) when valid; (None, reason) when present but stale; (None, None) when absent."""
    if FINGERPRINT_KEY not in latent:
        return None, None
    if latent[FINGERPRINT_KEY] != fingerprint(latent["samples"]):
        return None, (
            "the latent was changed after PiD tagged it (sampled further, upscaled or re-batched), so its PiD "
            "sigma no longer applies"
        )
    return Metadata(list(latent[SIGMA_KEY]), latent[SPACE_KEY]), None
