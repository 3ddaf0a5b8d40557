"""Parity with the official PiD implementation, on golden data it produced (tests/data/golden/README.md says how:
the official network and student sampler run on the CPU with random narrow-width weights).

Every golden run stores its inputs, each sampler step's network input/output, and the final output, so the
network is checked call by call and the sampler end to end. Each comparison is a function that returns what
differs beyond the rules of ``comparison.py``: the parity tests assert that nothing does, and the planted-bug
tests at the end assert that the very same function finds each known fidelity bug.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from pathlib import Path

import planted_bugs
import pytest
import torch
from comparison import BF16, FP32, Rule, relative_l2
from safetensors import safe_open

from pid_core.api import build_network, decode
from pid_core.checkpoint import LoadedCheckpoint, canonical_state_dict, inspect_state_dict
from pid_core.config import LatentSpace
from pid_core.latents import latent_format
from pid_core.network import PiDNetwork
from pid_core.sampler import sample

GOLDEN = Path(__file__).parent.parent / "data" / "golden"
RUNS = sorted(p.name for p in GOLDEN.glob("*__s*.safetensors") if "bf16" not in p.name)
FOUR_STEP_RUNS = [r for r in RUNS if "__s4" in r]
SEED = 42  # the golden runs' sampling seed (README)


def read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@cache
def golden(run: str) -> dict[str, torch.Tensor]:
    return read(GOLDEN / run)


@cache
def network(variant: str, dtype: torch.dtype = torch.float32) -> PiDNetwork:
    """Our network built from the golden weights file, variant detected from the weights as for any file."""
    path = GOLDEN / f"{variant}.weights.safetensors"
    tensors, layout = canonical_state_dict(read(path))
    info = inspect_state_dict(tensors, path, layout)
    return build_network(LoadedCheckpoint(info, tensors), dtype)


def variant_of(run: str) -> str:
    return run.split("__")[0]


def inputs(g: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return g["inputs.caption_embs"], g["inputs.lq_latent"], g["inputs.degrade_sigma"]


Pairs = list[tuple[str, torch.Tensor, torch.Tensor]]  # (what, ours, the reference's)


def differences(rule: Rule, pairs: Pairs) -> list[str]:
    return [f"{what}: {', '.join(found)}" for what, actual, expected in pairs if (found := rule.failures(actual, expected))]


# --- the comparisons -----------------------------------------------------------------------------------------


def network_calls(run: str) -> Pairs:
    """Our network on each step's inputs of the golden run, and the reference's velocity (fp32)."""
    g = golden(run)
    net = network(variant_of(run))
    caption, latent, sigma = inputs(g)
    steps = len([k for k in g if k.endswith(".v_pred")])
    with torch.inference_mode():
        return [(f"step {k}", net(g[f"step{k}.x_t"], g[f"step{k}.t_scaled"], caption, latent, sigma), g[f"step{k}.v_pred"])
                for k in range(steps)]  # fmt: skip


def sampler_outputs(run: str, steps: int) -> Pairs:
    """Our sampler around our network, from our own noise draw, and the reference's outputs (fp32)."""
    g = golden(run)
    net = network(variant_of(run))
    caption, latent, sigma = inputs(g)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return net(x, t, caption, latent, sigma)

    noise = torch.randn(g["inputs.noise"].shape, generator=torch.Generator().manual_seed(SEED))
    out = sample(denoise, g["inputs.noise"].shape, seed=SEED, steps=steps)
    return [("initial noise", noise, g["inputs.noise"]), ("unclamped output", out, g["output.x0_unclamped"]),
            ("clamped output", out.clamp(-1, 1), g["output.sample"])]  # fmt: skip


