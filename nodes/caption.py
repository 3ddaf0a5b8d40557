"""PiD Caption: a caption encoded with Gemma-2 exactly as PiD was trained, as a CONDITIONING for PiD Decode.

PiD reads the *final* hidden state of Gemma-2-2B-it (after the final norm, no soft-capping) of its system
prompt plus the caption, 300 positions (see ``pid_core.captions``). ComfyUI's own Gemma-2 text encoders do not
give that: 0.3.75's ``lumina2`` CLIP returns the penultimate layer with its own tokenization, and newer
ComfyUI's ``pixeldit`` CLIP encodes an empty caption without the system prompt. So this node never calls
``clip.encode``: it runs ``pid_core``'s encoder, either on a Gemma file picked in ``gemma_name`` (wrapped in a
ModelPatcher on ComfyUI's text-encoder device) or on the very tensors of a connected CLIP whose weights are
Gemma-2 (loaded by the CLIP's own patcher, not copied).
"""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import folder_paths

from ..pid_core.captions import (
    NEGATIVE_PROMPT,
    CaptionEncoder,
    CaptionTokenizer,
    any_cached_caption,
    encode_captions,
    load_tokenizer,
)
from ..pid_core.download import GEMMA_FILES
from ..pid_core.gemma import TOKENIZER_KEY, build_gemma, gemma_weights_from_state_dict, read_gemma
from .common import CATEGORY, NODE_PREFIX, reported_warnings

log = logging.getLogger("comfyui-pid")

NONE = "none"
TEXT_ENCODERS = "text_encoders"
# PiD's text encoder ran in bf16 (facts §4); the same arithmetic here on every device.
COMPUTE_DTYPE = torch.bfloat16
# ComfyUI's Gemma/Llama text encoders keep the decoder under "<name>.transformer.model." (lumina2 and pixeldit:
# "gemma2_2b.transformer.model."); the Gemma weights are what lies under the prefix of this key.
_EMBEDDING_KEY = "model.embed_tokens.weight"
_CLIP_NAME = "The connected CLIP"
PID_CAPTION_KEY = "pid_caption"  # marks PiD Caption's CONDITIONING
NEGATIVE_CAPTION_KEY = "pid_negative_caption"


def _encode(model, tokenizer: CaptionTokenizer, texts: list[str], device) -> list[torch.Tensor]:
    """Each text on its own (a batch would pad them to one length and change their rounding)."""
    return [encode_captions(model, tokenizer, [text], COMPUTE_DTYPE, device=device).to(mm.intermediate_device())
            for text in texts]  # fmt: skip


def _encode_with_file(gemma_name: str, texts: list[str]) -> list[torch.Tensor]:
    """Our encoder on a Gemma-2 file, handed to ComfyUI's model management for the time of the encode."""
    path = folder_paths.get_full_path_or_raise(TEXT_ENCODERS, gemma_name)
    with reported_warnings("PiD Caption"):
        weights = read_gemma(path, COMPUTE_DTYPE)
    tokenizer = load_tokenizer(weights)
    model = build_gemma(weights, COMPUTE_DTYPE, "cpu", operations=comfy.ops.manual_cast)
    weights.state_dict = {}  # the model holds the tensors now
    patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=mm.text_encoder_device(), offload_device=mm.text_encoder_offload_device()
    )
    mm.load_models_gpu([patcher])
    return _encode(model, tokenizer, texts, patcher.load_device)


def default_captions(hidden_size: int) -> tuple[torch.Tensor | None, torch.Tensor | None, str | None]:
    """The empty caption and the negative prompt's embeddings for a decode given no caption, and where they came
    from: PiD's caption cache (filled by the command line and earlier decodes), else Gemma-2-2B-it from
    models/text_encoders under its released name (loaded once, then cached); (None, None, None) without either."""
    if (empty := any_cached_caption("", hidden_size)) is not None:
        return empty, any_cached_caption(NEGATIVE_PROMPT, hidden_size), "PiD's caption cache"
    released = {name.rsplit("/", 1)[-1] for name in GEMMA_FILES.values()}
    for name in folder_paths.get_filename_list(TEXT_ENCODERS):
        if name.rsplit("/", 1)[-1] in released:
            path = folder_paths.get_full_path_or_raise(TEXT_ENCODERS, name)
            encoder = CaptionEncoder.load(path, dtype=COMPUTE_DTYPE, operations=comfy.ops.manual_cast)
            if encoder.model.config.hidden_size == hidden_size:
                return encoder.empty_caption(), encoder.negative_caption(), f"models/text_encoders/{name}"
    return None, None, None


