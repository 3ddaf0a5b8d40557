"""How much memory a PiD decode needs, worked out before it runs: weights plus the peak of the activations.

The activation model follows the tensors that one network call keeps alive at the peak of each of its
phases (LQ projection, patch blocks, pixel embedding, pixel blocks, output layer), term by term as the
code allocates them, plus what the sampler keeps of the whole image meanwhile. The terms were read off
exact traces of live tensor bytes (``bench/memtrace.py``), and the totals are checked against the measured
peak memory of full-size decodes (``bench/memory_check.py``; the slow test in ``tests/core/test_memory.py``).

The figures are bytes of tensors on the device that runs the network. On a GPU they correspond to
``torch.cuda.max_memory_allocated()``; the CUDA context and the matrix libraries' workspaces (a few hundred
MB, outside PyTorch's allocator) come on top. On the CPU, the process's peak resident memory also counts
the code pages of the kernels it touched, which :data:`RUNTIME_OVERHEAD` covers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from .config import NetworkConfig
from .network import PIXEL_CHUNK_PATCHES, PiDNetwork
from .sampler import UPDATE_ROWS

GB = 1024**3  # as ComfyUI reports memory: "GB" means 2**30 bytes

# What a real process needs beyond its tensors: kernel code paged in on first use, thread-local buffers of
# the matrix and attention kernels, allocator slack. Measured on CPU (bench/memory_check.py); on CUDA the
# context and cuBLAS workspaces are of the same order.
RUNTIME_OVERHEAD = 256 * 1024**2

# Share of the free memory a decode plans to use when no budget is given: the estimate is within +-25% of
# what runs use, and other programs keep allocating.
SAFETY = 0.8


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a decode needs: ``weights`` (resident once loaded) and ``activations`` (peak while it runs).

    ``phases`` breaks the activations down by the phase of a network call (plus ``sampler`` and ``lq``, the
    LQ projection done once per decode); the peak is their maximum. ``tiles`` is 1 for a whole-image decode.
    """

    weights: int
    activations: int
    tiles: int = 1
    phases: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def total(self) -> int:
        return self.weights + self.activations

    def describe(self) -> str:
        how = "whole" if self.tiles == 1 else f"in {self.tiles} tiles"
        return (
            f"about {self.total / GB:.1f} GB ({self.weights / GB:.1f} GB weights + "
            f"{self.activations / GB:.1f} GB working memory, decoding {how})"
        )


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@lru_cache(maxsize=16)
def _parameter_counts(config: NetworkConfig) -> tuple[int, int]:
    """(all parameters, the largest single weight), counted on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        network = PiDNetwork(config)
    sizes = [p.numel() for p in network.parameters()]
    return sum(sizes), max(sizes)


def weight_bytes(config: NetworkConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the network's weights stored in ``dtype`` (2.7 GB in bf16 for the released v1 networks)."""
    return _parameter_counts(config)[0] * _bytes(dtype)


def call_phases(
    config: NetworkConfig,
    height: int,
    width: int,
    *,
    items: int = 1,
    compute_dtype: torch.dtype = torch.bfloat16,
    pixel_chunk: int | None = PIXEL_CHUNK_PATCHES,
) -> dict[str, int]:
    """Peak bytes of each phase of one network call on ``items`` inputs of ``height`` x ``width`` pixels.

    ``compute_dtype`` is what linear layers compute in (bf16 under autocast); residual streams, norms and
    RoPE are fp32 whatever it is, as in the reference.
    """
    c = config
    a, f = _bytes(compute_dtype), 4
    pixels = items * height * width
    tokens = pixels // c.patch_size**2
    text = items * c.txt_max_length
    dim, pd, pix_dim = c.hidden_size, c.pixel_hidden_size, c.pixel_attn_hidden_size

    lq = tokens * c.lq_hidden_dim * a  # the call's LQ tokens
    # patch blocks: at the attention, qkv, the joint q/k/v and the output, and the fp32 residual, norm and
    # modulation; at the SwiGLU MLP, its three hidden tensors
    attention = tokens * 3 * dim * a + 4 * (tokens + text) * dim * a + 3 * tokens * dim * f
    mlp = 3 * tokens * c.mlp_hidden * a + 3 * tokens * dim * f + tokens * dim * a
    s_cond = tokens * dim * f  # the pixel blocks' conditioning, alive until the output layer
    # pixel blocks, per pixel: the adaLN modulation (6 x pd), the MLP's hidden layer and its GELU (2 x 4 pd),
    # three fp32 pixel-stream temporaries and one in the compute dtype
    per_pixel = 6 * pd * a + 2 * 4 * pd * a + 3 * pd * f + pd * a
    stream = pixels * pd * f
    if pixel_chunk is None or tokens <= pixel_chunk:
        pixel = s_cond + pixels * per_pixel
        final_rows = pixels
    else:
        chunk = pixel_chunk * c.patch_size**2
        pixel_attention = tokens * pix_dim * (4 * a + f + 4 * a)  # compressed, qkv, one fp32 q/k, q/k/v/out
        rows = 4 * c.patch_size**2 * pd * dim * a  # the adaLN rows of the four tensors after the attention
        pixel = s_cond + stream + max(pixel_attention, stream + tokens * pix_dim * a + rows + chunk * per_pixel)
        final_rows = chunk
    return {
        "patch": lq + max(attention, mlp),
        "embed": s_cond + pixels * (pd * f + pd * a + 3 * f),
        "pixel": pixel,
        "final": stream + final_rows * 2 * pd * f + pixels * 3 * 2 * a,
    }