# Latent statistics as the official code writes them, typed in from it: (shift, scale, std, frame) of
# raw = state * std / scale + shift. Flux.1 and SDXL: pid/_src/tokenizers/flux_vae.py and sdxl_vae.py; Flux.2's
# ComfyUI LATENT is already normalized; Qwen-Image (Wan 2.1 VAE): pid/_src/tokenizers/qwenimage_vae.py,
# _LATENTS_MEAN and _LATENTS_STD (the same values as ComfyUI's Wan21 latent format).
QWENIMAGE_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                  0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)  # fmt: skip
QWENIMAGE_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)  # fmt: skip
OFFICIAL_FORMATS = {
    "flux": (0.1159, 0.3611, 1.0, "flow"),
    "sdxl": (0.0, 0.13025, 1.0, "vp"),
    "flux2": (0.0, 1.0, 1.0, "flow"),
    "qwenimage": (QWENIMAGE_MEAN, 1.0, QWENIMAGE_STD, "flow"),
}


def comfy_latent(z: torch.Tensor, space: str, sigma: torch.Tensor) -> torch.Tensor:
    """What a ComfyUI sampler hands over for network latent z at PiD sigma: the inverse of our convention."""
    shift, scale, std, frame = OFFICIAL_FORMATS[space]
    per_channel = [torch.tensor(v, dtype=torch.float64).reshape(-1, 1, 1) for v in (shift, std)]
    s = sigma.view(-1, 1, 1, 1).double()
    sampler_state = z.double() / ((1 - s) if frame == "flow" else torch.sqrt(1 - s**2))
    return (sampler_state * per_channel[1] / scale + per_channel[0]).float()


def qwenimage_statistics_differences() -> list[str]:
    """Our Qwen-Image latent format against the official statistics, channel by channel."""
    fmt = latent_format(LatentSpace.QWENIMAGE)
    found = [f"scale {fmt.scale}, the reference 1.0"] if fmt.scale != 1.0 else []
    for name, ours, official in (("mean", fmt.shift, QWENIMAGE_MEAN), ("std", fmt.std, QWENIMAGE_STD)):
        found += [f"channel {c} {name} {a}, the reference {b}" for c, (a, b) in enumerate(zip(ours, official)) if a != b]
    return found


def public_decode(run: str, space: str) -> Pairs:
    """A ComfyUI-convention latent -> decode(), and the reference's picture (conventions and sampler together)."""
    g = golden(run)
    caption, latent, sigma = inputs(g)
    image = decode(network(variant_of(run)), comfy_latent(latent, space, sigma), space=space, sigma=sigma,
                   caption=caption, seed=SEED)  # fmt: skip
    return [("picture", image, g["output.sample"])]


BF16_RUN = "flux_2k__64x64__s4__bf16.safetensors"


def bf16_inputs() -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    g = golden(BF16_RUN)
    caption, latent, sigma = inputs(g)
    return g, caption, latent.to(torch.bfloat16).float(), sigma  # the reference rounds the latent through bf16


def bf16_mode() -> Pairs:
    """Our bf16 mode (bf16 weights, bf16 autocast), and the reference's bf16 autocast run on the same weights."""
    g, caption, latent, sigma = bf16_inputs()
    net = network("flux_2k", torch.bfloat16)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        calls = [(f"step {k}", net(g[f"step{k}.x_t"], g[f"step{k}.t_scaled"], caption, latent, sigma).float(), g[f"step{k}.v_pred"])
                 for k in range(4)]  # fmt: skip
    image = decode(net, comfy_latent(latent, "flux", sigma), space="flux", sigma=sigma, caption=caption, seed=SEED)
    return [*calls, ("picture", image, g["output.sample"])]


BF16_DTYPES = GOLDEN / "flux_2k__64x64__bf16_dtypes.json"
# Reference modules with no twin here that compute nothing (dropout at inference, identities) or that sit inside
# one of ours (the MLP's GELU).
NO_TWIN_NEEDED = {"Dropout", "Identity", "GELU"}
# Module boundaries drawn elsewhere, the same roundings: the reference adds the fp32 pixel position embedding
# inside its pixel embedder (so it returns fp32), ours right after it.
OTHER_BOUNDARY = {"pixel_embedder"}


