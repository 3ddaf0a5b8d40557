"""Hub downloads against a local fake hub (no network): where files land, and one clear sentence when the hub
is gated, unreachable or offline."""

from __future__ import annotations

from pathlib import Path

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError  # noqa: E402

from pid_core.__main__ import main  # noqa: E402
from pid_core.checkpoint import space_from_path, training_from_path  # noqa: E402
from pid_core.config import LatentSpace  # noqa: E402
from pid_core.download import download_gemma, download_pid, released_checkpoint  # noqa: E402

FLUX_2K = "PiD_res2k_sr4x_official_flux_distill_4step"


class FakeHub:
    """Stands in for ``hf_hub_download``: writes the requested file under ``local_dir`` as the hub client does,
    or raises what it was told to."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[dict] = []
        self.error = error

    def __call__(self, repo_id: str, filename: str, local_dir, **kwargs) -> str:
        self.calls.append(dict(repo_id=repo_id, filename=filename, local_dir=Path(local_dir), **kwargs))
        if self.error is not None:
            raise self.error
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(f"{repo_id}/{filename}".encode())
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True, exist_ok=True)  # the client's bookkeeping
        return str(target)


@pytest.fixture
def hub(monkeypatch) -> FakeHub:
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    return fake


def test_pid_lands_in_its_experiment_folder(tmp_path, hub):
    path = download_pid("flux", "2k", tmp_path)
    assert path == tmp_path / "pid" / FLUX_2K / "model_ema_bf16.pth"
    assert path.read_bytes() == f"nvidia/PiD/checkpoints/{FLUX_2K}/model_ema_bf16.pth".encode()
    assert hub.calls[0]["repo_id"] == "nvidia/PiD"
    assert hub.calls[0]["filename"] == f"checkpoints/{FLUX_2K}/model_ema_bf16.pth"
    assert sorted(p.name for p in path.parent.iterdir()) == ["model_ema_bf16.pth"]  # staging removed
    # the folder name is what tells a 16-channel checkpoint's family and training
    assert space_from_path(path, (LatentSpace.FLUX, LatentSpace.SD3)) == LatentSpace.FLUX
    assert training_from_path(path) == "2k"


def test_gemma_lands_in_text_encoders(tmp_path, hub):
    path = download_gemma(tmp_path)
    assert path == tmp_path / "text_encoders" / "gemma_2_2b_it_elm_bf16.safetensors"
    assert hub.calls[0]["repo_id"] == "Comfy-Org/PixelDiT"
    assert hub.calls[0]["filename"] == "text_encoders/gemma_2_2b_it_elm_bf16.safetensors"
    fp8 = download_gemma(tmp_path, "fp8_scaled")
    assert fp8.name == "gemma_2_2b_it_elm_fp8_scaled.safetensors" and fp8.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([fp8.name, path.name])


def test_present_files_are_not_downloaded_again(tmp_path, hub):
    first = download_pid("sdxl", None, tmp_path)  # SDXL has one release: the training may be left out
    assert download_pid("sdxl", "2kto4k", tmp_path) == first
    assert len(hub.calls) == 1


def test_release_choice():
    assert released_checkpoint("flux", "2kto4k").experiment == "PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step"
    assert released_checkpoint("qwenimage").training == "2kto4k"  # the legacy v1 file is not offered
    with pytest.raises(ValueError, match=r"choose the training resolution \(2k or 2kto4k\)"):
        released_checkpoint("flux")
    with pytest.raises(ValueError, match="not 2k"):
        released_checkpoint("sdxl", "2k")


def one_sentence(message: str) -> bool:
    return message.endswith(".") and ". " not in message.replace("e.g. ", "")


@pytest.mark.parametrize("error, reason", [
    (GatedRepoError("403 gated"), "gated"),
    (RepositoryNotFoundError("401 not found"), "needs a login"),
    (OSError("No space left on device"), "No space left on device"),
])
def test_hub_failures_give_one_sentence(tmp_path, monkeypatch, error, reason):
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", FakeHub(error))
    with pytest.raises(ValueError) as caught:
        download_pid("flux", "2k", tmp_path)
    message = str(caught.value)
    destination = tmp_path / "pid" / FLUX_2K / "model_ema_bf16.pth"
    assert f"checkpoints/{FLUX_2K}/model_ema_bf16.pth" in message  # the file
    assert "https://huggingface.co/nvidia/PiD" in message and "licence" in message  # its licence page
    assert str(destination) in message  # where to put it by hand
    assert reason in message and one_sentence(message), message
    assert not destination.exists()


def test_offline_with_the_real_client(tmp_path, monkeypatch):
    """huggingface_hub itself, in offline mode (nothing leaves the machine): a clear error when the file is
    not there, and a prepared local copy in the staging folder is taken as it is."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with pytest.raises(ValueError) as caught:
        download_gemma(tmp_path / "models")
    message = str(caught.value)
    assert "could not be reached" in message and "gemma_2_2b_it_elm_bf16.safetensors" in message
    assert "https://huggingface.co/Comfy-Org/PixelDiT" in message and "ai.google.dev/gemma/terms" in message
    assert one_sentence(message), message

    staged = tmp_path / "models" / "text_encoders" / ".pid_download" / "text_encoders" / "gemma_2_2b_it_elm_bf16.safetensors"
    staged.parent.mkdir(parents=True, exist_ok=True)
    staged.write_bytes(b"prepared")
    path = download_gemma(tmp_path / "models")
    assert path.read_bytes() == b"prepared" and not staged.parent.exists()


def test_cli_download(tmp_path, hub, capsys):
    assert main(["download", "--space", "flux", "--training", "2k", "--gemma", "--models-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "pid" / FLUX_2K / "model_ema_bf16.pth"),
                       str(tmp_path / "text_encoders" / "gemma_2_2b_it_elm_bf16.safetensors")]
    assert main(["download", "--models-dir", str(tmp_path)]) == 2
    assert "Nothing to download" in capsys.readouterr().err
    assert main(["download", "--space", "flux", "--models-dir", str(tmp_path)]) == 2
    assert "choose the training resolution" in capsys.readouterr().err
