"""The SigLIP-2 vision tower of PiD's Scale-RAE (``google/siglip2-so400m-patch14-224``).

That checkpoint is a fixed-resolution SigLIP-2: Hugging Face stores it as a ``SiglipModel`` (model_type
"siglip": a strided-conv patch embedding and one learned position per patch of the 16 x 16 grid), not as
the NaFlex ``Siglip2Model`` (linear patch embedding, resized positions). The reference loads it with
``AutoModel`` and keeps ``vision_model`` only. Scale-RAE's decoder was trained on the tower's last block
output *before* ``post_layernorm``, normalized by an affine-free LayerNorm; so this module stops after the
blocks, and neither the post-LayerNorm, the pooling head nor the text tower is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint import CheckpointError
from ..layers import CastOps
from .vit import Blocks, KeyLayout, ViTConfig, vit_config

LAYOUT = KeyLayout(
    blocks="vision_model.encoder.layers",
    block_parts={
        "layer_norm1": "norm1",
        "self_attn.q_proj": "attn.q",
        "self_attn.k_proj": "attn.k",
        "self_attn.v_proj": "attn.v",
        "self_attn.out_proj": "attn.out",
        "layer_norm2": "norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    },
    top={
        "vision_model.embeddings.patch_embedding.weight": "patch_embed.weight",
        "vision_model.embeddings.patch_embedding.bias": "patch_embed.bias",
        "vision_model.embeddings.position_embedding.weight": "pos_embed",
    },
    ignored=("vision_model.post_layernorm.", "vision_model.head.", "vision_model.embeddings.position_ids"),
)

# Scale-RAE normalizes the tower's output with an affine-free LayerNorm of this epsilon (its own constant,
# not the model's config)
SCALE_RAE_NORM_EPS = 1e-6

# Hugging Face's SiglipVisionConfig defaults, used for what a config.json leaves out
HF_DEFAULTS = dict(num_attention_heads=12, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")


@dataclass(frozen=True)
class SiglipConfig:
    vit: ViTConfig
    patch: int
    grid: int  # side of the patch grid the learned positions cover (16 for 224 px at patch 14)
    in_channels: int = 3

    @property
    def image_size(self) -> int:
        return self.grid * self.patch

    @classmethod
    def from_weights(cls, tensors: dict[str, torch.Tensor], hf: dict, name: str) -> SiglipConfig:
        """Sizes from the tensors; heads, epsilon and activation from ``config.json`` (else documented defaults)."""
        kernel = tensors["vision_model.embeddings.patch_embedding.weight"].shape
        if hf.get("model_type") in ("siglip2", "siglip2_vision_model") or len(kernel) != 4:
            raise CheckpointError(
                f"{name} is a SigLIP-2 NaFlex model (linear patch embedding); Scale-RAE uses the fixed-resolution "
                "google/siglip2-so400m-patch14-224."
            )
        if hf.get("model_type") not in (None, "siglip", "siglip_vision_model"):
            raise CheckpointError(
                f"{name}: its config.json says model_type {hf.get('model_type')!r}; Scale-RAE needs "
                "google/siglip2-so400m-patch14-224 ('siglip')."
            )
        positions, width = tensors["vision_model.embeddings.position_embedding.weight"].shape
        grid = math.isqrt(positions)
        if grid * grid != positions:
            raise CheckpointError(f"{name}: {positions} learned positions do not form a square grid.")
        vit = vit_config(tensors, hf, HF_DEFAULTS, name, width=width, blocks=LAYOUT.blocks,
                         mlp_key="vision_model.encoder.layers.0.mlp.fc1.weight")
        return cls(vit, patch=kernel[-1], grid=grid, in_channels=kernel[1])


class SiglipEncoder(nn.Module):
    """Pixels (SigLIP-normalized, exactly ``image_size`` square) -> patch tokens after the last block."""

    prefix_tokens = 0  # no CLS token
    final_norm_eps = SCALE_RAE_NORM_EPS

    def __init__(self, config: SiglipConfig, dtype=None, device=None, operations=CastOps) -> None:
        super().__init__()
        self.config = config
        width, p = config.vit.width, dict(dtype=dtype, device=device)
        self.patch_embed = operations.Conv2d(config.in_channels, width, config.patch, stride=config.patch, **p)
        self.pos_embed = nn.Parameter(torch.zeros(config.grid**2, width, **p))
        self.blocks = Blocks(config.vit, dtype, device, operations)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if tuple(pixels.shape[-2:]) != (size, size):
            raise ValueError(f"The SigLIP tower takes {size}x{size} pixels, got {tuple(pixels.shape[-2:])}.")
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        return self.blocks(x + self.pos_embed.to(x.dtype))
