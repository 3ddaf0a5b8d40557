"""Reading PiD checkpoints: the three on-disk layouts, detection of the network variant, and loading.

Layouts:
- ``pth``: the official ``model_ema_bf16.pth`` (``net.``-prefixed keys; training files may also hold
  ``net_ema.``, ``fake_score.`` and ``discriminator.`` weights). Loaded with ``weights_only=True``.
- ``safetensors``: the same keys without prefix.
- ``comfy``: Comfy-Org repacks for ComfyUI core (``model.diffusion_model.`` prefix, and/or the pixel-block
  modulation split into ``adaLN_modulation_msa`` / ``adaLN_modulation_mlp``).

Structure comes from tensor shapes. What shapes cannot tell (which 16-channel latent space, 2k or 2kto4k
training, a distilled student or an undistilled teacher) comes from an explicit argument, training-only tensors
or the file's path (official files are all called ``model_ema_bf16.pth``; their folder names the experiment), and
``CheckpointInfo`` records which facts were detected and which were assumed.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .config import RELEASED_CHECKPOINTS, V1_5_CHANGES, GateType, LatentSpace, NetworkConfig, ReleasedCheckpoint


class CheckpointError(ValueError):
    """A file that cannot be used as a PiD checkpoint; the message says why and what to do."""

    # ComfyUI's error dialog names the type by its module, which is otherwise built from the install folder
    __module__ = "pid_core"


def damaged_file(name: str, kind: str = "safetensors") -> str:
    """The sentence for a file that cannot be parsed (the library's own report says nothing more useful)."""
    return (f"{name} is not a readable {kind} file: it is truncated or corrupt (e.g. an interrupted download), or not "
            "a model file at all; download it again.")


PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
_DROPPED_PREFIXES = ("fake_score.", "discriminator.", "repa_loss.", "teacher.")
# Tensors of the network that only training uses: the v1.5 teacher's auxiliary RGB head (students lack it).
TRAINING_ONLY_PREFIXES = ("lq_proj.lq_aux_rgb_head.",)
_COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


# --------------------------------------------------------------------------- reading


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` or pickle checkpoint, on the CPU (memory-mapped where possible)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"PiD checkpoint not found: {path}. Check the path, or download it (see the README).")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickle(path)
    raise CheckpointError(
        f"{path.name}: unsupported file type {path.suffix!r}; a PiD checkpoint is a .pth or .safetensors file."
    )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError):
        raise CheckpointError(damaged_file(path.name)) from None


def load_pickle(path: Path, advice: str = ""):
    """``torch.load`` with ``weights_only`` (plain tensors and containers only), memory-mapped where the file
    allows; a file with code-carrying objects or a damaged one gives a CheckpointError (``advice`` appended)."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):  # legacy (non-zip) files cannot be memory-mapped
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path.name} contains Python objects beyond plain tensors{what}, which could run code when loaded; it was "
            f"refused for safety and nothing in it was run.{advice}"
        ) from None
    except (RuntimeError, EOFError, OSError):
        raise CheckpointError(damaged_file(path.name, "PyTorch checkpoint")) from None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    data = load_pickle(path, " Use the official model_ema_bf16.pth or a .safetensors file.")
    for wrapper in ("state_dict", "model"):  # training checkpoints nest the weights one level down
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name} holds a {type(data).__name__}, not a dict of tensors: not a PiD checkpoint.")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


# --------------------------------------------------------------------------- canonical keys


def canonical_state_dict(tensors: dict[str, torch.Tensor], name: str = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """Keys as the network names them, and the layout they came in (``pth``, ``safetensors`` or ``comfy``)."""
    layout = "safetensors"
    if any(k.startswith(("net.", "net_ema.")) for k in tensors):
        layout = "pth"
        # EMA weights are the released ones; a converted file has them renamed to `net.` already
        prefix = "net_ema." if any(k.startswith("net_ema.") for k in tensors) else "net."
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    for prefix in _COMFY_PREFIXES:
        if any(k.startswith(prefix) for k in tensors):
            layout = "comfy"
            tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    tensors = {k: v for k, v in tensors.items() if not k.startswith(_DROPPED_PREFIXES)}
    if any(".adaLN_modulation_msa." in k for k in tensors):
        layout = "comfy"
        tensors = _merge_pixel_modulation(tensors)
    _refuse_quantized(tensors, name)
    return tensors, layout


def _merge_pixel_modulation(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI splits each pixel block's modulation into its attention and MLP halves; the official layout
    interleaves all six chunks per pixel ([pixel, chunk, channel]). Rebuild the official one."""
    out = dict(tensors)
    for key in [k for k in tensors if ".adaLN_modulation_msa." in k]:
        block, kind = key.split(".adaLN_modulation_msa.")
        msa, mlp = out.pop(key), out.pop(f"{block}.adaLN_modulation_mlp.{kind}")
        pixels = tensors["s_embedder.proj.weight"].shape[1] // 3
        halves = [t.reshape(pixels, 3, -1, *t.shape[1:]) for t in (msa, mlp)]
        out[f"{block}.adaLN_modulation.0.{kind}"] = torch.cat(halves, dim=1).reshape(-1, *msa.shape[1:])
    return out


def _refuse_quantized(tensors: dict[str, torch.Tensor], name: str) -> None:
    scaled = [k for k in tensors if k.endswith(("scale_weight", "weight_scale", "scale_input", ".comfy_quant"))]
    fp8 = [k for k, v in tensors.items() if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)]
    if scaled or fp8:
        raise CheckpointError(
            f"{name} is a quantized (fp8/mxfp8) repack; this pack needs the bf16 weights: use the official "
            "model_ema_bf16.pth or a bf16 .safetensors conversion."
        )


# --------------------------------------------------------------------------- detection

_REQUIRED = ("s_embedder.proj.weight", "pixel_embedder.proj.weight", "lq_proj.latent_proj.0.weight")
# The other tensors whose shapes give the network's widths and depths
_SHAPE_KEYS = (
    "lq_proj.gate_modules.0.content_proj.weight", "patch_blocks.0.attn.q_norm_x.weight", "y_embedder.proj.weight",
    "y_pos_embedding", "pixel_blocks.0.compress_to_attn.weight", "pixel_blocks.0.attn.q_norm.weight",
)  # fmt: skip


def _what_else(keys: set[str]) -> str:
    if any(k.startswith(("decoder.conv_in", "encoder.conv_in", "decoder.up.", "taesd_")) for k in keys):
        return "a VAE (put it in models/vae and pick it as the decoder's VAE)"
    if any(k.startswith(("double_blocks.", "joint_blocks.", "input_blocks.", "transformer_blocks.", "layers.")) for k in keys):
        return "a diffusion model (it belongs in models/diffusion_models or models/checkpoints)"
    if "s_embedder.proj.weight" in keys:
        return "a PixelDiT text-to-image model without the latent branch, not the PiD decoder"
    return "not a PiD checkpoint"


def _count(keys: set[str], prefix: str) -> int:
    return len({int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))})


# What shapes cannot tell, looked up from (pixel-level LQ injection present, LQ conv input channels).
_V1 = dict(rope_ref=1024, lq_padding="zeros")
_FAMILIES: dict[tuple[bool, int], tuple[tuple[LatentSpace, ...], dict]] = {
    (False, 4): ((LatentSpace.SDXL,), dict(latent_down=8)),
    (False, 16): ((LatentSpace.FLUX, LatentSpace.SD3, LatentSpace.QWENIMAGE), dict(latent_down=8)),
    (False, 128): ((LatentSpace.FLUX2,), dict(latent_down=16)),
    (False, 768): ((LatentSpace.DINOV2,), dict(latent_down=16)),
    (False, 1152): ((LatentSpace.SIGLIP,), dict(latent_down=16, sr_scale=8)),
    (True, 16): ((LatentSpace.FLUX, LatentSpace.QWENIMAGE), dict(latent_down=8)),
    (True, 32): ((LatentSpace.FLUX2,), dict(latent_down=16, latent_unpatchify=2, latent_channels=128)),
}


def detect_network(tensors: dict[str, torch.Tensor], name: str = "checkpoint") -> tuple[NetworkConfig, tuple[LatentSpace, ...]]:
    """The network config a canonical state dict needs, and the latent spaces it may belong to."""
    keys = set(tensors)
    if not all(k in keys for k in _REQUIRED):
        raise CheckpointError(f"{name} is {_what_else(keys)}: it lacks the PiD decoder's weights. Pick a PiD checkpoint.")
    if missing := [k for k in _SHAPE_KEYS if k not in keys]:
        raise CheckpointError(
            f"{name} lacks {len(missing)} of the PiD decoder's weights (e.g. {missing[0]}): the file is damaged or "
            "from an unsupported variant; download it again."
        )
    shape = {k: tuple(v.shape) for k, v in tensors.items()}
    hidden, patch_in = shape["s_embedder.proj.weight"]
    lq_hidden, lq_in = shape["lq_proj.latent_proj.0.weight"][:2]
    pit = "pit_lq_gate.log_alpha" in keys
    family = _FAMILIES.get((pit, lq_in))
    if family is None:
        raise CheckpointError(
            f"{name}: its latent branch takes {lq_in} channels, which matches no released PiD family "
            "(4, 16, 128, 768, 1152 for v1; 16, 32 for v1.5)."
        )
    spaces, facts = family
    gate_out = shape["lq_proj.gate_modules.0.content_proj.weight"][0]
    num_gates = _count(keys, "lq_proj.gate_modules")
    patch_depth = _count(keys, "patch_blocks")
    config = NetworkConfig(
        hidden_size=hidden,
        num_heads=hidden // shape["patch_blocks.0.attn.q_norm_x.weight"][0],
        patch_depth=patch_depth,
        patch_size=round((patch_in / 3) ** 0.5),
        pixel_hidden_size=shape["pixel_embedder.proj.weight"][0],
        pixel_attn_hidden_size=shape["pixel_blocks.0.compress_to_attn.weight"][0],
        pixel_num_heads=shape["pixel_blocks.0.compress_to_attn.weight"][0] // shape["pixel_blocks.0.attn.q_norm.weight"][0],
        pixel_depth=_count(keys, "pixel_blocks"),
        txt_embed_dim=shape["y_embedder.proj.weight"][1],
        txt_max_length=shape["y_pos_embedding"][1],
        latent_channels=lq_in,
        lq_hidden_dim=lq_hidden,
        lq_num_res_blocks=_count(keys, "lq_proj.latent_proj") - 2,  # indices 0 and 2 are the input convs
        lq_interval=-(-patch_depth // num_gates),
        gate_type=GateType.PER_TOKEN if gate_out == 1 else GateType.PER_TOKEN_PER_DIM,
        **(_V1 if not pit else {k: V1_5_CHANGES[k] for k in ("rope_ref", "lq_padding", "pit_lq_inject")}),
    )
    return replace(config, **facts), spaces


# --------------------------------------------------------------------------- path hints

_SPACE_HINTS = (  # checked in order: "flux2" before "flux", "sdxl" before "sd3"
    (LatentSpace.QWENIMAGE, ("qwen",)),
    (LatentSpace.FLUX2, ("flux2", "flux.2", "klein")),
    (LatentSpace.SDXL, ("sdxl",)),
    (LatentSpace.SD3, ("sd3",)),
    (LatentSpace.FLUX, ("flux", "zimage", "z_image", "z-image", "lumina")),
    (LatentSpace.DINOV2, ("dinov2",)),
    (LatentSpace.SIGLIP, ("siglip",)),
)


def _own_name(path: str | os.PathLike) -> str:
    """The file name and its folder: official files are all model_ema_bf16.pth, their folder names the
    experiment. Folders further up (a collection, the ComfyUI install) say nothing about the file."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}".lower()


def space_from_path(path: str | os.PathLike, candidates: tuple[LatentSpace, ...]) -> LatentSpace | None:
    """The first family the file's own name hints at among ``candidates`` (a hint of another family, e.g. "flux2"
    in a 16-channel file's name, does not stop the search: "flux" may still follow)."""
    text = _own_name(path)
    for space, hints in _SPACE_HINTS:
        if space in candidates and any(h in text for h in hints):
            return space
    return None


def distilled_from_path(path: str | os.PathLike) -> bool | None:
    """False for an undistilled teacher's file or folder name, True for a distilled student's, else None."""
    text = _own_name(path)
    if "undistill" in text or "teacher" in text:
        return False
    return True if "distill" in text or "student" in text else None


def network_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors the inference network takes: training-only ones left out."""
    return {k: v for k, v in tensors.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}


def training_from_path(path: str | os.PathLike) -> str | None:
    text = _own_name(path)
    if "2kto4k" in text or "4k" in text:
        return "2kto4k"
    if re.search(r"(^|[^a-z0-9])(res)?2k([^a-z0-9]|$)", text) or "res2k" in text:
        return "2k"
    return None


# --------------------------------------------------------------------------- info and loading


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint is, with the facts that were detected from the weights and those that were assumed."""

    path: str
    file_format: str  # "pth", "safetensors" or "comfy"
    config: NetworkConfig
    space: LatentSpace | None  # None when the 16-channel family cannot be decided
    candidates: tuple[LatentSpace, ...]
    training: str  # "2k" or "2kto4k" (``assumed`` says when the weights did not tell it)
    distilled: bool  # False: an undistilled teacher, sampled with DPM-Solver and CFG (pid_core.teacher)
    released: str | None  # name in RELEASED_CHECKPOINTS when one matches
    parameters: int
    storage_dtype: str
    detected: tuple[str, ...] = field(default=())
    assumed: tuple[str, ...] = field(default=())

    @property
    def version(self) -> str:
        return self.config.version

    def to_json(self) -> dict:
        """Stable keys, documented in the README."""
        return {
            "path": self.path,
            "file_format": self.file_format,
            "version": self.version,
            "latent_space": self.space.value if self.space else None,
            "latent_space_candidates": [s.value for s in self.candidates],
            "latent_channels": self.config.latent_channels,
            "upscale_factor": self.config.sr_scale,
            "training": self.training,
            "distilled": self.distilled,
            "released_checkpoint": self.released,
            "parameters": self.parameters,
            "storage_dtype": self.storage_dtype,
            "detected": list(self.detected),
            "assumed": list(self.assumed),
            "network": {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(self.config).items()},
        }


def _match_release(
    config: NetworkConfig, space: LatentSpace | None, training: str | None, distilled: bool = True
) -> list[ReleasedCheckpoint]:
    shape_keys = ("latent_channels", "latent_unpatchify", "sr_scale", "pit_lq_inject")
    return [
        r
        for r in RELEASED_CHECKPOINTS
        if all(getattr(r.network, k) == getattr(config, k) for k in shape_keys)
        and (space is None or space in r.spaces)
        and (training is None or r.training == training)
        and r.distilled == distilled
    ]


def _distilled(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, detected: list[str], assumed: list[str]
) -> bool:
    """Teachers carry the training-only auxiliary RGB head (students were saved without it); where the weights do
    not say, the name does; else a student, which is what most files are."""
    if any(k.startswith(TRAINING_ONLY_PREFIXES) for k in tensors):
        detected.append("undistilled (from its training-only tensors)")
        return False
    if (distilled := distilled_from_path(path)) is not None:
        assumed.append(f"{'distilled' if distilled else 'undistilled'} (from the file path)")
        return distilled
    assumed.append("distilled (nothing says otherwise)")
    return True


def _training(
    config: NetworkConfig, space: LatentSpace | None, path: str | os.PathLike, detected: list[str], assumed: list[str]
) -> str:
    """The training range: from the weights when every release of their shape agrees, else from the file path, else
    from the current (not superseded) releases of that shape, else the narrower 2k range, so that the range warning
    and size auto stay on the safe side."""
    releases = _match_release(config, space, None)
    if len(trainings := {r.training for r in releases}) == 1:
        detected.append("training resolution")
        return trainings.pop()
    if (training := training_from_path(path)) is not None:
        assumed.append("training resolution (from the file path)")
        return training
    if len(current := {r.training for r in releases if not r.legacy}) == 1:
        training = current.pop()
        assumed.append(f"training resolution {training} (the current release of this network; the path does not say)")
        return training
    assumed.append("training resolution 2k (the weights and the path do not tell it; 2k is the narrower range)")
    return "2k"


def inspect_state_dict(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    layout: str,
    space: LatentSpace | str | None = None,
    training: str | None = None,
) -> CheckpointInfo:
    name = Path(path).name
    config, candidates = detect_network(tensors, name)
    detected = ["version", "widths and depths", "latent channels", "upscale factor"]
    assumed: list[str] = []

    if space is not None:
        space = LatentSpace.parse(space)
        if space not in candidates:
            raise CheckpointError(
                f"{name} decodes {'/'.join(s.value for s in candidates)} latents, not {space.value}: pick the PiD "
                f"checkpoint made for {space.value}, or the matching latent space."
            )
        assumed.append("latent space (given)")
    elif len(candidates) == 1:
        space = candidates[0]
        detected.append("latent space")
    elif (space := space_from_path(path, candidates)) is not None:
        assumed.append("latent space (from the file path)")

    distilled = _distilled(tensors, path, detected, assumed)
    if training is None:
        training = _training(config, space, path, detected, assumed)
    else:
        assumed.append("training resolution (given)")

    matches = _match_release(config, space, training, distilled)
    return CheckpointInfo(
        path=str(path),
        file_format=layout,
        config=config,
        space=space,
        candidates=candidates,
        training=training,
        distilled=distilled,
        released=matches[0].name if space is not None and training is not None and len(matches) == 1 else None,
        parameters=sum(t.numel() for t in network_tensors(tensors).values()),
        storage_dtype=str(next(iter(tensors.values())).dtype).replace("torch.", ""),
        detected=tuple(detected),
        assumed=tuple(assumed),
    )


def check_keys(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Size], name: str) -> None:
    """Strict key and shape check with one clear sentence instead of PyTorch's long report."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(expected[k]) != tuple(tensors[k].shape))
    if missing or unexpected or wrong:
        parts = [
            f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
            f"{len(wrong)} with wrong shapes (e.g. {wrong[0]}: {tuple(tensors[wrong[0]].shape)} instead of "
            f"{tuple(expected[wrong[0]])})" if wrong else "",
        ]
        raise CheckpointError(
            f"{name} does not match the PiD network it looks like: {', '.join(p for p in parts if p)} weights. "
            "The file is damaged or from an unsupported variant."
        )


@dataclass
class LoadedCheckpoint:
    info: CheckpointInfo
    state_dict: dict[str, torch.Tensor]


def load_checkpoint(
    path: str | os.PathLike, space: LatentSpace | str | None = None, training: str | None = None
) -> LoadedCheckpoint:
    """Read, canonicalise and identify a checkpoint (weights stay on the CPU, memory-mapped where possible)."""
    name = Path(path).name
    tensors, layout = canonical_state_dict(read_tensors(path), name)
    return LoadedCheckpoint(inspect_state_dict(tensors, path, layout, space, training), tensors)
