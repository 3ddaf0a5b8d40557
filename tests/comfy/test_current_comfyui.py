"""What only current ComfyUI (0.33) has: core's own PiD support beside the pack. These run in the ComfyUI 0.33
leg of ``scripts/test.sh`` (``PID_COMFYUI=0.33``); on 0.3.75 there is nothing to check."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("PID_COMFYUI", "0.3.75") not in ("0.33", "0.33.0"),
    reason="ComfyUI 0.33 only (the 0.33 leg of scripts/test.sh)",
)


def test_core_pid_and_the_pack_live_side_by_side(comfy_server):
    """Core's PiD node stays core's, none of the pack's ids, types or model folders is core's."""
    info = comfy_server.object_info()
    ours = {name for name, node in info.items() if node["python_module"] == f"custom_nodes.{comfy_server.pack_dir_name}"}
    core = {name for name, node in info.items() if not node["python_module"].startswith("custom_nodes.")}
    assert "PiDConditioning" in core and len(ours) == 7
    assert all(name.startswith("PixelDecoderPiD_") for name in ours)
    core_types = {t for name in core for t in info[name]["output"]}
    core_types |= {spec[0] for name in core for section in ("required", "optional")
                   for spec in info[name]["input"].get(section, {}).values() if isinstance(spec[0], str)}  # fmt: skip
    our_types = {t for name in ours for t in info[name]["output"]}
    assert our_types - core_types == {"PID_DECODER"}  # the one type of our own; the others are ComfyUI's
    core_folders = (comfy_server.comfyui_dir / "folder_paths.py").read_text()
    assert '"pid"' not in core_folders and "'pid'" not in core_folders  # core registers no "pid" model folder
    assert "pid" in comfy_server.get_json("/models")  # the pack's


def test_a_pixeldit_clip_feeds_pid_caption_and_core_clip_text_encode(comfy_server):
    """Core's ``pixeldit`` CLIP type loads Gemma-2 for PiD. PiD Caption takes such a CLIP (its weights, in PiD's
    layout, bf16 as the reference) and gives pid_core's encoding exactly; core's CLIPTextEncode on it gives a
    [1, 300, D] conditioning, which PiD Decode takes as it is (test_caption.py), in fp32 and not the same numbers: 4% apart (relative L2) on this tiny random
    Gemma, 1.8% from pid_core's own fp32 encoding, so more than compute precision differs (not traced yet). For
    the empty caption core leaves out PiD's system prompt (BOS plus padding), far from the empty caption PiD was
    trained with. Hence the README's advice: PiD Caption."""
    from tests.comfy.test_caption import CAPTION, CONFIG, Graph, caption, expected, out, record, save
    from tiny_gemma import random_weights, write_comfy

    path = comfy_server.models_dir / "text_encoders" / "pidtest-current-gemma-2-tiny-it.safetensors"
    write_comfy(path, random_weights(CONFIG, seed=3))
    g = Graph()
    clip = g.node("PiDTestGemmaCLIP", clip_name=path.name, clip_type="pixeldit")
    for text, name in ((CAPTION, "caption"), ("", "empty")):
        save(g, caption(g, text, clip=clip), f"pixeldit-ours-{name}")
        save(g, g.node("CLIPTextEncode", text=text, clip=out(clip)), f"pixeldit-core-{name}")
    comfy_server.run(g)

    reference, empty = expected(path, CAPTION, "")
    ours, core = record(comfy_server, "pixeldit-ours-caption")[0], record(comfy_server, "pixeldit-core-caption")[0]
    assert torch.equal(ours, reference)
    assert core.shape == ours.shape
    gap = ((core.float() - ours.float()).norm() / ours.float().norm()).item()
    assert 1e-3 < gap < 0.1, gap  # close, not equal (see above)
    assert torch.equal(record(comfy_server, "pixeldit-ours-empty")[0], empty)
    core_empty = record(comfy_server, "pixeldit-core-empty")[0]
    empty_gap = ((core_empty.float() - empty.float()).norm() / empty.float().norm()).item()
    assert core_empty.shape == empty.shape and empty_gap > 3 * gap, (empty_gap, gap)  # another text altogether
