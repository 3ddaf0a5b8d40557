"""Bad inputs in the real test server: each must be refused with one clear sentence, write nothing, and leave the
server able to run the next prompt.

One data-driven test runs the table ``CASES`` against the session's server. Every case is a prompt whose last node
saves PiD Decode's picture (SaveImage), so a decode that wrongly runs to its end writes a file. For each case:

1. the prompt fails in the expected node (or ComfyUI's validation rejects it there) with a message that holds the
   expected fragments and reads as one sentence: no line break, under 400 characters, no Python or torch
   internals (``INTERNALS``), not a programming-error exception type; the interrupt case ends interrupted in the
   expected node instead, with no error;
2. no file of the server's output folder is written or changed (names, sizes and mtimes before and after);
3. the next prompt, a fresh PiD decode (new seed, so not from the cache), succeeds.

Problems are collected over the whole table and listed, each with the actual message, before the test fails; with
``-s`` it prints ``bad-input suite: N tried, N clear messages, N wrote nothing, N next prompts ok``. Files for the
cases are written once per session into the server's folders (``models/pid/pidtest-bad/``, ``models/pid/rae/``,
``input/``). Cases marked "issue #18" are refusals being implemented in nodes/ and pid_core/.
"""

from __future__ import annotations

import ast
import os
import pickle
import re
import shlex
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from pid_graphs import (
    FLUX_PID, HEIGHT, NOT_PID, SDXL_PID, TAESD_4CH, UNDECIDED_PID, WIDTH, Graph, assert_healthy, loader, out,
)
from safetensors.torch import save_file
from tiny import tiny_network

from pid_core.api import plan_decode

DECODE = "PixelDecoderPiD_Decode"
LOAD = "PixelDecoderPiD_LoadDecoder"
KSAMPLER = "PixelDecoderPiD_KSamplerEarlyExit"
TAG = "PixelDecoderPiD_TagLatent"
ENCODE = "PixelDecoderPiD_EncodeImage"
CAPTION = "PixelDecoderPiD_Caption"
RAE_DECODE = "PixelDecoderPiD_RAEDecode"

# What a clear message never shows: Python's and torch's own words.
INTERNALS = ("Traceback", 'File "', "internal miniz error", "weights_only=False", "Weights only load failed",
             "IndexError", "KeyError", "size mismatch", "CUDA", "PytorchStreamReader", "state_dict")
# Exception types that mean a bug was hit, not an input refused.
PROGRAMMING_ERRORS = {"IndexError", "KeyError", "AttributeError", "TypeError", "NameError", "UnboundLocalError",
                      "ZeroDivisionError", "AssertionError", "RecursionError"}
MAX_MESSAGE = 400
# What ComfyUI appends to an exception's text (after a line break): its tips for some errors.
COMFYUI_TIPS = ("This error means you ran out of memory", "\n\nTIPS: ")

# --- files ----------------------------------------------------------------------------------------------------

BAD = "pidtest-bad"  # models/pid/<this>/
TRUNCATED_PTH = f"{BAD}/truncated-download.pth"
RUNS_CODE = f"{BAD}/runs-code.pth"  # a zip (torch.save) whose pickle calls os.system
RUNS_CODE_LEGACY = f"{BAD}/runs-code-legacy.pth"  # the same as a bare pickle
BARE_TENSOR = f"{BAD}/bare-tensor.pth"
DIFFUSION_MODEL = f"{BAD}/flux1-dev.safetensors"
MISSING_WEIGHT = f"{BAD}/missing-a-bias.safetensors"
MISSING_READ_WEIGHT = f"{BAD}/missing-y-pos-embedding.safetensors"  # a weight the variant detection reads
FP8 = f"{BAD}/pid_flux_fp8_scaled.safetensors"
EIGHT_CHANNELS = f"{BAD}/eight-channels.safetensors"
CORRUPT_HEADER = f"{BAD}/corrupt-header.safetensors"
TRUNCATED_SAFETENSORS = f"{BAD}/truncated.safetensors"
TEXT_FILE = f"{BAD}/readme.safetensors"  # a .txt renamed
TEACHER = f"{BAD}/PiD_v1pt5_res2kto4k_sr4x_official_flux_undistilled/model_ema_bf16.pth"
SIGLIP_RAE = "pidtest-bad-siglip"  # models/pid/rae/<this>/
PICTURE = "pidtest-bad-picture.png"  # 70x50 px
TINY_PICTURE = "pidtest-bad-5px.png"  # 5x5 px: less than one VAE cell
SLOW_LABEL = f"bad-inputs-{uuid.uuid4().hex[:8]}"
TEXT_WIDTH = 32  # the tiny networks' txt_embed_dim (tests/core/tiny.py)


