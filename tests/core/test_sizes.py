"""Output sizes and the training-range warning."""

import warnings

import pytest
import torch
from tiny import tiny_network

from pid_core.api import decode, output_shape
from pid_core.config import released
from pid_core.sizes import output_size, training_range_warning

FLUX = released("flux_2k").network  # 16-ch /8, 4x -> 32 px per latent cell
SDXL = released("sdxl_2kto4k").network
FLUX2 = released("flux2_2kto4k_v1pt5").network  # packed /16 -> 64 px per cell
DINOV2 = released("dinov2_2k").network
SIGLIP = released("siglip_2k").network  # /16 at 8x -> 128 px per cell


@pytest.mark.parametrize(
    "config, latent_hw, expected",
    [
        (FLUX, (64, 64), (2048, 2048)),
        (SDXL, (64, 64), (2048, 2048)),
        (FLUX, (48, 80), (1536, 2560)),
        (FLUX2, (32, 32), (2048, 2048)),
        (FLUX2, (16, 24), (1024, 1536)),
        (DINOV2, (32, 32), (2048, 2048)),
        (SIGLIP, (16, 16), (2048, 2048)),
    ],
)
def test_native(config, latent_hw, expected):
    assert output_size(latent_hw, config) == expected
    assert output_size(latent_hw, config, "native") == expected


@pytest.mark.parametrize(
    "latent_hw, size, expected",
    [
        ((128, 128), 2048, (2048, 2048)),  # 1024 px Flux image -> 2048 (below native 4096)
        ((96, 128), 2048, (1536, 2048)),  # 4:3 landscape, exact
        ((128, 96), 4096, (4096, 3072)),  # portrait
        ((100, 150), 2048, (1344, 2048)),  # 1365.3 -> nearest multiple of 64
        ((90, 160), 4096, (2304, 4096)),  # 16:9: 2304 exactly
        ((77, 130), 2048, (1216, 2048)),  # 1213.0 -> 1216
        ((1, 40), 2048, (64, 2048)),  # never below one multiple
        ((64, 64), "4096", (4096, 4096)),  # widget strings
        ((60, 60), 3000, (3008, 3008)),  # a long side that is no multiple of 64 is rounded too
    ],
)
def test_long_side_target_keeps_aspect(latent_hw, size, expected):
    out = output_size(latent_hw, FLUX, size)
    assert out == expected
    assert out[0] % 64 == 0 and out[1] % 64 == 0
    h, w = latent_hw
    # aspect kept up to the rounding of the short side (half a multiple)
    if h <= w:
        assert abs(out[0] - h * out[1] / w) <= 32
    else:
        assert abs(out[1] - w * out[0] / h) <= 32


@pytest.mark.parametrize(
    "config, latent_hw, training, expected",
    [
        (FLUX, (128, 128), "2k", (2048, 2048)),  # 1024 px generation, 2k checkpoint: 2048, not native 4096
        (FLUX, (64, 96), "2k", (1344, 2048)),  # the long side 2048, aspect kept
        (FLUX, (128, 128), "2kto4k", (4096, 4096)),  # 2kto4k: native 4x
        (FLUX, (192, 128), "2kto4k", (4096, 2752)),  # native 6144 px long side: capped at 4096
        (FLUX2, (16, 16), "2kto4k", (1024, 1024)),  # native, even below the range (the range warning says so)
        (FLUX, (128, 128), None, (4096, 4096)),  # unknown range: native
    ],
)
def test_auto_follows_the_training_range(config, latent_hw, training, expected):
    assert output_size(latent_hw, config, "auto", training) == expected


def test_decode_picks_the_auto_size_from_the_checkpoint_info():
    from pid_core.checkpoint import CheckpointInfo
    from pid_core.config import LatentSpace

    net = tiny_network("flux_2k")
    latent = torch.randn(1, 16, 3, 4)  # native: 96x128 px
    info = CheckpointInfo(path="PiD_res2k/model.pth", file_format="pth", config=net.config,
                          space=LatentSpace.FLUX, candidates=(LatentSpace.FLUX,), training="2k", distilled=True, released=None, parameters=0,
                          storage_dtype="float32")  # fmt: skip
    assert output_shape(net, latent, space="flux", size="auto", info=info) == (1536, 2048)
    assert output_shape(net, latent, space="flux", size="auto") == (96, 128)  # no info: native


def test_long_side_target_is_independent_of_family():
    assert output_size((32, 48), FLUX2, 2048) == output_size((32, 48), FLUX, 2048) == (1344, 2048)


def test_explicit_size():
    assert output_size((64, 64), FLUX, (1024, 2048)) == (1024, 2048)
    assert output_size((64, 64), FLUX, [16, 48]) == (16, 48)


