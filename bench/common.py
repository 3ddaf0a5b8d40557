"""Shared pieces of the benchmarks: full-size networks, one measured decode per fresh process, image metrics.

Every measurement runs in a fresh Python process (``python bench/common.py JSON``), so that its peak resident
memory (``resource.getrusage``) belongs to that configuration alone; the baseline (the interpreter with torch
imported and the inputs made) is subtracted.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pid_core.checkpoint import CheckpointInfo  # noqa: E402
from pid_core.config import LatentSpace, NetworkConfig, released  # noqa: E402
from pid_core.memory import estimate, weight_bytes  # noqa: E402
from pid_core.network import PiDNetwork  # noqa: E402

VARIANT = "flux_2k"  # the full-size network the benchmarks use (v1, 16-channel Flux latents)
MODES = ("ours", "reference", "teacher")


def peak_rss() -> int:
    """The process's peak resident memory so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reference_estimate(size: int) -> int:
    """Our estimate of a reference-style decode of a ``size`` x ``size`` output, in bytes: fp32 weights, bf16 autocast,
    unchunked and untiled, plus the bf16 copy of every weight that autocast caches beside them (see :func:`measure`)."""
    config = released(VARIANT).network
    run = estimate(config, size, size, weight_dtype=torch.float32, compute_dtype=torch.bfloat16, pixel_chunk=None)
    return run.total + weight_bytes(config, torch.bfloat16)


# The official network's layers: plain torch.nn, whose weights bf16 autocast casts itself (and caches, see below).
TORCH_LAYERS = SimpleNamespace(Linear=nn.Linear, Conv2d=nn.Conv2d, GroupNorm=nn.GroupNorm, LayerNorm=nn.LayerNorm)


def random_network(config: NetworkConfig, dtype: torch.dtype, seed: int = 0, operations=None) -> PiDNetwork:
    """A full-size network with random weights of realistic scale, allocated once in ``dtype`` (no transient copy)."""
    with torch.device("meta"):
        network = PiDNetwork(config, dtype=dtype, **({"operations": operations} if operations else {}))
    network = network.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
            elif name.endswith("log_alpha"):
                p.fill_(math.log(5.0))
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    return network.eval().requires_grad_(False)


def real_network(path: str, dtype: torch.dtype, operations=None) -> tuple[PiDNetwork, str]:
    from pid_core.api import build_network
    from pid_core.checkpoint import load_checkpoint

    loaded = load_checkpoint(path)
    space = loaded.info.space.value if loaded.info.space is not None else "flux"
    return build_network(loaded, dtype, operations=operations), space


