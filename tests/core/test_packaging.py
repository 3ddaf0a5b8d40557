"""What the Comfy Registry and users' ComfyUI installs read from the pack's metadata files."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
RAW_MAIN = re.compile(r"^https://raw\.githubusercontent\.com/[^/]+/[^/]+/main/(?P<path>.+)$")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_requirements_leave_comfyuis_torch_alone():
    names = [re.split(r"[<>=!~\[ ;]", line, maxsplit=1)[0].lower() for line in _requirements()]
    assert names, "requirements.txt lists nothing"
    assert not {"torch", "torchvision", "torchaudio"} & set(names), names


def test_registry_icon_is_a_square_picture_in_the_repository():
    icon_url = _pyproject()["tool"]["comfy"]["Icon"]
    match = RAW_MAIN.match(icon_url)
    assert match, f"the Icon should point at a file of the repository's main branch: {icon_url}"
    icon = ROOT / match["path"]
    assert icon.is_file(), f"{match['path']} (the registry icon) is missing"
    with Image.open(icon) as picture:
        assert picture.width == picture.height >= 100, picture.size


def test_licence_file_is_gpl3_as_comfyui():
    project = _pyproject()["project"]
    head = (ROOT / project["license"]["file"]).read_text()[:200]
    assert "GNU GENERAL PUBLIC LICENSE" in head
    assert "Version 3" in head


def test_versions_older_than_the_minimum_are_named_with_what_to_do():
    from pid_core.versions import MIN_COMFYUI, MIN_TORCH, release, too_old

    assert release("2.5.1+cu121") == (2, 5, 1) and release("2.6.0a0+git1b2c") == (2, 6, 0)
    assert too_old("PyTorch", "2.13.0+cpu", MIN_TORCH, "update it") is None
    assert too_old("PyTorch", "2.5.0", MIN_TORCH, "update it") is None
    assert too_old("PyTorch", "2.4.1+cu121", MIN_TORCH, "update it") == (
        "The PiD nodes need PyTorch 2.5 or newer, but this one is 2.4.1+cu121: update it."
    )
    assert too_old("ComfyUI", "0.3.75", MIN_COMFYUI, "update ComfyUI") is None
    assert too_old("ComfyUI", "0.33.0", MIN_COMFYUI, "update ComfyUI") is None
    assert "ComfyUI 0.3.75 or newer, but this one is 0.3.60" in too_old("ComfyUI", "0.3.60", MIN_COMFYUI, "update")


def test_the_declared_minimum_comfyui_is_the_one_the_pack_checks():
    from pid_core.versions import MIN_COMFYUI

    declared = _pyproject()["tool"]["comfy"]["requires-comfyui"]
    assert declared == ">=" + ".".join(map(str, MIN_COMFYUI))
