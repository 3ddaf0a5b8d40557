"""Time and peak memory of PiD decodes, ours against a reference-style run, plus tiled-vs-whole agreement.

    python bench/decode_bench.py [--long] [--weights model_ema_bf16.pth] [--repeats 3] [--json out.json]
    python bench/decode_bench.py --sizes --agreement-size 2048 --tiled-4096    # only the long runs

The full-size Flux 2k network (random weights unless ``--weights``) decodes 512 and 1024 px outputs (and
2048 px, and 4096 px tiled, with ``--long``), 4 steps each. Every decode runs in a fresh process, so its peak
resident memory is its own. Two setups, interleaved run by run, best time of ``--repeats`` (one run for
2048 and 4096 px, which take many minutes on a CPU):

* ours: bf16 weights under bf16 autocast, chunked pixel blocks, tiled when the memory budget says so;
* reference-style: the official code's profile emulated with our network: fp32 weights in plain torch.nn
  layers under bf16 autocast inside torch.no_grad (so autocast caches a bf16 copy of every weight), never
  tiled, pixel blocks unchunked (see ``common.measure``).

At ``--agreement-size`` (default: the largest whole-image size) it also decodes that output in tiles of half
its side and reports the PSNR against the whole decode and a seam score: gradient energy across tile borders
over that elsewhere (1.0 = borders are indistinguishable), with the whole image's score at the same lines for
comparison.
With random weights these figures show numerical agreement only, not picture quality.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import torch
from common import VARIANT, measure_in_subprocess, psnr, reference_estimate, seam_score

GIB = 1024**3


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def run(size: int, mode: str, weights: str | None, **kwargs) -> dict:
    result = measure_in_subprocess(size=size, mode=mode, weights=weights, **kwargs)
    print(f"  {size:5d} px {mode:10s} {result['seconds']:8.1f} s (cpu {result['cpu_seconds']:7.1f} s)  "
          f"peak {result['peak_bytes'] / GIB:6.2f} GiB  (estimate {result['estimate_bytes'] / GIB:5.2f})  {result['plan']}", flush=True)
    return result


def compare(size: int, repeats: int, weights: str | None) -> dict:
    runs: dict[str, list[dict]] = {"ours": [], "reference": []}
    for _ in range(repeats):
        for mode in runs:
            runs[mode].append(run(size, mode, weights))
    best = {mode: min(r["seconds"] for r in rs) for mode, rs in runs.items()}
    cpu = {mode: min(r["cpu_seconds"] for r in rs) for mode, rs in runs.items()}
    peak = {mode: max(r["peak_bytes"] for r in rs) for mode, rs in runs.items()}
    return {
        "size": size,
        "repeats": repeats,
        "seconds": best,
        "cpu_seconds": cpu,
        "peak_bytes": peak,
        "estimate_bytes": {mode: rs[0]["estimate_bytes"] for mode, rs in runs.items()},
        "plan": {mode: rs[0]["plan"] for mode, rs in runs.items()},
    }


def agreement(size: int, weights: str | None, workdir: Path) -> dict:
    """Whole vs tiles of half the side, same seed: PSNR and seam scores."""
    whole_path, tiled_path = workdir / "whole.pt", workdir / "tiled.pt"
    run(size, "ours", weights, tiling="off", save=str(whole_path))
    tiled = run(size, "ours", weights, tiling="on", tile_size=size // 2, save=str(tiled_path))
    whole_img, tiled_img = torch.load(whole_path), torch.load(tiled_path)
    lines = (tiled["tile_rows"], tiled["tile_cols"], tuple(tiled["tile_pixels"]))
    return {
        "size": size,
        "tiles": tiled["tiling"],
        "psnr_db": psnr(tiled_img, whole_img),
        "seam_tiled": seam_score(tiled_img, *lines),
        "seam_whole": seam_score(whole_img, *lines),
        "seconds_tiled": tiled["seconds"],
    }


def print_comparison(compare: list[dict]) -> None:
    print(f"{'size':>6} {'runs':>4} {'ours s':>8} {'ref s':>8} {'time':>6} {'cpu time':>8} {'ours GiB':>9} {'ref GiB':>8}"
          f" {'memory':>7} {'est. ours':>9} {'est. ref':>8}")
    for r in compare:
        s, c, m, e = r["seconds"], r["cpu_seconds"], r["peak_bytes"], r["estimate_bytes"]
        print(f"{r['size']:6d} {r['repeats']:4d} {s['ours']:8.1f} {s['reference']:8.1f} {s['ours'] / s['reference']:6.2f}"
              f" {c['ours'] / c['reference']:8.2f} {m['ours'] / GIB:9.2f} {m['reference'] / GIB:8.2f}"
              f" {m['ours'] / m['reference']:7.2f} {e['ours'] / GIB:9.2f} {e['reference'] / GIB:8.2f}")
    print("time, cpu time, memory: ours / reference-style (below 1: ours is faster / leaner)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", action="store_true", help="add 2048 px (both setups) and 4096 px tiled (ours)")
    parser.add_argument("--weights", help="a real PiD checkpoint (Flux 2k); default: random weights")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setup at 512 and 1024 px (best time is kept)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[512, 1024], help="output sides compared whole")
    parser.add_argument("--agreement-size", type=int, help="output side of the tiled-vs-whole check (default: the "
                        "largest compared size; 0 skips it)")
    parser.add_argument("--tiled-4096", action="store_true", help="decode 4096 px tiled (ours only; implied by --long)")
    parser.add_argument("--steps-4096", type=int, default=4, help="sampler steps of the 4096 px decode (its peak "
                        "memory is that of one step; 1 step takes a quarter of the time)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    label = "real weights" if args.weights else "random weights: numerical agreement only"
    print(f"PiD decode benchmark, {VARIANT} network, 4 steps ({label})")
    print(f"machine: {machine()}; load average at start {load()}")
    sizes = sorted(set(args.sizes + ([2048] if args.long else [])))
    results: dict = {"machine": machine(), "weights": label, "compare": [], "load_start": load()}
    for size in sizes:
        repeats = args.repeats if size <= 1024 else 1
        print(f"{size} px, {repeats} run(s) per setup:")
        results["compare"].append(compare(size, repeats, args.weights))
    agreement_size = args.agreement_size if args.agreement_size is not None else max(sizes, default=0)
    if agreement_size:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"tiled vs whole at {agreement_size} px:")
            results["agreement"] = agreement(agreement_size, args.weights, Path(tmp))
    if args.long or args.tiled_4096:
        need = reference_estimate(4096)
        print(f"4096 px, tiled, {args.steps_4096} step(s) (ours only; the reference-style run would need about "
              f"{need / GIB:.0f} GiB, by our estimate):")
        results["tiled_4096"] = run(4096, "ours", args.weights, tiling="on", steps=args.steps_4096)
    results["load_end"] = load()

    print(f"\nResults ({label}); machine: {results['machine']}")
    if results["compare"]:
        print_comparison(results["compare"])
    if a := results.get("agreement"):
        print(f"tiled vs whole at {a['size']} px ({a['tiles']}): PSNR {a['psnr_db']:.1f} dB; seam score tiled "
              f"{a['seam_tiled']:.3f}, whole at the same lines {a['seam_whole']:.3f}")
    if "tiled_4096" in results:
        t = results["tiled_4096"]
        print(f"4096 px tiled, {t['steps']} step(s): {t['seconds']:.0f} s, peak {t['peak_bytes'] / GIB:.2f} GiB "
              f"(estimate {t['estimate_bytes'] / GIB:.2f}); {t['plan']}")
    print(f"load average at start {results['load_start']}, at end {results['load_end']} (other work on the machine "
          "slows the timings)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
