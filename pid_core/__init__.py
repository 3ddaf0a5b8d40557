"""PiD (Pixel Diffusion Decoder) in pure PyTorch: load a checkpoint, decode a latent.

Never imports ComfyUI; the pack's ``nodes/`` are thin glue over this package.
"""

from .api import PiDDecoder, build_network, decode
from .checkpoint import CheckpointError, CheckpointInfo, load_checkpoint
from .config import RELEASED_CHECKPOINTS, LatentSpace, NetworkConfig

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "LatentSpace",
    "NetworkConfig",
    "PiDDecoder",
    "RELEASED_CHECKPOINTS",
    "build_network",
    "decode",
    "load_checkpoint",
]
