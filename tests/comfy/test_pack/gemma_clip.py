"""Test-only nodes for PiD Caption: tiny text encoders built from ComfyUI's own classes, and conditioning probes.

* ``PiDTestGemmaCLIP``: a real ComfyUI CLIP of a tiny Gemma-2 file in models/text_encoders (Comfy-Org layout:
  ``model.`` keys and the SentencePiece tokenizer as ``spiece_model``), made exactly as Load CLIP makes one
  (``comfy.sd.load_text_encoder_state_dicts``, type lumina2, so ``comfy.text_encoders.lumina2``'s model around
  ``comfy.text_encoders.llama.Gemma2_2B``), with the tiny structure passed the way that class takes its config:
  ``model_options["gemma2_2b_model_config"]`` overrides fields of ``Gemma2_2B_Config``. The head width (256)
  is not a field there, so the tiny model keeps Gemma-2's.
* ``PiDTestTinyCLIPL``: a tiny CLIP-L text encoder (``comfy.sd1_clip``), a CLIP that is not Gemma.
* ``PiDTestSaveConditioning``: writes a CONDITIONING's first tensor (and its non-tensor keys as JSON) to
  ``output/pidtest-tensors/<name>.safetensors``.
* ``PiDTestCaptionConditioning``: a seeded random plain CONDITIONING ``[batch, tokens, width]``, as newer
  ComfyUI's ``pixeldit`` CLIPTextEncode makes for PiD.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import torch
from comfy_api.latest import io

import comfy.sd
import comfy.sd1_clip
import comfy.text_encoders.lumina2
import comfy.utils
import folder_paths

from .probes import write_record

CATEGORY = "PiD/testing"
CLIP_TYPES = [t for t in ("lumina2", "pixeldit") if hasattr(comfy.sd.CLIPType, t.upper())]  # pixeldit: 0.33 on
GEMMA_HEAD_DIM = 256  # comfy.text_encoders.llama.Gemma2_2B_Config.head_dim, a class constant


def tiny_gemma_config(sd: dict[str, torch.Tensor]) -> dict:
    """``Gemma2_2B_Config`` fields for the Gemma-2 weights in ``sd`` (``model.`` keys)."""
    vocab, hidden = sd["model.embed_tokens.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"model\.layers\.(\d+)\.", k)))
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=sd["model.layers.0.mlp.gate_proj.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=sd["model.layers.0.self_attn.q_proj.weight"].shape[0] // GEMMA_HEAD_DIM,
        num_key_value_heads=sd["model.layers.0.self_attn.k_proj.weight"].shape[0] // GEMMA_HEAD_DIM,
    )


class PiDTestGemmaCLIP(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiDTestGemmaCLIP",
            display_name="PiD Test: Tiny Gemma-2 CLIP",
            category=CATEGORY,
            description="Loads a tiny Gemma-2 text encoder file from models/text_encoders as Load CLIP (type "
            "lumina2 or pixeldit) does, with the tiny structure read from its shapes. For tests only.",
            inputs=[
                io.String.Input("clip_name", tooltip="File in models/text_encoders (Comfy-Org layout)."),
                io.Combo.Input("clip_type", options=CLIP_TYPES, default="lumina2", optional=True,
                               tooltip="Load CLIP's type: lumina2, or pixeldit (current ComfyUI's PiD encoder)."),
            ],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def execute(cls, clip_name: str, clip_type: str = "lumina2") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("text_encoders", clip_name)
        sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
        if hasattr(comfy.utils, "convert_old_quants"):  # current ComfyUI's Load CLIP turns scaled fp8 into its quant
            sd, _ = comfy.utils.convert_old_quants(sd, model_prefix="", metadata=metadata)  # tensors first
        clip = comfy.sd.load_text_encoder_state_dicts(
            [sd], clip_type=getattr(comfy.sd.CLIPType, clip_type.upper()),
            model_options={"gemma2_2b_model_config": tiny_gemma_config(sd)},
        )
        if not isinstance(clip.cond_stage_model, comfy.text_encoders.lumina2.LuminaModel):
            raise TypeError(f"{clip_name} did not load as lumina2's Gemma-2 but as {type(clip.cond_stage_model)}.")
        return io.NodeOutput(clip)


class PiDTestTinyCLIPL(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiDTestTinyCLIPL",
            display_name="PiD Test: Tiny CLIP-L",
            category=CATEGORY,
            description="A CLIP-L text encoder (comfy.sd1_clip) one layer deep and 32 wide. For tests only.",
            inputs=[],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        target = SimpleNamespace(params={}, clip=comfy.sd1_clip.SD1ClipModel, tokenizer=comfy.sd1_clip.SD1Tokenizer)
        config = dict(
            hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1, projection_dim=32
        )
        return io.NodeOutput(comfy.sd.CLIP(target, model_options={"clip_l_model_config": config}))


class PiDTestSaveConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiDTestSaveConditioning",
            display_name="PiD Test: Save Conditioning",
            category=CATEGORY,
            description="Writes the first tensor of a CONDITIONING as it is (dtype kept), its tensor-valued keys "
            "beside it, and its other keys as JSON "
            "to output/pidtest-tensors/<name>.safetensors. For tests only.",
            inputs=[io.Conditioning.Input("conditioning"), io.String.Input("name", default="conditioning")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, conditioning, name: str) -> io.NodeOutput:
        tensor, extra = conditioning[0]
        plain = {k: v for k, v in extra.items() if isinstance(v, (bool, int, float, str, type(None)))}
        tensors = {k: v for k, v in extra.items() if isinstance(v, torch.Tensor)}
        write_record(name, {"cond": tensor, **tensors}, {"entries": len(conditioning), **plain})
        return io.NodeOutput()


class PiDTestCaptionConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiDTestCaptionConditioning",
            display_name="PiD Test: Plain Caption Conditioning",
            category=CATEGORY,
            description="A seeded random CONDITIONING [batch, tokens, width] with no PiD marker, like newer "
            "ComfyUI's pixeldit CLIPTextEncode output. For tests only.",
            inputs=[
                io.Int.Input("batch", default=1, min=1, max=8),
                io.Int.Input("tokens", default=300, min=1, max=600),
                io.Int.Input("width", default=32, min=1, max=4096),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, batch: int, tokens: int, width: int, seed: int) -> io.NodeOutput:
        generator = torch.Generator().manual_seed(seed)
        return io.NodeOutput([[torch.randn(batch, tokens, width, generator=generator), {"pooled_output": None}]])


GEMMA_NODES = [PiDTestGemmaCLIP, PiDTestTinyCLIPL, PiDTestSaveConditioning, PiDTestCaptionConditioning]