def activation_bytes(
    config: NetworkConfig,
    height: int,
    width: int,
    *,
    batch: int = 1,
    compute_dtype: torch.dtype = torch.bfloat16,
    weight_dtype: torch.dtype | None = None,
    tile: tuple[int, int] | None = None,
    tile_batch: int = 1,
    items_per_call: int | None = None,
    pixel_chunk: int | None = PIXEL_CHUNK_PATCHES,
) -> dict[str, int]:
    """Peak bytes of a decode's working memory by phase; the peak itself is ``max(result.values())``.

    ``tile`` (pixels) and ``tile_batch`` describe a tiled decode (None: whole image). ``items_per_call`` of the
    ``batch`` images go through the network together (None: all). ``weight_dtype`` other than the compute dtype
    adds the per-call cast of the largest weight (fp32 weights under bf16 autocast).
    """
    c = config
    a = _bytes(compute_dtype)
    per_call = batch if items_per_call is None else min(items_per_call, batch)
    whole_pixels = batch * height * width
    whole_tokens = whole_pixels // c.patch_size**2
    lq_tokens = whole_tokens * c.lq_hidden_dim * a
    call_tokens = per_call * height * width // c.patch_size**2
    other_lq_tokens = (whole_tokens - call_tokens) * c.lq_hidden_dim * a  # those of the other groups of images
    # the sampler's image, previous estimate and fresh noise (fp32), and the network output in fp32
    state = whole_pixels * 3 * 4 * 2
    if tile is None:
        phases = call_phases(c, height, width, items=per_call, compute_dtype=compute_dtype, pixel_chunk=pixel_chunk)
        # with the batch split, the group's output copy and the velocity being assembled
        split = 0 if per_call == batch else (per_call + batch) * height * width * 3 * 4 + other_lq_tokens
        phases = {k: v + state + split for k, v in phases.items()}
    else:
        th, tw = tile
        items = per_call * tile_batch
        phases = call_phases(c, th, tw, items=items, compute_dtype=compute_dtype, pixel_chunk=pixel_chunk)
        # the blended output, and each tile's input crop and output
        tiled_state = state + whole_pixels * 3 * 4 + items * th * tw * 3 * (4 + 4 + a) + lq_tokens
        phases = {k: v + tiled_state for k, v in phases.items()}
    if weight_dtype is not None and weight_dtype != compute_dtype:
        cast = _parameter_counts(c)[1] * a
        phases = {k: v + cast for k, v in phases.items()}
    # once per decode, a group of images at a time: the LQ projection's convolutions on the patch grid (GroupNorms
    # in fp32), beside the tokens of the groups done
    phases["lq"] = call_tokens * c.lq_hidden_dim * 4 * a + state + other_lq_tokens
    # the sampler's update x0 = x - t v: x, v, the previous and the new x0 in fp32 on the whole image, and at most
    # three float64 temporaries on a band of rows; then the fresh noise. The floor of a tiled decode (0.8 GB at
    # 4096 px)
    bands = batch * 3 * min(UPDATE_ROWS, height) * width * 8 * 3
    phases["sampler"] = whole_pixels * 3 * 4 * 4 + bands + lq_tokens
    return phases


def working_bytes(phases: dict[str, int]) -> int:
    """The working memory a decode plans for: the peak of its phases plus the runtime's own overhead."""
    return max(phases.values()) + RUNTIME_OVERHEAD


def estimate(
    config: NetworkConfig,
    height: int,
    width: int,
    *,
    batch: int = 1,
    weight_dtype: torch.dtype = torch.bfloat16,
    compute_dtype: torch.dtype | None = None,
    tile: tuple[int, int] | None = None,
    tile_batch: int = 1,
    tiles: int = 1,
    items_per_call: int | None = None,
    pixel_chunk: int | None = PIXEL_CHUNK_PATCHES,
) -> MemoryEstimate:
    """Memory of decoding ``batch`` images of ``height`` x ``width`` pixels, whole or in ``tile``-sized tiles.

    ``compute_dtype`` defaults to the weights' dtype (bf16 weights compute under bf16 autocast).
    """
    compute_dtype = compute_dtype or weight_dtype
    phases = activation_bytes(
        config, height, width, batch=batch, compute_dtype=compute_dtype, weight_dtype=weight_dtype,
        tile=tile, tile_batch=tile_batch, items_per_call=items_per_call, pixel_chunk=pixel_chunk,
    )
    return MemoryEstimate(
        weights=weight_bytes(config, weight_dtype),
        activations=working_bytes(phases),
        tiles=tiles,
        phases=phases,
    )


def items_that_fit(
    config: NetworkConfig,
    height: int,
    width: int,
    *,
    batch: int,
    budget: int,
    compute_dtype: torch.dtype = torch.bfloat16,
    weight_dtype: torch.dtype | None = None,
    pixel_chunk: int | None = PIXEL_CHUNK_PATCHES,
) -> int:
    """How many of ``batch`` whole images one network call can take within ``budget`` bytes (0: not even one)."""
    for items in range(batch, 0, -1):
        phases = activation_bytes(config, height, width, batch=batch, compute_dtype=compute_dtype,
                                  weight_dtype=weight_dtype, items_per_call=items, pixel_chunk=pixel_chunk)
        if working_bytes(phases) <= budget:
            return items
    return 0


def available_memory(device: torch.device | str) -> int | None:
    """Bytes free for new tensors on ``device`` now, or None when that cannot be told.

    CUDA: free device memory plus what PyTorch's cache holds unused; CPU: the kernel's MemAvailable (Linux).
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None
