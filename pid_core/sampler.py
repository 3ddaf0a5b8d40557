"""The 4-step distilled student sampler of PiD, as plain functions.

PiD predicts a velocity ``v = eps - x0`` in pixel space (flow matching, ``x_t = (1 - t) x0 + t eps``,
t = 1 is pure noise). Each step turns the prediction into a clean estimate ``x0 = x - t v`` and, unless
it is the last step, re-noises that estimate with fresh noise to the next timestep (the reference's
"sde" student sampling). There is no CFG and no timestep shift: the schedule is resolution-independent.

The sampler only sees a ``denoise(x, t_scaled) -> v`` callable, so it knows nothing of the network,
the caption or the latent; tiling and device placement live in the caller.

Noise comes from one seeded CPU generator: the initial noise first, then one draw per re-noise. The
reference draws from a CUDA generator, so our images differ from it pixel-wise for the same seed but
are statistically the same, and identical on every device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# The student's timesteps (model config ``student_t_list``).
STUDENT_T_LIST = (0.999, 0.866, 0.634, 0.342, 0.0)
STUDENT_STEPS = 4  # what the students were distilled for
MAX_STEPS = 8
SCHEDULES = ("spread", "reference")
TIMESCALE = 1000.0  # the network takes t * 1000

Denoise = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, int, Tensor], None]


def timesteps(steps: int, schedule: str = "spread") -> tuple[float, ...]:
    """The ``steps + 1`` timesteps from noise to 0 that the sampler visits.

    * 1 step: ``(1.0, 0.0)``; the reference's one-step path starts from t = 1.0, not 0.999.
    * 2..4 steps: the reference's subsampling of :data:`STUDENT_T_LIST` at indices
      ``round(linspace(0, 4, steps + 1))`` (round half to even), e.g. 2 -> (0.999, 0.634, 0.0).
    * 5..8 steps: ``"reference"`` keeps that rounding, which repeats timesteps (5 steps visit 0.634
      twice; 8 steps end with two 0.0, a wasted network call). The default ``"spread"`` instead
      interpolates the t list linearly at the fractional indices ``linspace(0, 4, steps + 1)``, so
      every step is at a distinct timestep. Both schedules agree for 1..4 steps.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"PiD runs 1 to {MAX_STEPS} steps, got {steps!r}; 4 is what the student was distilled for.")
    if steps == 1:
        return (1.0, 0.0)
    last = len(STUDENT_T_LIST) - 1
    positions = [last * k / steps for k in range(steps + 1)]
    if schedule == "reference" or steps <= last:
        return tuple(STUDENT_T_LIST[round(p)] for p in positions)  # Python's round is half to even
    return tuple(_interpolate(p) for p in positions)


def _interpolate(position: float) -> float:
    """The t list read at a fractional index, linearly between neighbours."""
    lo = min(int(position), len(STUDENT_T_LIST) - 2)
    frac = position - lo
    return STUDENT_T_LIST[lo] + frac * (STUDENT_T_LIST[lo + 1] - STUDENT_T_LIST[lo])


def _as_float32(t: float) -> float:
    # The reference keeps its t list as a float32 tensor; use the same values for exact parity.
    return torch.tensor(t, dtype=torch.float32).item()


def sample(
    denoise: Denoise,
    shape: Sequence[int],
    *,
    seed: int,
    steps: int = STUDENT_STEPS,
    schedule: str = "spread",
    device: torch.device | str | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Run the student sampler and return the final clean estimate x0 (float32, not clamped).

    ``denoise(x, t_scaled)`` gets x [B, 3, H, W] float32 and t_scaled float32 [B] (t * 1000) and returns
    the velocity. ``callback(step_index, total_steps, x0)`` runs after every step (progress, preview,
    cancel: an exception raised by it stops sampling and propagates). Use :func:`to_image` on the result.
    """
    shape = tuple(shape)
    if len(shape) != 4:
        raise ValueError(f"The image shape must be [B, 3, H, W], got {list(shape)}.")
    ts = [_as_float32(t) for t in timesteps(steps, schedule)]
    gen = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float32, generator=gen).to(device)
    total = len(ts) - 1
    x0 = x
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        t_scaled = torch.full((shape[0],), t * TIMESCALE, dtype=torch.float32, device=x.device)
        v = denoise(x, t_scaled)
        if v.shape != x.shape:
            raise ValueError(f"denoise returned shape {tuple(v.shape)} for an input of shape {tuple(x.shape)}.")
        x0 = _clean_estimate(x, v, t)
        del v
        if t_next > 0:
            # (1 - t_next) x0 + t_next eps, rounded as the reference does, with one whole-image temporary less
            x = torch.randn(shape, dtype=torch.float32, generator=gen).to(x.device)
            x.mul_(t_next).add_(x0 * (1.0 - t_next))
        else:
            x = x0
        if callback is not None:
            callback(i, total, x0)
    return x0


UPDATE_ROWS = 256  # image rows per float64 update: whole-image float64 temporaries would be 1.2 GB at 4096 px


def _clean_estimate(x: Tensor, v: Tensor, t: float) -> Tensor:
    """x0 = x - t v, in float64 as the reference computes it (so it matches to the last bit), a band of rows at
    a time."""
    x0 = torch.empty_like(x)
    for top in range(0, x.shape[-2], UPDATE_ROWS):
        rows = slice(top, top + UPDATE_ROWS)
        x0[..., rows, :] = (x[..., rows, :].double() - t * v[..., rows, :].double()).float()
    return x0


def to_image(x: Tensor) -> Tensor:
    """Sampler output -> image in [0, 1] (same layout). The reference's output is ``x.clamp(-1, 1)``."""
    return (x.clamp(-1.0, 1.0) + 1.0) * 0.5
