"""The RAE as one object: picture -> PiD latent (encode), PiD latent -> picture at native size (decode).

Conventions (the reference's, nvidia PiD ``dinov2_vae.py`` / ``scale_rae_vae.py``):

- pictures are ``[B, 3, H, W]`` in [-1, 1], in and out, like PiD's own output;
- a latent is what PiD's network takes for a clean picture and what a LATENT of this space holds:
  DINOv2 ``[B, 768, 32, 32]`` normalized per position with the RAE statistics,
  ``(z - mean) / sqrt(var + 1e-5)``; SigLIP ``[B, 1152, 16, 16]``, the tower's output after an
  affine-free LayerNorm (no statistics);
- encode: [-1, 1] -> [0, 1] -> bicubic resize to the encoder's input (DINOv2: latent grid x patch = 448;
  SigLIP: 224, with antialiasing) -> the encoder's pixel normalization -> tokens -> affine-free LayerNorm
  -> drop CLS and registers -> grid -> (DINOv2) normalization;
- decode: (DINOv2) de-normalization -> ViT-MAE decoder -> de-normalized pixels clamped to [0, 1] -> for
  Scale-RAE, bicubic resize of its 224 px to the native 256 px (16 px per latent cell, as the DINOv2 RAE's
  512 px) -> [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import CheckpointError, CheckpointInfo
from ..config import LatentSpace
from ..latents import latent_format
from . import dinov2, siglip
from .decoder import LAYOUT as DECODER_LAYOUT
from .decoder import DecoderConfig, ViTMAEDecoder
from .files import DECODER, DINOV2, EXPECTED, SIGLIP, STATS, RAEFile, expand, read_decoder_config, read_rae_file
from .vit import load_weights

LATENT_NORM_EPS = 1e-5  # RAE's epsilon in (z - mean) / sqrt(var + eps)


@dataclass(frozen=True)
class SpaceSpec:
    """What differs between the two RAEs around their networks."""

    encoder_name: str
    decoder_name: str
    pixel_mean: tuple[float, float, float]  # the encoder's image processor (preprocessor_config.json)
    pixel_std: tuple[float, float, float]
    antialias: bool  # of the encoder's bicubic resize
    uses_stats: bool  # latents normalized with stat.pt


SPECS = {
    LatentSpace.DINOV2: SpaceSpec(
        "DINOv2-with-registers encoder (facebook/dinov2-with-registers-base)", "RAE decoder (ViTXL_n08_i512/model.pt)",
        pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225), antialias=False, uses_stats=True,
    ),
    LatentSpace.SIGLIP: SpaceSpec(
        "SigLIP-2 encoder (google/siglip2-so400m-patch14-224)", "Scale-RAE decoder (…_decXL.pt)",
        pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.5, 0.5, 0.5), antialias=True, uses_stats=False,
    ),
}
_ENCODER_SPACE = {DINOV2: LatentSpace.DINOV2, SIGLIP: LatentSpace.SIGLIP}


class RAE(nn.Module):
    """An RAE's encoder and/or decoder (and DINOv2's statistics), as loaded by :func:`load_rae`.

    Either part may be missing: a PiD Encode Image needs the encoder, a native decode the decoder. The module
    can be moved and cast like any other; ``encode``/``decode`` run where its weights are.
    """

    def __init__(
        self,
        space: LatentSpace,
        encoder: nn.Module | None = None,
        decoder: ViTMAEDecoder | None = None,
        stats: tuple[torch.Tensor, torch.Tensor] | None = None,
        sources: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.space = space
        self.spec = SPECS[space]
        self.encoder = encoder
        self.decoder = decoder
        self.sources = tuple(sources)
        self.has_stats = stats is not None
        mean, var = stats if stats is not None else (torch.zeros(0), torch.zeros(0))
        self.register_buffer("latent_mean", mean.float(), persistent=False)
        self.register_buffer("latent_var", var.float(), persistent=False)

    # ------------------------------------------------------------------ what it is

    @property
    def channels(self) -> int:
        """Latent channels (768 DINOv2-B, 1152 SigLIP So400m)."""
        if self.encoder is not None:
            return self.encoder.config.vit.width
        if self.decoder is not None:
            return self.decoder.config.in_channels
        return self.latent_mean.shape[0]

    @property
    def grid(self) -> int:
        """Side of the latent grid the encoder makes and the decoder was trained on (32 DINOv2, 16 SigLIP)."""
        if self.has_stats:
            return self.latent_mean.shape[-1]
        if isinstance(self.encoder, siglip.SiglipEncoder):
            return self.encoder.config.grid
        if self.decoder is not None:
            return self.decoder.config.grid
        raise ValueError(f"The latent size of this {self.space.value} RAE is unknown without its statistics file.")

    @property
    def native_size(self) -> int:
        """Side of the decoded picture: 16 px per cell of the decoder's grid (512 DINOv2, 256 SigLIP), PiD's
        native size for these latents."""
        grid = self.decoder.config.grid if self.decoder is not None else self.grid
        return grid * latent_format(self.space).down

    def describe(self) -> str:
        parts = [n for n, present in (("encoder", self.encoder), ("decoder", self.decoder)) if present is not None]
        return f"{self.space.value} RAE ({' + '.join(parts) or 'statistics only'}, {self.channels} channels)"

    def check_matches(self, info: CheckpointInfo) -> None:
        """Refuse, with one sentence, an RAE that does not make the latents the PiD checkpoint decodes."""
        own = (info.space,) if info.space is not None else info.candidates
        if self.space in own and self.channels == info.config.latent_channels:
            return
        path = Path(info.path)
        raise CheckpointError(
            f"The RAE makes {self.space.value} latents with {self.channels} channels, but the PiD checkpoint "
            f"{path.parent.name}/{path.name} decodes {'/'.join(s.value for s in own)} latents with "
            f"{info.config.latent_channels} channels: pick the RAE of that family (or the matching PiD checkpoint)."
        )

    # ------------------------------------------------------------------ encode

    @torch.inference_mode()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Pictures [B, 3, H, W] in [-1, 1] (any size; squeezed to the encoder's square input as the reference
        does) -> latents [B, C, grid, grid], float32 on the CPU."""
        if self.encoder is None:
            raise ValueError(f"This RAE has no encoder: load the {self.spec.encoder_name} with it.")
        self._need_stats("encode")
        x = _checked_image(image).to(self._device)
        x = (x.float() + 1.0) / 2.0
        size = self._input_size()
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=self.spec.antialias)
        x = (x - _rgb(self.spec.pixel_mean, x)) / _rgb(self.spec.pixel_std, x)
        tokens = self.encoder(x.to(self._dtype))[:, self.encoder.prefix_tokens:]
        tokens = F.layer_norm(tokens.float(), (tokens.shape[-1],), eps=self.encoder.final_norm_eps)
        side = math.isqrt(tokens.shape[1])
        z = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
        if self.spec.uses_stats:
            z = (z - self.latent_mean) / torch.sqrt(self.latent_var + LATENT_NORM_EPS)
        return z.cpu()

    def _input_size(self) -> int:
        if isinstance(self.encoder, siglip.SiglipEncoder):
            return self.encoder.config.image_size
        return self.grid * self.encoder.config.patch  # DINOv2: the statistics' grid (32 x 14 = 448 px)

    # ------------------------------------------------------------------ decode

    @torch.inference_mode()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, h] -> pictures [B, 3, native_size, native_size] in [-1, 1], float32 on the CPU."""
        if self.decoder is None:
            raise ValueError(f"This RAE has no decoder: load the {self.spec.decoder_name} with it.")
        self._need_stats("decode")
        z = self._checked_latent(latent).to(self._device).float()
        if self.spec.uses_stats:
            z = z * torch.sqrt(self.latent_var + LATENT_NORM_EPS) + self.latent_mean
        pixels = self.decoder(z.flatten(2).transpose(1, 2).to(self._dtype)).float()
        pixels = (pixels * _rgb(self.spec.pixel_std, pixels) + _rgb(self.spec.pixel_mean, pixels)).clamp(0.0, 1.0)
        size = self.native_size
        if pixels.shape[-1] != size:  # Scale-RAE's 224 px (patch 14) -> 256 px (16 per cell)
            pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False).clamp(0.0, 1.0)
        return (pixels * 2.0 - 1.0).cpu()

    # ------------------------------------------------------------------ helpers

    @property
    def _device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _need_stats(self, what: str) -> None:
        if self.spec.uses_stats and not self.has_stats:
            raise ValueError(
                f"The DINOv2 RAE needs its latent statistics to {what}: load stat.pt "
                "(rae/stats/dinov2/wReg_base/imagenet1k_512/stat.pt) with it."
            )

    def _checked_latent(self, latent: torch.Tensor) -> torch.Tensor:
        if not isinstance(latent, torch.Tensor) or latent.ndim != 4 or latent.shape[-1] != latent.shape[-2]:
            shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
            raise ValueError(f"An RAE latent is [B, C, h, h] (a square grid), got {shape}.")
        if latent.shape[1] != self.channels:
            raise ValueError(
                f"This {self.space.value} RAE decodes {self.channels}-channel latents, got {latent.shape[1]} channels: "
                "the latent comes from another model family."
            )
        if self.spec.uses_stats and latent.shape[-1] != self.grid:
            raise ValueError(
                f"The DINOv2 RAE's statistics cover a {self.grid}x{self.grid} latent, got "
                f"{latent.shape[-2]}x{latent.shape[-1]}."
            )
        if not torch.isfinite(latent).all():
            raise ValueError("The latent contains NaN/inf values; re-create it.")
        return latent


def _checked_image(image: torch.Tensor) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"RAE encode takes pictures [B, 3, H, W] in [-1, 1], got {shape}.")
    return image


def _rgb(values: tuple[float, float, float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)


# --------------------------------------------------------------------------- loading


def load_rae(
    paths: str | Path | Sequence[str | Path],
    *,
    space: LatentSpace | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    operations=None,
) -> RAE:
    """Load an RAE from its files, in any order and combination (see ``pid_core.rae.files``): the encoder
    (Hugging Face folder or safetensors), the decoder (.pt, its JSON beside it or given too), DINOv2's
    ``stat.pt``, or folders holding them. The latent space comes from the files; ``space`` is needed only for
    a decoder alone whose width is not a released one. Weights are stored in ``dtype`` on ``device``;
    ``operations`` replaces the layer classes (ComfyUI passes ``comfy.ops``)."""
    files = expand(paths)
    decoder_json = [read_decoder_config(p) for p in files if p.suffix == ".json"]
    parts: dict[str, RAEFile] = {}
    for found in (read_rae_file(p) for p in files if p.suffix != ".json"):
        if found.kind in parts:
            raise CheckpointError(
                f"Two RAE {found.kind} files given ({parts[found.kind].path.name} and {found.path.name}); give one."
            )
        parts[found.kind] = found
    if not parts:
        raise CheckpointError(f"Only a decoder config was given; {EXPECTED}.")
    if DECODER in parts and decoder_json:
        parts[DECODER].config = decoder_json[0]
    space = _space(parts, space)
    kwargs = dict(dtype=dtype, device=device, **({"operations": operations} if operations is not None else {}))
    encoder = _build_encoder(parts, space, **kwargs)
    decoder = _build_decoder(parts.get(DECODER), **kwargs)
    stats = _stats(parts.get(STATS))
    rae = RAE(space, encoder, decoder, stats, [str(f.path) for f in parts.values()])
    _check_consistent(rae)
    return rae.to(device).eval().requires_grad_(False)


def _space(parts: dict[str, RAEFile], given: LatentSpace | str | None) -> LatentSpace:
    """The latent space: from the encoder, else the statistics (DINOv2 only), else the decoder's width."""
    encoders = [k for k in (DINOV2, SIGLIP) if k in parts]
    if len(encoders) > 1:
        raise CheckpointError("Both a DINOv2 and a SigLIP encoder were given; an RAE has one encoder.")
    found = _ENCODER_SPACE[encoders[0]] if encoders else LatentSpace.DINOV2 if STATS in parts else None
    if found is None and DECODER in parts:
        width = parts[DECODER].tensors["decoder_embed.weight"].shape[1]
        found = next((s for s in SPECS if latent_format(s).channels == width), None)
    if given is not None:
        given = LatentSpace.parse(given)
        if given not in SPECS:
            raise CheckpointError(f"{given.value} latents come from a VAE, not an RAE; an RAE is dinov2 or siglip.")
        if found is not None and found != given:
            raise CheckpointError(f"These RAE files make {found.value} latents, not {given.value} ones.")
        return given
    if found is None:
        raise CheckpointError(
            f"Cannot tell whether the decoder {parts[DECODER].path.name} is DINOv2's RAE or SigLIP's Scale-RAE; "
            "load it with its encoder or statistics, or name the latent space."
        )
    if STATS in parts and found != LatentSpace.DINOV2:
        raise CheckpointError(
            f"{parts[STATS].path.name} holds RAE latent statistics, which only DINOv2 RAEs use, not {found.value}."
        )
    return found


