"""A real ComfyUI server with this pack installed, shared by the tests that drive it over HTTP.

``comfy_server`` (session scope) starts ComfyUI 0.3.75 from ``.comfyui/ComfyUI`` with ``.venv``'s python, or
with ``PID_COMFYUI=0.33`` ComfyUI 0.33.0 from ``.comfyui-0.33/ComfyUI`` with ``.venv-comfyui-0.33``'s (each made
by ``scripts/setup_env.sh [--comfyui 0.33]``; ``scripts/test.sh`` runs it first), on a free loopback port, with a
fresh base directory under pytest's tmp. That directory's ``custom_nodes`` links the pack root as ``comfyui-pid``
and ``tests/comfy/test_pack`` (tiny random models, conditioning without a text encoder, stand-ins for the stock
loaders, random VAE files), and it has the model folders every test writes into. The server starts once per
session (5-10 s, only when a test asks for it) and serves both ``tests/comfy`` and ``tests/workflows``; it is
stopped at the end. Every test in those two folders is marked ``comfy``, so ``-m "not comfy"`` runs the rest of
the suite without a server. ``tests/workflows/build_workflows.py`` starts the same server with :func:`start_server`.

Tests get a :class:`ComfyClient`::

    def test_something(comfy_server):
        info = comfy_server.object_info("KSampler")
        entry = comfy_server.run({"1": {"class_type": ..., "inputs": {...}}, ...})
        image = comfy_server.image(entry["outputs"]["9"]["images"][0])
        vae_path = comfy_server.random_vae("ae.safetensors")  # a seeded random full-size Flux VAE

Only the standard library and Pillow are used, so the client runs in any environment that has the
test requirements.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from io import BytesIO
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
# The ComfyUI the server tests run against (scripts/setup_env.sh [--comfyui 0.33] makes each); PID_COMFYUI picks it.
COMFYUI_ENVIRONMENTS = {
    "0.3.75": (REPO_ROOT / ".comfyui" / "ComfyUI", REPO_ROOT / ".venv" / "bin" / "python"),
    "0.33.0": (REPO_ROOT / ".comfyui-0.33" / "ComfyUI", REPO_ROOT / ".venv-comfyui-0.33" / "bin" / "python"),
}
_CHOSEN = os.environ.get("PID_COMFYUI", "0.3.75")
COMFYUI_VERSION = {"0.33": "0.33.0"}.get(_CHOSEN, _CHOSEN)
if COMFYUI_VERSION not in COMFYUI_ENVIRONMENTS:
    raise pytest.UsageError(f"PID_COMFYUI={COMFYUI_VERSION!r}: choose one of {', '.join(COMFYUI_ENVIRONMENTS)}.")
COMFYUI_DIR, VENV_PYTHON = COMFYUI_ENVIRONMENTS[COMFYUI_VERSION]
TEST_PACK_DIR = TESTS_DIR / "comfy" / "test_pack"
SERVER_TEST_DIRS = (TESTS_DIR / "comfy", TESTS_DIR / "workflows")  # their tests are marked ``comfy``

PACK_LINK_NAME = "comfyui-pid"  # the pack's folder name inside custom_nodes
TEST_PACK_LINK_NAME = "pid-test-pack"
MODEL_FOLDERS = ("pid", "vae", "diffusion_models", "checkpoints", "text_encoders", "clip")

START_TIMEOUT = float(os.environ.get("PID_COMFY_START_TIMEOUT", "180"))
LOG_TAIL_LINES = 60
BINARY_TEXT_EVENT = 3  # ComfyUI's protocol.BinaryEventTypes.TEXT: text shown on a node (progress_text)


class PromptRejected(Exception):
    """POST /prompt answered with an error (HTTP 400: validation failed). ``body`` is its JSON."""

    def __init__(self, status: int, body: dict):
        self.status = status
        self.body = body
        error = body.get("error", {}) if isinstance(body, dict) else {}
        message = error.get("message", "") if isinstance(error, dict) else str(error)
        details = error.get("details", "") if isinstance(error, dict) else ""
        super().__init__(f"HTTP {status}: {message} {details}\nnode_errors: {json.dumps(body.get('node_errors', {}))}")


class PromptFailed(Exception):
    """A queued prompt finished without success. ``entry`` is its /history entry, ``error`` the
    ``execution_error`` event data (node_id, node_type, exception_type, exception_message, traceback)."""

    def __init__(self, entry: dict):
        self.entry = entry
        self.error = execution_error(entry)
        status = entry.get("status", {}).get("status_str")
        if self.error:
            e = self.error
            trace = "".join(e.get("traceback", [])[-3:])
            text = f"node {e.get('node_id')} ({e.get('node_type')}): {e.get('exception_type')}: {e.get('exception_message')}\n{trace}"
        else:
            text = json.dumps(entry.get("status", {}))[:2000]
        super().__init__(f"prompt ended with status {status!r}: {text}")


def execution_error(entry: dict) -> dict | None:
    """The ``execution_error`` event of a /history entry, or None."""
    for name, data in entry.get("status", {}).get("messages", []):
        if name == "execution_error":
            return data
    return None


class ComfyClient:
    """Talks to the test server over HTTP (urllib only).

    Attributes: ``url``; ``base_dir`` and its ``models_dir``, ``input_dir``, ``output_dir``; ``log_path``;
    ``pack_dir_name`` / ``test_pack_dir_name``, the packs' folder names in custom_nodes (their nodes'
    ``python_module`` in /object_info is ``custom_nodes.<name>``).
    Model lists (e.g. VAELoader's) are read from disk on every /object_info and prompt validation,
    so files dropped into ``models_dir / "<folder>"`` are picked up without a restart.
    """

    # Reachable from tests without importing this conftest (not importable by name under
    # pytest's importlib import mode): ``pytest.raises(comfy_server.PromptRejected)``.
    PromptRejected = PromptRejected
    PromptFailed = PromptFailed
    pack_dir_name = PACK_LINK_NAME
    test_pack_dir_name = TEST_PACK_LINK_NAME
    comfyui_version = COMFYUI_VERSION
    comfyui_dir = COMFYUI_DIR

    def __init__(self, url: str, base_dir: Path, log_path: Path, process: subprocess.Popen):
        self.url = url
        self.base_dir = base_dir
        self.models_dir = base_dir / "models"
        self.input_dir = base_dir / "input"
        self.output_dir = base_dir / "output"
        self.log_path = log_path
        self.process = process
        self.client_id = uuid.uuid4().hex
        self.startup_seconds = 0.0

    # --- raw HTTP ---------------------------------------------------------------------------
    def request(self, method: str, path: str, body=None, timeout: float = 60) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def get_json(self, path: str):
        status, raw = self.request("GET", path)
        if status != 200:
            raise AssertionError(f"GET {path} -> HTTP {status}: {raw[:500]!r}")
        return json.loads(raw)

    def post_json(self, path: str, body=None) -> tuple[int, object]:
        status, raw = self.request("POST", path, body if body is not None else {})
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    # --- server state -----------------------------------------------------------------------
    def log(self) -> str:
        """Everything the server printed so far (stdout and stderr). Slice with an earlier
        ``len(log())`` to see only what one test caused."""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process.poll() is None

    def object_info(self, node: str | None = None) -> dict:
        """All node definitions, or the definition of ``node`` (KeyError if the server has no such node)."""
        if node is None:
            return self.get_json("/object_info")
        info = self.get_json(f"/object_info/{urllib.parse.quote(node)}")
        if node not in info:
            raise KeyError(f"the server has no node {node!r}")
        return info[node]

    # --- prompts ------------------------------------------------------------------------------
    def queue(self, prompt: dict, extra_data: dict | None = None) -> str:
        """POST /prompt (API format) and return its prompt_id; :class:`PromptRejected` if refused."""
        body = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        status, answer = self.post_json("/prompt", body)
        if status != 200:
            raise PromptRejected(status, answer if isinstance(answer, dict) else {"error": answer})
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120) -> dict:
        """Poll /history until the prompt is done (success, error or interrupted); return its entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry
            if not self.alive():
                pytest.fail(f"ComfyUI exited (code {self.process.returncode}) while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s; server log tail:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 120, check: bool = True) -> dict:
        """Queue ``prompt`` and wait for it. With ``check`` (default) a prompt that did not succeed
        raises :class:`PromptFailed` carrying the node's error; otherwise its entry is returned as is."""
        entry = self.wait(self.queue(prompt), timeout)
        if check and entry["status"].get("status_str") != "success":
            raise PromptFailed(entry)
        return entry

    def run_showing_texts(self, prompt: dict, timeout: float = 120) -> tuple[dict, dict[str, str]]:
        """Run ``prompt`` (unchecked) while listening on the websocket as the frontend does; return its entry and the
        text each node showed in the UI (ComfyUI's progress_text event: node id -> its last text)."""
        import asyncio

        import aiohttp

        texts: dict[str, str] = {}
        listening, done = threading.Event(), threading.Event()

        async def listen() -> None:
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"{self.url.replace('http', 'ws', 1)}/ws?clientId={self.client_id}") as ws:
                    listening.set()
                    while not done.is_set():
                        try:
                            message = await ws.receive(timeout=0.1)
                        except asyncio.TimeoutError:
                            continue
                        if message.type != aiohttp.WSMsgType.BINARY:
                            if message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                                return
                            continue
                        data = message.data
                        if struct.unpack(">I", data[:4])[0] == BINARY_TEXT_EVENT:
                            (length,) = struct.unpack(">I", data[4:8])
                            texts[data[8 : 8 + length].decode()] = data[8 + length :].decode()

        listener = threading.Thread(target=lambda: asyncio.run(listen()), daemon=True)
        listener.start()
        assert listening.wait(10), "could not open the websocket"
        try:
            entry = self.run(prompt, timeout, check=False)
            time.sleep(0.3)  # messages sent just before the prompt ended
        finally:
            done.set()
            listener.join(10)
        return entry, texts

    def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt: stop the running prompt (only if it is ``prompt_id``, when given).

        Without a prompt_id the flag is global: it stops whatever runs now; if nothing runs, it is
        cleared when the next prompt starts."""
        status, answer = self.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        assert status == 200, (status, answer)

    def queue_state(self) -> dict:
        """GET /queue: {"queue_running": [...], "queue_pending": [...]}."""
        return self.get_json("/queue")

    def random_vae(self, filename: str, kind: str = "flux_kl", latent_channels: int = 16, seed: int = 0) -> Path:
        """``models/vae/<filename>``: a seeded random VAE written by the test pack's PiDTestRandomVAE (``flux_kl``:
        the full-size Flux VAE in the layout of ``ae.safetensors``; ``taesd``: a TAESD of ``latent_channels``).
        The server makes each (kind, channels, seed) once and links it to every name, so asking again is cheap."""
        path = self.models_dir / "vae" / filename
        node = {"class_type": "PiDTestRandomVAE",
                "inputs": {"kind": kind, "filename": filename, "latent_channels": latent_channels, "seed": seed}}
        self.run({"1": node}, timeout=600)
        assert path.is_file(), f"PiDTestRandomVAE did not write {path}"
        return path

    def free(self, unload_models: bool = True) -> None:
        """POST /free: unload models and drop the node output cache (between tests that measure memory)."""
        self.post_json("/free", {"unload_models": unload_models, "free_memory": True})

    # --- outputs ------------------------------------------------------------------------------
    def output_path(self, ref: dict) -> Path:
        """Where a file reference of a history entry ({"filename", "subfolder", "type"}) lies on disk."""
        root = {"output": self.output_dir, "input": self.input_dir, "temp": self.base_dir / "temp"}[ref.get("type", "output")]
        return root / ref.get("subfolder", "") / ref["filename"]

    def view(self, ref: dict) -> bytes:
        """GET /view for a file reference, as bytes."""
        query = urllib.parse.urlencode({k: ref.get(k, "") for k in ("filename", "subfolder", "type")})
        status, raw = self.request("GET", f"/view?{query}")
        if status != 200:
            raise AssertionError(f"GET /view?{query} -> HTTP {status}")
        return raw

    def image(self, ref: dict):
        """An output image (a reference from ``entry["outputs"][node]["images"]``) as a PIL image."""
        from PIL import Image

        image = Image.open(BytesIO(self.view(ref)))
        image.load()
        return image


# --- server lifetime ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_base_dir(base: Path) -> None:
    """custom_nodes with the pack and the test pack linked in, empty model folders, user settings."""
    custom_nodes = base / "custom_nodes"
    custom_nodes.mkdir(parents=True)
    (custom_nodes / PACK_LINK_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
    (custom_nodes / TEST_PACK_LINK_NAME).symlink_to(TEST_PACK_DIR, target_is_directory=True)
    for folder in MODEL_FOLDERS:
        (base / "models" / folder).mkdir(parents=True)
    for folder in ("input", "output", "temp", "user/default"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    # Without it the frontend opens the templates dialog over the canvas (only matters for browser tests).
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))


def prepare_child() -> None:
    """Runs in the server process before exec (Linux): restore SIGINT, which a shell that started pytest
    in the background leaves ignored, and have the server SIGTERMed if pytest dies, even by SIGKILL."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)  # ComfyUI's own clean shutdown path (KeyboardInterrupt)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