def _gemma_prefix(state_dict: dict[str, torch.Tensor]) -> str:
    """Where the Gemma-2 decoder's weights start in a CLIP's state dict; a clear error for any other CLIP."""
    candidates = [k[: -len(_EMBEDDING_KEY)] for k in state_dict if k.endswith(_EMBEDDING_KEY)]
    # a CLIP holding several decoders (e.g. HiDream's) names the Gemma-2 one by its post-feedforward norms
    gemma2 = [p for p in candidates if f"{p}model.layers.0.post_feedforward_layernorm.weight" in state_dict]
    if gemma2 or candidates:
        return (gemma2 or candidates)[0]
    models = sorted({k.split(".", 1)[0] for k in state_dict if "." in k})
    raise ValueError(
        f"{_CLIP_NAME} is not a Gemma-2 text encoder (it holds {', '.join(models) or 'no weights'}): load "
        "gemma_2_2b_it_elm_bf16.safetensors with Load CLIP (type lumina2), or pick it in gemma_name instead."
    )


def _encode_with_clip(clip, texts: list[str]) -> list[torch.Tensor]:
    """Our encoder built on the CLIP's own tensors, where ComfyUI's model management put them (not copied)."""
    prefix = _gemma_prefix(clip.get_sd())  # refuse another encoder before loading it
    clip.load_model()  # as CLIPTextEncode does: the CLIP's patcher loads its weights (with any LoRA patches)
    state_dict = clip.get_sd()  # now the tensors where they were loaded
    spiece = state_dict.get(TOKENIZER_KEY)
    tensors = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    weights = gemma_weights_from_state_dict(
        tensors, spiece.cpu().numpy().tobytes() if spiece is not None else None, _CLIP_NAME
    )
    tokenizer = load_tokenizer(weights)
    # stored as the CLIP stores them (float8 weights of a scaled-fp8 CLIP are dequantized), computed in bf16
    storage = weights.state_dict["embed_tokens.weight"].dtype
    model = build_gemma(weights, storage, device=None, operations=comfy.ops.manual_cast)
    return _encode(model, tokenizer, texts, clip.patcher.load_device)


class PiDCaption(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{NODE_PREFIX}Caption",
            display_name="PiD Caption",
            category=CATEGORY,
            description=(
                "Encodes a caption for PiD Decode with Gemma-2-2B-it exactly as PiD was trained: its system prompt "
                "plus the caption, 300 positions, Gemma's final layer. Give either a Gemma-2 file (gemma_name) or a "
                "CLIP loaded from one; an empty text gives the empty caption PiD saw in training. The negative prompt's "
                "encoding comes along for the guidance of undistilled checkpoints."
            ),
            inputs=[
                io.String.Input(
                    "text", multiline=True, default="",
                    tooltip="What the picture shows, e.g. your diffusion prompt. Empty text is fine: it gives the "
                    "empty caption PiD was trained with.",
                ),
                io.Combo.Input(
                    "gemma_name", options=[NONE, *folder_paths.get_filename_list(TEXT_ENCODERS)], default=NONE,
                    tooltip="Gemma-2-2B-it from models/text_encoders (gemma_2_2b_it_elm_bf16.safetensors or its "
                    "fp8_scaled variant), loaded for this encode; 'none' when a CLIP is connected.",
                ),
                io.Clip.Input(
                    "clip", optional=True,
                    tooltip="Instead of gemma_name: a CLIP loaded from Gemma-2-2B-it (Load CLIP, type lumina2 or "
                    "pixeldit). Only its weights and tokenizer are used, in PiD's own layout.",
                ),
            ],
            outputs=[io.Conditioning.Output(display_name="caption")],
        )

    @classmethod
    def execute(cls, text: str, gemma_name: str, clip=None) -> io.NodeOutput:
        if clip is not None and gemma_name != NONE:
            raise ValueError(
                f"PiD Caption got both a CLIP and gemma_name {gemma_name!r}: disconnect the CLIP or set gemma_name "
                "to none."
            )
        if clip is None and gemma_name == NONE:
            raise ValueError(
                "PiD Caption needs Gemma-2-2B-it: pick gemma_2_2b_it_elm_bf16.safetensors in gemma_name, or connect "
                "a CLIP loaded from it (Load CLIP, type lumina2)."
            )
        # the negative prompt's embedding rides along: undistilled checkpoints guide away from it
        texts = [text, NEGATIVE_PROMPT]
        if clip is not None:
            embedding, negative = _encode_with_clip(clip, texts)
        else:
            embedding, negative = _encode_with_file(gemma_name, texts)
        log.info("PiD Caption: %d characters -> caption %s", len(text), tuple(embedding.shape))
        return io.NodeOutput([[embedding, {PID_CAPTION_KEY: True, NEGATIVE_CAPTION_KEY: negative}]])
