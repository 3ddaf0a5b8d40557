"""DINOv2 with registers (``facebook/dinov2-with-registers-base``), the encoder of PiD's DINOv2 RAE.

Same numbers as Hugging Face's ``Dinov2WithRegistersModel``: a strided-conv patch embedding, a CLS token,
learned positions for CLS + a square patch grid (37 x 37 for 518 px, bicubic-resampled to other grids),
register tokens inserted after CLS without positions, then pre-norm blocks with layer scales. The model's
final LayerNorm is not part of this module: the RAE applies it without its affine weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import CheckpointError
from ..layers import CastOps
from .vit import Blocks, KeyLayout, ViTConfig, vit_config

LAYOUT = KeyLayout(
    blocks="encoder.layer",
    block_parts={
        "norm1": "norm1",
        "attention.attention.query": "attn.q",
        "attention.attention.key": "attn.k",
        "attention.attention.value": "attn.v",
        "attention.output.dense": "attn.out",
        "layer_scale1": "ls1",
        "norm2": "norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "layer_scale2": "ls2",
    },
    top={
        "embeddings.cls_token": "cls_token",
        "embeddings.register_tokens": "register_tokens",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.bias",
    },
    # the masked-image-modelling token is for training; the final norm's affine is what the RAE removes
    ignored=("embeddings.mask_token", "layernorm."),
)

# Hugging Face's Dinov2WithRegistersConfig defaults, used for what a config.json leaves out
HF_DEFAULTS = dict(num_attention_heads=12, layer_norm_eps=1e-6, hidden_act="gelu")


@dataclass(frozen=True)
class Dinov2Config:
    vit: ViTConfig
    patch: int
    registers: int
    pos_grid: int  # side of the learned position grid
    in_channels: int = 3

    @classmethod
    def from_weights(cls, tensors: dict[str, torch.Tensor], hf: dict, name: str) -> Dinov2Config:
        """Sizes from the tensors; heads, epsilon and activation from ``config.json`` (else documented defaults)."""
        if hf.get("model_type") not in (None, "dinov2_with_registers"):
            raise CheckpointError(
                f"{name}: its config.json says model_type {hf.get('model_type')!r}; PiD's RAE needs "
                "facebook/dinov2-with-registers-base ('dinov2_with_registers')."
            )
        if "encoder.layer.0.mlp.weights_in.weight" in tensors:
            raise CheckpointError(f"{name} is a SwiGLU DINOv2 (giant); PiD's RAE uses dinov2-with-registers-base.")
        width = tensors["embeddings.cls_token"].shape[-1]
        kernel = tensors["embeddings.patch_embeddings.projection.weight"].shape
        positions = tensors["embeddings.position_embeddings"].shape[1] - 1
        pos_grid = math.isqrt(positions)
        if pos_grid * pos_grid != positions:
            raise CheckpointError(f"{name}: {positions} learned positions do not form a square grid.")
        vit = vit_config(tensors, hf, HF_DEFAULTS, name, width=width, blocks=LAYOUT.blocks,
                         mlp_key="encoder.layer.0.mlp.fc1.weight", layer_scale=True)
        return cls(vit, patch=kernel[-1], registers=tensors["embeddings.register_tokens"].shape[1],
                   pos_grid=pos_grid, in_channels=kernel[1])


class Dinov2Encoder(nn.Module):
    """Pixels (ImageNet-normalized, sides multiples of the patch) -> all tokens after the last block."""

    def __init__(self, config: Dinov2Config, dtype=None, device=None, operations=CastOps) -> None:
        super().__init__()
        self.config = config
        width, p = config.vit.width, dict(dtype=dtype, device=device)
        self.patch_embed = operations.Conv2d(config.in_channels, width, config.patch, stride=config.patch, **p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width, **p))
        self.register_tokens = nn.Parameter(torch.zeros(1, config.registers, width, **p))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.pos_grid**2, width, **p))
        self.blocks = Blocks(config.vit, dtype, device, operations)

    @property
    def prefix_tokens(self) -> int:
        """CLS and registers, in front of the patch tokens."""
        return 1 + self.config.registers

    @property
    def final_norm_eps(self) -> float:
        return self.config.vit.eps  # the model's final LayerNorm uses the blocks' epsilon

    def positions(self, grid_h: int, grid_w: int, dtype: torch.dtype) -> torch.Tensor:
        """CLS + patch positions for a grid_h x grid_w grid: the learned grid resampled as Hugging Face does
        (bicubic with antialiasing, in fp32), or as it is when the grid matches."""
        pos = self.pos_embed.to(dtype)
        n = self.config.pos_grid
        if grid_h == grid_w == n:
            return pos
        grid = pos[:, 1:].float().reshape(1, n, n, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False, antialias=True)
        return torch.cat([pos[:, :1], grid.to(dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)], dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patch = self.config.patch
        if pixels.shape[-2] % patch or pixels.shape[-1] % patch:
            raise ValueError(f"DINOv2 input sides must be multiples of {patch}, got {tuple(pixels.shape[-2:])}.")
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        b = x.shape[0]
        x = torch.cat([self.cls_token.to(x.dtype).expand(b, -1, -1), x], dim=1)
        x = x + self.positions(pixels.shape[-2] // patch, pixels.shape[-1] // patch, x.dtype)
        x = torch.cat([x[:, :1], self.register_tokens.to(x.dtype).expand(b, -1, -1), x[:, 1:]], dim=1)
        return self.blocks(x)
