"""The Gemma-2 text model PiD's captions are encoded with, and the weight files it is read from.

PiD was trained on the final hidden state (after the final norm) of ``Gemma-2-2B-it`` run by transformers
with its SDPA attention, which ignores Gemma-2's attention-logit soft-capping: so this model has none
(facts §4, trap 21). Per layer: ``h += post_attn_norm(attn(input_norm(h)))`` then
``h += post_ffw_norm(mlp(pre_ffw_norm(h)))``; norms are Gemma's RMSNorm with ``(1 + weight)``; attention is
grouped-query with half-split RoPE, queries scaled by ``query_pre_attn_scalar ** -0.5``, and every other
layer (the first included) sees only the last ``sliding_window`` positions.

Weight files (see :func:`read_gemma`):
- ``comfy``: Comfy-Org's text-encoder repacks (``gemma_2_2b_it_elm_bf16.safetensors``): ``model.``-prefixed
  keys and the SentencePiece tokenizer embedded as a ``spiece_model`` uint8 tensor;
- ``comfy_fp8``: the ``_fp8_scaled`` variant: float8 weights with a per-tensor ``scale_weight`` (dequantized
  to bf16 here);
- ``hf``: Hugging Face safetensors (one file, or shards with ``model.safetensors.index.json``) with
  ``config.json`` and ``tokenizer.model`` beside them.
Shapes come from the weights; what they cannot tell (head width, window, RoPE base) comes from
``config.json`` when there is one, else from Gemma-2's published values.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import damaged_file
from .layers import CastOps

TOKENIZER_KEY = "spiece_model"  # ComfyUI embeds the SentencePiece model under this key
_FP8_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # ComfyUI's scaled-fp8 and its newer quant format
_IGNORED_KEYS = ("lm_head.", "scaled_fp8", "_quantization_metadata")  # PiD uses the bare decoder


class GemmaError(ValueError):
    """A file that cannot be used as PiD's Gemma-2 text encoder; the message says why and what to do."""

    __module__ = "pid_core"  # as CheckpointError: ComfyUI names the type by its module


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class GemmaConfig:
    """Structure of a Gemma-2 decoder. Defaults after the shapes are Gemma-2-2B's published values."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 256
    query_pre_attn_scalar: float = 256.0
    sliding_window: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    # per layer, True = sliding-window attention; None = Gemma-2's pattern (layers 0, 2, 4, ... slide)
    sliding_layers: tuple[bool, ...] | None = None

    def is_sliding(self, layer: int) -> bool:
        if self.sliding_layers is not None:
            return self.sliding_layers[layer]
        return layer % 2 == 0

    @classmethod
    def from_weights(
        cls, tensors: dict[str, torch.Tensor], hf_config: dict | None = None, name: str = "Gemma"
    ) -> GemmaConfig:
        """Shapes from ``tensors`` (canonical keys), the rest from a Hugging Face ``config.json`` dict if given."""
        hf_config = hf_config or {}
        extra = {}
        for key, field_name in _HF_CONFIG_FIELDS.items():
            if hf_config.get(key) is not None:
                extra[field_name] = hf_config[key]
        if "layer_types" in hf_config and hf_config["layer_types"]:
            extra["sliding_layers"] = tuple(t == "sliding_attention" for t in hf_config["layer_types"])
        head_dim = int(extra.get("head_dim", cls.head_dim))
        vocab, hidden = tensors["embed_tokens.weight"].shape
        q_out = tensors["layers.0.self_attn.q_proj.weight"].shape[0]
        kv_out = tensors["layers.0.self_attn.k_proj.weight"].shape[0]
        if q_out % head_dim or kv_out % head_dim or (q_out // head_dim) % max(kv_out // head_dim, 1):
            raise GemmaError(
                f"{name}: attention widths {q_out}/{kv_out} do not split into heads of {head_dim}; this is not a "
                "Gemma-2 model (or its config.json is missing): use Gemma-2-2B-it."
            )
        layers = 1 + max(int(m.group(1)) for k in tensors if (m := re.match(r"layers\.(\d+)\.", k)))
        config = cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=tensors["layers.0.mlp.gate_proj.weight"].shape[0],
            num_layers=layers,
            num_heads=q_out // head_dim,
            num_kv_heads=kv_out // head_dim,
            **{k: v for k, v in extra.items() if k != "sliding_layers"},
            sliding_layers=extra.get("sliding_layers"),
        )
        if config.sliding_layers is not None and len(config.sliding_layers) != layers:
            raise GemmaError(f"{name}: config.json lists {len(config.sliding_layers)} layer types for {layers} layers.")
        return config


_HF_CONFIG_FIELDS = {
    "head_dim": "head_dim",
    "query_pre_attn_scalar": "query_pre_attn_scalar",
    "sliding_window": "sliding_window",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps",
}


# --------------------------------------------------------------------------- model


class GemmaRMSNorm(nn.Module):
    """``x / rms(x) * (1 + weight)`` computed in fp32 and returned in the input's dtype (Gemma's variant)."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype=None, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.to(device=x.device, dtype=torch.float32))).to(x.dtype)


