"""The pre-norm ViT block the RAE encoders and decoders share, and how their files name its weights.

DINOv2, SigLIP and the ViT-MAE decoders of RAE / Scale-RAE all use the same block:
``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``, with biased q/k/v projections, plain softmax
attention and a two-layer GELU MLP (DINOv2 adds the per-channel layer scales ``ls1``/``ls2``). They differ only
in how their Hugging Face files name the parts, so one implementation serves all three and a
:class:`KeyLayout` per family translates the names.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import CheckpointError
from ..layers import CastOps, attention, heads_first

# Head counts shapes cannot tell. 1152-wide models (SigLIP So400m, the ViT-XL decoders of RAE and Scale-RAE)
# use 16 heads of 72; every other released width uses heads of 64 (DINOv2-B: 768 -> 12).
KNOWN_HEADS = {1152: 16}
DEFAULT_HEAD_WIDTH = 64

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # exact (erf)
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass(frozen=True)
class ViTConfig:
    """One stack of pre-norm blocks."""

    width: int
    depth: int
    heads: int
    mlp_hidden: int
    eps: float  # LayerNorm epsilon of the blocks
    activation: str  # a key of ACTIVATIONS (Hugging Face's ``hidden_act`` names)
    layer_scale: bool = False  # DINOv2's per-channel residual scales


def default_heads(width: int, name: str) -> int:
    """Heads of a ``width``-wide model whose file comes without a config saying so."""
    if width in KNOWN_HEADS:
        return KNOWN_HEADS[width]
    if width % DEFAULT_HEAD_WIDTH:
        raise CheckpointError(
            f"{name}: cannot tell the attention heads of a {width}-wide model without its config.json; "
            "put the model's config.json beside the weights."
        )
    return width // DEFAULT_HEAD_WIDTH


def checked_activation(name: str, source: str) -> str:
    if name not in ACTIVATIONS:
        raise CheckpointError(f"{source}: unsupported activation {name!r} (expected one of {', '.join(ACTIVATIONS)}).")
    return name


def vit_config(
    tensors: dict[str, torch.Tensor], config: dict, defaults: dict, name: str, *, width: int, blocks: str,
    mlp_key: str, heads_key: str = "num_attention_heads", layer_scale: bool = False,
) -> ViTConfig:
    """A block stack's config: sizes from the tensors (``blocks`` is the prefix of the numbered blocks, ``mlp_key``
    the first MLP layer's weight); heads, epsilon and activation from the JSON ``config`` that came with the file,
    else ``defaults`` (heads then from :func:`default_heads`)."""
    return ViTConfig(
        width=width,
        depth=count_blocks(tensors, blocks),
        heads=int(config.get(heads_key, defaults[heads_key])) if config else default_heads(width, name),
        mlp_hidden=tensors[mlp_key].shape[0],
        eps=float(config.get("layer_norm_eps", defaults["layer_norm_eps"])),
        activation=checked_activation(str(config.get("hidden_act", defaults["hidden_act"])), name),
        layer_scale=layer_scale,
    )


def count_blocks(keys, prefix: str) -> int:
    """Number of numbered blocks ``prefix.N.`` among ``keys``."""
    return len({m.group(1) for k in keys if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))})


# --------------------------------------------------------------------------- modules


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, dtype=None, device=None, operations=CastOps) -> None:
        super().__init__()
        self.heads = heads
        lin = dict(dtype=dtype, device=device)
        self.q = operations.Linear(width, width, **lin)
        self.k = operations.Linear(width, width, **lin)
        self.v = operations.Linear(width, width, **lin)
        self.out = operations.Linear(width, width, **lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (heads_first(proj(x).unflatten(-1, (self.heads, -1))) for proj in (self.q, self.k, self.v))
        return self.out(attention(q, k, v))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str, dtype=None, device=None, operations=CastOps) -> None:
        super().__init__()
        self.fc1 = operations.Linear(width, hidden, dtype=dtype, device=device)
        self.fc2 = operations.Linear(hidden, width, dtype=dtype, device=device)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, width: int, dtype=None, device=None) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(width, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1.to(device=x.device, dtype=x.dtype)


class Block(nn.Module):
    def __init__(self, config: ViTConfig, dtype=None, device=None, operations=CastOps) -> None:
        super().__init__()
        width, lin = config.width, dict(dtype=dtype, device=device)
        self.norm1 = operations.LayerNorm(width, eps=config.eps, **lin)
        self.attn = Attention(width, config.heads, dtype, device, operations)
        self.norm2 = operations.LayerNorm(width, eps=config.eps, **lin)
        self.mlp = MLP(width, config.mlp_hidden, config.activation, dtype, device, operations)
        self.ls1 = LayerScale(width, **lin) if config.layer_scale else nn.Identity()
        self.ls2 = LayerScale(width, **lin) if config.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class Blocks(nn.ModuleList):
    def __init__(self, config: ViTConfig, dtype=None, device=None, operations=CastOps) -> None:
        super().__init__(Block(config, dtype, device, operations) for _ in range(config.depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self:
            x = block(x)
        return x


# --------------------------------------------------------------------------- file layouts


@dataclass(frozen=True)
class KeyLayout:
    """How one family's files name our modules' weights.

    ``blocks``: the prefix of the numbered blocks in the file (e.g. ``encoder.layer``); ``block_parts``: the
    file's module path inside a block -> ours; ``top``: full keys outside the blocks -> ours; ``ignored``:
    prefixes of weights we never use (training-only tokens, pooling heads, a text tower).
    """

    blocks: str
    block_parts: dict[str, str]
    top: dict[str, str]
    ignored: tuple[str, ...] = ()

    def file_key(self, ours: str) -> str:
        """The file's name for one of our keys (for messages)."""
        for theirs, mine in self.top.items():
            if mine == ours:
                return theirs
        if m := re.fullmatch(r"blocks\.(\d+)\.(.+)\.(\w+)", ours):
            part = next((t for t, o in self.block_parts.items() if o == m.group(2)), m.group(2))
            return f"{self.blocks}.{m.group(1)}.{part}.{m.group(3)}"
        return ours

    def convert(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Our state dict from the file's tensors, and the file keys that fit nowhere."""
        ours, unknown = {}, []
        block_key = re.compile(re.escape(self.blocks) + r"\.(\d+)\.(.+)\.(\w+)")
        for key, value in tensors.items():
            if key.startswith(self.ignored):
                continue
            if key in self.top:
                ours[self.top[key]] = value
            elif (m := block_key.fullmatch(key)) and m.group(2) in self.block_parts:
                ours[f"blocks.{m.group(1)}.{self.block_parts[m.group(2)]}.{m.group(3)}"] = value
            else:
                unknown.append(key)
        return ours, unknown


def load_weights(module: nn.Module, tensors: dict[str, torch.Tensor], layout: KeyLayout, name: str, what: str,
                 dtype: torch.dtype, device: torch.device | str, extra_ok: bool = False) -> None:
    """Give ``module`` (built on the meta device) the file's tensors, strictly, with one clear sentence if they
    do not fit. ``extra_ok``: tensors no part of the module takes are only warned about (the reference loads
    decoder files non-strictly)."""
    ours, unknown = layout.convert(tensors)
    if extra_ok and unknown:
        warnings.warn(f"{name}: ignored {len(unknown)} tensors that are no part of the {what} (e.g. {unknown[0]}).",
                      stacklevel=3)
        unknown = []
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(ours))
    wrong = sorted(k for k in set(expected) & set(ours) if tuple(ours[k].shape) != expected[k])
    if missing or unknown or wrong:
        problem = (
            f"lacks {len(missing)} of its weights (e.g. {layout.file_key(missing[0])})" if missing
            else f"has {len(unknown)} unexpected weights (e.g. {sorted(unknown)[0]})" if unknown
            else f"has {wrong[0]} of shape {tuple(ours[wrong[0]].shape)} instead of {expected[wrong[0]]}"
        )
        raise CheckpointError(f"{name} {problem}: it is not a complete {what}; download it again.")
    module.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in ours.items()}, strict=True, assign=True)
