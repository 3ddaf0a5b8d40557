"""Exact peak of live tensor bytes during a PiD forward, traced without running it (a development tool).

The network runs under PyTorch's FakeTensorMode (shapes and dtypes only, no arithmetic), and a dispatch mode
counts the bytes of every storage an operator creates until it is freed. This is how the coefficients of
``pid_core.memory`` were derived and how they are checked at sizes too big to run here (4096 px untiled);
the measured peak RSS of real runs (``bench/memory_check.py``) adds the allocator's and libraries' overhead.

    python bench/memtrace.py --size 2048 [--variant flux_2k] [--fp32] [--unchunked] [--tile 1024]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created by operators while it is active; ``peak`` is the high-water mark."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.existing = {StorageWeakRef(t.untyped_storage()).cdata for t in existing}  # weights, inputs
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0
        self.peak_op = ""
        self.phase = "start"
        self.phase_peaks: dict[str, int] = {}
        self.peak_sizes: dict[str, list[int]] = {}

    def current(self) -> int:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[key]
        return sum(n for _, n in self.live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.existing:
                    self.live.setdefault(ref.cdata, (ref, storage.nbytes()))
        now = self.current()
        if now > self.peak:
            self.peak, self.peak_op = now, f"{self.phase}: {func}"
        if now > self.phase_peaks.get(self.phase, -1):
            self.phase_peaks[self.phase] = now
            self.peak_sizes[self.phase] = sorted((n for _, n in self.live.values()), reverse=True)[:12]
        return out

    def watch(self, module: torch.nn.Module, phase: str) -> None:
        module.register_forward_pre_hook(lambda *_: setattr(self, "phase", phase))


def trace(
    variant: str, height: int, width: int, *, fp32: bool, chunked: bool, batch: int = 1, verbose: bool = False
) -> tuple[int, str]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pid_core.config import released
    from pid_core.network import PiDNetwork

    config = released(variant).network
    dtype = torch.float32 if fp32 else torch.bfloat16
    with FakeTensorMode():
        net = PiDNetwork(config, dtype=dtype).eval().requires_grad_(False)
        if not chunked:
            net.pixel_chunk = None
        x = torch.empty(batch, 3, height, width)
        t = torch.full((batch,), 999.0)
        y = torch.empty(batch, config.txt_max_length, config.txt_embed_dim)
        lat_hw = (height // (config.latent_down * config.sr_scale), width // (config.latent_down * config.sr_scale))
        latent = torch.empty(batch, config.latent_channels, *lat_hw)
        sigma = torch.zeros(batch)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=not fp32)
        tracker = LiveBytes([*net.parameters(), *net.buffers(), x, t, y, latent, sigma])
        for module, phase in [(net.lq_proj.latent_proj, "lq"), (net.s_embedder, "patch"), (net.pixel_embedder, "embed"),
                              (net.pixel_blocks[0], "pixel"), (net.final_layer, "final")]:
            tracker.watch(module, phase)
        with torch.inference_mode(), autocast, tracker:
            net(x, t, y, latent, sigma)
    if verbose:
        for phase, peak in tracker.phase_peaks.items():
            sizes = ", ".join(f"{n / 2**20:.0f}" for n in tracker.peak_sizes[phase])
            print(f"    {phase:6s} {peak / 2**20:9.1f} MiB  largest (MiB): {sizes}")
    return tracker.peak, tracker.peak_op


def check() -> None:
    """Traced peak of one network call against pid_core.memory.call_phases, over sizes, dtypes and variants."""
    from pid_core.config import released
    from pid_core.memory import call_phases

    sizes = ((512, 512), (1024, 1024), (1024, 2048), (2048, 2048), (4096, 4096))
    cases = [(v, h, w, fp32, chunked, 1) for v in ("flux_2k", "flux2_2kto4k_v1pt5") for (h, w) in sizes
             for fp32 in (False, True) for chunked in (True, False)]
    cases += [("flux_2k", 1024, 1024, False, True, 3), ("flux_2k", 2048, 1536, False, True, 2)]
    worst = 0.0
    for variant, h, w, fp32, chunked, b in cases:
        if h * w > 2048 * 2048 and not chunked:
            continue
        traced, _ = trace(variant, h, w, fp32=fp32, chunked=chunked, batch=b)
        dtype = torch.float32 if fp32 else torch.bfloat16
        phases = call_phases(released(variant).network, h, w, items=b, compute_dtype=dtype,
                             pixel_chunk=4096 if chunked else None)
        est = max(phases.values())
        worst = max(worst, abs(est / traced - 1))
        print(f"{variant:20s} {h:4d}x{w:<4d} b{b} {'fp32' if fp32 else 'bf16'} {'chunked' if chunked else 'whole  '} "
              f"traced {traced / 2**30:6.3f} GiB  estimate {est / 2**30:6.3f} GiB  ratio {est / traced:5.3f}")
    print(f"worst deviation {worst:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--variant", default="flux_2k")
    parser.add_argument("--fp32", action="store_true", help="fp32 weights and compute (default: bf16 autocast)")
    parser.add_argument("--unchunked", action="store_true")
    parser.add_argument("--check", action="store_true", help="compare traces with pid_core.memory over many cases")
    args = parser.parse_args()
    if args.check:
        return check()
    for size in args.size:
        peak, op = trace(args.variant, size, size, fp32=args.fp32, chunked=not args.unchunked, verbose=True)
        print(f"{size:5d} px: peak live activations {peak / 2**30:7.3f} GiB  ({peak / size**2:6.1f} B/px) at {op}")


if __name__ == "__main__":
    main()
