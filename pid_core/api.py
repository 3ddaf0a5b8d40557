"""The public API: load a PiD decoder, decode a latent.

    decoder = PiDDecoder.load("model_ema_bf16.pth", space="flux")
    image = decoder.decode(latent, sigma=0.25, size=2048, seed=0)   # [B, 3, H, W] in [-1, 1]

``latent`` follows ComfyUI's convention (see ``pid_core.latents``) and ``sigma`` is PiD's degrade sigma.
The free function :func:`decode` does the same for a network the caller placed itself (the ComfyUI
nodes hand in the network their model management loaded).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CheckpointError, CheckpointInfo, LoadedCheckpoint, check_keys, load_checkpoint, network_tensors
from .config import LatentSpace
from .latents import SigmaLike, sigma_tensor, to_network_latent
from .memory import GB, SAFETY, MemoryEstimate, available_memory, estimate, items_that_fit
from .network import PiDNetwork
from .runtime import Fallback, autocast, default_compute_dtype
from .sampler import STUDENT_STEPS, sample
from .sizes import SizeLike, output_size, training_range_warning
from .teacher import TEACHER_CFG, TEACHER_STEPS, dynamic_shift, sample_teacher
from .tiling import TilePlan, choose_plan, tiled_forward

log = logging.getLogger(__name__)

PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}
StepCallback = Callable[[int, int, torch.Tensor], None]
CallProgress = Callable[[int, int, int], None]  # (step index, network calls done in this step, calls per step)


def build_network(
    loaded: LoadedCheckpoint,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    operations=None,
) -> PiDNetwork:
    """The network of a loaded checkpoint with its weights, stored in ``dtype`` on ``device``.

    The module is built on the meta device and takes the checkpoint's tensors as they are, so no second
    copy of the 2.7 GB of weights is ever allocated. ``operations`` replaces the layer classes
    (ComfyUI passes ``comfy.ops``).
    """
    kwargs = {"operations": operations} if operations is not None else {}
    with torch.device("meta"):
        network = PiDNetwork(loaded.info.config, dtype=dtype, **kwargs)
    expected = {k: v.shape for k, v in network.state_dict().items()}
    tensors = network_tensors(loaded.state_dict)
    check_keys(tensors, expected, Path(loaded.info.path).name)
    weights = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
    network.load_state_dict(weights, strict=True, assign=True)
    return network.eval().requires_grad_(False)


def _caption_tensor(caption: torch.Tensor | None, batch: int, network: PiDNetwork) -> torch.Tensor:
    config = network.config
    if caption is None:
        warnings.warn(
            "No caption: decoding with an all-zero caption, which lowers quality. Give PiD a caption (in ComfyUI "
            "PiD Caption, or Gemma-2-2B-it in models/text_encoders for the empty caption; on the command line --gemma "
            "or --caption-embedding).",
            stacklevel=3,
        )
        return torch.zeros(batch, config.txt_max_length, config.txt_embed_dim)
    if caption.ndim == 2:
        caption = caption[None]
    if caption.ndim != 3 or caption.shape[-1] != config.txt_embed_dim:
        raise ValueError(
            f"The caption embedding has shape {tuple(caption.shape)}, but this checkpoint expects "
            f"[B, {config.txt_max_length}, {config.txt_embed_dim}] (Gemma-2-2B hidden states); encode the "
            "caption with PiD Caption."
        )
    if caption.shape[0] not in (1, batch):
        raise ValueError(f"Got {caption.shape[0]} caption embeddings for {batch} latents; pass one or one per latent.")
    if not torch.isfinite(caption).all():
        raise ValueError("The caption embedding contains NaN/inf values; encode the caption again.")
    return caption.float().expand(batch, -1, -1)


def _resolve_space(space: LatentSpace | str | None, info: CheckpointInfo | None) -> LatentSpace:
    if space is not None:
        space = LatentSpace.parse(space)
        own = (info.space,) if info is not None and info.space is not None else info.candidates if info else None
        if own is not None and space not in own:
            path = Path(info.path)
            raise ValueError(
                f"The latent is in the {space.value} latent space, but the PiD checkpoint {path.parent.name}/"
                f"{path.name} is for {'/'.join(s.value for s in own)} models: load the PiD checkpoint made for {space.value} models "
                "(or, if the checkpoint's family was misread from its name, set its latent space when loading it)."
            )
        return space
    if info is not None and info.space is not None:
        return info.space
    choices = "/".join(s.value for s in info.candidates) if info is not None else "one of " + ", ".join(LatentSpace.names())
    raise ValueError(f"Cannot tell which latent space this latent is in; choose the latent space ({choices}).")


@dataclass(frozen=True)
class DecodePlan:
    """How a decode will run: output size, images per network call, whole or tiled, and the memory that needs."""

    height: int
    width: int
    batch: int
    items_per_call: int  # images that go through the network together (tiled: one at a time)
    tiles: TilePlan | None  # None: whole images
    memory: MemoryEstimate
    budget: int | None  # bytes of working memory the plan was made for (None: unknown)

    @property
    def fits(self) -> bool:
        return self.budget is None or self.memory.activations <= self.budget

    @property
    def calls_per_step(self) -> int:
        """Network calls per sampler step: one per group of images, times the tile groups of each."""
        groups = -(-self.batch // self.items_per_call)
        return groups * (1 if self.tiles is None else -(-self.tiles.count // self.tiles.tile_batch))

    def how(self) -> str:
        """Whole or in which tiles, and how many images at a time."""
        how = "whole" if self.tiles is None else f"in {self.tiles.describe()}"
        if self.items_per_call < self.batch:
            how += f", {self.items_per_call} of the {self.batch} images at a time"
        return how

    def describe(self) -> str:
        m = self.memory
        free = "" if self.budget is None else f"; {self.budget / GB:.1f} GB of working memory available"
        return (
            f"{self.width}x{self.height} px {self.how()}: about {m.total / GB:.1f} GB ({m.weights / GB:.1f} GB weights + "
            f"{m.activations / GB:.1f} GB working memory){free}"
        )


def plan_decode(
    network: PiDNetwork,
    height: int,
    width: int,
    *,
    batch: int = 1,
    tiling: str = "auto",
    tile_size: int | None = None,
    memory_budget: int | None = None,
    device: torch.device | str | None = None,
    compute_dtype: torch.dtype | None = None,
) -> DecodePlan:
    """Whole or tiled, and the memory estimate, for decoding ``batch`` images of ``height`` x ``width`` pixels.

    Images go through the network as many at a time as fit the budget. ``tiling``: "auto" tiles only when
    one whole image would not fit, "off" never tiles, "on" always does (one image at a time).
    ``tile_size``: pixels, a multiple of 16, used when tiling (None: the largest that fits, at most 1024 px
    for "on"). ``memory_budget``: bytes of working
    memory the decode may use beyond the loaded weights (None: 80% of what is free on ``device`` now).
    """
    param = next(network.parameters())
    device = torch.device(device) if device is not None else param.device
    dtype = compute_dtype or default_compute_dtype(device, param.dtype)
    budget = memory_budget
    if budget is None and (free := available_memory(device)) is not None:
        budget = int(free * SAFETY)
    config = network.config
    per_call = batch
    if budget is not None and tiling != "on":
        per_call = items_that_fit(config, height, width, batch=batch, budget=budget, compute_dtype=dtype,
                                  weight_dtype=param.dtype, pixel_chunk=network.pixel_chunk)
    if tiling == "on" or (tiling == "auto" and per_call == 0):
        per_call = 1
    tiles = choose_plan(config, height, width, mode=tiling, tile_size=tile_size, budget=budget, batch=batch,
                        items_per_call=per_call, compute_dtype=dtype, weight_dtype=param.dtype)
    per_call = max(per_call, 1)  # "off" with not even one image fitting: one at a time, and a warning
    memory = estimate(
        config, height, width, batch=batch, weight_dtype=param.dtype, compute_dtype=dtype,
        tile=tiles.tile_pixels if tiles else None, tile_batch=tiles.tile_batch if tiles else 1,
        tiles=tiles.count if tiles else 1, items_per_call=per_call, pixel_chunk=network.pixel_chunk,
    )
    return DecodePlan(height, width, batch, per_call, tiles, memory, budget)


def _network_latent(
    network: PiDNetwork,
    latent: torch.Tensor,
    space: LatentSpace | str | None,
    sigma: SigmaLike,
    flux2_bn: tuple[torch.Tensor, torch.Tensor] | None,
    info: CheckpointInfo | None,
) -> torch.Tensor:
    """The network's LQ latent of a ComfyUI-convention ``latent``, checked against the checkpoint."""
    if latent.ndim > 0 and latent.shape[0] == 0:
        raise ValueError("The latent batch is empty (0 pictures): there is nothing to decode; connect a latent that "
                         "holds at least one picture.")
    space = _resolve_space(space, info)
    z = to_network_latent(latent, space, sigma, flux2_bn)
    if z.shape[1] != network.config.latent_channels:
        raise ValueError(
            f"The {space.value} latent has {z.shape[1]} channels, but this PiD checkpoint takes "
            f"{network.config.latent_channels}: load the PiD checkpoint that matches the model that made the latent."
        )
    return z


