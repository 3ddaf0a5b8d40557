"""The memory estimate and the memory-lean forward.

Fast checks: the estimate grows with the output size, tiling bounds it, the plan follows the budget, and the
chunked pixel blocks compute what the whole ones do. The slow check (``-m slow``) measures the peak
memory of full-size decodes in fresh processes and holds the estimate to within 25% of it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from comparison import BF16, FP32
from tiny import tiny_config, tiny_network

from pid_core.config import released
from pid_core.memory import activation_bytes, available_memory, estimate, weight_bytes, working_bytes
from pid_core.network import PiDNetwork, PixelBlock, row_chunks
from pid_core.sampler import sample
from pid_core.tiling import choose_plan

FLUX_2K = released("flux_2k").network
SIZES = [(256, 256), (512, 512), (512, 1024), (1024, 1024), (1536, 1024), (2048, 2048), (3072, 2048), (4096, 4096)]


@pytest.mark.parametrize("config", [FLUX_2K, released("flux2_2kto4k_v1pt5").network, tiny_config("sdxl_2kto4k")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_estimate_grows_with_the_output_size(config, dtype):
    totals = [estimate(config, h, w, weight_dtype=dtype).total for h, w in SIZES]
    assert all(a < b for a, b in zip(totals, totals[1:]))
    batched = [estimate(config, 1024, 1024, batch=b, weight_dtype=dtype).total for b in (1, 2, 3)]
    assert batched[0] < batched[1] < batched[2]
    tiled = [estimate(config, h, w, weight_dtype=dtype, tile=(min(h, 512), min(w, 512))).total for h, w in SIZES]
    assert all(a <= b for a, b in zip(tiled, tiled[1:]))


def test_tiling_and_chunking_bound_the_working_memory():
    whole = max(activation_bytes(FLUX_2K, 4096, 4096).values())
    unchunked = max(activation_bytes(FLUX_2K, 4096, 4096, pixel_chunk=None).values())
    tiled = max(activation_bytes(FLUX_2K, 4096, 4096, tile=(1024, 1024)).values())
    assert tiled < whole < unchunked / 3
    # fp32 weights under bf16 autocast (the reference's setup) pay twice the weights and a cast per layer
    ours = estimate(FLUX_2K, 2048, 2048)
    reference = estimate(FLUX_2K, 2048, 2048, weight_dtype=torch.float32, compute_dtype=torch.bfloat16, pixel_chunk=None)
    assert reference.weights == 2 * ours.weights and reference.activations > ours.activations
    assert "GB" in ours.describe()


def test_weight_bytes_counts_every_parameter():
    net = PiDNetwork(tiny_config("flux2_2kto4k_v1pt5"))
    assert weight_bytes(net.config, torch.float32) == 4 * sum(p.numel() for p in net.parameters())
    assert 2.6e9 < weight_bytes(FLUX_2K, torch.bfloat16) < 2.8e9  # 1.36 B parameters


def test_the_plan_follows_the_budget():
    def need(tile=None, tile_batch=1):
        return working_bytes(activation_bytes(FLUX_2K, 4096, 4096, tile=tile, tile_batch=tile_batch))

    whole, floor = need(), need((256, 256))  # the floor: the sampler's whole-image state
    assert choose_plan(FLUX_2K, 4096, 4096, budget=whole) is None
    budget = (whole + floor) // 2
    plan = choose_plan(FLUX_2K, 4096, 4096, budget=budget)
    assert plan is not None and plan.count > 1 and need(plan.tile_pixels, plan.tile_batch) <= budget
    smaller = choose_plan(FLUX_2K, 4096, 4096, budget=floor + (budget - floor) // 4)
    assert smaller.tile_pixels[0] < plan.tile_pixels[0]


def test_available_memory_on_this_machine():
    free = available_memory("cpu")
    assert free is None or free > 0


def test_the_sampler_phase_is_the_traced_peak_of_the_sampler():
    """Live tensor bytes of a real sampler run (the denoiser returns a fresh tensor, as the network does) against
    the sampler phase of the estimate, less the LQ tokens it also counts."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from memtrace import LiveBytes

    c = tiny_config("flux_2k")
    batch, height, width = 2, 640, 384  # more rows than one float64 band
    tracker = LiveBytes([])
    with tracker:
        sample(lambda x, t: torch.full_like(x, 0.5), (batch, 3, height, width), seed=0, steps=4)
    lq_tokens = batch * height * width // c.patch_size**2 * c.lq_hidden_dim * 2
    expected = activation_bytes(c, height, width, batch=batch)["sampler"] - lq_tokens
    assert tracker.peak == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("n, chunk", [(40, 16), (48, 16), (33, 16), (100, 30), (17, 16), (4096 + 3, 4096)])
def test_row_chunks_cover_every_row_once_in_chunks_of_at_least_16(n, chunk):
    parts = row_chunks(n, chunk)
    assert [i for part in parts for i in range(n)[part]] == list(range(n))
    assert all(part.stop - part.start >= 16 for part in parts)


# Chunks change the row counts the matrix kernels see, and so, on some CPUs, their summation order: the chunked
# forward is the whole one within the rounding rules of comparison.py, not bit for bit (a chunk that took the
# wrong rows of the modulation would be off by O(1)).


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_pixel_block_equals_the_whole_block(autocast):
    net = tiny_network("flux_2k")
    block: PixelBlock = net.pixel_blocks[0]
    c = net.config
    g = torch.Generator().manual_seed(0)
    batch, tokens = 2, 48
    x = torch.randn(batch * tokens, c.patch_size**2, c.pixel_hidden_size, generator=g)
    cond = torch.randn(batch * tokens, c.hidden_size, generator=g)
    head_dim = c.pixel_attn_hidden_size // c.pixel_num_heads
    rope = (torch.randn(tokens, head_dim // 2, generator=g).cos(), torch.randn(tokens, head_dim // 2, generator=g).sin())
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        whole = block(x, cond, rope, batch)
        for chunk in (16, 20, 37, 64):
            chunked = block(x, cond, rope, batch, chunk=chunk)
            (BF16 if autocast else FP32).check(chunked.float(), whole.float(), f"chunk {chunk}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_network_equals_the_unchunked_one(dtype):
    net = tiny_network("flux2_2kto4k_v1pt5").to(dtype)
    c = net.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 128, 192, generator=g)
    caption = torch.randn(2, 300, c.txt_embed_dim, generator=g)
    latent = torch.randn(2, c.latent_channels, 2, 3, generator=g)
    args = (x, torch.tensor([999.0, 342.0]), caption, latent, torch.tensor([0.0, 0.3]))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        net.pixel_chunk = None
        whole = net(*args)
        net.pixel_chunk = 32  # 96 patches per image: 6 chunks
        (BF16 if dtype == torch.bfloat16 else FP32).check(net(*args).float(), whole.float())


@pytest.mark.slow
@pytest.mark.parametrize("size", [512, 1024, 2048])
def test_estimate_is_within_25_percent_of_the_measured_peak(size):
    """Full-size flux_2k network (random weights, bf16), one whole-image step, in a fresh process each."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from common import measure_in_subprocess

    result = measure_in_subprocess(size=size, mode="ours", steps=1, tiling="off")
    ratio = result["estimate_bytes"] / result["peak_bytes"]
    assert 0.75 <= ratio <= 1.25, result
