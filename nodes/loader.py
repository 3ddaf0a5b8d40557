"""Load PiD Decoder: a PiD checkpoint (plus its matching VAE or RAE) wrapped for ComfyUI's model management."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from comfy_api.latest import io

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import folder_paths
import nodes as comfy_nodes

from ..pid_core.api import PRECISIONS, build_network
from ..pid_core.checkpoint import CheckpointInfo, load_checkpoint
from ..pid_core.config import LatentSpace
from ..pid_core.rae import load_rae
from ..pid_core.runtime import ATTENTION_BACKENDS, compile_blocks
from . import model_family, paths
from .common import CATEGORY, NODE_PREFIX, PiDDecoderType

log = logging.getLogger("comfyui-pid")

AUTO = "auto"
NONE = "none"


@dataclass
class PiDDecoderModel:
    """What flows through a PID_DECODER socket."""

    patcher: comfy.model_patcher.ModelPatcher
    info: CheckpointInfo
    vae: object | None  # comfy.sd.VAE, for PiD Encode Image
    rae: comfy.model_patcher.ModelPatcher | None = None  # of a pid_core.rae.RAE, for PiD Encode Image and RAE Decode
    attention: str = AUTO  # the scaled-dot-product kernel PiD Decode asks for

    @property
    def space(self) -> LatentSpace | None:
        return self.info.space


def check_vae(vae, vae_name: str, info: CheckpointInfo, pid_name: str) -> None:
    """Refuse a VAE whose weights belong to another family than the checkpoint's; warn when only its file name
    says another family (Flux.1 and SD3 VAEs have the same weights' shapes: an SD3 VAE with a Flux checkpoint
    gives wrong colours)."""
    channels = getattr(vae, "latent_channels", None)
    if channels != info.config.latent_channels:
        raise ValueError(
            f"The VAE {vae_name} makes {channels}-channel latents, but {pid_name} decodes "
            f"{info.config.latent_channels}-channel ones: pick the VAE of the model family this PiD "
            "checkpoint was made for, or none."
        )
    own = (info.space,) if info.space is not None else info.candidates
    allowed = [s for s in model_family.vae_spaces(vae) if s in own]
    if not allowed:
        vae_families = "/".join(model_family.family_name(s) for s in model_family.vae_spaces(vae))
        raise ValueError(
            f"The VAE {vae_name} is a {vae_families} VAE, but {pid_name} decodes "
            f"{'/'.join(model_family.family_name(s) for s in own)} latents: pick the VAE of that family, or none."
        )
    named = model_family.vae_family_from_name(vae_name)
    if named is not None and named not in {model_family.family_name(s) for s in allowed}:
        log.warning(
            "PiD: by its name, the VAE %s is for %s models, but %s decodes %s latents; if so, pictures encoded with "
            "it come out in wrong colours (pick the VAE of that family; Flux.1 and SD3 VAEs have the same shapes, so "
            "their weights cannot tell them apart).",
            vae_name, named, pid_name, "/".join(model_family.family_name(s) for s in allowed),
        )


def load_rae_patcher(rae_name: str, info: CheckpointInfo, weight_dtype: str) -> comfy.model_patcher.ModelPatcher:
    rae = load_rae(paths.rae_parts(rae_name), dtype=PRECISIONS[weight_dtype], operations=comfy.ops.manual_cast)
    rae.check_matches(info)
    log.info("PiD: loaded the %s from models/pid/rae/%s", rae.describe(), rae_name)
    return comfy.model_patcher.ModelPatcher(rae, load_device=mm.vae_device(), offload_device=mm.vae_offload_device())


def load_decoder(
    pid_name: str, latent_space: str, weight_dtype: str, vae_name: str, rae_name: str = NONE,
    attention: str = AUTO, compiled: bool = False,
) -> PiDDecoderModel:
    space = None if latent_space == AUTO else latent_space
    loaded = load_checkpoint(paths.checkpoint_path(pid_name), space=space)
    info = loaded.info
    # manual_cast layers cast each weight to the compute dtype/device, which also lets ComfyUI keep part of
    # the weights off the GPU (low-VRAM mode)
    network = build_network(loaded, PRECISIONS[weight_dtype], "cpu", operations=comfy.ops.manual_cast)
    if compiled:  # each block compiles at its first call per input shape
        compile_blocks(network)
    patcher = comfy.model_patcher.ModelPatcher(
        network, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )
    vae = None
    if vae_name != NONE:
        (vae,) = comfy_nodes.VAELoader().load_vae(vae_name)
        check_vae(vae, vae_name, info, pid_name)
    log.info(
        "PiD: loaded %s (%s, %s, training %s, space %s)", pid_name, info.version, info.file_format, info.training,
        info.space.value if info.space else "undecided",
    )
    rae = load_rae_patcher(rae_name, info, weight_dtype) if rae_name != NONE else None
    return PiDDecoderModel(patcher, info, vae, rae, attention)


class LoadPiDDecoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{NODE_PREFIX}LoadDecoder",
            display_name="Load PiD Decoder",
            category=CATEGORY,
            description=(
                "Loads a PiD pixel diffusion decoder (official model_ema_bf16.pth, a .safetensors conversion or a "
                "Comfy-Org repack) and detects its variant from the weights. Optionally loads the matching VAE "
                "(or, for the DINOv2 and SigLIP checkpoints, the RAE), used by PiD Encode Image."
            ),
            inputs=[
                io.Combo.Input(
                    "pid_name", options=paths.checkpoint_names(),
                    tooltip="PiD checkpoint from models/pid (or a PiD repack in models/diffusion_models).",
                ),
                io.Combo.Input(
                    "latent_space", options=[AUTO, *LatentSpace.names()], default=AUTO,
                    tooltip="Which model family's latents this decoder reads. 'auto' reads it from the weights or "
                    "the file path; the 16-channel Flux/SD3/Qwen-Image checkpoints cannot be told apart by their "
                    "weights, and PiD KSampler tells PiD Decode the family of the model that made the latent.",
                ),
                io.Combo.Input(
                    "weight_dtype", options=list(PRECISIONS), default="bf16",
                    tooltip="bf16 keeps the weights at half the reference's memory; fp32 matches the reference "
                    "exactly at twice the memory.",
                ),
                io.Combo.Input(
                    "vae_name", options=[NONE, *folder_paths.get_filename_list("vae")], default=NONE,
                    tooltip="The VAE of the same model family (needed by PiD Encode Image to upscale pictures).",
                ),
                io.Combo.Input(
                    "rae_name", options=[NONE, *paths.rae_names()], default=NONE, optional=True,
                    tooltip="For the DINOv2 and SigLIP checkpoints: the RAE folder in models/pid/rae/ (encoder, "
                    "decoder and statistics), needed by PiD Encode Image and PiD RAE Decode.",
                ),
                io.Combo.Input(
                    "attention", options=list(ATTENTION_BACKENDS), default=AUTO, optional=True,
                    tooltip="Attention kernel: auto lets PyTorch choose; math always works; flash/efficient/cudnn "
                    "force a fused kernel. A call that gives NaN is redone with math (some fused kernels do on AMD).",
                ),
                io.Boolean.Input(
                    "compile", default=False, optional=True,
                    tooltip="torch.compile the network's blocks: faster decodes on a GPU after a slow first decode "
                    "at each new output or tile size. Needs a working Triton (GPU) or C++ compiler (CPU).",
                ),
            ],
            outputs=[PiDDecoderType.Output(display_name="pid_decoder")],
        )

    @classmethod
    def execute(
        cls, pid_name: str, latent_space: str, weight_dtype: str, vae_name: str, rae_name: str = NONE,
        attention: str = AUTO, compile: bool = False,
    ) -> io.NodeOutput:
        return io.NodeOutput(load_decoder(pid_name, latent_space, weight_dtype, vae_name, rae_name, attention, compile))
