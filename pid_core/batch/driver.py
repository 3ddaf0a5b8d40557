"""The driver of ``python -m pid_core batch``: Ray actors as decoders, pictures handed out one at a time, retries after
a worker died, resume, progress.

Engine: Ray core actors, one :class:`~.worker.BatchWorker` per worker slot (a GPU of the cluster; without GPUs, CPU
cores). Each actor loads the checkpoint (and Gemma) once and decodes the pictures it is sent, one manifest line
per task. Without ``--ray-address`` Ray starts inside this process on this machine and stops with it; with one,
the run joins that cluster, and pid_core is shipped to its workers (``py_modules``). The files a manifest names,
the checkpoint and the output folder must be reachable under the same paths on every node (a shared file system).

Faults. A picture's own failure is a record (see the worker). A worker process that dies (killed, out of system
memory, a crash) takes its current picture with it: Ray starts a new process for the actor (``max_restarts``),
which loads the checkpoint again, and the driver sends the picture again, at most ``--retries`` more times (Ray's
own task retries are off, so that every attempt is counted); a picture whose workers keep dying is recorded as
failed. Outputs appear under their names only when complete, and a worker skips a picture whose outputs are already
there, so a retry after a worker died just as it finished does not decode it twice.

Resume. Rerunning the command skips the lines whose last record says done and whose outputs all exist (without
starting Ray when nothing is left); lines that failed are tried again.

Manifest lines are not batched into one network call with each other: the sampler draws one noise tensor for a
decode's whole batch from one seed, so a picture decoded beside others gets other noise than decoded alone, and the
outputs would no longer equal the decode command's. The pictures of one latent file do share network calls, as
planned by :func:`pid_core.api.plan_decode`, exactly as the decode command and PiD Decode run them.
"""

from __future__ import annotations

import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from ..memory import GB, available_memory
from .manifest import Defaults, Line, read_manifest
from .outputs import ResultsLog, RunLock, remove_partials
from .picture import DecoderSettings
from .worker import BatchWorker, Job

RAY_MISSING = (
    "The batch command runs on Ray, which is not installed here: pip install \"ray>=2.40\" with the Python that runs "
    "pid_core (on every machine of a cluster)."
)
WORKER_RESTARTS = 10  # new processes Ray may start for one worker slot over a run
WORKING_MEMORY = 1 * GB  # a CPU worker's working memory beyond its weights, for the default number of workers
EXIT_FAILED, EXIT_INTERRUPTED = 1, 130  # (2: the run could not go on, as every command's errors)


@dataclass(frozen=True)
class BatchOptions:
    manifest: str
    out_dir: str
    settings: DecoderSettings
    defaults: Defaults = Defaults()
    results: str | None = None  # default: OUT_DIR/results.jsonl
    ray_address: str | None = None
    workers: int | None = None  # default: one per GPU, else one per CPU core (as many as fit in memory)
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None
    retries: int = 2
    progress: bool = True


def import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError(RAY_MISSING) from None
    return ray


