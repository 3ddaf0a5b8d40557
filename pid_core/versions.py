"""The oldest torch and ComfyUI the pack runs on, checked at import with a message that says what to do."""

from __future__ import annotations

import re

# torch.OutOfMemoryError and torch.cuda.is_bf16_supported(including_emulation=...) arrived in 2.5
MIN_TORCH = (2, 5)
# the oldest ComfyUI the tests run against (its comfy_api.latest node interface)
MIN_COMFYUI = (0, 3, 75)


def release(version: str) -> tuple[int, ...]:
    """The release numbers of a version string: "2.5.1+cu121" -> (2, 5, 1), "2.6.0a0+git1" -> (2, 6, 0)."""
    numbers = re.match(r"\d+(\.\d+)*", version.strip())
    if numbers is None:
        raise ValueError(f"Not a version number: {version!r}.")
    return tuple(int(n) for n in numbers.group(0).split("."))


def too_old(name: str, version: str, minimum: tuple[int, ...], upgrade: str) -> str | None:
    """The sentence to show when ``version`` of ``name`` is older than ``minimum``, else None."""
    if release(version) >= minimum:
        return None
    wanted = ".".join(map(str, minimum))
    return f"The PiD nodes need {name} {wanted} or newer, but this one is {version}: {upgrade}."


def check_torch() -> None:
    import torch

    if (problem := too_old("PyTorch", torch.__version__, MIN_TORCH,
                           "update PyTorch the way your ComfyUI was installed (see pytorch.org for the command)")):
        raise ImportError(problem)
