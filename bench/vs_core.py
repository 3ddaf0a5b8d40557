"""This pack against ComfyUI's built-in PiD, side by side in ComfyUI 0.33: time, peak memory and fidelity.

    python bench/vs_core.py [--sizes 512 1024] [--size-of generation|output] [--repeats 2] [--json out.json]
    python bench/vs_core.py --quick        # 256 px only, 1 run per setup: checks the script end to end

Both decode the same random full-size Flux 2k PiD file (the official key layout of
``tests/data/checkpoint_keys/flux_2k.tsv``, bf16, 2.7 GB, written once into ``$PID_BENCH_CACHE``, default
``~/.cache/pid-bench``, and linked into the server's ``models/diffusion_models``), the same latent and the same
caption, 4 steps, seed 1, on the CPU. Four setups, each run in a fresh ComfyUI 0.33 server (``.comfyui-0.33``,
``.venv-comfyui-0.33``, as ``scripts/setup_env.sh --comfyui 0.33`` makes them), interleaved run by run:

* this pack, bf16 / fp32: Load PiD Decoder (weight_dtype) -> PiD Decode (size native 4x);
* core, ``--bf16-unet`` / ``--fp32-unet``: core's template graph (``utility_pid_latent_upscale_dit``): UNETLoader ->
  PiDConditioning (flux, degrade_sigma) -> SamplerCustom (lcm, BasicScheduler simple, 4 steps, cfg 1, negative =
  ConditioningZeroOut of the caption) on EmptyChromaRadianceLatentImage at 4x -> VAEDecode with ``pixel_space``.

The caption is a random [1, 300, 2304] conditioning and the latent a random Flux latent (unit variance after
Flux's latent scaling), both read from one file by ``bench/vs_core_nodes.py``, which is dropped into the server's
custom_nodes for the run (core's own caption path needs Gemma-2-2B, which a random network gains nothing from).

Per run: the decode time, from the server's clock, from the moment the model loader has finished to the moment
the picture reaches the output node (the load of the file is left out for both, and shown apart; the pack's bf16
loader maps the file and its first network call reads the pages, from the page cache, so that stays in); the peak
resident memory of the server process (VmHWM in /proc/<pid>/status, reset after start) above its idle resident
memory. Time is the best of ``--repeats``, memory the highest.

Fidelity: both outputs against a reference decode made by the benchmark before the servers start (pid_core, fp32
weights and compute, whole picture: the reference implementation, proven equal to the official code by the test
suite), as PSNR and relative L2. Core samples with its own schedule (shift 1.5 on the simple scheduler, close to
PiD's timesteps, not equal) and draws its re-noising from a fresh generator, so at 4 steps its pictures differ
from the reference's by noise as well; the reference decoded with another seed shows how far noise alone goes.
At 1 step both start from the same noise at t = 1 and take one step, so the network and the latent handling alone
differ: a clean latent, and an early-exit latent at sigma 0.25 as a stock sampler returns it (divided by
1 - sigma; PiD's network expects the latent times 1 - sigma, which this pack applies).

``--sizes`` are the sides of the latent's picture (``--size-of generation``, the default: 512 means a 512 px
generation, decoded to 2048 px) or of PiD's output (``--size-of output``: 512 means a 512 px picture from a
128 px generation). With random weights the pictures show numerical agreement only.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import ROOT, psnr
from decode_bench import GIB, load, machine
from safetensors.torch import load_file, save_file

from pid_core.api import PiDDecoder
from pid_core.latents import latent_format

sys.path.insert(0, str(ROOT / "tests" / "core"))
from tiny import random_official_weights  # noqa: E402 (the tests' random checkpoints in the official layout)

COMFYUI_DIR = ROOT / ".comfyui-0.33" / "ComfyUI"
SERVER_PYTHON = ROOT / ".venv-comfyui-0.33" / "bin" / "python"
KEYS = ROOT / "tests" / "data" / "checkpoint_keys" / "flux_2k.tsv"
NODES_FILE = Path(__file__).resolve().parent / "vs_core_nodes.py"
CACHE = Path(os.environ.get("PID_BENCH_CACHE", Path.home() / ".cache" / "pid-bench"))
# "pid" in the name: the pack lists the files of diffusion_models whose name says PiD, as Comfy-Org's repacks do
CHECKPOINT = "pid-bench-random-flux_2k_bf16.safetensors"
WEIGHT_SEED = 0
SEED = 1  # of the inputs and of the decodes' noise
STEPS = 4
EARLY_SIGMA = 0.25
SR = 32  # output pixels per Flux latent cell: 8 px of the generation, drawn 4x
CAPTION_SHAPE = (1, 300, 2304)  # PiD's caption: 300 positions of Gemma-2-2B's width
START_TIMEOUT = 300.0


@dataclass(frozen=True)
class Setup:
    label: str
    side: str  # "pack" or "core"
    dtype: str  # the pack's weight_dtype; for core, what its server flag asks for
    flags: tuple[str, ...] = ()


SETUPS = (
    Setup("this pack, bf16", "pack", "bf16"),
    Setup("core, --bf16-unet", "core", "bf16", ("--bf16-unet",)),
    Setup("this pack, fp32", "pack", "fp32"),
    Setup("core, fp32", "core", "fp32", ("--fp32-unet",)),  # the CPU default, asked for explicitly
)


# --------------------------------------------------------------------------- the random checkpoint


def checkpoint() -> Path:
    """The random full-size Flux 2k file in the cache (tests/core/tiny.py's random_official_weights), written when
    missing or made by another recipe."""
    path = CACHE / CHECKPOINT
    recipe = {"keys_sha256": hashlib.sha256(KEYS.read_bytes()).hexdigest(), "seed": WEIGHT_SEED, "rule": 1}
    stamp = path.with_suffix(".json")
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == {**recipe, "bytes": path.stat().st_size}:
        return path
    print(f"writing the random checkpoint {path} (2.7 GB, once) ...", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    weights = random_official_weights(KEYS, WEIGHT_SEED)
    save_file(weights, str(path) + ".tmp")
    del weights
    os.replace(str(path) + ".tmp", path)
    stamp.write_text(json.dumps({**recipe, "bytes": path.stat().st_size}))
    return path


# --------------------------------------------------------------------------- inputs and the reference


def raw_flux_latent(z: torch.Tensor) -> torch.Tensor:
    """The ComfyUI LATENT (raw VAE space) whose Flux ``process_in`` is ``z``."""
    fmt = latent_format("flux")
    return z / fmt.scale + fmt.shift


def make_inputs(sizes: list[int]) -> dict[str, torch.Tensor]:
    """Per output side a clean latent and the early-exit latent made from it; one caption."""
    gen = torch.Generator().manual_seed(SEED)
    tensors = {"caption": 0.1 * torch.randn(CAPTION_SHAPE, generator=gen)}
    for size in sizes:
        z = torch.randn(1, 16, size // SR, size // SR, generator=gen)
        noisy = (1 - EARLY_SIGMA) * z + EARLY_SIGMA * torch.randn(z.shape, generator=gen)
        tensors[f"clean_{size}"] = raw_flux_latent(z)
        tensors[f"early_{size}"] = raw_flux_latent(noisy / (1 - EARLY_SIGMA))  # as a stock sampler returns it
    return tensors


@dataclass(frozen=True)
class Decode:
    """One decode of the comparison: which latent, at which sigma, how many steps, which seed."""

    name: str
    size: int
    latent: str
    sigma: float
    steps: int
    seed: int = SEED

    @property
    def key(self) -> str:
        return f"{self.name} | {self.size} | {self.seed}"


def decodes(sizes: list[int]) -> list[Decode]:
    """What each setup decodes: 4 steps at every size (timed); 1 step, clean and early exit, at the smallest."""
    main = [Decode(f"{STEPS} steps", s, f"clean_{s}", 0.0, STEPS) for s in sizes]
    small = min(sizes)
    return main + [Decode("1 step, clean", small, f"clean_{small}", 0.0, 1),
                   Decode(f"1 step, sigma {EARLY_SIGMA:g}", small, f"early_{small}", EARLY_SIGMA, 1)]  # fmt: skip


def noise_floor(wanted: list[Decode]) -> dict[Decode, Decode]:
    """Each 4-step decode with another seed, for the distance that noise alone makes."""
    return {d: Decode("noise floor", d.size, d.latent, d.sigma, d.steps, SEED + 1) for d in wanted if d.steps == STEPS}


def reference(path: Path, tensors: dict[str, torch.Tensor], wanted: list[Decode]) -> dict[str, torch.Tensor]:
    """pid_core's fp32 decodes (whole pictures) by key, the noise floor's among them."""
    decoder = PiDDecoder.load(path, space="flux", precision="fp32")
    images = {}
    for d in wanted + list(noise_floor(wanted).values()):
        start = time.perf_counter()
        try:
            images[d.key] = decoder.decode(tensors[d.latent], sigma=d.sigma, caption=tensors["caption"],
                                           size="native", steps=d.steps, seed=d.seed, compute_dtype=torch.float32,
                                           tiling="off")  # fmt: skip
        except MemoryError as error:  # refused before allocating: no reference at this size
            print(f"  reference {d.name} at {d.size} px: none ({error})", flush=True)
            continue
        print(f"  reference {d.name}, seed {d.seed}, {d.size} px: {time.perf_counter() - start:.1f} s", flush=True)
    return images


def prepare(workdir: Path) -> None:
    """The worker process (its memory is freed when it ends): the checkpoint, the inputs file, the references."""
    outputs = json.loads((workdir / "job.json").read_text())["outputs"]
    path = checkpoint()
    print(f"checkpoint: {path} (cached; delete it to free {path.stat().st_size / 1e9:.1f} GB)", flush=True)
    tensors = make_inputs(outputs)
    save_file(tensors, str(workdir / "inputs.safetensors"))
    print("reference decodes (pid_core, fp32, whole picture):", flush=True)
    save_file(reference(path, tensors, decodes(outputs)), str(workdir / "references.safetensors"))


def run_prepare(workdir: Path, outputs: list[int]) -> dict[Decode, torch.Tensor]:
    (workdir / "job.json").write_text(json.dumps({"outputs": outputs}))
    env = dict(os.environ, PYTHONWARNINGS="ignore")  # the training-range warning of small outputs
    subprocess.run([sys.executable, __file__, "--prepare", str(workdir)], check=True, env=env)
    saved = load_file(str(workdir / "references.safetensors"))
    wanted = decodes(outputs)
    return {d: saved[d.key] for d in wanted + list(noise_floor(wanted).values()) if d.key in saved}


def agreement(image: torch.Tensor, ref: torch.Tensor) -> dict:
    """PSNR (pictures in [0, 1]) and relative L2 (in the sampler's [-1, 1]) of ``image`` against ``ref``."""
    return {"psnr": psnr(image, ref), "rel_l2": ((image - ref).norm() / ref.norm()).item()}


# --------------------------------------------------------------------------- a ComfyUI server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_server_process() -> None:
    """Runs in the server process before exec: SIGINT works (a shell that started the benchmark in the background
    leaves it ignored), and the server is SIGTERMed if the benchmark dies, even by SIGKILL (Linux)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def proc_status_kib(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field_name}")


def make_base(base: Path, checkpoint_path: Path) -> None:
    """custom_nodes with the pack and the benchmark's nodes, the checkpoint linked into diffusion_models."""
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "comfyui-pid").symlink_to(ROOT, target_is_directory=True)
    (base / "custom_nodes" / "pid_bench_nodes.py").symlink_to(NODES_FILE)
    for folder in ("models/diffusion_models", "models/pid", "input", "output", "temp", "user"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    (base / "models" / "diffusion_models" / CHECKPOINT).symlink_to(checkpoint_path)


class RunFailed(RuntimeError):
    """A server that did not start, a prompt that failed, a server that died: the run is reported, the others go on."""


@dataclass
class Server:
    """One ComfyUI 0.33 server on a free loopback port, with its own base directory."""

    base: Path
    flags: tuple[str, ...]
    process: subprocess.Popen | None = None
    url: str = ""
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def start(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        command = [str(SERVER_PYTHON), "-u", "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                   "--base-directory", str(self.base), "--database-url", f"sqlite:///{self.base / 'comfyui.db'}",
                   "--disable-auto-launch", "--disable-api-nodes", "--preview-method", "none", *self.flags]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", PID_CACHE_DIR=str(self.base / "pid-cache"))
        env.pop("PYTHONPATH", None)
        with open(self.base / "comfyui.log", "wb") as log_file:
            self.process = subprocess.Popen(command, cwd=COMFYUI_DIR, env=env, stdin=subprocess.DEVNULL,
                                            stdout=log_file, stderr=subprocess.STDOUT,
                                            preexec_fn=prepare_server_process)
        self._wait_until_up()

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            self._check_alive("during start-up")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2):
                    return
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                time.sleep(0.3)
        raise RunFailed(f"ComfyUI did not answer within {START_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def _check_alive(self, when: str) -> None:
        if self.process.poll() is not None:
            code = self.process.returncode
            why = " (killed: out of memory?)" if code in (-9, 137) else ""
            raise RunFailed(f"ComfyUI exited with code {code}{why} {when}:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)  # ComfyUI's clean shutdown
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)

    def log(self) -> str:
        return (self.base / "comfyui.log").read_text(errors="replace")

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def _call(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as error:
            raise RunFailed(f"{path}: HTTP {error.code}: {error.read()[:2000].decode(errors='replace')}") from None

    def run(self, prompt: dict, timeout: float) -> dict:
        """Queue ``prompt`` and wait for it; its /history entry, or RunFailed."""
        prompt_id = self._call("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self._call(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") != "success":
                    raise RunFailed(failure(entry))
                return entry
            self._check_alive("while decoding")
            time.sleep(0.25)
        raise RunFailed(f"not finished after {timeout:.0f} s")

    def memory_kib(self, name: str) -> int:
        return proc_status_kib(self.process.pid, name)

    def reset_peak(self) -> None:
        """Reset VmHWM to the current resident memory (Linux: 5 > clear_refs); without it, the start-up peak stays."""
        try:
            Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
        except OSError:
            pass


def failure(entry: dict) -> str:
    for name, data in entry.get("status", {}).get("messages", []):
        if name == "execution_error":
            return f"node {data.get('node_type')}: {data.get('exception_type')}: {data.get('exception_message')}"
    return json.dumps(entry.get("status", {}))[:1000]


def event_time(entry: dict, event: str) -> float:
    """The server's time (seconds) of an execution event of a /history entry."""
    for name, data in entry["status"]["messages"]:
        if name == event:
            return data["timestamp"] / 1000
    raise KeyError(event)


# --------------------------------------------------------------------------- the two graphs


def node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def core_graph(d: Decode, inputs: Path, clock: Path, out: Path) -> dict:
    """Core's template: UNETLoader, PiDConditioning, SamplerCustom (lcm, simple), VAEDecode with pixel_space."""
    return {
        "in": node("PiDBenchInputs", path=str(inputs), latent_key=d.latent),
        "unet": node("UNETLoader", unet_name=CHECKPOINT, weight_dtype="default"),
        "clock": node("PiDBenchClock", value=["unet", 0], path=str(clock)),
        "positive": node("PiDConditioning", positive=["in", 1], latent=["in", 0], latent_format="flux",
                         degrade_sigma=d.sigma),  # fmt: skip
        "negative": node("ConditioningZeroOut", conditioning=["in", 1]),
        "sampler": node("KSamplerSelect", sampler_name="lcm"),
        "sigmas": node("BasicScheduler", model=["clock", 0], scheduler="simple", steps=d.steps, denoise=1.0),
        "pixels": node("EmptyChromaRadianceLatentImage", width=d.size, height=d.size, batch_size=1),
        "sample": node("SamplerCustom", model=["clock", 0], add_noise=True, noise_seed=d.seed, cfg=1.0,
                       positive=["positive", 0], negative=["negative", 0], sampler=["sampler", 0],
                       sigmas=["sigmas", 0], latent_image=["pixels", 0]),  # fmt: skip
        "vae": node("VAELoader", vae_name="pixel_space"),
        "decode": node("VAEDecode", samples=["sample", 0], vae=["vae", 0]),
        "save": node("PiDBenchSave", image=["decode", 0], path=str(out)),
    }


def pack_graph(d: Decode, weight_dtype: str, inputs: Path, clock: Path, out: Path) -> dict:
    """Load PiD Decoder -> PiD Decode, the caption connected (used as it is: PiD's [1, 300, 2304] layout)."""
    return {
        "in": node("PiDBenchInputs", path=str(inputs), latent_key=d.latent),
        "load": node("PixelDecoderPiD_LoadDecoder", pid_name=CHECKPOINT, latent_space="flux",
                     weight_dtype=weight_dtype, vae_name="none"),  # fmt: skip
        "clock": node("PiDBenchClock", value=["load", 0], path=str(clock)),
        "decode": node("PixelDecoderPiD_Decode", pid_decoder=["clock", 0], latent=["in", 0], size="native 4x",
                       steps=d.steps, seed=d.seed, sigma=d.sigma, latent_space="flux", caption=["in", 1]),  # fmt: skip
        "save": node("PiDBenchSave", image=["decode", 0], path=str(out)),
    }


def graph(setup: Setup, d: Decode, inputs: Path, clock: Path, out: Path) -> dict:
    if setup.side == "core":
        return core_graph(d, inputs, clock, out)
    return pack_graph(d, setup.dtype, inputs, clock, out)


# --------------------------------------------------------------------------- one run


def saved_image(out: Path) -> torch.Tensor:
    """A saved IMAGE [B, H, W, 3] in [0, 1] as the sampler's [B, 3, H, W] in [-1, 1]."""
    return load_file(str(out))["image"].permute(0, 3, 1, 2) * 2 - 1


def decode_in(server: Server, setup: Setup, d: Decode, inputs: Path, timeout: float) -> tuple[dict, torch.Tensor]:
    """Run one decode prompt; its timings and picture."""
    tag = uuid.uuid4().hex[:8]
    clock, out = server.base / f"clock-{tag}.json", server.base / f"image-{tag}.safetensors"
    entry = server.run(graph(setup, d, inputs, clock, out), timeout)
    loaded = json.loads(clock.read_text())  # the clock runs in every prompt (its path is new), the loader once
    arrived = json.loads(Path(str(out) + ".json").read_text())["time"]
    start = event_time(entry, "execution_start")
    timing = {"seconds": arrived - loaded["time"], "load_seconds": loaded["time"] - start,
              "prompt_seconds": event_time(entry, "execution_success") - start,
              "dtypes": {k: loaded[k] for k in ("weights", "compute") if k in loaded}}  # fmt: skip
    image = saved_image(out)
    out.unlink()
    return timing, image


def plan_line(log_text: str) -> str | None:
    """The pack's decode plan from the server's console (pid_core logs it before each decode)."""
    lines = [ln.split("PiD decode: ", 1)[1] for ln in log_text.splitlines() if "PiD decode: " in ln]
    plans = [ln for ln in lines if not ln.startswith("size auto")]
    return plans[-1].strip() if plans else None


@dataclass
class Context:
    """What every run shares: the work folder, the checkpoint, the inputs file, the reference pictures."""

    workdir: Path
    checkpoint: Path
    inputs: Path
    refs: dict[Decode, torch.Tensor]
    timeout: float


def extra_images(server: Server, setup: Setup, extra: list[Decode], ctx: Context, result: dict) -> dict:
    """The fidelity-only decodes in a server that has its model loaded; a failure is noted, the timing kept."""
    images = {}
    try:
        for d in extra:
            images[d] = decode_in(server, setup, d, ctx.inputs, ctx.timeout)[1]
    except RunFailed as error:
        result["extra_error"] = str(error)
    return images


def one_run(setup: Setup, timed: Decode, extra: list[Decode], ctx: Context) -> dict:
    """A fresh server: the timed decode (memory read right after it), then ``extra`` decodes for fidelity only."""
    base = Path(tempfile.mkdtemp(prefix="run-", dir=ctx.workdir))
    server = Server(base, setup.flags)
    result: dict = {"setup": setup.label, "size": timed.size}
    try:
        make_base(base, ctx.checkpoint)
        server.start()
        time.sleep(1.0)  # settle after start-up
        server.reset_peak()
        idle = server.memory_kib("VmRSS")
        timing, image = decode_in(server, setup, timed, ctx.inputs, ctx.timeout)
        result |= timing | {"peak_bytes": (server.memory_kib("VmHWM") - idle) * 1024, "idle_bytes": idle * 1024}
        if setup.side == "pack":
            result["plan"] = plan_line(server.log())
        images = {timed: image, **extra_images(server, setup, extra, ctx, result)}
        result["fidelity"] = {d.name: agreement(img, ctx.refs[d]) for d, img in images.items() if d in ctx.refs}
    except RunFailed as error:
        result["error"] = str(error)
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- the report


def show_run(r: dict) -> None:
    if "error" in r:
        print(f"  {r['setup']:18s} {r['size']:5d} px  FAILED: {r['error'].splitlines()[0][:300]}", flush=True)
        return
    fid = "  ".join(f"{name}: {f['psnr']:.1f} dB" for name, f in r.get("fidelity", {}).items())
    print(f"  {r['setup']:18s} {r['size']:5d} px  {r['seconds']:8.1f} s (load {r['load_seconds']:5.1f} s)  "
          f"+{r['peak_bytes'] / GIB:5.2f} GiB  {fid}", flush=True)


def best(results: list[dict], label: str, size: int) -> dict | None:
    """A setup's best time and highest peak at one size, over its successful runs."""
    ok = [r for r in results if r["setup"] == label and r["size"] == size and "error" not in r]
    if not ok:
        return None
    return {"seconds": min(r["seconds"] for r in ok), "peak_bytes": max(r["peak_bytes"] for r in ok)}


def size_label(output: int, size_of: str) -> str:
    generation = output // 4
    return f"{generation} px -> {output} px" if size_of == "generation" else f"{output} px (from {generation} px)"


def print_table(results: list[dict], sizes: list[int], size_of: str) -> None:
    print(f"{'':18s} | " + " | ".join(f"{size_label(s, size_of):>22s}" for s in sizes))
    for setup in SETUPS:
        cells = []
        for size in sizes:
            b = best(results, setup.label, size)
            cells.append(f"{b['seconds']:.1f} s, +{b['peak_bytes'] / GIB:.1f} GiB" if b else "failed")
        print(f"{setup.label:18s} | " + " | ".join(f"{c:>22s}" for c in cells))
    print("time: the best decode of the runs, the file's load left out; memory: the highest peak resident memory of "
          "the server above its idle memory")
    for size in sizes:
        ratios = []
        for dtype in ("bf16", "fp32"):
            pack, core = (best(results, s.label, size) for s in SETUPS if s.dtype == dtype)
            if pack and core:
                ratios.append(f"{dtype} {core['seconds'] / pack['seconds']:.2f}x the time, "
                              f"{core['peak_bytes'] / pack['peak_bytes']:.2f}x the memory")  # fmt: skip
        print(f"core / this pack at {size} px: " + "; ".join(ratios or ["-"]))


def fidelity_of(results: list[dict], label: str, d: Decode) -> dict | None:
    for r in results:
        if r["setup"] == label and d.name in r.get("fidelity", {}) and r["size"] == d.size:
            return r["fidelity"][d.name]
    return None


def print_fidelity(results: list[dict], refs: dict[Decode, torch.Tensor], wanted: list[Decode]) -> None:
    print("\nfidelity against the reference (pid_core, fp32, whole picture): PSNR dB (relative L2)")
    shown = [d for d in wanted if d in refs]
    print(f"{'':18s} | " + " | ".join(f"{f'{d.name}, {d.size} px':>24s}" for d in shown))
    for setup in SETUPS:
        cells = [fidelity_of(results, setup.label, d) for d in shown]
        cells = [f"{f['psnr']:.1f} ({f['rel_l2']:.1e})" if f else "-" for f in cells]
        print(f"{setup.label:18s} | " + " | ".join(f"{c:>24s}" for c in cells))
    for d, other in noise_floor(wanted).items():
        if d in refs and other in refs:
            a = agreement(refs[other], refs[d])
            print(f"noise floor, {d.name} at {d.size} px: the reference with seed {other.seed} against seed {d.seed}: "
                  f"{a['psnr']:.1f} dB ({a['rel_l2']:.1e})")
    print(f"At {STEPS} steps core re-noises from a generator of its own (seeded noise_seed + 1) and steps through "
          "other timesteps: compare its figures with the noise floor. At 1 step both start from the same noise.")


def describe_dtypes(dtypes: dict) -> str:
    text = "weights " + "/".join(dtypes.get("weights", ["?"]))
    return text + (f", computed in {dtypes['compute']}" if dtypes.get("compute") else "")


def print_details(results: list[dict]) -> None:
    print("\nthe weights as loaded, the file's load in each run, the pack's plan:")
    for setup in SETUPS:
        runs = [r for r in results if r["setup"] == setup.label and "error" not in r]
        if runs:
            loads = ", ".join(f"{r['load_seconds']:.1f}" for r in runs)
            plan = f"; plan: {runs[0]['plan']}" if runs[0].get("plan") else ""
            print(f"  {setup.label:18s} {describe_dtypes(runs[0]['dtypes'])}; load {loads} s{plan}")
    for r in results:
        for what in ("error", "extra_error"):
            if what in r:
                print(f"  {r['setup']} at {r['size']} px failed{' (1-step decodes)' if what != 'error' else ''}:\n"
                      f"{r[what]}")


def machine_line() -> str:
    return f"{machine()}, {proc_meminfo_gib('MemTotal'):.0f} GiB RAM"


def proc_meminfo_gib(name: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def comfyui_version() -> str:
    text = (COMFYUI_DIR / "comfyui_version.py").read_text()
    return text.split("__version__ =", 1)[1].strip().strip("\"'") if "__version__ =" in text else "?"


def now(fmt: str = "%Y-%m-%d %H:%M %Z") -> str:
    return datetime.datetime.now().astimezone().strftime(fmt)


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="picture sides (see --size-of)")
    parser.add_argument("--size-of", choices=("generation", "output"), default="generation",
                        help="generation: --sizes are the latent's picture, PiD draws 4x; output: PiD's picture")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setup and size, each in a fresh server")
    parser.add_argument("--quick", action="store_true", help="256 px only, 1 run: checks the script end to end")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds one prompt may take")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)  # the worker process, see prepare()
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeats = [256], 1
    args.outputs = sorted({s * 4 if args.size_of == "generation" else s for s in args.sizes})
    if bad := [s for s in args.outputs if s % SR]:
        parser.error(f"output sides must be multiples of {SR} px (a Flux latent cell drawn 4x): {bad}")
    return args


def check_environment() -> None:
    missing = [str(p) for p in (COMFYUI_DIR / "main.py", SERVER_PYTHON, KEYS) if not p.exists()]
    if missing:
        sys.exit(f"missing: {', '.join(missing)}; run `bash scripts/setup_env.sh --comfyui 0.33` first")


def measure(args: argparse.Namespace, ctx: Context) -> list[dict]:
    """Every setup at every size, ``--repeats`` times, interleaved; fidelity from the first run of each."""
    wanted = decodes(args.outputs)
    extra = [d for d in wanted if d.steps != STEPS]
    results = []
    for size in args.outputs:
        timed = next(d for d in wanted if d.steps == STEPS and d.size == size)
        print(f"{size_label(size, args.size_of)}, {args.repeats} run(s) per setup:", flush=True)
        for repeat in range(args.repeats):
            for setup in SETUPS:
                more = extra if repeat == 0 and size == extra[0].size else []
                r = one_run(setup, timed, more, ctx)
                if repeat:
                    r.pop("fidelity", None)  # the same pictures every run
                results.append(r)
                show_run(r)
    return results


def main() -> None:
    args = parse_args()
    if args.prepare:
        return prepare(args.prepare)
    check_environment()
    print(f"PiD in ComfyUI {comfyui_version()}: this pack against core's PiD on random full-size Flux 2k weights "
          f"(numerical agreement only), {STEPS} steps, CPU")
    print(f"machine: {machine_line()}; {now()}; load average {load()}", flush=True)
    if max(args.outputs) > 2048:
        print(f"note: at {max(args.outputs)} px core decodes the whole picture with fp32 activations and may run out "
              "of memory (such a run is reported as failed); each decode takes hours on a CPU", flush=True)
    with tempfile.TemporaryDirectory(prefix="pid-vs-core-") as tmp:
        workdir = Path(tmp)
        refs = run_prepare(workdir, args.outputs)
        ctx = Context(workdir, CACHE / CHECKPOINT, workdir / "inputs.safetensors", refs, args.timeout)
        results = measure(args, ctx)
    print(f"\nResults, {now('%Y-%m-%d')}; {machine_line()}; ComfyUI {comfyui_version()}; load average at end {load()}")
    print_table(results, args.outputs, args.size_of)
    print_fidelity(results, refs, decodes(args.outputs))
    print_details(results)
    print(f"The random checkpoint stays in {CACHE} for the next run (delete it to free 2.7 GB); the servers' folders "
          "are gone.")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_line(), "date": now(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
