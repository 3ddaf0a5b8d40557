"""Checkpoint reading and detection: every official key layout, the three on-disk formats, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pid_core.checkpoint import (
    CheckpointError,
    canonical_state_dict,
    check_keys,
    detect_network,
    inspect_state_dict,
    load_checkpoint,
    network_tensors,
)
from pid_core.config import RELEASED_CHECKPOINTS, LatentSpace, released
from pid_core.network import PiDNetwork
from tiny import tiny_network

KEYS_DIR = Path(__file__).parent.parent / "data" / "checkpoint_keys"
OFFICIAL_LAYOUTS = sorted(p.stem for p in KEYS_DIR.glob("*.tsv"))


def official_meta_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The official key layout of a released checkpoint as meta tensors (no memory)."""
    tensors = {}
    for line in (KEYS_DIR / f"{name}.tsv").read_text().splitlines():
        if line.startswith("#") or line.startswith("key\t"):
            continue
        key, shape, _ = line.split("\t")
        tensors[key] = torch.empty(json.loads(shape), device="meta")
    return tensors


def test_every_official_layout_is_listed():
    assert len(OFFICIAL_LAYOUTS) == 10


@pytest.mark.parametrize("name", OFFICIAL_LAYOUTS)
def test_official_layout_loads_strictly(name):
    tensors = official_meta_state_dict(name)
    config, candidates = detect_network(tensors, name)
    assert config == released(name).network
    assert released(name).space in candidates
    with torch.device("meta"):
        net = PiDNetwork(config)
    expected = {k: v.shape for k, v in net.state_dict().items()}
    check_keys(tensors, expected, name)  # raises on any missing, unexpected or mis-shaped key
    net.load_state_dict(tensors, strict=True, assign=True)


# The undistilled v1.5 teachers: the students' keys plus the training-only auxiliary RGB head (467 tensors).
AUX_HEAD = {"0.weight": [1024], "0.bias": [1024], "1.weight": [1024, 1024], "1.bias": [1024], "3.weight": [48, 1024],
            "3.bias": [48]}  # fmt: skip


@pytest.mark.parametrize("name", ["flux_2kto4k_v1pt5", "flux2_2kto4k_v1pt5", "qwenimage_2kto4k_v1pt5"])
def test_official_teacher_layout_is_recognised_and_loads_strictly(name):
    tensors = official_meta_state_dict(name)
    tensors |= {f"lq_proj.lq_aux_rgb_head.{k}": torch.empty(shape, device="meta") for k, shape in AUX_HEAD.items()}
    assert len(tensors) == 467
    folder = released(name).experiment.replace("distill_4step", "undistilled")
    info = inspect_state_dict(tensors, f"{folder}/model_ema_bf16.pth", "pth")
    assert not info.distilled and info.released == f"{name}_undistilled"
    assert released(info.released).experiment == folder
    with torch.device("meta"):
        net = PiDNetwork(info.config)
    check_keys(network_tensors(tensors), {k: v.shape for k, v in net.state_dict().items()}, name)


def test_released_table_covers_the_release():
    names = {r.name for r in RELEASED_CHECKPOINTS}
    assert set(OFFICIAL_LAYOUTS) <= names
    assert {"flux_2kto4k", "flux2_2kto4k_2606", "qwenimage_2kto4k"} <= names  # legacy files users still have
    assert sum(r.legacy for r in RELEASED_CHECKPOINTS) == 3


def split_pixel_modulation(tensors: dict[str, torch.Tensor], pixels: int) -> dict[str, torch.Tensor]:
    """Write the ComfyUI layout: each pixel block's modulation split into attention and MLP halves."""
    out = {}
    for key, value in tensors.items():
        if ".adaLN_modulation.0." not in key:
            out[key] = value
            continue
        block, kind = key.split(".adaLN_modulation.0.")
        chunks = value.reshape(pixels, 6, -1, *value.shape[1:])
        out[f"{block}.adaLN_modulation_msa.{kind}"] = chunks[:, :3].reshape(-1, *value.shape[1:]).contiguous()
        out[f"{block}.adaLN_modulation_mlp.{kind}"] = chunks[:, 3:].reshape(-1, *value.shape[1:]).contiguous()
    return out


