"""Small building blocks of the PiD network: layer operations, norms, embeddings and rotary positions.

Layers are created through an ``operations`` namespace (``ops.Linear``, ``ops.Conv2d``, ``ops.GroupNorm``,
``ops.LayerNorm``) so that ComfyUI can hand in ``comfy.ops`` for casting and partial loading. The default,
``CastOps``, casts each weight to the dtype of its input: weights may then be stored in bf16 while a block
computes in fp32 (or under bf16 autocast), which is how the reference treats its bf16-valued checkpoints.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


def _cast(param: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    if param is None:
        return None
    return param.to(device=like.device, dtype=dtype or like.dtype)


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear or conv layer computes in: autocast's when it is on for x's device, else x's own.

    Casting weights straight to it (rather than to x's dtype, which autocast would then cast again) avoids a
    transient fp32 copy of every bf16 weight in each call; the numbers are the same, as bf16 -> fp32 -> bf16
    is exact.
    """
    device = x.device.type
    try:
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
    except (TypeError, RuntimeError, AttributeError):  # torch < 2.4 has no per-device queries
        pass
    return x.dtype


class _CastLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = matmul_dtype(x)
        return F.linear(x, _cast(self.weight, x, dtype), _cast(self.bias, x, dtype))


class _CastConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = matmul_dtype(x)
        return self._conv_forward(x, _cast(self.weight, x, dtype), _cast(self.bias, x, dtype))


class _CastGroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, _cast(self.weight, x), _cast(self.bias, x), self.eps)


class _CastLayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, _cast(self.weight, x), _cast(self.bias, x), self.eps)


CastOps = SimpleNamespace(Linear=_CastLinear, Conv2d=_CastConv2d, GroupNorm=_CastGroupNorm, LayerNorm=_CastLayerNorm)


class RMSNorm(nn.Module):
    """``w * x / rms(x)`` (weight initialised to ones, not ``1 + w``); normalises in fp32.

    As in the reference, the product with the fp32 weight promotes the result to fp32 even for
    bf16 inputs; the residual streams of the network rely on that.
    """

    def __init__(self, dim: int, eps: float = 1e-6, dtype=None, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return normed * self.weight.to(device=x.device, dtype=torch.float32)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class FeedForward(nn.Module):
    """SwiGLU MLP without biases: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden: int, dtype=None, device=None, operations=CastOps) -> None:
        super().__init__()
        self.w1 = operations.Linear(dim, hidden, bias=False, dtype=dtype, device=device)
        self.w2 = operations.Linear(hidden, dim, bias=False, dtype=dtype, device=device)
        self.w3 = operations.Linear(dim, hidden, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def timestep_frequencies(t: torch.Tensor, dim: int = 256, max_period: float = 10.0) -> torch.Tensor:
    """Sinusoidal embedding of the (already x1000) timestep, cosines first.

    ``max_period`` is 10 in PiD, not the usual 10000: with t in [0, 1000] the lowest frequency
    still turns several times over the range.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """``[sin(p * w_k), cos(p * w_k)]`` with ``w_k = 10000^(-k / (dim/2))``, in float64."""
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    angles = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def pixel_position_embedding(height: int, width: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-image 2-D sin-cos embedding, returned separably as (column part [W, dim/2], row part [H, dim/2]).

    The embedding of pixel (i, j) is ``cat(col[j], row[i])``; keeping the two tables apart avoids
    materialising an [H, W, dim] float64 grid (1 GB at 4096 px).
    """
    col = sincos_1d(torch.arange(width), dim // 2)
    row = sincos_1d(torch.arange(height), dim // 2)
    return col, row


def _inverse_frequencies(theta: float, head_dim: int, stride: int) -> torch.Tensor:
    # float32 throughout, as the reference: bf16 runs round q/k after RoPE, so even 1-ulp differences
    # in the angles would show up there
    return 1.0 / theta ** (torch.arange(0, head_dim, stride, dtype=torch.float32) / head_dim)


def rope_2d(head_dim: int, grid_h: int, grid_w: int, ref_grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NTK-aware 2-D rotary angles for a ``grid_h x grid_w`` token grid, as (cos, sin) of shape [L, head_dim/2].

    Positions span [0, 16] on each axis whatever the grid size; the base theta of each axis is stretched by
    ``(grid / ref_grid) ** (d/2 / (d/2 - 2))`` so that sizes away from the training resolution keep their
    spectrum. Angles are interleaved per frequency: ``[x f0, y f0, x f1, y f1, ...]``.
    """
    half = head_dim // 2
    exponent = half / (half - 2)

    def freqs(grid: int) -> torch.Tensor:
        return _inverse_frequencies(10000.0 * (grid / ref_grid) ** exponent, head_dim, 4)

    ys = torch.linspace(0, 16, grid_h)
    xs = torch.linspace(0, 16, grid_w)
    ang_x = xs[None, :, None] * freqs(grid_w)  # [1, W, d/4]
    ang_y = ys[:, None, None] * freqs(grid_h)  # [H, 1, d/4]
    angles = torch.stack(torch.broadcast_tensors(ang_x, ang_y), dim=-1).reshape(grid_h * grid_w, half)
    return torch.cos(angles), torch.sin(angles)


def rope_1d(head_dim: int, length: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain 1-D rotary angles for text positions 0..length-1, as (cos, sin) of shape [length, head_dim/2]."""
    angles = torch.arange(length, dtype=torch.float32)[:, None] * _inverse_frequencies(theta, head_dim, 2)[None]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate adjacent pairs (2m, 2m+1) of ``x`` [B, N, heads, d] by angle m of ``rope`` (GPT-J style).

    ``rope`` is shared by the batch ([N, d/2]) or given per item ([B, N, d/2], tiles from different places).
    """
    cos, sin = (r.to(x.device)[..., None, :] if r.ndim == 3 else r.to(x.device)[None, :, None, :] for r in rope)
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def heads_first(x: torch.Tensor) -> torch.Tensor:
    """[B, N, heads, d] -> contiguous [B, heads, N, d] in the attention's compute dtype, the layout kernels take.

    Under autocast, q and k (fp32 after their norms and RoPE) are cast here, before any copy, rather than by
    autocast inside the attention: the same numbers without fp32 copies of the joint sequence.
    """
    return x.to(matmul_dtype(x)).transpose(1, 2).contiguous()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked scaled dot-product attention on [B, heads, N, d]; returns [B, N, heads * d]."""
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
