"""Latent conventions: ComfyUI LATENT + PiD sigma -> network latent, checked against hand-computed values."""

import math

import pytest
import torch

from pid_core.config import LatentSpace
from pid_core.latents import (
    latent_format,
    pack_flux2,
    pid_sigma_from_sampler,
    sampler_sigma_from_pid,
    sigma_tensor,
    to_network_latent,
)

WAN_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
            0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]  # fmt: skip
WAN_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
           3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]  # fmt: skip


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def latent(channels, b=1, h=2, w=3, seed=0):
    return torch.randn(b, channels, h, w, generator=torch.Generator().manual_seed(seed)) * 3


# ---- flow families: process_in(x) * (1 - sigma) --------------------------------------------------


def test_flux_latent_is_shifted_scaled_and_faded_by_sigma():
    x = torch.tensor([[[[0.1159, 1.1159]]]]).expand(1, 16, 1, 2)
    out = to_network_latent(x, "flux", 0.25)
    # (0.1159 - 0.1159) * 0.3611 * 0.75 = 0 ;  (1.1159 - 0.1159) * 0.3611 * 0.75 = 0.270825
    close(out[0, :, 0, 0], torch.zeros(16))
    close(out[0, :, 0, 1], torch.full((16,), 0.270825))


def test_sd3_latent_matches_hand_computed_values():
    x = latent(16)
    out = to_network_latent(x, LatentSpace.SD3, 0.4)
    close(out, (x - 0.0609) * 1.5305 * 0.6)
    assert to_network_latent(torch.full((1, 16, 1, 1), 1.0609), "sd3", 0.5)[0, 0, 0, 0].item() == pytest.approx(
        1.5305 * 0.5
    )


def test_qwen_latent_is_normalized_per_channel():
    x = latent(16)
    out = to_network_latent(x, "qwenimage", 0.3)
    for c in (0, 7, 15):
        close(out[:, c], (x[:, c] - WAN_MEAN[c]) / WAN_STD[c] * 0.7)
    # channel 2 holding its mean + one std gives exactly 1 * (1 - sigma)
    x2 = torch.zeros(1, 16, 1, 1)
    x2[0, 2] = -0.9113 + 2.3275
    assert to_network_latent(x2, "qwenimage", 0.0)[0, 2, 0, 0].item() == pytest.approx(1.0, abs=1e-6)


def test_qwen_5d_latent_is_squeezed():
    x = latent(16, h=2, w=2).unsqueeze(2)
    out = to_network_latent(x, "qwenimage", 0.0)
    assert out.shape == (1, 16, 2, 2)
    close(out, latent_format("qwenimage").process_in(x[:, :, 0]))


def test_flux2_packed_latent_is_identity_times_one_minus_sigma():
    x = latent(128, h=2, w=2)
    close(to_network_latent(x, "flux2", 0.2), x * 0.8)


# ---- SDXL: variance-preserving frame --------------------------------------------------------------


def test_sdxl_from_sampler_sigma_two():
    pid_sigma = pid_sigma_from_sampler(2.0, "sdxl")
    assert pid_sigma == pytest.approx(2 / math.sqrt(5))
    x = latent(4)
    out = to_network_latent(x, "sdxl", pid_sigma)
    close(out, x * 0.13025 / math.sqrt(5))


def test_sdxl_clean_latent_is_only_scaled():
    x = latent(4)
    close(to_network_latent(x, "sdxl", 0.0), x * 0.13025)


@pytest.mark.parametrize("space", ["flux", "sdxl"])
@pytest.mark.parametrize("pid_sigma", [0.0, 0.1, 0.5, 0.8, 0.999])
def test_sigma_conversions_round_trip(space, pid_sigma):
    sampler = sampler_sigma_from_pid(pid_sigma, space)
    assert pid_sigma_from_sampler(sampler, space) == pytest.approx(pid_sigma, abs=1e-12)