@dataclass(frozen=True)
class Files:
    marker: Path  # exists only if a refused pickle ran its code
    memory_batch: int  # 4096 px pictures that, decoded all at once, need over twice this machine's memory


class _RunsCode:
    """Pickles as a call of os.system (the classic malicious checkpoint); never unpickled by this process."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def memory_batch() -> int:
    """The smallest batch of 4096x4096 px pictures whose decode without tiling needs over twice this machine's
    memory, as pid_core plans it for the tiny Flux network."""
    network = tiny_network("flux_2k").to(torch.bfloat16)
    total = psutil.virtual_memory().total
    for batch in (2**k for k in range(13)):
        plan = plan_decode(network, 4096, 4096, batch=batch, tiling="off", memory_budget=total, device="cpu")
        if plan.memory.activations > 2 * total:
            return batch
    raise AssertionError(f"no batch of up to 4096 pictures of 4096 px needs twice {total} bytes")


@pytest.fixture(scope="module")
def bad_files(comfy_server, pid_models: Path) -> Files:
    """The cases' files: broken, unsafe and mistaken checkpoints in models/pid/pidtest-bad/, a tiny undistilled
    checkpoint, a SigLIP RAE for the Flux checkpoint to refuse, and two pictures in input/."""
    root = pid_models
    marker = comfy_server.base_dir / "pidtest-pickle-ran"
    good = (root / FLUX_PID).read_bytes()
    (root / BAD).mkdir(exist_ok=True)
    (root / TRUNCATED_PTH).write_bytes(good[: len(good) // 2])
    command = f"touch {shlex.quote(str(marker))}"
    torch.save({"net.s_embedder.proj.weight": _RunsCode(command)}, root / RUNS_CODE)
    (root / RUNS_CODE_LEGACY).write_bytes(pickle.dumps({"net.s_embedder.proj.weight": _RunsCode(command)}))
    torch.save(torch.zeros(3), root / BARE_TENSOR)

    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in tiny_network("flux_2k", seed=0).state_dict().items()}
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(8, 4), "img_in.weight": torch.zeros(4, 4)},
              str(root / DIFFUSION_MODEL))
    save_file({k: v for k, v in tensors.items() if k != "s_embedder.proj.bias"}, str(root / MISSING_WEIGHT))
    save_file({k: v for k, v in tensors.items() if k != "y_pos_embedding"}, str(root / MISSING_READ_WEIGHT))
    save_file({k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in tensors.items()}, str(root / FP8))
    eight = dict(tensors)
    eight["lq_proj.latent_proj.0.weight"] = eight["lq_proj.latent_proj.0.weight"][:, :8].contiguous()
    save_file(eight, str(root / EIGHT_CHANNELS))
    save_file(tensors, str(root / CORRUPT_HEADER))
    whole = (root / CORRUPT_HEADER).read_bytes()
    (root / CORRUPT_HEADER).write_bytes(whole[:8] + b"{not json" + whole[17:])
    (root / TRUNCATED_SAFETENSORS).write_bytes(whole[: len(whole) // 2])
    (root / TEXT_FILE).write_text("Notes: PiD decodes latents to pictures at 4x.\n" * 20)

    # a tiny v1.5 teacher: the student's network plus the training-only aux RGB head (as in test_caption.py)
    teacher = tiny_network("flux_2kto4k_v1pt5", seed=4).state_dict()
    aux = {"0.weight": [32], "0.bias": [32], "1.weight": [32, 32], "1.bias": [32], "3.weight": [48, 32], "3.bias": [48]}
    teacher |= {f"lq_proj.lq_aux_rgb_head.{k}": torch.randn(shape) for k, shape in aux.items()}
    (root / TEACHER).parent.mkdir(exist_ok=True)
    torch.save({f"net.{k}": v.to(torch.bfloat16) for k, v in teacher.items()}, root / TEACHER)

    rae = root / "rae" / SIGLIP_RAE
    if not rae.exists():
        from tiny_rae import write_rae

        write_rae(rae, "siglip", encoder_dir="siglip2-so400m-patch14-224", decoder="decXL.pt", seed=2)

    rng = np.random.default_rng(0)
    for name, (width, height) in ((PICTURE, (70, 50)), (TINY_PICTURE, (5, 5))):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(comfy_server.input_dir / name)
    if marker.exists():
        marker.unlink()
    return Files(marker=marker, memory_batch=memory_batch())


# --- prompts --------------------------------------------------------------------------------------------------


def flux_latent(g: Graph, batch: int = 1, width: int = WIDTH, height: int = HEIGHT) -> list:
    return out(g.node("EmptySD3LatentImage", width=width, height=height, batch_size=batch))


def pid_decode(g: Graph, decoder: str, latent: list, **inputs) -> str:
    widgets = dict(size="native 4x", steps=1, seed=0, sigma=0.0, latent_space="auto") | inputs
    return g.node(DECODE, pid_decoder=out(decoder), latent=latent, **widgets)


def sdxl_latent(g: Graph) -> list:
    return out(g.node("EmptyLatentImage", width=WIDTH, height=HEIGHT, batch_size=1))


def video_latent(g: Graph) -> list:
    """A 16-channel video latent of 3 frames, [1, 16, 3, h, w]."""
    return out(g.node("EmptyHunyuanLatentVideo", width=WIDTH, height=HEIGHT, length=9, batch_size=1))


def decode_flux(g: Graph, latent: list | None = None, pid_name: str = FLUX_PID, **inputs) -> str:
    """PiD Decode of ``latent`` (default: an empty Flux one) with ``pid_name``."""
    return pid_decode(g, loader(g, pid_name), latent or flux_latent(g), **inputs)


def load_file(pid_name: str) -> Callable[[Graph, Files], str]:
    return lambda g, f: decode_flux(g, pid_name=pid_name)


def tag_per_item(g: Graph, latent: list, sigmas: str, space: str = "flux") -> list:
    return out(g.node("PiDTestTagLatent", latent=latent, sigmas=sigmas, latent_space=space))


def tensor_latent(g: Graph, shape: str, fill: str = "zeros") -> list:
    return out(g.node("PiDTestTensorLatent", shape=shape, fill=fill))


def tiny_model(g: Graph) -> str:
    return g.node("PiDTestTinyFluxModel", seed=0, hidden_size=128)


def sampler_of(model_type: str, pid_name: str) -> Callable[[Graph, Files], str]:
    """PiD KSampler on a tiny model of a family PiD does not decode, into a PiD checkpoint of a family it resembles."""

    def build(g: Graph, f: Files) -> str:
        model = g.node(model_type, seed=0)
        conditioning = g.node("PiDTestCaptionConditioning", batch=1, tokens=8, width=64, seed=0)
        early = g.node(KSAMPLER, model=out(model), seed=7, steps=4, cfg=1.0, sampler_name="euler",
                       scheduler="simple", positive=out(conditioning), negative=out(conditioning),
                       latent_image=sdxl_latent(g), denoise=1.0, exit_step=0)
        return pid_decode(g, loader(g, pid_name), out(early))

    return build


def sd15_tag(g: Graph, f: Files) -> str:
    tagged = g.node(TAG, latent=sdxl_latent(g), latent_space="from model", sigma=0.0,
                    model=out(g.node("PiDTestTinySD15Model", seed=0)))
    return pid_decode(g, loader(g, SDXL_PID), out(tagged))


def denoise_0(g: Graph, f: Files) -> str:
    model = tiny_model(g)
    positive = g.node("PiDTestConditioning", model=out(model), seed=1, tokens=8, guidance=3.5)
    early = g.node(KSAMPLER, model=out(model), seed=7, steps=12, cfg=1.0, sampler_name="euler", scheduler="simple",
                   positive=out(positive), negative=out(positive), latent_image=flux_latent(g), denoise=0.0,
                   exit_step=0)
    return decode_flux(g, out(early))


def empty_sigmas(g: Graph, f: Files) -> str:
    model = tiny_model(g)
    sigmas = g.node("BasicScheduler", model=out(model), scheduler="simple", steps=4, denoise=1.0)
    low = g.node("SplitSigmas", sigmas=out(sigmas), step=10)  # past the last step: its low half is empty
    tagged = g.node(TAG, latent=flux_latent(g), latent_space="from model", sigma=0.0, sigmas=out(low, 1),
                    model=out(model))
    return decode_flux(g, out(tagged))


def tag_without_model(g: Graph, f: Files) -> str:
    return decode_flux(g, out(g.node(TAG, latent=flux_latent(g), latent_space="from model", sigma=0.0)))


def with_loader(**inputs) -> Callable[[Graph, Files], str]:
    def build(g: Graph, f: Files) -> str:
        widgets = dict(pid_name=FLUX_PID, latent_space="auto", weight_dtype="bf16", vae_name="none") | inputs
        return pid_decode(g, g.node(LOAD, **widgets), flux_latent(g))

    return build


def encode(pid_name: str, picture: str, vae_name: str = "none") -> Callable[[Graph, Files], str]:
    def build(g: Graph, f: Files) -> str:
        pid = loader(g, pid_name, vae_name=vae_name)
        latent = g.node(ENCODE, pid_decoder=out(pid), image=out(g.node("LoadImage", image=picture)))
        return pid_decode(g, pid, out(latent))

    return build


def rae_decode_without_rae(g: Graph, f: Files) -> str:
    return g.node(RAE_DECODE, pid_decoder=out(loader(g)), latent=flux_latent(g))


def caption_decode(make_caption: Callable[[Graph], str], pid_name: str = FLUX_PID, batch: int = 1,
                   **inputs) -> Callable[[Graph, Files], str]:
    def build(g: Graph, f: Files) -> str:
        return decode_flux(g, flux_latent(g, batch), pid_name=pid_name, caption=out(make_caption(g)), **inputs)

    return build


def plain_caption(width: int = TEXT_WIDTH, tokens: int = 300, batch: int = 1) -> Callable[[Graph], str]:
    return lambda g: g.node("PiDTestCaptionConditioning", batch=batch, tokens=tokens, width=width, seed=0)


def stock_conditioning(g: Graph) -> str:
    return g.node("PiDTestConditioning", model=out(tiny_model(g)), seed=1, tokens=8, guidance=3.5)


def guarded(make_latent: Callable[[Graph, Files], list], **inputs) -> Callable[[Graph, Files], str]:
    """A decode that must be refused before it starts; the guard stops it at PiD's network if it is not."""

    def build(g: Graph, f: Files) -> str:
        guard = g.node("PiDTestGuardDecoder", pid_decoder=out(loader(g)))
        return pid_decode(g, guard, make_latent(g, f), **inputs)

    return build


