"""Test-only ComfyUI nodes: tiny random-weight diffusion models and conditioning without a text encoder.

The PiD nodes sit behind a real diffusion model in every workflow (PiD KSampler stops it early, PiD
Decode takes its LATENT). Real checkpoints are gigabytes, so the tests build *genuine* ComfyUI models
(``comfy.model_base.Flux`` and ``comfy.model_base.SDXL``, through ``comfy.supported_models``) with a
tiny configuration and seeded random weights. Every stock node that takes a MODEL (KSampler,
KSamplerAdvanced, ModelSamplingFlux, ...) then runs exactly its normal code path on CPU in
milliseconds. ``PiDTestConditioning`` makes the CONDITIONING such a model expects, shaped from the
model's own config, so no CLIP/T5 is needed.

The folder is linked into ``custom_nodes`` by ``tests/conftest.py``; it is never installed for
users. Node ids start with ``PiDTest`` so they cannot clash with the pack or with ComfyUI core.
"""

from __future__ import annotations

import logging
import math
from dataclasses import fields

import torch
from comfy_api.latest import ComfyExtension, io

import comfy.ldm.flux.model
import comfy.ldm.modules.diffusionmodules.mmdit
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models

log = logging.getLogger("pid_test_pack")

CATEGORY = "PiD/testing"

# comfy.model_base.SDXL.encode_adm appends six 256-wide Timestep embeddings (height, width, crop
# top/left, target height/width) to the pooled text embedding.
SDXL_SIZE_EMBEDDING = 6 * 256


def seeded_init_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter a deterministic value, so that no layer keeps its zero/identity init.

    ComfyUI builds layers with ``comfy.ops`` (no init at all: weights are left as allocated), so a
    complete init is required, not just a nicety. Biases are 0, other 1-D parameters (norm scales) 1,
    weights ~ N(0, 1/fan_in) to keep activations bounded through the stack.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim <= 1:
                param.fill_(1.0)
            else:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
    return module


def fixed_buffers_(network: torch.nn.Module) -> torch.nn.Module:
    """Fill the buffers that ComfyUI allocates empty and a checkpoint file fills.

    SD3's MMDiT keeps its fixed sine-cosine position table in a ``pos_embed`` buffer made with ``torch.empty``:
    left as allocated it holds whatever memory held (zeros in a fresh process, NaN or huge values in a busy
    one, so a run could diverge or not). Written here: a fixed sine-cosine table of the kind SD3 files carry
    (ComfyUI's own ``get_2d_sincos_pos_embed`` over the ``pos_embed_max_size`` grid).
    """
    pos_embed = getattr(network, "pos_embed", None)
    if isinstance(pos_embed, torch.Tensor) and isinstance(network, comfy.ldm.modules.diffusionmodules.mmdit.MMDiT):
        _, patches, width = pos_embed.shape
        side = math.isqrt(patches)
        table = comfy.ldm.modules.diffusionmodules.mmdit.get_2d_sincos_pos_embed(width, side)
        with torch.no_grad():
            pos_embed.copy_(torch.from_numpy(table).reshape(1, patches, width))
    return network


