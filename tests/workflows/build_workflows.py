"""The shipped workflows (``workflows/*.json`` and their ``.jpg`` thumbnails), made by the real ComfyUI frontend.

Each workflow is defined here as an API prompt (node inputs by name), a column layout and a note. The
builder starts the test ComfyUI (pack and test pack installed, see ``tests/conftest.py``), loads
every prompt into the frontend it serves with ``app.loadApiJson``, sets what an API prompt cannot hold (PiD
Decode's seed control, "fixed"), lays the nodes out, adds a MarkdownNote that says which files (and, for an
RAE, which folder of files) go where and the recommended settings, and saves ``app.graph.serialize()`` (what the
frontend's Save writes) plus a headless-Chromium screenshot of the graph. ComfyUI serves ``workflows/`` to
its template browser, which shows ``<name>.jpg`` beside ``<name>.json``.

Each workflow is built with the oldest ComfyUI it runs on: the pack's own minimum (0.3.75), or, for a workflow
whose models need a newer core (``needs_comfyui``, e.g. Flux.2 Klein), that ComfyUI's test environment
(``scripts/setup_env.sh --comfyui 0.33``) and the frontend it serves.

    .venv/bin/python tests/workflows/build_workflows.py            # all workflows
    .venv/bin/python tests/workflows/build_workflows.py pid_sdxl   # those whose name contains "pid_sdxl"

Needs ``bash scripts/setup_env.sh`` and ``bash scripts/setup_frontend.sh`` (``scripts/test.sh`` runs both), and
for the workflows that need ComfyUI 0.33 ``bash scripts/setup_env.sh --comfyui 0.33``.
``tests/workflows/test_workflows.py`` checks the saved files against the definitions here, by input name.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, NamedTuple

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
WORKFLOWS_DIR = REPO_ROOT / "workflows"
FRONTEND_JS = HERE / "frontend.js"
PLAYWRIGHT = REPO_ROOT / ".frontend" / "node_modules" / "playwright-core"

PID = "PixelDecoderPiD_"
PID_CHECKPOINTS = "https://huggingface.co/nvidia/PiD/tree/main/checkpoints/"
PID_FILE = "model_ema_bf16.pth"  # the official file name inside each checkpoint folder
# Gemma-2-2B-it for PiD Caption, as Comfy-Org repacked it (tokenizer embedded); Load CLIP loads it with type lumina2.
GEMMA_FILE = "gemma_2_2b_it_elm_bf16.safetensors"
GEMMA_URL = f"https://huggingface.co/Comfy-Org/PixelDiT/resolve/main/text_encoders/{GEMMA_FILE}"
SEED = 42
# PiD Decode's seed control ("control after generate"; the frontend's default is "randomize"): fixed, so that
# re-queueing an unchanged graph reuses the decode ComfyUI cached instead of redoing it with a new seed.
SEED_CONTROL = "fixed"

# Where the stock model files come from (the links of ComfyUI's own templates), by file name.
DOWNLOADS = {
    "flux1-dev.safetensors": "https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/flux1-dev.safetensors",
    "clip_l.safetensors": "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors",
    "t5xxl_fp16.safetensors": "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors",
    "ae.safetensors": "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files/vae/ae.safetensors",
    "z_image_turbo_bf16.safetensors":
        "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files/diffusion_models/z_image_turbo_bf16.safetensors",
    "qwen_3_4b.safetensors":
        "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files/text_encoders/qwen_3_4b.safetensors",
    "sd_xl_base_1.0.safetensors":
        "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
    "sd3.5_large_fp8_scaled.safetensors":
        "https://huggingface.co/Comfy-Org/stable-diffusion-3.5-fp8/resolve/main/sd3.5_large_fp8_scaled.safetensors",
    "flux-2-klein-4b.safetensors":
        "https://huggingface.co/Comfy-Org/flux2-klein/resolve/main/split_files/diffusion_models/flux-2-klein-4b.safetensors",
    "flux2_dev_fp8mixed.safetensors":
        "https://huggingface.co/Comfy-Org/flux2-dev/resolve/main/split_files/diffusion_models/flux2_dev_fp8mixed.safetensors",
    "mistral_3_small_flux2_bf16.safetensors":
        "https://huggingface.co/Comfy-Org/flux2-dev/resolve/main/split_files/text_encoders/mistral_3_small_flux2_bf16.safetensors",
    "qwen_image_fp8_e4m3fn.safetensors":
        "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/diffusion_models/qwen_image_fp8_e4m3fn.safetensors",
    "qwen_2.5_vl_7b_fp8_scaled.safetensors":
        "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
    GEMMA_FILE: GEMMA_URL,
}  # fmt: skip
# The model folder of each stock loader's file inputs.
LOADER_FOLDERS = {
    "UNETLoader": {"unet_name": "diffusion_models"},
    "CheckpointLoaderSimple": {"ckpt_name": "checkpoints"},
    "CLIPLoader": {"clip_name": "text_encoders"},
    "DualCLIPLoader": {"clip_name1": "text_encoders", "clip_name2": "text_encoders"},
    "TripleCLIPLoader": {"clip_name1": "text_encoders", "clip_name2": "text_encoders", "clip_name3": "text_encoders"},
    "VAELoader": {"vae_name": "vae"},
    f"{PID}LoadDecoder": {"pid_name": "pid", "vae_name": "vae", "rae_name": "pid/rae"},
}
FOLDER_INPUTS = {"rae_name"}  # inputs that name a folder (one RAE's files, see RAE_FOLDERS), not a file
NOT_A_FILE = {"none"}  # Load PiD Decoder's vae_name / rae_name when no VAE or RAE is loaded


@dataclass(frozen=True)
class RAEFolder:
    """The files of one RAE in ``models/pid/rae/<name>/`` and where each comes from (the README's "Which file goes
    where"). The pack tells the files apart by their weights; these are the names they are downloaded with."""

    space: str  # the latent space it makes: that of the PiD checkpoint it goes with (dinov2, siglip)
    encoder_repo: str  # the Hugging Face encoder, whose folder goes in as downloaded (config.json, model.safetensors)
    decoder: str  # the decoder's file in nvidia/PiD checkpoints/<decoder_dir>/
    decoder_dir: str
    decoder_config: str | None = None  # the decoder's JSON, beside it in decoder_dir (Scale-RAE)
    stats_dir: str | None = None  # DINOv2: the latent statistics STATS in nvidia/PiD checkpoints/<stats_dir>/

    STATS: ClassVar[str] = "stat.pt"

    @property
    def encoder(self) -> str:
        return self.encoder_repo.split("/")[1]

    def contents(self) -> list[tuple[str, str]]:
        """(name inside the folder, its source in Markdown), in the order the note lists them."""
        encoder = (f"{self.encoder}/",
                   f"[{self.encoder_repo}](https://huggingface.co/{self.encoder_repo}) (`config.json`, "
                   "`model.safetensors`: the encoder; keep the folder as downloaded)")  # fmt: skip
        out = [encoder, (self.decoder, nvidia_pid(self.decoder_dir, "the decoder"))]
        if self.decoder_config:
            out.append((self.decoder_config, nvidia_pid(self.decoder_dir, "the decoder's config")))
        if self.stats_dir:
            out.append((self.STATS, nvidia_pid(self.stats_dir, "the latent statistics")))
        return out


def nvidia_pid(folder: str, what: str) -> str:
    return f"[nvidia/PiD]({PID_CHECKPOINTS}{folder}) `checkpoints/{folder}/` ({what})"


# The RAE folders the workflows name in rae_name (any folder name works; these are the README's examples).
RAE_FOLDERS = {
    "dinov2": RAEFolder("dinov2", "facebook/dinov2-with-registers-base", "model.pt",
                        "rae/decoders/dinov2/wReg_base/ViTXL_n08_i512",
                        stats_dir="rae/stats/dinov2/wReg_base/imagenet1k_512"),
    "siglip": RAEFolder("siglip", "google/siglip2-so400m-patch14-224", "siglip2_sop14_i224_web73M_ganw3_decXL.pt",
                        "scale_rae/decoder", decoder_config="XL_decoder_config.json"),
}  # fmt: skip


class ModelItem(NamedTuple):
    """A model file a loader names, or (``is_folder``) a folder of files such as an RAE's."""

    folder: str  # inside ComfyUI/models/
    name: str
    is_folder: bool = False

    @property
    def where(self) -> str:
        return f"{self.folder}/{self.name}/" if self.is_folder else f"{self.folder}/{self.name}"

# Node widths that show the whole file names (the frontend's defaults cut them).
WIDTHS = {"UNETLoader": 400, "CheckpointLoaderSimple": 400, "CLIPLoader": 400, "DualCLIPLoader": 340,
          "VAELoader": 340, f"{PID}LoadDecoder": 600, "ConditioningZeroOut": 300, "EmptyLatentImage": 300,
          "EmptySD3LatentImage": 300, "EmptyFlux2LatentImage": 300, "SamplerCustomAdvanced": 300,
          "KSamplerAdvanced": 340, f"{PID}EncodeImage": 300, "VAEDecode": 260, "ImageStitch": 300,
          f"{PID}RAEDecode": 300}  # fmt: skip
NOTE_WIDTH = 460
# Colours of ComfyUI's templates for prompt nodes.
GREEN = ["#232", "#353"]
RED = ["#322", "#533"]
PROMPT_SIZE = [420, 180]


def pid_checkpoint(folder: str) -> str:
    return f"{folder}/{PID_FILE}"


OLDEST_COMFYUI = "0.3.75"  # the pack's requires-comfyui


class ComfyUINeed(NamedTuple):
    """A workflow that runs only on a ComfyUI newer than the pack's minimum, and why."""

    version: str  # as scripts/setup_env.sh --comfyui and PID_COMFYUI name it, e.g. "0.33"
    feature: str  # what that ComfyUI has, for the note and the tests' skip reason

    @property
    def sentence(self) -> str:
        return f"Needs ComfyUI {self.version} or newer ({self.feature})"


def version_tuple(version: str) -> tuple[int, ...]:
    """A version as numbers ("0.33" -> (0, 33, 0)), to compare with a server's "0.33.0"."""
    parts = [int(p) for p in version.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


# --- graph definitions -------------------------------------------------------------------------------
class Node:
    def __init__(self, node_id: str):
        self.id = node_id

    def __getitem__(self, slot: int) -> list:
        return [self.id, slot]


@dataclass
class Workflow:
    """One workflow: its API prompt, where its nodes go, and its note."""

    name: str  # file name without .json; the template browser shows it as the title
    heading: str
    summary: str
    settings: list[str]
    prompt: dict = field(default_factory=dict)
    columns: list[list[str]] = field(default_factory=list)
    sizes: dict = field(default_factory=dict)
    colors: dict = field(default_factory=dict)
    widgets: dict = field(default_factory=dict)  # node id -> {frontend-only widget: value}, e.g. the seed control
    needs_comfyui: ComfyUINeed | None = None  # None: runs on the pack's minimum, OLDEST_COMFYUI
    downloads: dict = field(default_factory=dict)  # file name -> link, where this workflow's source is not DOWNLOADS'

    @property
    def comfyui(self) -> str:
        """The ComfyUI this workflow is built with: the oldest it runs on."""
        return self.needs_comfyui.version if self.needs_comfyui else OLDEST_COMFYUI

    def download(self, file_name: str) -> str | None:
        return self.downloads.get(file_name, DOWNLOADS.get(file_name))

    def add(self, class_type: str, title: str | None = None, **inputs) -> Node:
        node_id = str(len(self.prompt) + 1)
        self.prompt[node_id] = {"class_type": class_type, "inputs": inputs}
        if title:
            self.prompt[node_id]["_meta"] = {"title": title}
        if class_type in WIDTHS:
            self.sizes[node_id] = [WIDTHS[class_type], None]
        return Node(node_id)

    def column(self, *nodes: Node) -> None:
        self.columns.append([n.id for n in nodes])

    def prompt_text(self, node: Node, negative: bool = False) -> Node:
        self.sizes[node.id] = PROMPT_SIZE
        self.colors[node.id] = RED if negative else GREEN
        return node

    def files(self) -> list[ModelItem]:
        """Every model file (and RAE folder) the loaders name, in graph order."""
        found = []
        for node in self.prompt.values():
            for name, folder in LOADER_FOLDERS.get(node["class_type"], {}).items():
                value = node["inputs"].get(name)
                item = ModelItem(folder, value, name in FOLDER_INPUTS)
                if isinstance(value, str) and value not in NOT_A_FILE and item not in found:
                    found.append(item)
        return found

    def note(self) -> str:
        lines = [f"## {self.heading}", "", self.summary, ""]
        if self.needs_comfyui:
            lines += [f"**{self.needs_comfyui.sentence}.**", ""]
        lines += ["**Files** (in `ComfyUI/models/`):", ""]
        for item in self.files():
            if item.is_folder:  # an RAE: a folder (any name; chosen in rae_name) with the files listed under it
                lines.append(f"- `{item.where}`: a folder (any name; pick it in rae_name) holding")
                lines += [f"  - `{name}`: {source}" for name, source in RAE_FOLDERS[item.name].contents()]
                continue
            if item.folder == "pid":
                checkpoint = item.name.split("/")[0]
                source = f"[nvidia/PiD]({PID_CHECKPOINTS}{checkpoint}), keep the official folder name"
            else:
                source = f"[download]({self.download(item.name)})"
            lines.append(f"- `{item.where}`: {source}")
        lines += ["", "**Recommended settings**", ""] + [f"- {s}" for s in self.settings]
        licence = ("PiD weights are NVIDIA's, for non-commercial research only (licence on the Hugging Face page); "
                   "Gemma is under the [Gemma terms](https://ai.google.dev/gemma/terms).")
        if any(item.is_folder for item in self.files()):
            licence += " The RAE encoders (DINOv2, SigLIP 2) are Apache-2.0; the RAE decoders and statistics NVIDIA's."
        lines += ["", licence]
        return "\n".join(lines)

    def models_metadata(self) -> dict:
        """ComfyUI template metadata ({node id: [{name, url, directory}]}): the frontend offers the
        download of missing stock model files. PiD's .pth files are left to the note."""
        out = {}
        for node_id, node in self.prompt.items():
            for name, folder in LOADER_FOLDERS.get(node["class_type"], {}).items():
                value = node["inputs"].get(name)
                if isinstance(value, str) and self.download(value):
                    out.setdefault(node_id, []).append({"name": value, "url": self.download(value),
                                                        "directory": folder})
        return out


def pid_loader(w: Workflow, checkpoint_folder: str, vae_name: str = "none", rae_name: str = "none") -> Node:
    return w.add(f"{PID}LoadDecoder", pid_name=pid_checkpoint(checkpoint_folder), latent_space="auto",
                 weight_dtype="bf16", vae_name=vae_name, rae_name=rae_name, attention="auto",
                 compile=False)  # fmt: skip


def pid_sampler(w: Workflow, model: Node, positive: Node, negative: Node, latent: Node, *, steps: int, cfg: float,
                sampler: str, scheduler: str, exit_step: int = 0) -> Node:  # fmt: skip
    return w.add(f"{PID}KSamplerEarlyExit", model=model[0], seed=SEED, steps=steps, cfg=cfg, sampler_name=sampler,
                 scheduler=scheduler, positive=positive[0], negative=negative[0], latent_image=latent[0], denoise=1.0,
                 exit_step=exit_step)  # fmt: skip


def pid_caption(w: Workflow, text: str, title: str) -> tuple[Node, Node]:
    """Load CLIP with Gemma-2-2B-it (type lumina2) and PiD Caption on it: the caption PiD Decode reads."""
    gemma = w.add("CLIPLoader", "Load CLIP (Gemma-2-2B-it, for PiD Caption)", clip_name=GEMMA_FILE, type="lumina2",
                  device="default")  # fmt: skip
    caption = w.add(f"{PID}Caption", title, text=text, gemma_name="none", clip=gemma[0])
    w.sizes[caption.id] = PROMPT_SIZE
    return gemma, caption


def pid_decode(w: Workflow, decoder: Node, latent: list, caption: Node, **undistilled) -> Node:
    """PiD Decode with a caption; ``undistilled`` holds the steps and cfg of an undistilled checkpoint."""
    settings = {"steps": 4, "cfg": 0.0} | undistilled
    node = w.add(f"{PID}Decode", pid_decoder=decoder[0], latent=latent, size="native 4x", steps=settings.pop("steps"),
                 seed=0, sigma=0.0, latent_space="auto", caption=caption[0], tiling="auto", tile_size=0,
                 **settings)  # fmt: skip
    w.widgets[node.id] = {"control_after_generate": SEED_CONTROL}
    return node


def save(w: Workflow, images: list, prefix: str) -> Node:
    return w.add("SaveImage", images=images, filename_prefix=f"PiD/{prefix}")


PROMPTS = {
    "fox": "a red fox curled up in fresh snow at golden hour, frost on its whiskers, detailed fur, "
    "shallow depth of field",
    "harbour": "a quiet fishing harbour at dawn, pastel houses along the quay, wooden boats with peeling paint, "
    "morning mist over the water, detailed photograph",
    "market": "an old spice market stall, heaps of saffron, paprika and cardamom in brass bowls, hand-written "
    "price cards, warm window light, highly detailed",
    "greenhouse": "inside a Victorian glass greenhouse full of ferns and orchids, wrought-iron frames, dew on the "
    "panes, soft diffuse light, intricate detail",
    "library": "a vast old library with spiral staircases, brass reading lamps and leather-bound books, dust in "
    "the sunbeams, ultra detailed",
    "street": "a rainy Tokyo side street at night, neon signs in Japanese, reflections on wet asphalt, a cyclist "
    "with a clear umbrella, cinematic, detailed",
    "lighthouse": "a red and white lighthouse on a rocky headland in a storm, waves breaking into spray, gulls in "
    "the wind, dramatic clouds, highly detailed photograph",
}
NEGATIVE = "blurry, low quality, watermark, text artifacts"
# Title of PiD Caption in the generation workflows: its text is the positive prompt, typed again.
SAME_CAPTION = "PiD Caption (the prompt's text)"


def caption_setting(text: str) -> str:
    return (f"PiD Caption: {text}, encoded by Gemma-2-2B-it from Load CLIP, type lumina2 (the `_fp8_scaled` file, "
            "half the size, also works). Less detail but no Gemma needed: delete the two nodes")  # fmt: skip


CAPTION_SETTING = caption_setting("the prompt's text (when you change the prompt, change it too)")
# ComfyUI's example.png, which the upscale workflow loads
EXAMPLE_PICTURE_CAPTION = ("a simple hand-drawn digital painting of a smiling girl with big yellow hair and a pink "
                           "dress, arms spread, on a green hill under a blue sky with white clouds")  # fmt: skip


def flux1_dev_base(w: Workflow):
    """Flux.1-dev as ComfyUI's templates load it: diffusion model, dual CLIP (flux), FluxGuidance, cfg 1."""
    unet = w.add("UNETLoader", unet_name="flux1-dev.safetensors", weight_dtype="default")
    clip = w.add("DualCLIPLoader", clip_name1="clip_l.safetensors", clip_name2="t5xxl_fp16.safetensors", type="flux",
                 device="default")  # fmt: skip
    text = w.prompt_text(w.add("CLIPTextEncode", "Prompt", text=PROMPTS["fox"], clip=clip[0]))
    guidance = w.add("FluxGuidance", conditioning=text[0], guidance=3.5)
    negative = w.add("ConditioningZeroOut", "Negative (zero: cfg is 1)", conditioning=text[0])
    latent = w.add("EmptySD3LatentImage", "Empty Latent Image (512 px)", width=512, height=512, batch_size=1)
    return unet, clip, text, guidance, negative, latent


def flux1_dev() -> Workflow:
    w = Workflow(
        "pid_flux1_dev_2048px_early_exit", "Flux.1-dev 512 px → PiD 2048 px (early exit)",
        "PiD KSampler stops Flux.1-dev at step 24 of 28 (exit_step 0 = auto) and PiD Decode finishes the picture in "
        "pixel space at 4× the latent size: 512 px → **2048 px**.",
        ["512×512 latent with the 2k checkpoint (it is trained for about 2048 px output)",
         "28 steps, cfg 1.0, FluxGuidance 3.5, euler / simple; exit_step 0 (auto: step 24 of 28)",
         "PiD Decode: size native 4x, 4 steps",
         CAPTION_SETTING,
         "1024 px → 4096: use the v1.5 2kto4k checkpoint (see the Z-Image-Turbo workflow)"],
    )  # fmt: skip
    return flux1_dev_early_exit(w, "PiD_res2k_sr4x_official_flux_distill_4step", "flux1_dev_2048")


def flux1_dev_early_exit(w: Workflow, checkpoint_folder: str, prefix: str, **undistilled) -> Workflow:
    """Flux.1-dev at 512 px stopped early by PiD KSampler, decoded by the PiD checkpoint in ``checkpoint_folder``."""
    unet, clip, text, guidance, negative, latent = flux1_dev_base(w)
    decoder = pid_loader(w, checkpoint_folder)
    gemma, caption = pid_caption(w, PROMPTS["fox"], SAME_CAPTION)
    sampled = pid_sampler(w, unet, guidance, negative, latent, steps=28, cfg=1.0, sampler="euler", scheduler="simple")
    image = pid_decode(w, decoder, sampled[0], caption, **undistilled)
    out = save(w, image[0], prefix)
    w.column(unet, clip, gemma, latent, decoder)
    w.column(text, guidance, negative, caption)
    w.column(sampled, image)
    w.column(out)
    w.sizes[out.id] = [420, 460]
    return w


def flux1_dev_vs_vae() -> Workflow:
    w = Workflow(
        "pid_flux1_dev_2048px_vs_vae_decode", "Flux.1-dev: VAE decode vs PiD 2048 px, side by side",
        "One run, two endings. PiD KSampler stops at step 24 of 28; PiD Decode turns that latent into a 2048 px "
        "picture (right). KSamplerAdvanced samples the same latent on from step 24 to the end, as a normal run "
        "would, and VAE Decode makes the usual 512 px picture (left, scaled up to the same height by Image Stitch).",
        ["exit_step of PiD KSampler and start_at_step of KSamplerAdvanced must be equal (24 of 28 steps)",
         "KSamplerAdvanced: add_noise disable, same steps, cfg, sampler and scheduler as PiD KSampler",
         "28 steps, cfg 1.0, FluxGuidance 3.5, euler / simple; 512×512 latent with the 2k checkpoint",
         "PiD Decode: size native 4x, 4 steps",
         CAPTION_SETTING],
    )  # fmt: skip
    unet, clip, text, guidance, negative, latent = flux1_dev_base(w)
    vae = w.add("VAELoader", vae_name="ae.safetensors")
    decoder = pid_loader(w, "PiD_res2k_sr4x_official_flux_distill_4step")
    gemma, caption = pid_caption(w, PROMPTS["fox"], SAME_CAPTION)
    exit_step = 24
    sampled = pid_sampler(w, unet, guidance, negative, latent, steps=28, cfg=1.0, sampler="euler", scheduler="simple",
                          exit_step=exit_step)  # fmt: skip
    finished = w.add("KSamplerAdvanced", "KSamplerAdvanced (finish the run)", model=unet[0], add_noise="disable",
                     noise_seed=SEED, steps=28, cfg=1.0, sampler_name="euler", scheduler="simple", positive=guidance[0],
                     negative=negative[0], latent_image=sampled[0], start_at_step=exit_step, end_at_step=10000,
                     return_with_leftover_noise="disable")  # fmt: skip
    vae_image = w.add("VAEDecode", "VAE Decode (512 px)", samples=finished[0], vae=vae[0])
    pid_image = pid_decode(w, decoder, sampled[0], caption)
    both = w.add("ImageStitch", "VAE (left) | PiD (right)", image1=pid_image[0], direction="left",
                 match_image_size=True, spacing_width=16, spacing_color="white", image2=vae_image[0])  # fmt: skip
    out = save(w, both[0], "flux1_dev_vae_vs_pid")
    w.column(unet, clip, vae, gemma, latent, decoder)
    w.column(text, guidance, negative, caption)
    w.column(sampled, pid_image)
    w.column(finished, vae_image)
    w.column(both, out)
    w.sizes[out.id] = [760, 440]
    return w


def flux1_dev_undistilled() -> Workflow:
    w = Workflow(
        "pid_flux1_dev_2048px_undistilled", "Flux.1-dev 512 px → undistilled PiD 2048 px (best quality)",
        "The same early exit as the 2048 px workflow, decoded by NVIDIA's **undistilled** v1.5 Flux checkpoint: 25 "
        "DPM-Solver steps with guidance (cfg 5) towards PiD Caption's text and away from PiD's negative prompt, "
        "instead of the student's 4 steps. Each step runs the network on both branches, so a decode takes about "
        "12× the student's time, for NVIDIA's best pictures.",
        ["512×512 latent: the v1.5 2kto4k checkpoint decodes it to 2048 px (it is trained for 2048-4096 px)",
         "28 steps, cfg 1.0, FluxGuidance 3.5, euler / simple; exit_step 0 (auto: step 24 of 28)",
         "PiD Decode: 25 steps, cfg 5 (NVIDIA's settings for the undistilled checkpoints; 0 in either picks "
         "them too); cfg 1 halves the time, without guidance",
         CAPTION_SETTING + ". PiD Caption also brings the negative prompt the guidance needs",
         "Faster: the 4-step student (PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step) in the same loader, "
         "with steps 4"],
    )  # fmt: skip
    return flux1_dev_early_exit(w, "PiD_v1pt5_res2kto4k_sr4x_official_flux_undistilled", "flux1_dev_2048_undistilled",
                                steps=25, cfg=5.0)


def z_image_turbo() -> Workflow:
    w = Workflow(
        "pid_z_image_turbo_4096px", "Z-Image-Turbo 1024 px → PiD 4096 px",
        "Z-Image-Turbo is distilled to a few steps, so its run is not cut short: PiD KSampler runs all 9 steps "
        "(auto exit decodes the final latent of runs of 10 steps or fewer) and PiD Decode writes a **4096 px** "
        "picture from the 1024 px latent. Z-Image uses the Flux VAE's latents, so the Flux PiD checkpoint decodes "
        "them.",
        ["1024×1024 latent with the v1.5 2kto4k checkpoint (trained for 2048-4096 px output)",
         "9 steps, cfg 1.0, res_multistep / simple, ModelSamplingAuraFlow shift 3 (as ComfyUI's template)",
         "exit_step 0 (auto: the final latent, sigma 0)",
         "PiD Decode: size native 4x, 4 steps",
         CAPTION_SETTING + ". Gemma needs its own Load CLIP: Z-Image's qwen_3_4b (also type lumina2) is no "
         "Gemma-2 and is refused by PiD Caption"],
    )  # fmt: skip
    unet = w.add("UNETLoader", unet_name="z_image_turbo_bf16.safetensors", weight_dtype="default")
    clip = w.add("CLIPLoader", clip_name="qwen_3_4b.safetensors", type="lumina2", device="default")
    model = w.add("ModelSamplingAuraFlow", model=unet[0], shift=3.0)
    text = w.prompt_text(w.add("CLIPTextEncode", "Prompt", text=PROMPTS["harbour"], clip=clip[0]))
    negative = w.add("ConditioningZeroOut", "Negative (zero: cfg is 1)", conditioning=text[0])
    latent = w.add("EmptySD3LatentImage", "Empty Latent Image (1024 px)", width=1024, height=1024, batch_size=1)
    decoder = pid_loader(w, "PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step")
    gemma, caption = pid_caption(w, PROMPTS["harbour"], SAME_CAPTION)
    sampled = pid_sampler(w, model, text, negative, latent, steps=9, cfg=1.0, sampler="res_multistep",
                          scheduler="simple")  # fmt: skip
    image = pid_decode(w, decoder, sampled[0], caption)
    out = save(w, image[0], "z_image_turbo_4096")
    w.column(unet, clip, gemma, latent, decoder)
    w.column(model, text, negative, caption)
    w.column(sampled, image)
    w.column(out)
    w.sizes[out.id] = [420, 460]
    return w


def sdxl() -> Workflow:
    w = Workflow(
        "pid_sdxl_4096px_early_exit", "SDXL 1024 px → PiD 4096 px (early exit)",
        "PiD KSampler stops SDXL at step 26 of 30 (exit_step 0 = auto) and PiD Decode finishes the picture in pixel "
        "space: 1024 px → **4096 px**. PiD reads SDXL's variance-preserving noise level from the latent's metadata.",
        ["1024×1024 latent (or another SDXL resolution) with the 2kto4k SDXL checkpoint",
         "30 steps, cfg 5.0, euler / normal; exit_step 0 (auto: step 26 of 30)",
         "PiD Decode: size native 4x, 4 steps",
         CAPTION_SETTING],
    )  # fmt: skip
    ckpt = w.add("CheckpointLoaderSimple", ckpt_name="sd_xl_base_1.0.safetensors")
    positive = w.prompt_text(w.add("CLIPTextEncode", "Positive prompt", text=PROMPTS["market"], clip=ckpt[1]))
    negative = w.prompt_text(w.add("CLIPTextEncode", "Negative prompt", text=NEGATIVE, clip=ckpt[1]), negative=True)
    latent = w.add("EmptyLatentImage", "Empty Latent Image (1024 px)", width=1024, height=1024, batch_size=1)
    decoder = pid_loader(w, "PiD_res2kto4k_sr4x_official_sdxl_distill_4step")
    gemma, caption = pid_caption(w, PROMPTS["market"], SAME_CAPTION)
    sampled = pid_sampler(w, ckpt, positive, negative, latent, steps=30, cfg=5.0, sampler="euler", scheduler="normal")
    image = pid_decode(w, decoder, sampled[0], caption)
    out = save(w, image[0], "sdxl_4096")
    w.column(ckpt, gemma, latent, decoder)
    w.column(positive, negative, caption)
    w.column(sampled, image)
    w.column(out)
    w.sizes[out.id] = [420, 460]
    return w


def sd35() -> Workflow:
    w = Workflow(
        "pid_sd3.5_large_4096px_early_exit", "SD3.5 Large 1024 px → PiD 4096 px (early exit)",
        "PiD KSampler stops SD3.5 at step 24 of 28 (exit_step 0 = auto) and PiD Decode finishes the picture in pixel "
        "space: 1024 px → **4096 px**. The same graph works for SD3 Medium and SD3.5 Medium checkpoints.",
        ["1024×1024 latent with the 2kto4k SD3 checkpoint (the 2k one is for 512 px → 2048)",
         "28 steps, cfg 4.5, euler / sgm_uniform; exit_step 0 (auto: step 24 of 28)",
         "PiD Decode: size native 4x, 4 steps",
         CAPTION_SETTING],
    )  # fmt: skip
    ckpt = w.add("CheckpointLoaderSimple", ckpt_name="sd3.5_large_fp8_scaled.safetensors")
    positive = w.prompt_text(w.add("CLIPTextEncode", "Positive prompt", text=PROMPTS["greenhouse"], clip=ckpt[1]))
    negative = w.prompt_text(w.add("CLIPTextEncode", "Negative prompt", text=NEGATIVE, clip=ckpt[1]), negative=True)
    latent = w.add("EmptySD3LatentImage", "Empty Latent Image (1024 px)", width=1024, height=1024, batch_size=1)
    decoder = pid_loader(w, "PiD_res2kto4k_sr4x_official_sd3_distill_4step")
    gemma, caption = pid_caption(w, PROMPTS["greenhouse"], SAME_CAPTION)
    sampled = pid_sampler(w, ckpt, positive, negative, latent, steps=28, cfg=4.5, sampler="euler",
                          scheduler="sgm_uniform")  # fmt: skip
    image = pid_decode(w, decoder, sampled[0], caption)
    out = save(w, image[0], "sd3.5_large_4096")
    w.column(ckpt, gemma, latent, decoder)
    w.column(positive, negative, caption)
    w.column(sampled, image)
    w.column(out)
    w.sizes[out.id] = [420, 460]
    return w


def flux2_dev() -> Workflow:
    w = Workflow(
        "pid_flux2_dev_4096px_early_exit", "Flux.2-dev 1024 px → PiD 4096 px (early exit)",
        "Flux.2 is sampled as in ComfyUI's template (SamplerCustomAdvanced with Flux2Scheduler). SplitSigmas stops "
        "the run at step 46 of 50; PiD Tag Latent records where it stopped, and PiD Decode finishes the picture in "
        "pixel space: 1024 px → **4096 px**.",
        ["1024×1024 latent with the v1.5 2kto4k Flux.2 checkpoint; Flux2Scheduler width/height = the latent's",
         "50 steps, FluxGuidance 4.0, euler; SplitSigmas step 46 (the reference's exit, 46 of 50)",
         "fewer steps: split at the same fraction (e.g. 28 → 26)",
         "PiD Decode: size native 4x, 4 steps",
         CAPTION_SETTING],
    )  # fmt: skip
    return flux2_custom_sampler(w, "flux2_dev_fp8mixed.safetensors", "mistral_3_small_flux2_bf16.safetensors",
                                PROMPTS["library"], "flux2_dev_4096", steps=50, guidance=4.0, exit_step=46)


def flux2_klein_4b() -> Workflow:
    w = Workflow(
        "pid_flux2_klein_4b_4096px", "Flux.2 Klein 4B 1024 px → PiD 4096 px",
        "Flux.2 Klein 4B (distilled) is sampled as in ComfyUI's Klein template: 4 steps of SamplerCustomAdvanced with "
        "Flux2Scheduler, cfg 1. A distilled run is not cut short: PiD Tag Latent marks its final latent (sigma 0 from "
        "the schedule's last value), and PiD Decode draws it at **4096 px**. Klein makes Flux.2 latents, so the "
        "Flux.2 PiD checkpoint decodes them.",
        ["1024×1024 latent with the v1.5 2kto4k Flux.2 checkpoint; Flux2Scheduler width/height = the latent's",
         "4 steps, euler, no guidance (BasicGuider: the distilled model runs at cfg 1, without a negative prompt)",
         "PiD Decode: size native 4x, 4 steps",
         CAPTION_SETTING + ". Gemma needs its own Load CLIP: Klein's qwen_3_4b is no Gemma-2",
         "Klein 9B: the same graph with its own diffusion model and text encoder"],
        needs_comfyui=ComfyUINeed("0.33", "Flux.2 Klein support: 0.3.75 has no Klein text encoder"),
        downloads={"qwen_3_4b.safetensors": "https://huggingface.co/Comfy-Org/flux2-klein/resolve/main/split_files/"
                   "text_encoders/qwen_3_4b.safetensors"},
    )  # fmt: skip
    return flux2_custom_sampler(w, "flux-2-klein-4b.safetensors", "qwen_3_4b.safetensors", PROMPTS["lighthouse"],
                                "flux2_klein_4b_4096", steps=4)


def flux2_custom_sampler(w: Workflow, unet_name: str, clip_name: str, prompt: str, prefix: str, *, steps: int,
                         guidance: float | None = None, exit_step: int | None = None) -> Workflow:
    """A Flux.2 model at 1024 px as ComfyUI's templates sample it (SamplerCustomAdvanced, Flux2Scheduler; FluxGuidance
    for Flux.2-dev), stopped after ``exit_step`` by SplitSigmas or run to the end, tagged by PiD Tag Latent with the
    sigmas it ran and decoded by the v1.5 Flux.2 checkpoint."""
    unet = w.add("UNETLoader", unet_name=unet_name, weight_dtype="default")
    clip = w.add("CLIPLoader", clip_name=clip_name, type="flux2", device="default")
    text = w.prompt_text(w.add("CLIPTextEncode", "Prompt", text=prompt, clip=clip[0]))
    conditioning = [text]
    if guidance is not None:
        conditioning.append(w.add("FluxGuidance", conditioning=text[0], guidance=guidance))
    guider = w.add("BasicGuider", model=unet[0], conditioning=conditioning[-1][0])
    noise = w.add("RandomNoise", noise_seed=SEED)
    sampler = w.add("KSamplerSelect", sampler_name="euler")
    schedule = w.add("Flux2Scheduler", steps=steps, width=1024, height=1024)
    sigmas = [schedule]
    if exit_step is not None:
        sigmas.append(w.add("SplitSigmas", f"SplitSigmas (exit at step {exit_step})", sigmas=schedule[0],
                            step=exit_step))  # fmt: skip
    latent = w.add("EmptyFlux2LatentImage", "Empty Flux.2 Latent (1024 px)", width=1024, height=1024, batch_size=1)
    sampled = w.add("SamplerCustomAdvanced", noise=noise[0], guider=guider[0], sampler=sampler[0],
                    sigmas=sigmas[-1][0], latent_image=latent[0])  # fmt: skip
    tagged = w.add(f"{PID}TagLatent", latent=sampled[0], latent_space="from model", sigma=0.0, sigmas=sigmas[-1][0],
                   model=unet[0])  # fmt: skip
    decoder = pid_loader(w, "PiD_v1pt5_res2kto4k_sr4x_official_flux2_distill_4step")
    gemma, caption = pid_caption(w, prompt, SAME_CAPTION)
    image = pid_decode(w, decoder, tagged[0], caption)
    out = save(w, image[0], prefix)
    w.column(unet, clip, gemma, latent, decoder)
    w.column(*conditioning, guider, caption)
    w.column(noise, sampler, *sigmas)
    w.column(sampled, tagged, image)
    w.column(out)
    w.sizes[out.id] = [420, 460]
    return w


def qwen_image() -> Workflow:
    w = Workflow(
        "pid_qwen_image_4096px_early_exit", "Qwen-Image 1024 px → PiD 4096 px (early exit)",
        "PiD KSampler stops Qwen-Image at step 44 of 50 (exit_step 0 = auto) and PiD Decode finishes the picture in "
        "pixel space: 1024 px → **4096 px**.",
        ["1024×1024 latent with the v1.5 2kto4k Qwen-Image checkpoint (Qwen-Image's 1328 px would give 5312 px, "
         "beyond the 4096 px it was trained for: use size 4096 in PiD Decode for it)",
         "50 steps, cfg 4.0, euler / simple, ModelSamplingAuraFlow shift 3.1 (as ComfyUI's template); "
         "exit_step 0 (auto: step 44 of 50)",
         "PiD Decode: size native 4x, 4 steps",
         CAPTION_SETTING],
    )  # fmt: skip
    unet = w.add("UNETLoader", unet_name="qwen_image_fp8_e4m3fn.safetensors", weight_dtype="default")
    clip = w.add("CLIPLoader", clip_name="qwen_2.5_vl_7b_fp8_scaled.safetensors", type="qwen_image", device="default")
    model = w.add("ModelSamplingAuraFlow", model=unet[0], shift=3.1)
    positive = w.prompt_text(w.add("CLIPTextEncode", "Positive prompt", text=PROMPTS["street"], clip=clip[0]))
    negative = w.prompt_text(w.add("CLIPTextEncode", "Negative prompt", text="", clip=clip[0]), negative=True)
    latent = w.add("EmptySD3LatentImage", "Empty Latent Image (1024 px)", width=1024, height=1024, batch_size=1)
    decoder = pid_loader(w, "PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_distill_4step")
    gemma, caption = pid_caption(w, PROMPTS["street"], SAME_CAPTION)
    sampled = pid_sampler(w, model, positive, negative, latent, steps=50, cfg=4.0, sampler="euler", scheduler="simple")
    image = pid_decode(w, decoder, sampled[0], caption)
    out = save(w, image[0], "qwen_image_4096")
    w.column(unet, clip, gemma, latent, decoder)
    w.column(model, positive, negative, caption)
    w.column(sampled, image)
    w.column(out)
    w.sizes[out.id] = [420, 460]
    return w


def upscale_image() -> Workflow:
    w = Workflow(
        "pid_upscale_image_4x", "Upscale a picture 4× with PiD",
        "PiD Encode Image turns the picture into a clean latent with the VAE chosen in Load PiD Decoder, and PiD "
        "Decode redraws it at **4× its size** (a 1024 px picture becomes 4096 px). The picture is centre-cropped to a "
        "multiple of 8 px.",
        ["pictures of 512-1024 px with the v1.5 2kto4k checkpoint (output 2048-4096 px); up to about 512 px the 2k "
         "checkpoint also works",
         "the VAE must be the one of the checkpoint's family: ae.safetensors (Flux VAE) for the Flux checkpoints",
         "PiD Decode: size native 4x, 4 steps, sigma 0 (set by PiD Encode Image)",
         caption_setting("a sentence that says what your picture shows and its style (the text here describes "
                         "ComfyUI's example picture: replace it)")],
    )  # fmt: skip
    picture = w.add("LoadImage", image="example.png")
    decoder = pid_loader(w, "PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step", vae_name="ae.safetensors")
    gemma, caption = pid_caption(w, EXAMPLE_PICTURE_CAPTION, "PiD Caption (describe your picture)")
    latent = w.add(f"{PID}EncodeImage", pid_decoder=decoder[0], image=picture[0])
    image = pid_decode(w, decoder, latent[0], caption)
    out = save(w, image[0], "upscaled_4x")
    w.column(picture, decoder, gemma)
    w.column(latent, caption)
    w.column(image)
    w.column(out)
    w.sizes[picture.id] = [340, 400]
    w.sizes[out.id] = [420, 460]
    return w


# The caption of the DINOv2 workflow: an ImageNet-1k class name, as the reference captions its DINOv2 decodes (its
# RAE generator is class-conditional); class 917 of its prompts/imagenet_classes.txt fits ComfyUI's example picture.
IMAGENET_CLASS_CAPTION = "comic book"


def rae_upscale(name: str, heading: str, checkpoint_folder: str, rae_name: str, *, encoder_px: int, native_px: int,
                factor: int, caption: tuple[str, str], caption_note: str) -> Workflow:  # fmt: skip
    """Load Image -> PiD Encode Image with an RAE -> PiD Decode at 2048 px, and the RAE's own decode beside it."""
    w = Workflow(
        name, heading,
        f"PiD Encode Image centre-crops the picture to a square and encodes it with the RAE chosen in Load PiD Decoder "
        f"(its encoder sees {encoder_px} px); PiD Decode draws that latent at **2048 px** ({factor}× the RAE's native "
        f"{native_px} px). PiD RAE Decode decodes the same latent with the RAE's own decoder at {native_px} px, for "
        "comparison.",
        [f"pictures of {encoder_px} px or more: the centred square is resized to the encoder's {encoder_px} px",
         f"PiD Decode: size native 4x (for this latent: {factor}×, 2048 px, what the checkpoint was trained for), "
         "4 steps, sigma 0 (set by PiD Encode Image)",
         caption_setting(caption_note)],
    )  # fmt: skip
    picture = w.add("LoadImage", image="example.png")
    decoder = pid_loader(w, checkpoint_folder, rae_name=rae_name)
    gemma, caption_node = pid_caption(w, *caption)
    latent = w.add(f"{PID}EncodeImage", pid_decoder=decoder[0], image=picture[0])
    image = pid_decode(w, decoder, latent[0], caption_node)
    native = w.add(f"{PID}RAEDecode", f"PiD RAE Decode (native {native_px} px)", pid_decoder=decoder[0],
                   latent=latent[0])  # fmt: skip
    out = save(w, image[0], f"{rae_name}_rae_2048")
    out_native = save(w, native[0], f"{rae_name}_rae_native_{native_px}")
    w.column(picture, decoder, gemma)
    w.column(latent, caption_node)
    w.column(image, native)
    w.column(out, out_native)
    w.sizes[picture.id] = [340, 400]
    w.sizes[out.id] = [420, 460]
    w.sizes[out_native.id] = [420, 340]
    return w


def upscale_dinov2_rae() -> Workflow:
    return rae_upscale(
        "pid_upscale_dinov2_rae_2048px", "Upscale a picture with the DINOv2 RAE to 2048 px",
        "PiD_res2k_sr4x_official_dinov2_distill_4step", "dinov2", encoder_px=448, native_px=512, factor=4,
        caption=(IMAGENET_CLASS_CAPTION, "PiD Caption (an ImageNet class name)"),
        caption_note="the ImageNet-1k class name of what the picture shows, as the reference captions its DINOv2 "
        "decodes (its RAE generator is class-conditional; `comic book` for ComfyUI's example picture, e.g. "
        "`golden retriever`, `tabby` or `lakeside` for yours)",
    )


def upscale_siglip_rae() -> Workflow:
    return rae_upscale(
        "pid_upscale_siglip_scale_rae_2048px", "Upscale a picture with the SigLIP-2 Scale-RAE (8×) to 2048 px",
        "PiD_res2k_sr8x_official_siglip_distill_4step", "siglip", encoder_px=224, native_px=256, factor=8,
        caption=(EXAMPLE_PICTURE_CAPTION, "PiD Caption (describe your picture)"),
        caption_note="a sentence that says what your picture shows, as the reference captions its SigLIP decodes "
        "with the prompt the Scale-RAE generated from (the text here describes ComfyUI's example picture: replace it)",
    )


def workflows() -> list[Workflow]:
    makers = [flux1_dev, flux1_dev_vs_vae, flux1_dev_undistilled, z_image_turbo, sdxl, sd35, flux2_dev, flux2_klein_4b,
              qwen_image, upscale_image, upscale_dinov2_rae, upscale_siglip_rae]  # fmt: skip
    return [make() for make in makers]


# --- the frontend driver -----------------------------------------------------------------------------
class FrontendError(RuntimeError):
    pass


class Frontend:
    """``frontend.js`` in a child process: one headless Chromium page on the ComfyUI at ``url``."""

    def __init__(self, url: str, timeout: float = 180):
        missing = [p for p in (PLAYWRIGHT,) if not p.exists()]
        if missing:
            raise FrontendError(f"{missing[0]} is missing: run `bash scripts/setup_frontend.sh` first.")
        self._stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            ["node", str(FRONTEND_JS), url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            text=True, cwd=REPO_ROOT,
        )  # fmt: skip
        self.ready_ms = self._answer(timeout)["ready_ms"]

    def _answer(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if ready:
                line = self.process.stdout.readline()
                break
            if time.monotonic() >= deadline:
                self.close()
                raise FrontendError(f"frontend.js gave no answer within {timeout:.0f} s. {self._stderr_tail()}")
        if not line:
            raise FrontendError(f"frontend.js exited (code {self.process.wait()}). {self._stderr_tail()}")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise FrontendError(f"frontend.js: {answer.get('error')}")
        return answer

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace")[-3000:]
        return f"Its stderr:\n{text}" if text else ""

    def request(self, cmd: str, timeout: float = 120, **fields) -> dict:
        self.process.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        self.process.stdin.flush()
        return self._answer(timeout)

    def check(self, workflow: dict) -> dict:
        return self.request("check", workflow=workflow)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"cmd": "close"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(timeout=20)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self._stderr.close()


# --- building ----------------------------------------------------------------------------------------
def load_module(name: str, path: Path):
    """Import a file that is not on the import path (e.g. a conftest.py) as module ``name``, once."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build(frontend: Frontend, workflow: Workflow, out_dir: Path) -> Path:
    answer = frontend.request(
        "build", name=workflow.name, prompt=workflow.prompt, columns=workflow.columns, sizes=workflow.sizes,
        colors=workflow.colors, widgets=workflow.widgets, models=workflow.models_metadata(),
        note={"title": "Read me: files and settings", "text": workflow.note(), "width": NOTE_WIDTH},
        thumbnail=str(out_dir / f"{workflow.name}.jpg"),
    )  # fmt: skip
    path = out_dir / f"{workflow.name}.json"
    path.write_text(json.dumps(answer["workflow"], indent=2, ensure_ascii=False) + "\n")
    return path


def server_harness(comfyui: str) -> types.ModuleType:
    """``tests/conftest.py`` (the test server) for the ComfyUI ``comfyui``, which it reads from PID_COMFYUI when
    imported: loaded once per version, under a name of its own."""
    saved = os.environ.get("PID_COMFYUI")
    os.environ["PID_COMFYUI"] = comfyui
    try:
        return load_module(f"pid_tests_conftest_{comfyui}", REPO_ROOT / "tests" / "conftest.py")
    finally:
        if saved is None:
            os.environ.pop("PID_COMFYUI")
        else:
            os.environ["PID_COMFYUI"] = saved


def write_placeholders(models_dir: Path, selected: list[Workflow]) -> None:
    """Empty files (and RAE folders) under the names the loaders give: listed by the server, so that current
    frontends do not mark the loaders as missing their files."""
    for item in {item for workflow in selected for item in workflow.files()}:
        path = models_dir / item.folder / item.name
        if item.is_folder:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()


def build_with(comfyui: str, selected: list[Workflow]) -> None:
    """Builds ``selected`` in the frontend of a test server running the ComfyUI ``comfyui``."""
    comfy = server_harness(comfyui)
    with tempfile.TemporaryDirectory(prefix="pid-build-workflows-") as tmp:
        server = comfy.start_server(Path(tmp) / "base")
        # ComfyUI's own sample picture, which the upscale workflow loads (and its thumbnail shows).
        shutil.copy(comfy.COMFYUI_DIR / "input" / "example.png", server.input_dir)
        write_placeholders(server.models_dir, selected)
        frontend = None
        try:
            frontend = Frontend(server.url)
            WORKFLOWS_DIR.mkdir(exist_ok=True)
            for workflow in selected:
                path = build(frontend, workflow, WORKFLOWS_DIR)
                print(f"wrote {path.relative_to(REPO_ROOT)} and its .jpg (ComfyUI {server.comfyui_version})")
        finally:
            if frontend is not None:
                frontend.close()
            comfy.stop(server.process)


def main(argv: list[str]) -> int:
    selected = [w for w in workflows() if not argv or any(a in w.name for a in argv)]
    if not selected:
        print(f"no workflow matches {argv}", file=sys.stderr)
        return 2
    for comfyui in sorted({w.comfyui for w in selected}, key=version_tuple):
        build_with(comfyui, [w for w in selected if w.comfyui == comfyui])
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv[1:]))