def output_shape(
    network: PiDNetwork,
    latent: torch.Tensor,
    *,
    space: LatentSpace | str | None = None,
    size: SizeLike = "native",
    info: CheckpointInfo | None = None,
    flux2_bn: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[int, int]:
    """(height, width) in pixels of the pictures :func:`decode` draws from ``latent``; checks the latent as it does."""
    z = _network_latent(network, latent, space, 0.0, flux2_bn, info)
    return output_size(z.shape[-2:], network.config, size, _training(info))


class _NetworkPasses:
    """The network calls of a sampler step under a decode plan (groups of images, whole or in tiles), and the switch
    to a smaller plan when a call runs out of memory."""

    def __init__(self, network: PiDNetwork, z: torch.Tensor, caption: torch.Tensor, sigma: torch.Tensor,
                 run: Fallback, plan: DecodePlan, tiling: str) -> None:
        self.network, self.z, self.caption, self.sigma, self.run = network, z, caption, sigma, run
        self.tiling = tiling
        self.grid = (plan.height // network.config.patch_size, plan.width // network.config.patch_size)
        self.plan = plan
        self._group(plan)

    def _group(self, plan: DecodePlan) -> None:
        """The plan's groups of images and their LQ tokens."""
        self.groups = [slice(i, i + plan.items_per_call) for i in range(0, plan.batch, plan.items_per_call)]
        self.lq_tokens = None  # free the old ones first
        with torch.inference_mode(), autocast(self.run.device, self.run.dtype):
            # once per grouping, as they depend on the latent only; kept per group as the network made them (a copy
            # into one tensor would change their memory layout, and with it the bf16 rounding of the matrix kernels)
            self.lq_tokens = [self.network.project_latent(self.z[g], self.grid) for g in self.groups]

    def velocity(self, x: torch.Tensor, t: torch.Tensor, on_call: Callable[[int, int], None]) -> torch.Tensor:
        """The network's velocity for the whole batch; ``on_call(done, total)`` after each network call."""
        plan, calls_done = self.plan, 0

        def called(*_) -> None:
            nonlocal calls_done
            calls_done += 1
            on_call(calls_done, plan.calls_per_step)

        def forward(g: slice, lq: torch.Tensor) -> torch.Tensor:
            y, sig = self.caption[g], self.sigma[g]
            if plan.tiles is not None:
                return self.run(lambda: tiled_forward(self.network, x[g], t[g], y, sig, lq, plan.tiles, called))
            v = self.run(lambda: self.network(x[g], t[g], y, None, sig, lq_tokens=lq).float())
            called()
            return v

        if len(self.groups) == 1:
            return forward(self.groups[0], self.lq_tokens[0])
        v = torch.empty_like(x)
        for g, lq in zip(self.groups, self.lq_tokens):
            v[g] = forward(g, lq)
        return v

    def shrink(self) -> None:
        """After a call ran out of memory: plan for half the working memory (fewer images per call, then smaller
        tiles; "off" never tiles), or raise a clear error when no smaller plan is left."""
        failed, device = self.plan, self.run.device
        decoding = f"decoding {failed.width}x{failed.height} px {failed.how()}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        smaller = plan_decode(
            self.network, failed.height, failed.width, batch=failed.batch,
            tiling="off" if self.tiling == "off" else "auto", memory_budget=failed.memory.activations // 2,
            device=device, compute_dtype=self.run.dtype,
        )
        if smaller.memory.activations >= failed.memory.activations:
            hint = ", or allow tiling (tiling auto)" if self.tiling == "off" else ""
            # a GPU's out-of-memory error, so that ComfyUI frees its models; elsewhere its GPU advice would mislead
            error = MemoryError if device.type == "cpu" else torch.OutOfMemoryError
            raise error(
                f"PiD ran out of memory {decoding} (about {failed.memory.activations / GB:.1f} GB of working memory), "
                "and there is no smaller way to decode it: free memory (unload other models, close other programs) or "
                f"choose a smaller output size{hint}."
            )
        warnings.warn(
            f"PiD ran out of memory {decoding}; going on {smaller.how()} (about {smaller.memory.activations / GB:.1f} GB "
            "of working memory).",
            stacklevel=4,
        )
        if smaller.items_per_call != failed.items_per_call:
            self._group(smaller)
        self.plan = smaller


def decode(
    network: PiDNetwork,
    latent: torch.Tensor,
    *,
    space: LatentSpace | str | None = None,
    sigma: SigmaLike = 0.0,
    caption: torch.Tensor | None = None,
    size: SizeLike = "native",
    steps: int | None = None,
    seed: int = 0,
    schedule: str = "spread",
    info: CheckpointInfo | None = None,
    flux2_bn: tuple[torch.Tensor, torch.Tensor] | None = None,
    callback: StepCallback | None = None,
    device: torch.device | str | None = None,
    compute_dtype: torch.dtype | None = None,
    tiling: str = "auto",
    tile_size: int | None = None,
    memory_budget: int | None = None,
    call_callback: CallProgress | None = None,
    attention: str = "auto",
    cfg: float | None = None,
    shift: float | None = None,
    negative_caption: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode a ComfyUI-convention latent with ``network``; returns the image [B, 3, H, W] in [-1, 1] (float32, CPU).

    Runs on ``device`` (default: where the weights are), computing in ``compute_dtype`` (default: see
    :func:`pid_core.runtime.default_compute_dtype`; bf16 runs under autocast as the reference does, fp32 follows
    the reference's fp32 run to rounding) with the ``attention`` kernel (see :mod:`pid_core.runtime`, which also
    tells how a call with NaN/inf output is redone). ``info`` (from loading)
    lets the latent space and training range be checked; ``callback(step, total, x0)`` reports progress and
    may raise to cancel. ``tiling``, ``tile_size`` and ``memory_budget`` choose whole or tiled decoding (see
    :func:`plan_decode`); ``call_callback(step, done, total)`` runs after each network call, one per group of
    images or of tiles (it may raise to cancel). A call that runs out of memory is redone with a plan for half
    the memory (fewer images per call, then smaller tiles), with a warning; the decode goes on with that plan.

    A distilled student (``info`` missing or ``info.distilled``) runs ``steps`` (default 4) of the student sampler
    (``schedule`` applies to it). An undistilled teacher runs :func:`pid_core.teacher.sample_teacher`: ``steps``
    (default 25), classifier-free guidance ``cfg`` (default 5; 1 turns it off) against ``negative_caption``, the
    embedding of :data:`pid_core.captions.NEGATIVE_PROMPT` as the reference uses (needed with a caption), and the
    timestep ``shift`` (default: from the picture size). Both branches of the guidance go through the network
    together when memory allows.
    """
    z = _network_latent(network, latent, space, sigma, flux2_bn, info)
    distilled = info is None or info.distilled
    steps = sampler_steps(steps, distilled)
    config = network.config
    batch = z.shape[0]
    height, width = output_size(z.shape[-2:], config, size, _training(info))
    if isinstance(size, str) and size.lower() == "auto":
        log.info("PiD decode: size auto -> %dx%d px (%s checkpoint)", width, height, _training(info) or "unknown range")
    if (message := training_range_warning((height, width), _training(info))) is not None:
        warnings.warn(message, stacklevel=2)

    param = next(network.parameters())
    device = torch.device(device) if device is not None else param.device
    dtype = compute_dtype or default_compute_dtype(device, param.dtype)
    y = _caption_tensor(caption, batch, network)
    _warn_unused_guidance(cfg, distilled, caption is not None)
    cfg = guidance_scale(cfg, distilled, caption is not None)
    if cfg != 1.0:  # the unconditional branch first, as the sampler expects
        y = torch.cat([_caption_tensor(_required_negative_caption(negative_caption), batch, network), y])
    plan = plan_decode(network, height, width, batch=y.shape[0], tiling=tiling, tile_size=tile_size,
                       memory_budget=memory_budget, device=device, compute_dtype=dtype)
    log.info("PiD decode: %s", plan.describe())
    _refuse_beyond_system_memory(network, plan, batch, device, dtype)
    if not plan.fits:
        warnings.warn(
            f"PiD may run out of memory: {plan.describe()}. Use tiling with a smaller tile size, a smaller output "
            "size, or free memory.",
            stacklevel=2,
        )
    sig = sigma_tensor(sigma, batch).to(device)  # warns once for a sigma beyond the trained range
    branches = y.shape[0] // batch
    passes = _NetworkPasses(network, z.repeat(branches, 1, 1, 1).to(device), y.to(device), sig.repeat(branches),
                            Fallback(device, dtype, attention), plan, tiling)
    steps_done = 0

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal steps_done
        step, steps_done = steps_done, steps_done + 1

        def on_call(done: int, total: int) -> None:
            if call_callback is not None:
                call_callback(step, done, total)

        while True:
            try:
                return passes.velocity(x, t, on_call)
            except torch.OutOfMemoryError:
                pass  # leave the handler before retrying: that frees what the failed call held
            passes.shrink()

    shape = (batch, 3, height, width)
    if distilled:
        x0 = sample(denoise, shape, seed=seed, steps=steps, schedule=schedule, device=device, callback=callback)
    else:
        shift = shift or dynamic_shift(height, width)
        log.info("PiD decode: undistilled checkpoint, %d DPM-Solver steps, cfg %g, shift %.3g", steps, cfg, shift)
        x0 = sample_teacher(denoise, shape, seed=seed, steps=steps, cfg=cfg, shift=shift, device=device,
                            callback=callback)
    return x0.clamp(-1.0, 1.0).cpu()


def _refuse_beyond_system_memory(network: PiDNetwork, plan: DecodePlan, pictures: int, device: torch.device,
                                 dtype: torch.dtype) -> None:
    """Refuse, before anything is allocated, a decode that needs more system memory than is free. A CPU reports no
    out-of-memory error: the operating system kills the process (a ComfyUI server with its whole queue). On a CPU
    the working memory is system memory; on a GPU the finished pictures come back to it (and a copy is made)."""
    free = available_memory("cpu")
    if free is None:
        return
    if device.type == "cpu":
        needed, what = plan.memory.activations, "of working memory"
    else:
        needed, what = 2 * pictures * 3 * plan.height * plan.width * 4, "of system memory for the finished pictures"
    if needed <= free:
        return
    fixes = []
    if device.type == "cpu":
        def fits(batch: int) -> bool:  # the smallest plan auto tiling makes for ``batch`` network items
            smaller = plan_decode(network, plan.height, plan.width, batch=batch, tiling="auto", memory_budget=free,
                                  device=device, compute_dtype=dtype)
            return smaller.memory.activations <= free

        branches = plan.batch // pictures
        if plan.tiles is None and fits(plan.batch):
            fixes.append("set tiling to auto")
        elif pictures > 1 and fits(branches):
            fixes.append("decode fewer pictures at a time")
    fixes += ["choose a smaller output size", "free memory"]
    raise MemoryError(
        f"Decoding {pictures} picture(s) of {plan.width}x{plan.height} px {plan.how()} needs about {needed / GB:.1f} GB "
        f"{what}, but only {free / GB:.1f} GB is free: {', '.join(fixes[:-1])} or {fixes[-1]}. It was not started, "
        "so that running out of memory cannot kill the process."
    )


def sampler_steps(steps: int | None, distilled: bool) -> int:
    """The steps a decode runs: ``steps``, or (None or 0) the checkpoint's own, 4 for students, 25 for teachers."""
    return steps or (STUDENT_STEPS if distilled else TEACHER_STEPS)


def guidance_scale(cfg: float | None, distilled: bool, has_caption: bool) -> float:
    """The guidance scale a decode runs (1: none, one network branch): students have none; teachers ``cfg``, 5
    when None, and none without a caption."""
    if distilled or not has_caption:
        return 1.0
    return TEACHER_CFG if cfg is None else float(cfg)


def _warn_unused_guidance(cfg: float | None, distilled: bool, has_caption: bool) -> None:
    if distilled and cfg not in (None, 1.0):
        warnings.warn(f"cfg {cfg:g} is ignored: this PiD checkpoint is a distilled student, which runs without "
                      "guidance (cfg is for undistilled checkpoints).", stacklevel=3)
    elif not distilled and not has_caption and cfg != 1.0:
        warnings.warn("No caption: decoding without guidance (cfg steers towards a caption and away from the "
                      "negative prompt).", stacklevel=3)


def _required_negative_caption(negative_caption: torch.Tensor | None) -> torch.Tensor:
    if negative_caption is None:
        raise ValueError(
            "Classifier-free guidance needs the negative prompt's embedding for its unconditional branch: connect PiD "
            "Caption (it brings it along), or pass negative_caption (CLI: --gemma), or set cfg to 1."
        )
    return negative_caption


def _training(info: CheckpointInfo | None) -> str | None:
    """The checkpoint's training range ("2k", "2kto4k"), or None when unknown."""
    return None if info is None else info.training


@dataclass
class PiDDecoder:
    """A loaded PiD network with what is known about its checkpoint."""

    network: PiDNetwork
    info: CheckpointInfo

    @classmethod
    def load(
        cls,
        path: str | Path,
        space: LatentSpace | str | None = None,
        training: str | None = None,
        precision: str = "bf16",
        device: torch.device | str = "cpu",
    ) -> PiDDecoder:
        """Load a checkpoint (official .pth, .safetensors, or Comfy-Org repack).

        ``precision`` "bf16" (default) keeps the weights in bf16, half the reference's memory; "fp32" follows the
        reference's fp32 run to within fp32 rounding.
        """
        if precision not in PRECISIONS:
            raise CheckpointError(f"Unknown precision {precision!r}; use one of: {', '.join(PRECISIONS)}.")
        loaded = load_checkpoint(path, space, training)
        return cls(build_network(loaded, PRECISIONS[precision], device), loaded.info)

    def decode(self, latent: torch.Tensor, **kwargs) -> torch.Tensor:
        """See :func:`decode`; the latent space defaults to the checkpoint's."""
        return decode(self.network, latent, info=self.info, **kwargs)
