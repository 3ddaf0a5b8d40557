"""Tiny RAE files for the tests: Hugging Face encoders saved by ``transformers``, decoders in RAE's key layout.

transformers is a test-only dependency: it is the reference implementation of Hugging Face's
DINOv2-with-registers and SigLIP models, and writes their files exactly as the hub has them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, SiglipConfig, SiglipModel

from pid_core.rae.decoder import LAYOUT as DECODER_LAYOUT
from pid_core.rae.decoder import DecoderConfig, ViTMAEDecoder
from pid_core.rae.vit import ViTConfig


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights that keep activations O(1) and make every part matter (no unit norms, no zero tokens)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(k in name for k in ("position", "token", "probe", "pos_embed")):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
    return module.eval()


# Two sizes each: every dimension is read from the files, none is assumed.
DINOV2_SIZES = {
    "base-like": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4, image_size=518,
                      patch_size=14, num_register_tokens=4),
    "other": dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, mlp_ratio=2, image_size=64,
                  patch_size=8, num_register_tokens=2, layer_norm_eps=1e-5),
}
SIGLIP_SIZES = {
    "so400m-like": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=224, patch_size=14),
    "other": dict(hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4, image_size=64,
                  patch_size=8, hidden_act="gelu"),
}
TINY_TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=8)


def save_dinov2(folder: Path, size: str | dict, seed: int = 1) -> Dinov2WithRegistersModel:
    """``size``: a key of DINOV2_SIZES or a config dict."""
    config = DINOV2_SIZES[size] if isinstance(size, str) else size
    model = randomize_(Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**config)), seed)
    model.save_pretrained(folder)
    return model


def save_siglip(folder: Path, size: str | dict, seed: int = 2) -> SiglipModel:
    """``size``: a key of SIGLIP_SIZES or a vision config dict."""
    vision = SIGLIP_SIZES[size] if isinstance(size, str) else size
    config = SiglipConfig(text_config=TINY_TEXT, vision_config=vision)
    model = randomize_(SiglipModel(config), seed)
    model.save_pretrained(folder)
    return model


def save_decoder(path: Path, config: DecoderConfig, seed: int = 3, json_config: dict | None = None) -> ViTMAEDecoder:
    """A decoder file as RAE / Scale-RAE save them (their key names), built from our own module."""
    decoder = randomize_(ViTMAEDecoder(config), seed)
    torch.save({DECODER_LAYOUT.file_key(k): v for k, v in decoder.state_dict().items()}, path)
    if json_config is not None:
        path.with_suffix(".json").write_text(json.dumps(json_config))
    return decoder


def tiny_decoder_config(in_channels: int, width: int = 64, heads: int = 1) -> DecoderConfig:
    vit = ViTConfig(width=width, depth=2, heads=heads, mlp_hidden=2 * width, eps=1e-12, activation="gelu")
    return DecoderConfig(vit, in_channels=in_channels, grid=4, patch=2)


# The released RAEs' interfaces (the PiD checkpoints' latent channels, the encoders' input sizes and patches, hence
# the 32x32 DINOv2 and 16x16 SigLIP latents) at one layer with a small MLP; decoders of one 64-wide head on the
# released grids (DINOv2 32 cells of 16 px: 512 px; SigLIP 16 cells of 14 px, resized to 256 px).
RELEASED_INTERFACE = {
    "dinov2": dict(hidden_size=768, num_hidden_layers=1, num_attention_heads=12, mlp_ratio=1 / 16, image_size=518,
                   patch_size=14, num_register_tokens=4),
    "siglip": dict(hidden_size=1152, intermediate_size=64, num_hidden_layers=1, num_attention_heads=16,
                   image_size=224, patch_size=14),
}  # fmt: skip
DECODER_GRID = {"dinov2": dict(grid=32, patch=16), "siglip": dict(grid=16, patch=14)}
DECODER_VIT = dict(width=64, depth=1, heads=1, mlp_hidden=64, eps=1e-12, activation="gelu")


def write_rae(
    folder: Path, space: str, *, encoder_dir: str, decoder: str, decoder_json: str | None = None,
    stats: str | None = None, seed: int = 0,
) -> None:
    """A tiny RAE of ``space`` with the released interface in ``folder``: the encoder saved by transformers in its
    Hugging Face folder ``encoder_dir``, the ``decoder`` file (with its ViT-MAE JSON ``decoder_json``, as the
    Scale-RAE release has one) and DINOv2's ``stats`` file beside it."""
    save_encoder = {"dinov2": save_dinov2, "siglip": save_siglip}[space]
    save_encoder(folder / encoder_dir, RELEASED_INTERFACE[space], seed=seed)
    channels = RELEASED_INTERFACE[space]["hidden_size"]
    config = DecoderConfig(ViTConfig(**DECODER_VIT), in_channels=channels, **DECODER_GRID[space])
    save_decoder(folder / decoder, config, seed=seed + 1)
    if decoder_json:
        vit = DECODER_VIT
        (folder / decoder_json).write_text(json.dumps({
            "decoder_hidden_size": vit["width"], "decoder_num_hidden_layers": vit["depth"],
            "decoder_num_attention_heads": vit["heads"], "decoder_intermediate_size": vit["mlp_hidden"],
            "layer_norm_eps": vit["eps"], "hidden_act": vit["activation"],
            "image_size": config.image_size, "patch_size": config.patch,
        }))  # fmt: skip
    if stats:
        gen = torch.Generator().manual_seed(seed + 2)
        shape = (channels, config.grid, config.grid)
        torch.save({"mean": 0.1 * torch.randn(shape, generator=gen), "var": 0.5 + torch.rand(shape, generator=gen)},
                   folder / stats)  # fmt: skip
