"""The PiD nodes end to end in a real ComfyUI server, driven over HTTP with tiny random models.

What the prompts cannot show over HTTP is captured by the test pack's probes (tests/comfy/test_pack/probes.py):
the sampler's own state at every sigma (PiDTestRecordModel), what PiD's network receives (PiDTestRecordDecoder),
float images and latents without 8-bit rounding (PiDTestSave). Expected values are computed independently:
stock KSamplerAdvanced and BasicScheduler for the sampler side, the latent formats' constants for the
conversion, and ``pid_core.api`` in this process for the decode itself.

Sizes are small (latents of 4x6 cells, 128x192 px outputs, 1-4 PiD steps): the file takes 2.5 min on 2 busy cores
(load ~4), most of it tiny-model sampling and the 168 MB random Flux VAE written once per session.
"""

from __future__ import annotations

import itertools
import math
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pid_graphs import (
    CKPT_DIR, FLUX_PID, FLUX_VAE, HEIGHT, NOT_PID, STEPS, TAESD_4CH, UNDECIDED_PID, UPSCALE, WIDTH, Diffusion, Graph,
    assert_healthy, decode, fails_with, loader, out, record, save_official, save_values,
)
from tiny import run_out_of_memory_above, tiny_network

from pid_core.api import PiDDecoder
from pid_core.tensor_files import read_latent_file

# ComfyUI's latent formats (comfy/latent_formats.py): process_in(x) = (x - shift) * scale
FLUX_SHIFT, FLUX_SCALE = 0.1159, 0.3611
SDXL_SCALE = 0.13025

EXIT_STEP = 7  # of STEPS

WARNED_STALE = "changed after PiD tagged it"


# --- reading results ------------------------------------------------------------------------------------------


def saved_images(server, entry: dict, node: str) -> list[Image.Image]:
    return [server.image(ref) for ref in entry["outputs"][node]["images"]]


def saved_latent_path(server, entry: dict, node: str) -> Path:
    (ref,) = entry["outputs"][node]["latents"]
    return server.output_path(ref)


def state_at(states: dict[str, torch.Tensor], sigma: float) -> torch.Tensor:
    """The sampler state PiDTestRecordModel recorded at ``sigma``."""
    index = int(torch.argmin((states["sigmas"] - sigma).abs()))
    assert abs(float(states["sigmas"][index]) - sigma) < 1e-6, (sigma, states["sigmas"])
    return states["states"][index]


# --- (a) early exit: flow and EPS ---------------------------------------------------------------------------


def schedules(server, family: str, name: str) -> tuple[torch.Tensor, float]:
    """This run's sigmas (simple, STEPS) and the reference's exit sigma for the family, from stock BasicScheduler."""
    reference_k, reference_n = {"flux": (24, 28), "sdxl": (26, 30)}[family]
    g = Graph()
    sampler = Diffusion(g, family)
    run = g.node("BasicScheduler", model=out(sampler.model), scheduler="simple", steps=STEPS, denoise=1.0)
    ref = g.node("BasicScheduler", model=out(sampler.model), scheduler="simple", steps=reference_n, denoise=1.0)
    save_values(g, f"{name}-run-sigmas", sigmas=out(run))
    save_values(g, f"{name}-ref-sigmas", sigmas=out(ref))
    server.run(g)
    sigmas = record(server, f"{name}-run-sigmas")[0]["sigmas"]
    reference = record(server, f"{name}-ref-sigmas")[0]["sigmas"]
    assert len(sigmas) == STEPS + 1
    return sigmas, float(reference[reference_k])


