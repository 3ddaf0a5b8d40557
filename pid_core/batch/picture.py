"""One picture's decode, shared by ``python -m pid_core decode`` and every worker of ``python -m pid_core batch``.

The decode command and the batch run the same code from the latent file to the image tensor, so a batch output
equals the single command's bit for bit by construction (same checkpoint settings, same plan; tested in
``tests/core/test_batch.py``). What differs is only how long things stay loaded: the decode command loads
Gemma, encodes and lets it go before PiD is loaded (the two never share memory), while a batch worker keeps
both for all its pictures.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..api import PiDDecoder, StepCallback
from ..captions import NEGATIVE_PROMPT, CaptionEncoder, cached_caption_embedding
from ..checkpoint import CheckpointInfo, load_checkpoint
from ..tensor_files import read_caption_file, read_latent_file

SizeArg = str | int  # "native", "auto" or a long side in pixels
_CAPTIONS_KEPT = 16  # caption embeddings a worker keeps (2.8 MB each), for manifests that repeat a caption


@dataclass(frozen=True)
class DecoderSettings:
    """What every picture of a run shares: the checkpoint and how it runs. Loaded once per worker."""

    checkpoint: str
    space: str | None = None
    training: str | None = None
    precision: str = "bf16"
    gemma: str | None = None
    schedule: str = "spread"
    tiling: str = "auto"
    tile_size: int | None = None
    attention: str = "auto"
    device: str = "cpu"


@dataclass(frozen=True)
class Picture:
    """One decode: a latent file and what varies from picture to picture (the decode command's own arguments, or
    one manifest line)."""

    latent: str
    sigma: float | Sequence[float] | None = 0.0  # None in a manifest line: from the latent file (see .manifest)
    seed: int = 0
    size: SizeArg = "native"
    steps: int | None = None
    caption: str | None = None  # text, encoded with the run's Gemma ("" or None with Gemma: the empty caption)
    caption_embedding: str | None = None  # a saved [B, 300, D] embedding instead of text
    negative_caption_embedding: str | None = None
    cfg: float | None = None
    shift: float | None = None
    space: str | None = None  # this latent's space, when the checkpoint's own or --space does not say


def parse_size(size: SizeArg) -> SizeArg:
    """The decode API's size: "native"/"auto" as they are, a long side as an int."""
    return size if size in ("auto", "native") else int(size)


class PictureDecoder:
    """Decodes pictures with one checkpoint, loaded on first use and kept.

    ``keep_gemma=False`` (the decode command) drops Gemma after each caption, so PiD and Gemma never share memory;
    a batch worker keeps it.
    """

    def __init__(self, settings: DecoderSettings, keep_gemma: bool = True) -> None:
        self.settings = settings
        self.keep_gemma = keep_gemma
        self._decoder: PiDDecoder | None = None
        self._info: CheckpointInfo | None = None
        self._encoder: CaptionEncoder | None = None
        self._captions: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def decoder(self) -> PiDDecoder:
        if self._decoder is None:
            s = self.settings
            self._decoder = PiDDecoder.load(s.checkpoint, s.space, s.training, s.precision, s.device)
        return self._decoder

    @property
    def loaded(self) -> bool:
        return self._decoder is not None

    def _checkpoint_info(self) -> CheckpointInfo:
        if self._decoder is not None:
            return self._decoder.info
        if self._info is None:
            s = self.settings
            self._info = load_checkpoint(s.checkpoint, s.space, s.training).info
        return self._info

    def _fixed_caption(self, text: str) -> torch.Tensor:
        """The empty caption or the negative prompt: from PiD's caption cache (Gemma is loaded only to fill it)."""
        if text not in self._captions:
            self._remember(text, cached_caption_embedding(self.settings.gemma, text))
        return self._captions[text]

    def _encoded(self, text: str) -> torch.Tensor:
        if text in self._captions:
            self._captions.move_to_end(text)
            return self._captions[text]
        encoder = self._encoder or CaptionEncoder.load(self.settings.gemma, device=self.settings.device)
        if self.keep_gemma:
            self._encoder = encoder
        embedding = encoder.encode(text)
        if self.keep_gemma:
            self._remember(text, embedding)
        return embedding

    def _remember(self, text: str, embedding: torch.Tensor) -> None:
        self._captions[text] = embedding
        while len(self._captions) > _CAPTIONS_KEPT:
            self._captions.popitem(last=False)

    def caption(self, picture: Picture) -> torch.Tensor | None:
        """The caption embedding: a saved one, the text encoded with Gemma, the empty caption when there is Gemma but
        no text, or None (the decode then uses an all-zero caption, with a warning)."""
        if picture.caption_embedding:
            return read_caption_file(picture.caption_embedding)
        if picture.caption is not None and not self.settings.gemma:
            raise ValueError(
                "--caption needs --gemma FILE (Gemma-2-2B-it, e.g. gemma_2_2b_it_elm_bf16.safetensors) to encode it."
            )
        if not self.settings.gemma:
            return None
        return self._encoded(picture.caption) if picture.caption else self._fixed_caption("")

    def negative_caption(self, picture: Picture) -> torch.Tensor | None:
        """The negative prompt's embedding, the unconditional branch of an undistilled checkpoint's guidance (encoded
        only for such a checkpoint)."""
        if picture.negative_caption_embedding:
            return read_caption_file(picture.negative_caption_embedding)
        if not self.settings.gemma or self._checkpoint_info().distilled:
            return None
        return self._fixed_caption(NEGATIVE_PROMPT)

    def decode(self, picture: Picture, callback: StepCallback | None = None) -> torch.Tensor:
        """The image [B, 3, H, W] in [-1, 1] of ``picture`` (captions first, then PiD: see the class)."""
        caption, negative_caption = self.caption(picture), self.negative_caption(picture)
        decoder = self.decoder
        latent = read_latent_file(picture.latent)
        s = self.settings
        return decoder.decode(
            latent, space=picture.space, sigma=picture.sigma, caption=caption, size=parse_size(picture.size),
            steps=picture.steps, seed=picture.seed, schedule=s.schedule, callback=callback, tiling=s.tiling,
            tile_size=s.tile_size, attention=s.attention, cfg=picture.cfg, shift=picture.shift,
            negative_caption=negative_caption,
        )
