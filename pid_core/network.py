"""The PiD network: a two-level pixel-space DiT conditioned on a caption, a low-quality latent and its noise level.

Patch level: joint text/image (MMDiT) blocks on 16x16 patch tokens, with the LQ latent injected through
sigma-aware gates before every other block. Pixel level: per-pixel blocks whose modulation comes from the
patch tokens, attending across patches. The output is the flow-matching velocity ``v = noise - x0``.

Module and parameter names follow the official checkpoints, so their state dicts load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import NetworkConfig
from .layers import (
    CastOps,
    FeedForward,
    RMSNorm,
    apply_rope,
    attention,
    heads_first,
    modulate,
    pixel_position_embedding,
    rope_1d,
    rope_2d,
    timestep_frequencies,
)
from .lq import LQProjection, SigmaAwareGate

Rope = tuple[torch.Tensor, torch.Tensor]


class JointAttention(nn.Module):
    """Attention over [text tokens, image tokens] with separate projections and q/k norms per stream."""

    def __init__(self, dim: int, heads: int, dtype=None, device=None, operations=CastOps) -> None:
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        lin = dict(dtype=dtype, device=device)
        self.qkv_x = operations.Linear(dim, 3 * dim, bias=False, **lin)
        self.qkv_y = operations.Linear(dim, 3 * dim, bias=False, **lin)
        self.q_norm_x, self.k_norm_x = RMSNorm(head_dim, **lin), RMSNorm(head_dim, **lin)
        self.q_norm_y, self.k_norm_y = RMSNorm(head_dim, **lin), RMSNorm(head_dim, **lin)
        self.proj_x = operations.Linear(dim, dim, **lin)
        self.proj_y = operations.Linear(dim, dim, **lin)

    def _qkv(self, linear: nn.Module, q_norm: nn.Module, k_norm: nn.Module, tokens: torch.Tensor, rope: Rope):
        q, k, v = linear(tokens).unflatten(-1, (3, self.heads, -1)).unbind(2)
        return apply_rope(q_norm(q), rope), apply_rope(k_norm(k), rope), v

    def forward(self, x: torch.Tensor, y: torch.Tensor, rope_x: Rope, rope_y: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        qx, kx, vx = self._qkv(self.qkv_x, self.q_norm_x, self.k_norm_x, x, rope_x)
        qy, ky, vy = self._qkv(self.qkv_y, self.q_norm_y, self.k_norm_y, y, rope_y)
        q, k, v = (torch.cat([heads_first(a), heads_first(b)], dim=2) for a, b in ((qy, qx), (ky, kx), (vy, vx)))
        out = attention(q, k, v)
        n_txt = y.shape[1]
        return self.proj_x(out[:, n_txt:]), self.proj_y(out[:, :n_txt])


class PatchBlock(nn.Module):
    """MMDiT block: adaLN-modulated joint attention and SwiGLU MLPs for the image and text streams."""

    def __init__(self, config: NetworkConfig, dtype=None, device=None, operations=CastOps) -> None:
        super().__init__()
        dim = config.hidden_size
        lin = dict(dtype=dtype, device=device)
        for name in ("norm_x1", "norm_y1", "norm_x2", "norm_y2"):
            setattr(self, name, RMSNorm(dim, **lin))
        self.attn = JointAttention(dim, config.num_heads, dtype, device, operations)
        self.mlp_x = FeedForward(dim, config.mlp_hidden, dtype, device, operations)
        self.mlp_y = FeedForward(dim, config.mlp_hidden, dtype, device, operations)
        self.adaLN_modulation_img = nn.Sequential(operations.Linear(dim, 6 * dim, **lin))
        self.adaLN_modulation_txt = nn.Sequential(operations.Linear(dim, 6 * dim, **lin))

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, cond: torch.Tensor, rope_x: Rope, rope_y: Rope, update_text: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sx, cx, gx, sx2, cx2, gx2 = self.adaLN_modulation_img(cond).chunk(6, dim=-1)
        sy, cy, gy, sy2, cy2, gy2 = self.adaLN_modulation_txt(cond).chunk(6, dim=-1)
        ax, ay = self.attn(modulate(self.norm_x1(x), sx, cx), modulate(self.norm_y1(y), sy, cy), rope_x, rope_y)
        x = x + gx * ax
        x = x + gx2 * self.mlp_x(modulate(self.norm_x2(x), sx2, cx2))
        if update_text:  # the last block's text stream feeds nothing, so it is skipped
            y = y + gy * ay
            y = y + gy2 * self.mlp_y(modulate(self.norm_y2(y), sy2, cy2))
        return x, y


class PixelAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dtype=None, device=None, operations=CastOps) -> None:
        super().__init__()
        self.heads = heads
        lin = dict(dtype=dtype, device=device)
        self.qkv = operations.Linear(dim, 3 * dim, bias=False, **lin)
        self.q_norm, self.k_norm = RMSNorm(dim // heads, **lin), RMSNorm(dim // heads, **lin)
        self.proj = operations.Linear(dim, dim, **lin)

    def forward(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(2)
        q, k = apply_rope(self.q_norm(q), rope), apply_rope(self.k_norm(k), rope)
        return self.proj(attention(heads_first(q), heads_first(k), heads_first(v)))


class PixelMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dtype=None, device=None, operations=CastOps) -> None:
        super().__init__()
        self.fc1 = operations.Linear(dim, hidden, dtype=dtype, device=device)
        self.fc2 = operations.Linear(hidden, dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class PixelBlock(nn.Module):
    """Per-pixel block. Pixels of one patch are modulated by that patch's token; attention runs across patches
    on the patch's pixels flattened and compressed to one token."""

    def __init__(self, config: NetworkConfig, dtype=None, device=None, operations=CastOps) -> None:
        super().__init__()
        pd, pixels = config.pixel_hidden_size, config.patch_size**2
        lin = dict(dtype=dtype, device=device)
        self.norm1, self.norm2 = RMSNorm(pd, **lin), RMSNorm(pd, **lin)
        self.attn = PixelAttention(config.pixel_attn_hidden_size, config.pixel_num_heads, dtype, device, operations)
        self.mlp = PixelMLP(pd, 4 * pd, dtype, device, operations)
        self.compress_to_attn = operations.Linear(pixels * pd, config.pixel_attn_hidden_size, **lin)
        self.expand_from_attn = operations.Linear(config.pixel_attn_hidden_size, pixels * pd, **lin)
        self.adaLN_modulation = nn.Sequential(operations.Linear(config.hidden_size, 6 * pixels * pd, **lin))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rope: Rope, batch: int) -> torch.Tensor:
        """x: [B*L, P*P, pd] pixels per patch; cond: [B*L, D] one conditioning token per patch."""
        n, pixels, pd = x.shape
        # the modulation is laid out per pixel: [pixel, chunk, channel]
        mods = self.adaLN_modulation(cond).view(n, pixels, 6 * pd).chunk(6, dim=-1)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods
        h = modulate(self.norm1(x), shift1, scale1).reshape(batch, n // batch, pixels * pd)
        h = self.expand_from_attn(self.attn(self.compress_to_attn(h), rope))
        x = x + gate1 * h.reshape(n, pixels, pd)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class PatchEmbedder(nn.Module):
    """Linear embedding (with an optional RMSNorm after it); used for patches and caption tokens."""

    def __init__(self, dim_in: int, dim: int, norm: bool, dtype=None, device=None, operations=CastOps) -> None:
        super().__init__()
        self.proj = operations.Linear(dim_in, dim, dtype=dtype, device=device)
        self.norm = RMSNorm(dim, dtype=dtype, device=device) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return self.norm(x) if self.norm is not None else x


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, dtype=None, device=None, operations=CastOps) -> None:
        super().__init__()
        lin = dict(dtype=dtype, device=device)
        self.mlp = nn.Sequential(operations.Linear(256, dim, **lin), nn.SiLU(), operations.Linear(dim, dim, **lin))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_frequencies(t))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, dtype=None, device=None, operations=CastOps) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, dtype=dtype, device=device)
        self.linear = operations.Linear(dim, 3, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, C*p*p] with row-major tokens and features ordered (c, ky, kx)."""
    return F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)


class PiDNetwork(nn.Module):
    """``forward(x, t, caption, latent, sigma) -> velocity``.

    x: [B, 3, H, W] noisy image (H, W multiples of the patch size); t: [B] timestep already x1000;
    caption: [B, Ltxt, txt_embed_dim] caption embedding (no mask); latent: [B, C, h, w] in the network's
    latent frame; sigma: [B] PiD degrade sigma in [0, 1].
    """

    def __init__(self, config: NetworkConfig, dtype=None, device=None, operations=CastOps) -> None:
        super().__init__()
        config.validate()
        self.config = config
        c, lin = config, dict(dtype=dtype, device=device)
        self.s_embedder = PatchEmbedder(3 * c.patch_size**2, c.hidden_size, False, dtype, device, operations)
        self.t_embedder = TimestepEmbedder(c.hidden_size, dtype, device, operations)
        self.y_embedder = PatchEmbedder(c.txt_embed_dim, c.hidden_size, True, dtype, device, operations)
        self.y_pos_embedding = nn.Parameter(torch.zeros(1, c.txt_max_length, c.hidden_size, **lin))
        self.pixel_embedder = PatchEmbedder(3, c.pixel_hidden_size, False, dtype, device, operations)
        self.patch_blocks = nn.ModuleList(PatchBlock(c, dtype, device, operations) for _ in range(c.patch_depth))
        self.pixel_blocks = nn.ModuleList(PixelBlock(c, dtype, device, operations) for _ in range(c.pixel_depth))
        self.final_layer = FinalLayer(c.pixel_hidden_size, dtype, device, operations)
        self.lq_proj = LQProjection(c, dtype, device, operations)
        if c.pit_lq_inject:
            self.pit_lq_gate = SigmaAwareGate(c.hidden_size, c.gate_type, dtype, device, operations)

    def embed_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B*L, P*P, pd]: per-pixel features plus the full-image sin-cos position."""
        b, _, h, w = x.shape
        p, pd = self.config.patch_size, self.config.pixel_hidden_size
        col, row = pixel_position_embedding(h, w, pd)
        pos = torch.cat([col[None].expand(h, w, pd // 2), row[:, None].expand(h, w, pd // 2)], dim=-1)
        feats = self.pixel_embedder(x.permute(0, 2, 3, 1).contiguous()) + pos.to(device=x.device, dtype=x.dtype)
        feats = feats.reshape(b, h // p, p, w // p, p, pd).permute(0, 1, 3, 2, 4, 5)
        return feats.reshape(-1, p * p, pd)

    def unembed_pixels(self, pixels: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
        p = self.config.patch_size
        out = self.final_layer(pixels).reshape(b, h // p, w // p, p, p, 3)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(b, 3, h, w)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, caption: torch.Tensor, latent: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        c = self.config
        b, _, h, w = x.shape
        grid = (h // c.patch_size, w // c.patch_size)
        lq_tokens, pit_tokens = self.lq_proj(latent, grid)

        s = self.s_embedder(patchify(x, c.patch_size))
        t_emb = self.t_embedder(t)[:, None]
        caption = caption[:, : c.txt_max_length]
        y = self.y_embedder(caption) + self.y_pos_embedding[:, : caption.shape[1]].to(x.device)
        cond = F.silu(t_emb)
        rope_img = rope_2d(c.hidden_size // c.num_heads, *grid, c.rope_ref // c.patch_size)
        rope_txt = rope_1d(c.hidden_size // c.num_heads, caption.shape[1])

        for i, block in enumerate(self.patch_blocks):
            if i % c.lq_interval == 0:
                s = self.lq_proj.gate_modules[i // c.lq_interval](s, lq_tokens[i // c.lq_interval], sigma)
            s, y = block(s, y, cond, rope_img, rope_txt, update_text=i < c.patch_depth - 1)

        s = F.silu(t_emb + s)  # the raw timestep embedding, not the silu'd `cond`
        if pit_tokens is not None:
            s = self.pit_lq_gate(s, pit_tokens, sigma)
        s_cond = s.reshape(-1, c.hidden_size)

        pixels = self.embed_pixels(x)
        rope_pix = rope_2d(c.pixel_attn_hidden_size // c.pixel_num_heads, *grid, c.rope_ref // c.patch_size)
        for block in self.pixel_blocks:
            pixels = block(pixels, s_cond, rope_pix, b)
        return self.unembed_pixels(pixels, b, h, w)
