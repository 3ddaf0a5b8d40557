"""Fixtures of the workflow tests: the files the shipped workflows load, one frontend page.

``comfy_server`` is the session's test ComfyUI of ``tests/conftest.py``, shared with ``tests/comfy`` (which
also marks everything here ``comfy``). ``workflow_files`` puts into its folders what the workflows name:
a tiny PiD checkpoint in the official layout for every ``pid_name``
(``models/pid/<official folder>/model_ema_bf16.pth``), a tiny RAE for every ``rae_name``
(``models/pid/rae/<name>/``, its files named and laid out as the workflow's note says), a seeded random
full-size Flux VAE for every VAE file name (the test pack's PiDTestRandomVAE), a picture for every Load Image,
and a tiny Gemma-2 under the name of the Gemma file, which the test's stand-in for that Load CLIP
(PiDTestGemmaCLIP) reads; the other loaders' files are not written, their stand-ins build tiny models without
a file. ``frontend`` is one headless
Chromium page on the server's own frontend, driven by ``frontend.js``, shared by all tests.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _load_build_module():
    name = "pid_build_workflows"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "build_workflows.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


BUILD = _load_build_module()

VAE_SEED = 0
PID_SEED = 0
GEMMA_SEED = 0
RAE_SEED = 0
# The picture Load Image reads: its sides are not multiples of 8, so PiD Encode Image's crop runs.
INPUT_PICTURE_SIZE = (75, 66)
# The tiny Gemma-2: as wide as the tiny PiD networks' captions (txt_embed_dim 32, tests/core/tiny.py); 3 layers, as
# ComfyUI's lumina2 CLIP reads the penultimate one; Gemma-2's own head width (256), which ComfyUI's class fixes.
TINY_GEMMA = dict(vocab_size=600, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2, num_kv_heads=1)

def shipped_workflows() -> dict[str, dict]:
    """name -> UI-format workflow, for every ``workflows/*.json``."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(BUILD.WORKFLOWS_DIR.glob("*.json"))}


def loader_files() -> dict[str, set[str]]:
    """folder -> names of the files (and RAE folders) the workflows load ("input" for Load Image's pictures)."""
    files: dict[str, set[str]] = {}
    for definition in BUILD.workflows():
        for item in definition.files():
            files.setdefault(item.folder, set()).add(item.name)
        for node in definition.prompt.values():
            if node["class_type"] == "LoadImage":
                files.setdefault("input", set()).add(node["inputs"]["image"])
    return files


def write_pid_checkpoint(models_dir: Path, pid_name: str) -> None:
    """A tiny random network of the released checkpoint whose official folder ``pid_name`` names."""
    import torch
    from tiny import tiny_network  # tests/core (on pytest's pythonpath)

    from pid_core.config import RELEASED_CHECKPOINTS

    folder, file_name = pid_name.split("/")
    released = [c for c in RELEASED_CHECKPOINTS if c.experiment == folder]
    assert released and file_name == BUILD.PID_FILE, (
        f"{pid_name} is not <official checkpoint folder>/{BUILD.PID_FILE}; the official folders are "
        f"{[c.experiment for c in RELEASED_CHECKPOINTS]}"
    )
    state = tiny_network(released[0].name, PID_SEED).state_dict()
    path = models_dir / "pid" / folder / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"net.{k}": v.to(torch.bfloat16) for k, v in state.items()}, path)


def write_rae_folder(folder: Path, name: str) -> None:
    """A tiny RAE in ``folder`` with the files of ``BUILD.RAE_FOLDERS[name]``, named and laid out as the note says."""
    from tiny_rae import write_rae  # tests/core (on pytest's pythonpath)

    layout = BUILD.RAE_FOLDERS[name]
    write_rae(folder, layout.space, encoder_dir=layout.encoder, decoder=layout.decoder,
              decoder_json=layout.decoder_config, stats=layout.STATS if layout.stats_dir else None, seed=RAE_SEED)


def write_tiny_gemma(path: Path) -> None:
    """A tiny Gemma-2 in the Comfy-Org layout (``model.`` keys, the SentencePiece tokenizer embedded)."""
    from tiny_gemma import random_weights, write_comfy  # tests/core (on pytest's pythonpath)

    from pid_core.gemma import GemmaConfig

    write_comfy(path, random_weights(GemmaConfig(**TINY_GEMMA), seed=GEMMA_SEED))


def write_picture(path: Path) -> None:
    """A smooth colour gradient with a few shapes (a stand-in photo; deterministic)."""
    import numpy as np
    from PIL import Image, ImageDraw

    width, height = INPUT_PICTURE_SIZE
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height) + 64], axis=-1)
    picture = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    draw.ellipse((10, 8, 40, 38), fill=(240, 220, 40))
    draw.rectangle((45, 30, 70, 60), fill=(30, 60, 200))
    picture.save(path)


@pytest.fixture(scope="session")
def workflow_files(comfy_server) -> dict[str, set[str]]:
    """Writes the files the workflows load (tiny or random ones) where they read them; returns folder -> file
    names written."""
    written: dict[str, set[str]] = {}
    for folder, names in loader_files().items():
        for name in sorted(names):
            if folder == "pid":
                write_pid_checkpoint(comfy_server.models_dir, name)
            elif folder == "pid/rae":
                write_rae_folder(comfy_server.models_dir / folder / name, name)
            elif folder == "vae":
                comfy_server.random_vae(name, kind="flux_kl", seed=VAE_SEED)
            elif folder == "input":
                write_picture(comfy_server.input_dir / name)
            elif folder == "text_encoders" and name == BUILD.GEMMA_FILE:
                write_tiny_gemma(comfy_server.models_dir / folder / name)
            else:  # diffusion models, checkpoints, other text encoders: their stand-ins read no file, but current
                # frontends flag a loader whose file is not listed, so an empty one is listed
                placeholder = comfy_server.models_dir / folder / name
                placeholder.parent.mkdir(parents=True, exist_ok=True)
                placeholder.touch()
            written.setdefault(folder, set()).add(name)
    return written


@pytest.fixture(scope="session")
def input_picture_size() -> tuple[int, int]:
    """(width, height) of the picture ``workflow_files`` writes for Load Image."""
    return INPUT_PICTURE_SIZE


@pytest.fixture(scope="session")
def frontend(comfy_server, workflow_files):
    """One headless Chromium page on the server's frontend (after the files exist, so the frontend lists them)."""
    try:
        driver = BUILD.Frontend(comfy_server.url)
    except BUILD.FrontendError as err:
        hint = "scripts/setup_frontend.sh installs chromium and playwright-core; scripts/test.sh runs it."
        pytest.fail(f"{err}\n({hint})", pytrace=False)
    try:
        yield driver
    finally:
        driver.close()
