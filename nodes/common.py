"""Names shared by every node of the pack."""

from comfy_api.latest import io

# Node ids carry this prefix: ComfyUI core already has PiDConditioning and other packs use plain PiD...
NODE_PREFIX = "PixelDecoderPiD_"
CATEGORY = "PiD"
PiDDecoderType = io.Custom("PID_DECODER")
