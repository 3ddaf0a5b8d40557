"""How the network runs on a device: the compute dtype, the attention kernel, and compiled blocks (opt-in).

* Compute dtype: the reference computes under bf16 autocast. GPUs without bf16 (before NVIDIA Ampere, and
  some others) compute in fp16 instead; PiD was trained in bf16, so a call whose output overflows fp16 is
  redone in fp32 (see :class:`Fallback`).
* Attention: PyTorch picks a fused scaled-dot-product kernel by itself ("auto"); "math" is the plain, always
  available one; "flash", "efficient" and "cudnn" force a fused kernel. Some fused kernels return NaNs on some
  GPUs (AMD in particular): a call whose output is not finite is redone with "math" and the rest of the decode
  keeps it.
* ``torch.compile`` of the patch and pixel blocks, the repeated part of the network, compiled once per input
  shape (each output size and tile size compiles on first use, which takes a while).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch

from .network import PiDNetwork

ATTENTION_BACKENDS = ("auto", "math", "flash", "efficient", "cudnn")


def default_compute_dtype(device: torch.device | str, weight_dtype: torch.dtype) -> torch.dtype:
    """bf16 (the reference's autocast) for bf16 weights, fp16 on a CUDA GPU without bf16, fp32 for fp32 weights."""
    device = torch.device(device)
    if weight_dtype == torch.float32:
        return torch.float32
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype):
    """The autocast context for ``dtype`` (none for fp32)."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


def check_attention_backend(name: str) -> None:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"Unknown attention backend {name!r}; choose one of: {', '.join(ATTENTION_BACKENDS)}.")


@contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Run scaled-dot-product attention with the kernel ``name`` (one of :data:`ATTENTION_BACKENDS`)."""
    check_attention_backend(name)
    if name == "auto":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]  # fmt: skip
    with sdpa_kernel(kernel):
        try:
            yield
        except RuntimeError as error:
            if "No viable backend" not in str(error) and "No available kernel" not in str(error):
                raise
            raise ValueError(
                f"The {name} attention kernel is not available here (device, dtype or head size); choose auto or math."
            ) from None


class Fallback:
    """Runs network calls and redoes one whose output is not finite: first with the math attention kernel (if
    another one was in use), then in fp32 (if it ran in fp16/bf16). A fallback that helped stays on for the
    calls that follow, with one warning; a call that is not finite even then is an error."""

    def __init__(self, device: torch.device, compute_dtype: torch.dtype, attention: str = "auto") -> None:
        self.device = device
        self.dtype = compute_dtype
        self.attention = attention
        check_attention_backend(attention)

    def __call__(self, call: Callable[[], torch.Tensor]) -> torch.Tensor:
        out = self._run(call)
        if torch.isfinite(out).all():
            return out
        for change in self._remedies():
            out = self._run(call)
            if torch.isfinite(out).all():
                warnings.warn(f"PiD's output had NaN/inf values; {change} for the rest of this decode.", stacklevel=3)
                return out
        raise ValueError(
            "PiD's output has NaN/inf values even with the math attention kernel in fp32: the latent, the caption "
            "or the checkpoint holds bad values; check them (and load the checkpoint again)."
        )

    def _run(self, call: Callable[[], torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode(), autocast(self.device, self.dtype), attention_backend(self.attention):
            return call()

    def _remedies(self) -> Iterator[str]:
        if self.attention != "math":
            self.attention = "math"
            yield "the math attention kernel is used instead of the fused one"
        if self.dtype != torch.float32:
            was, self.dtype = self.dtype, torch.float32
            yield f"computing in fp32 instead of {str(was).removeprefix('torch.')}"


def compile_blocks(network: PiDNetwork, **options) -> PiDNetwork:
    """Compile the network's patch and pixel blocks in place with ``torch.compile`` (``options`` go to it, e.g.
    ``mode="max-autotune"`` or ``backend=...``); returns the network. Each new input shape compiles again."""
    for block in (*network.patch_blocks, *network.pixel_blocks):
        block.compile(dynamic=False, **options)
    return network
