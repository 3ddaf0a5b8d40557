"""Three ComfyUI nodes that ``bench/vs_core.py`` drops into a ComfyUI server's custom_nodes for its runs (never
installed for users; ids start with ``PiDBench``).

* ``PiDBenchInputs``: the LATENT and the caption CONDITIONING ([1, 300, 2304]) from a file the benchmark wrote, so
  core's graph, the pack's graph and the benchmark's own reference decode get the very same tensors.
* ``PiDBenchClock``: passes any value through and records the time it did (after the model loader ran, before the
  decode) and the dtypes of the model's weights, in a JSON file.
* ``PiDBenchSave``: records the time the finished picture arrived, then writes it as float32 (no 8-bit rounding).

The module is loaded by ComfyUI alone (a single-file custom node); it imports ComfyUI's API.
"""

from __future__ import annotations

import json
import os
import time

import torch
from comfy_api.latest import ComfyExtension, io
from safetensors.torch import load_file, save_file

CATEGORY = "PiD/benchmark"


def write_json(path: str, record: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


def network_of(value) -> torch.nn.Module | None:
    """The torch module inside a MODEL (ModelPatcher) or a PID_DECODER (the pack's holder of a ModelPatcher)."""
    patcher = getattr(value, "patcher", value)
    module = getattr(patcher, "model", None)
    return module if isinstance(module, torch.nn.Module) else None


def dtypes(value) -> dict:
    module = network_of(value)
    if module is None:
        return {}
    weights = sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters()})
    cast = getattr(module, "manual_cast_dtype", None)  # core computes in this dtype when it differs from the weights'
    return {"weights": weights, "compute": str(cast).removeprefix("torch.") if cast is not None else None}


class PiDBenchInputs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiDBenchInputs",
            display_name="PiD Bench: Inputs",
            category=CATEGORY,
            description="A latent and a caption conditioning from a safetensors file written by bench/vs_core.py.",
            inputs=[
                io.String.Input("path", tooltip="The safetensors file."),
                io.String.Input("latent_key", tooltip="Which of its tensors is the latent."),
            ],
            outputs=[io.Latent.Output(display_name="latent"), io.Conditioning.Output(display_name="caption")],
        )

    @classmethod
    def execute(cls, path: str, latent_key: str) -> io.NodeOutput:
        tensors = load_file(path)
        return io.NodeOutput({"samples": tensors[latent_key]}, [[tensors["caption"], {}]])


class PiDBenchClock(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiDBenchClock",
            display_name="PiD Bench: Clock",
            category=CATEGORY,
            description="Passes its input through; records when it ran and the model's weight dtypes.",
            inputs=[io.AnyType.Input("value"), io.String.Input("path", tooltip="The JSON record.")],
            outputs=[io.AnyType.Output()],
        )

    @classmethod
    def execute(cls, value, path: str) -> io.NodeOutput:
        write_json(path, {"time": time.time(), **dtypes(value)})
        return io.NodeOutput(value)


class PiDBenchSave(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PiDBenchSave",
            display_name="PiD Bench: Save Image",
            category=CATEGORY,
            description="Records when the picture arrived, then writes it as float32 to a safetensors file.",
            inputs=[io.Image.Input("image"), io.String.Input("path", tooltip="The safetensors file.")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, image: torch.Tensor, path: str) -> io.NodeOutput:
        arrived = time.time()
        save_file({"image": image.float().contiguous().cpu()}, path)
        write_json(path + ".json", {"time": arrived})
        return io.NodeOutput()


class BenchExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [PiDBenchInputs, PiDBenchClock, PiDBenchSave]


async def comfy_entrypoint() -> BenchExtension:
    return BenchExtension()