def _build_encoder(parts: dict[str, RAEFile], space: LatentSpace, **kwargs) -> nn.Module | None:
    kind = DINOV2 if space == LatentSpace.DINOV2 else SIGLIP
    if kind not in parts:
        return None
    found = parts[kind]
    family = dinov2 if kind == DINOV2 else siglip
    config_cls = dinov2.Dinov2Config if kind == DINOV2 else siglip.SiglipConfig
    module_cls = dinov2.Dinov2Encoder if kind == DINOV2 else siglip.SiglipEncoder
    config = config_cls.from_weights(found.tensors, found.config, found.path.name)
    with torch.device("meta"):
        module = module_cls(config, dtype=kwargs["dtype"], **_ops(kwargs))
    load_weights(module, found.tensors, family.LAYOUT, found.path.name, SPECS[space].encoder_name,
                 kwargs["dtype"], kwargs["device"])
    return module.eval()


def _build_decoder(found: RAEFile | None, **kwargs) -> ViTMAEDecoder | None:
    if found is None:
        return None
    config = DecoderConfig.from_weights(found.tensors, found.config, found.path.name)
    with torch.device("meta"):
        module = ViTMAEDecoder(config, dtype=kwargs["dtype"], **_ops(kwargs))
    load_weights(module, found.tensors, DECODER_LAYOUT, found.path.name, "RAE decoder", kwargs["dtype"],
                 kwargs["device"], extra_ok=True)
    return module.eval()


