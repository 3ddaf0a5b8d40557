"""The ViT-MAE pixel decoder of RAE (DINOv2, ``ViTXL_n08_i512/model.pt``) and Scale-RAE (SigLIP, ``…decXL.pt``).

Both papers use the same "GeneralDecoder": latent tokens are embedded to the decoder width, resampled
bilinearly to the decoder's own square grid when the latent has another size, a learned CLS token is put
in front, fixed sin-cos positions (stored in the file) are added, pre-norm ViT-MAE blocks run, and a linear
head predicts ``patch x patch`` RGB values per token, which are laid out as the picture. The picture is in
the encoder's normalized pixel space; de-normalizing it is the caller's job.
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
    blocks="decoder_layers",
    block_parts={
        "layernorm_before": "norm1",
        "attention.attention.query": "attn.q",
        "attention.attention.key": "attn.k",
        "attention.attention.value": "attn.v",
        "attention.output.dense": "attn.out",
        "layernorm_after": "norm2",
        "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2",
    },
    top={
        "decoder_embed.weight": "embed.weight",
        "decoder_embed.bias": "embed.bias",
        "decoder_pos_embed": "pos_embed",
        "trainable_cls_token": "cls_token",
        "decoder_norm.weight": "norm.weight",
        "decoder_norm.bias": "norm.bias",
        "decoder_pred.weight": "pred.weight",
        "decoder_pred.bias": "pred.bias",
    },
)

# transformers' ViTMAEConfig defaults (also what RAE's ViTXL config.json says), for what no JSON tells
HF_DEFAULTS = dict(decoder_num_attention_heads=16, layer_norm_eps=1e-12, hidden_act="gelu")
RGB = 3


@dataclass(frozen=True)
class DecoderConfig:
    vit: ViTConfig
    in_channels: int  # latent channels (768 for DINOv2-B, 1152 for SigLIP So400m)
    grid: int  # side of the decoder's token grid (32 for RAE-512, 16 for Scale-RAE)
    patch: int  # pixels per token side (16 for RAE, 14 for Scale-RAE)

    @property
    def image_size(self) -> int:
        return self.grid * self.patch

    @classmethod
    def from_weights(cls, tensors: dict[str, torch.Tensor], config: dict, name: str) -> DecoderConfig:
        """Sizes from the tensors; heads, epsilon and activation from the decoder's JSON (else defaults)."""
        missing = [k for k in ("decoder_pos_embed", "decoder_layers.0.intermediate.dense.weight") if k not in tensors]
        if missing:
            raise CheckpointError(
                f"{name} has no {missing[0]} tensor: it is not a complete RAE decoder; download it again."
            )
        width, in_channels = tensors["decoder_embed.weight"].shape
        positions = tensors["decoder_pos_embed"].shape[1] - 1
        outputs = tensors["decoder_pred.weight"].shape[0]
        grid, patch = math.isqrt(positions), math.isqrt(outputs // RGB)
        if grid * grid != positions or patch * patch * RGB != outputs:
            raise CheckpointError(
                f"{name}: {positions} positions and {outputs} outputs per token do not make a square RGB decoder."
            )
        vit = vit_config(tensors, config, HF_DEFAULTS, name, width=width, blocks=LAYOUT.blocks,
                         mlp_key="decoder_layers.0.intermediate.dense.weight", heads_key="decoder_num_attention_heads")
        return cls(vit, in_channels=in_channels, grid=grid, patch=patch)


class ViTMAEDecoder(nn.Module):
    """Latent tokens [B, h*w, C] of a square h x w grid -> pixels [B, 3, image_size, image_size]."""

    def __init__(self, config: DecoderConfig, dtype=None, device=None, operations=CastOps) -> None:
        super().__init__()
        self.config = config
        width, p = config.vit.width, dict(dtype=dtype, device=device)
        self.embed = operations.Linear(config.in_channels, width, **p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width, **p))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.grid**2, width, **p))
        self.blocks = Blocks(config.vit, dtype, device, operations)
        self.norm = operations.LayerNorm(width, eps=config.vit.eps, **p)
        self.pred = operations.Linear(width, config.patch**2 * RGB, **p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self._to_grid(self.embed(tokens))
        x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(x + self.pos_embed.to(x.dtype)))
        return self._unpatchify(self.pred(x)[:, 1:])

    def _to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Embedded tokens resampled (bilinear) to the decoder's grid when the latent has another size."""
        b, n, c = x.shape
        side, grid = math.isqrt(n), self.config.grid
        if side == grid and n == grid * grid:
            return x
        if side * side != n:
            raise ValueError(f"The RAE decoder takes a square latent grid; got {n} tokens.")
        x = x.reshape(b, side, side, c).permute(0, 3, 1, 2)
        x = F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False)
        return x.permute(0, 2, 3, 1).reshape(b, grid * grid, c)

    def _unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """Token (row, col) holds its patch as (py, px, rgb)."""
        b, g, p = patches.shape[0], self.config.grid, self.config.patch
        x = patches.reshape(b, g, g, p, p, RGB).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, RGB, g * p, g * p)

