"""PiD (Pixel Diffusion Decoder) in pure PyTorch: load a checkpoint, decode a latent.

Never imports ComfyUI; the pack's ``nodes/`` are thin glue over this package.
"""

from .versions import check_torch

check_torch()  # before anything that needs a newer torch fails with a less helpful message


from .api import PiDDecoder, build_network, decode
from .captions import CaptionEncoder, empty_caption_embedding
from .checkpoint import CheckpointError, CheckpointInfo, load_checkpoint
from .config import RELEASED_CHECKPOINTS, LatentSpace, NetworkConfig
from .download import download_gemma, download_pid
from .rae import RAE, load_rae

__all__ = [
    "CaptionEncoder",
    "CheckpointError",
    "CheckpointInfo",
    "LatentSpace",
    "NetworkConfig",
    "PiDDecoder",
    "RAE",
    "RELEASED_CHECKPOINTS",
    "build_network",
    "decode",
    "download_gemma",
    "download_pid",
    "empty_caption_embedding",
    "load_checkpoint",
    "load_rae",
]
