"""PiD KSampler (early exit) and PiD Tag Latent: hand a partially denoised latent, with its sigma, to PiD."""

from __future__ import annotations

import comfy.samplers
import nodes as comfy_nodes
from comfy_api.latest import io

from ..pid_core.config import LatentSpace
from ..pid_core.latents import pid_sigma_from_sampler
from . import metadata, model_family
from .common import CATEGORY, NODE_PREFIX

AUTO_EXIT = 0
FROM_MODEL = "from model"
REFERENCE_SCHEDULER = "simple"  # the plain flow-matching schedule of the reference's diffusers pipelines


def _run_sigmas(model, steps: int, sampler_name: str, scheduler: str, denoise: float):
    """The exact schedule KSampler will use (denoise and samplers that drop a sigma included)."""
    ks = comfy.samplers.KSampler(
        model, steps=steps, device=model.load_device, sampler=sampler_name, scheduler=scheduler,
        denoise=denoise, model_options=model.model_options,
    )
    return ks.sigmas.cpu()


class PiDKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{NODE_PREFIX}KSamplerEarlyExit",
            display_name="PiD KSampler (early exit)",
            category=CATEGORY,
            description=(
                "A KSampler that stops early and hands the still slightly noisy latent to PiD Decode, which finishes "
                "it in pixel space: the last sampler steps are saved. The latent carries its sigma and latent space."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (Flux.1, Z-Image, SD3, SDXL, Flux.2 or Qwen-Image)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=28, min=1, max=10000, tooltip="Steps of the whole schedule (as in KSampler)."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale, as in KSampler (and its default). Flux.1, "
                               "Z-Image-Turbo and Flux.2 Klein want 1.0 (Flux.1 dev takes its guidance from "
                               "FluxGuidance), as the example workflows set it."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, tooltip="The sampling algorithm."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip="The noise schedule."),
                io.Conditioning.Input("positive", tooltip="What to include in the picture."),
                io.Conditioning.Input("negative", tooltip="What to exclude from the picture."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="As in KSampler."),
                io.Int.Input(
                    "exit_step", default=AUTO_EXIT, min=0, max=10000,
                    tooltip="Stop after this many steps. 0 = auto: the reference's recommended point for the model "
                    "(Flux/SD3 24 of 28, SDXL 26 of 30, Flux.2 and Z-Image 46 of 50, Qwen-Image 44 of 50, matched by "
                    "sigma for any step count), and no early exit for distilled models run in 10 steps or fewer.",
                ),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="The partially denoised latent, tagged for PiD Decode."),
                io.Float.Output(display_name="sigma", tooltip="PiD sigma of the latent (0 = fully denoised)."),
            ],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                exit_step) -> io.NodeOutput:
        space = model_family.latent_space(model)
        sigmas = _run_sigmas(model, steps, sampler_name, scheduler, denoise)
        run_steps = len(sigmas) - 1
        if run_steps < 1:  # denoise 0 (or a schedule with no step): nothing to sample, nothing to exit from
            raise ValueError(
                f"PiD KSampler: denoise {denoise:g} with {steps} steps leaves no sampling step; set denoise above 0 "
                "(1 samples a new picture), or decode the latent with PiD Decode directly."
            )
        if exit_step == AUTO_EXIT:
            ms = model.get_model_object("model_sampling")
            reference = lambda n: comfy.samplers.calculate_sigmas(ms, REFERENCE_SCHEDULER, n)  # noqa: E731
            exit_at = model_family.auto_exit_step(model, space, sigmas, reference)
        else:
            exit_at = min(exit_step, run_steps)
        (out,) = comfy_nodes.common_ksampler(
            model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
            denoise=denoise, last_step=exit_at, force_full_denoise=False,
        )
        sigma = float(pid_sigma_from_sampler(float(sigmas[exit_at]), space))
        batch = out["samples"].shape[0]
        return io.NodeOutput(metadata.tag(out, [sigma] * batch, space.value), sigma)


class PiDTagLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{NODE_PREFIX}TagLatent",
            display_name="PiD Tag Latent",
            category=CATEGORY,
            description=(
                "Early exit for SamplerCustomAdvanced graphs: tags a latent with its PiD sigma and latent space. "
                "Connect the SIGMAS the sampler ran (e.g. the high half of SplitSigmas), or set the sigma."
            ),
            inputs=[
                io.Latent.Input("latent", tooltip="The latent the custom sampler returned."),
                io.Combo.Input(
                    "latent_space", options=[FROM_MODEL, *LatentSpace.names()], default=FROM_MODEL,
                    tooltip="The model family of the latent; 'from model' reads it from the connected model.",
                ),
                io.Float.Input(
                    "sigma", default=0.0, min=0.0, max=1.0, step=0.001,
                    tooltip="PiD sigma of the latent, used when no SIGMAS are connected (0 = fully denoised).",
                ),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="The sigmas the sampler ran; the last one is where the latent stopped."),
                io.Model.Input("model", optional=True, tooltip="The model that made the latent (for its family)."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="The latent, tagged for PiD Decode."),
                io.Float.Output(display_name="sigma", tooltip="PiD sigma of the latent."),
            ],
        )

    @classmethod
    def execute(cls, latent, latent_space, sigma, sigmas=None, model=None) -> io.NodeOutput:
        if latent_space == FROM_MODEL:
            if model is None:
                raise ValueError("PiD Tag Latent: connect the model, or choose the latent space.")
            space = model_family.latent_space(model)
        else:
            space = LatentSpace.parse(latent_space)
        if sigmas is not None:
            if len(sigmas) == 0:
                raise ValueError("PiD Tag Latent: the connected SIGMAS are empty.")
            sigma = float(pid_sigma_from_sampler(float(sigmas[-1]), space))
        batch = latent["samples"].shape[0]
        return io.NodeOutput(metadata.tag(latent, [sigma] * batch, space.value), sigma)
