"""Captions to PiD's text conditioning: the Gemma tokenizer, the reference's prompt layout, and the cached
embeddings of the empty caption and of the negative prompt.

Layout (facts §4, trap 22): the 8-line system prompt (``CHI_PROMPT``) joined with newlines, the caption
appended with no separator; ``n_chi`` = tokens of the system prompt with BOS; the prompt is tokenized to
``n_chi + 298`` tokens (right truncation, right padding); Gemma-2 runs with that padding mask; PiD keeps
position 0 (BOS) and the last 299 positions (the end of the system prompt, the caption, then padding)
-> ``[B, 300, hidden]``.

The empty caption (system prompt + "") is what PiD saw for dropped captions in training, so it is the
conditioning to use when the user gives none. The undistilled teachers' guidance takes its unconditional
branch from the reference's negative prompt (``NEGATIVE_PROMPT``, in the same layout). Both are computed once
per Gemma file and cached in ``cache_dir()`` (``$PID_CACHE_DIR``, else ``$XDG_CACHE_HOME/pid_core`` or
``~/.cache/pid_core``) under a key made from the Gemma file's content, so later runs need not load Gemma at all.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .gemma import Gemma2Encoder, GemmaError, GemmaWeights, load_gemma, weight_files

# The reference's system prompt, verbatim (nv-tlabs/PiD pid/_src/configs/pid/experiment_2k/shared_config.py,
# `_CHI_PROMPT`, identical in the three inference configs). Data, not code: the model was trained with it.
CHI_PROMPT: tuple[str, ...] = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for '
    "image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)
# The reference's unconditional caption for classifier-free guidance, verbatim (nv-tlabs/PiD
# pid/_src/models/pixeldit_model.py, `PixelDiTModelConfig.negative_prompt`, which the PiD teachers inherit; it is
# encoded like any caption, after the system prompt).
NEGATIVE_PROMPT = (
    "low quality, worst quality, over-saturated, three legs, six fingers, cartoon, anime, cgi, low res, blurry, "
    "deformed, distortion, duplicated limbs, plastic skin, jpeg artifacts, watermark"
)
CAPTION_LENGTH = 300  # positions PiD takes (its learned text positions), BOS included
_CACHE_VERSION = "1"  # bump when the layout or the encoder's arithmetic changes


# --------------------------------------------------------------------------- tokenizer


class CaptionTokenizer:
    """Gemma's SentencePiece tokenizer: BOS prepended, no EOS, as the reference's Gemma tokenizer does."""

    def __init__(self, model_proto: bytes, name: str = "tokenizer") -> None:
        try:
            import sentencepiece
        except ImportError:
            raise GemmaError("Encoding captions needs the sentencepiece package: pip install sentencepiece.") from None
        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as err:
            raise GemmaError(
                f"{name} is not a SentencePiece tokenizer model ({err}); use Gemma-2's tokenizer.model."
            ) from None
        self.bos_id = self.processor.bos_id()
        self.pad_id = self.processor.pad_id()
        if self.pad_id < 0 and self.processor.piece_to_id("<pad>") != self.processor.unk_id():
            self.pad_id = self.processor.piece_to_id("<pad>")
        if self.bos_id < 0 or self.pad_id < 0:
            raise GemmaError(
                f"{name} defines no BOS or padding token, so it is not Gemma's tokenizer; use Gemma-2's tokenizer.model."
            )
        # Hugging Face's Gemma tokenizers turn special-token text ("<bos>", "<eos>", ...) in a prompt into that
        # token; SentencePiece alone would spell it out. Control and unknown pieces are those tokens.
        special = {
            self.processor.id_to_piece(i): i
            for i in range(self.processor.get_piece_size())
            if self.processor.is_control(i) or self.processor.is_unknown(i)
        }
        self._special = {piece: i for piece, i in special.items() if piece}
        alternatives = "|".join(re.escape(p) for p in sorted(self._special, key=len, reverse=True))
        self._split = re.compile(f"({alternatives})") if alternatives else None

    @classmethod
    def from_file(cls, path: str | Path) -> CaptionTokenizer:
        path = Path(path)
        if not path.is_file():
            raise GemmaError(f"Tokenizer file not found: {path}; use the tokenizer.model of Gemma-2-2B-it.")
        return cls(path.read_bytes(), path.name)

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with BOS first."""
        ids = [self.bos_id]
        for part in self._split.split(text) if self._split else [text]:
            if part in self._special:
                ids.append(self._special[part])
            elif part:
                ids.extend(self.processor.encode(part))
        return ids


