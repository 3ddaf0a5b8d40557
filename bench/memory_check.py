"""The memory estimate against the measured peak memory of full-size decodes.

Each configuration runs in a fresh process: the full-size Flux 2k network (random weights) decodes one
whole-image step, and its peak resident memory (``resource.getrusage``) minus the baseline (interpreter,
torch, inputs) is compared with ``pid_core.memory``'s estimate for the same configuration.

    python bench/memory_check.py [--sizes 512 1024 2048]

On a GPU the same comparison is ``torch.cuda.max_memory_allocated()`` (weights + activations) against the
estimate without its runtime overhead; the CUDA context comes on top of both.
"""

from __future__ import annotations

import argparse

from common import measure_in_subprocess

GIB = 1024**3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048], help="output sides in pixels")
    parser.add_argument("--steps", type=int, default=1, help="sampler steps per decode (peak memory is per step)")
    args = parser.parse_args()
    print(f"{'size':>6} {'measured GiB':>13} {'estimate GiB':>13} {'ratio':>6}  seconds")
    worst = 0.0
    for size in args.sizes:
        r = measure_in_subprocess(size=size, steps=args.steps, tiling="off")
        ratio = r["estimate_bytes"] / r["peak_bytes"]
        worst = max(worst, abs(ratio - 1))
        print(f"{size:6d} {r['peak_bytes'] / GIB:13.2f} {r['estimate_bytes'] / GIB:13.2f} {ratio:6.2f}  {r['seconds']:.0f}",
              flush=True)
    print(f"largest deviation of the estimate: {worst:.0%} (the check allows 25%)")


if __name__ == "__main__":
    main()
