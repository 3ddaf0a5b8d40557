"""Latent spaces: from a ComfyUI LATENT to the latent PiD's network consumes.

The contract (used by every node, the API and the CLI):

* A LATENT is what ComfyUI's samplers return: raw VAE space. For flow models (ComfyUI's CONST
  sampling: flux, sd3, flux2, qwenimage and the RAEs) ComfyUI's inverse noise scaling has divided the
  sampler state by ``(1 - sigma)``; for SDXL (EPS) the LATENT is the variance-exploding state
  ``x0 + s * eps``.
* PiD was trained on the *normalized* latent the diffusion model works in, in its own noise frame:
  flow ``(1 - sigma) * x0 + sigma * eps``, and for SDXL variance-preserving
  ``sqrt(1 - sigma^2) * x0 + sigma * eps``. Hence the network input is

  - flow: ``process_in(samples) * (1 - sigma)``
  - SDXL: ``process_in(samples) / sqrt(1 + s^2)`` with ``s`` the sampler's sigma, which equals
    ``process_in(samples) * sqrt(1 - sigma^2)`` with PiD's sigma.

* ``process_in`` is ComfyUI's latent format for the family (Flux, SD3, SDXL, Wan 2.1 for Qwen-Image).
  ComfyUI's Flux.2 LATENT is already 2x2-packed and BatchNorm-normalized (128 channels at /16), so
  its process_in is the identity; a raw 32-channel Flux.2 / Klein VAE latent is packed and normalized
  here with the VAE's BatchNorm statistics, which the caller supplies.
* The RAE spaces have no ComfyUI format: their LATENT holds what ``pid_core.rae`` encodes, which is what
  PiD was trained on as it is (identity process_in): DINOv2 [B, 768, 32, 32] normalized per position with
  the RAE statistics, SigLIP [B, 1152, 16, 16] after an affine-free LayerNorm. Both sit on a virtual /16
  grid (the encoders see 448 and 224 px) and carry noise in the flow frame, like the RAE diffusion models
  the reference captures them from (its rae_generation.py / scale_rae_generation.py).
* Every user-facing sigma is PiD's degrade sigma in [0, 1]: the flow sigma as is, for SDXL the
  variance-preserving ``s / sqrt(1 + s^2)``. The conversion lives only in
  :func:`pid_sigma_from_sampler` / :func:`sampler_sigma_from_pid`.

Inputs are never modified in place (ComfyUI caches node outputs).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import LatentSpace

FLOW = "flow"
VP = "vp"

# Degrade sigmas PiD's students were trained on: U[0, 0.8] (facts sheet §6).
MAX_TRAINED_SIGMA = 0.8

# Flux.2 VAE BatchNorm: eval mode, no affine, eps 1e-4 (facts sheet §6).
FLUX2_BN_EPS = 1e-4
FLUX2_RAW_CHANNELS = 32

SigmaLike = float | Sequence[float] | Tensor

# ComfyUI's Wan21 latent format, used by Qwen-Image (comfy/latent_formats.py).
_WAN21_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
_WAN21_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class LatentFormat:
    """How one family's ComfyUI LATENT maps to PiD's network latent.

    ``process_in(x) = (x - shift) * scale / std``, with ``shift`` and ``std`` scalar or per channel.
    """

    space: LatentSpace
    channels: int  # channels of the ComfyUI LATENT
    down: int  # image pixels per latent cell (16 for Flux.2 packed and the RAEs' virtual grids)
    frame: str  # FLOW or VP: how the latent carries noise
    shift: float | tuple[float, ...] = 0.0
    scale: float = 1.0
    std: tuple[float, ...] | None = None

    def process_in(self, x: Tensor) -> Tensor:
        """ComfyUI's ``latent_format.process_in``: raw VAE space -> the model's normalized space."""
        shift = _per_channel(self.shift, x)
        out = (x - shift) * self.scale
        if self.std is not None:
            out = out / _per_channel(self.std, x)
        return out


_FORMATS = {
    f.space: f
    for f in (
        LatentFormat(LatentSpace.FLUX, 16, 8, FLOW, shift=0.1159, scale=0.3611),
        LatentFormat(LatentSpace.SD3, 16, 8, FLOW, shift=0.0609, scale=1.5305),
        LatentFormat(LatentSpace.SDXL, 4, 8, VP, scale=0.13025),
        LatentFormat(LatentSpace.FLUX2, 128, 16, FLOW),
        LatentFormat(LatentSpace.QWENIMAGE, 16, 8, FLOW, shift=_WAN21_MEAN, std=_WAN21_STD),
        LatentFormat(LatentSpace.DINOV2, 768, 16, FLOW),
        LatentFormat(LatentSpace.SIGLIP, 1152, 16, FLOW),
    )
}


def latent_format(space: LatentSpace | str) -> LatentFormat:
    """The :class:`LatentFormat` of a latent space (name or enum)."""
    return _FORMATS[LatentSpace.parse(space)]


def _per_channel(value: float | tuple[float, ...], x: Tensor) -> float | Tensor:
    if isinstance(value, tuple):
        return torch.tensor(value, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return value


# ---------------------------------------------------------------------------------------------
# Sigma


def pid_sigma_from_sampler(sigma: SigmaLike, space: LatentSpace | str) -> float | Tensor:
    """PiD's degrade sigma from the sampler's sigma (flow: identity; SDXL: ``s / sqrt(1 + s^2)``).

    Returns a float for a scalar input, else a float64 tensor. An infinite SDXL sigma maps to 1.
    """
    if latent_format(space).frame == FLOW:
        return _validated(sigma, low=0.0, high=1.0, what="sampler sigma of a flow model")
    s = torch.as_tensor(_validated(sigma, low=0.0, high=math.inf, what="SDXL sampler sigma"), dtype=torch.float64)
    out = torch.where(torch.isinf(s), 1.0, s / torch.sqrt(1.0 + s * s))
    return _like_input(out, sigma)


def sampler_sigma_from_pid(sigma: SigmaLike, space: LatentSpace | str) -> float | Tensor:
    """The sampler's sigma from PiD's degrade sigma; inverse of :func:`pid_sigma_from_sampler`.

    For SDXL ``s = sigma / sqrt(1 - sigma^2)``, infinite at sigma = 1 (pure noise).
    """
    s = _validated(sigma, low=0.0, high=1.0, what="PiD sigma")
    if latent_format(space).frame == FLOW:
        return s
    s = torch.as_tensor(s, dtype=torch.float64)
    out = torch.where(s == 1.0, math.inf, s / torch.sqrt(1.0 - s * s))
    return _like_input(out, sigma)


def _like_input(values: Tensor, sigma: SigmaLike) -> float | Tensor:
    return values.item() if isinstance(sigma, (int, float)) else values


def _validated(sigma: SigmaLike, low: float, high: float, what: str) -> float | Tensor:
    """A float (scalar input) or float64 tensor, checked to lie in [low, high] and not be NaN."""
    scalar = isinstance(sigma, (int, float)) and not isinstance(sigma, bool)
    try:
        values = torch.as_tensor(sigma.detach().cpu() if isinstance(sigma, Tensor) else sigma, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"The {what} must be a number or a sequence of numbers, got {sigma!r}.") from None
    if torch.isnan(values).any():
        raise ValueError(f"The {what} is NaN; pass a number between {low} and {high}.")
    outside = (values < low) | (values > high)
    if outside.any():
        bad = values[outside].flatten()[0].item()
        raise ValueError(f"The {what} {bad:g} is outside [{low:g}, {high:g}]; pass a value in that range.")
    return float(sigma) if scalar else values


def _sigma_values(sigma: SigmaLike, batch: int) -> Tensor:
    values = torch.as_tensor(_validated(sigma, 0.0, 1.0, "PiD sigma"), dtype=torch.float64).flatten()
    if values.numel() not in (1, batch):
        raise ValueError(
            f"Got {values.numel()} sigma values for a batch of {batch}; pass one value or one per item."
        )
    return values.to(torch.float32).expand(batch).clone()


def sigma_tensor(sigma: SigmaLike, batch: int) -> Tensor:
    """PiD's degrade sigma as a float32 tensor [batch]: one value for all items, or one per item.

    Raises ValueError for NaN, values outside [0, 1] or a length that is neither 1 nor ``batch``;
    warns when a value is above the trained range (0.8).
    """
    values = _sigma_values(sigma, batch)
    if (values > MAX_TRAINED_SIGMA).any():
        warnings.warn(
            f"PiD sigma {values.max().item():.3f} is above {MAX_TRAINED_SIGMA}, the largest noise level PiD "
            "was trained on; expect a blurry or wrong decode. Stop the sampler later (lower sigma).",
            stacklevel=2,
        )
    return values


# ---------------------------------------------------------------------------------------------
# LATENT -> network latent


def to_network_latent(
    samples: Tensor,
    space: LatentSpace | str,
    sigma: SigmaLike,
    flux2_bn: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """The network's LQ latent (float32 [B, C, h, w]) from a ComfyUI LATENT at PiD sigma ``sigma``.

    ``sigma`` is PiD's degrade sigma (one value, or one per batch item). ``flux2_bn`` is the Flux.2
    VAE's BatchNorm ``(running_mean, running_var)`` (128 values each), needed only for a raw
    32-channel Flux.2 latent.
    """
    fmt = latent_format(space)
    x = _as_4d(samples, fmt)
    if not torch.isfinite(x).all():
        raise ValueError(
            "The latent contains NaN/inf values; the sampler diverged or the file is corrupt. "
            "Check the sampler settings or re-create the latent."
        )
    if fmt.space == LatentSpace.FLUX2 and x.shape[1] == FLUX2_RAW_CHANNELS:
        z = _normalize_flux2(pack_flux2(x), flux2_bn)
    else:
        _check_channels(x, fmt)
        z = fmt.process_in(x)
    sig = _sigma_values(sigma, x.shape[0]).to(z.device).view(-1, 1, 1, 1)
    if fmt.frame == FLOW:
        return z * (1.0 - sig)
    return z * torch.sqrt(1.0 - sig.double() ** 2).float()


def _as_4d(samples: Tensor, fmt: LatentFormat) -> Tensor:
    """float32 [B, C, h, w]; a Qwen-Image [B, C, 1, h, w] latent loses its frame axis."""
    if not isinstance(samples, Tensor):
        raise ValueError(f"The latent must be a torch tensor, got {type(samples).__name__}.")
    if samples.ndim == 5:
        if fmt.space != LatentSpace.QWENIMAGE:
            raise ValueError(
                f"Got a 5-D latent {tuple(samples.shape)} for {fmt.space.value}: a video latent (only Qwen-Image's "
                "pictures are 5-D, [B, C, 1, h, w]); PiD decodes pictures: decode videos with VAE Decode."
            )
        if samples.shape[2] != 1:
            raise ValueError(
                f"The Qwen-Image latent has {samples.shape[2]} frames (shape {tuple(samples.shape)}); "
                "PiD decodes single images, so pass a latent with one frame."
            )
        samples = samples[:, :, 0]
    if samples.ndim != 4:
        raise ValueError(
            f"Expected a 4-D latent [B, C, h, w], got shape {tuple(samples.shape)}; "
            "pass the 'samples' tensor of a LATENT."
        )
    return samples.to(torch.float32)


# Which models make latents of a channel count (to name where a latent of another family came from)
_FAMILIES_BY_CHANNELS = {4: "SDXL", 16: "Flux.1, Z-Image, SD3 or Qwen-Image", 128: "Flux.2", 768: "DINOv2-RAE",
                         1152: "SigLIP Scale-RAE"}  # fmt: skip


def _check_channels(x: Tensor, fmt: LatentFormat) -> None:
    if x.shape[1] != fmt.channels:
        extra = f" or {FLUX2_RAW_CHANNELS} (raw VAE latent)" if fmt.space == LatentSpace.FLUX2 else ""
        family = _FAMILIES_BY_CHANNELS.get(x.shape[1])
        source = f", as {family} latents do" if family else ""
        raise ValueError(
            f"A {fmt.space.value} latent has {fmt.channels} channels{extra}, but this one has {x.shape[1]} "
            f"(shape {tuple(x.shape)}){source}: decode it with the PiD checkpoint of the model that made it (or "
            "choose that model's latent space)."
        )


def pack_flux2(raw: Tensor) -> Tensor:
    """2x2-patchify a raw Flux.2 latent [B, 32, h, w] -> [B, 128, h/2, w/2].

    Output channel ``c*4 + i*2 + j`` holds input channel c at spatial ``(2y + i, 2x + j)``.
    """
    b, c, h, w = raw.shape
    if h % 2 or w % 2:
        raise ValueError(f"A raw Flux.2 latent needs even height and width to be packed, got {h}x{w}.")
    return raw.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def _normalize_flux2(packed: Tensor, bn: tuple[Tensor, Tensor] | None) -> Tensor:
    """The Flux.2 VAE's eval BatchNorm (no affine): ``(z - mean) / sqrt(var + 1e-4)``."""
    if bn is None:
        raise ValueError(
            "This is a raw 32-channel Flux.2 VAE latent, which only the Flux.2 VAE's BatchNorm statistics can "
            "normalize: decode the 128-channel latent that ComfyUI's Flux.2 samplers and VAE Encode give instead "
            "(in Python, pid_core's decode takes the statistics as flux2_bn)."
        )
    mean, var = (torch.as_tensor(t, dtype=torch.float32, device=packed.device).flatten() for t in bn)
    channels = packed.shape[1]
    if mean.numel() != channels or var.numel() != channels:
        raise ValueError(
            f"The Flux.2 BatchNorm statistics must have {channels} values each, got {mean.numel()} "
            f"and {var.numel()}; pass the VAE's bn.running_mean and bn.running_var."
        )
    return (packed - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + FLUX2_BN_EPS)
