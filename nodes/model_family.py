"""What a ComfyUI MODEL tells PiD: its latent space and the reference's recommended early-exit point."""

from __future__ import annotations

import torch

import comfy.latent_formats as formats

from ..pid_core.config import LatentSpace

# Exact types: ComfyUI's Flux format subclasses SD3's, so isinstance would call every Flux latent SD3.
_SPACES = {
    formats.Flux: LatentSpace.FLUX,
    formats.SD3: LatentSpace.SD3,
    formats.SDXL: LatentSpace.SDXL,
    formats.Flux2: LatentSpace.FLUX2,
    formats.Wan21: LatentSpace.QWENIMAGE,
}

# The official demos stop the latent sampler at step K of N and hand over to PiD (facts sheet, "from_ldm").
# Keyed by ComfyUI's model config class; families without an entry use their latent space's default.
_EXIT_BY_MODEL = {"Flux": (24, 28), "SD3": (24, 28), "SDXL": (26, 30), "Flux2": (46, 50), "QwenImage": (44, 50), "ZImage": (46, 50)}
_EXIT_BY_SPACE = {
    LatentSpace.FLUX: (24, 28),
    LatentSpace.SD3: (24, 28),
    LatentSpace.SDXL: (26, 30),
    LatentSpace.FLUX2: (46, 50),
    LatentSpace.QWENIMAGE: (44, 50),
}
# Distilled/turbo models (Z-Image-Turbo, Flux.2 Klein, Flux schnell) run a handful of steps and are
# decoded from their final latent; a run this short is treated as one of them.
DISTILLED_MAX_STEPS = 10


# Video models share Qwen-Image's latent format (the Wan 2.1 VAE); PiD decodes pictures, not videos.
_VIDEO_CONFIGS = ("WAN21_T2V",)

# VAE file names that say a family (checked in order: "flux2" before "flux"); SD 1.x is no PiD family.
_VAE_NAME_HINTS = (
    ("Flux.2", ("flux2", "flux.2", "flux_2", "klein")),
    ("SDXL", ("sdxl",)),
    ("SD3", ("sd3",)),
    ("Flux.1", ("flux", "z_image", "zimage", "lumina")),
    ("Qwen-Image", ("qwen",)),
    ("SD 1.x", ("sd15", "sd1.5", "sd_1.5", "v1-5", "vae-ft-mse", "sd-vae")),
)
_FAMILY_NAMES = {LatentSpace.FLUX: "Flux.1", LatentSpace.SD3: "SD3", LatentSpace.SDXL: "SDXL",
                 LatentSpace.FLUX2: "Flux.2", LatentSpace.QWENIMAGE: "Qwen-Image"}  # fmt: skip


def latent_space(model) -> LatentSpace:
    fmt = model.get_model_object("latent_format")
    config = type(model.model.model_config)
    if video := [c.__name__ for c in config.__mro__ if c.__name__ in _VIDEO_CONFIGS]:
        raise ValueError(
            f"This is a video model ({config.__name__}, of the {video[0]} family); PiD decodes pictures of Flux.1, "
            "Z-Image, SD3, SDXL, Flux.2 and Qwen-Image models: use VAE Decode for videos."
        )
    space = _SPACES.get(type(fmt))
    if space is None:
        raise ValueError(
            f"This model's latent format ({type(fmt).__name__}) is not one PiD decodes; PiD works with Flux.1, "
            "Z-Image, SD3, SDXL, Flux.2 and Qwen-Image models."
        )
    return space


def reference_exit(model, space: LatentSpace) -> tuple[int, int]:
    """(step K, of N steps) at which the reference hands a run of this family over to PiD."""
    name = type(model.model.model_config).__name__
    return _EXIT_BY_MODEL.get(name, _EXIT_BY_SPACE[space])


def auto_exit_step(model, space: LatentSpace, sigmas: torch.Tensor, scheduler_sigmas) -> int:
    """The first step of this run whose sigma is at or below the sigma of the reference's exit point.

    ``sigmas`` is this run's schedule (steps + 1 values); ``scheduler_sigmas(n)`` computes the model's
    own schedule for n steps, used to find the reference exit sigma whatever scheduler the user chose.
    """
    steps = len(sigmas) - 1
    if steps <= DISTILLED_MAX_STEPS:
        return steps
    k, n = reference_exit(model, space)
    target = float(scheduler_sigmas(n)[k])
    for step in range(1, steps + 1):
        if float(sigmas[step]) <= target:
            return step
    return steps


def vae_spaces(vae) -> tuple[LatentSpace, ...]:
    """The latent spaces a ComfyUI VAE's weights allow: its latent channels, and for 16 channels its architecture
    (Qwen-Image's is the Wan 2.1 video VAE; Flux.1 and SD3 share one, so their weights cannot tell them apart)."""
    channels = getattr(vae, "latent_channels", None)
    if channels == 16:
        wan = type(vae.first_stage_model).__name__ == "WanVAE"
        return (LatentSpace.QWENIMAGE,) if wan else (LatentSpace.FLUX, LatentSpace.SD3)
    return {4: (LatentSpace.SDXL,), 128: (LatentSpace.FLUX2,)}.get(channels, ())


def vae_family_from_name(name: str) -> str | None:
    """The model family a VAE's file name says (e.g. "sd3_vae.safetensors": SD3), or None."""
    text = name.replace("\\", "/").rsplit("/", 1)[-1].lower()
    if text == "ae.safetensors":  # the name Black Forest Labs gave the Flux.1 VAE
        return "Flux.1"
    return next((family for family, hints in _VAE_NAME_HINTS if any(h in text for h in hints)), None)


def family_name(space: LatentSpace) -> str:
    return _FAMILY_NAMES.get(space, space.value)
