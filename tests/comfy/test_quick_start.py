"""The README's first quick-start command, ``bash scripts/run_comfyui.sh``, run as a user runs it: it serves a
ComfyUI on 127.0.0.1 with the pack's nodes, its workflows in the workflow browser and the template list, and the
model folders made and named; with ``COMFYUI_DIR`` it does the same for a ComfyUI the user already has."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_LINK_NAME = "comfyui-pid"  # the folder name the script links the pack under
SCRIPT = REPO_ROOT / "scripts" / "run_comfyui.sh"
WORKFLOWS = sorted(p.name for p in (REPO_ROOT / "workflows").glob("*.json"))
MODEL_FOLDERS = ("pid", "pid/rae", "vae", "diffusion_models", "checkpoints", "text_encoders")
PACK_NODES = 7
SCRIPT_SETTINGS = ("PORT", "LISTEN", "COMFYUI_DIR", "COMFYUI_PYTHON", "COMFYUI_BASE")
START_TIMEOUT = 180  # s: the setup check, then ComfyUI's start on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _without_script_settings(environ) -> dict[str, str]:
    """The environment minus the script's own settings, which a developer may have exported for their ComfyUI."""
    return {k: v for k, v in environ.items() if k not in SCRIPT_SETTINGS}


class QuickStart:
    """``run_comfyui.sh`` running in its own process group, its output collected in a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = int(env["PORT"])
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                ["bash", str(SCRIPT)], env={**_without_script_settings(os.environ), **env}, stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def get_json(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as response:
            return json.load(response)

    def wait_until_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"run_comfyui.sh exited with {self.process.returncode}:\n{self.output()}")
            try:
                self.get_json("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        pytest.fail(f"run_comfyui.sh did not serve within {START_TIMEOUT} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """Ctrl-C, as the script's banner says; the exit status."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def check_serves_the_pack(run: QuickStart, base: Path) -> None:
    """What a user sees once the script says it is serving: the pack's nodes, its workflows, the model folders."""
    run.wait_until_serving()
    info = run.get_json("/object_info")
    pack_nodes = [name for name, node in info.items() if node["python_module"] == f"custom_nodes.{PACK_LINK_NAME}"]
    assert len(pack_nodes) == PACK_NODES, pack_nodes
    assert sorted(f"{name}.json" for name in run.get_json("/workflow_templates")[PACK_LINK_NAME]) == WORKFLOWS
    assert sorted(run.get_json("/userdata?dir=workflows")) == WORKFLOWS  # the workflow browser's folder
    output = run.output()
    for folder in MODEL_FOLDERS:
        assert (base / "models" / folder).is_dir(), folder
        assert f"    {folder}/ " in output, (folder, output)  # named, with what goes in it
    assert f"starting ComfyUI on http://127.0.0.1:{run.port}" in output, output
    assert "running on the CPU" in output  # these machines have no GPU: --cpu added


def test_quick_start_serves_comfyui_with_the_pack_and_its_workflows(tmp_path, comfyui_install):
    if comfyui_install[0] != "0.3.75":
        pytest.skip("the quick start sets up ComfyUI 0.3.75: the 0.3.75 leg runs it")
    base = tmp_path / "base"
    run = QuickStart({"PORT": str(free_port()), "COMFYUI_BASE": str(base)}, tmp_path / "run.log")
    try:
        check_serves_the_pack(run, base)
        assert (base / "custom_nodes" / PACK_LINK_NAME).resolve() == REPO_ROOT
    finally:
        status = run.stop()
    assert status in (0, 130, -signal.SIGINT), (status, run.output())


def _source_only(comfyui_dir: Path):
    """copytree's filter: a ComfyUI folder without its caches and without the user's data at its top."""
    user_data = {"models", "user", "input", "output", "temp", "custom_nodes"}

    def ignored(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n == "__pycache__" or (Path(folder) == comfyui_dir and n in user_data)}

    return ignored


def test_quick_start_with_the_users_own_comfyui(tmp_path, comfyui_install):
    """COMFYUI_DIR: a ComfyUI folder of the user's (a copy of this leg's) gets the pack linked into custom_nodes and
    the workflows into its workflow browser, and serves them; a second run changes nothing the user edited."""
    _, comfyui_dir, python = comfyui_install
    comfy = tmp_path / "ComfyUI"
    shutil.copytree(comfyui_dir, comfy, symlinks=True, ignore=_source_only(comfyui_dir))
    env = {"PORT": str(free_port()), "COMFYUI_DIR": str(comfy), "COMFYUI_PYTHON": str(python)}
    run = QuickStart(env, tmp_path / "run.log")
    try:
        check_serves_the_pack(run, comfy)
        assert (comfy / "custom_nodes" / PACK_LINK_NAME).resolve() == REPO_ROOT
    finally:
        run.stop()
    edited = comfy / "user" / "default" / "workflows" / WORKFLOWS[0]
    edited.write_text('{"edited": "by the user"}')
    run = QuickStart({**env, "PORT": str(free_port())}, tmp_path / "run2.log")
    try:
        run.wait_until_serving()
        assert "workflows: 0 updated" in run.output(), run.output()
    finally:
        run.stop()
    assert edited.read_text() == '{"edited": "by the user"}'
