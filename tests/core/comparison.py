"""How the tests compare two float computations: which differences are rounding, and which are bugs.

Two runs of the same function on a CPU need not give the same bits. Matrix kernels (oneDNN/MKL on AVX2,
AVX-512, AMX) block and sum in an order of their own, which also changes with the row count and the thread
count; ATen's vectorised kernels (exp, sin, softmax, attention, the Box-Muller of ``torch.randn``) differ per
``ATEN_CPU_CAPABILITY``. So ``torch.equal`` is asserted only where it holds by construction (the same kernels on
the same shapes in one process), and the comparisons that differ from CPU to CPU (ours against the reference's
golden runs, or one computation in another blocking) use the rules below. Each bound is set from
the differences measured across CPU kernels and thread counts (``bench/parity_margins.py`` prints them; README,
"Parity across CPUs") and shown to fail on planted fidelity bugs (``planted_bugs.py``, used by test_parity.py).

The metrics are scale-free, so one rule serves velocities (|v| up to ~4), clean estimates and clamped
pictures alike:
* relative L2, ``||a - b|| / ||b||``: rounding differences are scattered and tiny in energy, while a fidelity
  bug moves the whole tensor; this is the metric that separates the two best;
* scaled max, ``max |a - b| / max |b|``: guards against a local bug (one tile, one border) that the L2 of a
  whole picture would dilute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, b = actual.double(), expected.double()
    return ((a - b).norm() / b.norm()).item()


def scaled_max(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, b = actual.double(), expected.double()
    return ((a - b).abs().max() / b.abs().max()).item()


@dataclass(frozen=True)
class Rule:
    name: str
    relative_l2: float
    scaled_max: float | None
    why: str

    def failures(self, actual: torch.Tensor, expected: torch.Tensor) -> list[str]:
        """What exceeds this rule's bounds (empty: within them)."""
        if actual.shape != expected.shape:
            return [f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"]
        if not torch.isfinite(actual).all():
            return ["non-finite values"]
        found = []
        if (l2 := relative_l2(actual, expected)) > self.relative_l2:
            found.append(f"relative L2 {l2:.3g} > {self.relative_l2:g}")
        if self.scaled_max is not None and (m := scaled_max(actual, expected)) > self.scaled_max:
            found.append(f"scaled max {m:.3g} > {self.scaled_max:g}")
        return found

    def holds(self, actual: torch.Tensor, expected: torch.Tensor) -> bool:
        return not self.failures(actual, expected)

    def check(self, actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
        """Assert that ``actual`` is ``expected`` under this rule."""
        if found := self.failures(actual, expected):
            where = f" ({what})" if what else ""
            raise AssertionError(f"{self.name}{where}: {'; '.join(found)}")


FP32 = Rule(
    "fp32",
    relative_l2=5e-5,
    scaled_max=1e-3,
    why=(
        "The same function in fp32 with another summation order: our code against the reference's golden run, "
        "or our code with other kernels, row blocking, batching or tiles. Measured over the golden runs under "
        "AVX-512, AVX2 and default kernels, 1 and 2 threads: relative L2 up to 1.3e-6, scaled max up to 3.0e-5; "
        "an Intel Xeon with AMX reached 1.7e-4 max abs on velocities of up to ~4 (scaled ~5e-5). The bounds "
        "sit ~40x and ~20x above that; the planted bugs that fp32 runs must see move them by 6.6e-3 or more."
    ),
)

TEACHER_FP32 = Rule(
    "fp32 teacher",
    relative_l2=2e-4,
    scaled_max=4e-3,
    why=(
        "A teacher's decode in fp32 against the reference's. The official DPM-Solver turns the velocity into a "
        "noise prediction eps = (1 - t) v + x, rounded at the magnitude of x, and its first step divides by "
        "1 - t0 (9.4e-4 at 64 px): a velocity one ulp apart flips a rounding of eps that then grows a "
        "thousandfold, whatever the kernels (the reference's own fp32 run is up to 2.5e-4 from a float64 replay "
        "of its arithmetic). Measured across ISAs and thread counts: relative L2 up to 1.9e-5, scaled max up to "
        "2.6e-4; the bounds sit 10x and 15x above. Golden runs with other settings differ by 4.9e-2 or more, "
        "and a dropped timestep shift by 8.7e-3."
    ),
)

BF16 = Rule(
    "bf16",
    relative_l2=1.5e-2,
    scaled_max=None,
    why=(
        "The same function under bf16 autocast with other kernels: our bf16 mode against the reference's bf16 "
        "run, or bf16 with another row blocking. ATen's CPU attention rounds its bf16 blocks per ISA (3e-4 "
        "apart at the first attention), and the random tiny networks amplify that to a bf16 rounding of the "
        "whole output: measured up to 7.2e-3 (ATEN_CPU_CAPABILITY=default), 6.0e-3 (avx2), 2.0e-3 (Intel AMX), "
        "against the reference's own bf16/fp32 gap of ~1e-2. The bound, twice the worst, tells a bf16 run of "
        "this network from a wrong network (>= 0.3), not one bf16 rounding from another: the rounding points "
        "are compared exactly, as the dtype each module returns (test_parity)."
    ),
)

# Our Gemma-2 against transformers' Gemma-2 in the same process (test_gemma.py), element by element.
# fp32: both sides perform the same operations in the same order, so only kernel-level reassociation could differ
# (~1e-6 relative); 1e-5 leaves room for that and nothing else.
# bf16: we reproduce the reference's roundings step by step (embedding scale rounded to bf16, fp32 norms cast back,
# RoPE tables rounded to bf16, SDPA in bf16), and where the kernels agree the result is bit-identical. One bf16 ulp
# is 2^-8 relative, and one rounding that differs early is amplified by the layers to ~1 absolute (see
# test_bf16_tolerance_catches_one_rounding_difference), so 2 ulps (rtol 2^-7) with atol 2^-6 for values near 0
# tolerates a kernel choice on another CPU but not a change in arithmetic.
GEMMA_TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2**-7, atol=2**-6)}
