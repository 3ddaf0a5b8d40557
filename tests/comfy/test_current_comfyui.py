"""What only current ComfyUI (0.33) has: core's own PiD support beside the pack. These run in the ComfyUI 0.33
leg of ``scripts/test.sh`` (``PID_COMFYUI=0.33``); on 0.3.75 there is nothing to check."""

from __future__ import annotations

import os

import pytest

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
