"""The batch manifest: JSON Lines, one picture a line, checked line by line.

    {"latent": "latents/cat.latent", "sigma": 0.25, "seed": 7, "caption": "a cat on a windowsill"}
    {"latent": "latents/dog.safetensors", "out": "dogs/dog.png", "size": 2048, "caption_embedding": "dog.safetensors"}

Paths in a line are relative to the manifest's folder; ``out`` is relative to the output folder (default: the
latent's name with the run's ``--format``). A line that cannot be decoded as written (not JSON, an unknown key, a
wrong type, a caption text without ``--gemma``, an output name another line already has) becomes one sentence
naming the line, and the rest of the run goes on. Whether the latent itself is usable is found out when it is
decoded, with the same messages as ``python -m pid_core decode``.

A latent file may carry its PiD sigma and latent space in its safetensors header metadata, under the keys the
LATENT dict uses (``pid_sigma``: a number or a JSON list, one per picture; ``pid_space``); a line's own ``sigma`` and
``space`` win, and without either the sigma is 0 (a clean latent) as in the decode command.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from safetensors import SafetensorError, safe_open

from ..config import LatentSpace
from .picture import Picture

OUTPUT_SUFFIXES = (".png", ".safetensors")
_NUMBER = (int, float)

# each key and what its value must be; every key but "latent" is optional
_KEYS = {
    "latent": "a path",
    "out": "a file name ending in .png or .safetensors",
    "id": "a string or a number",
    "sigma": "a number or a list of numbers",
    "space": "one of " + ", ".join(LatentSpace.names()),
    "seed": "an integer",
    "size": '"native", "auto" or a long side in pixels',
    "steps": "a positive integer",
    "caption": "a string",
    "caption_embedding": "a path",
    "negative_caption_embedding": "a path",
    "cfg": "a number",
    "shift": "a number",
}


@dataclass(frozen=True)
class Line:
    """One manifest line: the picture to decode and where it goes, or why it cannot be decoded."""

    number: int  # 1-based line number in the manifest file
    out: str  # output path relative to the output folder (POSIX), unique in the manifest
    picture: Picture | None  # sigma None: from the latent file, else 0; space None: from the file, else the run's
    id: str | int | float | None = None
    error: str | None = None


@dataclass(frozen=True)
class Defaults:
    """The run's values for what a line leaves out."""

    size: str | int = "native"
    steps: int | None = None
    format: str = "png"
    gemma: bool = False


def _valid(key: str, value) -> bool:
    if key in ("latent", "caption_embedding", "negative_caption_embedding", "out"):
        return isinstance(value, str) and value.strip() != ""
    if key == "caption":
        return isinstance(value, str)
    if key == "id":
        return isinstance(value, (str, *_NUMBER)) and not isinstance(value, bool)
    if key == "sigma":
        values = value if isinstance(value, list) else [value]
        return len(values) > 0 and all(isinstance(v, _NUMBER) and not isinstance(v, bool) for v in values)
    if key == "space":
        return value in LatentSpace.names()
    if key in ("seed", "steps"):
        return isinstance(value, int) and not isinstance(value, bool) and (key == "seed" or value >= 1)
    if key == "size":
        if isinstance(value, str):
            return value in ("native", "auto") or value.isdigit()
        return isinstance(value, int) and not isinstance(value, bool) and value > 0
    return isinstance(value, _NUMBER) and not isinstance(value, bool)  # cfg, shift


def _output_name(fields: dict, defaults: Defaults) -> str:
    """The line's output path relative to the output folder; raises ValueError with the reason."""
    if "out" not in fields:
        return f"{Path(fields['latent']).stem}.{defaults.format}"
    out = PurePosixPath(fields["out"].replace("\\", "/"))
    if out.is_absolute() or ".." in out.parts:
        raise ValueError(f"'out' must be a path inside the output folder, got {fields['out']!r}")
    if out.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"'out' must end in .png or .safetensors, got {fields['out']!r}")
    return str(out)


def _parse(text: str, folder: Path, defaults: Defaults) -> tuple[str, Picture, object]:
    """(output name, picture, id) of one line; raises ValueError with what is wrong."""
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"it is not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"it is a JSON {type(fields).__name__}, not an object with a 'latent' key")
    unknown = sorted(set(fields) - set(_KEYS))
    if unknown:
        raise ValueError(f"unknown key {', '.join(map(repr, unknown))}; the keys are {', '.join(_KEYS)}")
    if "latent" not in fields:
        raise ValueError("it has no 'latent' (the path of the latent file)")
    for key, value in fields.items():
        if not _valid(key, value):
            raise ValueError(f"'{key}' must be {_KEYS[key]}, got {json.dumps(value)}")
    if "caption" in fields and "caption_embedding" in fields:
        raise ValueError("give either 'caption' (text) or 'caption_embedding' (a file), not both")
    if fields.get("caption") and not defaults.gemma:
        raise ValueError("its 'caption' text needs Gemma to encode it: pass --gemma FILE (Gemma-2-2B-it), or give a "
                         "'caption_embedding' file instead")
    path = lambda key: str(folder / fields[key]) if key in fields else None  # noqa: E731
    picture = Picture(
        latent=path("latent"),
        sigma=fields.get("sigma"),
        seed=fields.get("seed", 0),
        size=fields.get("size", defaults.size),
        steps=fields.get("steps", defaults.steps),
        caption=fields.get("caption"),
        caption_embedding=path("caption_embedding"),
        negative_caption_embedding=path("negative_caption_embedding"),
        cfg=fields.get("cfg"),
        shift=fields.get("shift"),
        space=fields.get("space"),
    )
    return _output_name(fields, defaults), picture, fields.get("id")


def read_manifest(path: str | Path, defaults: Defaults = Defaults()) -> list[Line]:
    """Every non-blank line of the manifest, in order: decodable, or with its one-sentence error."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Manifest not found: {path}.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(
            f"{path.name} is not a UTF-8 text file; the manifest is JSON Lines, one picture a line."
        ) from None
    folder = path.resolve().parent
    lines, owners = [], {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            out, picture, ident = _parse(raw, folder, defaults)
            key = out.casefold()  # outputs differing only in case collide on some file systems
            if key in owners:
                raise ValueError(f"its output {out} is also line {owners[key]}'s; give one of them another 'out'")
            owners[key] = number
            lines.append(Line(number, out, picture, ident))
        except ValueError as err:
            lines.append(Line(number, "", None, error=f"Line {number} of {path.name}: {err}."))
    if not lines:
        raise ValueError(f"{path.name} has no pictures: write one JSON object a line, e.g. "
                         '{"latent": "cat.latent", "sigma": 0.25}.')
    return lines


def latent_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of a latent file ({} when it has none or cannot be read: reading the latent
    then says what is wrong)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return {}


def with_file_metadata(picture: Picture) -> Picture:
    """``picture`` with the sigma and latent space its latent file carries, where the line gave none; sigma 0 when
    neither says."""
    if picture.sigma is not None and picture.space is not None:
        return picture
    meta = latent_metadata(picture.latent)
    sigma, space = picture.sigma, picture.space
    if sigma is None:
        sigma = 0.0
        if "pid_sigma" in meta:
            try:
                sigma = json.loads(meta["pid_sigma"])
            except json.JSONDecodeError:
                raise ValueError(f"{Path(picture.latent).name} carries pid_sigma {meta['pid_sigma']!r}, which is not a "
                                 "number or a JSON list of numbers; give the line a 'sigma'.") from None
    if space is None and meta.get("pid_space"):
        space = meta["pid_space"]
    return replace(picture, sigma=sigma, space=space)
