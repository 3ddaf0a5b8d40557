"""PiD RAE Decode: the RAE's own decoder on a DINOv2 / SigLIP latent, to compare with PiD's decode."""

from __future__ import annotations

from comfy_api.latest import io

import comfy.model_management as mm

from .common import CATEGORY, NODE_PREFIX, PiDDecoderType


class PiDRAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{NODE_PREFIX}RAEDecode",
            display_name="PiD RAE Decode",
            category=CATEGORY,
            description=(
                "Decodes a DINOv2 or SigLIP latent with the RAE's own decoder at its native size (512 px DINOv2, "
                "256 px SigLIP): the picture a semantic-latent generator would show without PiD."
            ),
            inputs=[
                PiDDecoderType.Input("pid_decoder", tooltip="From Load PiD Decoder, with its RAE chosen."),
                io.Latent.Input("latent", tooltip="A DINOv2 or SigLIP latent, e.g. from PiD Encode Image."),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, pid_decoder, latent) -> io.NodeOutput:
        if pid_decoder.rae is None:
            raise ValueError("PiD RAE Decode needs an RAE: choose this checkpoint's RAE folder (rae_name) in Load PiD Decoder.")
        mm.load_models_gpu([pid_decoder.rae])
        image = pid_decoder.rae.model.decode(latent["samples"])
        return io.NodeOutput(((image + 1.0) * 0.5).movedim(1, -1).to(mm.intermediate_device()))
