"""``python -m pid_core batch``: the manifest, the worker, and whole runs on a local Ray with 2 CPU workers and a
tiny checkpoint.

The Ray runs are subprocesses of the real command (Ray starts inside each, 10-20 s on 2 cores): the outputs equal
the decode command's bit for bit, bad lines fail with their sentence while the rest are done, a worker killed
mid-run is replaced and its picture decoded again, and a rerun after an interrupted run decodes only what was
missing. The rest runs the same code in this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_gemma as tg
from pid_core.__main__ import main
from pid_core.batch.manifest import Defaults, read_manifest, with_file_metadata
from pid_core.batch.outputs import ResultsLog, complete, remove_partials, write_atomically
from pid_core.batch.picture import DecoderSettings
from pid_core.batch.worker import BatchWorker, Job
from pid_core.captions import CaptionEncoder
from pid_core.gemma import GemmaConfig
from pid_core.network import PiDNetwork
from tiny import tiny_network

PACK_ROOT = Path(__file__).resolve().parents[2]
RAY_TIMEOUT = 300  # seconds a whole Ray run may take on a busy 2-core machine


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny v1 Flux network saved like the official 2k file (its folder name tells the latent space)."""
    folder = tmp_path_factory.mktemp("ckpt") / "PiD_res2k_sr4x_official_flux_distill_4step"
    folder.mkdir()
    path = folder / "model_ema_bf16.pth"
    torch.save({f"net.{k}": v.to(torch.bfloat16) for k, v in tiny_network("flux_2k").state_dict().items()}, path)
    return path


def write_latent(path: Path, tensor: torch.Tensor, **metadata: str) -> Path:
    save_file({"latent_tensor": tensor.contiguous(), "latent_format_version_0": torch.tensor([])}, str(path),
              metadata=metadata or None)
    return path


def latents(folder: Path, count: int, cells: int = 4, seed: int = 0) -> list[Path]:
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(exist_ok=True)
    return [write_latent(folder / f"p{i}.latent", torch.randn(1, 16, cells, cells, generator=gen))
            for i in range(count)]


