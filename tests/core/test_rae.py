"""pid_core.rae: the encoders against transformers' own models, dimensions read from the files, and bad files.

transformers is imported here only, as the reference implementation of Hugging Face's DINOv2-with-registers and
SigLIP; pid_core never imports it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, Siglip2VisionConfig, Siglip2VisionModel

from pid_core.checkpoint import CheckpointError, load_checkpoint
from pid_core.config import LatentSpace
from pid_core.rae import load_rae
from pid_core.rae.decoder import DecoderConfig
from pid_core.rae.vit import ViTConfig
from tiny import tiny_network
from tiny_rae import DINOV2_SIZES, SIGLIP_SIZES, randomize_, save_decoder, save_dinov2, save_siglip, tiny_decoder_config

FP32_TOLERANCE = 1e-4


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# --------------------------------------------------------------------------- encoders vs transformers


@pytest.mark.parametrize("size", DINOV2_SIZES)
def test_dinov2_features_match_transformers(tmp_path, size):
    hf = save_dinov2(tmp_path, size)
    rae = load_rae(tmp_path, dtype=torch.float32)
    config = DINOV2_SIZES[size]
    enc = rae.encoder.config
    assert (enc.vit.width, enc.vit.depth, enc.vit.heads, enc.patch, enc.registers) == (
        config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"], config["patch_size"],
        config["num_register_tokens"],
    )
    patch = config["patch_size"]
    # 32 x 26 patches: the learned grid is resampled (to a non-square grid), as for the RAE's 448 px input
    pixels = torch.randn(2, 3, 32 * patch, 26 * patch, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = hf(pixels, output_hidden_states=True).hidden_states[-1]  # before the final LayerNorm
        ours = rae.encoder(pixels)
    assert ours.shape == expected.shape
    assert max_abs(ours, expected) <= FP32_TOLERANCE


@pytest.mark.parametrize("size", SIGLIP_SIZES)
def test_siglip_features_match_transformers(tmp_path, size):
    hf = save_siglip(tmp_path, size)
    rae = load_rae(tmp_path, dtype=torch.float32)
    config = SIGLIP_SIZES[size]
    enc = rae.encoder.config
    assert (enc.vit.width, enc.vit.depth, enc.vit.heads, enc.patch, enc.image_size) == (
        config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"], config["patch_size"],
        config["image_size"],
    )
    assert enc.vit.activation == config.get("hidden_act", "gelu_pytorch_tanh")
    pixels = torch.randn(2, 3, config["image_size"], config["image_size"], generator=torch.Generator().manual_seed(0))
    tower = hf.vision_model
    tower.post_layernorm = torch.nn.Identity()  # what the reference does: Scale-RAE reads the state before it
    with torch.inference_mode():
        expected = tower(pixels).last_hidden_state
        ours = rae.encoder(pixels)
    assert max_abs(ours, expected) <= FP32_TOLERANCE


def test_single_safetensors_file_without_config_uses_default_heads(tmp_path):
    """Without config.json the heads are width / 64; the weights alone give everything else."""
    folder, alone = tmp_path / "hf", tmp_path / "alone"
    config = Dinov2WithRegistersConfig(hidden_size=128, num_hidden_layers=1, num_attention_heads=2, image_size=56,
                                       patch_size=14, num_register_tokens=1)
    hf = randomize_(Dinov2WithRegistersModel(config), 4)
    hf.save_pretrained(folder)
    alone.mkdir()
    shutil.copy(folder / "model.safetensors", alone / "dinov2_with_registers.safetensors")
    rae = load_rae(alone / "dinov2_with_registers.safetensors", dtype=torch.float32)
    assert rae.encoder.config.vit.heads == 2
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert max_abs(rae.encoder(pixels), hf(pixels, output_hidden_states=True).hidden_states[-1]) <= FP32_TOLERANCE


def test_encoders_ignore_what_the_rae_does_not_use(tmp_path):
    """SigLIP's text tower, pooling head and post-LayerNorm, and DINOv2's final-norm affine are never read."""
    save_siglip(tmp_path / "siglip", "other")
    rae = load_rae(tmp_path / "siglip", dtype=torch.float32)
    names = set(rae.state_dict())
    assert not any("text" in n or "head" in n or "post" in n for n in names)
    save_dinov2(tmp_path / "dinov2", "other")
    assert not any(n.startswith("encoder.norm") or "layernorm" in n for n in load_rae(tmp_path / "dinov2").state_dict())


# --------------------------------------------------------------------------- decoders: dimensions from the files


def test_decoder_dimensions_come_from_the_file_and_its_json(tmp_path):
    config = tiny_decoder_config(in_channels=24, width=48, heads=3)
    save_decoder(tmp_path / "decoder.pt", config,
                 json_config={"decoder_hidden_size": 48, "decoder_num_attention_heads": 3, "layer_norm_eps": 1e-6})
    rae = load_rae(tmp_path / "decoder.pt", space="siglip", dtype=torch.float32)
    assert rae.decoder.config == DecoderConfig(
        ViTConfig(width=48, depth=2, heads=3, mlp_hidden=96, eps=1e-6, activation="gelu"),
        in_channels=24, grid=4, patch=2,
    )
    assert rae.native_size == 64  # 16 px per cell of the decoder's 4 x 4 grid


def test_decoder_without_json_uses_the_released_defaults(tmp_path):
    save_decoder(tmp_path / "model.pt", tiny_decoder_config(in_channels=1152, width=128, heads=2))
    rae = load_rae(tmp_path / "model.pt", dtype=torch.float32)
    assert rae.space == LatentSpace.SIGLIP  # 1152 channels: Scale-RAE
    assert (rae.decoder.config.vit.heads, rae.decoder.config.vit.eps) == (2, 1e-12)  # 128 / 64; ViT-MAE's default
    picture = rae.decode(torch.randn(1, 1152, 4, 4))
    assert picture.shape == (1, 3, 64, 64) and picture.abs().max() <= 1


# --------------------------------------------------------------------------- bad files and misuse


def test_a_pid_checkpoint_is_refused_with_what_it_is(tmp_path):
    path = tmp_path / "model_ema_bf16.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_network("dinov2_2k").state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match=r"model_ema_bf16.safetensors is a PiD decoder checkpoint .*expected a "
                                              r"DINOv2-with-registers or SigLIP-2 encoder"):
        load_rae(path)


def test_a_vae_is_refused_with_what_it_is(tmp_path):
    path = tmp_path / "ae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(4, 4, 3, 3), "encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)},
              str(path))
    with pytest.raises(CheckpointError, match=r"ae.safetensors is a VAE, not part of an RAE"):
        load_rae(path)


def test_siglip2_naflex_is_refused(tmp_path):
    config = Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 patch_size=4, num_patches=16)
    Siglip2VisionModel(config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"NaFlex .* google/siglip2-so400m-patch14-224"):
        load_rae(tmp_path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_files_are_refused(tmp_path, suffix):
    whole = tmp_path / "whole.pt"
    save_decoder(whole, tiny_decoder_config(in_channels=768))
    if suffix == ".safetensors":
        save_file(torch.load(whole, weights_only=True), str(whole.with_suffix(suffix)))
        whole = whole.with_suffix(suffix)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.\w+ is not a readable (safetensors|PyTorch checkpoint) file: it is truncated.*download"):
        load_rae(cut)


def test_an_incomplete_encoder_is_refused(tmp_path):
    save_dinov2(tmp_path, "other")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["encoder.layer.1.attention.attention.key.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lacks 1 of its weights \(e.g. encoder.layer.1.attention.attention.key"):
        load_rae(tmp_path)


def test_parts_of_different_raes_are_refused(tmp_path):
    save_siglip(tmp_path / "siglip", "other")
    torch.save({"mean": torch.zeros(48, 4, 4), "var": torch.ones(48, 4, 4)}, tmp_path / "stat.pt")
    with pytest.raises(CheckpointError, match=r"stat.pt holds RAE latent statistics, which only DINOv2 RAEs use"):
        load_rae([tmp_path / "siglip", tmp_path / "stat.pt"])
    save_dinov2(tmp_path / "dinov2", "other")  # 48 wide
    torch.save({"mean": torch.zeros(32, 4, 4), "var": torch.ones(32, 4, 4)}, tmp_path / "stat32.pt")
    with pytest.raises(CheckpointError, match=r"do not belong together: .*encoder 48, statistics 32"):
        load_rae([tmp_path / "dinov2", tmp_path / "stat32.pt"])


def test_a_decoder_of_unknown_family_needs_the_space(tmp_path):
    save_decoder(tmp_path / "model.pt", tiny_decoder_config(in_channels=24))
    with pytest.raises(CheckpointError, match=r"Cannot tell whether the decoder model.pt is DINOv2's RAE or SigLIP's"):
        load_rae(tmp_path / "model.pt")
    assert load_rae(tmp_path / "model.pt", space="dinov2").space == LatentSpace.DINOV2


def test_dinov2_encode_needs_the_statistics(tmp_path):
    save_dinov2(tmp_path, "other")
    rae = load_rae(tmp_path, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"needs its latent statistics to encode: load stat.pt"):
        rae.encode(torch.zeros(1, 3, 64, 64))


def test_missing_parts_and_bad_inputs_are_explained(tmp_path):
    save_decoder(tmp_path / "model.pt", tiny_decoder_config(in_channels=1152))
    rae = load_rae(tmp_path / "model.pt", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"no encoder: load the SigLIP-2 encoder"):
        rae.encode(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"decodes 1152-channel latents, got 768 channels"):
        rae.decode(torch.zeros(1, 768, 4, 4))
    with pytest.raises(ValueError, match=r"square grid"):
        rae.decode(torch.zeros(1, 1152, 4, 5))


def test_rae_must_match_the_pid_checkpoint(tmp_path):
    pid = tmp_path / "PiD_res2k_sr4x_official_dinov2_distill_4step" / "model_ema_bf16.safetensors"
    pid.parent.mkdir()
    save_file({k: v.contiguous() for k, v in tiny_network("dinov2_2k").state_dict().items()}, str(pid))
    info = load_checkpoint(pid).info
    save_decoder(tmp_path / "rae.pt", tiny_decoder_config(in_channels=768))
    load_rae(tmp_path / "rae.pt").check_matches(info)  # DINOv2 RAE for the DINOv2 checkpoint: fine
    save_decoder(tmp_path / "scale_rae.pt", tiny_decoder_config(in_channels=1152))
    message = (r"makes siglip latents with 1152 channels, but the PiD checkpoint "
               r"PiD_res2k_sr4x_official_dinov2_distill_4step/model_ema_bf16.safetensors "
               r"decodes dinov2 latents with 768 channels")
    with pytest.raises(CheckpointError, match=message):
        load_rae(tmp_path / "scale_rae.pt").check_matches(info)


def test_pid_core_rae_needs_neither_transformers_nor_comfyui():
    code = (
        "import sys, pid_core.rae; "
        "print([m for m in sys.modules if m.split('.')[0] in ('transformers', 'comfy')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2]).stdout
    assert out.strip() == "[]"
