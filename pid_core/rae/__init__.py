"""The semantic autoencoders PiD also decodes from: DINOv2-with-registers RAE and SigLIP-2 Scale-RAE.

    rae = load_rae(["dinov2-with-registers-base/", "stat.pt", "model.pt"])   # any order, any subset
    rae.space, rae.channels                     # LatentSpace.DINOV2, 768
    latent = rae.encode(image)                  # [B, 3, H, W] in [-1, 1] -> [B, 768, 32, 32]
    picture = rae.decode(latent)                # -> [B, 3, 512, 512] in [-1, 1], the RAE's own decoder

The latents are what PiD's DINOv2 / SigLIP checkpoints take (see ``autoencoder``); ``rae.check_matches(info)``
refuses an RAE that does not fit a PiD checkpoint. Pure PyTorch: no transformers, no ComfyUI.
"""

from .autoencoder import LATENT_NORM_EPS, RAE, SPECS, load_rae

__all__ = ["LATENT_NORM_EPS", "RAE", "SPECS", "load_rae"]