def write_manifest(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def single(checkpoint: Path, latent: Path, out: Path, *args: str) -> Path:
    """The decode command's output for one latent, run in this process."""
    assert main(["decode", str(checkpoint), str(latent), "--out", str(out), *args]) == 0
    return out


def records(out_dir: Path) -> list[dict]:
    path = out_dir / "results.jsonl"
    return [json.loads(t) for t in path.read_text().splitlines()] if path.is_file() else []


def batch_command(manifest: Path, out_dir: Path, checkpoint: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pid_core", "batch", str(manifest), str(out_dir), "--checkpoint", str(checkpoint),
            "--workers", "2", "--no-progress", *args]


def run_batch(*command_args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(batch_command(*command_args, **kwargs), cwd=PACK_ROOT, capture_output=True, text=True,
                          timeout=RAY_TIMEOUT)


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = RAY_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := condition()):
            return value
        if process.poll() is not None:
            pytest.fail(f"the batch ended before {what}: {process.communicate()[1][-2000:]}")
        time.sleep(0.02)
    stop(process)
    pytest.fail(f"timed out waiting for {what}")


def finish(process: subprocess.Popen) -> str:
    """The batch's stderr once it has ended (interrupted when it runs too long)."""
    try:
        return process.communicate(timeout=RAY_TIMEOUT)[1]
    except subprocess.TimeoutExpired:
        stop(process)
        pytest.fail("the batch did not end in time")


def stop(process: subprocess.Popen) -> None:
    """Interrupt a batch as Ctrl-C does, so that it stops its Ray (a killed driver leaves Ray's agents behind)."""
    process.send_signal(signal.SIGINT)
    try:
        process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


# --------------------------------------------------------------------------- the manifest


@pytest.mark.parametrize("text, message", [
    ("not json", "it is not valid JSON (Expecting value at column 1)"),
    ("[1, 2]", "it is a JSON list, not an object"),
    ('{"latent": "a.latent", "sigm": 0.2}', "unknown key 'sigm'; the keys are latent, out,"),
    ('{"sigma": 0.2}', "it has no 'latent'"),
    ('{"latent": "a.latent", "sigma": "high"}', "'sigma' must be a number or a list of numbers, got \"high\""),
    ('{"latent": "a.latent", "seed": 1.5}', "'seed' must be an integer"),
    ('{"latent": "a.latent", "steps": 0}', "'steps' must be a positive integer"),
    ('{"latent": "a.latent", "size": "huge"}', "'size' must be \"native\", \"auto\" or a long side"),
    ('{"latent": "a.latent", "space": "sd15"}', "'space' must be one of flux,"),
    ('{"latent": "a.latent", "out": "../a.png"}', "'out' must be a path inside the output folder"),
    ('{"latent": "a.latent", "out": "a.jpg"}', "'out' must end in .png or .safetensors"),
    ('{"latent": "a.latent", "caption": "a fox", "caption_embedding": "c.safetensors"}', "not both"),
    ('{"latent": "a.latent", "caption": "a fox"}', "its 'caption' text needs Gemma"),
])
def test_a_bad_line_is_one_sentence_naming_it(tmp_path, text, message):
    lines = read_manifest(write_manifest(tmp_path / "m.jsonl", ['{"latent": "ok.latent"}', text]))
    assert lines[0].error is None
    assert lines[1].error.startswith("Line 2 of m.jsonl: ") and message in lines[1].error, lines[1].error
    assert lines[1].error.endswith(".") and lines[1].error.count(". ") == 0


def test_manifest_paths_defaults_and_duplicate_outputs(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", [
        {"latent": "lat/a.latent", "seed": 3, "caption_embedding": "c.safetensors"},
        "",
        {"latent": "lat/b.latent", "out": "sub/b.safetensors", "size": 2048, "steps": 2, "id": "b"},
        {"latent": "other/a.latent"},  # the same default output name as line 1
        {"latent": "other/a.latent", "out": "A.png"},  # differs only in case
    ])
    a, b, dup, case = read_manifest(manifest, Defaults(size="auto", steps=1, format="png"))
    assert (a.number, a.out, a.picture.seed, a.picture.size, a.picture.steps) == (1, "a.png", 3, "auto", 1)
    assert a.picture.latent == str(tmp_path / "lat/a.latent")  # relative to the manifest's folder
    assert a.picture.caption_embedding == str(tmp_path / "c.safetensors")
    assert a.picture.sigma is None  # from the latent file when it carries one, else 0
    assert (b.number, b.out, b.id, b.picture.size, b.picture.steps) == (3, "sub/b.safetensors", "b", 2048, 2)
    assert "its output a.png is also line 1's" in dup.error and "also line 1's" in case.error


def test_sigma_and_space_come_from_the_latent_file_unless_the_line_gives_them(tmp_path):
    write_latent(tmp_path / "tagged.latent", torch.zeros(2, 16, 2, 2), pid_sigma="[0.1, 0.3]", pid_space="sd3")
    write_latent(tmp_path / "plain.latent", torch.zeros(1, 16, 2, 2))
    tagged, own, plain = read_manifest(write_manifest(tmp_path / "m.jsonl", [
        {"latent": "tagged.latent"}, {"latent": "tagged.latent", "out": "own.png", "sigma": 0.5, "space": "flux"},
        {"latent": "plain.latent"},
    ]))
    assert (with_file_metadata(tagged.picture).sigma, with_file_metadata(tagged.picture).space) == ([0.1, 0.3], "sd3")
    assert (with_file_metadata(own.picture).sigma, with_file_metadata(own.picture).space) == (0.5, "flux")
    assert (with_file_metadata(plain.picture).sigma, with_file_metadata(plain.picture).space) == (0.0, None)


# --------------------------------------------------------------------------- outputs and the results log


def test_outputs_appear_whole_under_their_names(tmp_path):
    paths = write_atomically(torch.zeros(2, 3, 16, 16), tmp_path / "sub" / "two.png")
    assert [p.name for p in paths] == ["two_00.png", "two_01.png"]  # numbered as the decode command numbers them
    assert complete(tmp_path / "sub" / "two.png", 2) and not complete(tmp_path / "sub" / "two.png", 3)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["two_00.png", "two_01.png"]  # no scratch left
    (tmp_path / "sub" / ".two.png.0123.partial").mkdir()  # what a killed worker leaves
    assert remove_partials(tmp_path) == 1 and len(list((tmp_path / "sub").iterdir())) == 2


