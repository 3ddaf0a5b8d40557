"""The test server itself: ComfyUI starts, both packs import, stock sampling runs on the tiny test
models, and errors and cancellation come back through the HTTP API the way the PiD tests rely on."""

from __future__ import annotations

import re
import time

import pytest
import torch
from safetensors.torch import load_file

TEST_NODES = ("PiDTestTinyFluxModel", "PiDTestTinySDXLModel", "PiDTestConditioning")


def import_line(log: str, link_name: str) -> str:
    """The line of ComfyUI's 'Import times for custom nodes' summary for one pack."""
    summary = log.split("Import times for custom nodes:", 1)
    assert len(summary) == 2, "ComfyUI printed no custom node import summary"
    lines = [line for line in summary[1].splitlines() if re.search(rf"custom_nodes[/\\]{re.escape(link_name)}\s*($|\()", line)]
    assert lines, f"{link_name} is missing from the import summary:\n{summary[1][:2000]}"
    return lines[0]


def sampling_prompt(model_node: dict, latent_node: dict, prefix: str, steps: int = 4, cfg: float = 1.0) -> dict:
    """model -> random conditioning -> KSampler(euler) -> SaveLatent, in ComfyUI's API format."""
    return {
        "model": model_node,
        "positive": {"class_type": "PiDTestConditioning",
                     "inputs": {"model": ["model", 0], "seed": 1, "tokens": 8, "guidance": 3.5}},
        "negative": {"class_type": "PiDTestConditioning",
                     "inputs": {"model": ["model", 0], "seed": 2, "tokens": 8, "guidance": 3.5}},
        "latent": latent_node,
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["model", 0], "seed": 42, "steps": steps, "cfg": cfg, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["positive", 0], "negative": ["negative", 0],
            "latent_image": ["latent", 0], "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": prefix}},
    }  # fmt: skip


TINY_FLUX = {"class_type": "PiDTestTinyFluxModel", "inputs": {"seed": 0, "hidden_size": 128}}
TINY_SDXL = {"class_type": "PiDTestTinySDXLModel", "inputs": {"seed": 0}}
FLUX_LATENT = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
SDXL_LATENT = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}


def saved_latent(server, entry: dict) -> torch.Tensor:
    refs = entry["outputs"]["save"]["latents"]
    assert len(refs) == 1, refs
    path = server.output_path(refs[0])
    assert path.is_file(), f"SaveLatent reported {refs[0]} but {path} does not exist"
    return load_file(str(path))["latent_tensor"]


def test_server_starts(comfy_server):
    stats = comfy_server.get_json("/system_stats")
    assert stats["system"]["comfyui_version"] == comfy_server.comfyui_version
    assert [d["type"] for d in stats["devices"]] == ["cpu"]
    assert "Device: cpu" in comfy_server.log()


def test_no_import_failed(comfy_server):
    failures = [line for line in comfy_server.log().splitlines() if "IMPORT FAILED" in line]
    assert not failures, "\n".join(failures) + "\n\n" + comfy_server.log_tail()


def test_pack_loads(comfy_server):
    line = import_line(comfy_server.log(), comfy_server.pack_dir_name)
    assert "IMPORT FAILED" not in line, f"{line}\n\n{comfy_server.log_tail()}"


def test_pack_registers_nodes(comfy_server):
    ours = [name for name, info in comfy_server.object_info().items()
            if info.get("python_module") == f"custom_nodes.{comfy_server.pack_dir_name}"]  # fmt: skip
    assert ours, f"the pack (custom_nodes/{comfy_server.pack_dir_name}) registered no nodes"


def test_test_pack_loads(comfy_server):
    line = import_line(comfy_server.log(), comfy_server.test_pack_dir_name)
    assert "IMPORT FAILED" not in line, line
    for node in TEST_NODES:
        info = comfy_server.object_info(node)
        assert info["python_module"] == f"custom_nodes.{comfy_server.test_pack_dir_name}"


def test_tiny_flux_samples(comfy_server):
    entry = comfy_server.run(sampling_prompt(TINY_FLUX, FLUX_LATENT, "pidtest/flux"))
    latent = saved_latent(comfy_server, entry)
    assert latent.shape == (1, 16, 8, 8)
    assert torch.isfinite(latent).all() and latent.abs().max() > 0


