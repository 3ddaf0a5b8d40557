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


def latent_space(model) -> LatentSpace:
    fmt = model.get_model_object("latent_format")
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