def test_results_log_survives_a_cut_last_line(tmp_path):
    log = ResultsLog(tmp_path / "results.jsonl")
    log.path.write_text('{"out": "a.png", "status": "done"}\n{"out": "b.png", "sta')  # a run killed mid-write
    assert set(log.previous()) == {"a.png"}
    ResultsLog(log.path).append({"out": "b.png", "status": "done"})
    assert set(ResultsLog(log.path).previous()) == {"a.png", "b.png"}


# --------------------------------------------------------------------------- the worker, in this process


def test_worker_decodes_like_the_decode_command_and_records_failures(checkpoint, tmp_path, monkeypatch):
    a, b = latents(tmp_path / "lat", 2)
    write_latent(tmp_path / "lat" / "nan.latent", torch.full((1, 16, 2, 2), float("nan")))
    write_latent(tmp_path / "lat" / "empty.latent", torch.zeros(0, 16, 2, 2))
    lines = read_manifest(write_manifest(tmp_path / "m.jsonl", [
        {"latent": "lat/p0.latent", "sigma": 0.2, "seed": 5, "out": "a.safetensors"},
        {"latent": "lat/nan.latent"},
        {"latent": "lat/p1.latent", "out": "oom.png"},
        {"latent": "lat/empty.latent"},
    ]), Defaults(steps=2))
    worker, out_dir = BatchWorker(DecoderSettings(str(checkpoint))), tmp_path / "out"
    done, nan = (worker.run(Job(line, str(out_dir))) for line in lines[:2])
    expected = single(checkpoint, a, tmp_path / "single.safetensors", "--sigma", "0.2", "--seed", "5", "--steps", "2")
    assert done["status"] == "done" and done["outputs"] == ["a.safetensors"] and done["error"] is None
    assert torch.equal(load_file(str(out_dir / "a.safetensors"))["image"], load_file(str(expected))["image"])
    assert "whole" in done["plan"] and done["seconds"] > 0 and done["sigma"] == 0.2
    assert nan["status"] == "failed" and "NaN/inf" in nan["error"] and nan["outputs"] == []
    assert worker.run(Job(lines[0], str(out_dir)))["status"] == "skipped"  # complete outputs are not decoded again
    empty = worker.run(Job(lines[3], str(out_dir)))
    assert empty["status"] == "failed" and "The latent batch is empty" in empty["error"], empty

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with monkeypatch.context() as m:
        m.setattr(PiDNetwork, "forward", out_of_memory)
        oom = worker.run(Job(lines[2], str(out_dir)))
    # out of memory even after the decode's own fallback to smaller plans: the sentence the decode command prints
    assert oom["status"] == "failed" and oom["error"].startswith("PiD ran out of memory"), oom
    assert worker.run(Job(lines[2], str(out_dir)))["status"] == "done"  # and the worker goes on


