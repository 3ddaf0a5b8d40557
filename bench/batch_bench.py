"""Pictures per second of ``python -m pid_core batch`` with 1 and 2 workers, against a sequential loop of the decode
command (one process, one checkpoint load per picture).

    python bench/batch_bench.py [--network full|tiny] [--pictures 6] [--cells 8] [--steps 4] [--workers 1 2]
                                [--json out.json]

It writes a checkpoint (the full-size Flux 2k network with random weights, bf16, as an official ``.pth``: 2.7 GB
in a temporary folder; or the tests' tiny network), ``--pictures`` random Flux latents of ``--cells`` x ``--cells``
(8: 256 px outputs) and their manifest, then times, wall clock, each a fresh command as a user runs it:

* the decode command once per picture, one after the other (torch's default threads: all cores);
* the batch command with each ``--workers`` count (the cores shared out: 1 worker of 2 threads, 2 of 1 on 2 cores),
  starting its own local Ray.

For the batch it also gives the rate once running (the pictures after the first round, one per worker, over the
time from the end of that round to the last picture, so Ray's start and the checkpoint loads are left out) and the median time a
worker spent on one picture. Every output is compared with the decode command's, byte for byte. Random weights: the
figures are about time only. On a machine shared with other jobs, processes of several threads suffer most from the
contention (their threads wait for each other), so note the load averages printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "core"))  # the tests' tiny network, for --network tiny

import torch  # noqa: E402
from common import VARIANT, random_network  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from pid_core.config import released  # noqa: E402

FOLDER = "PiD_res2k_sr4x_official_flux_distill_4step"  # tells the pack the checkpoint's latent space


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def write_checkpoint(folder: Path, network: str) -> Path:
    (folder / FOLDER).mkdir(parents=True)
    path = folder / FOLDER / "model_ema_bf16.pth"
    if network == "full":
        state = random_network(released(VARIANT).network, torch.bfloat16).state_dict()
    else:
        from tiny import tiny_network

        state = {k: v.to(torch.bfloat16) for k, v in tiny_network(VARIANT).state_dict().items()}
    torch.save({f"net.{k}": v for k, v in state.items()}, path)
    return path


def write_inputs(folder: Path, pictures: int, cells: int) -> Path:
    gen = torch.Generator().manual_seed(0)
    (folder / "latents").mkdir()
    lines = []
    for i in range(pictures):
        latent = torch.randn(1, 16, cells, cells, generator=gen) + 0.1159
        save_file({"latent_tensor": latent}, str(folder / "latents" / f"p{i}.latent"))
        lines.append(json.dumps({"latent": f"latents/p{i}.latent", "sigma": 0.2, "seed": i}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def timed(command: list[str]) -> float:
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{result.stderr[-3000:]}")
    return time.monotonic() - started


def decode_loop(checkpoint: Path, folder: Path, pictures: int, steps: int) -> dict:
    out = folder / "single"
    out.mkdir()
    seconds = sum(
        timed([sys.executable, "-m", "pid_core", "decode", str(checkpoint), str(folder / "latents" / f"p{i}.latent"),
               "--sigma", "0.2", "--seed", str(i), "--steps", str(steps), "--out", str(out / f"p{i}.png")])
        for i in range(pictures)
    )
    return {"setup": "decode command, one process per picture", "seconds": seconds, "per_second": pictures / seconds}


def batch(checkpoint: Path, folder: Path, manifest: Path, pictures: int, steps: int, workers: int) -> dict:
    out = folder / f"batch_{workers}"
    seconds = timed([sys.executable, "-m", "pid_core", "batch", str(manifest), str(out), "--checkpoint",
                     str(checkpoint), "--workers", str(workers), "--steps", str(steps), "--no-progress"])
    records = [json.loads(t) for t in (out / "results.jsonl").read_text().splitlines()]
    if sorted(r["line"] for r in records if r["status"] == "done") != list(range(1, pictures + 1)):
        raise SystemExit(f"the batch with {workers} worker(s) did not decode every picture: {records}")
    # once running: the pictures after the first round (one per worker) over the time from its end to the last one
    finished = sorted(datetime.fromisoformat(r["finished"]).timestamp() for r in records)
    first_round = finished[min(workers, pictures) - 1]
    running = (pictures - workers) / (finished[-1] - first_round) if finished[-1] > first_round else None
    identical = all((out / f"p{i}.png").read_bytes() == (folder / "single" / f"p{i}.png").read_bytes()
                    for i in range(pictures))
    return {"setup": f"batch, {workers} worker(s)", "seconds": seconds, "per_second": pictures / seconds,
            "running_per_second": running, "identical": identical,
            "decode_seconds": sorted(r["seconds"] for r in records),
            "finished_after_start": [round(t - finished[0], 2) for t in finished]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", choices=("full", "tiny"), default="full",
                        help="the full-size Flux 2k network (random weights, 2.7 GB file) or the tests' tiny one")
    parser.add_argument("--pictures", type=int, default=6)
    parser.add_argument("--cells", type=int, default=8, help="latent side in cells (8: 256 px outputs)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="pid_batch_bench_") as tmp:
        folder = Path(tmp)
        print(f"machine: {machine()}; load average before: {load_average()}", flush=True)
        checkpoint = write_checkpoint(folder, args.network)
        manifest = write_inputs(folder, args.pictures, args.cells)
        side = args.cells * 32
        print(f"{args.network} network ({checkpoint.stat().st_size / 1e9:.2f} GB checkpoint), {args.pictures} pictures "
              f"of {side}x{side} px, {args.steps} steps", flush=True)
        rows = [decode_loop(checkpoint, folder, args.pictures, args.steps)]
        for workers in args.workers:
            rows.append(batch(checkpoint, folder, manifest, args.pictures, args.steps, workers))
        print(f"load average after: {load_average()}")

    base = rows[0]["per_second"]
    print(f"\n{'setup':<42} {'wall s':>8} {'pictures/s':>11} {'vs loop':>8} {'running pictures/s':>19} "
          f"{'s per decode':>13} identical")
    for row in rows:
        running = f"{row['running_per_second']:.3f}" if row.get("running_per_second") else "-"
        decodes = row.get("decode_seconds")
        median = f"{decodes[len(decodes) // 2]:.1f}" if decodes else "-"
        same = {True: "yes", False: "NO", None: "-"}[row.get("identical")]
        print(f"{row['setup']:<42} {row['seconds']:>8.1f} {row['per_second']:>11.3f} {row['per_second'] / base:>7.2f}x "
              f"{running:>19} {median:>13} {same}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
