"""Output sizes: what PiD decodes a latent to, and whether that size is one the checkpoint knows.

The network works on 16-pixel patches, so output sides must be multiples of 16. Its LQ branch
resamples the latent to the patch grid with nearest interpolation, so any such size *runs*; but
sizes far from the checkpoint's training buckets are the known cause of green artifacts, hence
:func:`training_range_warning`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .config import NetworkConfig

PATCH_SIZE = 16  # every released network; output sides must be multiples of it

# A target long side rounds each side to a multiple of 64: a multiple of the 16-px patch that is also
# a whole number of latent cells for the 8x VAEs (32 px per cell at 4x) and for Flux.2 / DINOv2
# (64 px), and the grid the 2kto4k training buckets were snapped to (facts sheet §7).
SIZE_MULTIPLE = 64

SizeLike = str | int | Sequence[int]

# Four times the largest side any checkpoint was trained at: beyond it no decode is sensible, and the picture alone
# (float32 RGB) would take gigabytes, so such a size is refused before anything is planned or allocated.
MAX_OUTPUT_SIDE = 16384


# What size "auto" draws, by training range: the long side of a 2k checkpoint, the cap of a 2kto4k one.
AUTO_LONG_SIDE = {"2k": 2048, "2kto4k": 4096}


def output_size(
    latent_hw: Sequence[int], config: NetworkConfig, size: SizeLike = "native", training: str | None = None
) -> tuple[int, int]:
    """Output (H, W) in pixels for a network latent of ``latent_hw`` = (h, w) cells.

    ``latent_hw`` is the size of the latent the network consumes (a Flux.2 latent after packing, at /16).
    ``size`` is one of:

    * ``"auto"``: what the checkpoint's ``training`` range draws best: a 2048 long side for "2k" checkpoints;
      for "2kto4k" ones native, but at most a 4096 long side; native when the range is unknown;
    * ``"native"``: ``(h * config.upscale, w * config.upscale)``, the reference's default;
    * an int (or digit string) long side, e.g. 2048 or 4096: the latent's aspect is kept, each side
      rounded to the nearest multiple of 64 (so the aspect changes by at most that rounding);
    * an explicit ``(H, W)``, each a multiple of 16.
    """
    h, w = _positive_pair(latent_hw, "latent size")
    if isinstance(size, str) and size.strip().lower() == "auto":
        size = _auto_size(max(h, w) * config.upscale, training)
    if isinstance(size, str) and size.strip().lower() == "native":
        return _checked(h * config.upscale, w * config.upscale)
    if isinstance(size, (str, int)) and not isinstance(size, bool):
        long_side = _long_side(size)
        longest = max(h, w)
        return _checked(_round_to_multiple(h * long_side, longest), _round_to_multiple(w * long_side, longest))
    return _checked(*_positive_pair(size, "output size"))


def _auto_size(native_long_side: int, training: str | None) -> str | int:
    if training == "2k":
        return AUTO_LONG_SIDE["2k"]
    if training == "2kto4k" and native_long_side > AUTO_LONG_SIDE["2kto4k"]:
        return AUTO_LONG_SIDE["2kto4k"]
    return "native"


def _round_to_multiple(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded (half up) to a multiple of SIZE_MULTIPLE, at least one multiple."""
    step = SIZE_MULTIPLE * denominator
    return max(1, (2 * numerator + step) // (2 * step)) * SIZE_MULTIPLE


def _long_side(size: str | int) -> int:
    try:
        value = int(size)
    except ValueError:
        raise ValueError(
            f"Unknown output size {size!r}; use 'auto', 'native', a long side in pixels such as 2048, or "
            "(height, width)."
        ) from None
    if value < SIZE_MULTIPLE:
        raise ValueError(f"The output long side must be at least {SIZE_MULTIPLE} pixels, got {value}.")
    return value


def _positive_pair(pair: Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
        raise ValueError(f"The {what} must be a pair (height, width), got {pair!r}.")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"The {what} must be two positive integers, got {tuple(pair)!r}.")
    return int(pair[0]), int(pair[1])


def _checked(height: int, width: int) -> tuple[int, int]:
    if max(height, width) > MAX_OUTPUT_SIDE:
        raise ValueError(
            f"A {width}x{height} px output is beyond what PiD can sensibly draw (at most {MAX_OUTPUT_SIDE} px a side; "
            "checkpoints are trained up to 4096): choose the auto, 2048 or 4096 output size, or a smaller latent."
        )
    if height % PATCH_SIZE or width % PATCH_SIZE:
        raise ValueError(
            f"PiD output sides must be multiples of {PATCH_SIZE} (its patch size), got {height}x{width}; "
            f"round them, e.g. to {_nearest_patch_multiple(height)}x{_nearest_patch_multiple(width)}."
        )
    return height, width


def _nearest_patch_multiple(value: int) -> int:
    return max(PATCH_SIZE, (value + PATCH_SIZE // 2) // PATCH_SIZE * PATCH_SIZE)


# ---------------------------------------------------------------------------------------------
# Training range


@dataclass(frozen=True)
class TrainingRange:
    """Output sizes a checkpoint class was trained at: pixel area, longest side, widest aspect ratio."""

    min_area: int
    max_area: int
    max_long_side: int
    max_aspect: float  # long side / short side
    description: str
    advice: str


# Trained buckets (facts sheet §7, from the reference's IMAGE_RES_SIZE_INFO and README):
# 2k: 2048-level buckets 2048x2048, 2304x1728, 2688x1536, 2688x1792 (and transposes); widest 2688:1536.
# 2kto4k (v1.5): levels 2048..3840 step 256, aspect ratios 1:1, 4:3, 16:9 (and transposes) snapped
# to 64, sides up to 4096; widest 4096x2176. The upper area bound is 4096^2 rather than the largest
# square bucket (3584^2) because the official README advertises this checkpoint for 1024-px
# generations decoded to 4K. The legacy v1 2kto4k files are assumed to share this range.
TRAINING_RANGES = {
    "2k": TrainingRange(
        min_area=2304 * 1728, max_area=2688 * 1792, max_long_side=2688, max_aspect=2688 / 1536,
        description="about 2048x2048 pixels, at most 2688 per side, aspect ratios up to 7:4",
        advice="choose the 2048 output size, or use a 2kto4k checkpoint for larger outputs",
    ),
    "2kto4k": TrainingRange(
        min_area=2048 * 2048, max_area=4096 * 4096, max_long_side=4096, max_aspect=4096 / 2176,
        description="2048x2048 to 4096x4096 pixels, at most 4096 per side, aspect ratios up to 16:9",
        advice="choose an output between 2048 and 4096 pixels on the long side with a moderate aspect ratio",
    ),
}

# Buckets are snapped to 64 px and our sizes are rounded too: a few percent of area either side is
# still in distribution, so only warn beyond this margin.
AREA_TOLERANCE = 0.10


def training_range_warning(hw: Sequence[int], training: str | None) -> str | None:
    """A warning message if an output (H, W) leaves the checkpoint's training range, else None.

    ``training`` is the released checkpoint's class ("2k" or "2kto4k"); None (unknown) never warns.
    """
    if training is None:
        return None
    if training not in TRAINING_RANGES:
        raise ValueError(f"Unknown training range {training!r}; use one of: {', '.join(TRAINING_RANGES)}.")
    height, width = _positive_pair(hw, "output size")
    bounds = TRAINING_RANGES[training]
    area = height * width
    in_range = (
        bounds.min_area * (1 - AREA_TOLERANCE) <= area <= bounds.max_area * (1 + AREA_TOLERANCE)
        and max(height, width) <= bounds.max_long_side
        and max(height, width) / min(height, width) <= bounds.max_aspect
    )
    if in_range:
        return None
    return (
        f"A {height}x{width} output is outside what this {training} PiD checkpoint was trained on "
        f"({bounds.description}); outside that range PiD is known to produce green artifacts. "
        f"To avoid them, {bounds.advice}."
    )
