"""Known fidelity bugs, planted for a moment, to show that the comparison rules still see them.

Each bug is a context manager that changes our implementation the way a plausible mistake would (a wrong
constant, a dropped term, a rounding in the wrong place) and undoes it on exit. The parity tests run their very
comparison under each bug and assert that it fails: a bound loose enough to let one of these pass is too loose.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from pid_core import api, latents, layers, lq, network, sampler, teacher
from pid_core.config import LatentSpace
from pid_core.layers import RMSNorm


class _TorchWith:
    """The torch module as seen by one of our modules, with some functions replaced."""

    def __init__(self, **replaced: Callable) -> None:
        self.__dict__.update(replaced)

    def __getattr__(self, name: str):
        return getattr(torch, name)


@contextmanager
def timestep_period_10000() -> Iterator[None]:
    """The usual DiT timestep embedding period instead of PiD's 10."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(network, "timestep_frequencies", functools.partial(network.timestep_frequencies, max_period=10000.0))
        yield


@contextmanager
def rope_integer_positions() -> Iterator[None]:
    """2-D RoPE at integer patch positions 0..n-1 instead of ``linspace(0, 16, n)``."""
    with pytest.MonkeyPatch.context() as mp:
        integers = _TorchWith(linspace=lambda start, end, steps: torch.arange(steps, dtype=torch.float32))
        mp.setattr(layers, "torch", integers)
        yield


@contextmanager
def gate_sigma_term_dropped() -> Iterator[None]:
    """The sigma-aware gate without its ``- exp(log_alpha) * sigma`` term (a plain content gate)."""
    forward = lq.SigmaAwareGate.forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lq.SigmaAwareGate, "forward", lambda self, x, tokens, sigma: forward(self, x, tokens, 0 * sigma))
        yield


@contextmanager
def _frame_dropped(frame: str) -> Iterator[None]:
    to_network = api.to_network_latent

    def without_frame(samples, space, sigma, flux2_bn=None):
        if latents.latent_format(space).frame == frame:
            sigma = 0.0  # the frame factor is 1 at sigma 0: the LATENT goes in unscaled
        return to_network(samples, space, sigma, flux2_bn)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api, "to_network_latent", without_frame)
        yield


@contextmanager
def latent_flow_frame_dropped() -> Iterator[None]:
    """A flow latent (Flux, SD3, Flux.2, Qwen-Image) taken without its ``(1 - sigma)`` factor."""
    with _frame_dropped(latents.FLOW):
        yield


@contextmanager
def latent_sdxl_frame_dropped() -> Iterator[None]:
    """An SDXL latent taken without its variance-preserving ``1 / sqrt(1 + s^2)`` factor."""
    with _frame_dropped(latents.VP):
        yield


@contextmanager
def renoise_from_a_fresh_generator() -> Iterator[None]:
    """Every re-noise draws from a new generator with the same seed (so it repeats the initial noise)."""
    seen: set[int] = set()

    def randn(*args, generator: torch.Generator, **kwargs) -> torch.Tensor:
        if id(generator) in seen:
            generator = torch.Generator(generator.device).manual_seed(generator.initial_seed())
        seen.add(id(generator))
        return torch.randn(*args, generator=generator, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sampler, "torch", _TorchWith(randn=randn))
        yield


@contextmanager
def lq_groupnorm_eps_1e6() -> Iterator[None]:
    """The LQ ResBlocks' GroupNorm with eps 1e-6 (a common default) instead of 1e-5."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lq.ResBlock, "forward", _with_group_norm_eps(lq.ResBlock.forward, 1e-6))
        yield


def _with_group_norm_eps(forward: Callable, eps: float) -> Callable:
    def patched(self, x):
        with pytest.MonkeyPatch.context() as mp:
            for module in self.block:
                if isinstance(module, torch.nn.GroupNorm):
                    mp.setattr(module, "eps", eps)
            return forward(self, x)

    return patched


@contextmanager
def rmsnorm_returns_bf16() -> Iterator[None]:
    """RMSNorm rounding its product with the weight back to the input dtype (bf16) instead of returning fp32."""
    forward = RMSNorm.forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RMSNorm, "forward", lambda self, x: forward(self, x).to(x.dtype))
        yield


@contextmanager
def qwenimage_std_typo() -> Iterator[None]:
    """One Qwen-Image channel statistic mistyped: channel 5's std 1.7708 as 1.7078."""
    fmt = latents.latent_format(LatentSpace.QWENIMAGE)
    std = list(fmt.std)
    std[5] = 1.7078
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(latents._FORMATS, LatentSpace.QWENIMAGE, replace(fmt, std=tuple(std)))
        yield


@contextmanager
def teacher_shift_dropped() -> Iterator[None]:
    """The teacher's time steps without the timestep shift (uniform in t)."""
    timesteps = teacher.teacher_timesteps
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(teacher, "teacher_timesteps", lambda steps, shift: timesteps(steps, 1.0))
        yield


@contextmanager
def teacher_first_order_only() -> Iterator[None]:
    """DPM-Solver++ without its second-order steps (plain DDIM-like updates)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(teacher, "SOLVER_ORDER", 1)
        yield
