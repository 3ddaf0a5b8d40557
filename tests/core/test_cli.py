"""The command line and the public API on tiny random checkpoints: outputs, sizes and clear errors."""

from __future__ import annotations

import json
import subprocess
import warnings
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pid_core import PiDDecoder
from pid_core.__main__ import main
from pid_core.network import PiDNetwork
from tiny import tiny_network

PACK_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def flux_checkpoint(tmp_path_factory) -> Path:
    """A tiny v1 16-channel network saved like the official Flux 2k file."""
    folder = tmp_path_factory.mktemp("ckpt") / "PiD_res2k_sr4x_official_flux_distill_4step"
    folder.mkdir()
    path = folder / "model_ema_bf16.pth"
    sd = tiny_network("flux_2k").state_dict()
    torch.save({f"net.{k}": v.to(torch.bfloat16) for k, v in sd.items()}, path)
    return path


def write_latent(path: Path, tensor: torch.Tensor) -> Path:
    save_file({"latent_tensor": tensor.contiguous(), "latent_format_version_0": torch.tensor([])}, str(path))
    return path


def test_info_reports_the_variant(flux_checkpoint, capsys):
    assert main(["info", str(flux_checkpoint), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["version"] == "v1"
    assert facts["latent_space"] == "flux"
    assert facts["training"] == "2k"
    assert facts["released_checkpoint"] == "flux_2k"
    assert facts["file_format"] == "pth"
    assert facts["upscale_factor"] == 4 and facts["latent_channels"] == 16
    assert facts["storage_dtype"] == "bfloat16"
    assert "latent space (from the file path)" in facts["assumed"]


def test_decode_writes_png_and_safetensors(flux_checkpoint, tmp_path, capsys):
    latent = write_latent(tmp_path / "in.latent", torch.randn(1, 16, 3, 4) + 0.1159)
    caption = tmp_path / "caption.safetensors"
    save_file({"caption": torch.randn(1, 300, 32)}, str(caption))
    common = [str(flux_checkpoint), str(latent), "--sigma", "0.2", "--caption-embedding", str(caption), "--seed", "7"]
    assert main(["decode", *common, "--out", str(tmp_path / "out.png")]) == 0
    assert main(["decode", *common, "--out", str(tmp_path / "out.safetensors")]) == 0
    picture = Image.open(tmp_path / "out.png")
    assert picture.size == (4 * 32, 3 * 32)  # native: 32 px per latent cell (/8 VAE, 4x)
    image = load_file(str(tmp_path / "out.safetensors"))["image"]
    assert image.shape == (1, 3, 96, 128) and image.min() >= -1 and image.max() <= 1
    as_png = torch.from_numpy(__import__("numpy").asarray(picture)).permute(2, 0, 1).float()
    assert (as_png - (image[0] + 1) * 127.5).abs().max() <= 0.5 + 1e-3  # same decode, rounded to 8 bits
    assert "step 4/4" in capsys.readouterr().err


def test_same_seed_same_picture_other_seed_differs(flux_checkpoint):
    decoder = PiDDecoder.load(flux_checkpoint, precision="fp32")
    latent = torch.randn(1, 16, 2, 2)
    caption = torch.zeros(1, 300, 32)
    first = decoder.decode(latent, sigma=0.1, caption=caption, seed=3)
    assert torch.equal(first, decoder.decode(latent, sigma=0.1, caption=caption, seed=3))
    assert not torch.equal(first, decoder.decode(latent, sigma=0.1, caption=caption, seed=4))


def test_long_side_size_keeps_aspect(flux_checkpoint):
    decoder = PiDDecoder.load(flux_checkpoint, precision="fp32")
    with pytest.warns(UserWarning, match="green artifacts"):  # 256 px is far below the 2k training range
        image = decoder.decode(torch.randn(1, 16, 2, 4), caption=torch.zeros(1, 300, 32), size=256, steps=1)
    assert image.shape[-2:] == (128, 256)


def test_missing_caption_warns(flux_checkpoint):
    decoder = PiDDecoder.load(flux_checkpoint, precision="fp32")
    with pytest.warns(UserWarning, match="all-zero caption"):
        decoder.decode(torch.randn(1, 16, 2, 2), steps=1)


def test_module_runs_from_the_pack_root(flux_checkpoint):
    result = subprocess.run(
        [sys.executable, "-m", "pid_core", "info", str(flux_checkpoint)],
        cwd=PACK_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "latent space: flux" in result.stdout


@pytest.mark.parametrize(
    "latent, extra, message",
    [
        (torch.randn(1, 4, 2, 2), [], "but this one has 4"),
        (torch.randn(1, 16, 1, 2, 2), [], "5-D latent"),
        (torch.full((1, 16, 2, 2), float("nan")), [], "NaN/inf"),
        (torch.randn(1, 16, 2, 2), ["--sigma", "1.5"], "outside [0, 1]"),
        (torch.randn(1, 16, 2, 2), ["--sigma", "-0.1"], "outside [0, 1]"),
        (torch.randn(1, 16, 2, 2), ["--space", "sdxl"], "not sdxl"),
    ],
)
def test_bad_inputs_give_one_clear_sentence(flux_checkpoint, tmp_path, capsys, latent, extra, message):
    path = write_latent(tmp_path / "bad.latent", latent)
    code = main(["decode", str(flux_checkpoint), str(path), "--out", str(tmp_path / "x.png"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and message in err[-1], err


def test_wrong_caption_width_is_refused(flux_checkpoint):
    decoder = PiDDecoder.load(flux_checkpoint, precision="fp32")
    with pytest.raises(ValueError, match=r"expects \[B, 300, 32\]"):
        decoder.decode(torch.randn(1, 16, 2, 2), caption=torch.zeros(1, 300, 2304))


def test_size_not_a_multiple_of_the_patch_is_refused(flux_checkpoint):
    decoder = PiDDecoder.load(flux_checkpoint, precision="fp32")
    with pytest.raises(ValueError, match="multiples of 16"):
        decoder.decode(torch.randn(1, 16, 2, 2), caption=torch.zeros(1, 300, 32), size=(100, 100))


def test_undecided_space_asks_for_a_choice(tmp_path):
    path = tmp_path / "decoder.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_network("flux_2k").state_dict().items()}, str(path))
    decoder = PiDDecoder.load(path, precision="fp32")
    with pytest.raises(ValueError, match="choose the latent space"):
        decoder.decode(torch.randn(1, 16, 2, 2))


def test_sigma_beyond_training_range_warns_once(flux_checkpoint):
    decoder = PiDDecoder.load(flux_checkpoint, precision="fp32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decoder.decode(torch.randn(1, 16, 2, 2), sigma=0.9, caption=torch.zeros(1, 300, 32), steps=1)
    assert sum("above 0.8" in str(w.message) for w in caught) == 1


def test_schedule_option_reaches_the_sampler(flux_checkpoint, tmp_path):
    latent = write_latent(tmp_path / "in.latent", torch.randn(1, 16, 2, 2))
    outs = {}
    for schedule in ("spread", "reference"):
        out = tmp_path / f"{schedule}.safetensors"
        assert main(["decode", str(flux_checkpoint), str(latent), "--steps", "5", "--schedule", schedule,
                     "--out", str(out)]) == 0
        outs[schedule] = load_file(str(out))["image"]
    assert not torch.equal(outs["spread"], outs["reference"])  # 5 steps: distinct vs repeated timesteps


def test_latent_of_another_family_than_the_checkpoint_is_refused(flux_checkpoint):
    decoder = PiDDecoder.load(flux_checkpoint, precision="fp32")  # a flux checkpoint, by its official folder name
    with pytest.raises(ValueError, match="in the sd3 latent space, but the PiD checkpoint .* is for flux models"):
        decoder.decode(torch.randn(1, 16, 2, 2), space="sd3", caption=torch.zeros(1, 300, 32))


def test_tiling_and_attention_options_reach_the_decode(flux_checkpoint, tmp_path, capsys):
    latent = write_latent(tmp_path / "in.latent", torch.randn(1, 16, 4, 4))
    outs = {}
    for name, extra in {"whole": ["--tiling", "off"], "tiled": ["--tiling", "on", "--tile-size", "64"],
                        "math": ["--tiling", "off", "--attention", "math"]}.items():  # fmt: skip
        out = tmp_path / f"{name}.safetensors"
        assert main(["decode", str(flux_checkpoint), str(latent), "--steps", "1", "--precision", "fp32", "--out",
                     str(out), *extra]) == 0
        outs[name] = load_file(str(out))["image"]
    assert outs["tiled"].shape == outs["whole"].shape == (1, 3, 128, 128)
    assert not torch.equal(outs["tiled"], outs["whole"])  # 64 px tiles of a 128 px picture really tiled
    torch.testing.assert_close(outs["math"], outs["whole"], rtol=0, atol=1e-4)
    capsys.readouterr()
    assert main(["decode", str(flux_checkpoint), str(latent), "--out", str(tmp_path / "x.png"), "--tiling", "on",
                 "--tile-size", "40"]) == 2
    assert "multiple of 16" in capsys.readouterr().err


def test_running_out_of_memory_is_one_clear_sentence(flux_checkpoint, tmp_path, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(PiDNetwork, "forward", out_of_memory)
    latent = write_latent(tmp_path / "z.latent", torch.randn(1, 16, 8, 8))
    assert main(["decode", str(flux_checkpoint), str(latent), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: PiD ran out of memory") and "free memory" in err[-1], err