def rope_tables(head_dim: int, length: int, theta: float, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head_dim] for half-split RoPE: angles in fp32, then rounded to ``dtype`` (as the
    reference's transformers does)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_freq[None]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, heads, T, d] by (cos, sin) [T, d], pairing dimension m with m + d/2."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class GemmaAttention(nn.Module):
    def __init__(self, config: GemmaConfig, dtype=None, device=None, operations=CastOps) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.scale = config.query_pre_attn_scalar**-0.5
        hidden, inner, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.q_proj = operations.Linear(hidden, inner, bias=False, dtype=dtype, device=device)
        self.k_proj = operations.Linear(hidden, kv, bias=False, dtype=dtype, device=device)
        self.v_proj = operations.Linear(hidden, kv, bias=False, dtype=dtype, device=device)
        self.o_proj = operations.Linear(inner, hidden, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape

        def heads(t: torch.Tensor, n: int) -> torch.Tensor:
            return t.view(batch, length, n, self.head_dim).transpose(1, 2)

        q = apply_rope(heads(self.q_proj(x), self.heads), *rope)
        k = apply_rope(heads(self.k_proj(x), self.kv_heads), *rope)
        v = heads(self.v_proj(x), self.kv_heads)
        group = self.heads // self.kv_heads  # query head h reads key/value head h // group
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        # no soft-capping, as in the reference's SDPA run; a query with no visible key gets zeros (PyTorch's SDPA)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class GemmaMLP(nn.Module):
    """GeGLU: ``down(gelu_tanh(gate x) * up x)``."""

    def __init__(self, config: GemmaConfig, dtype=None, device=None, operations=CastOps) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = operations.Linear(hidden, inner, bias=False, dtype=dtype, device=device)
        self.up_proj = operations.Linear(hidden, inner, bias=False, dtype=dtype, device=device)
        self.down_proj = operations.Linear(inner, hidden, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaLayer(nn.Module):
    def __init__(self, config: GemmaConfig, sliding: bool, dtype=None, device=None, operations=CastOps) -> None:
        super().__init__()
        self.sliding = sliding
        norm = dict(dim=config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, device=device)
        self.input_layernorm = GemmaRMSNorm(**norm)
        self.self_attn = GemmaAttention(config, dtype, device, operations)
        self.post_attention_layernorm = GemmaRMSNorm(**norm)
        self.pre_feedforward_layernorm = GemmaRMSNorm(**norm)
        self.mlp = GemmaMLP(config, dtype, device, operations)
        self.post_feedforward_layernorm = GemmaRMSNorm(**norm)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), rope, mask))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


