"""Test-only stand-ins for the stock loaders of the shipped workflows (``workflows/``).

The workflow tests run every shipped workflow as the frontend exports it, with one kind of change: its
loader nodes (UNETLoader, CheckpointLoaderSimple, CLIPLoader, DualCLIPLoader, TripleCLIPLoader) are
swapped for the nodes below. Real weights are gigabytes, and ComfyUI sizes these models from the file's
keys with hard-coded widths, so a tiny model cannot come from a file. These nodes build the *same
ComfyUI classes* the stock loaders would (``comfy.supported_models.<Family>`` -> ``comfy.model_base``
in a ModelPatcher; ``comfy.sd.CLIP`` with the family's own text-encoder and tokenizer classes; a
``comfy.sd.VAE``) at toy widths with seeded weights, so every downstream stock node runs its normal
code path.

Text encoders are made small through ComfyUI's own per-model config override
(``model_options["<model_name>_model_config"]``, read by ``comfy.sd1_clip.SDClipModel``). The real
tokenizers shipped in ComfyUI's tree are used, except for Flux.2's Mistral tokenizer, whose vocabulary
(``tekken_model``) ComfyUI reads from the text-encoder file itself: a byte-level tekken vocabulary with
Mistral's special tokens stands in for it.

Widths of a family's text encoder and diffusion model match each other (``FAMILIES``), so the
CONDITIONING of PiDTestTinyTextEncoder fits PiDTestTinyDiffusionModel / PiDTestTinyCheckpoint of the
same family.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass, field

import torch
from comfy_api.latest import io

import comfy.model_management
import comfy.sd
import comfy.sdxl_clip
import comfy.supported_models
import comfy.taesd.taesd
import comfy.text_encoders.flux
import comfy.text_encoders.qwen_image
import comfy.text_encoders.qwen_vl
import comfy.text_encoders.sd3_clip
import comfy.text_encoders.z_image

from . import CATEGORY, SDXL_SIZE_EMBEDDING, build_model_patcher, flux_params, seeded_init_

log = logging.getLogger("pid_test_pack")

# Toy CLIP text models (ComfyUI's clip_l / clip_g configs, shrunk). The vocabulary stays real: the
# real tokenizer produces its ids. Three layers: SD3, SDXL and Z-Image read the penultimate one.
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=3, projection_dim=32)
# Toy decoder-only LLMs (comfy.text_encoders.llama configs). head_dim is fixed at 128 by those classes.
TINY_LLM = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=1, num_key_value_heads=1, num_hidden_layers=3
)


def tiny_t5(d_model: int) -> dict:
    return dict(d_model=d_model, d_ff=64, d_kv=16, num_heads=2, num_layers=1)


# Flux.2's Mistral tokenizer vocabulary: Mistral's first special tokens (ids 0-19, as in tekken.json),
# then the 256 bytes. Flux2TEModel stacks the outputs of layers 10, 20 and 30, so the toy has 31.
MISTRAL_SPECIALS = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
]  # fmt: skip
MISTRAL_VOCAB = len(MISTRAL_SPECIALS) + 256
MISTRAL_LAYERS = 31
KLEIN_TE_LAYERS = 28  # Klein's Qwen3-4B text encoder stacks layers 9, 18 and 27
QWEN_VOCAB = 152064  # covers both Qwen tokenizers' ids (Qwen3: 151936)


def tekken_vocabulary() -> bytes:
    return json.dumps({
        "config": {"default_vocab_size": MISTRAL_VOCAB, "default_num_special_tokens": len(MISTRAL_SPECIALS)},
        "vocab": [{"rank": i, "token_bytes": base64.b64encode(bytes([i])).decode()} for i in range(256)],
        "special_tokens": [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(MISTRAL_SPECIALS)],
    }).encode()  # fmt: skip


@dataclass(frozen=True)
class Family:
    """One model family: how ComfyUI builds its diffusion model and its text encoder, at toy widths."""

    model_config: type  # comfy.supported_models class
    unet_config: dict
    clip_target: object  # (tokenizer class, text-encoder class), as comfy.sd.load_text_encoder_state_dicts picks
    te_configs: dict  # model_options["<model_name>_model_config"] overrides
    tokenizer_data: dict = field(default_factory=dict)


FLUX_TE = {"clip_l": TINY_CLIP, "t5xxl": tiny_t5(32)}

SD_CLIPS = {"clip_l": TINY_CLIP, "clip_g": {**TINY_CLIP, "hidden_act": "gelu"}}


def flux2_unet(guidance_embed: bool) -> dict:
    """A Flux.2 diffusion model at toy width; its text encoders (Mistral 3 for Flux.2-dev, Qwen3 for Klein) stack
    the outputs of three layers, hence the context width."""
    return flux_params([3], image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None,
                       context_in_dim=3 * TINY_LLM["hidden_size"], hidden_size=128, mlp_ratio=3.0, num_heads=1,
                       depth=1, depth_single_blocks=1, axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1,
                       qkv_bias=False, guidance_embed=guidance_embed, global_modulation=True, mlp_silu_act=True,
                       ops_bias=False, default_ref_method="index", ref_index_scale=10.0)  # fmt: skip


FAMILIES = {
    "flux": Family(
        comfy.supported_models.Flux,
        flux_params([], image_model="flux", in_channels=16, out_channels=16, vec_in_dim=TINY_CLIP["hidden_size"],
                    context_in_dim=FLUX_TE["t5xxl"]["d_model"], hidden_size=128, mlp_ratio=2.0, num_heads=1, depth=1,
                    depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True,
                    guidance_embed=True),
        (comfy.text_encoders.flux.FluxTokenizer, comfy.text_encoders.flux.flux_clip()),
        FLUX_TE,
    ),
    "z_image": Family(
        comfy.supported_models.ZImage,
        dict(image_model="lumina2", patch_size=2, in_channels=16, dim=256, cap_feat_dim=TINY_LLM["hidden_size"],
             n_layers=1, n_refiner_layers=1, qk_norm=True, n_heads=2, n_kv_heads=2, axes_dims=[32, 48, 48],
             axes_lens=[1536, 512, 512], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True,
             time_scale=1000.0, pad_tokens_multiple=32),
        (comfy.text_encoders.z_image.ZImageTokenizer, comfy.text_encoders.z_image.te()),
        {"qwen3_4b": {**TINY_LLM, "vocab_size": QWEN_VOCAB}},
    ),
    "flux2": Family(
        comfy.supported_models.Flux2,
        flux2_unet(guidance_embed=True),
        (comfy.text_encoders.flux.Flux2Tokenizer, comfy.text_encoders.flux.flux2_te()),
        {"mistral3_24b": {**TINY_LLM, "num_hidden_layers": MISTRAL_LAYERS, "vocab_size": MISTRAL_VOCAB}},
        {"tekken_model": tekken_vocabulary()},
    ),
    "qwen_image": Family(
        comfy.supported_models.QwenImage,
        dict(image_model="qwen_image", in_channels=64, out_channels=16, num_layers=1, attention_head_dim=128,
             num_attention_heads=1, joint_attention_dim=TINY_LLM["hidden_size"], axes_dims_rope=(16, 56, 56)),
        (comfy.text_encoders.qwen_image.QwenImageTokenizer, comfy.text_encoders.qwen_image.te()),
        {"qwen25_7b": {**TINY_LLM, "vocab_size": QWEN_VOCAB}},
    ),
    "sdxl": Family(
        comfy.supported_models.SDXL,
        # ComfyUI's SDXL unet config (comfy/model_detection.py), shrunk; 64 channels because
        # supported_models.BASE fixes num_head_channels at 64.
        dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=64,
             num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[0, 1],
             transformer_depth_output=[0, 0, 1, 1], transformer_depth_middle=1, use_spatial_transformer=True,
             use_linear_in_transformer=True, legacy=False, context_dim=2 * TINY_CLIP["hidden_size"],
             num_classes="sequential", adm_in_channels=TINY_CLIP["projection_dim"] + SDXL_SIZE_EMBEDDING,
             use_temporal_attention=False, use_temporal_resblock=False),
        (comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel),
        SD_CLIPS,
    ),
    "sd3": Family(
        comfy.supported_models.SD3,
        # MMDiT: hidden = 64 * depth, heads = depth. SD3ClipModel pads CLIP features to T5-XXL's 4096
        # and joins them with T5's tokens, so the toy T5 keeps d_model 4096 (one layer).
        dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None,
             adm_in_channels=2 * TINY_CLIP["hidden_size"], pos_embed_max_size=96, num_patches=96 * 96,
             context_embedder_config={"target": "torch.nn.Linear",
                                      "params": {"in_features": 4096, "out_features": 128}},
             qk_norm="rms", pos_embed_scaling_factor=None, x_block_self_attn_layers=[]),
        (comfy.text_encoders.sd3_clip.SD3Tokenizer,
         comfy.text_encoders.sd3_clip.sd3_clip(clip_l=True, clip_g=True, t5=True)),
        {**SD_CLIPS, "t5xxl": tiny_t5(4096)},
    ),
}
if hasattr(comfy.text_encoders.flux, "klein_te"):  # Flux.2 Klein: ComfyUI 0.33 on (0.3.75 cannot encode its prompts)
    # Klein 4B: a Flux.2 model without guidance embedding; its text encoder Qwen3-4B (Load CLIP type flux2).
    FAMILIES["flux2_klein"] = Family(
        comfy.supported_models.Flux2,
        flux2_unet(guidance_embed=False),
        (comfy.text_encoders.flux.KleinTokenizer, comfy.text_encoders.flux.klein_te(model_type="qwen3_4b")),
        {"qwen3_4b": {**TINY_LLM, "num_hidden_layers": KLEIN_TE_LAYERS, "vocab_size": QWEN_VOCAB}},
    )
# what UNETLoader loads in the workflows
DIFFUSION_FAMILIES = [f for f in ("flux", "z_image", "flux2", "flux2_klein", "qwen_image") if f in FAMILIES]
CHECKPOINT_FAMILIES = ["sdxl", "sd3"]  # all-in-one checkpoints (CheckpointLoaderSimple)


class ClipTarget:
    def __init__(self, tokenizer, clip):
        self.tokenizer, self.clip, self.params = tokenizer, clip, {}


def tiny_model(family: str, seed: int):
    spec = FAMILIES[family]
    return build_model_patcher(spec.model_config(dict(spec.unet_config)), seed)


def tiny_clip(family: str, seed: int) -> comfy.sd.CLIP:
    spec = FAMILIES[family]
    options = {f"{name}_model_config": dict(config) for name, config in spec.te_configs.items()}
    # Built on the offload device and initialised before ComfyUI's model management moves it.
    options["initial_device"] = comfy.model_management.text_encoder_offload_device()
    clip = comfy.sd.CLIP(ClipTarget(*spec.clip_target), tokenizer_data=dict(spec.tokenizer_data), model_options=options)
    encoder = clip.cond_stage_model
    if family == "qwen_image":
        # Qwen2.5-VL's vision tower has fixed widths (0.67 B parameters) and is unused by text prompts:
        # a one-block tower of the same class keeps the encoder complete and small.
        llm = encoder.qwen25_7b.transformer
        llm.visual = comfy.text_encoders.qwen_vl.Qwen2VLVisionTransformer(
            hidden_size=32, output_hidden_size=TINY_LLM["hidden_size"], intermediate_size=64, num_heads=2,
            num_layers=1, dtype=llm.dtype, ops=encoder.qwen25_7b.operations,
        )
    seeded_init_(encoder, seed)
    n_params = sum(p.numel() for p in encoder.parameters())
    log.info("tiny %s text encoder (%s): %d parameters, seed %d", family, type(encoder).__name__, n_params, seed)
    return clip


def tiny_taesd(latent_channels: int, seed: int) -> comfy.sd.VAE:
    """A TAESD-architecture VAE (the only small VAE comfy.sd.VAE builds), seeded and complete."""
    state = seeded_init_(comfy.taesd.taesd.TAESD(latent_channels=latent_channels), seed).state_dict()
    state["vae_scale"], state["vae_shift"] = torch.tensor(1.0), torch.tensor(0.0)
    return comfy.sd.VAE(sd=state)


def seed_input() -> io.Int.Input:
    return io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the random weights.")


class PiDTestTinyDiffusionModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiDTestTinyDiffusionModel",
            display_name="PiD Test: Tiny Diffusion Model",
            category=CATEGORY,
            description="Stands in for UNETLoader: the family's real comfy.model_base model at toy widths with "
            "seeded weights. For tests only.",
            inputs=[io.Combo.Input("family", options=DIFFUSION_FAMILIES), seed_input()],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, family: str, seed: int) -> io.NodeOutput:
        return io.NodeOutput(tiny_model(family, seed))


class PiDTestTinyTextEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiDTestTinyTextEncoder",
            display_name="PiD Test: Tiny Text Encoder",
            category=CATEGORY,
            description="Stands in for CLIPLoader / DualCLIPLoader / TripleCLIPLoader: a comfy.sd.CLIP with the "
            "family's own tokenizer and text-encoder classes at toy widths, seeded. For tests only.",
            inputs=[io.Combo.Input("family", options=list(FAMILIES)), seed_input()],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def execute(cls, family: str, seed: int) -> io.NodeOutput:
        return io.NodeOutput(tiny_clip(family, seed))


class PiDTestTinyCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiDTestTinyCheckpoint",
            display_name="PiD Test: Tiny Checkpoint",
            category=CATEGORY,
            description="Stands in for CheckpointLoaderSimple: the family's tiny diffusion model and text encoder, "
            "and a seeded TAESD-architecture VAE of its latent channels. For tests only.",
            inputs=[io.Combo.Input("family", options=CHECKPOINT_FAMILIES), seed_input()],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, family: str, seed: int) -> io.NodeOutput:
        model = tiny_model(family, seed)
        channels = model.model.latent_format.latent_channels
        return io.NodeOutput(model, tiny_clip(family, seed + 1), tiny_taesd(channels, seed + 2))


NODES = [PiDTestTinyDiffusionModel, PiDTestTinyTextEncoder, PiDTestTinyCheckpoint]
