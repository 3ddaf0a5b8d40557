"""Prompts for the PiD nodes in the real test server, shared by the tests of tests/comfy: the tiny PiD checkpoints'
and VAE files' names (written by the ``pid_models`` fixture of this folder's conftest.py), a graph builder in
ComfyUI's API format, a tiny diffusion model of each family, and readers of the test pack's records.

This folder's conftest.py loads this module as ``pid_graphs``, so test modules here ``from pid_graphs import ...``.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

# --- files --------------------------------------------------------------------------------------------------

# A subfolder of models/pid keeps these apart from other tests' files; the official folder names still tell
# the pack the model family, as they do for users.
CKPT_DIR = "pidtest-nodes"
FLUX_PID = f"{CKPT_DIR}/PiD_res2k_sr4x_official_flux_distill_4step/model_ema_bf16.pth"
SDXL_PID = f"{CKPT_DIR}/PiD_res2kto4k_sr4x_official_sdxl_distill_4step/model_ema_bf16.pth"
UNDECIDED_PID = f"{CKPT_DIR}/mydecoder.safetensors"  # a 16-channel network under a name that tells nothing
NOT_PID = f"{CKPT_DIR}/not-a-decoder.safetensors"  # a VAE put into models/pid by mistake
FLUX_VAE = "pidtest-nodes-flux-ae.safetensors"  # full-size random Flux KL-VAE, written by the server
TAESD_4CH = "pidtest-nodes-taesd-4ch.safetensors"  # an SDXL-like (4-channel) VAE

UPSCALE = 32  # output pixels per latent cell for the 8x VAEs at PiD's 4x
WIDTH, HEIGHT = 32, 48  # latent images: 4x6 cells, decoded to 128x192 px (non-square catches swapped axes)
STEPS = 12  # > 10 steps, so that auto exit is not the distilled-model rule


def save_official(network: torch.nn.Module, path: Path) -> None:
    """The official model_ema_bf16.pth layout: ``net.``-prefixed keys, bf16."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"net.{k}": v.to(torch.bfloat16) for k, v in network.state_dict().items()}, path)


# --- graphs ---------------------------------------------------------------------------------------------------


class Graph(dict):
    """A prompt in ComfyUI's API format; ``node`` returns the new node's id, ``out(id, i)`` links to an output."""

    def node(self, class_type: str, **inputs) -> str:
        node_id = str(len(self) + 1)
        self[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id


def out(node_id: str, index: int = 0) -> list:
    return [node_id, index]


FAMILIES = {
    # model node, empty latent node, cfg (Flux ignores cfg; SDXL's 2.0 makes ComfyUI batch cond and uncond)
    "flux": ("PiDTestTinyFluxModel", {"seed": 0, "hidden_size": 128}, "EmptySD3LatentImage", 1.0, FLUX_PID),
    "sdxl": ("PiDTestTinySDXLModel", {"seed": 0}, "EmptyLatentImage", 2.0, SDXL_PID),
}


class Diffusion:
    """A tiny diffusion model of one family with its conditioning and an empty latent, in a graph."""

    def __init__(self, g: Graph, family: str, batch: int = 1, width: int = WIDTH, height: int = HEIGHT):
        model_type, model_inputs, latent_type, self.cfg, self.pid_name = FAMILIES[family]
        self.g = g
        self.model = g.node(model_type, **model_inputs)
        self.positive = g.node("PiDTestConditioning", model=out(self.model), seed=1, tokens=8, guidance=3.5)
        self.negative = g.node("PiDTestConditioning", model=out(self.model), seed=2, tokens=8, guidance=3.5)
        self.latent = g.node(latent_type, width=width, height=height, batch_size=batch)

    def common(self, model: str | None = None) -> dict:
        return dict(model=out(model or self.model), cfg=self.cfg, sampler_name="euler", scheduler="simple",
                    positive=out(self.positive), negative=out(self.negative), latent_image=out(self.latent))

    def pid_ksampler(self, exit_step: int, steps: int = STEPS, seed: int = 7) -> str:
        return self.g.node("PixelDecoderPiD_KSamplerEarlyExit", seed=seed, steps=steps, denoise=1.0,
                           exit_step=exit_step, **self.common())

    def ksampler_advanced(self, end: int, steps: int = STEPS, seed: int = 7, model: str | None = None) -> str:
        return self.g.node("KSamplerAdvanced", add_noise="enable", noise_seed=seed, steps=steps, start_at_step=0,
                           end_at_step=end, return_with_leftover_noise="enable", **self.common(model))

    def ksampler(self, steps: int = 4, seed: int = 7) -> str:
        return self.g.node("KSampler", seed=seed, steps=steps, denoise=1.0, **self.common())


def loader(g: Graph, pid_name: str = FLUX_PID, latent_space: str = "auto", weight_dtype: str = "bf16",
           vae_name: str = "none") -> str:
    return g.node("PixelDecoderPiD_LoadDecoder", pid_name=pid_name, latent_space=latent_space,
                  weight_dtype=weight_dtype, vae_name=vae_name)


def decode(g: Graph, decoder: str, latent: list, seed: int = 0, sigma=0.0, latent_space: str = "auto",
           steps: int = 4, record: str | None = None, **tiling) -> str:
    if record is not None:
        decoder = g.node("PiDTestRecordDecoder", pid_decoder=out(decoder), name=record)
    return g.node("PixelDecoderPiD_Decode", pid_decoder=out(decoder), latent=latent, size="native 4x", steps=steps,
                  seed=seed, sigma=sigma, latent_space=latent_space, **tiling)


def save_values(g: Graph, name: str, **values) -> str:
    return g.node("PiDTestSave", name=name, **values)


# --- reading results ------------------------------------------------------------------------------------------


def record(server, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """A probe's file: its tensors and its JSON metadata (a LATENT's PiD keys for PiDTestSave)."""
    path = server.output_dir / "pidtest-tensors" / f"{name}.safetensors"
    assert path.is_file(), f"no record {path}"
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads((f.metadata() or {}).get("json", "{}"))


def fails_with(server, prompt: dict, node_type: str, *fragments: str) -> str:
    """Run ``prompt``, expect it to fail in ``node_type`` with a message holding every fragment; return the message."""
    with pytest.raises(server.PromptFailed) as failed:
        server.run(prompt)
    error = failed.value.error
    assert error is not None, failed.value.entry["status"]
    assert error["node_type"] == node_type, error
    message = error["exception_message"]
    for fragment in fragments:
        assert fragment in message, message
    assert "Traceback" not in message and len(message) < 400, message  # one clear sentence, not a dump
    return message


_fresh_seeds = itertools.count(1000)


def assert_healthy(server) -> None:
    """The server still runs a fresh PiD decode (a new seed each time, so nothing comes from the cache)."""
    g = Graph()
    sampler = Diffusion(g, "flux")
    dec = decode(g, loader(g), out(sampler.latent), seed=next(_fresh_seeds), steps=1)
    save_values(g, "healthy", image=out(dec))
    entry = server.run(g)
    assert entry["status"]["status_str"] == "success"
    image, _ = record(server, "healthy")
    assert image["image"].shape == (1, HEIGHT // 8 * UPSCALE, WIDTH // 8 * UPSCALE, 3)
