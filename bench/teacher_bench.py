"""Time and peak memory of an undistilled teacher's decode against the 4-step student's, on one network.

    python bench/teacher_bench.py [--size 1024] [--steps 25]

The full-size v1.5 Flux network (random weights, bf16 under bf16 autocast, as PiD Decode runs it) decodes a
``size`` px output twice, each in a fresh process: as the distilled student (4 steps) and as the undistilled teacher
(``--steps`` DPM-Solver steps with guidance 5, both branches in one network call when memory allows).
"""

from __future__ import annotations

import argparse

from common import measure_in_subprocess
from decode_bench import GIB, load, machine

VARIANT = "flux_2kto4k_v1pt5"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="output side in pixels")
    parser.add_argument("--steps", type=int, default=25, help="the teacher's steps")
    args = parser.parse_args()
    print(f"{machine()}; load {load()}")
    results = {}
    for mode, steps in (("ours", 4), ("teacher", args.steps)):
        r = results[mode] = measure_in_subprocess(size=args.size, mode=mode, steps=steps, variant=VARIANT)
        print(f"  {args.size} px {'student' if mode == 'ours' else 'teacher'} {steps:3d} steps: {r['seconds']:8.1f} s "
              f"(cpu {r['cpu_seconds']:8.1f} s)  peak {r['peak_bytes'] / GIB:5.2f} GiB  (estimate "
              f"{r['estimate_bytes'] / GIB:5.2f})  {r['plan']}", flush=True)
    ratio = results["teacher"]["seconds"] / results["ours"]["seconds"]
    print(f"teacher / student: {ratio:.1f}x the time, "
          f"{results['teacher']['peak_bytes'] / results['ours']['peak_bytes']:.2f}x the peak memory")


if __name__ == "__main__":
    main()