def interrupted_decode(g: Graph, f: Files) -> str:
    slow = g.node("PiDTestSlowDecoder", pid_decoder=out(loader(g)), seconds=0.5, label=SLOW_LABEL)
    return pid_decode(g, slow, flux_latent(g), steps=8)


def out_of_memory(g: Graph, f: Files) -> str:
    return pid_decode(g, g.node("PiDTestOutOfMemoryDecoder", pid_decoder=out(loader(g)), pixels=0), flux_latent(g))


# --- the table ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Graph, Files], str]  # adds the prompt's nodes; returns the node whose IMAGE is saved
    node: str  # the node that refuses it
    fragments: tuple[str | tuple[str, ...], ...] = ()  # each in the message; of a tuple, any one
    interrupt: bool = False  # cancelled during the decode: ends interrupted in ``node``, not with an error


CASES = [
    # latents
    Case("sdxl-latent-into-flux", lambda g, f: decode_flux(g, out(g.node(
        TAG, latent=sdxl_latent(g), latent_space="sdxl", sigma=0.0))), DECODE,
        ("The latent is in the sdxl latent space", "is for flux models",
         "load the PiD checkpoint made for sdxl models")),
    Case("untagged-4-channels-into-flux", lambda g, f: decode_flux(g, sdxl_latent(g)), DECODE,
         ("has 4", "16 channels")),
    # an untagged SD1.5 latent has SDXL's shape and decodes; its model is what tells it apart
    Case("sd15-model-into-pid-ksampler", sampler_of("PiDTestTinySD15Model", SDXL_PID), KSAMPLER,
         ("latent format (SD15) is not one PiD decodes",)),
    # Wan shares Qwen-Image's latent format: told apart by the model, not the format
    Case("wan-video-model-into-pid-ksampler", sampler_of("PiDTestTinyWanModel", FLUX_PID), KSAMPLER,
         ("This is a video model (WAN21_T2V", "PiD decodes pictures", "VAE Decode for videos")),
    Case("sd15-model-into-tag-latent", sd15_tag, TAG, ("latent format (SD15) is not one PiD decodes",)),
    Case("video-latent-5d", lambda g, f: decode_flux(g, video_latent(g)), DECODE,
         ("5-D latent", "a video latent", "decode videos with VAE Decode")),
    Case("video-latent-as-qwen-image", lambda g, f: decode_flux(g, video_latent(g), UNDECIDED_PID,
                                                                latent_space="qwenimage"), DECODE,
         ("has 3 frames", "PiD decodes single images")),
    Case("nan-latent", lambda g, f: decode_flux(g, tensor_latent(g, "1,16,6,4", "nan")), DECODE,
         ("contains NaN/inf values",)),
    Case("empty-batch", lambda g, f: decode_flux(g, tensor_latent(g, "0,16,6,4")), DECODE,
         ("The latent batch is empty", "at least one picture")),
    Case("tagged-sigma-above-1", lambda g, f: decode_flux(g, tag_per_item(g, flux_latent(g), "1.5")), DECODE,
         ("sigma 1.5 is outside [0, 1]",)),
    Case("tagged-sigma-negative", lambda g, f: decode_flux(g, tag_per_item(g, flux_latent(g), "-0.2")), DECODE,
         ("sigma -0.2 is outside [0, 1]",)),
    Case("tagged-sigma-nan", lambda g, f: decode_flux(g, tag_per_item(g, flux_latent(g), "nan")), DECODE,
         ("sigma is NaN",)),
    Case("two-sigmas-for-three-pictures", lambda g, f: decode_flux(g, tag_per_item(g, flux_latent(g, 3), "0.1,0.2")),
         DECODE, ("2 sigma values for a batch of 3",)),
    Case("decode-sigma-widget-above-1", lambda g, f: decode_flux(g, sigma=1.5), DECODE,
         ("bigger than max", "sigma")),
    Case("tag-sigma-widget-above-1", lambda g, f: decode_flux(g, out(g.node(
        TAG, latent=flux_latent(g), latent_space="flux", sigma=1.5))), TAG, ("bigger than max", "sigma")),
    Case("tag-latent-empty-sigmas", empty_sigmas, TAG, ("the connected SIGMAS are empty",)),
    Case("tag-latent-from-model-without-model", tag_without_model, TAG, ("connect the model",)),
    Case("pid-ksampler-denoise-0", denoise_0, KSAMPLER, ("denoise 0", "leaves no sampling step")),
    # checkpoint files
    # ComfyUI 0.3.75 does not check a V3 node's combo value, so the loader says it; later ComfyUI rejects it first
    Case("unknown-checkpoint-name", load_file(f"{BAD}/no-such-file.pth"), LOAD,
         ("'pidtest-bad/no-such-file.pth'", ("not found in models/pid", "Value not in list: pid_name"))),
    Case("truncated-pth", load_file(TRUNCATED_PTH), LOAD, ("truncated-download.pth", "truncated or corrupt")),
    Case("pickle-runs-code", load_file(RUNS_CODE), LOAD, ("runs-code.pth", "refused for safety")),
    Case("legacy-pickle-runs-code", load_file(RUNS_CODE_LEGACY), LOAD, ("runs-code-legacy.pth", "refused for safety")),
    Case("pth-holding-a-tensor", load_file(BARE_TENSOR), LOAD, ("holds a Tensor, not a dict of tensors",)),
    Case("vae-in-models-pid", load_file(NOT_PID), LOAD, ("not-a-decoder.safetensors is a VAE", "models/vae")),
    Case("diffusion-model-in-models-pid", load_file(DIFFUSION_MODEL), LOAD,
         ("is a diffusion model", "models/diffusion_models")),
    Case("checkpoint-missing-a-weight", load_file(MISSING_WEIGHT), LOAD,
         ("does not match the PiD network it looks like", "1 missing")),
    Case("checkpoint-missing-a-detected-weight", load_file(MISSING_READ_WEIGHT), LOAD,
         ("missing-y-pos-embedding.safetensors", "lacks 1 of the PiD decoder's weights (e.g. y_pos_embedding)")),
    Case("fp8-repack", load_file(FP8), LOAD, ("quantized (fp8/mxfp8) repack",)),
    Case("latent-branch-of-8-channels", load_file(EIGHT_CHANNELS), LOAD, ("matches no released PiD family",)),
    Case("corrupt-safetensors-header", load_file(CORRUPT_HEADER), LOAD,
         ("corrupt-header.safetensors is not a readable safetensors file",)),
    Case("truncated-safetensors", load_file(TRUNCATED_SAFETENSORS), LOAD,
         ("truncated.safetensors is not a readable safetensors file", "truncated or corrupt")),
    Case("text-file-named-safetensors", load_file(TEXT_FILE), LOAD,
         ("readme.safetensors is not a readable safetensors file", "or not a model file at all")),
    Case("vae-of-another-family", with_loader(vae_name=TAESD_4CH), LOAD,
         (f"The VAE {TAESD_4CH} makes 4-channel latents", "decodes 16-channel ones")),
    Case("rae-of-another-family", with_loader(rae_name=SIGLIP_RAE), LOAD,
         ("The RAE makes siglip latents with 1152 channels", "pick the RAE of that family")),
    Case("loader-latent-space-not-the-checkpoints", with_loader(latent_space="sdxl"), LOAD,
         ("decodes flux/sd3/qwenimage latents, not sdxl",)),
    Case("attention-kernel-not-here", with_loader(attention="efficient"), DECODE,
         ("efficient attention kernel is not available here", "choose auto or math")),
    # decode settings
    Case("decode-latent-space-not-the-checkpoints", lambda g, f: decode_flux(g, latent_space="sd3"), DECODE,
         ("The latent is in the sd3 latent space", "is for flux models")),
    Case("undecided-checkpoint-no-latent-space", lambda g, f: decode_flux(g, pid_name=UNDECIDED_PID), DECODE,
         ("choose the latent space", "flux/sd3/qwenimage")),
    Case("tile-size-not-a-multiple-of-16", lambda g, f: decode_flux(g, tiling="on", tile_size=40), DECODE,
         ("tile size must be a positive multiple of 16", "40")),
    Case("nine-steps-for-a-4-step-student", lambda g, f: decode_flux(g, steps=9), DECODE,
         ("PiD runs 1 to 8 steps, got 9",)),
    Case("out-of-memory-with-no-smaller-plan", out_of_memory, DECODE, ("ran out of memory", "no smaller way")),
    # issue #18: a whole decode beyond the machine's memory, and an output side beyond 16384 px
    Case("4096-px-batch-beyond-memory-tiling-off", guarded(
        lambda g, f: flux_latent(g, f.memory_batch, 1024, 1024), size="4096", tiling="off"), DECODE,
        ("needs about", "decode fewer pictures at a time")),  # tiles would not shrink the batch's own buffers
    Case("native-4x-beyond-16384-px", guarded(lambda g, f: flux_latent(g, 1, 8192, 64)), DECODE, ("16384",)),
    # captions
    Case("caption-of-another-width", caption_decode(plain_caption(width=1000)), DECODE,
         ("(1, 300, 1000)", "PiD Caption")),
    Case("caption-with-nan", caption_decode(lambda g: g.node(
        "PiDTestCaption", batch=1, tokens=300, width=TEXT_WIDTH, fill="nan", seed=0)), DECODE,
        ("caption embedding contains NaN/inf values",)),
    Case("two-captions-for-three-pictures", caption_decode(plain_caption(batch=2), batch=3), DECODE,
         ("2 caption embeddings for 3 latents",)),
    # issue #18: a stock model's conditioning is not taken for a caption
    Case("stock-conditioning-as-caption", caption_decode(stock_conditioning), DECODE, ("is not a PiD caption",)),
    Case("guidance-without-negative-caption", caption_decode(plain_caption(), pid_name=TEACHER), DECODE,
         ("needs the negative prompt's embedding", "connect PiD Caption")),
    Case("caption-with-neither-clip-nor-gemma", caption_decode(lambda g: g.node(
        CAPTION, text="a fox", gemma_name="none")), CAPTION, ("needs Gemma-2-2B-it",)),
    Case("caption-from-a-clip-l", caption_decode(lambda g: g.node(
        CAPTION, text="a fox", gemma_name="none", clip=out(g.node("PiDTestTinyCLIPL")))), CAPTION,
        ("is not a Gemma-2 text encoder",)),
    # pictures in
    Case("encode-image-without-vae", encode(FLUX_PID, PICTURE), ENCODE, ("needs a VAE",)),
    Case("picture-smaller-than-a-vae-cell", encode(SDXL_PID, TINY_PICTURE, TAESD_4CH), ENCODE,
         ("The picture is 5x5 px", "at least 8x8 px")),
    Case("encode-image-undecided-checkpoint", encode(UNDECIDED_PID, PICTURE), ENCODE,
         ("does not say which model family",)),
    Case("rae-decode-without-rae", rae_decode_without_rae, RAE_DECODE, ("needs an RAE",)),
    # cancel
    Case("interrupt-during-decode", interrupted_decode, DECODE, interrupt=True),
]


