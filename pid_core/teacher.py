"""The sampler of the undistilled PiD teachers: DPM-Solver++ on the flow schedule, with classifier-free guidance.

The teachers are the students' networks before distillation: the same velocity prediction ``v = eps - x0`` on
``x_t = (1 - t) x0 + t eps``, sampled as the official ``PidModel.generate_samples_from_batch`` does:

* time steps ``t_k``: ``N + 1`` points uniform in ``1 - t`` from 1 to 1/1000 (the flow schedule's range),
  pushed towards the noise by the timestep shift ``s t / (1 + (s - 1) t)``; the last one is 0;
* the shift grows with the picture: ``6 * sqrt(sqrt(H * W) / 2048)`` (the teacher configs' ``dynamic_shift``),
  unless one is given;
* DPM-Solver++ (data prediction) multistep of order ``min(N, 2)``, first order for the first and the last step:
  an ODE, so the initial noise is the only randomness, drawn as the students draw it;
* guidance on the caption only: the unconditional branch sees the empty caption's embedding with the same
  latent and sigma, and ``eps = eps_uncond + cfg (eps_cond - eps_uncond)``.

Defaults, from the official docs (``docs/inference.md``: "PiD teacher ... CFG 5, 25 steps") and the teacher
configs (``cfg_scale=5``, ``dynamic_shift`` base 6.0 at 2048 px).

As the student sampler, this only sees ``denoise(x, t_scaled) -> v``; with guidance it gets the batch twice,
``[x; x]``, and returns the unconditional velocities first. The caller decides how that batch goes through
the network (in one call or in several).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .sampler import TIMESCALE, Denoise, StepCallback

TEACHER_STEPS = 25
TEACHER_CFG = 5.0
MAX_TEACHER_STEPS = 200
BASE_SHIFT = 6.0
BASE_SIZE = 2048
_T_END = 1.0 / 1000  # the flow schedule's smallest time, 1 / its 1000 training timesteps
SOLVER_ORDER = 2  # DPM-Solver++ 2M; lower for the first and the last step


def dynamic_shift(height: int, width: int) -> float:
    """The timestep shift the teachers were trained and sampled with at this picture size."""
    return BASE_SHIFT * math.sqrt(math.sqrt(height * width) / BASE_SIZE)


def teacher_timesteps(steps: int, shift: float) -> Tensor:
    """The ``steps + 1`` times from (almost) 1 down to 0, float32 as the reference computes them."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_TEACHER_STEPS:
        raise ValueError(
            f"An undistilled PiD runs 1 to {MAX_TEACHER_STEPS} steps, got {steps!r}; {TEACHER_STEPS} is the official "
            "setting."
        )
    if not shift > 0:
        raise ValueError(f"The timestep shift must be positive, got {shift!r}.")
    ramp = 1.0 - torch.linspace(1.0, _T_END, steps + 1)  # 0 ... 0.999
    return (shift * ramp / (1 + (shift - 1) * ramp)).flip(0)


def _half_log_snr(t: Tensor) -> Tensor:
    return torch.log(1 - t) - torch.log(t)


def sample_teacher(
    denoise: Denoise,
    shape: Sequence[int],
    *,
    seed: int,
    steps: int = TEACHER_STEPS,
    cfg: float = TEACHER_CFG,
    shift: float,
    device: torch.device | str | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Run the teacher's sampler and return the final clean picture (float32, not clamped).

    ``denoise(x, t_scaled)`` gets x [B, 3, H, W] (or [2B, ...] with guidance: the same x twice) float32 and
    t_scaled float32 (t * 1000) and returns the velocity; ``callback(step_index, total_steps, x0)`` runs after
    every step with the current clean estimate (progress, preview, cancel).
    """
    shape = tuple(shape)
    if len(shape) != 4:
        raise ValueError(f"The image shape must be [B, 3, H, W], got {list(shape)}.")
    if not cfg >= 0:
        raise ValueError(f"The guidance scale (cfg) must be 0 or more, got {cfg!r}.")
    ts = teacher_timesteps(steps, shift)
    gen = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float32, generator=gen).to(device)
    guided = cfg != 1.0

    def clean_estimate(x: Tensor, t: Tensor) -> Tensor:
        """The data prediction at time t: velocities -> noise prediction (guided) -> x0."""
        batch = torch.cat([x, x]) if guided else x
        t_scaled = (t * TIMESCALE).expand(batch.shape[0]).to(x.device)
        v = denoise(batch, t_scaled).float()
        if v.shape != batch.shape:
            raise ValueError(f"denoise returned shape {tuple(v.shape)} for an input of shape {tuple(batch.shape)}.")
        eps = (1 - t.to(x.device)) * v + batch
        if guided:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + cfg * (eps_cond - eps_uncond)
        return (x - t.to(x.device) * eps) / (1 - t.to(x.device))

    def advance(x: Tensor, t_from: Tensor, t_to: Tensor, x0: Tensor, x0_before: Tensor | None, t_before: Tensor | None):
        """One DPM-Solver++ step from t_from to t_to: first order, or second order with the previous estimate."""
        if t_to == 0:  # the half-log-SNR is infinite there; the update reduces to the clean estimate
            return x0.clone()
        lam_to, lam_from = _half_log_snr(t_to), _half_log_snr(t_from)
        h = lam_to - lam_from
        decay = torch.exp(torch.log(1 - t_to)) * torch.expm1(-h)
        ratio = t_to / t_from
        if x0_before is None:
            return ratio * x - decay * x0
        r = (lam_from - _half_log_snr(t_before)) / h
        slope = (1.0 / r) * (x0 - x0_before)
        return ratio * x - decay * x0 - 0.5 * decay * slope

    order = min(steps, SOLVER_ORDER)
    x0 = clean_estimate(x, ts[0])
    history: tuple[Tensor, Tensor] | None = None  # (x0, t) of the step before
    for k in range(1, steps + 1):
        second_order = order >= 2 and history is not None and k < steps
        x = advance(x, ts[k - 1], ts[k], x0, *(history if second_order else (None, None)))
        if callback is not None:
            callback(k - 1, steps, x0)
        if k < steps:
            history = (x0, ts[k - 1])
            x0 = clean_estimate(x, ts[k])
    return x
