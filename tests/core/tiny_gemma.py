"""Tiny Gemma-2 files for tests: a SentencePiece tokenizer trained here on a few lines, random weights, and
writers for the three on-disk layouts (Comfy-Org repack, its fp8_scaled variant, Hugging Face). Nothing is
downloaded.
"""

from __future__ import annotations

import functools
import io
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from pid_core.captions import CHI_PROMPT
from pid_core.gemma import GemmaConfig

_TEXT = [
    *CHI_PROMPT,
    "A red fox jumps over the lazy dog near a quiet river at sunset.",
    "Portrait of an old sailor with a grey beard, oil painting, dramatic light.",
    "Ein kleines Haus im Wald, 1234 Schnee!",
]
VOCAB = 600

# Hugging Face config.json of the parity model: head width and query scale differ from the Gemma-2 defaults
# (so they must be read), and the window (200) is shorter than the prompt (~330 tokens of system prompt alone).
HF_CONFIG = dict(
    model_type="gemma2",
    architectures=["Gemma2ForCausalLM"],
    _name_or_path="tiny/gemma-2-tiny-it",
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=24,
    sliding_window=200,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)

# Comfy-Org files carry no config, so their structure must be Gemma-2's own apart from the widths:
# head width 256, query scale 256, window 4096.
COMFY_CONFIG = GemmaConfig(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=1
)


@functools.lru_cache(maxsize=None)
def tokenizer_model() -> bytes:
    """A BPE SentencePiece model with Gemma's special tokens (<pad> 0, <eos> 1, <bos> 2, <unk> 3), byte fallback
    and Gemma's normalisation (none: no dummy prefix, whitespace kept)."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_TEXT * 3), model_writer=buffer, vocab_size=VOCAB, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", byte_fallback=True, character_coverage=1.0,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2,
    )
    return buffer.getvalue()


def write_tokenizer(path: Path) -> Path:
    path.write_bytes(tokenizer_model())
    return path


def hf_config(**changes) -> dict:
    return {**HF_CONFIG, **changes}


def config_of(hf: dict) -> GemmaConfig:
    return GemmaConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
        head_dim=hf["head_dim"], query_pre_attn_scalar=hf["query_pre_attn_scalar"], sliding_window=hf["sliding_window"],
    )


def random_weights(config: GemmaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Canonical (Gemma2Model) keys, fp32, scaled so that activations stay O(1) and attention is not uniform."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inner = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim

    def linear(out: int, fan_in: int) -> torch.Tensor:
        return torch.randn(out, fan_in, generator=gen) / math.sqrt(fan_in)

    def norm() -> torch.Tensor:
        return 0.2 * torch.randn(hidden, generator=gen)  # Gemma norms multiply by (1 + weight)

    sd = {
        "embed_tokens.weight": torch.randn(config.vocab_size, hidden, generator=gen) / math.sqrt(hidden),
        "norm.weight": norm(),
    }
    for i in range(config.num_layers):
        p = f"layers.{i}."
        sd |= {
            p + "self_attn.q_proj.weight": 2 * linear(q, hidden),
            p + "self_attn.k_proj.weight": 2 * linear(kv, hidden),
            p + "self_attn.v_proj.weight": linear(kv, hidden),
            p + "self_attn.o_proj.weight": linear(hidden, q),
            p + "mlp.gate_proj.weight": linear(inner, hidden),
            p + "mlp.up_proj.weight": linear(inner, hidden),
            p + "mlp.down_proj.weight": linear(hidden, inner),
            **{p + n + ".weight": norm() for n in ("input_layernorm", "post_attention_layernorm",
                                                   "pre_feedforward_layernorm", "post_feedforward_layernorm")},
        }
    return sd


def _tokenizer_tensor() -> torch.Tensor:
    return torch.frombuffer(bytearray(tokenizer_model()), dtype=torch.uint8)


def write_comfy(
    path: Path, sd: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16, metadata: dict | None = None
) -> Path:
    """ComfyUI's text-encoder layout: ``model.`` prefix and the tokenizer as a ``spiece_model`` uint8 tensor."""
    tensors = {f"model.{k}": v.to(dtype).contiguous() for k, v in sd.items()}
    save_file({**tensors, "spiece_model": _tokenizer_tensor()}, str(path), metadata=metadata)
    return path


def fp8_quantize(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``_fp8_scaled`` layout's tensors (canonical keys): linear weights in float8_e4m3fn with a per-tensor
    fp32 ``scale_weight`` (max |w| / 448); embeddings and norms kept in bf16."""
    out = {}
    for key, value in sd.items():
        if key.endswith("_proj.weight"):
            scale = value.abs().max() / 448.0
            out[key] = (value / scale).to(torch.float8_e4m3fn)
            out[key.removesuffix("weight") + "scale_weight"] = scale.float()
        else:
            out[key] = value.to(torch.bfloat16)
    return out


def dequantized(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What loading the fp8 file should give, in bf16."""
    q = fp8_quantize(sd)
    out = {}
    for key, value in q.items():
        if key.endswith("scale_weight"):
            continue
        scale = q[key.removesuffix("weight") + "scale_weight"] if value.dtype == torch.float8_e4m3fn else 1.0
        out[key] = (value.float() * scale).to(torch.bfloat16)
    return out


def write_comfy_fp8(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    tensors = {f"model.{k}": v.contiguous() for k, v in fp8_quantize(sd).items()}
    marker = torch.empty(0, dtype=torch.float8_e4m3fn)  # ComfyUI's `scaled_fp8` marker: its dtype names the format
    save_file({**tensors, "scaled_fp8": marker, "spiece_model": _tokenizer_tensor()}, str(path))
    return path


def write_hf(
    folder: Path, sd: dict[str, torch.Tensor], config: dict, shards: int = 2, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """A Hugging Face snapshot: ``model.``-prefixed keys split over ``shards`` files with an index json,
    ``config.json`` and ``tokenizer.model``. Returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        part = {f"model.{k}": sd[k].to(dtype).contiguous() for k in keys[i::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    write_tokenizer(folder / "tokenizer.model")
    return folder