def load_tokenizer(weights: GemmaWeights, tokenizer: str | Path | None = None) -> CaptionTokenizer:
    """The tokenizer named by the caller, else the one embedded in the weights, else ``tokenizer.model`` beside them."""
    if tokenizer is not None:
        return CaptionTokenizer.from_file(tokenizer)
    if weights.tokenizer_model is not None:
        return CaptionTokenizer(weights.tokenizer_model, weights.path.name)
    if weights.tokenizer_file is not None:
        return CaptionTokenizer.from_file(weights.tokenizer_file)
    raise GemmaError(
        f"{weights.path.name} has no embedded tokenizer and no tokenizer.model is beside it; put Gemma-2-2B-it's "
        "tokenizer.model next to it, or use Comfy-Org's gemma_2_2b_it_elm_bf16.safetensors, which embeds it."
    )


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class CaptionTokens:
    input_ids: torch.Tensor  # [B, n_chi + 298] int64, right-padded
    attention_mask: torch.Tensor  # [B, n_chi + 298] int64, 1 = token, 0 = padding
    chi_tokens: int  # tokens of the system prompt, BOS included


def system_prompt() -> str:
    return "\n".join(CHI_PROMPT)


def tokenize_captions(tokenizer: CaptionTokenizer, captions: Sequence[str], length: int = CAPTION_LENGTH) -> CaptionTokens:
    """Token ids and padding mask of ``system prompt + caption`` for each caption, laid out as the reference does."""
    chi = system_prompt()
    chi_tokens = len(tokenizer.encode(chi))
    total = chi_tokens + length - 2
    ids = torch.full((len(captions), total), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(captions), total), dtype=torch.long)
    for row, caption in enumerate(captions):
        tokens = tokenizer.encode(chi + caption)[:total]
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
    return CaptionTokens(ids, mask, chi_tokens)


def keep_positions(hidden: torch.Tensor, length: int = CAPTION_LENGTH) -> torch.Tensor:
    """Position 0 and the last ``length - 1`` positions of hidden states [B, T, D] -> [B, length, D]."""
    total = hidden.shape[1]
    if total < length:
        raise ValueError(f"Only {total} token positions to keep {length} from; the system prompt is missing.")
    return torch.cat([hidden[:, :1], hidden[:, total - (length - 1):]], dim=1)


