"""Command line: ``python -m pid_core info CHECKPOINT``, ``python -m pid_core decode CHECKPOINT LATENT ...`` and
``python -m pid_core download ...``."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import torch

from .api import PRECISIONS
from .batch.picture import DecoderSettings, Picture, PictureDecoder
from .checkpoint import load_checkpoint
from .config import LatentSpace
from .download import GEMMA_FILES, TRAININGS, download_gemma, download_pid
from .runtime import ATTENTION_BACKENDS
from .sampler import MAX_STEPS, SCHEDULES, STUDENT_STEPS
from .teacher import MAX_TEACHER_STEPS, TEACHER_CFG, TEACHER_STEPS
from .tensor_files import write_image
from .tiling import TILING_MODES


def _info(args: argparse.Namespace) -> None:
    info = load_checkpoint(args.checkpoint, args.space, args.training).info
    if args.json:
        print(json.dumps(info.to_json(), indent=2))
        return
    facts = info.to_json()
    space = facts["latent_space"] or f"undecided ({'/'.join(facts['latent_space_candidates'])}; pass --space)"
    rows = [
        ("file", info.path),
        ("format", info.file_format),
        ("version", info.version),
        ("latent space", space),
        ("latent channels", info.config.latent_channels),
        ("upscale", f"{info.config.sr_scale}x"),
        ("training", info.training),
        ("distilled", "yes (4-step student)" if info.distilled else "no (undistilled teacher: DPM-Solver with CFG)"),
        ("released as", info.released or "-"),
        ("parameters", f"{info.parameters:,}"),
        ("stored as", info.storage_dtype),
        ("detected", ", ".join(info.detected)),
        ("assumed", ", ".join(info.assumed) or "-"),
    ]
    for key, value in rows:
        print(f"{key:>16}: {value}")


def _decode(args: argparse.Namespace) -> None:
    if args.caption_embedding and (args.caption is not None or args.gemma):
        raise ValueError("Pass either --caption-embedding or --caption/--gemma, not both.")
    settings = DecoderSettings(
        checkpoint=args.checkpoint, space=args.space, training=args.training, precision=args.precision,
        gemma=args.gemma, schedule=args.schedule, tiling=args.tiling, tile_size=args.tile_size, attention=args.attention,
    )
    picture = Picture(
        latent=args.latent, sigma=args.sigma, seed=args.seed, size=args.size, steps=args.steps, caption=args.caption,
        caption_embedding=args.caption_embedding, negative_caption_embedding=args.negative_caption_embedding,
        cfg=args.cfg, shift=args.shift,
    )
    started = time.monotonic()

    def progress(step: int, total: int, _x0: torch.Tensor) -> None:
        print(f"step {step + 1}/{total}  {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)

    image = PictureDecoder(settings, keep_gemma=False).decode(picture, callback=progress)
    for path in write_image(image, args.out):
        print(path)


def _download(args: argparse.Namespace) -> None:
    if args.space is None and not args.gemma:
        raise ValueError("Nothing to download: pass --space (and --training) for a PiD checkpoint, and/or --gemma.")
    if args.space is not None:
        print(download_pid(args.space, args.training, args.models_dir, distilled=not args.undistilled))
    if args.gemma:
        print(download_gemma(args.models_dir, args.gemma_variant))


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m pid_core", description="PiD pixel diffusion decoder.")
    commands = root.add_subparsers(dest="command", required=True)

    def checkpoint_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("checkpoint", help="PiD checkpoint: official .pth, .safetensors or Comfy-Org repack")
        p.add_argument("--space", choices=LatentSpace.names(), help="latent space, when the weights cannot tell")
        p.add_argument("--training", choices=("2k", "2kto4k"), help="training resolution, when the path cannot tell")

    info = commands.add_parser("info", help="what a checkpoint is")
    checkpoint_args(info)
    info.add_argument("--json", action="store_true", help="machine-readable output (keys documented in the README)")
    info.set_defaults(run=_info)

    dec = commands.add_parser("decode", help="decode a latent to a picture")
    checkpoint_args(dec)
    dec.add_argument("latent", help="ComfyUI .latent file, or a .safetensors file holding one latent tensor")
    dec.add_argument("--sigma", type=float, default=0.0, help="PiD degrade sigma of the latent in [0, 1] (0 = clean)")
    dec.add_argument("--out", required=True, help="OUT.png (8-bit picture) or OUT.safetensors (float image in [-1, 1])")
    dec.add_argument("--size", default="native", choices=("native", "auto", "2048", "4096"),
                     help="native 4x (default), auto (what the checkpoint draws best: 2k checkpoints a 2048 long side, "
                     "2kto4k native up to 4096), or a long side")
    dec.add_argument(
        "--steps", type=int,
        help=f"sampler steps: default {STUDENT_STEPS} for distilled checkpoints (1..{MAX_STEPS}), {TEACHER_STEPS} for "
        f"undistilled ones (1..{MAX_TEACHER_STEPS})",
    )
    dec.add_argument("--seed", type=int, default=0)
    dec.add_argument("--caption-embedding", help="safetensors file with a [B, 300, 2304] caption embedding")
    dec.add_argument("--caption", help="caption text to encode with --gemma (default: the empty caption)")
    dec.add_argument(
        "--gemma", help="Gemma-2-2B-it weights (Comfy-Org's gemma_2_2b_it_elm_bf16.safetensors, its fp8_scaled "
        "variant, or Hugging Face safetensors with tokenizer.model beside them); without --caption, the empty "
        "caption's embedding is used (cached, see PID_CACHE_DIR)",
    )
    dec.add_argument("--negative-caption-embedding",
                     help="safetensors file with the negative prompt's embedding (guidance of undistilled checkpoints "
                     "without --gemma; with --gemma it is encoded)")
    dec.add_argument("--cfg", type=float, help=f"guidance of undistilled checkpoints (default {TEACHER_CFG:g}; 1: none)")
    dec.add_argument("--shift", type=float, help="timestep shift of undistilled checkpoints (default: from the size)")
    dec.add_argument("--precision", choices=tuple(PRECISIONS), default="bf16",
                     help="weights in bf16, or fp32 (the reference's fp32 run to rounding)")
    dec.add_argument(
        "--schedule", choices=SCHEDULES, default="spread",
        help="timesteps for 5-8 steps: 'spread' (default) interpolates distinct ones, 'reference' repeats some as the "
        "official code does; identical for 1-4 steps",
    )
    dec.add_argument("--tiling", choices=TILING_MODES, default="auto",
                     help="auto: tiles only when the whole picture would not fit in free memory; on; off")
    dec.add_argument("--tile-size", type=int, help="tile side in pixels (multiple of 16); default: the largest that fits")
    dec.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto", help="attention kernel")
    dec.set_defaults(run=_decode)

    dl = commands.add_parser("download", help="download official weights from the Hugging Face hub (HF_TOKEN honoured)")
    dl.add_argument(
        "--models-dir", required=True, help="models folder: PiD goes to pid/<experiment>/, Gemma to text_encoders/"
    )
    dl.add_argument("--space", choices=LatentSpace.names(), help="download the PiD checkpoint for this latent space")
    dl.add_argument("--training", choices=TRAININGS, help="its training resolution, when the space has two")
    dl.add_argument("--undistilled", action="store_true",
                    help="the undistilled teacher (flux, flux2, qwenimage) instead of the 4-step student")
    dl.add_argument("--gemma", action="store_true", help="download Gemma-2-2B-it (Comfy-Org repack) for captions")
    dl.add_argument("--gemma-variant", choices=tuple(GEMMA_FILES), default="bf16", help="bf16 (5.2 GB) or fp8_scaled")
    dl.set_defaults(run=_download)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    warnings.simplefilter("always")
    warnings.showwarning = lambda message, *_a, **_k: print(f"warning: {message}", file=sys.stderr)
    try:
        args.run(args)
    except (ValueError, OSError, MemoryError, torch.OutOfMemoryError) as err:  # each is one sentence
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
