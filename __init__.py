"""ComfyUI entry point of the PiD (Pixel Diffusion Decoder) node pack.

ComfyUI imports this folder as a package and calls ``comfy_entrypoint``. Everything that needs ComfyUI is
imported inside it, so the package also imports outside ComfyUI (``pid_core`` runs on its own, and test
runners may import the pack root).
"""

WEB_DIRECTORY = "./web"  # the frontend extension that starts PiD Decode with a fixed seed


async def comfy_entrypoint():
    import comfyui_version

    from .pid_core.versions import MIN_COMFYUI, too_old

    if problem := too_old("ComfyUI", comfyui_version.__version__, MIN_COMFYUI, "update ComfyUI"):
        raise ImportError(problem)
    from .nodes.paths import register_folders

    register_folders()  # before the node schemas list the folder's files
    from .nodes import PiDExtension

    return PiDExtension()