def write_in_format(net: torch.nn.Module, fmt: str, folder: Path) -> Path:
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in net.state_dict().items()}
    if fmt == "pth":
        folder = folder / "PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step"
        folder.mkdir(parents=True)
        path = folder / "model_ema_bf16.pth"
        torch.save({f"net.{k}": v for k, v in sd.items()}, path)
    elif fmt == "safetensors":
        path = folder / "pid_flux_2kto4k_v1pt5.safetensors"
        save_file(sd, str(path))
    else:
        path = folder / "pid_v1pt5_flux_bf16.safetensors"
        split = split_pixel_modulation(sd, pixels=256)
        save_file({f"model.diffusion_model.{k}": v for k, v in split.items()}, str(path))
    return path


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "comfy"])
def test_three_formats_identify_the_same_network(fmt, tmp_path):
    net = tiny_network("flux_2kto4k_v1pt5")
    path = write_in_format(net, fmt, tmp_path)
    loaded = load_checkpoint(path)
    info = loaded.info
    assert info.file_format == fmt
    assert info.version == "v1.5"
    assert info.config == net.config
    assert info.space == LatentSpace.FLUX and "latent space (from the file path)" in info.assumed
    assert info.training == "2kto4k" and "training resolution" in info.detected
    assert info.storage_dtype == "bfloat16"
    reference = {k: v.to(torch.bfloat16) for k, v in net.state_dict().items()}
    assert set(loaded.state_dict) == set(reference)
    for key, value in reference.items():
        assert torch.equal(loaded.state_dict[key], value), key


def test_comfy_split_modulation_keeps_chunk_meaning():
    """ComfyUI views the attention half as [pixel, (shift, scale, gate), channel]: the split must put the
    official chunks 0-2 there and 3-5 in the MLP half."""
    pixels, pd, dim = 4, 2, 3
    weight = torch.arange(pixels * 6 * pd * dim, dtype=torch.float32).reshape(pixels * 6 * pd, dim)
    split = split_pixel_modulation({"pixel_blocks.0.adaLN_modulation.0.weight": weight}, pixels)
    msa = split["pixel_blocks.0.adaLN_modulation_msa.weight"].reshape(pixels, 3, pd, dim)
    assert torch.equal(msa[1, 2], weight.reshape(pixels, 6, pd, dim)[1, 2])  # gate_msa of pixel 1
    split["s_embedder.proj.weight"] = torch.zeros(8, 3 * pixels)
    merged, layout = canonical_state_dict(split)
    assert layout == "comfy"
    assert torch.equal(merged["pixel_blocks.0.adaLN_modulation.0.weight"], weight)


def test_ema_weights_win_over_training_weights():
    student = {"net.x.weight": torch.zeros(1), "net_ema.x.weight": torch.ones(1), "fake_score.y": torch.zeros(1)}
    canonical, layout = canonical_state_dict(student)
    assert layout == "pth" and list(canonical) == ["x.weight"] and canonical["x.weight"].item() == 1


def test_sixteen_channel_ambiguity_is_reported(tmp_path):
    net = tiny_network("flux_2k")
    path = tmp_path / "my_decoder.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    info = load_checkpoint(path).info
    assert info.space is None
    assert set(info.candidates) == {LatentSpace.FLUX, LatentSpace.SD3, LatentSpace.QWENIMAGE}
    assert info.training == "2k" and info.released is None  # the narrower range, and said so
    assert any(a.startswith("training resolution 2k (the weights and the path do not tell it") for a in info.assumed)
    given = load_checkpoint(path, space="sd3", training="2k").info
    assert given.space == LatentSpace.SD3 and given.released == "sd3_2k"
    assert "latent space (given)" in given.assumed
    with pytest.raises(CheckpointError, match="not sdxl"):
        load_checkpoint(path, space="sdxl")


@pytest.mark.parametrize(
    "name, space, training",
    [("sdxl_2kto4k", "sdxl", "2kto4k"), ("flux2_2kto4k_v1pt5", "flux2", "2kto4k"), ("siglip_2k", "siglip", "2k")],
)
def test_unique_families_are_detected_from_the_weights(name, space, training, tmp_path):
    net = tiny_network(name)
    path = tmp_path / "decoder.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    info = load_checkpoint(path).info
    assert (info.space.value, info.training, info.released) == (space, training, name)
    assert "latent space" in info.detected


# --------------------------------------------------------------------------- bad files


def _one_sentence(err: Exception) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_vae_is_refused(tmp_path):
    path = tmp_path / "ae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(4, 16, 3, 3), "encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(path))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "a VAE" in _one_sentence(err.value)


