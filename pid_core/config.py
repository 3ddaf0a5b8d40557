"""Network variants, latent-space names and the table of released PiD checkpoints.

Everything that the weights' shapes cannot tell (rope reference, padding, upscale factor, which
16-channel latent space) is looked up here from what the shapes *can* tell; see
``detect_config`` in ``pid_core.checkpoint``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class LatentSpace(str, Enum):
    """The latent spaces PiD decodes. The values are the names used by the CLI, ``info`` and node widgets."""

    FLUX = "flux"  # Flux.1, Z-Image, Lumina-2-style 16-channel Flux VAE
    SD3 = "sd3"
    SDXL = "sdxl"
    FLUX2 = "flux2"  # Flux.2 / Klein, packed 128-channel BatchNorm-normalized
    QWENIMAGE = "qwenimage"  # Qwen-Image (Wan 2.1 VAE)
    DINOV2 = "dinov2"  # DINOv2-with-registers RAE
    SIGLIP = "siglip"  # SigLIP-2 Scale-RAE

    @classmethod
    def names(cls) -> list[str]:
        return [s.value for s in cls]

    @classmethod
    def parse(cls, name: str | LatentSpace) -> LatentSpace:
        try:
            return cls(name)
        except ValueError:
            raise ValueError(f"Unknown latent space {name!r}; choose one of: {', '.join(cls.names())}.") from None


class GateType(str, Enum):
    PER_TOKEN_PER_DIM = "per_token_per_dim"  # v1: one gate value per token and channel
    PER_TOKEN = "per_token"  # v1.5: one scalar gate per token


@dataclass(frozen=True)
class NetworkConfig:
    """Structure of one PiD network. Defaults are the released v1 16-channel network."""

    hidden_size: int = 1536
    num_heads: int = 24
    patch_depth: int = 14
    patch_size: int = 16
    pixel_hidden_size: int = 16
    pixel_attn_hidden_size: int = 1152
    pixel_num_heads: int = 16
    pixel_depth: int = 2
    txt_embed_dim: int = 2304
    txt_max_length: int = 300
    latent_channels: int = 16  # channels of the latent handed to the network (128 for Flux.2)
    latent_down: int = 8  # pixels per latent cell of the VAE (16 for Flux.2 packed and the RAEs)
    latent_unpatchify: int = 1  # v1.5 Flux.2 unpacks 2x2 patches before projecting (128 -> 32 channels)
    sr_scale: int = 4  # output pixels per VAE-native pixel (8 for SigLIP)
    lq_hidden_dim: int = 512
    lq_num_res_blocks: int = 4
    lq_interval: int = 2  # an LQ injection before every `lq_interval`-th patch block
    gate_type: GateType = GateType.PER_TOKEN_PER_DIM
    lq_padding: str = "zeros"  # "replicate" in v1.5
    rope_ref: int = 1024  # pixel size at which the NTK-aware RoPE is unscaled (2048 in v1.5)
    pit_lq_inject: bool = False  # v1.5: one more gated LQ injection into the pixel-level conditioning

    @property
    def version(self) -> str:
        return "v1.5" if self.pit_lq_inject else "v1"

    @property
    def mlp_hidden(self) -> int:
        # SwiGLU hidden width: two thirds of 4x, as in LLaMA-style blocks (4096 for width 1536)
        return int(2 * (4 * self.hidden_size) / 3)

    @property
    def num_lq_outputs(self) -> int:
        return math.ceil(self.patch_depth / self.lq_interval)

    @property
    def lq_conv_in_channels(self) -> int:
        return self.latent_channels // self.latent_unpatchify**2

    @property
    def upscale(self) -> int:
        """Output pixels per latent cell: 32 for 8x VAEs at 4x, 64 for Flux.2/DINOv2, 128 for SigLIP."""
        return self.latent_down * self.sr_scale

    def validate(self) -> None:
        checks = [
            (self.hidden_size % self.num_heads == 0, "hidden_size must be divisible by num_heads"),
            ((self.hidden_size // self.num_heads) % 4 == 0, "patch head width must be a multiple of 4 (2-D RoPE)"),
            (self.pixel_attn_hidden_size % self.pixel_num_heads == 0, "pixel attention width / heads"),
            ((self.pixel_attn_hidden_size // self.pixel_num_heads) % 4 == 0, "pixel head width must be a multiple of 4"),
            (self.pixel_hidden_size % 4 == 0, "pixel_hidden_size must be a multiple of 4 (sin-cos embedding)"),
            (self.latent_channels % self.latent_unpatchify**2 == 0, "latent channels / unpatchify factor"),
            (self.lq_hidden_dim % 4 == 0, "lq_hidden_dim must be a multiple of 4 (GroupNorm with 4 groups)"),
            (self.lq_padding in ("zeros", "replicate"), "lq_padding must be 'zeros' or 'replicate'"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Invalid PiD network config: {message} ({self}).")


V1_5_CHANGES = dict(
    lq_hidden_dim=1024, gate_type=GateType.PER_TOKEN, lq_padding="replicate", rope_ref=2048, pit_lq_inject=True
)


@dataclass(frozen=True)
class ReleasedCheckpoint:
    """One official checkpoint: the network it needs and where it comes from."""

    name: str  # stable id, e.g. "flux_2k"
    spaces: tuple[LatentSpace, ...]  # latent spaces it was trained on (first = canonical)
    training: str  # "2k" or "2kto4k"
    experiment: str  # the official folder name holding model_ema_bf16.pth
    network: NetworkConfig
    legacy: bool = False  # superseded by a v1.5 file but still in users' folders
    distilled: bool = True  # False: an undistilled teacher (many steps with CFG; the same network shapes)

    @property
    def space(self) -> LatentSpace:
        return self.spaces[0]


def _v1(**kw) -> NetworkConfig:
    return NetworkConfig(**kw)


def _v15(**kw) -> NetworkConfig:
    return NetworkConfig(**{**V1_5_CHANGES, **kw})


_FLUX = (LatentSpace.FLUX,)
_FLUX2_V1 = dict(latent_channels=128, latent_down=16)
_FLUX2_V15 = dict(latent_channels=128, latent_down=16, latent_unpatchify=2)

# The official release (facts sheet §2.1-2.2). Z-Image and Flux.2 Klein share the Flux / Flux.2 files.
RELEASED_CHECKPOINTS: tuple[ReleasedCheckpoint, ...] = (
    ReleasedCheckpoint("flux_2k", _FLUX, "2k", "PiD_res2k_sr4x_official_flux_distill_4step", _v1()),
    ReleasedCheckpoint("sd3_2k", (LatentSpace.SD3,), "2k", "PiD_res2k_sr4x_official_sd3_distill_4step", _v1()),
    ReleasedCheckpoint("sd3_2kto4k", (LatentSpace.SD3,), "2kto4k", "PiD_res2kto4k_sr4x_official_sd3_distill_4step", _v1()),
    ReleasedCheckpoint(
        "sdxl_2kto4k", (LatentSpace.SDXL,), "2kto4k", "PiD_res2kto4k_sr4x_official_sdxl_distill_4step",
        _v1(latent_channels=4),
    ),
    ReleasedCheckpoint(
        "flux2_2k", (LatentSpace.FLUX2,), "2k", "PiD_res2k_sr4x_official_flux2_distill_4step", _v1(**_FLUX2_V1)
    ),
    ReleasedCheckpoint(
        "dinov2_2k", (LatentSpace.DINOV2,), "2k", "PiD_res2k_sr4x_official_dinov2_distill_4step",
        _v1(latent_channels=768, latent_down=16),
    ),
    ReleasedCheckpoint(
        "siglip_2k", (LatentSpace.SIGLIP,), "2k", "PiD_res2k_sr8x_official_siglip_distill_4step",
        _v1(latent_channels=1152, latent_down=16, sr_scale=8),
    ),
    ReleasedCheckpoint(
        "flux_2kto4k_v1pt5", _FLUX, "2kto4k", "PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step", _v15()
    ),
    ReleasedCheckpoint(
        "flux2_2kto4k_v1pt5", (LatentSpace.FLUX2,), "2kto4k",
        "PiD_v1pt5_res2kto4k_sr4x_official_flux2_distill_4step", _v15(**_FLUX2_V15),
    ),
    ReleasedCheckpoint(
        "qwenimage_2kto4k_v1pt5", (LatentSpace.QWENIMAGE,), "2kto4k",
        "PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_distill_4step", _v15(),
    ),
    # The undistilled v1.5 teachers (docs/checkpoints.md of the official repo): the students' networks, trained
    # without distillation; sampled with DPM-Solver and classifier-free guidance (pid_core.teacher).
    ReleasedCheckpoint(
        "flux_2kto4k_v1pt5_undistilled", _FLUX, "2kto4k", "PiD_v1pt5_res2kto4k_sr4x_official_flux_undistilled",
        _v15(), distilled=False,
    ),
    ReleasedCheckpoint(
        "flux2_2kto4k_v1pt5_undistilled", (LatentSpace.FLUX2,), "2kto4k",
        "PiD_v1pt5_res2kto4k_sr4x_official_flux2_undistilled", _v15(**_FLUX2_V15), distilled=False,
    ),
    ReleasedCheckpoint(
        "qwenimage_2kto4k_v1pt5_undistilled", (LatentSpace.QWENIMAGE,), "2kto4k",
        "PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_undistilled", _v15(), distilled=False,
    ),
    # Legacy v1 2kto4k files (superseded by v1.5); same shapes as the v1 networks above.
    ReleasedCheckpoint(
        "flux_2kto4k", _FLUX, "2kto4k", "PiD_res2kto4k_sr4x_official_flux_distill_4step", _v1(), legacy=True
    ),
    ReleasedCheckpoint(
        "flux2_2kto4k_2606", (LatentSpace.FLUX2,), "2kto4k",
        "PiD_res2kto4k_sr4x_official_flux2_distill_4step_2606", _v1(**_FLUX2_V1), legacy=True,
    ),
    ReleasedCheckpoint(
        "qwenimage_2kto4k", (LatentSpace.QWENIMAGE,), "2kto4k",
        "PiD_res2kto4k_sr4x_official_qwenimage_distill_4step", _v1(), legacy=True,
    ),
)


def released(name: str) -> ReleasedCheckpoint:
    for ckpt in RELEASED_CHECKPOINTS:
        if ckpt.name == name:
            return ckpt
    raise KeyError(f"No released PiD checkpoint named {name!r}.")