def test_tiny_sdxl_samples_with_cfg(comfy_server):
    entry = comfy_server.run(sampling_prompt(TINY_SDXL, SDXL_LATENT, "pidtest/sdxl", cfg=2.0))
    latent = saved_latent(comfy_server, entry)
    assert latent.shape == (1, 4, 8, 8)
    assert torch.isfinite(latent).all() and latent.abs().max() > 0


def test_tiny_models_are_deterministic(comfy_server):
    """Same seeds -> bit-identical result after ComfyUI dropped its caches and rebuilt the model."""
    first = saved_latent(comfy_server, comfy_server.run(sampling_prompt(TINY_FLUX, FLUX_LATENT, "pidtest/det")))
    comfy_server.free()
    second = saved_latent(comfy_server, comfy_server.run(sampling_prompt(TINY_FLUX, FLUX_LATENT, "pidtest/det")))
    assert torch.equal(first, second)
    other_seed = dict(TINY_FLUX, inputs=dict(TINY_FLUX["inputs"], seed=1))
    third = saved_latent(comfy_server, comfy_server.run(sampling_prompt(other_seed, FLUX_LATENT, "pidtest/det")))
    assert not torch.equal(first, third)


def test_unknown_node_is_rejected(comfy_server):
    with pytest.raises(comfy_server.PromptRejected) as rejected:
        comfy_server.queue({"1": {"class_type": "PiDTestNoSuchNode", "inputs": {}}})
    assert rejected.value.status == 400
    assert "PiDTestNoSuchNode" in rejected.value.body["error"]["message"]
    assert "PiDTestNoSuchNode" in str(rejected.value)


def test_invalid_input_is_rejected(comfy_server):
    prompt = sampling_prompt(TINY_FLUX, FLUX_LATENT, "pidtest/never")
    prompt["sample"]["inputs"]["steps"] = 0
    with pytest.raises(comfy_server.PromptRejected) as rejected:
        comfy_server.queue(prompt)
    errors = rejected.value.body["node_errors"]["sample"]["errors"]
    assert errors[0]["type"] == "value_smaller_than_min"
    assert errors[0]["extra_info"]["input_name"] == "steps"


def test_interrupt_stops_sampling(comfy_server):
    prompt = sampling_prompt(TINY_FLUX, FLUX_LATENT, "pidtest/interrupted", steps=10000)
    prompt_id = comfy_server.queue(prompt)
    deadline = time.monotonic() + 60
    while not any(item[1] == prompt_id for item in comfy_server.queue_state()["queue_running"]):
        assert time.monotonic() < deadline, "the prompt never started"
        time.sleep(0.05)
    time.sleep(1.0)  # well into the 10000 steps
    asked = time.monotonic()
    comfy_server.interrupt(prompt_id)
    entry = comfy_server.wait(prompt_id, timeout=30)
    stopped_after = time.monotonic() - asked
    events = [name for name, _ in entry["status"]["messages"]]
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in events, events
    assert "save" not in entry["outputs"]
    assert stopped_after < 10
    # the server keeps working afterwards
    comfy_server.run(sampling_prompt(TINY_FLUX, FLUX_LATENT, "pidtest/after-interrupt", steps=2))


def test_output_image_helper(comfy_server):
    prompt = {
        "image": {"class_type": "EmptyImage", "inputs": {"width": 48, "height": 32, "batch_size": 1, "color": 0xFF8000}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["image", 0], "filename_prefix": "pidtest/image"}},
    }
    entry = comfy_server.run(prompt)
    ref = entry["outputs"]["save"]["images"][0]
    image = comfy_server.image(ref)
    assert image.size == (48, 32)
    assert image.convert("RGB").getpixel((0, 0)) == (255, 128, 0)
    assert comfy_server.output_path(ref).is_file()


def test_model_files_are_listed_without_restart(comfy_server):
    new_file = comfy_server.models_dir / "vae" / "pidtest-dropped-in.safetensors"
    assert new_file.name not in comfy_server.object_info("VAELoader")["input"]["required"]["vae_name"][0]
    new_file.write_bytes(b"")
    try:
        assert new_file.name in comfy_server.object_info("VAELoader")["input"]["required"]["vae_name"][0]
    finally:
        new_file.unlink()
