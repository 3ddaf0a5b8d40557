"""Names and helpers shared by every node of the pack."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

from comfy_api.latest import io
from server import PromptServer

# Node ids carry this prefix: ComfyUI core already has PiDConditioning and other packs use plain PiD...
NODE_PREFIX = "PixelDecoderPiD_"
CATEGORY = "PiD"
PiDDecoderType = io.Custom("PID_DECODER")

log = logging.getLogger("comfyui-pid")


@contextmanager
def reported_warnings(node: str, node_id: str | None = None):
    """pid_core reports through ``warnings`` (e.g. a base Gemma-2, a size outside the training range): each goes to
    ComfyUI's log as ``node: message`` and, given the node's id, onto the node in the UI as it happens."""
    shown: list[str] = []

    def show(message, *_args, **_kwargs) -> None:
        log.warning("%s: %s", node, message)
        shown.append(str(message))
        if node_id is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text("\n".join(shown), node_id)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield
