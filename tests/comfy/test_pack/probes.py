"""Test-only probes around the PiD pack, for tests that must see inside a prompt run over HTTP.

* ``PiDTestRecordModel``: a clone of a MODEL whose every network call records the sampler's state ``x``
  (the sampler's own space, before ``calculate_input``) and its sigma.
* ``PiDTestRecordDecoder`` / ``PiDTestSlowDecoder`` / ``PiDTestOutOfMemoryDecoder``: a PID_DECODER whose
  network records its inputs (the latent ``z`` and ``sigma`` PiD's network receives), sleeps before every call,
  or runs out of memory (torch.OutOfMemoryError, as a GPU would) on calls with more than so many pixels.
* ``PiDTestSave``: writes IMAGE / LATENT / SIGMAS / FLOAT values as float tensors (no 8-bit rounding).
* ``PiDTestTagLatent``: tags a LATENT with one PiD sigma per item, through the pack's own metadata module.
* ``PiDTestModelInfo``: records what a MODEL is (its ComfyUI model and network classes, config, parameters).
* ``PiDTestRandomVAE``: writes a seeded random VAE file (full-size Flux KL-VAE or TAESD) into models/vae; every
  name asked for with the same kind and seed is a link to one file, made once per server.

Records go to ``output/pidtest-tensors/<name>.safetensors``, rewritten after every call. Inputs are never
mutated: models are cloned, and the probed decoder wraps the shared network in a new module and patcher.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import replace

import torch
from comfy_api.latest import io
from safetensors.torch import save_file

import comfy.model_patcher
import folder_paths
import nodes as comfy_nodes

log = logging.getLogger("pid_test_pack")

CATEGORY = "PiD/testing"
RECORD_FOLDER = "pidtest-tensors"
RANDOM_VAE_FOLDER = "pidtest-random-vae"  # in ComfyUI's temp folder (emptied at every start)
PiDDecoderType = io.Custom("PID_DECODER")


def record_path(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"PiD test record name {name!r}: use letters, digits, '_', '-' and '.' only.")
    folder = os.path.join(folder_paths.get_output_directory(), RECORD_FOLDER)
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{name}.safetensors")


def write_record(name: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    path = record_path(name)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, path + ".tmp", metadata={"json": json.dumps(metadata or {})})
    os.replace(path + ".tmp", path)


def pack_module(name: str):
    """A module of the PiD pack as ComfyUI loaded it (e.g. ``nodes.metadata``), found through its node class."""
    decode = comfy_nodes.NODE_CLASS_MAPPINGS["PixelDecoderPiD_Decode"]
    root = decode.__module__.rsplit(".nodes.", 1)[0]
    return importlib.import_module(f"{root}.{name}")


# --------------------------------------------------------------------------- the diffusion model


class PiDTestRecordModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiDTestRecordModel",
            display_name="PiD Test: Record Sampler States",
            category=CATEGORY,
            description="A clone of the model that records, for every sigma the sampler evaluates, the sampler "
            "state x it passes in (first cond chunk). For tests only.",
            inputs=[
                io.Model.Input("model"),
                io.String.Input("name", default="record", tooltip="Record file name (output/pidtest-tensors)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, name: str) -> io.NodeOutput:
        record_path(name)  # validate early
        states: dict[float, torch.Tensor] = {}

        def wrapper(apply_model, args):
            x, t = args["input"], args["timestep"]
            chunk = x.chunk(len(args["cond_or_uncond"]))[0]
            states[float(t.flatten()[0])] = chunk.detach().float().cpu().clone()
            sigmas = sorted(states, reverse=True)
            write_record(name, {
                "sigmas": torch.tensor(sigmas, dtype=torch.float64),
                "states": torch.stack([states[s] for s in sigmas]),
            })  # fmt: skip
            return apply_model(x, t, **args["c"])

        clone = model.clone()
        clone.set_model_unet_function_wrapper(wrapper)
        return io.NodeOutput(clone)


# --------------------------------------------------------------------------- PiD's network


class _ProbedNetwork(torch.nn.Module):
    """The PiD network (shared, not copied) with ``probe(kind, **tensors)`` called before it runs.

    The latent reaches the network either as ``forward``'s 4th argument or through ``project_latent`` (computed
    once per decode); both are probed. Other attributes and methods are the wrapped network's.
    """

    # ModelPatcher keeps its bookkeeping on the module (comfy/model_patcher.py, ModelPatcher.__init__); the
    # wrapper has its own, rather than reading the wrapped network's through __getattr__.
    _PATCHER_STATE = dict(model_loaded_weight_memory=0, lowvram_patch_counter=0, model_lowvram=False,
                          current_weight_patches_uuid=None, model_offload_buffer_memory=0)

    def __init__(self, network: torch.nn.Module, probe):
        super().__init__()
        self.network = network
        self.probe = probe
        self.device = getattr(network, "device", None)
        for name, value in self._PATCHER_STATE.items():
            setattr(self, name, value)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["network"], name)

    def project_latent(self, latent, *args, **kwargs):
        self.probe("latent", latent=latent)
        return self.network.project_latent(latent, *args, **kwargs)

    def forward(self, x, t, caption, latent, sigma, *args, **kwargs):
        if latent is not None:
            self.probe("latent", latent=latent)
        self.probe("call", x=x, t=t, sigma=sigma)
        return self.network(x, t, caption, latent, sigma, *args, **kwargs)


def probed_decoder(pid_decoder, probe):
    """A new PID_DECODER (same class, info and VAE) whose network runs ``probe`` first; the input is untouched."""
    patcher = pid_decoder.patcher
    network = _ProbedNetwork(patcher.model, probe)
    new_patcher = comfy.model_patcher.ModelPatcher(
        network, load_device=patcher.load_device, offload_device=patcher.offload_device
    )
    return replace(pid_decoder, patcher=new_patcher)


class PiDTestRecordDecoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiDTestRecordDecoder",
            display_name="PiD Test: Record Decoder Inputs",
            category=CATEGORY,
            description="The PiD decoder, recording what its network receives on every call (latent z, sigma, "
            "timestep). For tests only.",
            inputs=[
                PiDDecoderType.Input("pid_decoder"),
                io.String.Input("name", default="decoder", tooltip="Record file name (output/pidtest-tensors)."),
            ],
            outputs=[PiDDecoderType.Output()],
        )

    @classmethod
    def execute(cls, pid_decoder, name: str) -> io.NodeOutput:
        record_path(name)
        seen: dict[str, torch.Tensor] = {}
        timesteps: list[torch.Tensor] = []

        def probe(kind, latent=None, x=None, t=None, sigma=None):
            if kind == "latent":
                seen["z"] = latent.float()
                return
            timesteps.append(t.detach().float().cpu().clone())
            write_record(name, {**seen, "sigma": sigma.float(), "t": torch.stack(timesteps),
                                "x_shape": torch.tensor(x.shape)})

        return io.NodeOutput(probed_decoder(pid_decoder, probe))


class PiDTestSlowDecoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiDTestSlowDecoder",
            display_name="PiD Test: Slow Decoder",
            category=CATEGORY,
            description="The PiD decoder, sleeping before every network call and logging "
            "'PiDTest slow decoder <label>: call N'. For cancel tests only.",
            inputs=[
                PiDDecoderType.Input("pid_decoder"),
                io.Float.Input("seconds", default=1.0, min=0.0, max=60.0, tooltip="Sleep per network call."),
                io.String.Input("label", default="slow", tooltip="Names the calls in the log."),
            ],
            outputs=[PiDDecoderType.Output()],
        )

    @classmethod
    def execute(cls, pid_decoder, seconds: float, label: str) -> io.NodeOutput:
        calls = [0]

        def probe(kind, **_):
            if kind != "call":
                return
            calls[0] += 1
            log.info("PiDTest slow decoder %s: call %d", label, calls[0])
            time.sleep(seconds)

        return io.NodeOutput(probed_decoder(pid_decoder, probe))


class PiDTestOutOfMemoryDecoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiDTestOutOfMemoryDecoder",
            display_name="PiD Test: Out-of-Memory Decoder",
            category=CATEGORY,
            description="The PiD decoder, raising torch.OutOfMemoryError on network calls with more than `pixels` "
            "input pixels (over the batch). For tests only.",
            inputs=[
                PiDDecoderType.Input("pid_decoder"),
                io.Int.Input("pixels", default=0, min=0, max=2**31, tooltip="The most pixels a call may have."),
            ],
            outputs=[PiDDecoderType.Output()],
        )

    @classmethod
    def execute(cls, pid_decoder, pixels: int) -> io.NodeOutput:
        def probe(kind, x=None, **_):
            if kind == "call" and x[:, 0].numel() > pixels:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        return io.NodeOutput(probed_decoder(pid_decoder, probe))


# --------------------------------------------------------------------------- values out, metadata in


class PiDTestSave(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiDTestSave",
            display_name="PiD Test: Save Tensors",
            category=CATEGORY,
            description="Writes the connected values as float tensors to output/pidtest-tensors/<name>.safetensors "
            "(image, latent samples and the LATENT's other keys as JSON, sigmas, value). For tests only.",
            inputs=[
                io.String.Input("name", default="values"),
                io.Image.Input("image", optional=True),
                io.Latent.Input("latent", optional=True),
                io.Sigmas.Input("sigmas", optional=True),
                io.Float.Input("value", optional=True, force_input=True),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, name: str, image=None, latent=None, sigmas=None, value=None) -> io.NodeOutput:
        tensors, extra = {}, {}
        if image is not None:
            tensors["image"] = image.float()
        if latent is not None:
            tensors["latent"] = latent["samples"].float()
            extra = {k: v for k, v in latent.items() if k != "samples" and not isinstance(v, torch.Tensor)}
        if sigmas is not None:
            tensors["sigmas"] = sigmas.double()
        if value is not None:
            tensors["value"] = torch.tensor([value], dtype=torch.float64)
        write_record(name, tensors, extra)
        return io.NodeOutput()


class PiDTestTagLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiDTestTagLatent",
            display_name="PiD Test: Tag Latent per Item",
            category=CATEGORY,
            description="Tags a LATENT with one PiD sigma per batch item (comma-separated, any value) through the "
            "pack's nodes.metadata.tag, as PiD KSampler would. For tests only.",
            inputs=[
                io.Latent.Input("latent"),
                io.String.Input("sigmas", default="0.0", tooltip="Comma-separated PiD sigmas."),
                io.String.Input("latent_space", default="flux"),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, latent, sigmas: str, latent_space: str) -> io.NodeOutput:
        values = [float(s) for s in sigmas.split(",")]
        return io.NodeOutput(pack_module("nodes.metadata").tag(latent, values, latent_space))


class PiDTestModelInfo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiDTestModelInfo",
            display_name="PiD Test: Model Info",
            category=CATEGORY,
            description="Records what a MODEL is: the classes of its ComfyUI model, network and latent format, the "
            "network config and its parameter count by dtype (JSON), and each parameter's sum of squares (tensors "
            "'square_sum.<name>'), in output/pidtest-tensors/<name>.safetensors. For tests only.",
            inputs=[io.Model.Input("model"), io.String.Input("name", default="model-info")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, name: str) -> io.NodeOutput:
        base = model.model
        network = base.diffusion_model
        dtypes: dict[str, int] = {}
        square_sums = {}
        for key, p in network.named_parameters():
            dtype = str(p.dtype).removeprefix("torch.")
            dtypes[dtype] = dtypes.get(dtype, 0) + p.numel()
            # weights read from a file have the file's sums; weights left as allocated do not
            square_sums[f"square_sum.{key}"] = square_sum(p.detach()).reshape(1)
        info = {
            "model_class": f"{type(base).__module__}.{type(base).__name__}",
            "network_class": f"{type(network).__module__}.{type(network).__name__}",
            "latent_format": type(base.latent_format).__name__,
            "unet_config": {k: v for k, v in base.model_config.unet_config.items()
                            if isinstance(v, (bool, int, float, str))},
            "parameters": sum(dtypes.values()),
            "parameter_dtypes": dtypes,
        }
        write_record(name, square_sums, info)
        return io.NodeOutput()


def square_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of squares of a tensor's values: one float64 dot (fp32 sums of millions of values are off by 1e-4)."""
    flat = tensor.reshape(-1).double()
    return torch.dot(flat, flat)


