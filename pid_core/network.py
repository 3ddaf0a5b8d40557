"""The PiD network: a two-level pixel-space DiT conditioned on a caption, a low-quality latent and its noise level.

Patch level: joint text/image (MMDiT) blocks on 16x16 patch tokens, with the LQ latent injected through
sigma-aware gates before every other block. Pixel level: per-pixel blocks whose modulation comes from the
patch tokens, attending across patches. The output is the flow-matching velocity ``v = noise - x0``.

Module and parameter names follow the official checkpoints, so their state dicts load as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
    matmul_dtype,
    modulate,
    pixel_position_embedding,
    rope_1d,
    rope_2d,
    timestep_frequencies,
)
from .lq import LQProjection, SigmaAwareGate

Rope = tuple[torch.Tensor, torch.Tensor]

# Patches per chunk in the pixel-level blocks. Their per-pixel modulation is 6 * 16 * 256 = 24576 values per
# patch: 3.2 GB in bf16 for a whole 4096 px image, 50 MB for a chunk of 1024 patches (a 512 px image). Chunks
# cost no extra arithmetic, and a thousand rows keep the matrix kernels busy.
PIXEL_CHUNK_PATCHES = 1024


def row_chunks(n: int, chunk: int | None) -> list[slice]:
    """Slices of ``range(n)`` of ``chunk`` rows (rounded to a multiple of 16), the last one taking a short tail.

    Matrix kernels pick their blocking by row count, and on small counts (fewer than ~12 rows) may take another
    code path; chunks of at least 16 rows stay on the path of the whole layer. (Whether the sums then come out
    bit-identical depends on the CPU's kernels; they agree to rounding in any case.)
    """
    if chunk is None or n <= chunk:
        return [slice(0, n)]
    step = max(16, chunk - chunk % 16)
    starts = list(range(0, n, step))
    if len(starts) > 1 and n - starts[-1] < 16:
        starts.pop()
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [n])]


@dataclass(frozen=True)
class Window:
    """Where a tile sits in the whole image: its top-left patch, and the whole image's patch grid.

    A tile runs with the positions of its place in the whole picture: the 2-D RoPE tables (positions
    ``linspace(0, 16, n)`` and NTK theta of the whole grid) are sliced, and the pixel sin-cos embedding
    uses global pixel coordinates.
    """

    top: int
    left: int
    grid_h: int
    grid_w: int

    def check(self, tile: tuple[int, int]) -> None:
        th, tw = tile
        if self.top < 0 or self.left < 0 or self.top + th > self.grid_h or self.left + tw > self.grid_w:
            raise ValueError(
                f"A {th}x{tw}-patch tile at patch ({self.top}, {self.left}) does not fit the whole image's "
                f"{self.grid_h}x{self.grid_w} patch grid; place tiles inside the image."
            )

    def crop(self, table: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
        """Rows of a whole-grid, row-major table [..., grid_h * grid_w, C] that belong to the tile."""
        th, tw = tile
        grid = table.unflatten(-2, (self.grid_h, self.grid_w))
        return grid[..., self.top : self.top + th, self.left : self.left + tw, :].flatten(-3, -2)


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
        dtype = matmul_dtype(v)  # q and k leave norm and RoPE in fp32; the attention takes them in this dtype
        return apply_rope(q_norm(q), rope).to(dtype), apply_rope(k_norm(k), rope).to(dtype), v

    def forward(self, x: torch.Tensor, y: torch.Tensor, rope_x: Rope, rope_y: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        qx, kx, vx = self._qkv(self.qkv_x, self.q_norm_x, self.k_norm_x, x, rope_x)
        qy, ky, vy = self._qkv(self.qkv_y, self.q_norm_y, self.k_norm_y, y, rope_y)
        q, k, v = (heads_first(torch.cat([a, b], dim=1)) for a, b in ((qy, qx), (ky, kx), (vy, vx)))
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
        q = heads_first(apply_rope(self.q_norm(q), rope))  # each cast to the compute dtype before the next is made
        k = heads_first(apply_rope(self.k_norm(k), rope))
        return self.proj(attention(q, k, heads_first(v)))


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
        self.pixels = pixels

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[n, D] -> six [n, P*P, pd] tensors; the Linear's output is laid out per pixel: [pixel, chunk, channel]."""
        return self.adaLN_modulation(cond).view(cond.shape[0], self.pixels, -1).chunk(6, dim=-1)

    def modulation_part(self, first: int, last: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The adaLN Linear's weight and bias rows of modulation tensors ``first``..``last - 1`` only, cast for
        ``like``: a chunked block computes each tensor once, in the half of the block that uses it."""
        linear = self.adaLN_modulation[0]
        dtype = matmul_dtype(like)

        def rows(p: torch.Tensor) -> torch.Tensor:
            return p.view(self.pixels, 6, -1, *p.shape[1:])[:, first:last].flatten(0, 2).to(like.device, dtype)

        return rows(linear.weight), rows(linear.bias)

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, rope: Rope, batch: int, chunk: int | None = None
    ) -> torch.Tensor:
        """x: [B*L, P*P, pd] pixels per patch; cond: [B*L, D] one conditioning token per patch.

        With ``chunk``, everything but the attention runs ``chunk`` patches at a time, so the per-pixel
        modulation ([B*L, 6*P*P*pd]) and the MLP's hidden layer never exist whole. The result is the same.
        """
        n, pixels, pd = x.shape
        parts = row_chunks(n, chunk)
        if len(parts) == 1:
            shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond)
            h = modulate(self.norm1(x), shift1, scale1).reshape(batch, n // batch, pixels * pd)
            h = self.expand_from_attn(self.attn(self.compress_to_attn(h), rope))
            x = x + gate1 * h.reshape(n, pixels, pd)
            return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))

        before = self.modulation_part(0, 2, cond)  # shift1, scale1
        compressed = torch.cat([self._compress(x[part], cond[part], before) for part in parts])
        del before
        attended = self.attn(compressed.view(batch, n // batch, -1), rope).flatten(0, 1)
        del compressed
        after = self.modulation_part(2, 6, cond)  # gate1, shift2, scale2, gate2
        out = None
        for part in parts:
            h = self._finish(x[part], cond[part], attended[part], after)
            if out is None:
                out = h.new_empty((n, pixels, pd))
            out[part] = h
        return out

    # the two halves of a chunk, as methods so that each chunk's temporaries are freed before the next one's
    def _compress(self, x: torch.Tensor, cond: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        shift1, scale1 = F.linear(cond, *rows).view(cond.shape[0], self.pixels, -1).chunk(2, dim=-1)
        return self.compress_to_attn(modulate(self.norm1(x), shift1, scale1).flatten(1))

    def _finish(
        self, x: torch.Tensor, cond: torch.Tensor, attended: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        gate1, shift2, scale2, gate2 = F.linear(cond, *rows).view(cond.shape[0], self.pixels, -1).chunk(4, dim=-1)
        x = x + gate1 * self.expand_from_attn(attended).view(x.shape)
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
        # patches per chunk in the pixel-level blocks; None runs them whole (the reference's memory profile)
        self.pixel_chunk: int | None = PIXEL_CHUNK_PATCHES

    def project_latent(self, latent: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The LQ branch's tokens [B, L, lq_hidden_dim] for a ``grid`` of patches (the whole image's).

        They depend on the latent only, so a decode computes them once; tiles take slices of them.
        """
        return self.lq_proj.features(latent, grid)

    def embed_pixels(self, x: torch.Tensor, windows: list[Window] | None = None) -> torch.Tensor:
        """[B, 3, H, W] -> [B*L, P*P, pd]: per-pixel features plus the sin-cos position of each pixel in the whole image.

        The position tables are added per half (columns, rows) in patch order, so neither the [H, W, pd]
        position grid nor a second copy of the pixel stream is ever built.
        """
        b, _, h, w = x.shape
        p, pd = self.config.patch_size, self.config.pixel_hidden_size
        hs, ws, half = h // p, w // p, pd // 2
        pixels = x.reshape(b, 3, hs, p, ws, p).permute(0, 2, 4, 3, 5, 1).reshape(b * hs * ws, p * p, 3)
        feats = self.pixel_embedder(pixels).view(b, hs, ws, p, p, pd)
        if windows is None:
            col, row = pixel_position_embedding(h, w, pd)
            col, row = col[None], row[None]
        else:  # each window's columns and rows of its whole image's tables, repeated for its items
            cols, rows = [], []
            for win in windows:
                whole_col, whole_row = pixel_position_embedding(win.grid_h * p, win.grid_w * p, pd)
                cols.append(whole_col[win.left * p : win.left * p + w])
                rows.append(whole_row[win.top * p : win.top * p + h])
            per_window = b // len(windows)
            col, row = (torch.stack(t).repeat_interleave(per_window, 0) for t in (cols, rows))
        col = col.to(device=x.device, dtype=x.dtype).view(-1, 1, ws, 1, p, half)
        row = row.to(device=x.device, dtype=x.dtype).view(-1, hs, 1, p, 1, half)
        out = torch.empty(feats.shape, dtype=torch.result_type(feats, col), device=x.device)
        torch.add(feats[..., :half], col, out=out[..., :half])
        torch.add(feats[..., half:], row, out=out[..., half:])
        return out.view(-1, p * p, pd)

    def unembed_pixels(self, pixels: torch.Tensor, b: int, h: int, w: int, chunk: int | None = None) -> torch.Tensor:
        p = self.config.patch_size
        parts = row_chunks(pixels.shape[0], chunk)
        out = self.final_layer(pixels) if len(parts) == 1 else torch.cat([self.final_layer(pixels[k]) for k in parts])
        out = out.reshape(b, h // p, w // p, p, p, 3)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(b, 3, h, w)

    def _windows(
        self, window: Window | Sequence[Window] | None, tile: tuple[int, int], batch: int
    ) -> list[Window] | None:
        if window is None:
            return None
        windows = [window] if isinstance(window, Window) else list(window)
        if not windows or batch % len(windows):
            raise ValueError(
                f"{batch} images cannot be shared among {len(windows)} windows; stack the same number of "
                "images per window, window after window."
            )
        for w in windows:
            w.check(tile)
        return windows

    def _image_rope(self, head_dim: int, tile: tuple[int, int], windows: list[Window] | None, batch: int) -> Rope:
        """2-D RoPE for the image tokens: of the whole grid when untiled, else each window's slice of its whole grid."""
        ref = self.config.rope_ref // self.config.patch_size
        if windows is None:
            return rope_2d(head_dim, *tile, ref)
        wholes: dict[tuple[int, int], Rope] = {}  # windows of one decode share their whole grid
        crops = []
        for w in windows:
            if (w.grid_h, w.grid_w) not in wholes:
                wholes[w.grid_h, w.grid_w] = rope_2d(head_dim, w.grid_h, w.grid_w, ref)
            crops.append(tuple(w.crop(r, tile) for r in wholes[w.grid_h, w.grid_w]))
        if len(crops) == 1:
            return crops[0]
        per_window = batch // len(windows)
        return tuple(torch.stack([c[i] for c in crops]).repeat_interleave(per_window, 0) for i in range(2))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        caption: torch.Tensor,
        latent: torch.Tensor | None,
        sigma: torch.Tensor,
        *,
        lq_tokens: torch.Tensor | None = None,
        window: Window | Sequence[Window] | None = None,
    ) -> torch.Tensor:
        """See the class docstring. Tiles and precomputed LQ tokens:

        ``lq_tokens``: [B, L, lq_hidden_dim], the :meth:`project_latent` tokens of x's patches (then ``latent``
        is not used); without them the latent is projected onto x's grid. ``window``: x is a tile of a larger
        image (one window for the whole batch, or one per group of ``B / len(window)`` consecutive items);
        it then needs ``lq_tokens`` cropped from the whole image's (see ``pid_core.tiling``).
        """
        c = self.config
        b, _, h, w = x.shape
        grid = (h // c.patch_size, w // c.patch_size)
        windows = self._windows(window, grid, b)
        if lq_tokens is None:
            if windows is not None:
                raise ValueError(
                    "A tile needs its crop of the whole image's LQ tokens (lq_tokens), because the LQ projection "
                    "must see the whole latent; use pid_core.tiling.tiled_forward."
                )
            lq_tokens = self.project_latent(latent, grid)
        elif tuple(lq_tokens.shape[:2]) != (b, grid[0] * grid[1]):
            raise ValueError(
                f"lq_tokens has shape {tuple(lq_tokens.shape)}, but a {h}x{w} input of batch {b} needs "
                f"[{b}, {grid[0] * grid[1]}, {c.lq_hidden_dim}]; crop the whole image's tokens to this tile."
            )

        s = self.s_embedder(patchify(x, c.patch_size))
        t_emb = self.t_embedder(t)[:, None]
        caption = caption[:, : c.txt_max_length]
        y = self.y_embedder(caption) + self.y_pos_embedding[:, : caption.shape[1]].to(x.device)
        cond = F.silu(t_emb)
        rope_img = self._image_rope(c.hidden_size // c.num_heads, grid, windows, b)
        rope_txt = rope_1d(c.hidden_size // c.num_heads, caption.shape[1])

        for i, block in enumerate(self.patch_blocks):
            if i % c.lq_interval == 0:  # heads are applied one at a time: only one [B, L, D] LQ tensor is alive
                k = i // c.lq_interval
                s = self.lq_proj.gate_modules[k](s, self.lq_proj.output_heads[k](lq_tokens), sigma)
            s, y = block(s, y, cond, rope_img, rope_txt, update_text=i < c.patch_depth - 1)

        s = F.silu(t_emb + s)  # the raw timestep embedding, not the silu'd `cond`
        if c.pit_lq_inject:
            s = self.pit_lq_gate(s, self.lq_proj.pit_head(lq_tokens), sigma)
        s_cond = s.reshape(-1, c.hidden_size)
        del s, y, lq_tokens

        pixels = self.embed_pixels(x, windows)
        rope_pix = self._image_rope(c.pixel_attn_hidden_size // c.pixel_num_heads, grid, windows, b)
        for block in self.pixel_blocks:
            pixels = block(pixels, s_cond, rope_pix, b, self.pixel_chunk)
        del s_cond
        return self.unembed_pixels(pixels, b, h, w, self.pixel_chunk)
