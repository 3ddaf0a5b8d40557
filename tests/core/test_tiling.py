"""Tiled decoding: tiles run with the positions of their place in the whole image and blend without seams.

The oracle is written out by hand from the whole image's encodings: RoPE tables of the whole patch grid, the
pixel sin-cos grid of the whole image, the LQ heads applied to the whole latent's tokens; each tile takes its
slice of those, runs the network's blocks, and the tiles are blended with the plan's weights.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from comparison import FP32
from tiny import run_out_of_memory_above, tiny_network

from pid_core.api import decode, plan_decode
from pid_core.layers import rope_1d, rope_2d, sincos_1d
from pid_core.memory import activation_bytes, items_that_fit, working_bytes
from pid_core.network import PiDNetwork, Window, patchify
from pid_core.tiling import axis_origins, blend_weights, choose_plan, plan_tiles, tiled_forward


def inputs(net: PiDNetwork, height: int, width: int, batch: int = 1, seed: int = 0):
    c = net.config
    g = torch.Generator().manual_seed(seed)
    cells = (max(1, height // (c.latent_down * c.sr_scale)), max(1, width // (c.latent_down * c.sr_scale)))
    x = torch.randn(batch, 3, height, width, generator=g)
    t = torch.full((batch,), 634.0)
    caption = torch.randn(batch, 300, c.txt_embed_dim, generator=g)
    latent = torch.randn(batch, c.latent_channels, *cells, generator=g)
    sigma = torch.linspace(0.1, 0.4, batch)
    return x, t, caption, latent, sigma


def oracle_tile(net: PiDNetwork, x, t, caption, latent, sigma, top: int, left: int, th: int, tw: int) -> torch.Tensor:
    """The network's forward on the tile at patch (top, left), written from whole-image encodings sliced per tile."""
    c = net.config
    p, pd = c.patch_size, c.pixel_hidden_size
    b, _, height, width = x.shape
    hs, ws = height // p, width // p
    rows, cols = slice(top, top + th), slice(left, left + tw)
    px_rows, px_cols = slice(top * p, (top + th) * p), slice(left * p, (left + tw) * p)

    def tile_rope(head_dim: int):
        cos, sin = rope_2d(head_dim, hs, ws, c.rope_ref // p)  # the whole grid's table
        return tuple(r.reshape(hs, ws, -1)[rows, cols].reshape(th * tw, -1) for r in (cos, sin))

    def tile_tokens(tokens: torch.Tensor) -> torch.Tensor:
        return tokens.reshape(b, hs, ws, -1)[:, rows, cols].reshape(b, th * tw, -1)

    heads, pit = net.lq_proj(latent, (hs, ws))  # every head on the whole latent's tokens
    xt = x[:, :, px_rows, px_cols]
    s = net.s_embedder(patchify(xt, p))
    t_emb = net.t_embedder(t)[:, None]
    y = net.y_embedder(caption) + net.y_pos_embedding[:, : caption.shape[1]]
    cond = F.silu(t_emb)
    rope_img, rope_txt = tile_rope(c.hidden_size // c.num_heads), rope_1d(c.hidden_size // c.num_heads, caption.shape[1])
    for i, block in enumerate(net.patch_blocks):
        if i % c.lq_interval == 0:
            s = net.lq_proj.gate_modules[i // c.lq_interval](s, tile_tokens(heads[i // c.lq_interval]), sigma)
        s, y = block(s, y, cond, rope_img, rope_txt, update_text=i < c.patch_depth - 1)
    s = F.silu(t_emb + s)
    if pit is not None:
        s = net.pit_lq_gate(s, tile_tokens(pit), sigma)
    s_cond = s.reshape(-1, c.hidden_size)

    col = sincos_1d(torch.arange(width), pd // 2)  # the whole image's pixel sin-cos grid
    row = sincos_1d(torch.arange(height), pd // 2)
    grid = torch.cat([col[None].expand(height, width, -1), row[:, None].expand(height, width, -1)], dim=-1)
    feats = net.pixel_embedder(xt.permute(0, 2, 3, 1)) + grid[px_rows, px_cols].float()
    pixels = feats.reshape(b, th, p, tw, p, pd).permute(0, 1, 3, 2, 4, 5).reshape(-1, p * p, pd)
    rope_pix = tile_rope(c.pixel_attn_hidden_size // c.pixel_num_heads)
    for block in net.pixel_blocks:
        pixels = block(pixels, s_cond, rope_pix, b)
    out = net.final_layer(pixels).reshape(b, th, tw, p, p, 3)
    return out.permute(0, 5, 1, 3, 2, 4).reshape(b, 3, th * p, tw * p)


def oracle(net: PiDNetwork, x, t, caption, latent, sigma, plan) -> torch.Tensor:
    p = plan.patch_size
    th, tw = plan.tile
    out = torch.zeros_like(x)
    for k, w in enumerate(plan.windows):
        v = oracle_tile(net, x, t, caption, latent, sigma, w.top, w.left, th, tw)
        out[:, :, w.top * p : (w.top + th) * p, w.left * p : (w.left + tw) * p] += v * plan.weight(k)
    return out


def run_tiled(net: PiDNetwork, x, t, caption, latent, sigma, plan, callback=None) -> torch.Tensor:
    tokens = net.project_latent(latent, plan.grid)
    return tiled_forward(net, x, t, caption, sigma, tokens, plan, callback)


@pytest.mark.parametrize(
    "variant, size, tile, overlap",
    [
        ("flux_2k", (128, 128), 4, 2),  # 3 x 3 tiles
        ("flux2_2kto4k_v1pt5", (96, 160), (4, 6), 2),  # v1.5: the pixel-level LQ injection too; non-square tiles
        ("sdxl_2kto4k", (112, 80), 4, 1),  # 7 x 5 patches: sides that are not a multiple of the tile
    ],
)
def test_tiled_forward_equals_the_oracle_from_whole_image_encodings(variant, size, tile, overlap):
    net = tiny_network(variant)
    x, t, caption, latent, sigma = args = inputs(net, *size, batch=2)
    plan = plan_tiles((size[0] // 16, size[1] // 16), tile, overlap)
    assert plan.count > 1
    with torch.inference_mode():
        got = run_tiled(net, *args, plan)
        want = oracle(net, *args, plan)
        whole = net(*args)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # bit-identical on the development machine
    assert (got - whole).abs().max() > 1e-3  # a tile's attention sees only the tile: not the untiled result


def test_one_tile_covering_the_image_equals_untiled_exactly():
    net = tiny_network("flux2_2kto4k_v1pt5")
    args = inputs(net, 64, 128, batch=2)
    plan = plan_tiles((4, 8), (4, 8))
    assert plan.count == 1
    with torch.inference_mode():
        whole = net(*args)
        assert torch.equal(run_tiled(net, *args, plan), whole)
        windowed = net(*args[:3], None, args[4], lq_tokens=net.project_latent(args[3], (4, 8)), window=Window(0, 0, 4, 8))
        assert torch.equal(windowed, whole)


def test_decode_with_one_tile_equals_untiled_decode_exactly():
    net = tiny_network("flux_2k")
    latent = torch.randn(1, 16, 3, 2, generator=torch.Generator().manual_seed(3))
    caption = torch.randn(1, 300, net.config.txt_embed_dim)
    common = dict(space="flux", sigma=0.2, caption=caption, steps=2, seed=5)
    whole = decode(net, latent, tiling="off", **common)
    one_tile = decode(net, latent, tiling="on", tile_size=256, **common)
    assert torch.equal(whole, one_tile)


def test_batched_tiles_equal_tiles_one_at_a_time():
    net = tiny_network("flux_2k")
    args = inputs(net, 128, 96, batch=2)
    single, batched = plan_tiles((8, 6), 4, 2), plan_tiles((8, 6), 4, 2, tile_batch=4)
    assert batched.tile_batch == 4 and batched.count == 6
    with torch.inference_mode():
        FP32.check(run_tiled(net, *args, batched), run_tiled(net, *args, single))  # other batch: other kernel blocking


@pytest.mark.parametrize(
    "length, tile, overlap",
    [(16, 16, 4), (17, 16, 4), (40, 16, 4), (41, 16, 4), (64, 16, 0), (100, 30, 10), (13, 5, 4), (7, 4, 1)],
)
def test_blend_weights_sum_to_one_everywhere(length, tile, overlap):
    origins = axis_origins(length, tile, overlap)
    assert origins[0] == 0 and origins[-1] + min(tile, length) == length  # covered, the last tile on the border
    assert all(b - a <= tile - overlap for a, b in zip(origins, origins[1:]))  # at least the requested overlap
    weights = blend_weights(length * 16, [o * 16 for o in origins], min(tile, length) * 16)
    total = torch.zeros(length * 16)
    for o, w in zip(origins, weights):
        assert (w > 0).all() and (w <= 1).all()
        total[o * 16 : o * 16 + w.numel()] += w
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-6)


def test_2d_blend_weights_sum_to_one_and_are_smooth():
    plan = plan_tiles((13, 9), 5, 2)  # not a multiple of the tile on either side
    p = plan.patch_size
    total = torch.zeros(13 * p, 9 * p)
    th, tw = plan.tile
    for k, w in enumerate(plan.windows):
        weight = plan.weight(k)
        total[w.top * p : (w.top + th) * p, w.left * p : (w.left + tw) * p] += weight
        assert weight.diff(dim=0).abs().max() < 0.1 and weight.diff(dim=1).abs().max() < 0.1  # no steps
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-6)
    assert plan.count == len(plan.rows) * len(plan.cols) and {w.top + th for w in plan.windows} >= {13}


def test_border_tiles_of_a_size_not_a_multiple_of_the_tile_decode_like_the_oracle():
    net = tiny_network("flux_2k")
    args = inputs(net, 80, 112)  # 5 x 7 patches, tiles of 3
    plan = plan_tiles((5, 7), 3, 1)
    assert plan.rows == (0, 2) and plan.cols == (0, 2, 4)
    with torch.inference_mode():
        torch.testing.assert_close(run_tiled(net, *args, plan), oracle(net, *args, plan), rtol=0, atol=1e-5)


def test_tile_callback_reports_each_call_and_can_cancel():
    net = tiny_network("flux_2k")
    args = inputs(net, 64, 64)
    plan = plan_tiles((4, 4), 2, 1)
    calls = []
    with torch.inference_mode():
        run_tiled(net, *args, plan, callback=lambda done, total: calls.append((done, total)))
    assert calls == [(k + 1, plan.count) for k in range(plan.count)]

    def cancel(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), torch.inference_mode():
        run_tiled(net, *args, plan, callback=cancel)


def test_decode_tiles_when_the_budget_is_small_and_reports_progress_per_tile():
    net = tiny_network("flux_2k")
    latent = torch.randn(1, 16, 12, 12)
    caption = torch.zeros(1, 300, net.config.txt_embed_dim)
    plan = plan_decode(net, 384, 384, memory_budget=1)
    assert plan.tiles is not None and plan.tiles.tile_pixels == (256, 256) and plan.tiles.count == 4
    assert not plan.fits  # nothing fits 1 byte: the smallest tile, and a warning
    seen = []
    with pytest.warns(UserWarning, match="may run out of memory"):
        image = decode(net, latent, space="flux", caption=caption, steps=2, memory_budget=1,
                       call_callback=lambda step, done, total: seen.append((step, done, total)))
    assert image.shape == (1, 3, 384, 384) and image.abs().max() <= 1
    assert seen == [(step, k + 1, 4) for step in range(2) for k in range(4)]
    assert plan_decode(net, 384, 384).tiles is None  # with what this machine has free, auto decodes whole


def test_choose_plan_modes():
    cfg = tiny_network("flux_2k").config
    assert choose_plan(cfg, 2048, 2048, mode="off", budget=1) is None
    assert choose_plan(cfg, 2048, 2048, mode="auto", budget=None) is None
    assert choose_plan(cfg, 2048, 2048, mode="auto", budget=10**12) is None
    assert choose_plan(cfg, 2048, 2048, mode="auto", tile_size=512, budget=10**12) is None  # whole fits
    assert choose_plan(cfg, 2048, 2048, mode="auto", tile_size=512, budget=1).tile_pixels == (512, 512)
    on = choose_plan(cfg, 2048, 2048, mode="on", budget=10**12)
    assert on is not None and on.tile_pixels == (832, 832) and on.count == 9  # 3 per side: 1024 px at most
    assert on.tile_batch == 1  # big tiles one at a time
    small = choose_plan(cfg, 2048, 2048, mode="on", tile_size=256, budget=10**12)
    assert small.count == 121 and small.tile_batch == 16  # small ones batched, up to 1024 x 1024 px per call
    fixed = choose_plan(cfg, 2000 // 16 * 16, 1024, mode="on", tile_size=512)
    assert fixed.tile_pixels == (512, 512) and fixed.tile_batch == 1
    with pytest.raises(ValueError, match="multiple of 16"):
        choose_plan(cfg, 1024, 1024, mode="on", tile_size=500)
    with pytest.raises(ValueError, match="tiling mode"):
        choose_plan(cfg, 1024, 1024, mode="sometimes")


def test_windows_are_checked():
    net = tiny_network("flux_2k")
    x, t, caption, latent, sigma = inputs(net, 64, 64)
    tokens = net.project_latent(latent, (4, 4))
    with pytest.raises(ValueError, match="does not fit"):
        net(x, t, caption, None, sigma, lq_tokens=tokens, window=Window(2, 0, 5, 4))
    with pytest.raises(ValueError, match="LQ tokens"):
        net(x, t, caption, latent, sigma, window=Window(0, 0, 8, 8))
    with pytest.raises(ValueError, match="lq_tokens has shape"):
        net(x, t, caption, None, sigma, lq_tokens=tokens[:, :3], window=Window(0, 0, 8, 8))


def test_a_batch_that_does_not_fit_goes_through_the_network_a_few_images_at_a_time():
    net = tiny_network("flux_2k")
    config = net.config
    budget_for_two = working_bytes(activation_bytes(config, 256, 256, batch=3, items_per_call=2,
                                                    compute_dtype=torch.float32, weight_dtype=torch.float32))
    assert items_that_fit(config, 256, 256, batch=3, budget=budget_for_two, compute_dtype=torch.float32,
                          weight_dtype=torch.float32) == 2
    assert items_that_fit(config, 256, 256, batch=3, budget=1) == 0
    plan = plan_decode(net, 256, 256, batch=3, memory_budget=budget_for_two)
    assert (plan.items_per_call, plan.tiles, plan.calls_per_step, plan.fits) == (2, None, 2, True)
    assert "2 of the 3 images at a time" in plan.describe()
    assert plan_decode(net, 256, 256, batch=3, memory_budget=10**12).items_per_call == 3
    tiled = plan_decode(net, 256, 256, batch=3, tiling="on", tile_size=128, memory_budget=10**12)
    assert tiled.items_per_call == 1 and tiled.calls_per_step == 3 * -(-tiled.tiles.count // tiled.tiles.tile_batch)

    latent = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    caption = torch.randn(3, 300, config.txt_embed_dim, generator=torch.Generator().manual_seed(4))
    kwargs = dict(space="flux", sigma=[0.0, 0.2, 0.4], caption=caption, steps=2, seed=5)
    whole = decode(net, latent, memory_budget=10**12, **kwargs)
    seen = []
    one_at_a_time = decode(net, latent, memory_budget=budget_for_two - 1,
                           call_callback=lambda step, done, total: seen.append((step, done, total)), **kwargs)
    assert seen == [(step, k + 1, 3) for step in range(2) for k in range(3)]
    # the same computation; fp32 kernels may block a batch of 1 differently from one of 3, hence not bit for bit
    torch.testing.assert_close(one_at_a_time, whole, rtol=0, atol=1e-4)
    alone = decode(net, latent[1:2], memory_budget=10**12, **{**kwargs, "sigma": 0.2, "caption": caption[1:2]})
    assert not torch.allclose(alone, whole[1:2], atol=1e-3)  # the noise is drawn for the batch: item 1's differs


def test_a_decode_that_runs_out_of_memory_goes_on_in_tiles():
    latent = torch.randn(1, 16, 12, 12, generator=torch.Generator().manual_seed(6))
    kwargs = dict(space="flux", caption=torch.zeros(1, 300, 32), steps=2, seed=7)
    net = tiny_network("flux_2k")
    shapes = run_out_of_memory_above(net, 256 * 256)
    assert plan_decode(net, 384, 384, memory_budget=10**12).tiles is None  # planned whole
    with pytest.warns(UserWarning, match="ran out of memory decoding 384x384 px whole; going on in"):
        image = decode(net, latent, memory_budget=10**12, **kwargs)
    tile = shapes[0][-1]
    assert tile < 384 and all(s[0] * s[-2] * s[-1] <= 256 * 256 for s in shapes)
    tiled = decode(tiny_network("flux_2k"), latent, memory_budget=10**12, tiling="on", tile_size=tile, **kwargs)
    # the tiled decode from the first step on (its tiles may go through the network in other groups, which fp32
    # kernels may round differently: hence not bit for bit)
    torch.testing.assert_close(image, tiled, rtol=0, atol=1e-4)


def test_a_batch_that_runs_out_of_memory_goes_on_fewer_images_at_a_time():
    latent = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    kwargs = dict(space="flux", sigma=[0.0, 0.2, 0.4], caption=torch.zeros(1, 300, 32), steps=2, seed=5)
    net = tiny_network("flux_2k")
    shapes = run_out_of_memory_above(net, 256 * 256)
    with pytest.warns(UserWarning, match="ran out of memory"):
        image = decode(net, latent, memory_budget=10**12, **kwargs)
    assert shapes and all(s == (1, 3, 256, 256) for s in shapes)  # one whole image per call
    whole = decode(tiny_network("flux_2k"), latent, memory_budget=10**12, **kwargs)
    torch.testing.assert_close(image, whole, rtol=0, atol=1e-4)


@pytest.mark.parametrize("tiling, hint", [("auto", "smaller output size."), ("off", "allow tiling (tiling auto)")])
def test_running_out_of_memory_with_no_smaller_plan_left_is_a_clear_error(tiling, hint):
    net = tiny_network("flux_2k")
    run_out_of_memory_above(net, 0)
    latent = torch.randn(1, 16, 12, 12)
    # on a CPU a MemoryError: ComfyUI's advice for torch's out-of-memory error speaks of a GPU
    with pytest.raises(MemoryError, match="no smaller way to decode it: free memory") as error:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decode(net, latent, space="flux", caption=torch.zeros(1, 300, 32), steps=1, tiling=tiling,
                   memory_budget=10**12)
    assert hint in str(error.value)


def test_a_decode_beyond_free_system_memory_is_refused_before_any_network_call(monkeypatch):
    """On a CPU the system kills a process that runs out of memory (torch raises nothing), so such a plan is refused
    up front, with the fix that would make it fit; the same plan runs when the memory is there."""
    import pid_core.api as api

    net = tiny_network("flux_2k")
    caption = torch.zeros(1, 300, net.config.txt_embed_dim)
    calls = []

    def run(batch: int, free: int, tiling: str = "off") -> None:
        monkeypatch.setattr(api, "available_memory", lambda device: free)
        decode(net, torch.randn(batch, 16, 12, 12), space="flux", caption=caption, steps=1, tiling=tiling,
               memory_budget=10**12, call_callback=lambda *args: calls.append(args))

    one = plan_decode(net, 384, 384, tiling="off", memory_budget=10**12).memory.activations
    for batch, free, fix in ((1, one - 1, "set tiling to auto, choose a smaller output size or free memory"),
                             (8, one, "decode fewer pictures at a time, choose a smaller output size or free memory"),
                             (1, 1000, "choose a smaller output size or free memory")):  # nothing else would fit
        with pytest.raises(MemoryError, match=rf"Decoding {batch} picture\(s\) of 384x384 px whole.* needs about .* "
                                              rf"GB of working memory, but only .* free: {fix}\. It was not started"):
            run(batch, free)
    assert calls == []
    run(1, one)
    assert len(calls) == 1
