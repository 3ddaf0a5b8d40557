"""Command line: ``python -m pid_core info CHECKPOINT``, ``python -m pid_core decode CHECKPOINT LATENT ...``,
``python -m pid_core batch MANIFEST OUT_DIR --checkpoint CHECKPOINT ...`` and ``python -m pid_core download ...``."""

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


def _settings(args: argparse.Namespace) -> DecoderSettings:
    """The checkpoint and how it runs, as the decode and batch commands share them."""
    return DecoderSettings(
        checkpoint=args.checkpoint, space=args.space, training=args.training, precision=args.precision,
        gemma=args.gemma, schedule=args.schedule, tiling=args.tiling, tile_size=args.tile_size,
        attention=args.attention,
    )


def _decode(args: argparse.Namespace) -> None:
    if args.caption_embedding and (args.caption is not None or args.gemma):
        raise ValueError("Pass either --caption-embedding or --caption/--gemma, not both.")
    picture = Picture(
        latent=args.latent, sigma=args.sigma, seed=args.seed, size=args.size, steps=args.steps, caption=args.caption,
        caption_embedding=args.caption_embedding, negative_caption_embedding=args.negative_caption_embedding,
        cfg=args.cfg, shift=args.shift,
    )
    started = time.monotonic()

    def progress(step: int, total: int, _x0: torch.Tensor) -> None:
        print(f"step {step + 1}/{total}  {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)

    image = PictureDecoder(_settings(args), keep_gemma=False).decode(picture, callback=progress)
    for path in write_image(image, args.out):
        print(path)


def _batch(args: argparse.Namespace) -> int:
    from .batch.driver import BatchOptions, run  # Ray itself is imported only when there is something to decode
    from .batch.manifest import Defaults

    if args.retries < 0 or (args.workers is not None and args.workers < 1):
        raise ValueError("--workers must be at least 1 and --retries at least 0.")
    return run(BatchOptions(
        manifest=args.manifest, out_dir=args.out_dir, settings=_settings(args),
        defaults=Defaults(size=args.size, steps=args.steps, format=args.format, gemma=bool(args.gemma)),
        results=args.results, ray_address=args.ray_address, workers=args.workers,
        cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker, retries=args.retries,
        progress=not args.no_progress,
    ))


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

    def checkpoint_args(p: argparse.ArgumentParser, option: bool = False) -> None:
        what = "PiD checkpoint: official .pth, .safetensors or Comfy-Org repack"
        if option:
            p.add_argument("--checkpoint", required=True, help=what)
        else:
            p.add_argument("checkpoint", help=what)
        p.add_argument("--space", choices=LatentSpace.names(), help="latent space, when the weights cannot tell")
        p.add_argument("--training", choices=("2k", "2kto4k"), help="training resolution, when the path cannot tell")

    def size_and_steps_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--size", default="native", choices=("native", "auto", "2048", "4096"),
                       help="native 4x (default), auto (what the checkpoint draws best: 2k checkpoints a 2048 long "
                       "side, 2kto4k native up to 4096), or a long side")
        p.add_argument(
            "--steps", type=int,
            help=f"sampler steps: default {STUDENT_STEPS} for distilled checkpoints (1..{MAX_STEPS}), "
            f"{TEACHER_STEPS} for undistilled ones (1..{MAX_TEACHER_STEPS})",
        )

    def runtime_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--precision", choices=tuple(PRECISIONS), default="bf16",
                       help="weights in bf16, or fp32 (the reference's fp32 run to rounding)")
        p.add_argument(
            "--schedule", choices=SCHEDULES, default="spread",
            help="timesteps for 5-8 steps: 'spread' (default) interpolates distinct ones, 'reference' repeats some as "
            "the official code does; identical for 1-4 steps",
        )
        p.add_argument("--tiling", choices=TILING_MODES, default="auto",
                       help="auto: tiles only when the whole picture would not fit in free memory; on; off")
        p.add_argument("--tile-size", type=int,
                       help="tile side in pixels (multiple of 16); default: the largest that fits")
        p.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto", help="attention kernel")

    info = commands.add_parser("info", help="what a checkpoint is")
    checkpoint_args(info)
    info.add_argument("--json", action="store_true", help="machine-readable output (keys documented in the README)")
    info.set_defaults(run=_info)

    dec = commands.add_parser("decode", help="decode a latent to a picture")
    checkpoint_args(dec)
    dec.add_argument("latent", help="ComfyUI .latent file, or a .safetensors file holding one latent tensor")
    dec.add_argument("--sigma", type=float, default=0.0, help="PiD degrade sigma of the latent in [0, 1] (0 = clean)")
    dec.add_argument("--out", required=True, help="OUT.png (8-bit picture) or OUT.safetensors (float image in [-1, 1])")
    size_and_steps_args(dec)
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
    runtime_args(dec)
    dec.set_defaults(run=_decode)

    bat = commands.add_parser(
        "batch", help="decode every latent of a JSON Lines manifest on Ray (this machine, or a cluster); resumable",
        description="Decode a manifest of latents (JSON Lines, one picture a line; see the README) into OUT_DIR, one "
        "decoder per worker. Rerunning the same command decodes only what is missing. Needs Ray (pip install ray).",
    )
    bat.add_argument("manifest",
                     help='JSON Lines file, one object a line, e.g. {"latent": "a.latent", "sigma": 0.25}')
    bat.add_argument("out_dir", help="output folder (pictures, and results.jsonl unless --results)")
    checkpoint_args(bat, option=True)
    bat.add_argument("--gemma", help="Gemma-2-2B-it weights, to encode the lines' caption texts (lines without a "
                     "caption get the empty caption); loaded once per worker")
    size_and_steps_args(bat)
    runtime_args(bat)
    bat.add_argument("--format", choices=("png", "safetensors"), default="png",
                     help="output of lines without 'out': LATENT_NAME.png (default) or .safetensors")
    bat.add_argument("--results", help="results JSON Lines file (default OUT_DIR/results.jsonl)")
    bat.add_argument("--ray-address", help="join this Ray cluster (e.g. auto, or ray://head:10001); default: start Ray "
                     "on this machine for this run")
    bat.add_argument("--workers", type=int, help="decoders: default one per GPU, else one per CPU core (no more than "
                     "fit in free memory)")
    bat.add_argument("--cpus-per-worker", type=float, help="CPU cores of each worker (default: the cores shared out)")
    bat.add_argument("--gpus-per-worker", type=float, help="GPUs of each worker (default 1 when the cluster has GPUs; "
                     "0.5 puts two on a GPU)")
    bat.add_argument("--retries", type=int, default=2,
                     help="times a picture is sent again after its worker died (default 2)")
    bat.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    bat.set_defaults(run=_batch)

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
        code = args.run(args)
    except (ValueError, OSError, MemoryError, torch.OutOfMemoryError) as err:  # each is one sentence
        print(f"error: {err}", file=sys.stderr)
        return 2
    return code or 0  # batch: 1 when some pictures failed


if __name__ == "__main__":
    sys.exit(main())