class Progress:
    """One status line on stderr: pictures done / failed / skipped of the total, pictures per second, time left.
    Rewritten in place on a terminal; elsewhere (logs, CI) a line every 10 seconds."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.enabled = total, enabled
        self.counts = {"done": 0, "failed": 0, "skipped": 0}
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def restart(self) -> None:
        self.started = time.monotonic()

    def add(self, status: str) -> None:
        self.counts[status] += 1

    def rate(self) -> float:
        return self.counts["done"] / max(time.monotonic() - self.started, 1e-9)

    def line(self) -> str:
        c, elapsed = self.counts, time.monotonic() - self.started
        finished = sum(c.values())
        rate = self.rate()
        left = "" if not rate or finished == self.total else f", about {(self.total - finished) / rate:.0f} s left"
        return (f"batch: {finished}/{self.total} | {c['done']} done, {c['failed']} failed, {c['skipped']} skipped | "
                f"{rate:.2f} pictures/s | {elapsed:.0f} s{left}")

    def show(self, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            print("\r" + self.line().ljust(100), end="\n" if final else "", file=sys.stderr, flush=True)
        elif final or now - self._last >= 10:
            print(self.line(), file=sys.stderr, flush=True)
        self._last = now


def _record(line: Line, run: str, attempts: int = 0, **fields) -> dict:
    latent = line.picture.latent if line.picture else None
    finished = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    return {"run": run, "line": line.number, "id": line.id, "latent": latent, "out": line.out or None,
            "attempts": attempts, **fields, "finished": finished}


def _already_complete(line: Line, previous: dict[str, dict], out_dir: Path) -> list[str] | None:
    """The outputs of a line an earlier run finished, when they are all still there; else None."""
    record = previous.get(line.out)
    if not record or record.get("status") not in ("done", "skipped") or not record.get("outputs"):
        return None
    outputs = record["outputs"]
    return outputs if all((out_dir / o).is_file() for o in outputs) else None


def _worker_count(options: BatchOptions, cpus: float, gpus: float, local: bool) -> tuple[int, float, float]:
    """(workers, CPUs each, GPUs each) for the cluster's resources."""
    gpus_each = options.gpus_per_worker if options.gpus_per_worker is not None else (1.0 if gpus else 0.0)
    if options.workers:
        workers = options.workers
    elif gpus_each:
        workers = max(1, int(gpus // gpus_each))
    else:
        workers = max(1, int(cpus // (options.cpus_per_worker or 1)))
        free = available_memory("cpu") if local else None
        if free is not None:  # each CPU worker holds its own weights: no more workers than fit in free memory
            workers = min(workers, max(1, free // _worker_memory(options.settings)))
    cpus_each = options.cpus_per_worker or (1.0 if gpus_each else max(1.0, float(int(cpus // workers))))
    if local and (workers * cpus_each > cpus or workers * gpus_each > gpus):
        raise ValueError(
            f"{workers} workers of {cpus_each:g} CPU(s) and {gpus_each:g} GPU(s) each need more than this machine has "
            f"({cpus:g} CPUs, {gpus:g} GPUs): lower --workers, --cpus-per-worker or --gpus-per-worker."
        )
    return workers, cpus_each, gpus_each


def _worker_memory(settings: DecoderSettings) -> int:
    """About what one CPU worker holds: the weights (bf16: the size of an official bf16 file), Gemma, working memory."""
    weights = Path(settings.checkpoint).stat().st_size * (2 if settings.precision == "fp32" else 1)
    gemma = Path(settings.gemma).stat().st_size if settings.gemma and Path(settings.gemma).is_file() else 0
    return weights + gemma + WORKING_MEMORY


class _Interrupted(Exception):
    pass


def _on_sigterm(*_args) -> None:
    raise _Interrupted


def run(options: BatchOptions) -> int:
    """Run a batch; the exit code (0: every line done; 1: some failed; 2: the run could not go on; 130: interrupted)."""
    out_dir = Path(options.out_dir)
    if not Path(options.settings.checkpoint).is_file():
        raise ValueError(f"PiD checkpoint not found: {options.settings.checkpoint}.")
    if options.settings.gemma and not Path(options.settings.gemma).exists():
        raise ValueError(f"Gemma file not found: {options.settings.gemma}.")
    lines = read_manifest(options.manifest, options.defaults)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = ResultsLog(Path(options.results) if options.results else out_dir / "results.jsonl")
    run_id = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with RunLock(out_dir):
        remove_partials(out_dir)
        progress = Progress(len(lines), options.progress)
        previous = log.previous()
        todo = []
        for line in lines:
            if line.error:
                log.append(_record(line, run_id, status="failed", outputs=[], error=line.error))
                progress.add("failed")
            elif (outputs := _already_complete(line, previous, out_dir)) is not None:
                log.append(_record(line, run_id, status="skipped", outputs=outputs))
                progress.add("skipped")
            else:
                todo.append(line)
        if todo:
            old_handler = signal.signal(signal.SIGTERM, _on_sigterm)
            try:
                _decode_on_ray(options, todo, out_dir, log, run_id, progress)
            except (KeyboardInterrupt, _Interrupted):
                progress.show(final=True)
                print(f"interrupted: rerun the same command to decode the rest (results in {log.path}).",
                      file=sys.stderr)
                return EXIT_INTERRUPTED
            finally:
                signal.signal(signal.SIGTERM, old_handler)
        progress.show(final=True)
    c = progress.counts
    print(f"{c['done']} done, {c['failed']} failed, {c['skipped']} skipped (already complete); results in {log.path}",
          file=sys.stderr)
    return EXIT_FAILED if c["failed"] else 0


def _decode_on_ray(options: BatchOptions, todo: list[Line], out_dir: Path, log: ResultsLog, run_id: str,
                   progress: Progress) -> None:
    ray = import_ray()
    local = options.ray_address is None
    runtime_env = {"py_modules": [str(Path(__file__).resolve().parents[1])]}  # this pid_core, on every node
    ray.init(address=options.ray_address, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env=runtime_env)
    try:
        resources = ray.cluster_resources()
        workers, cpus_each, gpus_each = _worker_count(options, resources.get("CPU", 1), resources.get("GPU", 0), local)
        workers = min(workers, len(todo))  # each worker loads the checkpoint: none without a picture to decode
        settings = options.settings
        if gpus_each:
            settings = replace(settings, device="cuda")
        actor = ray.remote(BatchWorker).options(
            num_cpus=cpus_each, num_gpus=gpus_each, max_restarts=WORKER_RESTARTS, max_task_retries=0
        )
        pool = [actor.remote(settings, threads=max(1, int(cpus_each))) for _ in range(workers)]
        print(f"batch: {len(todo)} pictures to decode on {workers} worker(s) ({cpus_each:g} CPU, {gpus_each:g} GPU "
              f"each), loading {Path(settings.checkpoint).name}", file=sys.stderr, flush=True)
        for loading in [w.load.remote() for w in pool]:
            try:
                error = ray.get(loading)
            except ray.exceptions.RayActorError:
                continue  # died while loading: Ray starts it again, and it loads with its first picture
            if error:
                raise ValueError(error)
        progress.restart()  # pictures per second from here: starting Ray and loading are not decoding
        _schedule(ray, pool, todo, out_dir, log, run_id, progress, options.retries)
    finally:
        ray.shutdown()


def _schedule(ray, pool: list, todo: list[Line], out_dir: Path, log: ResultsLog, run_id: str, progress: Progress,
              retries: int) -> None:
    """Keep every worker busy with one picture until all are recorded. The picture of a worker that died goes back
    in the queue (at most ``retries`` more times), and the worker gets a ping that Ray retries until its new process
    answers (back to work) or Ray has given up on it (``WORKER_RESTARTS``; it leaves the pool)."""
    pending = deque((line, 1) for line in todo)
    idle, running, pings = list(pool), {}, {}

    def hand_out() -> None:
        while idle and pending:
            worker = idle.pop()
            line, attempt = pending.popleft()
            running[worker.run.remote(Job(line, str(out_dir)))] = (worker, line, attempt)

    while pending or running:
        hand_out()
        ready, _ = ray.wait([*running, *pings], num_returns=1, timeout=1.0)
        finished = []
        for ref in ready:
            if ref in pings:
                worker = pings.pop(ref)
                try:
                    ray.get(ref)
                    idle.append(worker)
                except ray.exceptions.RayActorError:
                    print("\nbatch: a worker died too often and was not replaced", file=sys.stderr, flush=True)
                continue
            worker, line, attempt = running.pop(ref)
            try:
                finished.append((line, attempt, ray.get(ref)))
                idle.append(worker)
            except ray.exceptions.RayActorError:
                pings[worker.identity.options(max_task_retries=-1).remote()] = worker
                if attempt <= retries:
                    pending.append((line, attempt + 1))
                else:
                    finished.append((line, attempt, _failed(
                        f"The worker decoding this picture died {attempt} times (killed, out of system memory, or "
                        "crashed); see the Ray worker logs in Ray's session folder on its machine.")))
            except ray.exceptions.RayError as err:  # not raised by the worker's own code, which records its errors
                idle.append(worker)
                finished.append((line, attempt, _failed(str(err).strip().splitlines()[-1])))
        hand_out()  # new work before the records, so that no worker waits for the log
        for line, attempt, result in finished:
            log.append(_record(line, run_id, attempt, **result))
            progress.add(result["status"])
        if pending and not (idle or running or pings):
            raise ValueError(f"Every worker died and Ray could not start new ones; {len(pending)} pictures were not "
                             "decoded: rerun the same command to go on.")
        progress.show()


def _failed(error: str) -> dict:
    return {"status": "failed", "outputs": [], "error": error}