def _ops(kwargs: dict) -> dict:
    return {"operations": kwargs["operations"]} if "operations" in kwargs else {}


def _stats(found: RAEFile | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """mean and var as [C, H, W] (files hold them so; a leading batch axis of 1 is accepted too)."""
    if found is None:
        return None
    mean, var = (found.tensors[k].float().squeeze(0) if found.tensors[k].ndim == 4 else found.tensors[k].float()
                 for k in ("mean", "var"))
    if mean.ndim != 3 or mean.shape != var.shape or mean.shape[-1] != mean.shape[-2]:
        raise CheckpointError(
            f"{found.path.name}: RAE statistics are mean and var of shape [C, H, H], got {tuple(mean.shape)} and "
            f"{tuple(var.shape)}."
        )
    if (var < 0).any() or not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
        raise CheckpointError(f"{found.path.name}: the variances must be finite and not negative; the file is corrupt.")
    return mean, var


def _check_consistent(rae: RAE) -> None:
    """The parts must come from one RAE: the same latent width. (A latent grid other than the decoder's is
    resampled by the decoder, as in the reference.)"""
    widths = {}
    if rae.encoder is not None:
        widths["encoder"] = rae.encoder.config.vit.width
    if rae.decoder is not None:
        widths["decoder"] = rae.decoder.config.in_channels
    if rae.has_stats:
        widths["statistics"] = rae.latent_mean.shape[0]
    if len(set(widths.values())) > 1:
        listed = ", ".join(f"{name} {width}" for name, width in widths.items())
        raise CheckpointError(f"These RAE files do not belong together: their latent widths differ ({listed}).")
