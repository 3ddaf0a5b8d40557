"""ComfyUI entry point of the PiD (Pixel Diffusion Decoder) node pack.

ComfyUI imports this folder as a package; ``pid_core`` (pure PyTorch) also works on its own.
"""

from .nodes.paths import register_folders

register_folders()

from .nodes import PiDExtension  # noqa: E402  (the folders must exist before the node schemas list them)


async def comfy_entrypoint() -> PiDExtension:
    return PiDExtension()