def test_worker_loads_gemma_once_and_encodes_as_the_decode_command(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("PID_CACHE_DIR", str(tmp_path / "cache"))
    config = GemmaConfig(vocab_size=tg.VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                         num_kv_heads=1)
    gemma = tg.write_comfy(tmp_path / "gemma_2_2b_it_elm_bf16.safetensors", tg.random_weights(config, 6))
    a, b = latents(tmp_path / "lat", 2, cells=2)
    lines = read_manifest(write_manifest(tmp_path / "m.jsonl", [
        {"latent": "lat/p0.latent", "caption": "a red fox"},
        {"latent": "lat/p1.latent", "caption": "an old sailor"},
        {"latent": "lat/p0.latent", "caption": "a red fox", "out": "again.png"},
    ]), Defaults(steps=1, gemma=True))
    loads = []
    load = CaptionEncoder.load.__func__
    monkeypatch.setattr(CaptionEncoder, "load", classmethod(lambda cls, *a, **k: loads.append(a) or load(cls, *a, **k)))
    worker = BatchWorker(DecoderSettings(str(checkpoint), gemma=str(gemma)))
    assert [worker.run(Job(line, str(tmp_path / "out")))["status"] for line in lines] == ["done"] * 3
    assert len(loads) == 1
    monkeypatch.undo()
    for latent, text, name in ((a, "a red fox", "p0"), (b, "an old sailor", "p1")):
        expected = single(checkpoint, latent, tmp_path / f"{name}.png", "--steps", "1", "--gemma", str(gemma),
                          "--caption", text)
        assert (tmp_path / "out" / f"{name}.png").read_bytes() == expected.read_bytes()


def test_without_ray_the_command_says_how_to_install_it(checkpoint, tmp_path, capsys, monkeypatch):
    latents(tmp_path / "lat", 1)
    manifest = write_manifest(tmp_path / "m.jsonl", [{"latent": "lat/p0.latent"}])
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    assert main(["batch", str(manifest), str(tmp_path / "out"), "--checkpoint", str(checkpoint)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: The batch command runs on Ray") and 'pip install "ray' in err, err


# --------------------------------------------------------------------------- whole runs on a local Ray

SLOW = 6  # pictures of about a second each on one core, so that a worker can be killed in the middle of one
GOOD = {  # manifest line -> the decode command's arguments for the same picture (besides --steps 2 and --out)
    **{i + 1: (f"p{i}.latent", f"p{i}.png", "--seed", str(i)) for i in range(SLOW)},
    SLOW + 1: ("tagged.latent", "sub/tagged.safetensors", "--sigma", "0.3", "--seed", "1", "--caption-embedding",
               "caption.safetensors"),
    SLOW + 2: ("two.latent", "two.png", "--sigma", "0.25"),
}
BAD = {  # manifest line -> its error
    SLOW + 3: "Line 9 of m.jsonl: it is not valid JSON",
    SLOW + 4: "Line 10 of m.jsonl: 'sigma' must be",
    SLOW + 5: "Latent file not found",
    SLOW + 6: "NaN/inf",
    SLOW + 7: "but this one has 4",
    SLOW + 8: "Line 14 of m.jsonl: its 'caption' text needs Gemma",
}


@pytest.fixture(scope="module")
def killed_run(checkpoint, tmp_path_factory):
    """One batch of good and bad lines on 2 workers, one of which is killed (SIGKILL) in the middle of a picture."""
    root = tmp_path_factory.mktemp("batch")
    latents(root / "lat", SLOW, cells=8)
    write_latent(root / "lat" / "tagged.latent", torch.randn(1, 16, 4, 4), pid_sigma="0.3")
    write_latent(root / "lat" / "two.latent", torch.randn(2, 16, 4, 4))
    write_latent(root / "lat" / "nan.latent", torch.full((1, 16, 4, 4), float("nan")))
    write_latent(root / "lat" / "four.latent", torch.randn(1, 4, 4, 4))
    save_file({"caption": torch.randn(1, 300, 32)}, str(root / "caption.safetensors"))
    manifest = write_manifest(root / "m.jsonl", [
        *({"latent": f"lat/p{i}.latent", "seed": i} for i in range(SLOW)),
        {"latent": "lat/tagged.latent", "seed": 1, "caption_embedding": "caption.safetensors",
         "out": "sub/tagged.safetensors"},  # its sigma comes from the file
        {"latent": "lat/two.latent", "sigma": 0.25},  # two pictures in one latent file: two_00.png, two_01.png
        "not json",
        {"latent": "lat/p1.latent", "sigma": "high"},
        {"latent": "lat/gone.latent"},
        {"latent": "lat/nan.latent"},
        {"latent": "lat/four.latent"},
        {"latent": "lat/p1.latent", "caption": "a fox", "out": "fox.png"},
    ])
    out_dir = root / "out"
    process = subprocess.Popen(batch_command(manifest, out_dir, checkpoint, "--steps", "2"), cwd=PACK_ROOT,
                               stderr=subprocess.PIPE, text=True)
    # a worker's record is written after it was handed its next picture: killed now, it dies in the middle of one
    first = wait_for(lambda: next((r for r in records(out_dir) if r["status"] == "done"), None), process,
                     "the first picture")
    os.kill(int(first["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    stderr = finish(process)
    return root, process.returncode, stderr, records(out_dir), first


def test_batch_outputs_equal_the_decode_command(killed_run, checkpoint, tmp_path):
    root, code, stderr, runs, _ = killed_run
    assert code == 1, stderr  # some lines failed
    outputs = {r["line"]: r["outputs"] for r in runs if r["status"] == "done"}
    assert sorted(outputs) == sorted(GOOD), runs
    assert outputs[SLOW + 2] == ["two_00.png", "two_01.png"]
    # a plain line, the pictures decoded again after the kill, the safetensors one, the two-picture one
    checked = {1, SLOW + 1, SLOW + 2} | {r["line"] for r in runs if r["attempts"] == 2}
    for number, (latent, out, *args) in ((n, GOOD[n]) for n in sorted(checked)):
        args = [str(root / a) if a.endswith(".safetensors") else a for a in args]
        single(checkpoint, root / "lat" / latent, tmp_path / Path(out).name, "--steps", "2", *args)
        for name in outputs[number]:
            ours, theirs = root / "out" / name, tmp_path / Path(name).name
            if name.endswith(".safetensors"):
                assert torch.equal(load_file(str(ours))["image"], load_file(str(theirs))["image"]), name
            else:
                assert ours.read_bytes() == theirs.read_bytes(), name


def test_bad_lines_fail_with_their_sentence_and_the_rest_are_done(killed_run):
    _, _, stderr, runs, _ = killed_run
    by_line = {r["line"]: r for r in runs}
    for number, message in BAD.items():
        assert by_line[number]["status"] == "failed" and message in by_line[number]["error"], by_line[number]
        assert by_line[number]["outputs"] == []
    assert f"{len(GOOD)} done, {len(BAD)} failed" in stderr


def test_a_killed_worker_is_replaced_and_its_picture_decoded_again(killed_run):
    _, _, _, runs, first = killed_run
    done = sorted(r["line"] for r in runs if r["status"] == "done")
    assert done == sorted(GOOD)  # every picture, each once
    retried = [r for r in runs if r["attempts"] == 2]
    assert retried, runs  # the picture the killed worker had
    assert all(r["status"] == "done" and r["worker"] != first["worker"] for r in retried)
    assert not list((killed_run[0] / "out").rglob("*.partial"))


def test_a_rerun_after_an_interruption_decodes_only_what_was_missing(checkpoint, tmp_path):
    count = 6
    latents(tmp_path / "lat", count, cells=8)
    manifest = write_manifest(tmp_path / "m.jsonl", [{"latent": f"lat/p{i}.latent", "seed": i} for i in range(count)])
    out_dir = tmp_path / "out"
    process = subprocess.Popen(batch_command(manifest, out_dir, checkpoint), cwd=PACK_ROOT, stderr=subprocess.PIPE,
                               text=True)
    wait_for(lambda: len(records(out_dir)) >= 2, process, "two pictures")
    process.send_signal(signal.SIGINT)  # Ctrl-C
    stderr = finish(process)
    assert process.returncode == 130 and "rerun the same command" in stderr, stderr
    first = {r["line"] for r in records(out_dir) if r["status"] == "done"}
    assert 2 <= len(first) < count

    result = run_batch(manifest, out_dir, checkpoint)
    assert result.returncode == 0, result.stderr
    runs = records(out_dir)
    second = [r for r in runs if r["run"] != runs[0]["run"]]
    assert sorted(r["line"] for r in second) == list(range(1, count + 1))
    redone = {r["line"] for r in second if r["status"] == "done"}
    assert not redone & first  # nothing decoded twice
    assert all(r["status"] == "skipped" for r in second if r["line"] in first)
    # pictures in flight at the interruption were either written whole (then skipped) or decoded now
    assert first | redone | {r["line"] for r in second if r["status"] == "skipped"} == set(range(1, count + 1))
    assert all((out_dir / f"p{i}.png").is_file() for i in range(count))
    assert not list(out_dir.rglob("*.partial"))