def test_diffusion_model_is_refused(tmp_path):
    path = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, str(path))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "a diffusion model" in _one_sentence(err.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_file_is_refused(suffix, tmp_path):
    net = tiny_network("flux_2k")
    path = tmp_path / f"decoder{suffix}"
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save({f"net.{k}": v for k, v in sd.items()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = _one_sentence(err.value)
    assert "truncated or corrupt" in message and "download it again" in message
    # the libraries' own reports (zip internals, header buffers) say nothing a user can act on
    assert not any(word in message.lower() for word in ("miniz", "zip archive", "central directory", "header"))


class Payload:
    """Unpickling this would call os.system: a stand-in for a malicious checkpoint."""

    def __reduce__(self):
        import os

        return (os.system, ("echo should-never-run",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "model_ema_bf16.pth"
    torch.save({"net.s_embedder.proj.weight": torch.zeros(1), "evil": Payload()}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = _one_sentence(err.value)
    assert "refused for safety" in message and "(posix.system)" in message
    # torch's own advice is to load it with weights_only=False: the one thing not to do with this file
    assert "weights_only" not in message and "Weights only" not in message
    assert type(err.value).__module__ == "pid_core"  # ComfyUI's error dialog shows "pid_core.CheckpointError"


def test_wrong_shapes_are_refused():
    tensors = official_meta_state_dict("flux_2k")
    tensors["patch_blocks.3.mlp_x.w2.weight"] = torch.empty(1536, 4000, device="meta")
    config, _ = detect_network(tensors)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in PiDNetwork(config).state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        check_keys(tensors, expected, "model_ema_bf16.pth")
    assert "wrong shapes (e.g. patch_blocks.3.mlp_x.w2.weight" in _one_sentence(err.value)


def test_missing_file_and_wrong_type(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing.pth")
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(CheckpointError, match="unsupported file type"):
        load_checkpoint(other)


def test_quantized_repack_is_refused(tmp_path):
    path = tmp_path / "pid_fp8.safetensors"
    save_file({"model.diffusion_model.s_embedder.proj.weight": torch.zeros(2, 2).to(torch.float8_e4m3fn)}, str(path))
    with pytest.raises(CheckpointError, match="quantized"):
        load_checkpoint(path)


def test_path_hints_read_only_the_file_and_its_folder():
    from pid_core.checkpoint import space_from_path, training_from_path

    path = "/home/sd3fan/qwen-4k/models/pid/PiD_res2k_sr4x_official_flux_distill_4step/model_ema_bf16.pth"
    candidates = (LatentSpace.FLUX, LatentSpace.SD3, LatentSpace.QWENIMAGE)
    assert space_from_path(path, candidates) == LatentSpace.FLUX
    assert training_from_path(path) == "2k"
    assert space_from_path("/models/sd3/pid/model_ema_bf16.pth", candidates) is None
    # a hint of a family the weights exclude does not end the search: "flux2" is not 16-channel, "flux" is
    assert space_from_path("/models/pid/pid_flux2kto4k.safetensors", candidates) == LatentSpace.FLUX
    assert space_from_path("/models/pid/pid_flux2kto4k.safetensors", (LatentSpace.FLUX2,)) == LatentSpace.FLUX2


@pytest.mark.parametrize(
    "name, file_name, training, how",
    [
        ("sdxl_2kto4k", "renamed.safetensors", "2kto4k", "detected"),  # the only SDXL release
        ("flux_2kto4k_v1pt5", "renamed.safetensors", "2kto4k", "detected"),  # every v1.5 release is 2kto4k
        ("flux2_2k", "renamed.safetensors", "2k", "assumed"),  # the 2kto4k v1 Flux.2 file is superseded
        ("flux2_2k", "pid_flux2_2kto4k.safetensors", "2kto4k", "assumed"),  # the name says it
    ],
)
def test_training_range_comes_from_the_weights_then_the_name_then_the_current_release(
    name, file_name, training, how, tmp_path
):
    path = tmp_path / file_name
    save_file({k: v.contiguous() for k, v in tiny_network(name).state_dict().items()}, str(path))
    info = load_checkpoint(path).info
    assert info.training == training
    said = info.detected if how == "detected" else info.assumed
    assert any(fact.startswith("training resolution") for fact in said), (info.detected, info.assumed)


@pytest.mark.parametrize("dropped", ["y_pos_embedding", "pixel_blocks.0.attn.q_norm.weight",
                                     "lq_proj.gate_modules.0.content_proj.weight"])
def test_a_checkpoint_without_a_weight_its_shapes_are_read_from_is_refused(dropped):
    tensors = official_meta_state_dict("flux_2k")
    del tensors[dropped]
    with pytest.raises(CheckpointError) as err:
        detect_network(tensors, "pid.safetensors")
    assert _one_sentence(err.value) == (
        f"pid.safetensors lacks 1 of the PiD decoder's weights (e.g. {dropped}): the file is damaged or from an "
        "unsupported variant; download it again."
    )