def build_model_patcher(model_config, seed: int) -> comfy.model_patcher.ModelPatcher:
    """Instantiate ``model_config``'s model in fp32 with seeded weights, wrapped like a loaded checkpoint."""
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "")
    fixed_buffers_(seeded_init_(model.diffusion_model, seed))
    model = model.to(offload_device)
    n_params = sum(p.numel() for p in model.diffusion_model.parameters())
    log.info("tiny %s model: %d parameters, seed %d", type(model).__name__, n_params, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def flux_params(txt_ids_dims: list[int], **params) -> dict:
    """A Flux / Flux.2 unet config for this ComfyUI: current ComfyUI's FluxParams also names the text positions that
    carry ids (``txt_ids_dims``: [] for Flux, [3] for Flux.2, as its model detection sets them); 0.3.75's has no such
    field."""
    known = {f.name for f in fields(comfy.ldm.flux.model.FluxParams)}
    return params | ({"txt_ids_dims": txt_ids_dims} if "txt_ids_dims" in known else {})


class PiDTestTinyFluxModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiDTestTinyFluxModel",
            display_name="PiD Test: Tiny Flux Model",
            category=CATEGORY,
            description="A real comfy.model_base.Flux (flow matching, 16-channel Flux latent) with one "
            "double and one single block and seeded random weights. For tests only.",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the random weights."),
                io.Int.Input("hidden_size", default=128, min=128, max=1024, step=128,
                             tooltip="Transformer width; one attention head per 128 channels."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, seed: int, hidden_size: int) -> io.NodeOutput:
        unet_config = flux_params(
            [], image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
            hidden_size=hidden_size, mlp_ratio=2.0, num_heads=hidden_size // 128, depth=1, depth_single_blocks=1,
            axes_dim=[16, 56, 56],  # rope dims per axis; must sum to the head size (128)
            theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
        )
        return io.NodeOutput(build_model_patcher(comfy.supported_models.Flux(unet_config), seed))


def tiny_model_node(node_id: str, display_name: str, description: str, model_config: type, unet_config: dict):
    """A test node whose MODEL is ``model_config(unet_config)``'s real ComfyUI model with seeded random weights."""

    class TinyModel(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> io.Schema:
            return io.Schema(
                node_id=node_id, display_name=display_name, category=CATEGORY, description=description,
                inputs=[io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the random weights.")],
                outputs=[io.Model.Output()],
            )

        @classmethod
        def execute(cls, seed: int) -> io.NodeOutput:
            return io.NodeOutput(build_model_patcher(model_config(dict(unet_config)), seed))

    TinyModel.__name__ = TinyModel.__qualname__ = node_id
    return TinyModel


# The shape of ComfyUI's SDXL config (comfy/model_detection.py), shrunk. model_channels is 64 because
# supported_models.BASE fixes num_head_channels at 64.
SDXL_UNET = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 64,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [0, 1],
    "transformer_depth_output": [0, 0, 1, 1],
    "transformer_depth_middle": 1,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "legacy": False,
    "context_dim": 64,
    "num_classes": "sequential",
    "adm_in_channels": 64 + SDXL_SIZE_EMBEDDING,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
PiDTestTinySDXLModel = tiny_model_node(
    "PiDTestTinySDXLModel", "PiD Test: Tiny SDXL Model",
    "A real comfy.model_base.SDXL (EPS prediction, 4-channel SDXL latent) with two levels of 64/128 channels and "
    "seeded random weights. For tests only.",
    comfy.supported_models.SDXL, SDXL_UNET,
)


def conditioning_dims(model: comfy.model_patcher.ModelPatcher) -> tuple[int, int]:
    """(token width, pooled width) that ``model``'s network expects from its text encoder."""
    base = model.model
    config = base.model_config.unet_config
    if isinstance(base, comfy.model_base.Flux):
        return config["context_in_dim"], config["vec_in_dim"]
    if isinstance(base, comfy.model_base.SDXL):
        return config["context_dim"], config["adm_in_channels"] - SDXL_SIZE_EMBEDDING
    raise ValueError(
        f"PiDTestConditioning knows Flux and SDXL models, not {type(base).__name__}; "
        "add its conditioning shape to tests/comfy/test_pack."
    )


class PiDTestConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiDTestConditioning",
            display_name="PiD Test: Random Conditioning",
            category=CATEGORY,
            description="Seeded random CONDITIONING shaped for the given model (token embeddings plus "
            "the pooled vector Flux and SDXL need), in place of a text encoder. For tests only.",
            inputs=[
                io.Model.Input("model", tooltip="The model the conditioning is for; only its shape is read."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                io.Int.Input("tokens", default=8, min=1, max=512, tooltip="Number of text tokens."),
                io.Float.Input("guidance", default=3.5, min=0.0, max=100.0, step=0.1,
                               tooltip="Flux distilled guidance; ignored by other models."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, model, seed: int, tokens: int, guidance: float) -> io.NodeOutput:
        token_dim, pooled_dim = conditioning_dims(model)
        generator = torch.Generator().manual_seed(seed)
        cond = torch.randn(1, tokens, token_dim, generator=generator)
        extra = {"pooled_output": torch.randn(1, pooled_dim, generator=generator)}
        if isinstance(model.model, comfy.model_base.Flux):
            extra["guidance"] = guidance
        return io.NodeOutput([[cond, extra]])


class PiDTestExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .probes import PROBE_NODES
        from .tiny_loaders import NODES as LOADER_NODES  # imports this module's helpers: load it last
        from .gemma_clip import GEMMA_NODES
        from .bad_inputs import BAD_INPUT_NODES

        return [PiDTestTinyFluxModel, PiDTestTinySDXLModel, PiDTestConditioning, *PROBE_NODES, *LOADER_NODES,
                *GEMMA_NODES, *BAD_INPUT_NODES]


async def comfy_entrypoint() -> PiDTestExtension:
    return PiDTestExtension()
