"""How far the parity comparisons sit from their bounds, under several CPU kernel settings.

For each setting (a fresh process with ``ATEN_CPU_CAPABILITY`` / ``OMP_NUM_THREADS`` set) this runs every numeric
comparison of ``tests/core/test_parity.py`` and prints the worst relative L2 and scaled max it measured against
the bounds of ``tests/core/comparison.py``, then the smallest effect of the planted bugs on the comparison that
must see them. The bounds were set from these figures (and from the Intel AMX figures quoted in comparison.py).

    python bench/parity_margins.py            # every setting below (about a minute)
    python bench/parity_margins.py --here     # only the current process's setting, as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "default": {"ATEN_CPU_CAPABILITY": "default"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "default, 1 thread": {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"},
}


def measure_here() -> dict:
    sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "core")]
    import torch
    import warnings

    import test_parity as tp
    from comparison import relative_l2, scaled_max

    warnings.simplefilter("ignore")

    def worst(pairs) -> list[float]:
        return [max(relative_l2(a, b) for _, a, b in pairs), max(scaled_max(a, b) for _, a, b in pairs)]

    fp32 = [p for run in tp.FOUR_STEP_RUNS for p in tp.network_calls(run)]
    fp32 += [p for run, steps in tp.SAMPLER_RUNS for p in tp.sampler_outputs(run, steps)]
    fp32 += [p for run, space in tp.PUBLIC_DECODE_RUNS for p in tp.public_decode(run, space)]
    bugs = {f"{bug.__name__} ({i})": worst(tp.found_under(bug, None, compare))
            for i, (bug, rule, compare) in enumerate(tp.PLANTED) if rule is not None}  # fmt: skip
    return {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "fp32": worst(fp32), "bf16": worst(tp.bf16_mode()), "bugs": bugs}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--here", action="store_true", help="measure in this process only and print JSON")
    if parser.parse_args().here:
        print(json.dumps(measure_here()))
        return

    sys.path.insert(0, str(ROOT / "tests" / "core"))
    from comparison import BF16, FP32

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")  # fmt: skip
    print(f"CPU: {cpu}\n")
    print(f"{'setting':20s} {'kernels':>9s} {'fp32 L2':>9s} {'fp32 max':>9s} {'bf16 L2':>9s} {'bf16 max':>9s}")
    results = {}
    for name, env in SETTINGS.items():
        out = subprocess.run([sys.executable, __file__, "--here"], env={**os.environ, **env}, capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
        r = results[name] = json.loads(out.strip().splitlines()[-1])
        print(f"{name:20s} {r['capability']:>9s} {r['fp32'][0]:9.2e} {r['fp32'][1]:9.2e} {r['bf16'][0]:9.2e} "
              f"{r['bf16'][1]:9.2e}")  # fmt: skip
    print(f"{'bound':20s} {'':>9s} {FP32.relative_l2:9.2e} {FP32.scaled_max:9.2e} {BF16.relative_l2:9.2e} {'-':>9s}")

    print("\nPlanted bugs: the smallest effect over the settings on the comparison that must see them (fp32 rule)")
    for bug in results["native"]["bugs"]:
        l2 = min(r["bugs"][bug][0] for r in results.values())
        worst_max = min(r["bugs"][bug][1] for r in results.values())
        print(f"  {bug:40s} L2 {l2:9.2e} ({l2 / FP32.relative_l2:6.0f}x the bound)  max {worst_max:9.2e}")


if __name__ == "__main__":
    main()
