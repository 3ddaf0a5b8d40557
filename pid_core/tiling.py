"""Tiled decoding: the network's forward on overlapping tiles, blended into one velocity for the whole image.

Only the forward is tiled. The sampler, its noise and its re-noising stay whole-image, and so does the LQ
projection (its convolutions and GroupNorms must see the whole latent map): its tokens are computed once per
decode and cropped per tile. Each tile runs with the positions of its place in the whole image (RoPE tables
and NTK theta of the whole grid, pixel sin-cos at global coordinates; see ``pid_core.network.Window``).

Tiles are laid out in patch units, all of one size: along each axis, as few tiles as give at least the
requested overlap, spread evenly, the last one ending on the border (so a size that is not a multiple of the
tile only makes the overlaps wider). Their outputs are blended with smooth weights: along each axis, a
squared-sine ramp across each overlap, normalised so that the weights of all tiles sum to one at every
pixel; a tile's own borders, where its attention saw least context, get the least weight.

Within a tile the patch-level attention sees only that tile, so a tiled decode is close to, not equal to,
the whole one; ``bench/decode_bench.py`` reports the PSNR between them and a seam score.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

from .config import NetworkConfig
from .memory import activation_bytes, working_bytes
from .network import PiDNetwork, Window

TILING_MODES = ("auto", "off", "on")
DEFAULT_TILE = 1024  # pixels; the largest tile "on" picks by itself
MIN_TILE = 256  # pixels; smaller tiles give the patch attention too little context

TileCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class TilePlan:
    """Overlapping tiles covering a patch grid: all ``tile`` patches large, at ``rows`` x ``cols`` origins."""

    grid: tuple[int, int]  # the whole image's patch grid (rows, columns)
    tile: tuple[int, int]  # tile size in patches (rows, columns)
    rows: tuple[int, ...]  # top patch of each row of tiles
    cols: tuple[int, ...]  # left patch of each column of tiles
    patch_size: int = 16
    tile_batch: int = 1  # tiles stacked into one network call

    @property
    def count(self) -> int:
        return len(self.rows) * len(self.cols)

    @property
    def tile_pixels(self) -> tuple[int, int]:
        return self.tile[0] * self.patch_size, self.tile[1] * self.patch_size

    @property
    def windows(self) -> list[Window]:
        """The tiles row by row."""
        return [Window(top, left, *self.grid) for top in self.rows for left in self.cols]

    @cached_property
    def axis_weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-pixel blend weights of each row of tiles and of each column of tiles (fp32, summing to one)."""
        p = self.patch_size
        return (
            blend_weights(self.grid[0] * p, [r * p for r in self.rows], self.tile[0] * p),
            blend_weights(self.grid[1] * p, [c * p for c in self.cols], self.tile[1] * p),
        )

    def weight(self, index: int) -> torch.Tensor:
        """The [tile_h, tile_w] pixel weights of tile ``index`` (row-major order of :attr:`windows`)."""
        row_w, col_w = self.axis_weights
        i, j = divmod(index, len(self.cols))
        return row_w[i][:, None] * col_w[j][None, :]

    def describe(self) -> str:
        th, tw = self.tile_pixels
        return f"{self.count} tiles of {tw}x{th} px ({len(self.cols)} x {len(self.rows)})"