def start_server(base: Path) -> ComfyClient:
    missing = [str(p.relative_to(REPO_ROOT)) for p in (COMFYUI_DIR / "main.py", VENV_PYTHON) if not p.exists()]
    if missing:
        pytest.fail(
            f"The local ComfyUI test environment is missing ({', '.join(missing)}). "
            "Run the tests with `bash scripts/test.sh` (it installs the environments first), or run "
            f"`bash scripts/setup_env.sh --comfyui {COMFYUI_VERSION}` once.",
            pytrace=False,
        )
    make_base_dir(base)
    port = free_port()
    log_path = base / "comfyui.log"
    command = [
        str(VENV_PYTHON), "-u", "main.py", "--cpu",
        "--listen", "127.0.0.1", "--port", str(port),
        "--base-directory", str(base),
        "--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}",
        "--disable-auto-launch", "--disable-api-nodes", "--preview-method", "none",
    ]  # fmt: skip
    # PiD's caption cache inside the server's folder: what a test server finds there is what its tests put there
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", PID_CACHE_DIR=str(base / "pid-cache"))
    env.pop("PYTHONPATH", None)  # the server must not see pytest's import paths
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # cached bytecode makes the next start ~2 s faster
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, cwd=COMFYUI_DIR, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, preexec_fn=prepare_child if sys.platform == "linux" else None)
    client = ComfyClient(f"http://127.0.0.1:{port}", base, log_path, process)

    started = time.monotonic()
    while True:
        if not client.alive():
            pytest.fail(f"ComfyUI exited with code {process.returncode} during start-up. Log tail ({log_path}):\n"
                        f"{client.log_tail()}", pytrace=False)
        if time.monotonic() - started > START_TIMEOUT:
            stop(process)
            pytest.fail(f"ComfyUI did not answer /system_stats within {START_TIMEOUT:.0f} s "
                        f"(PID_COMFY_START_TIMEOUT). Log tail ({log_path}):\n{client.log_tail()}", pytrace=False)
        try:
            status, _ = client.request("GET", "/system_stats", timeout=2)
            if status == 200:
                break
        except (urllib.error.URLError, ConnectionError, socket.timeout):
            pass
        time.sleep(0.2)
    client.startup_seconds = time.monotonic() - started
    return client


def pytest_configure(config):
    config.addinivalue_line("markers", "comfy: runs against a real ComfyUI server (tests/comfy, tests/workflows)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parents = Path(item.path).resolve().parents
        if any(folder in parents for folder in SERVER_TEST_DIRS):
            item.add_marker(pytest.mark.comfy)


@pytest.fixture(scope="session")
def comfyui_install() -> tuple[str, Path, Path]:
    """This leg's ComfyUI: its version, its folder and the python that runs it (for tests that start it their own way)."""
    return COMFYUI_VERSION, COMFYUI_DIR, VENV_PYTHON


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory) -> ComfyClient:
    """A running ComfyUI with the pack and the test pack loaded, one for the session; see :class:`ComfyClient`."""
    base = tmp_path_factory.mktemp("comfyui-base")
    client = start_server(base)
    try:
        yield client
    finally:
        stop(client.process)
