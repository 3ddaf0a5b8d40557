"""Write a complete, seeded random Flux VAE (the layout of ``ae.safetensors``) with ComfyUI's own classes.

ComfyUI's VAELoader sizes a KL VAE from hard-coded widths (83.8 M parameters), so no tiny one can be
loaded from a file; this writes a full-size one with random weights (fp16, 168 MB, a few seconds).
Every weight is set: layers of ``comfy.ops`` have no init, and missing keys would load as garbage.

    cd .comfyui/ComfyUI && ../../.venv/bin/python ../../tests/workflows/random_vae.py OUT.safetensors [SEED]

Run from ComfyUI's folder (its modules are imported), in a process of its own (ComfyUI's CPU setting
must be made before ``comfy.model_management`` is first imported).
"""

from __future__ import annotations

import logging
import os
import sys

sys.path.insert(0, os.getcwd())

from comfy.cli_args import args  # noqa: E402

args.cpu = True

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import comfy.sd  # noqa: E402

# The keys comfy.sd.VAE reads to choose the architecture of Flux's ae.safetensors: 16 latent channels,
# four levels (/8), no post_quant_conv (so AutoencodingEngine, as for the real file).
FLUX_VAE_SIGNATURE = {
    "decoder.conv_in.weight": torch.zeros(512, 16, 3, 3),
    "encoder.down.2.downsample.conv.weight": torch.zeros(512, 512, 3, 3),
}


def random_flux_vae(seed: int) -> dict[str, torch.Tensor]:
    logging.disable(logging.WARNING)  # "Missing VAE keys": all but the signature, which are set below
    module = comfy.sd.VAE(sd=dict(FLUX_VAE_SIGNATURE)).first_stage_model
    logging.disable(logging.NOTSET)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim <= 1:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) / param[0].numel() ** 0.5)
    return {k: v.to(torch.float16).contiguous() for k, v in module.state_dict().items()}


if __name__ == "__main__":
    out = sys.argv[1]
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    save_file(random_flux_vae(seed), out)