def bf16_rounding_point_differences() -> list[str]:
    """The dtype each module returns in our bf16 mode against the reference's bf16 run (first network call).

    Where a module returns fp32 or bf16 is where the network rounds; this is exact on every machine, unlike
    the bf16 numbers themselves (see comparison.BF16). Modules are matched by name (ours follow the
    official module tree), and every reference module that computes something must have a twin here.
    """
    reference = json.loads(BF16_DTYPES.read_text())
    g, caption, latent, sigma = bf16_inputs()
    net = network("flux_2k", torch.bfloat16)
    ours: dict[str, list[str | None]] = {}

    def record(name: str):
        def hook(module, args, output):
            outputs = output if isinstance(output, (tuple, list)) else [output]
            ours.setdefault(name, [str(o.dtype) if torch.is_tensor(o) else None for o in outputs])
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in net.named_modules() if name]
    try:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            ours["__output__"] = [str(net(g["step0.x_t"], g["step0.t_scaled"], caption, latent, sigma).dtype)]
    finally:
        for h in handles:
            h.remove()
    modules = {name: entry for name, entry in reference.items() if name != "__meta__" and entry["dtypes"] is not None}
    names = {name for name, _ in net.named_modules()}
    found = [f"{name} ({entry['class']}): no module of that name here" for name, entry in modules.items()
             if name not in names and entry["class"] not in NO_TWIN_NEEDED]  # fmt: skip
    found += [f"{name}: returns {ours[name]}, the reference {entry['dtypes']}" for name, entry in modules.items()
              if name in ours and name not in OTHER_BOUNDARY and ours[name] != entry["dtypes"]]  # fmt: skip
    if ours["__output__"] != (want := reference["__meta__"]["final_output"]["dtypes"]):
        found.append(f"the network returns {ours['__output__']}, the reference {want}")
    return found


# --- the parity tests ----------------------------------------------------------------------------------------


def test_golden_set_covers_the_required_variants():
    variants = {variant_of(r) for r in FOUR_STEP_RUNS}
    assert variants == {"flux_2k", "sdxl_2kto4k", "flux2_2k", "siglip_2k", "flux_2kto4k_v1pt5", "flux2_2kto4k_v1pt5",
                        "qwenimage_2kto4k_v1pt5"}  # fmt: skip
    non_square = {variant_of(r) for r in FOUR_STEP_RUNS if r.split("__")[1].split("x")[0] != r.split("__")[1].split("x")[1]}
    assert non_square == variants - {"siglip_2k"}  # SigLIP's 8x output makes even a 1x2 latent 256 px wide


@pytest.mark.parametrize("run", FOUR_STEP_RUNS)
def test_network_matches_reference_call_by_call(run):
    assert differences(FP32, network_calls(run)) == []


SAMPLER_RUNS = [
    ("flux_2k__64x64__s1.safetensors", 1),
    ("flux_2k__64x64__s2.safetensors", 2),
    ("flux_2k__64x64__s3.safetensors", 3),
    ("flux_2k__64x64__s4.safetensors", 4),
    ("flux_2k__64x64__s4__sigma0.safetensors", 4),
    ("flux_2k__64x64__s4__b2.safetensors", 4),  # two items, each with its own sigma (0.1, 0.5)
    ("flux_2k__64x64__s4__faint.safetensors", 4),  # a latent at 1/100 of the usual scale
    ("sdxl_2kto4k__64x64__s1.safetensors", 1),
    ("sdxl_2kto4k__64x64__s2.safetensors", 2),
    ("sdxl_2kto4k__64x64__s3.safetensors", 3),
    ("sdxl_2kto4k__64x64__s4.safetensors", 4),
    ("flux2_2kto4k_v1pt5__64x64__s1.safetensors", 1),
    ("flux2_2kto4k_v1pt5__64x64__s2.safetensors", 2),
    ("flux2_2kto4k_v1pt5__64x64__s3.safetensors", 3),
    ("flux2_2kto4k_v1pt5__64x128__s4.safetensors", 4),
    ("qwenimage_2kto4k_v1pt5__64x64__s1.safetensors", 1),
    ("qwenimage_2kto4k_v1pt5__64x128__s4.safetensors", 4),
]


@pytest.mark.parametrize("run, steps", SAMPLER_RUNS)
def test_sampler_matches_reference_end_to_end(run, steps):
    assert differences(FP32, sampler_outputs(run, steps)) == []


