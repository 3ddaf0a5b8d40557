"""Make torchvision / torchaudio wheels importable beside a torch that lacks their compiled backend.

Why this exists: the local environment pins a CPU-only ``torch==2.13.0``, but the torchvision 0.28.0
and torchaudio 2.11.0 wheels on PyPI are built against CUDA torch. Their C++ extensions link
``libtorch_cuda.so`` and cannot load. ComfyUI 0.3.75 needs torchvision to start (``comfy/sd.py``
imports it through the Stable Cascade coder) and imports torchaudio for its audio nodes. Only the
pure-Python parts are used by this project.

What it changes, each step only when it is needed (so it is a no-op on a matching CUDA install and
safe to run again):

* torchvision: ``_meta_registrations.py`` registers fake kernels for ``torchvision::nms`` and
  ``torchvision::qnms`` unconditionally, which raises "operator torchvision::nms does not exist"
  when the extension did not load. Those two decorators get the same ``_has_ops()`` guard that the
  file already uses for every other operator.
* torchaudio: a compiled library that cannot be loaded makes ``import torchaudio`` fail, while a
  missing one is tolerated (the pure-PyTorch transforms keep working). Libraries that fail to load
  are renamed to ``*.so.disabled``.

Usage: ``.venv/bin/python scripts/patch_torch_extras.py`` (with the environment's own python).
Exits non-zero if either package still fails to import afterwards.
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

GUARDED_OPS = ("nms", "qnms")


def package_dir(name: str) -> pathlib.Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    return pathlib.Path(spec.origin).parent


def import_errors(modules: tuple[str, ...]) -> dict[str, str]:
    """Import each module in one fresh interpreter; return {module: last line of its error} for failures.

    A fresh interpreter, because a failed import leaves half-initialised modules behind.
    """
    code = (
        "import sys\n"
        "for m in sys.argv[1:]:\n"
        "    try:\n"
        "        __import__(m)\n"
        "    except BaseException as e:\n"
        "        print(m, '|', type(e).__name__, str(e).splitlines()[0] if str(e) else '')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True)
    errors = dict(line.split(" | ", 1) for line in proc.stdout.splitlines() if " | " in line)
    if proc.returncode:
        errors.setdefault(modules[0], proc.stderr.strip()[-300:])
    return errors


def unloadable_libraries(paths: list[pathlib.Path]) -> list[pathlib.Path]:
    """The shared libraries among ``paths`` that cannot be loaded next to this torch."""
    code = (
        "import ctypes, sys, torch\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        ctypes.CDLL(p)\n"
        "    except OSError:\n"
        "        print(p)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True)
    return [pathlib.Path(line) for line in proc.stdout.splitlines()]


def patch_torchvision() -> str:
    root = package_dir("torchvision")
    if root is None:
        return "torchvision: not installed"
    source_file = root / "_meta_registrations.py"
    source = source_file.read_text()
    patched = 0
    for op in GUARDED_OPS:
        plain = f'@torch.library.register_fake("torchvision::{op}")'
        guarded = f'@(torch.library.register_fake("torchvision::{op}") if torchvision.extension._has_ops() else (lambda fn: fn))'
        if plain in source:
            source = source.replace(plain, guarded)
            patched += 1
    source_file.write_text(source)
    for stale in (root / "__pycache__").glob("_meta_registrations.*.pyc"):
        stale.unlink()
    return f"torchvision: guarded {patched} fake-kernel registration(s)"


def patch_torchaudio() -> str:
    root = package_dir("torchaudio")
    if root is None:
        return "torchaudio: not installed"
    disabled = []
    for lib in unloadable_libraries(sorted((root / "lib").glob("*.so"))):
        lib.rename(lib.with_name(lib.name + ".disabled"))
        disabled.append(lib.name)
    return f"torchaudio: disabled {', '.join(disabled) or 'nothing'}"


def main() -> int:
    modules = tuple(m for m in ("torchvision", "torchaudio") if package_dir(m) is not None)
    errors = import_errors(modules)
    if "torchvision" in errors:
        print(patch_torchvision())
    if "torchaudio" in errors:
        print(patch_torchaudio())
    if not errors:
        print(f"{' and '.join(modules) or 'nothing to check'}: import fine, nothing to patch")
        return 0
    errors = import_errors(tuple(errors))
    for module, why in errors.items():
        print(f"{module} still fails to import after patching: {why}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