@pytest.mark.parametrize("exit_mode", ["explicit", "auto"])
@pytest.mark.parametrize("family", ["flux", "sdxl"])
def test_early_exit_hands_the_sampler_state_to_pid(comfy_server, pid_models, family, exit_mode):
    name = f"a-{family}-{exit_mode}"
    sigmas, reference_sigma = schedules(comfy_server, family, name)
    if exit_mode == "explicit":
        exit_widget = k = EXIT_STEP
    else:  # auto: the first step at or below the reference's exit sigma (README, PiD KSampler)
        exit_widget = 0
        k = next(step for step in range(1, STEPS + 1) if float(sigmas[step]) <= reference_sigma)
        assert 1 < k < STEPS, (k, sigmas, reference_sigma)  # a real early exit, not the last step
    s = float(sigmas[k])  # the sampler's sigma at the exit step (float32, as ComfyUI computes it)

    g = Graph()
    sampler = Diffusion(g, family)
    early = sampler.pid_ksampler(exit_widget)
    stock = sampler.ksampler_advanced(end=k)
    recorder = g.node("PiDTestRecordModel", model=out(sampler.model), name=f"{name}-states")
    further = sampler.ksampler_advanced(end=k + 1, model=recorder)  # one step on: the model sees step k's state
    dec = decode(g, loader(g, sampler.pid_name), out(early), record=f"{name}-pid-input")
    png = g.node("SaveImage", images=out(dec), filename_prefix=f"pidtest/{name}")
    save_values(g, f"{name}-early", latent=out(early), value=out(early, 1))
    save_values(g, f"{name}-stock", latent=out(stock))
    save_values(g, f"{name}-further", latent=out(further))
    entry = comfy_server.run(g)

    (image,) = saved_images(comfy_server, entry, png)
    assert image.size == (WIDTH // 8 * UPSCALE, HEIGHT // 8 * UPSCALE)

    early_values, early_meta = record(comfy_server, f"{name}-early")
    latent = early_values["latent"]
    # the LATENT is exactly stock KSamplerAdvanced's with leftover noise, stopped at the same step
    assert torch.equal(latent, record(comfy_server, f"{name}-stock")[0]["latent"])

    expected_sigma = s if family == "flux" else s / math.sqrt(1 + s * s)
    assert float(early_values["value"]) == pytest.approx(expected_sigma, rel=1e-12, abs=1e-15)
    assert early_meta["pid_sigma"] == [pytest.approx(expected_sigma, rel=1e-12)]
    assert early_meta["pid_space"] == family
    assert 0.0 < expected_sigma < 0.8

    # what PiD's network receives is the sampler's own state at the exit step, converted as specified
    state = state_at(record(comfy_server, f"{name}-states")[0], s)
    pid_input = record(comfy_server, f"{name}-pid-input")[0]
    if family == "flux":
        expected = state  # process_in(LATENT) * (1 - sigma) undoes ComfyUI's inverse noise scaling
        by_hand = (latent - FLUX_SHIFT) * FLUX_SCALE * (1 - s)
    else:
        expected = state / math.sqrt(1 + s * s)
        by_hand = latent * SDXL_SCALE / math.sqrt(1 + s * s)
    torch.testing.assert_close(pid_input["z"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pid_input["z"], by_hand, rtol=1e-5, atol=1e-5)
    assert pid_input["sigma"].tolist() == [pytest.approx(expected_sigma, rel=1e-6)]
    assert len(pid_input["t"]) == 4  # one network call per PiD step


def test_distilled_run_is_decoded_from_its_final_latent(comfy_server, pid_models):
    """Auto exit with 10 steps or fewer does not stop early: the final latent, sigma 0."""
    g = Graph()
    sampler = Diffusion(g, "flux")
    early = sampler.pid_ksampler(exit_step=0, steps=4)
    save_values(g, "a-distilled-early", latent=out(early), value=out(early, 1))
    save_values(g, "a-distilled-stock", latent=out(sampler.ksampler(steps=4)))
    comfy_server.run(g)
    early_values, meta = record(comfy_server, "a-distilled-early")
    assert float(early_values["value"]) == 0.0 and meta["pid_sigma"] == [0.0]
    assert torch.equal(early_values["latent"], record(comfy_server, "a-distilled-stock")[0]["latent"])


def test_tag_latent_after_a_custom_sampler_matches_the_early_exit_ksampler(comfy_server, pid_models):
    """SamplerCustomAdvanced on the high half of SplitSigmas, tagged by PiD Tag Latent from its SIGMAS and model,
    is the same LATENT with the same sigma and metadata as PiD KSampler stopping at that step."""
    g = Graph()
    sampler = Diffusion(g, "flux")
    early = sampler.pid_ksampler(EXIT_STEP)
    sigmas = g.node("BasicScheduler", model=out(sampler.model), scheduler="simple", steps=STEPS, denoise=1.0)
    high = g.node("SplitSigmas", sigmas=out(sigmas), step=EXIT_STEP)
    custom = g.node(
        "SamplerCustomAdvanced", noise=out(g.node("RandomNoise", noise_seed=7)),
        guider=out(g.node("CFGGuider", model=out(sampler.model), positive=out(sampler.positive),
                          negative=out(sampler.negative), cfg=sampler.cfg)),
        sampler=out(g.node("KSamplerSelect", sampler_name="euler")), sigmas=out(high),
        latent_image=out(sampler.latent),
    )  # fmt: skip
    tagged = g.node("PixelDecoderPiD_TagLatent", latent=out(custom), latent_space="from model", sigma=0.0,
                    sigmas=out(high), model=out(sampler.model))
    save_values(g, "a-tag-custom", latent=out(tagged), value=out(tagged, 1), sigmas=out(high))
    save_values(g, "a-tag-early", latent=out(early), value=out(early, 1))
    comfy_server.run(g)

    tag_values, tag_meta = record(comfy_server, "a-tag-custom")
    early_values, early_meta = record(comfy_server, "a-tag-early")
    assert len(tag_values["sigmas"]) == EXIT_STEP + 1
    assert float(tag_values["value"]) == float(tag_values["sigmas"][-1]) == float(early_values["value"]) > 0
    assert torch.equal(tag_values["latent"], early_values["latent"])
    assert tag_meta == early_meta  # sigma, space and fingerprint


# --- (b) metadata: honoured while valid, ignored once the latent changed ------------------------------------


def test_latent_sampled_further_is_decoded_as_clean_with_a_warning(comfy_server, pid_models):
    g = Graph()
    sampler = Diffusion(g, "flux")
    early = sampler.pid_ksampler(EXIT_STEP)
    finished = g.node("KSamplerAdvanced", add_noise="disable", noise_seed=7, steps=STEPS, start_at_step=EXIT_STEP,
                      end_at_step=10000, return_with_leftover_noise="disable", **sampler.common())
    g[finished]["inputs"]["latent_image"] = out(early)
    dec = decode(g, loader(g), out(finished), sigma=0.0, record="b-finished-pid-input")
    save_values(g, "b-finished", latent=out(finished), image=out(dec), value=out(early, 1))
    log_start = len(comfy_server.log())
    comfy_server.run(g)

    assert WARNED_STALE in comfy_server.log()[log_start:]
    values, meta = record(comfy_server, "b-finished")
    assert meta["pid_sigma"] == [float(values["value"])] and float(values["value"]) > 0  # the stale keys travelled
    pid_input = record(comfy_server, "b-finished-pid-input")[0]
    assert pid_input["sigma"].tolist() == [0.0]  # the widget's sigma, not the stale tag
    torch.testing.assert_close(pid_input["z"], (values["latent"] - FLUX_SHIFT) * FLUX_SCALE, rtol=1e-6, atol=1e-6)


def test_tagged_latent_brings_its_own_sigma_and_an_untagged_one_uses_the_widget(comfy_server, pid_models):
    g = Graph()
    sampler = Diffusion(g, "flux")
    early = sampler.pid_ksampler(EXIT_STEP)
    file_node = g.node("SaveLatent", samples=out(early), filename_prefix="pidtest/b-tagged")
    entry = comfy_server.run(g)
    untagged_file = saved_latent_path(comfy_server, entry, file_node)
    shutil.copy(untagged_file, comfy_server.input_dir / "pidtest-b-untagged.latent")

    pid = loader(g)
    untagged = g.node("LoadLatent", latent="pidtest-b-untagged.latent")
    variants = {
        "tagged-0": (out(early), 0.0),
        "tagged-0.5": (out(early), 0.5),
        "untagged-0": (out(untagged), 0.0),
        "untagged-0.5": (out(untagged), 0.5),
        "untagged-own": (out(untagged), out(early, 1)),  # the FLOAT output linked into the sigma widget
    }
    for label, (latent, sigma) in variants.items():
        save_values(g, f"b-{label}", image=out(decode(g, pid, latent, seed=3, sigma=sigma, steps=2)))
    log_start = len(comfy_server.log())
    comfy_server.run(g)
    images = {label: record(comfy_server, f"b-{label}")[0]["image"] for label in variants}

    log = comfy_server.log()[log_start:]
    assert WARNED_STALE not in log
    # the override is said in the console, with both values (the tagged latent's sigma, the widget's 0.5)
    assert re.search(r"PiD metadata \(sigma [0-9.]+, latent space flux\) is used instead of the widgets \(sigma 0.5, "
                     r"latent space auto\)", log)
    assert torch.equal(images["tagged-0"], images["tagged-0.5"])  # the widget does not apply to a tagged latent
    assert torch.equal(images["tagged-0"], images["untagged-own"])  # ... which decodes with its own sigma
    assert not torch.equal(images["untagged-0"], images["untagged-0.5"])  # the widget applies without a tag
    assert not torch.equal(images["untagged-0"], images["tagged-0"])


# --- (c) errors come back as clear messages, and the server stays healthy ----------------------------------


def test_sdxl_latent_into_the_flux_decoder_is_refused(comfy_server, pid_models):
    g = Graph()
    sampler = Diffusion(g, "sdxl")
    early = sampler.pid_ksampler(exit_step=2, steps=4)
    save_values(g, "c-family", image=out(decode(g, loader(g, FLUX_PID), out(early))))
    fails_with(comfy_server, g, "PixelDecoderPiD_Decode", "The latent is in the sdxl latent space",
               "PiD_res2k_sr4x_official_flux_distill_4step/model_ema_bf16.pth is for flux models",
               "load the PiD checkpoint made for sdxl models")
    assert_healthy(comfy_server)


@pytest.mark.parametrize("told_by", ["tag", "widget"])
def test_sd3_latent_into_the_flux_decoder_is_refused(comfy_server, pid_models, told_by):
    """Same shapes, so it would run: a latent of another 16-channel family must not decode silently."""
    g = Graph()
    sampler = Diffusion(g, "flux")
    if told_by == "tag":
        latent = g.node("PixelDecoderPiD_TagLatent", latent=out(sampler.ksampler()), latent_space="sd3", sigma=0.2)
        dec = decode(g, loader(g, FLUX_PID), out(latent))
    else:
        dec = decode(g, loader(g, FLUX_PID), out(sampler.ksampler()), latent_space="sd3")
    save_values(g, f"c-sd3-{told_by}", image=out(dec))
    fails_with(comfy_server, g, "PixelDecoderPiD_Decode", "The latent is in the sd3 latent space",
               "is for flux models", "load the PiD checkpoint made for sd3 models")
    assert_healthy(comfy_server)


def test_untagged_four_channel_latent_into_the_flux_decoder_is_refused(comfy_server, pid_models):
    g = Graph()
    latent = g.node("EmptyLatentImage", width=WIDTH, height=HEIGHT, batch_size=1)
    save_values(g, "c-channels", image=out(decode(g, loader(g, FLUX_PID), out(latent))))
    fails_with(comfy_server, g, "PixelDecoderPiD_Decode", "has 4", "16 channels")
    assert_healthy(comfy_server)


def test_undecided_checkpoint_asks_for_the_latent_space_unless_the_latent_tells_it(comfy_server, pid_models):
    g = Graph()
    sampler = Diffusion(g, "flux")
    pid = loader(g, UNDECIDED_PID)
    save_values(g, "c-undecided", image=out(decode(g, pid, out(sampler.latent))))
    fails_with(comfy_server, g, "PixelDecoderPiD_Decode", "choose the latent space", "flux/sd3/qwenimage")
    assert_healthy(comfy_server)

    # the widget decides it ...
    g = Graph()
    sampler = Diffusion(g, "flux")
    pid = loader(g, UNDECIDED_PID)
    save_values(g, "c-undecided-sd3", image=out(decode(g, pid, out(sampler.latent), latent_space="sd3", steps=1,
                                                       record="c-undecided-sd3-input")))
    # ... and so does PiD KSampler's tag: the network gets a Flux-normalised latent
    early = sampler.pid_ksampler(EXIT_STEP)
    save_values(g, "c-undecided-early", latent=out(early), value=out(early, 1),
                image=out(decode(g, pid, out(early), steps=1, record="c-undecided-tagged-input")))
    comfy_server.run(g)

    sd3_input = record(comfy_server, "c-undecided-sd3-input")[0]["z"]
    torch.testing.assert_close(sd3_input, torch.full_like(sd3_input, (0 - 0.0609) * 1.5305))  # SD3's format
    values, _ = record(comfy_server, "c-undecided-early")
    s = float(values["value"])
    expected = (values["latent"] - FLUX_SHIFT) * FLUX_SCALE * (1 - s)
    torch.testing.assert_close(record(comfy_server, "c-undecided-tagged-input")[0]["z"], expected, rtol=1e-5, atol=1e-5)


def test_family_comes_from_the_official_folder_not_from_folders_above_it(comfy_server, pid_models):
    name = f"{CKPT_DIR}/sd3-collection/{FLUX_PID.split('/', 1)[1]}"
    path = pid_models / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(pid_models / FLUX_PID, path)
    g = Graph()
    sampler = Diffusion(g, "flux")
    early = sampler.pid_ksampler(exit_step=2, steps=4)
    save_values(g, "c-folders", image=out(decode(g, loader(g, name), out(early), steps=1)))
    entry = comfy_server.run(g, check=False)
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"][-1]


def test_vae_of_another_family_is_refused(comfy_server, pid_models):
    g = Graph()
    latent = g.node("EmptySD3LatentImage", width=WIDTH, height=HEIGHT, batch_size=1)
    pid = loader(g, FLUX_PID, vae_name=TAESD_4CH)
    save_values(g, "c-vae", image=out(decode(g, pid, out(latent))))
    fails_with(comfy_server, g, "PixelDecoderPiD_LoadDecoder", f"The VAE {TAESD_4CH} makes 4-channel latents",
               "decodes 16-channel ones")
    assert_healthy(comfy_server)


def test_a_vae_whose_name_says_another_family_is_warned_about(comfy_server, pid_models):
    """Flux.1 and SD3 VAEs have the same shapes: only the name can tell, so the loader warns (and still loads)."""
    sd3_named = "pidtest-nodes-sd3_vae.safetensors"
    vae_dir = comfy_server.models_dir / "vae"
    if not (vae_dir / sd3_named).exists():
        shutil.copy(vae_dir / FLUX_VAE, vae_dir / sd3_named)
    for vae_name, warned in ((sd3_named, True), (FLUX_VAE, False)):
        g = Graph()
        latent = g.node("EmptySD3LatentImage", width=WIDTH, height=HEIGHT, batch_size=1)
        save_values(g, "c-vae-name", image=out(decode(g, loader(g, FLUX_PID, vae_name=vae_name), out(latent),
                                                      seed=next(_vae_seeds), steps=1)))
        log_start = len(comfy_server.log())
        comfy_server.run(g)
        said = f"by its name, the VAE {vae_name} is for SD3 models" in comfy_server.log()[log_start:]
        assert said == warned, comfy_server.log()[log_start:]


_vae_seeds = itertools.count(2000)


def test_a_vae_in_the_pid_folder_is_named_for_what_it_is(comfy_server, pid_models):
    g = Graph()
    latent = g.node("EmptySD3LatentImage", width=WIDTH, height=HEIGHT, batch_size=1)
    save_values(g, "c-not-pid", image=out(decode(g, loader(g, NOT_PID), out(latent))))
    fails_with(comfy_server, g, "PixelDecoderPiD_LoadDecoder", "not-a-decoder.safetensors is a VAE",
               "models/vae")
    assert_healthy(comfy_server)


def test_pid_ksampler_with_denoise_0_is_a_clear_error(comfy_server, pid_models):
    g = Graph()
    sampler = Diffusion(g, "flux")
    early = g.node("PixelDecoderPiD_KSamplerEarlyExit", seed=7, steps=STEPS, denoise=0.0, exit_step=0, **sampler.common())
    save_values(g, "c-denoise-0", value=out(early, 1))
    fails_with(comfy_server, g, "PixelDecoderPiD_KSamplerEarlyExit", "denoise 0", "leaves no sampling step")
    assert_healthy(comfy_server)


def test_sigma_outside_zero_one_is_refused_and_above_the_trained_range_warns(comfy_server, pid_models):
    g = Graph()
    sampler = Diffusion(g, "flux")
    tagged = g.node("PiDTestTagLatent", latent=out(sampler.latent), sigmas="1.5", latent_space="flux")
    save_values(g, "c-sigma-range", image=out(decode(g, loader(g), out(tagged))))
    fails_with(comfy_server, g, "PixelDecoderPiD_Decode", "sigma 1.5 is outside [0, 1]")
    assert_healthy(comfy_server)

    g = Graph()
    sampler = Diffusion(g, "flux")
    save_values(g, "c-sigma-high", image=out(decode(g, loader(g), out(sampler.latent), sigma=0.9, seed=11, steps=1)))
    log_start = len(comfy_server.log())
    comfy_server.run(g)
    assert "PiD sigma 0.900 is above 0.8" in comfy_server.log()[log_start:]


# --- (d) cancel -----------------------------------------------------------------------------------------------


def test_interrupt_stops_a_decode_before_all_steps_ran(comfy_server, pid_models):
    steps, label = 8, f"d-{time.monotonic_ns()}"
    g = Graph()
    sampler = Diffusion(g, "flux")
    slow = g.node("PiDTestSlowDecoder", pid_decoder=out(loader(g)), seconds=0.5, label=label)
    save_values(g, "d-interrupted", image=out(decode(g, slow, out(sampler.latent), steps=steps)))
    calls = lambda: comfy_server.log().count(f"PiDTest slow decoder {label}: call")  # noqa: E731

    prompt_id = comfy_server.queue(g)
    deadline = time.monotonic() + 60
    while calls() == 0:
        assert time.monotonic() < deadline, "the decode never started"
        time.sleep(0.05)
    comfy_server.interrupt(prompt_id)
    asked = time.monotonic()
    entry = comfy_server.wait(prompt_id, timeout=30)

    assert time.monotonic() - asked < 5
    events = [name for name, _ in entry["status"]["messages"]]
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in events, events
    assert "execution_error" not in events, events
    assert 1 <= calls() < steps
    assert_healthy(comfy_server)


# --- (e) node and pid_core give the same picture ------------------------------------------------------------


@pytest.mark.parametrize("weight_dtype", ["bf16", "fp32"])
def test_node_decode_equals_pid_core_decode(comfy_server, pid_models, weight_dtype):
    g = Graph()
    sampler = Diffusion(g, "flux")
    early = sampler.pid_ksampler(EXIT_STEP)
    file_node = g.node("SaveLatent", samples=out(early), filename_prefix=f"pidtest/e-{weight_dtype}")
    dec = decode(g, loader(g, weight_dtype=weight_dtype), out(early), seed=5)
    save_values(g, f"e-{weight_dtype}", image=out(dec), value=out(early, 1))
    entry = comfy_server.run(g)

    values, _ = record(comfy_server, f"e-{weight_dtype}")
    latent = read_latent_file(saved_latent_path(comfy_server, entry, file_node))
    decoder = PiDDecoder.load(pid_models / FLUX_PID, precision=weight_dtype)
    with pytest.warns(UserWarning):  # no caption, and a size outside the 2k training range
        reference = decoder.decode(latent, sigma=float(values["value"]), size="native", steps=4, seed=5)
    assert torch.equal(values["image"], ((reference + 1) * 0.5).permute(0, 2, 3, 1))


def test_node_goes_on_with_fewer_images_per_call_when_it_runs_out_of_memory(comfy_server, pid_models):
    """A batch of 3 whose network calls may hold one picture: the decode goes on a picture at a time, with a console
    warning, and gives what pid_core gives under the same limit; with no room at all, a clear error."""
    g = Graph()
    sampler = Diffusion(g, "flux", batch=3)
    early = sampler.pid_ksampler(EXIT_STEP)
    file_node = g.node("SaveLatent", samples=out(early), filename_prefix="pidtest/e-oom")
    pixels = 4 * WIDTH * 4 * HEIGHT  # one 128x192 px picture
    limited = g.node("PiDTestOutOfMemoryDecoder", pid_decoder=out(loader(g, weight_dtype="fp32")), pixels=pixels)
    save_values(g, "e-oom", image=out(decode(g, limited, out(early), seed=3)), value=out(early, 1))
    entry = comfy_server.run(g)

    values, _ = record(comfy_server, "e-oom")
    assert "PiD Decode: PiD ran out of memory decoding 128x192 px whole; going on whole" in comfy_server.log()
    latent = read_latent_file(saved_latent_path(comfy_server, entry, file_node))
    decoder = PiDDecoder.load(pid_models / FLUX_PID, precision="fp32")
    run_out_of_memory_above(decoder.network, pixels)
    with pytest.warns(UserWarning) as caught:  # no caption, a size outside the training range, out of memory
        reference = decoder.decode(latent, sigma=float(values["value"]), size="native", steps=4, seed=3)
    assert any("1 of the 3 images at a time" in str(w.message) for w in caught)
    assert torch.equal(values["image"], ((reference + 1) * 0.5).permute(0, 2, 3, 1))

    g = Graph()
    sampler = Diffusion(g, "flux")
    no_room = g.node("PiDTestOutOfMemoryDecoder", pid_decoder=out(loader(g)), pixels=0)
    save_values(g, "e-no-room", image=out(decode(g, no_room, out(sampler.latent), seed=4)))
    fails_with(comfy_server, g, "PixelDecoderPiD_Decode", "ran out of memory", "no smaller way to decode it",
               "free memory")
    assert_healthy(comfy_server)


def test_attention_kernel_chosen_in_the_loader_reaches_the_decode(comfy_server, pid_models):
    g = Graph()
    sampler = Diffusion(g, "flux")
    early = sampler.pid_ksampler(EXIT_STEP)
    pid = g.node("PixelDecoderPiD_LoadDecoder", pid_name=FLUX_PID, latent_space="auto", weight_dtype="fp32",
                 vae_name="none", attention="efficient")  # a kernel CPUs do not have
    save_values(g, "e-kernel", image=out(decode(g, pid, out(early))))
    fails_with(comfy_server, g, "PixelDecoderPiD_Decode", "efficient attention kernel is not available here",
               "choose auto or math")


def test_node_tiles_on_request_and_equals_pid_core_tiled(comfy_server, pid_models):
    g = Graph()
    sampler = Diffusion(g, "flux")
    early = sampler.pid_ksampler(EXIT_STEP)
    file_node = g.node("SaveLatent", samples=out(early), filename_prefix="pidtest/e-tiled")
    dec = decode(g, loader(g, weight_dtype="fp32"), out(early), seed=5, tiling="on", tile_size=64)
    save_values(g, "e-tiled", image=out(dec), value=out(early, 1))
    entry = comfy_server.run(g)

    values, _ = record(comfy_server, "e-tiled")
    latent = read_latent_file(saved_latent_path(comfy_server, entry, file_node))
    decoder = PiDDecoder.load(pid_models / FLUX_PID, precision="fp32")
    kwargs = dict(sigma=float(values["value"]), size="native", steps=4, seed=5)
    with pytest.warns(UserWarning):
        tiled = decoder.decode(latent, tiling="on", tile_size=64, **kwargs)
        whole = decoder.decode(latent, tiling="off", **kwargs)
    assert torch.equal(values["image"], ((tiled + 1) * 0.5).permute(0, 2, 3, 1))
    assert not torch.equal(tiled, whole)  # it really tiled
    assert "PiD decode: " in comfy_server.log() and "tiles of 64x64 px" in comfy_server.log()


# --- (f) PiD Encode Image -----------------------------------------------------------------------------------


def write_pictures(input_dir: Path, count: int, size=(70, 50)) -> list[str]:
    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        name = f"pidtest-encode-{i}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(input_dir / name)
        names.append(name)
    return names


@pytest.mark.parametrize("batch", [1, 3])
def test_encode_image_then_decode_upscales_the_centred_crop(comfy_server, pid_models, batch):
    names = write_pictures(comfy_server.input_dir, batch)
    g = Graph()
    images = [g.node("LoadImage", image=name) for name in names]
    pictures = images[0]
    for other in images[1:]:
        pictures = g.node("ImageBatch", image1=out(pictures), image2=out(other))
    pid = loader(g, FLUX_PID, vae_name=FLUX_VAE)
    encoded = g.node("PixelDecoderPiD_EncodeImage", pid_decoder=out(pid), image=out(pictures))
    dec = decode(g, pid, out(encoded), sigma=0.5, record=f"f-{batch}-pid-input")  # the tag's 0 wins
    png = g.node("SaveImage", images=out(dec), filename_prefix=f"pidtest/f-{batch}")
    stock = g.node("VAEEncode", pixels=out(pictures), vae=out(g.node("VAELoader", vae_name=FLUX_VAE)))
    save_values(g, f"f-{batch}-encoded", latent=out(encoded))
    save_values(g, f"f-{batch}-stock", latent=out(stock))
    entry = comfy_server.run(g, timeout=300)

    decoded = saved_images(comfy_server, entry, png)
    assert [image.size for image in decoded] == [(256, 192)] * batch  # 70x50 -> 64x48 crop -> 4x
    encoded_values, meta = record(comfy_server, f"f-{batch}-encoded")
    assert encoded_values["latent"].shape == (batch, 16, 6, 8)
    # the same latent as stock VAE Encode (which also centre-crops to whole cells)
    assert torch.equal(encoded_values["latent"], record(comfy_server, f"f-{batch}-stock")[0]["latent"])
    assert meta["pid_sigma"] == [0.0] * batch and meta["pid_space"] == "flux"
    assert meta["pid_crop"] == {"top": 1, "left": 3, "height": 48, "width": 64, "source_height": 50,
                                "source_width": 70}
    pid_input = record(comfy_server, f"f-{batch}-pid-input")[0]
    assert pid_input["sigma"].tolist() == [0.0] * batch
    torch.testing.assert_close(pid_input["z"], (encoded_values["latent"] - FLUX_SHIFT) * FLUX_SCALE)


# --- (i) semantic latents: the SigLIP RAE -------------------------------------------------------------------

SIGLIP_PID = f"{CKPT_DIR}/PiD_res2k_sr8x_official_siglip_distill_4step/model_ema_bf16.pth"
SIGLIP_RAE = "pidtest-siglip"  # models/pid/rae/<this>/: the Hugging Face encoder folder and the decoder beside it
@pytest.fixture(scope="module")
def siglip_models(pid_models) -> Path:
    """A tiny SigLIP PiD checkpoint and a tiny SigLIP RAE folder laid out as a user would download them."""
    from tiny_rae import write_rae

    folder = pid_models / "rae" / SIGLIP_RAE
    if not (pid_models / SIGLIP_PID).exists():
        save_official(tiny_network("siglip_2k", seed=4), pid_models / SIGLIP_PID)
        write_rae(folder, "siglip", encoder_dir="siglip2-so400m-patch14-224", decoder="decXL.pt", seed=2)
    return folder


def test_siglip_picture_to_a_2048_px_pid_decode_and_the_rae_decode(comfy_server, siglip_models):
    (name,) = write_pictures(comfy_server.input_dir, 1, size=(90, 70))
    g = Graph()
    picture = g.node("LoadImage", image=name)
    pid = g.node("PixelDecoderPiD_LoadDecoder", pid_name=SIGLIP_PID, latent_space="auto", weight_dtype="fp32",
                 vae_name="none", rae_name=SIGLIP_RAE)
    encoded = g.node("PixelDecoderPiD_EncodeImage", pid_decoder=out(pid), image=out(picture))
    dec = decode(g, pid, out(encoded), steps=1)  # one step: a 2048 px decode, even of a tiny network, takes a while
    native = g.node("PixelDecoderPiD_RAEDecode", pid_decoder=out(pid), latent=out(encoded))
    save_values(g, "i-siglip", latent=out(encoded), image=out(dec))
    save_values(g, "i-siglip-native", image=out(native))
    comfy_server.run(g, timeout=600)

    values, meta = record(comfy_server, "i-siglip")
    native = record(comfy_server, "i-siglip-native")[0]["image"]
    assert values["image"].shape == (1, 2048, 2048, 3)
    assert native.shape == (1, 256, 256, 3)
    assert meta["pid_space"] == "siglip" and meta["pid_sigma"] == [0.0]
    assert meta["pid_crop"] == {"top": 0, "left": 10, "height": 70, "width": 70, "source_height": 70,
                                "source_width": 90}
    # the node's latent is pid_core's encode of the centred square crop
    from pid_core.rae import load_rae

    rae = load_rae([siglip_models, siglip_models / "siglip2-so400m-patch14-224"], dtype=torch.float32)
    pixels = torch.from_numpy(np.asarray(Image.open(comfy_server.input_dir / name), dtype=np.float32) / 255.0)
    square = pixels[:, 10:80].permute(2, 0, 1)[None] * 2 - 1
    assert torch.equal(values["latent"], rae.encode(square))
    # comfy.ops layers in the node, pid_core's own here: the same fp32 arithmetic, up to float rounding
    torch.testing.assert_close(native, ((rae.decode(values["latent"]) + 1) * 0.5).permute(0, 2, 3, 1),
                               rtol=0, atol=1e-5)


def test_an_rae_of_another_family_is_refused(comfy_server, siglip_models):
    (name,) = write_pictures(comfy_server.input_dir, 1)
    g = Graph()
    pid = g.node("PixelDecoderPiD_LoadDecoder", pid_name=FLUX_PID, latent_space="auto", weight_dtype="bf16",
                 vae_name="none", rae_name=SIGLIP_RAE)
    encoded = g.node("PixelDecoderPiD_EncodeImage", pid_decoder=out(pid), image=out(g.node("LoadImage", image=name)))
    save_values(g, "i-refused", latent=out(encoded))
    fails_with(comfy_server, g, "PixelDecoderPiD_LoadDecoder", "The RAE makes siglip latents with 1152 channels",
               "decodes flux latents with 16 channels", "pick the RAE of that family")


def test_a_flux_checkpoint_without_vae_asks_for_one_and_a_siglip_one_for_its_rae(comfy_server, siglip_models):
    for pid_name, wanted in ((FLUX_PID, "needs a VAE"), (SIGLIP_PID, "needs a RAE (rae_name)")):
        (name,) = write_pictures(comfy_server.input_dir, 1)
        g = Graph()
        pid = loader(g, pid_name)
        encoded = g.node("PixelDecoderPiD_EncodeImage", pid_decoder=out(pid), image=out(g.node("LoadImage", image=name)))
        save_values(g, "i-refused", latent=out(encoded))
        fails_with(comfy_server, g, "PixelDecoderPiD_EncodeImage", wanted)


# --- (g) one sigma per batch item ---------------------------------------------------------------------------


def test_each_batch_item_decodes_with_its_own_sigma(comfy_server, pid_models):
    sigmas, steps = [0.1, 0.4, 0.7], 2  # 2 PiD steps and 128x128 outputs keep the five decodes quick
    g = Graph()
    sampler = Diffusion(g, "flux", batch=3, width=32, height=32)
    latent = sampler.ksampler(steps=4)
    file_node = g.node("SaveLatent", samples=out(latent), filename_prefix="pidtest/g-batch")
    tagged = g.node("PiDTestTagLatent", latent=out(latent), sigmas=",".join(map(str, sigmas)), latent_space="flux")
    dec = decode(g, loader(g), out(tagged), seed=9, sigma=0.0, steps=steps, record="g-pid-input")
    save_values(g, "g-batch", image=out(dec))
    entry = comfy_server.run(g)

    node_images = record(comfy_server, "g-batch")[0]["image"]
    pid_input = record(comfy_server, "g-pid-input")[0]
    torch.testing.assert_close(pid_input["sigma"], torch.tensor(sigmas))
    samples = read_latent_file(saved_latent_path(comfy_server, entry, file_node))
    factors = torch.tensor([1 - s for s in sigmas]).view(3, 1, 1, 1)
    torch.testing.assert_close(pid_input["z"], (samples - FLUX_SHIFT) * FLUX_SCALE * factors, rtol=1e-6, atol=1e-6)

    decoder = PiDDecoder.load(pid_models / FLUX_PID)

    def reference(sigma):
        with pytest.warns(UserWarning):
            return ((decoder.decode(samples, sigma=sigma, steps=steps, seed=9) + 1) * 0.5).permute(0, 2, 3, 1)

    assert torch.equal(node_images, reference(sigmas))
    for i, s in enumerate(sigmas):  # item i is what a decode of the whole batch at sigma s_i gives for item i
        same = reference(s)
        assert torch.equal(node_images[i], same[i])
        for j in range(3):
            if j != i:
                assert not torch.equal(node_images[j], same[j])


# --- (h) the node definitions ---------------------------------------------------------------------------------

DOCUMENTED = {
    "PixelDecoderPiD_LoadDecoder": (["pid_name", "latent_space", "weight_dtype", "vae_name"],
                                    ["rae_name", "attention", "compile"], ["PID_DECODER"]),
    "PixelDecoderPiD_KSamplerEarlyExit": (
        ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative", "latent_image",
         "denoise", "exit_step"], [], ["LATENT", "FLOAT"],
    ),
    "PixelDecoderPiD_TagLatent": (["latent", "latent_space", "sigma"], ["sigmas", "model"], ["LATENT", "FLOAT"]),
    "PixelDecoderPiD_Decode": (
        ["pid_decoder", "latent", "size", "steps", "seed", "sigma", "latent_space"],
        ["caption", "tiling", "tile_size", "cfg"],
        ["IMAGE"],
    ),
    "PixelDecoderPiD_EncodeImage": (["pid_decoder", "image"], [], ["LATENT"]),
    "PixelDecoderPiD_RAEDecode": (["pid_decoder", "latent"], [], ["IMAGE"]),
}


def test_object_info_lists_every_node_with_its_documented_inputs(comfy_server):
    """The README's nodes with their inputs in order (inputs added later may only be appended, so the documented
    ones are a prefix), and on every node of the pack, documented or newer: category PiD, a display name, a
    description and a tooltip on every input."""
    info = comfy_server.object_info()
    ours = {name for name, node in info.items()
            if node.get("python_module") == f"custom_nodes.{comfy_server.pack_dir_name}"}  # fmt: skip
    assert set(DOCUMENTED) <= ours, set(DOCUMENTED) - ours
    for name, (required, optional, outputs) in DOCUMENTED.items():
        order = info[name]["input_order"]
        assert order.get("required", [])[: len(required)] == required, name
        assert order.get("optional", [])[: len(optional)] == optional, name
        assert info[name]["output"] == outputs, name
    for name in sorted(ours):
        node = info[name]
        assert name.startswith("PixelDecoderPiD_"), name
        assert node["category"] == "PiD", name
        assert node["display_name"].startswith("PiD ") or node["display_name"].startswith("Load PiD "), name
        assert len(node["description"]) > 40, name
        assert node["output_node"] is False, name
        for section in ("required", "optional"):
            for input_name, spec in node["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                assert len(options.get("tooltip", "")) > 10, f"{name}.{input_name} has no tooltip"
    assert info["PixelDecoderPiD_KSamplerEarlyExit"]["input"]["required"]["exit_step"][1]["default"] == 0
    size = info["PixelDecoderPiD_Decode"]["input"]["required"]["size"]
    options = size[0] if isinstance(size[0], list) else size[1]["options"]
    assert options == ["auto", "native 4x", "2048", "4096"] and size[1]["default"] == "auto"  # saved ones keep theirs
    steps = info["PixelDecoderPiD_Decode"]["input"]["required"]["steps"][1]
    assert (steps["default"], steps["min"]) == (0, 0)  # 0: the checkpoint's own steps