def test_sigma_conversions_frames():
    assert pid_sigma_from_sampler(0.6, "flux") == 0.6
    assert sampler_sigma_from_pid(0.6, "sdxl") == pytest.approx(0.75)  # 0.6 / sqrt(1 - 0.36)
    assert sampler_sigma_from_pid(1.0, "sdxl") == math.inf
    assert pid_sigma_from_sampler(math.inf, "sdxl") == 1.0
    assert isinstance(pid_sigma_from_sampler(2, "sdxl"), float)
    assert pid_sigma_from_sampler(14.6146, "sdxl") == pytest.approx(14.6146 / math.sqrt(1 + 14.6146**2))
    tensor = pid_sigma_from_sampler(torch.tensor([0.0, 2.0]), "sdxl")
    close(tensor, torch.tensor([0.0, 2 / math.sqrt(5)], dtype=torch.float64))


# ---- batches ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigmas", [[0.0, 0.5, 0.25], (0.0, 0.5, 0.25), torch.tensor([0.0, 0.5, 0.25])])
def test_per_item_sigma(sigmas):
    x = latent(16, b=3)
    out = to_network_latent(x, "flux", sigmas)
    base = (x - 0.1159) * 0.3611
    for i, s in enumerate([0.0, 0.5, 0.25]):
        close(out[i], base[i] * (1 - s))


def test_per_item_sigma_sdxl():
    x = latent(4, b=2)
    out = to_network_latent(x, "sdxl", [0.0, 0.6])
    close(out[0], x[0] * 0.13025)
    close(out[1], x[1] * 0.13025 * 0.8)


def test_sigma_tensor_broadcasts_and_is_float32():
    s = sigma_tensor(0.3, 4)
    assert s.dtype == torch.float32 and s.shape == (4,)
    close(s, torch.full((4,), 0.3))
    close(sigma_tensor(torch.tensor([0.1, 0.2]), 2), torch.tensor([0.1, 0.2]))


def test_sigma_above_training_range_warns_but_works():
    with pytest.warns(UserWarning, match="above 0.8"):
        sigma = sigma_tensor(0.9, 1)
    out = to_network_latent(latent(16), "flux", sigma)
    assert torch.isfinite(out).all()


# ---- Flux.2 raw 32-channel latents -----------------------------------------------------------------


def test_flux2_packing_order():
    raw = torch.arange(1 * 32 * 4 * 6, dtype=torch.float32).reshape(1, 32, 4, 6)
    packed = pack_flux2(raw)
    assert packed.shape == (1, 128, 2, 3)
    for c, i, j, y, x in [(0, 0, 0, 0, 0), (0, 0, 1, 0, 0), (0, 1, 0, 1, 2), (5, 1, 1, 1, 1), (31, 1, 0, 0, 2)]:
        assert packed[0, c * 4 + i * 2 + j, y, x] == raw[0, c, 2 * y + i, 2 * x + j]
    # channel 1 of the packed latent is raw channel 0 at odd columns: 1, 3, 5 / 13, 15, 17
    assert packed[0, 1].tolist() == [[1, 3, 5], [13, 15, 17]]


def test_flux2_raw_latent_is_packed_and_batchnorm_normalized():
    raw = torch.arange(32 * 4 * 4, dtype=torch.float32).reshape(1, 32, 4, 4) / 100
    mean = torch.linspace(-1, 1, 128)
    var = torch.linspace(0.5, 2, 128)
    out = to_network_latent(raw, "flux2", 0.5, flux2_bn=(mean, var))
    expected = (pack_flux2(raw) - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-4) * 0.5
    close(out, expected)
    # one value by hand: packed channel 7 = raw channel 1, (i, j) = (1, 1); at (0, 0) it is raw[1, 1, 1]
    by_hand = (raw[0, 1, 1, 1].item() - mean[7].item()) / math.sqrt(var[7].item() + 1e-4) * 0.5
    assert out[0, 7, 0, 0].item() == pytest.approx(by_hand, rel=1e-6)


def test_flux2_raw_latent_without_batchnorm_stats_is_refused():
    with pytest.raises(ValueError, match="BatchNorm statistics .* the 128-channel latent that ComfyUI's Flux.2 samplers"):
        to_network_latent(torch.zeros(1, 32, 4, 4), "flux2", 0.0)


