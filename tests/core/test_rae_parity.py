"""pid_core.rae against the official PiD tokenizers (golden data, tests/data/golden/README.md says how it was made),
and PiD decoding DINOv2 / SigLIP latents.

The golden folder holds tiny random RAEs in their real file formats (Hugging Face encoder folders, torch.save
decoders, stat.pt) and what the reference's DINOv2VAE / ScaleRAEVAE made of an 8-bit picture with them: the
features, the latent, and the decoded picture.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pid_core.api import decode
from pid_core.rae import LATENT_NORM_EPS, load_rae
from tiny import tiny_network

GOLDEN = Path(__file__).parent.parent / "data" / "golden" / "rae"
FP32_TOLERANCE = 1e-4
FILES = {
    "dinov2": ["dinov2_encoder", "dinov2_stats/stat.pt", "dinov2_decoder/model.pt"],
    "siglip": ["siglip_encoder", "siglip_decoder"],
}


@cache
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / "rae_golden.safetensors"))


@cache
def rae(space: str, dtype: torch.dtype = torch.float32):
    return load_rae([GOLDEN / f for f in FILES[space]], dtype=dtype)


def picture(space: str) -> torch.Tensor:
    return golden()[f"{space}.image_u8"].float() / 127.5 - 1.0  # 8-bit -> [-1, 1], as the reference's loader


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("space", FILES)
def test_encode_matches_reference(space):
    """Resize, pixel normalization, encoder, affine-free LayerNorm, dropped special tokens, grid, statistics."""
    assert max_abs(rae(space).encode(picture(space)), golden()[f"{space}.latent"]) <= FP32_TOLERANCE


def test_dinov2_features_before_the_statistics_match_reference():
    r, g = rae("dinov2"), golden()
    latent = r.encode(picture("dinov2"))
    features = latent * torch.sqrt(r.latent_var + LATENT_NORM_EPS) + r.latent_mean
    assert max_abs(features, g["dinov2.features"]) <= FP32_TOLERANCE
    assert max_abs(latent, g["dinov2.features"]) > 0.1  # the statistics really are applied


def test_siglip_tower_output_matches_reference():
    """The tower's output before Scale-RAE's LayerNorm: the reference's resize (with antialiasing) and normalization."""
    r = rae("siglip")
    x = torch.nn.functional.interpolate((picture("siglip") + 1) / 2, size=(224, 224), mode="bicubic",
                                        align_corners=False, antialias=True)
    with torch.inference_mode():
        tokens = r.encoder((x - 0.5) / 0.5)
    assert max_abs(tokens, golden()["siglip.features"]) <= FP32_TOLERANCE


@pytest.mark.parametrize("space", FILES)
def test_decode_matches_reference(space):
    """(DINOv2) de-normalization, the decoder resampling the 32/16-cell latent to its 4-cell grid, pixel
    de-normalization, clamp, (Scale-RAE) the resize to 16 px per cell."""
    assert max_abs(rae(space).decode(golden()[f"{space}.latent"]), golden()[f"{space}.decoded"]) <= FP32_TOLERANCE


@pytest.mark.parametrize("space", FILES)
def test_bf16_weights_stay_close_to_fp32(space):
    latent = rae(space, torch.bfloat16).encode(picture(space))
    assert latent.dtype == torch.float32
    assert max_abs(latent, golden()[f"{space}.latent"]) < 0.25
    assert max_abs(rae(space, torch.bfloat16).decode(golden()[f"{space}.latent"]), golden()[f"{space}.decoded"]) < 0.1


def test_rae_reports_what_the_loader_checks():
    assert (rae("dinov2").space.value, rae("dinov2").channels, rae("dinov2").grid) == ("dinov2", 16, 32)
    assert (rae("siglip").space.value, rae("siglip").channels, rae("siglip").grid) == ("siglip", 24, 16)


# --------------------------------------------------------------------------- PiD decodes RAE latents


@pytest.mark.parametrize(
    "name, space, channels, upscale", [("dinov2_2k", "dinov2", 768, 64), ("siglip_2k", "siglip", 1152, 128)]
)
def test_pid_decodes_rae_latents_at_its_upscale(name, space, channels, upscale):
    """16 px per latent cell times PiD's 4x (DINOv2) or 8x (SigLIP): 32 x 32 -> 2048 for both, here 1 x 1."""
    net = tiny_network(name)
    latent = torch.randn(1, channels, 1, 1, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="No caption"):
        image = decode(net, latent, space=space, sigma=0.1, steps=1, seed=0)
    assert image.shape == (1, 3, upscale, upscale)
    with pytest.warns(UserWarning, match="No caption"):
        other = decode(net, -latent, space=space, sigma=0.1, steps=1, seed=0)
    assert max_abs(image, other) > 1e-3  # the latent steers the decode
