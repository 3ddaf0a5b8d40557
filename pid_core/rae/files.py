"""Reading the files an RAE is made of, and telling them apart by what they hold.

An RAE comes in up to three files, from different places (see the README):

- the encoder, a Hugging Face model: a folder with ``config.json`` and ``model.safetensors``, or the
  safetensors file alone (``facebook/dinov2-with-registers-base``; ``google/siglip2-so400m-patch14-224``,
  of which only the vision tower is read);
- the decoder, a ``torch.save`` state dict (RAE's ``ViTXL_n08_i512/model.pt``, Scale-RAE's ``…decXL.pt``),
  optionally with its ViT-MAE JSON config beside it;
- for DINOv2 only, the latent statistics ``stat.pt`` (``{"mean": [C, H, W], "var": [C, H, W]}``).

Files are recognised by their tensor names, never by their file names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, damaged_file, load_pickle

DINOV2, SIGLIP, DECODER, STATS = "dinov2 encoder", "siglip encoder", "decoder", "statistics"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
EXPECTED = (
    "expected a DINOv2-with-registers or SigLIP-2 encoder (Hugging Face safetensors), an RAE / Scale-RAE "
    "decoder (.pt) or the RAE statistics (stat.pt)"
)
_DINOV2_MARK = "embeddings.register_tokens"
_SIGLIP_MARK = "vision_model.embeddings.patch_embedding.weight"
_DECODER_MARKS = ("decoder_embed.weight", "decoder_pred.weight")


@dataclass
class RAEFile:
    """One recognised file: what it is, the tensors we use from it, and the JSON config that goes with it."""

    kind: str  # DINOV2, SIGLIP, DECODER or STATS
    path: Path
    tensors: dict[str, torch.Tensor]
    config: dict = field(default_factory=dict)  # the encoder's config.json, or the decoder's ViT-MAE JSON


def expand(paths: str | Path | list | tuple) -> list[Path]:
    """The weight files named by ``paths`` (files, or folders whose weight files are all taken)."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not items:
        raise CheckpointError(f"No RAE file given; {EXPECTED}.")
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix in (".safetensors", ".pt", ".pth"))
            if not found:
                raise CheckpointError(f"{item} holds no .safetensors or .pt file; {EXPECTED}.")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise CheckpointError(f"RAE file not found: {item}. Check the path, or download it (see the README).")
    return files


def read_rae_file(path: Path) -> RAEFile:
    """Recognise ``path`` and read the parts of it an RAE uses (memory-mapped where possible)."""
    if path.suffix == ".safetensors":
        return _from_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _from_pickle(path)
    raise CheckpointError(f"{path.name}: unsupported file type {path.suffix!r}; {EXPECTED}.")


def _from_safetensors(path: Path) -> RAEFile:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            kind, prefix = _kind(keys, path.name)
            wanted = [k for k in keys if k.startswith(prefix)] if kind != DECODER else keys
            tensors = {k[len(prefix) if kind == DINOV2 else 0:]: f.get_tensor(k) for k in wanted}
    except (SafetensorError, OSError):
        raise CheckpointError(damaged_file(path.name)) from None
    config = _decoder_config(path) if kind == DECODER else _hf_config(path, kind)
    return RAEFile(kind, path, tensors, config)


def _from_pickle(path: Path) -> RAEFile:
    data = load_pickle(path)
    if isinstance(data, dict) and all(isinstance(data.get(k), torch.Tensor) for k in ("mean", "var")):
        return RAEFile(STATS, path, {"mean": data["mean"], "var": data["var"]})
    for wrapper in ("state_dict", "model", "ema"):  # training checkpoints nest the weights one level down
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name} holds a {type(data).__name__}, not a dict of tensors; {EXPECTED}.")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    kind, prefix = _kind(list(tensors), path.name)
    if kind != DECODER:
        tensors = {k[len(prefix) if kind == DINOV2 else 0:]: v for k, v in tensors.items() if k.startswith(prefix)}
    config = _decoder_config(path) if kind == DECODER else _hf_config(path, kind)
    return RAEFile(kind, path, tensors, config)




def _kind(keys: list[str], name: str) -> tuple[str, str]:
    """What the file is, and the key prefix in front of the model (``dinov2_with_registers.`` in task models)."""
    for key in keys:
        if key.endswith(_DINOV2_MARK):
            return DINOV2, key[: -len(_DINOV2_MARK)]
    if _SIGLIP_MARK in keys:
        return SIGLIP, "vision_model."
    if all(mark in keys for mark in _DECODER_MARKS):
        return DECODER, ""
    raise CheckpointError(f"{name} is {_describe(keys)}; {EXPECTED}.")


def _describe(keys: list[str]) -> str:
    """What a file that is no RAE part most likely is, for the error message."""
    def has(*parts: str) -> bool:  # at the start of a key, or after a wrapper prefix
        return any(k.startswith(parts) or any(f".{p}" in k for p in parts) for k in keys)

    if any(k.endswith(("s_embedder.proj.weight", "lq_proj.latent_proj.0.weight")) for k in keys):
        return "a PiD decoder checkpoint (it goes in models/pid), not part of an RAE"
    if has("decoder.conv_in", "encoder.conv_in", "first_stage_model.", "decoder.up."):
        return "a VAE, not part of an RAE"
    if any(k.endswith("embeddings.cls_token") for k in keys):
        return "a DINOv2 model without registers (PiD's RAE needs facebook/dinov2-with-registers-base)"
    if any(k.startswith("vision_model.embeddings.patch_embedding") for k in keys):
        return "a SigLIP model without a patch embedding PiD can use"
    if has("double_blocks.", "joint_blocks.", "input_blocks.", "transformer_blocks."):
        return "a diffusion model, not part of an RAE"
    if any(".self_attn.q_proj." in k and "vision" not in k for k in keys):
        return "a text encoder, not part of an RAE"
    return "not part of an RAE"


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError):
        return None
    return data if isinstance(data, dict) else None


def _hf_config(weights: Path, kind: str) -> dict:
    """The encoder's ``config.json`` beside its weights (the vision part for SigLIP), or {} when absent."""
    config = _read_json(weights.parent / "config.json") or {}
    if kind == SIGLIP and isinstance(config.get("vision_config"), dict):
        return {"model_type": config.get("model_type"), **config["vision_config"]}
    return config


def is_decoder_config(config: dict | None) -> bool:
    return bool(config) and "decoder_hidden_size" in config


def _decoder_config(weights: Path) -> dict:
    """The decoder's ViT-MAE JSON beside it (``<name>.json``, else the one JSON in the folder that describes a
    decoder, such as ``config.json`` or Scale-RAE's ``XL_decoder_config.json``), or {} when there is none."""
    own = weights.with_suffix(".json")
    candidates = [own] + sorted(p for p in weights.parent.glob("*.json") if p != own)
    for candidate in candidates:
        if candidate.is_file() and is_decoder_config(config := _read_json(candidate)):
            return config
    return {}


def read_decoder_config(path: Path) -> dict:
    """A decoder JSON given explicitly."""
    config = _read_json(path)
    if not is_decoder_config(config):
        raise CheckpointError(
            f"{path.name} is not a ViT-MAE decoder config (it has no decoder_hidden_size); {EXPECTED}, or the "
            "decoder's JSON config."
        )
    return config
