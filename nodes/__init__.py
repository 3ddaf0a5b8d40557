"""The ComfyUI nodes: thin glue between ComfyUI's graph, model management and progress, and ``pid_core``."""

from comfy_api.latest import ComfyExtension, io

from .caption import PiDCaption
from .decode import PiDDecode
from .encode import PiDEncodeImage
from .loader import LoadPiDDecoder
from .rae_decode import PiDRAEDecode
from .sampling import PiDKSampler, PiDTagLatent


class PiDExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadPiDDecoder, PiDKSampler, PiDTagLatent, PiDDecode, PiDEncodeImage, PiDCaption, PiDRAEDecode]
