"""PiD Decode: the drop-in replacement for VAE Decode."""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from comfy_api.latest import io
from PIL import Image

import comfy.model_management as mm
import comfy.utils

from ..pid_core.api import decode, guidance_scale, output_shape, plan_decode, sampler_steps
from ..pid_core.captions import lacks_system_prompt
from ..pid_core.config import LatentSpace, NetworkConfig
from ..pid_core.memory import SAFETY
from ..pid_core.sampler import MAX_STEPS, STUDENT_STEPS
from ..pid_core.teacher import MAX_TEACHER_STEPS, TEACHER_CFG, TEACHER_STEPS
from ..pid_core.tiling import TILING_MODES
from . import metadata
from .caption import NEGATIVE_CAPTION_KEY, PID_CAPTION_KEY, default_captions
from .common import CATEGORY, NODE_PREFIX, PiDDecoderType, reported_warnings

log = logging.getLogger("comfyui-pid")

SIZES = ["auto", "native 4x", "2048", "4096"]  # "auto" came first later: saved workflows keep their choice
AUTO = "auto"
PREVIEW_SIZE = 512


def _size(choice: str) -> str | int:
    return {"auto": "auto", "native 4x": "native"}.get(choice) or int(choice)


def _caption(conditioning, config: NetworkConfig) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The caption and the negative prompt's embedding that PiD Caption brings along (for undistilled checkpoints).
    Besides PiD Caption's output, a conditioning in PiD's exact layout is taken ([B, 300, width], e.g. from newer
    ComfyUI's pixeldit CLIP); any other is refused, as a decode with it would quietly go wrong."""
    if not conditioning:
        return None, None
    if len(conditioning) != 1:
        raise ValueError(f"PiD Decode: the caption holds {len(conditioning)} conditionings (combined or concatenated); "
                         "connect one PiD Caption.")
    embedding, extra = conditioning[0][0], conditioning[0][1]
    if extra.get(PID_CAPTION_KEY):
        return embedding, extra.get(NEGATIVE_CAPTION_KEY)
    layout = [config.txt_max_length, config.txt_embed_dim]
    if embedding.ndim == 3 and list(embedding.shape[1:]) == layout:
        log.info("PiD Decode: the caption did not come from PiD Caption, but it has PiD's layout %s (e.g. ComfyUI's "
                 "pixeldit text encoder); it is used as it is.", layout)
        if lacks_system_prompt(embedding):
            warnings.warn(
                "the caption is an empty text encoded without PiD's system prompt (as ComfyUI's pixeldit text encoder "
                "does), not the empty caption PiD was trained with, so the picture loses detail: leave caption "
                "unconnected, or use PiD Caption with empty text.", stacklevel=2)
        return embedding, None
    raise ValueError(
        f"PiD Decode: the caption is not a PiD caption: it is a {tuple(embedding.shape)} conditioning, while PiD reads "
        f"Gemma-2 hidden states [B, {layout[0]}, {layout[1]}] in its own layout (a diffusion model's text encoder "
        "gives another); connect PiD Caption, or leave caption unconnected."
    )


def _uncaptioned(
    config: NetworkConfig, distilled: bool, cfg: float | None
) -> tuple[torch.Tensor | None, torch.Tensor | None, float | None]:
    """The empty caption, the negative prompt's embedding and the guidance for a decode with no caption connected
    (see ``default_captions``): without that negative embedding an undistilled checkpoint decodes unguided."""
    embedding, negative, source = default_captions(config.txt_embed_dim)
    if source is not None:
        log.info("PiD Decode: no caption connected; the empty caption from %s", source)
        if negative is None and not distilled:
            log.info("PiD Decode: without the negative prompt's embedding the decode runs without guidance")
            cfg = 1.0
    return embedding, negative, cfg


def _preview(x0: torch.Tensor) -> tuple[str, Image.Image, int]:
    """The first item of the current estimate, small enough for the progress preview."""
    image = x0[:1].float().clamp(-1, 1)
    scale = PREVIEW_SIZE / max(image.shape[-2:])
    if scale < 1:
        image = F.interpolate(image, scale_factor=scale, mode="area")
    pixels = ((image[0] + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return ("JPEG", Image.fromarray(pixels), PREVIEW_SIZE)


def _memory_to_ask(patcher, height: int, width: int, batch: int, tiling: str, tile_size: int | None) -> int:
    """The working memory this decode would plan for on its device with no other model loaded. Asked of ComfyUI when
    loading PiD, it unloads other models to make that room, as it does for VAE Decode; the decode then plans for what
    is really free."""
    device = patcher.load_device
    room = max(0, mm.get_total_memory(device) - patcher.model_size())
    plan = plan_decode(patcher.model, height, width, batch=batch, tiling=tiling, tile_size=tile_size,
                       memory_budget=int(room * SAFETY), device=device)
    return plan.memory.activations


def _latent_inputs(latent: dict, sigma: float, latent_space: str) -> tuple[list[float] | float, str | None]:
    """Sigma and latent space from the LATENT's PiD metadata while it is valid, else from the widgets."""
    tagged, stale_reason = metadata.read(latent)
    if tagged is not None:
        log.info("PiD Decode: the latent's PiD metadata (sigma %s, latent space %s) is used instead of the widgets "
                 "(sigma %s, latent space %s)", ", ".join(f"{s:.4g}" for s in tagged.sigmas), tagged.space, sigma,
                 latent_space)
        return tagged.sigmas, tagged.space
    if stale_reason is not None:
        log.warning("PiD Decode: %s; using the sigma (%s) and latent space widgets instead.", stale_reason, sigma)
    return sigma, None if latent_space == AUTO else latent_space


class PiDDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{NODE_PREFIX}Decode",
            display_name="PiD Decode",
            category=CATEGORY,
            description=(
                "Decodes a latent straight to a large picture (4x its VAE size, or a 2048/4096 long side) with PiD's "
                "4-step pixel diffusion (undistilled checkpoints: 25 steps with guidance, for the best pictures). "
                "Takes clean latents and early-exit latents from PiD KSampler alike."
            ),
            inputs=[
                PiDDecoderType.Input("pid_decoder", tooltip="From Load PiD Decoder."),
                io.Latent.Input("latent", tooltip="The latent to decode; a PiD KSampler latent brings its own sigma."),
                io.Combo.Input(
                    "size", options=SIZES, default="auto",
                    tooltip="auto: what the checkpoint draws best (2k checkpoints: a 2048 long side; 2kto4k ones: "
                    "native 4x, at most 4096); native 4x: 4 times the VAE's picture size (8x for SigLIP); "
                    "2048/4096: that long side, keeping the aspect ratio.",
                ),
                io.Int.Input(
                    "steps", default=0, min=0, max=MAX_TEACHER_STEPS,
                    tooltip=f"0: the checkpoint's own, {STUDENT_STEPS} for the distilled students (at most "
                    f"{MAX_STEPS}), {TEACHER_STEPS} for undistilled checkpoints.",
                ),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of PiD's pixel noise (same seed, same picture on any device). New nodes "
                             "start with it fixed: re-queueing an unchanged graph reuses the decode."),
                io.Float.Input(
                    "sigma", default=0.0, min=0.0, max=1.0, step=0.001,
                    tooltip="Noise level of the latent, used only when it carries no PiD metadata (e.g. it comes "
                    "from a stock KSampler or Load Latent): 0 for a finished latent.",
                ),
                io.Combo.Input(
                    "latent_space", options=[AUTO, *LatentSpace.names()], default=AUTO,
                    tooltip="Model family of the latent when neither the latent nor the checkpoint tells it.",
                ),
                io.Conditioning.Input(
                    "caption", optional=True,
                    tooltip="The caption from PiD Caption (or a conditioning in PiD's [B, 300, 2304] layout, e.g. "
                    "from newer ComfyUI's pixeldit CLIP; any other is refused). Unconnected: the empty caption, from "
                    "PiD's caption cache or from Gemma-2-2B-it in models/text_encoders (loaded once); with neither, "
                    "an all-zero caption (lower quality), with a warning on this node.",
                ),
                io.Combo.Input(
                    "tiling", options=list(TILING_MODES), default=TILING_MODES[0], optional=True,
                    tooltip="auto: decode in overlapping tiles only when the whole picture would not fit in memory "
                    "(a batch goes a few pictures at a time first); on: always tile; off: never tile.",
                ),
                io.Int.Input(
                    "tile_size", default=0, min=0, max=8192, step=16, optional=True,
                    tooltip="Tile side in pixels, a multiple of 16, used when tiling; 0 picks the largest that fits "
                    "(at most 1024 px when tiling is on). Tiles overlap by a quarter and blend without seams.",
                ),
                io.Float.Input(
                    "cfg", default=0.0, min=0.0, max=30.0, step=0.1, optional=True,
                    tooltip=f"Guidance of undistilled checkpoints towards the caption and away from PiD's negative "
                    f"prompt; 0: the official {TEACHER_CFG:g}; 1: none (half the work). Distilled checkpoints run "
                    "without guidance and ignore it.",
                ),
            ],
            outputs=[io.Image.Output(display_name="image")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls, pid_decoder, latent, size, steps, seed, sigma, latent_space, caption=None, tiling="auto", tile_size=0,
        cfg=0.0,
    ) -> io.NodeOutput:
        # one reporter for the whole run: every warning (caption, size, memory plan) stays on the node together
        with reported_warnings("PiD Decode", cls.hidden.unique_id):
            sigmas, space = _latent_inputs(latent, sigma, latent_space)
            samples, tile_size = latent["samples"], tile_size or None
            patcher = pid_decoder.patcher
            height, width = output_shape(patcher.model, samples, space=space, size=_size(size), info=pid_decoder.info)
            distilled, cfg = pid_decoder.info.distilled, cfg or None
            embedding, negative = _caption(caption, patcher.model.config)
            if embedding is None:
                embedding, negative, cfg = _uncaptioned(patcher.model.config, distilled, cfg)
            branches = 1 if guidance_scale(cfg, distilled, embedding is not None) == 1 else 2
            needed = _memory_to_ask(patcher, height, width, samples.shape[0] * branches, tiling, tile_size)
            mm.load_models_gpu([patcher], memory_required=needed)
            device = patcher.load_device
            steps = sampler_steps(steps, distilled)
            pbar = comfy.utils.ProgressBar(steps)

            def network_call(step: int, done: int, calls: int) -> None:
                # one tick per network call (a group of pictures or of tiles), so long steps show progress too
                mm.throw_exception_if_processing_interrupted()
                pbar.update_absolute(step * calls + done, steps * calls)

            def step_done(step: int, total: int, x0: torch.Tensor) -> None:
                mm.throw_exception_if_processing_interrupted()
                pbar.update_absolute(pbar.current, pbar.total, _preview(x0))

            image = decode(
                patcher.model, samples, space=space, sigma=sigmas, caption=embedding, negative_caption=negative,
                cfg=cfg, size=_size(size), steps=steps, seed=seed, info=pid_decoder.info, callback=step_done,
                device=device, tiling=tiling, tile_size=tile_size,
                memory_budget=int(mm.get_free_memory(device) * SAFETY), call_callback=network_call,
                attention=pid_decoder.attention,
            )
            if (crop := latent.get(metadata.CROP_KEY)) is not None:
                log.info("PiD Decode: %dx%d output of the centred %dx%d crop of a %dx%d picture", image.shape[-1],
                         image.shape[-2], crop["width"], crop["height"], crop["source_width"], crop["source_height"])
            pixels = ((image + 1) * 0.5).permute(0, 2, 3, 1).to(mm.intermediate_device())
            return io.NodeOutput(pixels)