def axis_origins(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Origins of the fewest ``tile``-long tiles covering ``length`` with at least ``overlap`` between neighbours."""
    if tile >= length:
        return (0,)
    if not 0 <= overlap < tile:
        raise ValueError(f"The tile overlap ({overlap} patches) must be smaller than the tile ({tile} patches).")
    count = math.ceil((length - overlap) / (tile - overlap))
    return tuple(round(k * (length - tile) / (count - 1)) for k in range(count))


def blend_weights(length: int, origins: list[int], tile: int) -> list[torch.Tensor]:
    """1-D weights, one [tile] tensor per tile, that sum to one at every position of ``length``.

    Each tile ramps up across its overlap with the previous tile and down across its overlap with the next
    one (``sin^2``, sampled at pixel centres, so never exactly zero), then all are divided by their sum.
    """
    pos = torch.arange(tile, dtype=torch.float64) + 0.5
    raw = []
    for k, start in enumerate(origins):
        w = torch.ones(tile, dtype=torch.float64)
        if k > 0:  # overlap with the previous tile: [start, end of previous)
            ramp = origins[k - 1] + tile - start
            w = w * torch.sin(0.5 * math.pi * (pos / ramp).clamp(max=1.0)) ** 2
        if k < len(origins) - 1:  # overlap with the next tile: [start of next, end)
            ramp = start + tile - origins[k + 1]
            w = w * torch.sin(0.5 * math.pi * ((tile - pos) / ramp).clamp(max=1.0)) ** 2
        raw.append(w)
    total = torch.zeros(length, dtype=torch.float64)
    for start, w in zip(origins, raw):
        total[start : start + tile] += w
    return [(w / total[start : start + tile]).float() for start, w in zip(origins, raw)]


def plan_tiles(
    grid: tuple[int, int],
    tile: int | tuple[int, int],
    overlap: int | None = None,
    patch_size: int = 16,
    tile_batch: int = 1,
) -> TilePlan:
    """A plan of tiles of ``tile`` patches (clamped to the grid) overlapping by at least ``overlap`` patches
    (default: a quarter of the tile, at least 2)."""
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    th, tw = min(th, grid[0]), min(tw, grid[1])
    if th < 1 or tw < 1:
        raise ValueError(f"A tile must be at least one patch ({patch_size} px) on each side, got {th}x{tw} patches.")
    if overlap is None:
        overlap = max(2, min(th, tw) // 4)
    rows = axis_origins(grid[0], th, min(overlap, th - 1))
    cols = axis_origins(grid[1], tw, min(overlap, tw - 1))
    return TilePlan(grid, (th, tw), rows, cols, patch_size, max(1, min(tile_batch, len(rows) * len(cols))))


def choose_plan(
    config: NetworkConfig,
    height: int,
    width: int,
    *,
    mode: str = "auto",
    tile_size: int | None = None,
    budget: int | None = None,
    batch: int = 1,
    items_per_call: int | None = None,
    compute_dtype: torch.dtype = torch.bfloat16,
    weight_dtype: torch.dtype | None = None,
) -> TilePlan | None:
    """Whole (None) or which tiles, for ``mode`` "auto" | "off" | "on".

    "auto" decodes whole when that fits ``budget`` bytes of working memory (or when no budget is known), and
    tiles otherwise; "on" always tiles. ``tile_size`` (pixels, a multiple of the patch size) fixes the tile;
    without it, the fewest tiles per side whose decode fits ``budget`` ("on": tiles of at most 1024 px).
    Small tiles are batched when several fit the budget at once (up to 1024 x 1024 pixels per call).
    """
    if mode not in TILING_MODES:
        raise ValueError(f"Unknown tiling mode {mode!r}; choose one of: {', '.join(TILING_MODES)}.")
    p = config.patch_size
    grid = (height // p, width // p)
    if tile_size is not None and (isinstance(tile_size, bool) or tile_size < p or tile_size % p):
        raise ValueError(f"The tile size must be a positive multiple of {p} pixels, got {tile_size!r}.")
    if mode == "off":
        return None

    def need(tile: tuple[int, int] | None, tile_batch: int = 1) -> int:
        phases = activation_bytes(config, height, width, batch=batch, compute_dtype=compute_dtype,
                                  weight_dtype=weight_dtype, tile=tile, tile_batch=tile_batch,
                                  items_per_call=items_per_call)
        return working_bytes(phases)

    if mode == "auto" and (budget is None or need(None) <= budget):
        return None
    if tile_size is None:
        tile_size = _tile_for_budget(need, grid, p, budget, DEFAULT_TILE if mode == "on" else None)
    plan = plan_tiles(grid, tile_size // p, patch_size=p)
    if mode == "auto" and plan.count == 1:
        return None
    if budget is not None and plan.count > 1:
        # batch small tiles while they fit, up to a 1024 px tile's worth of pixels per call: larger calls keep a
        # GPU no busier (and a CPU not at all), they only take more memory
        most = max(1, (DEFAULT_TILE // p) ** 2 // (plan.tile[0] * plan.tile[1]))
        tile_batch = 1
        while tile_batch < min(plan.count, most) and need(plan.tile_pixels, tile_batch + 1) <= budget:
            tile_batch += 1
        plan = plan_tiles(grid, plan.tile, patch_size=p, tile_batch=tile_batch)
    return plan


def _tile_for_budget(
    need: Callable[..., int], grid: tuple[int, int], p: int, budget: int | None, cap: int | None
) -> int:
    """The tile side (pixels) of the fewest tiles per side, overlapping by a quarter, whose decode fits ``budget``.

    n tiles of side T with overlap T/4 cover ``T (1 + 3 (n - 1) / 4)``, so T is the long side over that.
    """
    longest = max(grid)
    for n in range(2, longest + 1):
        tile = math.ceil(longest / (1 + 0.75 * (n - 1))) * p
        if tile < MIN_TILE:
            break
        if cap is not None and tile > cap:
            continue
        if budget is None or need((min(tile, grid[0] * p), min(tile, grid[1] * p))) <= budget:
            return tile
    return min(MIN_TILE, longest * p)  # nothing fits: the smallest sensible tile; the caller's estimate warns


def crop_tokens(tokens: torch.Tensor, window: Window, tile: tuple[int, int]) -> torch.Tensor:
    """A tile's rows of whole-image tokens [B, grid_h * grid_w, C] -> [B, tile_h * tile_w, C]."""
    return window.crop(tokens, tile)


def tiled_forward(
    network: PiDNetwork,
    x: torch.Tensor,
    t: torch.Tensor,
    caption: torch.Tensor,
    sigma: torch.Tensor,
    lq_tokens: torch.Tensor,
    plan: TilePlan,
    callback: TileCallback | None = None,
) -> torch.Tensor:
    """The network's velocity for the whole image x [B, 3, H, W], computed tile by tile and blended (fp32).

    ``lq_tokens`` are the whole image's (``network.project_latent(latent, plan.grid)``). ``plan.tile_batch``
    tiles go through the network at once. ``callback(done, total)`` runs after each call; raising in it stops.
    """
    b = x.shape[0]
    p = plan.patch_size
    if tuple(x.shape[-2:]) != (plan.grid[0] * p, plan.grid[1] * p):
        raise ValueError(
            f"The tile plan is for a {plan.grid[1] * p}x{plan.grid[0] * p} image, got {x.shape[-1]}x{x.shape[-2]}; "
            "plan the tiles for this image."
        )
    th, tw = plan.tile
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    windows = plan.windows
    for first in range(0, len(windows), plan.tile_batch):
        group = windows[first : first + plan.tile_batch]
        boxes = [(w.top * p, w.left * p) for w in group]
        xs = torch.cat([x[:, :, top : top + th * p, left : left + tw * p] for top, left in boxes])
        tokens = torch.cat([crop_tokens(lq_tokens, w, plan.tile) for w in group])
        n = len(group)
        v = network(xs, t.repeat(n), caption.repeat(n, 1, 1), None, sigma.repeat(n), lq_tokens=tokens,
                    window=group if n > 1 else group[0])
        del xs, tokens
        for k, (top, left) in enumerate(boxes):
            weight = plan.weight(first + k).to(x.device)
            out[:, :, top : top + th * p, left : left + tw * p] += v[k * b : (k + 1) * b].float() * weight
        del v
        if callback is not None:
            callback(first + n, len(windows))
    return out
