"""Test-only nodes that make the bad inputs of tests/comfy/test_bad_inputs.py, which stock nodes cannot make.

* ``PiDTestTensorLatent``: a LATENT of any shape filled with zeros, NaN or inf (an empty batch, a NaN latent).
* ``PiDTestCaption``: a CONDITIONING shaped like PiD Caption's output (marked ``pid_caption``, the negative
  prompt's embedding beside it), its caption filled with a value (NaN) or seeded random.
* ``PiDTestTinySD15Model``: a real ``comfy.model_base.BaseModel`` of SD1.5 (its SD15 latent format, 4 channels like
  SDXL), tiny, with seeded weights.
* ``PiDTestGuardDecoder``: a PID_DECODER whose network raises as soon as a decode reaches it, for decodes that
  must be refused before they start (a refused one never gets there; one that is not refused stops at once
  instead of running a huge decode).
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

import comfy.supported_models

from . import SDXL_UNET, tiny_model_node
from .probes import PiDDecoderType, pack_module, probed_decoder

CATEGORY = "PiD/testing"
FILLS = {"zeros": 0.0, "nan": float("nan"), "inf": float("inf")}
GUARD_MESSAGE = "PiDTest guard decoder: the decode reached PiD's network; it should have been refused before it started"


def _shape(text: str) -> list[int]:
    return [int(side) for side in text.split(",")]


class PiDTestTensorLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiDTestTensorLatent",
            display_name="PiD Test: Tensor Latent",
            category=CATEGORY,
            description="A LATENT of the given shape (comma-separated, any number of axes, 0 allowed) filled with "
            "zeros, NaN or inf. For tests only.",
            inputs=[
                io.String.Input("shape", default="1,16,6,4", tooltip="Comma-separated sizes, e.g. 0,16,6,4."),
                io.Combo.Input("fill", options=list(FILLS)),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, shape: str, fill: str) -> io.NodeOutput:
        return io.NodeOutput({"samples": torch.full(_shape(shape), FILLS[fill])})


class PiDTestCaption(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiDTestCaption",
            display_name="PiD Test: Caption Filled",
            category=CATEGORY,
            description="A CONDITIONING laid out as PiD Caption's output ([batch, tokens, width], marked pid_caption, "
            "with a seeded random negative prompt's embedding), its caption seeded random or filled with NaN or inf. "
            "For tests only.",
            inputs=[
                io.Int.Input("batch", default=1, min=1, max=8),
                io.Int.Input("tokens", default=300, min=1, max=600),
                io.Int.Input("width", default=32, min=1, max=4096),
                io.Combo.Input("fill", options=["random", "nan", "inf"]),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, batch: int, tokens: int, width: int, fill: str, seed: int) -> io.NodeOutput:
        generator = torch.Generator().manual_seed(seed)
        caption = torch.randn(batch, tokens, width, generator=generator)
        negative = torch.randn(1, tokens, width, generator=generator)
        if fill != "random":
            caption.fill_(FILLS[fill])
        negative_key = pack_module("nodes.caption").NEGATIVE_CAPTION_KEY
        return io.NodeOutput([[caption, {"pid_caption": True, negative_key: negative}]])


# ComfyUI's SD1.5 config (comfy/model_detection.py), shrunk like the test pack's SDXL
PiDTestTinySD15Model = tiny_model_node(
    "PiDTestTinySD15Model", "PiD Test: Tiny SD1.5 Model",
    "A real SD1.5 model (comfy.supported_models.SD15: EPS prediction, the SD15 latent format, 4 channels) with two "
    "levels of 64/128 channels and seeded random weights. For tests only.",
    comfy.supported_models.SD15,
    {**SDXL_UNET, "use_linear_in_transformer": False, "num_classes": None, "adm_in_channels": None},
)
PiDTestTinyWanModel = tiny_model_node(
    "PiDTestTinyWanModel", "PiD Test: Tiny Wan 2.1 Video Model",
    "A real Wan 2.1 text-to-video model (comfy.supported_models.WAN21_T2V: the Wan21 latent format it shares with "
    "Qwen-Image) with one 64-wide block and seeded random weights. For tests only.",
    comfy.supported_models.WAN21_T2V,
    {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 16, "dim": 64, "ffn_dim": 128,
     "freq_dim": 32, "text_dim": 64, "out_dim": 16, "num_heads": 2, "num_layers": 1},
)


class PiDTestGuardDecoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiDTestGuardDecoder",
            display_name="PiD Test: Guard Decoder",
            category=CATEGORY,
            description="The PiD decoder, raising an error as soon as a decode reaches its network (before the "
            "latent projection), so a decode that should be refused beforehand never runs. For tests only.",
            inputs=[PiDDecoderType.Input("pid_decoder")],
            outputs=[PiDDecoderType.Output()],
        )

    @classmethod
    def execute(cls, pid_decoder) -> io.NodeOutput:
        def probe(kind: str, **_) -> None:
            raise RuntimeError(GUARD_MESSAGE)

        return io.NodeOutput(probed_decoder(pid_decoder, probe))


BAD_INPUT_NODES = [PiDTestTensorLatent, PiDTestCaption, PiDTestTinySD15Model, PiDTestTinyWanModel, PiDTestGuardDecoder]
