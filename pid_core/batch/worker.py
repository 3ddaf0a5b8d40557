"""A batch worker: one decoder per worker slot (a GPU, or CPU cores), loaded once, one result record per picture.

Plain Python: the driver makes it a Ray actor. A picture that fails (a bad latent, out of memory even after
the decode's own fallback to a smaller plan) becomes a record with the same one-sentence error the decode command
prints, and the worker goes on with the next one.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..tensor_files import read_latent_file
from .manifest import Line, with_file_metadata
from .outputs import complete, output_files, write_atomically
from .picture import DecoderSettings, PictureDecoder

log = logging.getLogger(__name__)

# What the decode command reports as one sentence (pid_core's own errors are ValueErrors); anything else is a bug,
# recorded with its type so that it can be reported.
EXPECTED_ERRORS = (ValueError, OSError, torch.OutOfMemoryError, MemoryError)


@dataclass(frozen=True)
class Job:
    """A manifest line as a worker gets it: the line and the output folder."""

    line: Line
    out_dir: str

    @property
    def out(self) -> Path:
        return Path(self.out_dir) / self.line.out

    def relative(self, paths: list[Path]) -> list[str]:
        """Output paths as the results log names them: relative to the output folder."""
        return [path.relative_to(self.out_dir).as_posix() for path in paths]


class _DecodeLog(logging.Handler):
    """Keeps what pid_core.api logs about how a decode runs ("PiD decode: 2048x2048 px whole: about ...")."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage().removeprefix("PiD decode: "))


@contextmanager
def _captured():
    """The decode's plan messages and warnings, kept for the record instead of printed."""
    handler, api_log = _DecodeLog(), logging.getLogger("pid_core.api")
    level = api_log.level
    api_log.addHandler(handler)
    api_log.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield handler.lines, caught
    finally:
        api_log.removeHandler(handler)
        api_log.setLevel(level)


class BatchWorker:
    """Decodes the manifest lines it is given with one :class:`PictureDecoder` (checkpoint and Gemma loaded once)."""

    def __init__(self, settings: DecoderSettings, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.decoder = PictureDecoder(settings, keep_gemma=True)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def identity(self) -> dict:
        return {"worker": self.name, "pid": os.getpid(), "threads": torch.get_num_threads()}

    def load(self) -> str | None:
        """Load the checkpoint now (the driver checks it before sending pictures); the error sentence, or None."""
        try:
            self.decoder.decoder
        except EXPECTED_ERRORS as err:
            return str(err)
        return None

    def run(self, job: Job) -> dict:
        """Decode one manifest line unless its outputs are already complete; its result record."""
        line, started = job.line, time.monotonic()
        record = {"status": "failed", "outputs": [], "seconds": None, "plan": None, "error": None, "warnings": [],
                  "worker": self.name}
        with _captured() as (plan, caught):
            try:
                picture = with_file_metadata(line.picture)
                shape = read_latent_file(picture.latent).shape
                pictures = shape[0] if len(shape) > 1 else 0  # 0: not a batch of latents, the decode says what is wrong
                if pictures and complete(job.out, pictures):  # e.g. a retry whose first attempt got as far as writing
                    record.update(status="skipped", outputs=job.relative(output_files(job.out, pictures)))
                else:
                    image = self.decoder.decode(picture)
                    record.update(status="done", outputs=job.relative(write_atomically(image, job.out)))
                record.update(sigma=picture.sigma, space=picture.space)
            except EXPECTED_ERRORS as err:
                record["error"] = str(err)
            except Exception as err:  # noqa: BLE001 - a bug must not stop the run; it is recorded with its type
                log.error("line %d: %s", line.number, traceback.format_exc())
                record["error"] = f"Unexpected {type(err).__name__} (a bug in pid_core, please report it): {err}"
        record["seconds"] = round(time.monotonic() - started, 3)
        record["plan"] = "; ".join(plan) or None
        record["warnings"] = list(dict.fromkeys(str(w.message) for w in caught))
        return record