def attention_masks(padding: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks [B, 1, T, T] (True = may attend) from a padding mask [B, T]: causal, and causal within
    the last ``window`` positions; padded keys are never attended."""
    length = padding.shape[1]
    pos = torch.arange(length, device=padding.device)
    causal = pos[None, :] <= pos[:, None]  # [query, key]
    near = causal & (pos[:, None] - pos[None, :] < window)
    keys = padding.bool()[:, None, None, :]
    return causal[None, None] & keys, near[None, None] & keys


class Gemma2Encoder(nn.Module):
    """Gemma-2's decoder stack without LM head; ``forward`` returns the final hidden state after the final norm."""

    def __init__(self, config: GemmaConfig, dtype=None, device=None, operations=CastOps) -> None:
        super().__init__()
        self.config = config
        embedding = getattr(operations, "Embedding", nn.Embedding)  # comfy.ops has one; CastOps does not need it
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            GemmaLayer(config, config.is_sliding(i), dtype, device, operations) for i in range(config.num_layers)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Hidden states [B, T, hidden] of token ids [B, T] with padding mask [B, T] (1 = token, 0 = padding),
        computed in ``dtype`` (default: the embedding's)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.embed_tokens(input_ids)
        dtype = dtype or h.dtype
        # the sqrt(hidden) scale is rounded to the compute dtype first, as in the reference (48 is exact in bf16)
        h = h.to(dtype) * torch.tensor(math.sqrt(self.config.hidden_size), dtype=dtype, device=h.device)
        rope = rope_tables(self.config.head_dim, input_ids.shape[1], self.config.rope_theta, dtype, h.device)
        full, sliding = attention_masks(attention_mask.to(h.device), self.config.sliding_window)
        for layer in self.layers:
            h = layer(h, rope, sliding if layer.sliding else full)
        return self.norm(h)


# --------------------------------------------------------------------------- weight files


@dataclass
class GemmaWeights:
    """What a Gemma-2 file holds: canonical weights (no ``model.`` prefix), structure, and tokenizer if embedded."""

    path: Path  # what the caller named (file, index json or folder); for in-memory weights, their name
    files: tuple[Path, ...]  # the weight files read (none for in-memory weights)
    layout: str  # "comfy", "comfy_fp8", "hf", or "state_dict" for in-memory weights
    state_dict: dict[str, torch.Tensor]
    config: GemmaConfig
    tokenizer_model: bytes | None  # serialized SentencePiece model when embedded (Comfy-Org files)

    @property
    def tokenizer_file(self) -> Path | None:
        """``tokenizer.model`` beside the weights, where Hugging Face layouts keep it."""
        if not self.files:
            return None
        candidate = self.files[0].parent / "tokenizer.model"
        return candidate if candidate.is_file() else None


def weight_files(path: str | Path) -> tuple[Path, ...]:
    """The safetensors files making up the Gemma weights at ``path``: one file, a shard set (given by its
    index json, any one shard, or the folder), or the single ``model.safetensors`` of a folder."""
    path = Path(path)
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index.is_file():
            path = index
        elif single.is_file():
            return (single,)
        else:
            found = sorted(path.glob("*.safetensors"))
            if len(found) != 1:
                raise GemmaError(
                    f"{path} holds {len(found)} .safetensors files and no model.safetensors.index.json; "
                    "name the Gemma-2 weight file itself."
                )
            return (found[0],)
    elif not path.is_file():
        raise GemmaError(f"Gemma-2 weights not found: {path}; check the path, or download them (see the README).")
    if path.name.endswith(".json"):
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (ValueError, KeyError, OSError):
            raise GemmaError(f"{path.name} is not a safetensors index: it has no readable weight_map.") from None
        files = tuple(path.parent / s for s in shards)
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise GemmaError(
                f"{path.name} lists shards that are missing beside it: {', '.join(missing)}; download them too."
            )
        return files
    if path.suffix != ".safetensors":
        raise GemmaError(f"{path.name}: unsupported file type {path.suffix!r}; Gemma-2 weights are read from .safetensors.")
    if re.search(r"-\d{5}-of-\d{5}\.safetensors$", path.name) and (path.parent / "model.safetensors.index.json").is_file():
        return weight_files(path.parent / "model.safetensors.index.json")
    return (path,)


def _read_raw(files: tuple[Path, ...]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                metadata.update(f.metadata() or {})
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError):
            raise GemmaError(damaged_file(file.name)) from None
    return tensors, metadata


def _to_dtype(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], bool]:
    """Floating-point tensors in ``dtype`` (None: as they are, except float8 ones, which become bf16), float8
    ones first multiplied by their per-tensor scale (which is consumed). Empties ``tensors`` as it goes, so the
    file never exists twice in memory."""
    scales = {k[: -len(s)] + ".weight": v for k, v in tensors.items() for s in _FP8_SCALE_SUFFIXES if k.endswith(s)}
    quantized = False
    out = {}
    for key in list(tensors):
        value = tensors.pop(key)
        if key.endswith(_FP8_SCALE_SUFFIXES) or key.endswith((".scale_input", ".input_scale", ".comfy_quant")):
            continue
        if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            quantized = quantized or value.numel() > 0  # ComfyUI also stores an empty `scaled_fp8` marker
            scale = scales.get(key)
            value = (value.float() * (scale.float() if scale is not None else 1.0)).to(dtype or torch.bfloat16)
        out[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    return out, quantized


def _canonical(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tensors.items():
        if key == TOKENIZER_KEY or key.startswith(_IGNORED_KEYS):
            continue
        out[key.removeprefix("model.")] = value
    required = ("embed_tokens.weight", "norm.weight", "layers.0.self_attn.q_proj.weight", "layers.0.mlp.gate_proj.weight")
    missing = [k for k in required if k not in out]
    if missing:
        raise GemmaError(
            f"{name} has no {missing[0]} tensor: it is not a Gemma-2 text encoder (found e.g. "
            f"{', '.join(sorted(tensors)[:3]) or 'nothing'}); use gemma_2_2b_it_elm_bf16.safetensors."
        )
    if "layers.0.post_feedforward_layernorm.weight" not in out:
        raise GemmaError(
            f"{name} has no post-feedforward norms, so it is Gemma-1 or another Llama-like model; PiD needs Gemma-2-2B-it."
        )
    if "layers.0.self_attn.q_norm.weight" in out:
        raise GemmaError(f"{name} has query/key norms, so it is Gemma-3; PiD needs Gemma-2-2B-it.")
    return out


def _hf_config(files: tuple[Path, ...], name: str) -> dict | None:
    config_file = files[0].parent / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, OSError):
        return None
    model_type = config.get("model_type")
    if model_type not in (None, "gemma2"):
        raise GemmaError(
            f"{name}: config.json beside it says model_type {model_type!r}; PiD needs Gemma-2-2B-it ('gemma2')."
        )
    return config


def _warn_if_not_instruction_tuned(names: list[str]) -> None:
    """PiD was trained on Gemma-2-2B-*it*; a base Gemma (Lumina 2's ``gemma_2_2b_fp16``) has the same shapes."""
    lowered = [n.lower() for n in names if n]
    names_gemma = any("gemma" in n for n in lowered)
    says_it = any(re.search(r"(^|[^a-z])(it|instruct\w*)([^a-z]|$)", n) for n in lowered)
    if names_gemma and not says_it:
        warnings.warn(
            f"{names[0]} looks like a base (not instruction-tuned) Gemma-2, but PiD was trained with Gemma-2-2B-it, "
            "so captions may work less well: use gemma_2_2b_it_elm_bf16.safetensors.",
            stacklevel=3,
        )


def read_gemma(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> GemmaWeights:
    """Read Gemma-2 weights in any of the supported layouts, with floating-point tensors in ``dtype``
    (float8 ones dequantized). Warns when the file looks like a non-instruction-tuned Gemma."""
    path = Path(path)
    files = weight_files(path)
    raw, metadata = _read_raw(files)
    name = path.name
    tokenizer = raw.get(TOKENIZER_KEY)
    tensors, quantized = _to_dtype(raw, dtype)
    state = _canonical(tensors, name)
    hf_config = _hf_config(files, name)
    # what names the model: the file, or for Hugging Face's generic model*.safetensors its folder, the
    # safetensors metadata and config.json's source id
    identity_names = [path.parent.name if path.name.startswith("model") else path.name, *map(str, metadata.values())]
    if hf_config:
        identity_names.append(str(hf_config.get("_name_or_path", "")))
    _warn_if_not_instruction_tuned(identity_names)
    layout = "comfy_fp8" if quantized else ("comfy" if tokenizer is not None else "hf")
    return GemmaWeights(
        path=path,
        files=files,
        layout=layout,
        state_dict=state,
        config=GemmaConfig.from_weights(state, hf_config, name),
        tokenizer_model=tokenizer.numpy().tobytes() if tokenizer is not None else None,
    )


def gemma_weights_from_state_dict(
    tensors: dict[str, torch.Tensor], tokenizer_model: bytes | None = None, name: str = "Gemma",
    dtype: torch.dtype | None = None,
) -> GemmaWeights:
    """Gemma-2 weights already in memory (e.g. a ComfyUI text encoder's), with canonical or ``model.``-prefixed
    keys, and the serialized SentencePiece model if known. With ``dtype`` None the tensors are used as they
    are (not copied; float8 ones are dequantized to bf16). ``name`` stands for the weights in error messages.
    Unlike :func:`read_gemma`, nothing tells whether the model is instruction-tuned, so there is no warning."""
    tensors, _ = _to_dtype(dict(tensors), dtype)
    state = _canonical(tensors, name)
    return GemmaWeights(
        path=Path(name),
        files=(),
        layout="state_dict",
        state_dict=state,
        config=GemmaConfig.from_weights(state, None, name),
        tokenizer_model=tokenizer_model,
    )


def build_gemma(
    weights: GemmaWeights, dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = "cpu",
    operations=None,
) -> Gemma2Encoder:
    """The encoder of ``weights``, stored in ``dtype`` on ``device`` (None: each tensor where it is); built on
    the meta device and given the tensors as they are, so the 5 GB of weights are not copied twice (not at all
    when their dtype and device already match). ``operations``: see ``pid_core.layers``."""
    kwargs = {"operations": operations} if operations is not None else {}
    with torch.device("meta"):
        model = Gemma2Encoder(weights.config, dtype=dtype, **kwargs)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(weights.state_dict))
    unexpected = sorted(set(weights.state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights.state_dict) if weights.state_dict[k].shape != expected[k])
    if missing or unexpected or wrong:
        problem = (f"lacks {missing[0]}" if missing else f"has an unexpected {unexpected[0]}" if unexpected
                   else f"has {wrong[0]} of shape {tuple(weights.state_dict[wrong[0]].shape)}")
        raise GemmaError(f"{weights.path.name} {problem}: the file is incomplete or not Gemma-2; download it again.")
    state = {
        k: v.to(dtype) if device is None else v.to(device=device, dtype=dtype) for k, v in weights.state_dict.items()
    }
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_gemma(
    path: str | Path, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu", operations=None
) -> tuple[Gemma2Encoder, GemmaWeights]:
    """Read a Gemma-2 file and build its encoder; the weights object still carries the embedded tokenizer."""
    weights = read_gemma(path, dtype)
    model = build_gemma(weights, dtype, device, operations)
    weights.state_dict = {}  # the model holds the tensors now
    return model, weights


__all__ = [
    "Gemma2Encoder",
    "GemmaConfig",
    "GemmaError",
    "GemmaWeights",
    "build_gemma",
    "gemma_weights_from_state_dict",
    "load_gemma",
    "read_gemma",
    "weight_files",
]