# --- running a case -------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str  # "failed", "rejected" (validation), "interrupted" or "succeeded"
    node: str | None
    message: str
    exception_type: str | None = None


def validation_message(error: dict) -> str:
    """ComfyUI's validation message, a combo's options shortened to their count: ComfyUI lists up to 20 of them,
    so its length would depend on how many model files this session wrote."""
    details = error["details"]
    if error.get("type") == "value_not_in_list" and (options := re.search(r" not in (\[.*\])$", details)):
        details = f"{details[: options.start(1)]}[{len(ast.literal_eval(options.group(1)))} options]"
    return f"{error['message']}: {details}"


def rejected_outcome(body: dict) -> Outcome:
    for node in body.get("node_errors", {}).values():
        if node.get("errors"):
            return Outcome("rejected", node["class_type"], "; ".join(map(validation_message, node["errors"])))
    error = body.get("error", {})
    return Outcome("rejected", None, f"{error.get('message')}: {error.get('details')}")


def run(server, case: Case, files: Files) -> Outcome:
    g = Graph()
    image = case.build(g, files)
    g.node("SaveImage", images=out(image), filename_prefix=f"{BAD}/{case.name}")
    log_start = len(server.log())
    try:
        prompt_id = server.queue(g)
    except server.PromptRejected as rejection:
        return rejected_outcome(rejection.body)
    if case.interrupt:
        deadline = time.monotonic() + 60
        while f"PiDTest slow decoder {SLOW_LABEL}: call" not in server.log()[log_start:]:
            if time.monotonic() > deadline:
                break  # the entry then tells what happened instead
            time.sleep(0.05)
        server.interrupt(prompt_id)
    entry = server.wait(prompt_id, timeout=120)
    events = dict(entry["status"]["messages"])
    if "execution_error" in events:
        error = events["execution_error"]
        return Outcome("failed", error["node_type"], own_message(error["exception_message"]), error["exception_type"])
    if "execution_interrupted" in events:
        return Outcome("interrupted", events["execution_interrupted"]["node_type"], "interrupted")
    return Outcome("succeeded" if entry["status"]["status_str"] == "success" else entry["status"]["status_str"],
                   None, "")