@pytest.mark.parametrize(
    "size, message",
    [
        ((1000, 2048), "multiples of 16.*1008x2048"),
        ((0, 2048), "two positive integers"),
        ((2048.0, 2048), "two positive integers"),
        ((2048,), "pair"),
        ("huge", "Unknown output size 'huge'"),
        (32, "at least 64"),
        (-2048, "at least 64"),
        (16448, "16448x16448 px output is beyond .*at most 16384 px a side"),
        ((16, 16400), "at most 16384 px a side"),
    ],
)
def test_bad_sizes(size, message):
    with pytest.raises(ValueError, match=message):
        output_size((64, 64), FLUX, size)


def test_a_native_size_beyond_the_largest_sensible_side_is_refused():
    assert output_size((512, 8), FLUX) == (16384, 256)  # the limit itself is allowed
    with pytest.raises(ValueError, match="65536x256 px output is beyond"):
        output_size((8, 2048), FLUX)  # a 16384 px generation's latent, native 4x


@pytest.mark.parametrize("latent_hw", [(0, 64), (64,), "64x64", (64, -1)])
def test_bad_latent_size(latent_hw):
    with pytest.raises(ValueError, match="latent size"):
        output_size(latent_hw, FLUX)


# ---- training range ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hw",
    [(2048, 2048), (1728, 2304), (2304, 1728), (1536, 2688), (1792, 2688), (2048, 1984)],
)
def test_2k_in_range(hw):
    assert training_range_warning(hw, "2k") is None


@pytest.mark.parametrize(
    "hw", [(4096, 4096), (1024, 1024), (1024, 2048), (2048, 3072), (1408, 3072), (1472, 2752), (2944, 1472)]
)
def test_2k_out_of_range(hw):
    message = training_range_warning(hw, "2k")
    assert message is not None
    assert f"{hw[0]}x{hw[1]}" in message and "green artifacts" in message and "2k" in message


@pytest.mark.parametrize(
    "hw",
    [(2048, 2048), (3072, 3072), (4096, 4096), (2176, 4096), (2304, 4096), (2816, 4096), (3584, 3584), (1536, 2752)],
)
def test_2kto4k_in_range(hw):
    assert training_range_warning(hw, "2kto4k") is None


@pytest.mark.parametrize("hw", [(1024, 1024), (1536, 1536), (4096, 4608), (1024, 4096), (2048, 4096), (8192, 8192)])
def test_2kto4k_out_of_range(hw):
    message = training_range_warning(hw, "2kto4k")
    assert message is not None and "green artifacts" in message and "2kto4k" in message


def test_unknown_training_class():
    assert training_range_warning((1024, 1024), None) is None
    with pytest.raises(ValueError, match="Unknown training range '8k'"):
        training_range_warning((2048, 2048), "8k")


def test_native_outputs_of_released_checkpoints_are_in_their_range():
    # Each checkpoint's intended use: 2k at 2048, 2kto4k from a 1024 px generation to 4K.
    assert training_range_warning(output_size((64, 64), FLUX), "2k") is None
    assert training_range_warning(output_size((32, 32), SIGLIP), "2k") is not None  # 4096 is beyond 2k
    assert training_range_warning(output_size((16, 16), SIGLIP), "2k") is None
    assert training_range_warning(output_size((64, 64), FLUX2, 4096), "2kto4k") is None


@pytest.mark.parametrize(
    "variant, space, latent_shape, size",
    [
        ("flux_2k", "flux", (2, 16, 3, 5), "native"),
        ("flux_2k", "flux", (1, 16, 3, 5), 256),
        ("flux2_2kto4k_v1pt5", "flux2", (1, 128, 2, 3), "native"),
        ("sdxl_2kto4k", "sdxl", (1, 4, 4, 2), 192),
    ],
)
def test_output_shape_is_the_shape_decode_draws(variant, space, latent_shape, size):
    net = tiny_network(variant)
    latent = torch.randn(latent_shape)
    shape = output_shape(net, latent, space=space, size=size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no caption
        image = decode(net, latent, space=space, size=size, steps=1, caption=None)
    assert image.shape == (latent_shape[0], 3, *shape)


def test_output_shape_checks_the_latent_as_decode_does():
    with pytest.raises(ValueError, match="channels, but this PiD checkpoint takes"):
        output_shape(tiny_network("flux2_2kto4k_v1pt5"), torch.randn(1, 16, 4, 4), space="flux")


def test_an_empty_batch_is_a_clear_error():
    net = tiny_network("flux_2k")
    for call in (lambda: decode(net, torch.zeros(0, 16, 4, 4), space="flux"),
                 lambda: output_shape(net, torch.zeros(0, 16, 4, 4), space="flux")):  # fmt: skip
        with pytest.raises(ValueError, match="The latent batch is empty"):
            call()