def encode_captions(
    model: Gemma2Encoder,
    tokenizer: CaptionTokenizer,
    captions: Sequence[str],
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """PiD's caption embeddings [B, 300, hidden] (on the CPU, in the compute dtype) of ``captions``, computed
    on ``device`` (default: where the token embeddings are)."""
    tokens = tokenize_captions(tokenizer, captions)
    if tokens.input_ids.max() >= model.config.vocab_size:
        raise GemmaError(
            f"The tokenizer produced token id {int(tokens.input_ids.max())} but the Gemma weights have only "
            f"{model.config.vocab_size} embeddings; use the tokenizer that belongs to these weights."
        )
    device = device if device is not None else model.embed_tokens.weight.device
    with torch.inference_mode():
        hidden = model(tokens.input_ids.to(device), tokens.attention_mask.to(device), dtype=dtype)
    return keep_positions(hidden).cpu()


def lacks_system_prompt(caption: torch.Tensor, tolerance: float = 1e-3) -> bool:
    """Whether a caption embedding [B, 300, hidden] encodes an empty text without the system prompt: BOS, then one
    vector repeated, as an encoder gives for BOS followed by padding alone (ComfyUI core's ``pixeldit`` encoding of
    "": each padding position sees BOS only). PiD's layout never repeats one vector there: position 1 holds the
    system prompt's last token, the padding after it sees the whole prompt from other positions. An all-zero
    caption is not taken for one."""
    rows = caption[:, 1:].float()
    mean = rows.mean(dim=1)
    spread = (rows - mean[:, None]).norm(dim=-1).amax(dim=1)
    size = mean.norm(dim=-1)
    return bool(((size > 0) & (spread <= tolerance * size)).any())


# --------------------------------------------------------------------------- identity and cache


def cache_dir() -> Path:
    """Where the embeddings of fixed captions are cached: ``$PID_CACHE_DIR``, else ``$XDG_CACHE_HOME/pid_core``, else
    ``~/.cache/pid_core``."""
    if os.environ.get("PID_CACHE_DIR"):
        return Path(os.environ["PID_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pid_core"


def _file_fingerprint(path: Path, digest, samples: int = 8, chunk: int = 1 << 20) -> None:
    """Size and evenly spaced 1 MiB samples (header and end included): any two different weight files
    differ there, and reading 8 MiB of a 5 GB file is instant. Names and dates are left out, so a copy or a
    renamed file keeps its cache."""
    size = path.stat().st_size
    digest.update(str(size).encode())
    with path.open("rb") as f:
        for i in range(samples):
            f.seek(max(0, (size - chunk) * i // max(samples - 1, 1)))
            digest.update(f.read(chunk))


def gemma_identity(path: str | Path, tokenizer: str | Path | None = None) -> str:
    """A content key for the Gemma weights at ``path`` (and the tokenizer used with them)."""
    files = list(weight_files(path))
    tok = Path(tokenizer) if tokenizer is not None else files[0].parent / "tokenizer.model"
    if tok.is_file():
        files.append(tok)
    digest = hashlib.sha256()
    for file in files:
        _file_fingerprint(file, digest)
    return digest.hexdigest()


def _layout(dtype: torch.dtype) -> str:
    """What besides the Gemma weights decides a cached embedding: the cache version, the system prompt, the length
    and the compute dtype."""
    prompt = hashlib.sha256(system_prompt().encode()).hexdigest()
    return f"{_CACHE_VERSION}|{prompt}|{CAPTION_LENGTH}|{dtype}"


def _cache_key(identity: str, dtype: torch.dtype) -> str:
    return hashlib.sha256(f"{identity}|{_layout(dtype)}".encode()).hexdigest()[:20]


def cached_caption_path(
    identity: str, text: str = "", dtype: torch.dtype = torch.bfloat16, directory: str | Path | None = None
) -> Path:
    """Where the embedding of ``text`` by the Gemma weights ``identity`` is cached."""
    key = _cache_key(identity, dtype)
    if text:
        key += "_" + hashlib.sha256(text.encode()).hexdigest()[:16]
    return Path(directory or cache_dir()) / f"pid_{'caption' if text else 'empty_caption'}_{key}.safetensors"


def _read_cached(path: Path) -> torch.Tensor | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        embedding = load_file(str(path))["caption"]
    except (SafetensorError, OSError, KeyError):
        return None  # missing or damaged: compute it again
    return embedding if embedding.ndim == 3 and embedding.shape[:2] == (1, CAPTION_LENGTH) else None


def _write_cached(path: Path, embedding: torch.Tensor, source: str, text: str, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        metadata = {"gemma": source, "prompt": text, "layout": _layout(dtype)}
        save_file({"caption": embedding.contiguous()}, str(partial), metadata=metadata)
        os.replace(partial, path)
    except OSError as err:
        warnings.warn(
            f"Could not cache a caption embedding in {path.parent} ({err}); set PID_CACHE_DIR to a "
            "writable folder.",
            stacklevel=3,
        )


# --------------------------------------------------------------------------- the holder


@dataclass
class CaptionEncoder:
    """A loaded Gemma-2 with its tokenizer: ``encode(captions)`` gives PiD's ``[B, 300, hidden]`` conditioning."""

    model: Gemma2Encoder
    tokenizer: CaptionTokenizer
    identity: str  # content key of the weights (see gemma_identity)
    name: str
    dtype: torch.dtype = torch.bfloat16  # compute dtype; the reference ran Gemma in bf16

    @classmethod
    def load(
        cls,
        path: str | Path,
        tokenizer: str | Path | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        operations=None,
    ) -> CaptionEncoder:
        """Load Gemma-2 weights (Comfy-Org repack, its fp8_scaled variant, or Hugging Face safetensors) and
        their tokenizer (embedded, ``tokenizer``, or ``tokenizer.model`` beside the weights)."""
        model, weights = load_gemma(path, dtype, device, operations)
        tok = load_tokenizer(weights, tokenizer)
        return cls(model, tok, gemma_identity(path, tokenizer), Path(path).name, dtype)

    def encode(self, captions: str | Sequence[str]) -> torch.Tensor:
        if isinstance(captions, str):
            captions = [captions]
        return encode_captions(self.model, self.tokenizer, list(captions), self.dtype)

    def cached(self, text: str, directory: str | Path | None = None) -> torch.Tensor:
        """The embedding [1, 300, hidden] of a fixed ``text``, from the cache or computed and cached."""
        path = cached_caption_path(self.identity, text, self.dtype, directory)
        cached = _read_cached(path)
        if cached is not None and cached.shape[-1] == self.model.config.hidden_size:
            return cached
        embedding = self.encode([text])
        _write_cached(path, embedding, self.name, text, self.dtype)
        return embedding

    def empty_caption(self, directory: str | Path | None = None) -> torch.Tensor:
        """The embedding of the empty caption [1, 300, hidden]: the conditioning when there is no caption."""
        return self.cached("", directory)

    def negative_caption(self, directory: str | Path | None = None) -> torch.Tensor:
        """The embedding of :data:`NEGATIVE_PROMPT` [1, 300, hidden]: the unconditional branch of guidance."""
        return self.cached(NEGATIVE_PROMPT, directory)


def cached_caption_embedding(
    gemma: str | Path,
    text: str = "",
    directory: str | Path | None = None,
    tokenizer: str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    operations=None,
) -> torch.Tensor:
    """The embedding [1, 300, hidden] of a fixed ``text`` (default: the empty caption; for guidance,
    :data:`NEGATIVE_PROMPT`) by the Gemma file ``gemma``; Gemma is loaded only when the cache (``directory``,
    default :func:`cache_dir`) does not have it yet."""
    cached = _read_cached(cached_caption_path(gemma_identity(gemma, tokenizer), text, dtype, directory))
    if cached is not None:
        return cached
    return CaptionEncoder.load(gemma, tokenizer, dtype, device, operations).cached(text, directory)


def any_cached_caption(
    text: str, hidden_size: int, directory: str | Path | None = None, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor | None:
    """The newest cached embedding of a fixed ``text`` by any Gemma-2 file of ``hidden_size`` (the bf16 and fp8 repacks
    of Gemma-2-2B-it give the same captions to within their rounding), or None when the cache has none. For a
    decode without a caption and without a Gemma file at hand."""
    from safetensors import SafetensorError, safe_open

    files = sorted(Path(directory or cache_dir()).glob("pid_*caption_*.safetensors"),
                   key=lambda f: f.stat().st_mtime, reverse=True)  # fmt: skip
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError):
            continue
        if metadata.get("prompt") == text and metadata.get("layout") == _layout(dtype):
            embedding = _read_cached(file)
            if embedding is not None and embedding.shape[-1] == hidden_size:
                return embedding
    return None


def empty_caption_embedding(gemma: str | Path, directory: str | Path | None = None, **kwargs) -> torch.Tensor:
    """The empty caption's embedding for the Gemma file ``gemma`` (see :func:`cached_caption_embedding`)."""
    return cached_caption_embedding(gemma, "", directory, **kwargs)


__all__ = [
    "CAPTION_LENGTH",
    "CHI_PROMPT",
    "NEGATIVE_PROMPT",
    "CaptionEncoder",
    "CaptionTokenizer",
    "CaptionTokens",
    "cache_dir",
    "any_cached_caption",
    "cached_caption_embedding",
    "empty_caption_embedding",
    "encode_captions",
    "gemma_identity",
    "keep_positions",
    "lacks_system_prompt",
    "load_tokenizer",
    "tokenize_captions",
]
