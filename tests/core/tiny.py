"""Tiny PiD networks for tests: released structures at toy widths, with seeded random weights; and random
full-size checkpoints in a released key layout, by the same rule, where nothing smaller stands in.

The widths match the reference runner's "tiny" settings, so golden files made by it load here.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from pid_core.config import NetworkConfig, released
from pid_core.network import PiDNetwork

TINY_WIDTHS = dict(
    hidden_size=64,
    num_heads=4,
    patch_depth=4,
    pixel_hidden_size=8,
    pixel_attn_hidden_size=32,
    pixel_num_heads=2,
    txt_embed_dim=32,
    lq_hidden_dim=32,
)


def tiny_config(name: str) -> NetworkConfig:
    return replace(released(name).network, **TINY_WIDTHS)


def randomize_(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights that keep activations O(1), so attention, RoPE and gates are really exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith("log_alpha"):
                p.copy_(math.log(5) + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
    return net


def random_official_weights(keys_file: Path, seed: int) -> dict[str, torch.Tensor]:
    """bf16 tensors for every key and shape of a released checkpoint (a ``tests/data/checkpoint_keys`` table), drawn
    by :func:`randomize_`'s rule, one generator in the table's order."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for line in keys_file.read_text().splitlines():
        if line.startswith(("#", "key\t")) or not line.strip():
            continue
        key, shape, _ = line.split("\t")
        tensor = torch.empty(json.loads(shape), dtype=torch.bfloat16)
        if tensor.ndim >= 2:
            tensor.normal_(0, 1 / math.sqrt(tensor[0].numel()), generator=generator)
        elif key.endswith("log_alpha"):
            tensor.normal_(math.log(5), 0.1, generator=generator)
        elif key.endswith("bias"):
            tensor.normal_(0, 0.02, generator=generator)
        else:
            tensor.normal_(1, 0.1, generator=generator)
        weights[key] = tensor
    return weights


def tiny_network(name: str, seed: int = 0) -> PiDNetwork:
    return randomize_(PiDNetwork(tiny_config(name)), seed).eval()


def run_out_of_memory_above(net: PiDNetwork, pixels: int) -> list[tuple[int, ...]]:
    """Make ``net`` raise torch.OutOfMemoryError on calls with more than ``pixels`` input pixels (over the batch), as
    a GPU would; returns the input shapes of the calls that ran."""
    forward, shapes = net.forward, []

    def limited(x, *args, **kwargs):
        if x[:, 0].numel() > pixels:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        shapes.append(tuple(x.shape))
        return forward(x, *args, **kwargs)

    net.forward = limited
    return shapes
