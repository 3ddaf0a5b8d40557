"""What a batch run leaves on disk: output files that are whole or absent, the results log, and the run's lock.

* An output is written under a temporary folder beside it (``.NAME.<random>.partial/``) and renamed into place, so
  a file with the output's name is always complete: a killed worker or run leaves at most a ``.partial`` folder,
  which the next run removes. A latent holding several pictures gives numbered PNGs (as the decode command
  writes them); its line is complete when all of them are there.
* The results log is JSON Lines, appended and flushed one record at a time, so an interrupted run keeps what it
  did. Each run appends one record per manifest line; a line's last record is its state.
* One run at a time writes to an output folder (a lock file in it), so two runs never decode the same picture.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from ..tensor_files import write_image

LOCK_NAME = ".pid_batch.lock"
PARTIAL_SUFFIX = ".partial"


def output_files(out: Path, pictures: int) -> list[Path]:
    """The files :func:`pid_core.tensor_files.write_image` writes for ``pictures`` pictures at ``out``."""
    if out.suffix == ".safetensors" or pictures == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i:02d}.png") for i in range(pictures)]


def complete(out: Path, pictures: int) -> bool:
    return all(path.is_file() for path in output_files(out, pictures))


def write_atomically(image: torch.Tensor, out: Path) -> list[Path]:
    """Write ``image`` as :func:`write_image` does, each file appearing under its name only once it is whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}{PARTIAL_SUFFIX}"
    scratch.mkdir()
    try:
        written = write_image(image, scratch / out.name)
        final = [out.parent / path.name for path in written]
        for path, target in zip(written, final):
            os.replace(path, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def remove_partials(folder: Path) -> int:
    """Remove the ``.partial`` folders left by killed workers or runs; returns how many there were."""
    leftovers = [p for p in folder.rglob(f".*{PARTIAL_SUFFIX}") if p.is_dir()]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return len(leftovers)


class RunLock:
    """An exclusive lock on an output folder for the length of a run (released when the process ends)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self._file = None

    def __enter__(self) -> RunLock:
        import fcntl

        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise ValueError(
                f"Another batch run is writing to {self.path.parent} (it holds {self.path.name}); wait for it to "
                "finish, or give this run another output folder."
            ) from None
        return self

    def __exit__(self, *_exc) -> None:
        self._file.close()


class ResultsLog:
    """The results JSON Lines file: the records of earlier runs, and this run's, appended as they come."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._checked_end = False

    def previous(self) -> dict[str, dict]:
        """The last record of each output name in the earlier runs (records that cannot be read are skipped: a
        run killed mid-write leaves at most a cut last line)."""
        records: dict[str, dict] = {}
        if not self.path.is_file():
            return records
        with open(self.path, encoding="utf-8") as f:
            for text in f:
                try:
                    record = json.loads(text)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and record.get("out"):
                    records[record["out"]] = record
        return records

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            if not self._checked_end:  # a run killed mid-write may have left a cut line: start a new one
                self._checked_end = True
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
            f.write(json.dumps(record).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