def own_message(exception_message: str) -> str:
    """The exception's text without what ComfyUI appends to it: a line break, and for some errors its tips."""
    text = exception_message.removesuffix("\n")
    for tips in COMFYUI_TIPS:
        text = text.split("\n" + tips, 1)[0]
    return text


def holds(message: str, fragment: str | tuple[str, ...]) -> bool:
    return any(f in message for f in fragment) if isinstance(fragment, tuple) else fragment in message


def message_problems(case: Case, outcome: Outcome) -> list[str]:
    """Why the outcome is not the clear refusal (or the clean interruption) the case expects; empty when it is."""
    if case.interrupt:
        if outcome.kind != "interrupted":
            return [f"ended {outcome.kind}, not interrupted"]
        return [] if outcome.node == case.node else [f"interrupted in {outcome.node}, not {case.node}"]
    if outcome.kind not in ("failed", "rejected"):
        return [f"was not refused: it {outcome.kind}"]
    problems = []
    if outcome.node != case.node:
        problems.append(f"refused by {outcome.node}, not {case.node}")
    problems += [f"no {fragment!r}" for fragment in case.fragments if not holds(outcome.message, fragment)]
    problems += [f"shows {internal!r}" for internal in INTERNALS if internal in outcome.message]
    if (outcome.exception_type or "").rsplit(".", 1)[-1] in PROGRAMMING_ERRORS:
        problems.append(f"raised {outcome.exception_type}")
    if "\n" in outcome.message:
        problems.append("spans several lines")
    if len(outcome.message) >= MAX_MESSAGE:
        problems.append(f"{len(outcome.message)} characters long")
    return problems