# --------------------------------------------------------------------------- model files


def _flux_kl_vae() -> torch.nn.Module:
    """Flux's AutoencoderKL exactly as comfy.sd.VAE builds it for ae.safetensors (no quant convs)."""
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    return AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig},
    )


class PiDTestRandomVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiDTestRandomVAE",
            display_name="PiD Test: Write Random VAE",
            category=CATEGORY,
            description="Writes a seeded random VAE into models/vae unless the file exists: the full-size Flux "
            "KL-VAE (16 channels, fp16, ~168 MB; the layout of ae.safetensors) or a TAESD with the given latent "
            "channels. The same kind, channels and seed give the same file (made once per server). For tests only.",
            inputs=[
                io.Combo.Input("kind", options=["flux_kl", "taesd"]),
                io.String.Input("filename", default="pidtest-vae.safetensors"),
                io.Int.Input("latent_channels", default=4, min=1, max=64, tooltip="TAESD only."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, kind: str, filename: str, latent_channels: int, seed: int) -> io.NodeOutput:
        path = os.path.join(folder_paths.get_folder_paths("vae")[0], filename)
        if not os.path.exists(path):
            channels = 16 if kind == "flux_kl" else latent_channels
            link_or_copy(random_vae_file(kind, channels, seed), path)
            log.info("random %s VAE (seed %d) at %s", kind, seed, path)
        return io.NodeOutput()


def random_vae_file(kind: str, latent_channels: int, seed: int) -> str:
    """The seeded random VAE of ``kind`` as a file in ComfyUI's temp folder, written on first use in the session.

    Every weight is set (``seeded_init_``): the layers of ``comfy.ops`` have no init, and missing keys would load
    as whatever memory held. The full-size Flux VAE takes a few seconds and 168 MB, so each VAE is made once per
    server and linked to every name asked for."""
    from . import seeded_init_

    folder = os.path.join(folder_paths.get_temp_directory(), RANDOM_VAE_FOLDER)
    path = os.path.join(folder, f"{kind}-{latent_channels}ch-seed{seed}.safetensors")
    if not os.path.exists(path):
        if kind == "flux_kl":
            module = _flux_kl_vae()
        else:
            import comfy.taesd.taesd

            module = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
        seeded_init_(module, seed)
        tensors = {k: v.to(torch.float16).contiguous() for k, v in module.state_dict().items()}
        os.makedirs(folder, exist_ok=True)
        save_file(tensors, path + ".tmp")
        os.replace(path + ".tmp", path)
        log.info("wrote random %s VAE %s (%d tensors)", kind, path, len(tensors))
    return path


def link_or_copy(source: str, destination: str) -> None:
    """A hard link (no second copy on disk), or a copy where the two folders are on different file systems."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination + ".tmp")
        os.replace(destination + ".tmp", destination)


PROBE_NODES = [
    PiDTestRecordModel, PiDTestRecordDecoder, PiDTestSlowDecoder, PiDTestOutOfMemoryDecoder, PiDTestSave,
    PiDTestTagLatent, PiDTestModelInfo, PiDTestRandomVAE,
]  # fmt: skip
