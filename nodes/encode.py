"""PiD Encode Image: the "upscale a picture I already have" path (IMAGE -> VAE or RAE latent -> PiD Decode)."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

import comfy.model_management as mm

from ..pid_core.config import LatentSpace
from . import metadata
from .common import CATEGORY, NODE_PREFIX, PiDDecoderType

log = logging.getLogger("comfyui-pid")


def centre_crop(image: torch.Tensor, multiple: int, square: bool = False) -> tuple[torch.Tensor, dict]:
    """Crop IMAGE [B, H, W, C] to the largest centred size whose sides are multiples of ``multiple`` (and equal,
    with ``square``)."""
    _, height, width, _ = image.shape
    new_h, new_w = height // multiple * multiple, width // multiple * multiple
    if square:
        new_h = new_w = min(new_h, new_w)
    if new_h == 0 or new_w == 0:
        raise ValueError(
            f"The picture is {width}x{height} px; PiD Encode Image needs at least {multiple}x{multiple} px for this VAE."
        )
    top, left = (height - new_h) // 2, (width - new_w) // 2
    crop = {"top": top, "left": left, "height": new_h, "width": new_w, "source_height": height, "source_width": width}
    return image[:, top : top + new_h, left : left + new_w], crop


class PiDEncodeImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{NODE_PREFIX}EncodeImage",
            display_name="PiD Encode Image",
            category=CATEGORY,
            description=(
                "Encodes a picture with the PiD decoder's VAE (or RAE) into a clean latent (sigma 0), so that PiD "
                "Decode redraws it at 4x (a SigLIP RAE: at 2048 px). The picture is centre-cropped to a multiple of "
                "the VAE's cell size (for an RAE: to a square); the crop is recorded in the latent."
            ),
            inputs=[
                PiDDecoderType.Input("pid_decoder", tooltip="From Load PiD Decoder, with its VAE (or RAE) chosen."),
                io.Image.Input("image", tooltip="The picture(s) to upscale; batches of any size."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="Clean latent tagged for PiD Decode.")],
        )

    @classmethod
    def execute(cls, pid_decoder, image) -> io.NodeOutput:
        if pid_decoder.space is None:
            raise ValueError(
                "PiD Encode Image: this PiD checkpoint does not say which model family it is for; set latent_space "
                "in Load PiD Decoder."
            )
        if pid_decoder.rae is not None:
            # the RAE encoders take a square picture (the reference squeezes any other shape to it)
            cropped, crop = centre_crop(image, 1, square=True)
            mm.load_models_gpu([pid_decoder.rae])
            samples = pid_decoder.rae.model.encode(cropped[..., :3].movedim(-1, 1) * 2.0 - 1.0)
        elif pid_decoder.vae is not None:
            cropped, crop = centre_crop(image, pid_decoder.vae.spacial_compression_encode())
            samples = pid_decoder.vae.encode(cropped[:, :, :, :3])
        else:
            what = "RAE (rae_name)" if pid_decoder.space in (LatentSpace.DINOV2, LatentSpace.SIGLIP) else "VAE"
            raise ValueError(
                f"PiD Encode Image needs a {what}: choose the {what} of this PiD checkpoint's family in Load PiD Decoder."
            )
        if (crop["height"], crop["width"]) != (crop["source_height"], crop["source_width"]):
            log.info("PiD Encode Image: cropped %dx%d to %dx%d (centred)", crop["source_width"], crop["source_height"],
                     crop["width"], crop["height"])
        tagged = metadata.tag({"samples": samples}, [0.0] * samples.shape[0], pid_decoder.space.value)
        tagged[metadata.CROP_KEY] = crop
        return io.NodeOutput(tagged)