def test_flux2_batchnorm_stats_of_wrong_size_are_refused():
    with pytest.raises(ValueError, match="128 values"):
        to_network_latent(torch.zeros(1, 32, 4, 4), "flux2", 0.0, flux2_bn=(torch.zeros(32), torch.ones(32)))


# ---- bad inputs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "space, channels, expected", [("flux", 4, "16 channels"), ("sdxl", 16, "4 channels"), ("flux2", 16, "128")]
)
def test_wrong_channel_count(space, channels, expected):
    with pytest.raises(ValueError, match=f"{expected}.*this one has {channels}"):
        to_network_latent(torch.zeros(1, channels, 2, 2), space, 0.0)


def test_5d_latent_for_other_family_is_refused():
    with pytest.raises(ValueError, match="5-D latent.*flux"):
        to_network_latent(torch.zeros(1, 16, 1, 2, 2), "flux", 0.0)


def test_5d_qwen_latent_with_several_frames_is_refused():
    with pytest.raises(ValueError, match="3 frames"):
        to_network_latent(torch.zeros(1, 16, 3, 2, 2), "qwenimage", 0.0)


@pytest.mark.parametrize("shape", [(16, 2, 2), (1, 1, 1, 16, 2, 2)])
def test_wrong_ndim(shape):
    with pytest.raises(ValueError, match="4-D latent"):
        to_network_latent(torch.zeros(shape), "sd3", 0.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_latent(bad):
    x = torch.zeros(1, 16, 2, 2)
    x[0, 3, 1, 1] = bad
    with pytest.raises(ValueError, match="NaN/inf"):
        to_network_latent(x, "flux", 0.0)


@pytest.mark.parametrize("sigma, message", [(-0.1, r"-0.1 is outside \[0, 1\]"), (1.5, "1.5 is outside"),
                                            (float("nan"), "NaN"), ([0.2, 1.5], "1.5 is outside")])  # fmt: skip
def test_bad_sigma(sigma, message):
    with pytest.raises(ValueError, match=message):
        to_network_latent(torch.zeros(2, 16, 2, 2), "flux", sigma)


def test_sigma_count_must_match_batch():
    with pytest.raises(ValueError, match="3 sigma values for a batch of 2"):
        sigma_tensor([0.1, 0.2, 0.3], 2)


def test_negative_sdxl_sampler_sigma_is_refused():
    with pytest.raises(ValueError, match="SDXL sampler sigma -1 is outside"):
        pid_sigma_from_sampler(-1.0, "sdxl")


@pytest.mark.parametrize("space, channels", [("dinov2", 768), ("siglip", 1152)])
def test_rae_latent_is_taken_as_it_is_and_faded_by_sigma(space, channels):
    """An RAE LATENT is the normalized RAE latent PiD was trained on (no process_in), in the flow frame."""
    x = latent(channels, b=2)
    close(to_network_latent(x, space, 0.0), x)
    close(to_network_latent(x, space, [0.25, 0.5]), x * torch.tensor([0.75, 0.5]).view(2, 1, 1, 1))
    with pytest.raises(ValueError, match=f"A {space} latent has {channels} channels"):
        to_network_latent(latent(16), space, 0.0)


def test_unknown_space():
    with pytest.raises(ValueError, match="Unknown latent space 'sd15'"):
        to_network_latent(torch.zeros(1, 4, 2, 2), "sd15", 0.0)


# ---- hygiene -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("space, channels", [("flux", 16), ("flux2", 128), ("sdxl", 4)])
def test_input_is_not_mutated_and_output_is_a_new_float32_tensor(space, channels):
    x = latent(channels).to(torch.float32)
    before = x.clone()
    out = to_network_latent(x, space, 0.0)
    assert torch.equal(x, before)
    assert out.dtype == torch.float32 and out.data_ptr() != x.data_ptr()


def test_half_precision_latent_is_upcast():
    x = latent(16).to(torch.bfloat16)
    out = to_network_latent(x, "flux", 0.0)
    assert out.dtype == torch.float32
    close(out, (x.float() - 0.1159) * 0.3611)