def test_one_step_is_a_single_call_at_t_1000():
    g = golden("flux_2k__64x64__s1.safetensors")
    assert g["step0.t_scaled"].tolist() == [1000.0]
    net = network("flux_2k")
    caption, latent, sigma = inputs(g)
    with torch.inference_mode():
        v = net(g["inputs.noise"], torch.tensor([1000.0]), caption, latent, sigma)
    FP32.check(g["inputs.noise"] - v, g["output.x0_unclamped"])


PUBLIC_DECODE_RUNS = [
    ("flux_2k__64x64__s4__b2.safetensors", "flux"),
    ("sdxl_2kto4k__32x64__s4.safetensors", "sdxl"),
    ("flux2_2kto4k_v1pt5__64x64__s4.safetensors", "flux2"),
    ("qwenimage_2kto4k_v1pt5__64x128__s4.safetensors", "qwenimage"),
]


@pytest.mark.parametrize("run, space", PUBLIC_DECODE_RUNS)
def test_public_decode_matches_reference(run, space):
    assert differences(FP32, public_decode(run, space)) == []


def test_qwenimage_statistics_are_the_official_ones_in_every_channel():
    assert len(latent_format(LatentSpace.QWENIMAGE).std) == 16
    assert qwenimage_statistics_differences() == []


def test_bf16_mode_follows_the_reference_bf16_run():
    fp32, bf16 = golden("flux_2k__64x64__s4.safetensors"), golden(BF16_RUN)
    assert relative_l2(bf16["step0.v_pred"], fp32["step0.v_pred"]) > 5e-3  # the reference's bf16 run is its own
    assert differences(BF16, bf16_mode()) == []


def test_bf16_mode_rounds_where_the_reference_rounds():
    assert bf16_rounding_point_differences() == []


# --- the comparisons see known bugs ------------------------------------------------------------------------

# Each known bug with the comparison that must see it: (bug, rule or None for an exact comparison, what to compare)
PLANTED: list[tuple[Callable, Rule | None, Callable]] = [
    (planted_bugs.timestep_period_10000, FP32, lambda: network_calls("flux_2k__64x64__s4.safetensors")),
    (planted_bugs.rope_integer_positions, FP32, lambda: network_calls("flux2_2kto4k_v1pt5__64x128__s4.safetensors")),
    (planted_bugs.gate_sigma_term_dropped, FP32, lambda: network_calls("sdxl_2kto4k__64x64__s4.safetensors")),
    (planted_bugs.latent_flow_frame_dropped, FP32, lambda: public_decode(*PUBLIC_DECODE_RUNS[0])),
    (planted_bugs.latent_sdxl_frame_dropped, FP32, lambda: public_decode(*PUBLIC_DECODE_RUNS[1])),
    (planted_bugs.renoise_from_a_fresh_generator, FP32, lambda: sampler_outputs("flux_2k__64x64__s4.safetensors", 4)),
    (planted_bugs.lq_groupnorm_eps_1e6, FP32, lambda: network_calls("flux_2k__64x64__s4__faint.safetensors")),
    (planted_bugs.lq_groupnorm_eps_1e6, FP32, lambda: network_calls("flux2_2kto4k_v1pt5__64x64__s4__faint.safetensors")),
    (planted_bugs.rmsnorm_returns_bf16, None, bf16_rounding_point_differences),
    (planted_bugs.qwenimage_std_typo, FP32, lambda: public_decode(*PUBLIC_DECODE_RUNS[3])),
    (planted_bugs.qwenimage_std_typo, None, qwenimage_statistics_differences),
]


def found_under(bug: Callable, rule: Rule | None, comparison: Callable) -> list[str]:
    with bug():
        result = comparison()
    return result if rule is None else differences(rule, result)


@pytest.mark.parametrize("bug, rule, comparison", PLANTED, ids=[f"{i}-{bug.__name__}" for i, (bug, *_) in enumerate(PLANTED)])
def test_the_parity_comparisons_see_planted_bugs(bug, rule, comparison):
    assert found_under(bug, rule, comparison), f"{bug.__name__} went unnoticed"