def output_files(server) -> dict[str, tuple[int, int]]:
    """Every file of the output folder with its size and modification time."""
    root = server.output_dir
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def written(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    return sorted(name for name, stat in after.items() if before.get(name) != stat)


def next_prompt_problem(server) -> str | None:
    try:
        assert_healthy(server)
    except Exception as error:  # any failure of the next prompt is this case's finding
        return f"the next prompt failed: {type(error).__name__}: {str(error)[:600]}"
    return None


# --- the test -------------------------------------------------------------------------------------------------


def test_table_has_distinct_cases():
    names = [case.name for case in CASES]
    assert len(names) == len(set(names)) and len(CASES) >= 25, names


def test_bad_inputs_are_refused_clearly_write_nothing_and_the_server_goes_on(comfy_server, bad_files):
    started = time.monotonic()
    tried = clear = quiet = healthy = 0
    report: list[str] = []
    try:
        for case in CASES:
            tried += 1
            before = output_files(comfy_server)
            outcome = run(comfy_server, case, bad_files)
            problems = message_problems(case, outcome)
            clear += not problems
            if files := written(before, output_files(comfy_server)):
                problems.append(f"wrote {', '.join(files)}")
            else:
                quiet += 1
            if bad_files.marker.exists():  # the refused pickle must not have run
                problems.append(f"a pickle ran its code: {bad_files.marker} exists")
                bad_files.marker.unlink()
            if (problem := next_prompt_problem(comfy_server)) is not None:
                problems.append(problem)
            else:
                healthy += 1
            if problems:
                report.append(f"- {case.name} [{outcome.kind} in {outcome.node}, {outcome.exception_type}]: "
                              f"{'; '.join(problems)}\n    message: {outcome.message}")
    finally:
        print(f"\nbad-input suite: {tried} tried, {clear} clear messages, {quiet} wrote nothing, {healthy} next "
              f"prompts ok ({time.monotonic() - started:.0f} s)")
        if report:
            print("cases that misbehaved:\n" + "\n".join(report))
    assert not report, f"{len(report)} of {len(CASES)} bad inputs misbehaved:\n" + "\n".join(report)
