"""Shared by the tests of tests/comfy: the ``pid_graphs`` module (prompts, file names, record readers) and the
``pid_models`` fixture that writes the tiny PiD checkpoints and VAE files it names.

``pid_graphs`` is loaded here under that name (the folder is not on ``sys.path``; tests/workflows loads its
builder the same way), so test modules of this folder ``from pid_graphs import ...``.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch
from tiny import tiny_network

HERE = Path(__file__).resolve().parent


def _load_pid_graphs():
    name = "pid_graphs"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "pid_graphs.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


_load_pid_graphs()

from pid_graphs import (  # noqa: E402 (loaded just above)
    FLUX_PID, FLUX_VAE, NOT_PID, SDXL_PID, TAESD_4CH, UNDECIDED_PID, Graph, save_official,
)


@pytest.fixture(scope="module")
def pid_models(comfy_server) -> Path:
    """Tiny PiD checkpoints in models/pid, and the random VAE files in models/vae (written once per session)."""
    root = comfy_server.models_dir / "pid"
    if not (root / FLUX_PID).exists():
        save_official(tiny_network("flux_2k", seed=0), root / FLUX_PID)
        save_official(tiny_network("sdxl_2kto4k", seed=1), root / SDXL_PID)
        from safetensors.torch import save_file

        undecided = tiny_network("flux_2k", seed=2).state_dict()
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in undecided.items()}, str(root / UNDECIDED_PID))
    vae_dir = comfy_server.models_dir / "vae"
    if not (vae_dir / FLUX_VAE).exists() or not (vae_dir / TAESD_4CH).exists():
        g = Graph()
        g.node("PiDTestRandomVAE", kind="flux_kl", filename=FLUX_VAE, latent_channels=16, seed=0)
        g.node("PiDTestRandomVAE", kind="taesd", filename=TAESD_4CH, latent_channels=4, seed=0)
        comfy_server.run(g, timeout=300)
    if not (root / NOT_PID).exists():
        shutil.copy(vae_dir / TAESD_4CH, root / NOT_PID)
    return root