def measure(
    size: int,
    mode: str = "ours",
    *,
    steps: int = 4,
    tiling: str = "auto",
    tile_size: int | None = None,
    memory_budget: int | None = None,
    weights: str | None = None,
    seed: int = 0,
    save: str | None = None,
    variant: str = VARIANT,
) -> dict:
    """One decode of a ``size`` x ``size`` output; returns timings, peak memory and the plan.

    ``mode`` "ours": bf16 weights, bf16 autocast, chunked pixel blocks, tiled when ``tiling`` says so.
    "reference": the official code's profile emulated with our network: fp32 weights in plain torch.nn layers
    that require grad (the official inference only calls ``model.eval()``), bf16 autocast, untiled, unchunked.
    Under ``torch.no_grad``, as the official sampler runs, autocast caches the bf16 copy of every weight that
    requires grad for as long as its region lasts, so a bf16 copy of all weights sits beside the fp32 ones by the
    end of a network call, as in the official run. (Checked against the official code itself run on the CPU by
    the reference runner: see the README's performance section.)
    "teacher": as "ours", on ``variant``'s network decoded as an undistilled teacher (guidance 5 against a random
    negative caption, ``steps`` DPM-Solver steps).
    """
    from pid_core.api import decode, plan_decode

    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; use one of {MODES}.")
    torch.manual_seed(seed)
    config = released(variant).network
    cells = size // (config.latent_down * config.sr_scale)
    latent = torch.randn(1, config.latent_channels, cells, cells, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    caption = 0.1 * torch.randn(1, config.txt_max_length, config.txt_embed_dim, generator=gen)
    teacher = mode == "teacher"
    guidance = dict(info=undistilled_info(config), negative_caption=0.1 * torch.randn_like(caption)) if teacher else {}
    baseline = peak_rss()

    start = time.perf_counter()
    dtype = torch.float32 if mode == "reference" else torch.bfloat16
    space = "flux"
    operations = TORCH_LAYERS if mode == "reference" else None
    if weights:
        network, space = real_network(weights, dtype, operations)
    else:
        network = random_network(config, dtype, seed, operations)
    if mode == "reference":
        network.requires_grad_(True)
        # the official sampler runs under torch.no_grad, where autocast keeps its cast cache (inference mode,
        # which pid_core uses, turns the cache off); this process only runs this one decode
        torch.inference_mode = torch.no_grad
    after_build = peak_rss()
    build_seconds = time.perf_counter() - start
    if mode == "reference":
        network.pixel_chunk = None
        tiling, tile_size, memory_budget = "off", None, None
    plan = plan_decode(network, size, size, batch=2 if teacher else 1, tiling=tiling, tile_size=tile_size,
                       memory_budget=memory_budget, compute_dtype=torch.bfloat16)

    start, cpu_start = time.perf_counter(), time.process_time()
    image = decode(network, latent, space=space, sigma=0.0, caption=caption, size="native", steps=steps, seed=seed,
                   tiling=tiling, tile_size=tile_size, memory_budget=memory_budget, compute_dtype=torch.bfloat16,
                   **guidance)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if save:
        torch.save(image, save)
    return {
        "size": size,
        "mode": mode,
        "steps": steps,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,  # all threads; less sensitive than wall time to other work on the machine
        "build_seconds": build_seconds,
        "peak_bytes": peak_rss() - baseline,
        "build_peak_bytes": after_build - baseline,
        "estimate_bytes": reference_estimate(size) if mode == "reference" else plan.memory.total,
        # our planner's description would leave out autocast's weight copies of a reference-style run
        "plan": (f"{size}x{size} px whole, unchunked, fp32 weights + bf16 copies" if mode == "reference"
                 else plan.describe()),
        "tiles": plan.tiles.count if plan.tiles else 1,
        "tiling": plan.tiles.describe() if plan.tiles else "whole",
        "tile_pixels": list(plan.tiles.tile_pixels) if plan.tiles else None,
        "tile_rows": [r * 16 for r in plan.tiles.rows] if plan.tiles else None,
        "tile_cols": [c * 16 for c in plan.tiles.cols] if plan.tiles else None,
        "threads": torch.get_num_threads(),
    }


def undistilled_info(config: NetworkConfig) -> CheckpointInfo:
    """What loading an undistilled Flux checkpoint of ``config`` would report (the benchmarks build random ones)."""
    return CheckpointInfo(path="random weights", file_format="safetensors", config=config, space=LatentSpace.FLUX,
                          candidates=(LatentSpace.FLUX,), training="2kto4k", distilled=False, released=None,
                          parameters=0, storage_dtype="bfloat16")  # fmt: skip


def measure_in_subprocess(timeout: float | None = None, **kwargs) -> dict:
    """:func:`measure` in a fresh Python process (its peak memory is this configuration's alone)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, __file__, json.dumps(kwargs)], capture_output=True, text=True, timeout=timeout, env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"The measurement {kwargs} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1] (compared in [0, 1])."""
    mse = (((a.float() - b.float()) * 0.5) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def seam_score(image: torch.Tensor, rows: list[int], cols: list[int], tile: tuple[int, int]) -> float:
    """Gradient energy across tile borders over that elsewhere (1.0: borders look like anywhere else).

    Borders are the pixel boundaries where a tile starts or ends (inside the image); the gradient across a
    vertical border at column c is ``image[..., c] - image[..., c - 1]``, and likewise for rows.
    """
    img = image.float()
    dx = (img[..., 1:] - img[..., :-1]) ** 2  # boundary c sits at index c - 1
    dy = (img[..., 1:, :] - img[..., :-1, :]) ** 2
    width, height = img.shape[-1], img.shape[-2]
    xs = sorted({b for c in cols for b in (c, c + tile[1]) if 0 < b < width})
    ys = sorted({b for r in rows for b in (r, r + tile[0]) if 0 < b < height})
    on_x = torch.zeros(width - 1, dtype=torch.bool)
    on_x[[b - 1 for b in xs]] = True
    on_y = torch.zeros(height - 1, dtype=torch.bool)
    on_y[[b - 1 for b in ys]] = True
    border = torch.cat([dx[..., on_x].flatten(), dy[..., on_y, :].flatten()])
    rest = torch.cat([dx[..., ~on_x].flatten(), dy[..., ~on_y, :].flatten()])
    return (border.mean() / rest.mean()).item()


if __name__ == "__main__":
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
