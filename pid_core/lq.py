"""The low-quality (LQ) latent branch: a small conv net that turns the diffusion latent into one token
sequence per injection point, and the sigma-aware gates that add those tokens to the patch stream.

The gate closes as the latent gets noisier: ``g = sigmoid(W [x; lq] + b - exp(log_alpha) * sigma)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import GateType, NetworkConfig
from .layers import CastOps


class SigmaAwareGate(nn.Module):
    """``x + g * lq`` with g per token and channel (v1) or one scalar per token (v1.5)."""

    def __init__(self, dim: int, gate_type: GateType, dtype=None, device=None, operations=CastOps) -> None:
        super().__init__()
        out = dim if gate_type == GateType.PER_TOKEN_PER_DIM else 1
        self.log_alpha = nn.Parameter(torch.zeros((), dtype=dtype, device=device))
        self.content_proj = operations.Linear(2 * dim, out, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, lq: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        alpha = self.log_alpha.to(device=x.device, dtype=torch.float32).exp()
        logits = self.content_proj(torch.cat([x, lq], dim=-1)) - alpha * sigma.float()[:, None, None]
        return x + torch.sigmoid(logits) * lq


class ResBlock(nn.Module):
    def __init__(self, dim: int, padding: str, dtype=None, device=None, operations=CastOps) -> None:
        super().__init__()
        conv = dict(kernel_size=3, padding=1, padding_mode=padding, dtype=dtype, device=device)
        self.block = nn.Sequential(
            operations.GroupNorm(4, dim, eps=1e-5, dtype=dtype, device=device),
            nn.SiLU(),
            operations.Conv2d(dim, dim, **conv),
            operations.GroupNorm(4, dim, eps=1e-5, dtype=dtype, device=device),
            nn.SiLU(),
            operations.Conv2d(dim, dim, **conv),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def unpack_patches(z: torch.Tensor, factor: int) -> torch.Tensor:
    """Inverse of a ``factor x factor`` patchify: channel ``c*f*f + i*f + j`` goes to pixel ``(y*f+i, x*f+j)``."""
    if factor == 1:
        return z
    b, c, h, w = z.shape
    z = z.reshape(b, c // factor**2, factor, factor, h, w)
    return z.permute(0, 1, 4, 2, 5, 3).reshape(b, c // factor**2, h * factor, w * factor)


class LQProjection(nn.Module):
    """Latent -> per-injection-point tokens on the patch grid."""

    def __init__(self, config: NetworkConfig, dtype=None, device=None, operations=CastOps) -> None:
        super().__init__()
        self.unpatchify = config.latent_unpatchify
        hd, pad = config.lq_hidden_dim, config.lq_padding
        conv = dict(kernel_size=3, padding=1, padding_mode=pad, dtype=dtype, device=device)
        self.latent_proj = nn.Sequential(
            operations.Conv2d(config.lq_conv_in_channels, hd, **conv),
            nn.SiLU(),
            operations.Conv2d(hd, hd, **conv),
            *(ResBlock(hd, pad, dtype, device, operations) for _ in range(config.lq_num_res_blocks)),
        )
        linear = dict(dtype=dtype, device=device)
        self.output_heads = nn.ModuleList(
            operations.Linear(hd, config.hidden_size, **linear) for _ in range(config.num_lq_outputs)
        )
        self.gate_modules = nn.ModuleList(
            SigmaAwareGate(config.hidden_size, config.gate_type, dtype, device, operations)
            for _ in range(config.num_lq_outputs)
        )
        self.pit_head = operations.Linear(hd, config.hidden_size, **linear) if config.pit_lq_inject else None

    def features(self, latent: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The latent projected onto the ``grid`` of patches: tokens [B, L, lq_hidden_dim], row-major.

        The convolutions and GroupNorms see the whole map, so tiles must take slices of these tokens
        (the heads and gates that follow act per token).
        """
        z = unpack_patches(latent, self.unpatchify)
        # size-targeted legacy nearest: every latent cell covers a block of patches (floor indexing)
        z = F.interpolate(z, size=grid, mode="nearest")
        return self.latent_proj(z).flatten(2).transpose(1, 2)

    def forward(self, latent: torch.Tensor, grid: tuple[int, int]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Returns the tokens [B, L, D] for each patch-level injection, and those of the pixel-level one (v1.5)."""
        tokens = self.features(latent, grid)
        heads = [head(tokens) for head in self.output_heads]
        return heads, (self.pit_head(tokens) if self.pit_head is not None else None)
