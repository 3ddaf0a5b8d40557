"""What only current ComfyUI (0.33) has: core's own PiD support beside the pack. These run in the ComfyUI 0.33
leg of ``scripts/test.sh`` (``PID_COMFYUI=0.33``); on 0.3.75 there is nothing to check."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.skipif(
    os.environ.get("PID_COMFYUI", "0.3.75") not in ("0.33", "0.33.0"),
    reason="ComfyUI 0.33 only (the 0.33 leg of scripts/test.sh)",
)


def test_core_pid_and_the_pack_live_side_by_side(comfy_server):
    """Core's PiD node stays core's, none of the pack's ids, types or model folders is core's."""
    info = comfy_server.object_info()
    ours = {name for name, node in info.items() if node["python_module"] == f"custom_nodes.{comfy_server.pack_dir_name}"}
    core = {name for name, node in info.items() if not node["python_module"].startswith("custom_nodes.")}
    assert "PiDConditioning" in core and len(ours) == 7
    assert all(name.startswith("PixelDecoderPiD_") for name in ours)
    core_types = {t for name in core for t in info[name]["output"]}
    core_types |= {spec[0] for name in core for section in ("required", "optional")
                   for spec in info[name]["input"].get(section, {}).values() if isinstance(spec[0], str)}  # fmt: skip
    our_types = {t for name in ours for t in info[name]["output"]}
    assert our_types - core_types == {"PID_DECODER"}  # the one type of our own; the others are ComfyUI's
    core_folders = (comfy_server.comfyui_dir / "folder_paths.py").read_text()
    assert '"pid"' not in core_folders and "'pid'" not in core_folders  # core registers no "pid" model folder
    assert "pid" in comfy_server.get_json("/models")  # the pack's


@pytest.fixture(scope="module")
def pixeldit_files(comfy_server) -> tuple[Path, str]:
    """A tiny Gemma-2 in models/text_encoders (for a pixeldit CLIP) and a tiny Flux PiD file in models/pid."""
    from pid_graphs import save_official
    from tiny import tiny_network
    from tiny_gemma import random_weights, write_comfy

    from tests.comfy.test_caption import CONFIG

    path = comfy_server.models_dir / "text_encoders" / "pidtest-current-gemma-2-tiny-it.safetensors"
    write_comfy(path, random_weights(CONFIG, seed=3))
    pid_name = "pidtest-current/PiD_res2k_sr4x_official_flux_distill_4step/model_ema_bf16.pth"
    save_official(tiny_network("flux_2k", seed=0), comfy_server.models_dir / "pid" / pid_name)
    return path, pid_name


def test_a_pixeldit_clip_feeds_pid_caption_and_core_clip_text_encode(comfy_server, pixeldit_files):
    """Core's ``pixeldit`` CLIP type loads Gemma-2 for PiD. PiD Caption takes such a CLIP (its weights, in PiD's
    layout, bf16 as the reference) and gives pid_core's encoding exactly; core's CLIPTextEncode on it gives a
    [1, 300, D] conditioning, which PiD Decode takes as it is. Core's numbers differ from the reference's in two
    ways, both traced: it computes on the CPU in fp32 (the reference: bf16), and its Gemma RMSNorm adds 1 to the
    norm weights in their stored dtype, so ``1 + w`` is rounded to bf16 (the reference adds in fp32). pid_core in
    fp32 with norm weights rounded that way gives core's numbers. For the empty caption core leaves out PiD's
    system prompt (BOS plus padding), far from the empty caption PiD was trained with. Hence the README's advice:
    PiD Caption."""
    from tests.comfy.test_caption import CAPTION, LATENT_SIDE, Graph, caption, decode, expected, out, record, save

    from pid_core.api import PiDDecoder

    path, pid_name = pixeldit_files
    g = Graph()
    clip = g.node("PiDTestGemmaCLIP", clip_name=path.name, clip_type="pixeldit")
    for text, name in ((CAPTION, "caption"), ("", "empty")):
        save(g, caption(g, text, clip=clip), f"pixeldit-ours-{name}")
        save(g, g.node("CLIPTextEncode", text=text, clip=out(clip)), f"pixeldit-core-{name}")
    core_caption = g.node("CLIPTextEncode", text=CAPTION, clip=out(clip))
    g.node("PiDTestSave", name="pixeldit-core-decoded", image=out(decode(g, core_caption, pid_name=pid_name)))
    comfy_server.run(g)

    reference, empty = expected(path, CAPTION, "")
    ours, core = record(comfy_server, "pixeldit-ours-caption")[0], record(comfy_server, "pixeldit-core-caption")[0]
    assert torch.equal(ours, reference)
    # PiD Decode takes core's conditioning as it is (PiD's layout, though not made by PiD Caption)
    decoder = PiDDecoder.load(comfy_server.models_dir / "pid" / pid_name)
    latent = torch.zeros(1, 16, LATENT_SIDE // 8, LATENT_SIDE // 8)
    expected_image = (decoder.decode(latent, caption=core, steps=1, seed=0) + 1) * 0.5
    assert torch.equal(record(comfy_server, "pixeldit-core-decoded")[0], expected_image.permute(0, 2, 3, 1))
    assert core.shape == ours.shape
    gap = relative_gap(core, ours)
    assert 1e-3 < gap < 0.1, gap  # close, not equal (see above)
    assert relative_gap(core, core_like_encoding(path, CAPTION)) < 1e-4  # the whole difference, traced
    assert torch.equal(record(comfy_server, "pixeldit-ours-empty")[0], empty)
    core_empty = record(comfy_server, "pixeldit-core-empty")[0]
    empty_gap = relative_gap(core_empty, empty)
    assert core_empty.shape == empty.shape and empty_gap > 3 * gap, (empty_gap, gap)  # another text altogether


def test_core_encoding_of_an_empty_text_is_decoded_with_a_warning_on_the_node(comfy_server, pixeldit_files):
    """Core's pixeldit encoding of "" (no system prompt) is not PiD's empty caption: PiD Decode says so on the node
    and decodes it as it is; core's encoding of a caption decodes with no such warning."""
    from tests.comfy.test_caption import CAPTION, Graph, decode, out

    path, pid_name = pixeldit_files
    shown = {}
    for text in ("", CAPTION):
        g = Graph()
        clip = g.node("PiDTestGemmaCLIP", clip_name=path.name, clip_type="pixeldit")
        node = decode(g, g.node("CLIPTextEncode", text=text, clip=out(clip)), pid_name=pid_name)
        g.node("PiDTestSave", name="pixeldit-core-warned", image=out(node))
        entry, texts = comfy_server.run_showing_texts(g)
        assert entry["status"]["status_str"] == "success", entry["status"]
        shown[text] = texts.get(node, "")
    assert "empty text encoded without PiD's system prompt" in shown[""], shown
    assert "system prompt" not in shown[CAPTION], shown


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def core_like_encoding(path: Path, text: str) -> torch.Tensor:
    """pid_core's fp32 encoding of ``text`` with each Gemma RMSNorm scale ``1 + w`` rounded to bf16, as core's
    RMSNorm (``comfy.text_encoders.llama``) computes it on bf16 weights."""
    from pid_core.captions import CaptionEncoder
    from pid_core.gemma import GemmaRMSNorm

    encoder = CaptionEncoder.load(path, dtype=torch.float32)
    for norm in (m for m in encoder.model.modules() if isinstance(m, GemmaRMSNorm)):
        scale = (1 + norm.weight.float()).bfloat16().float()
        norm.weight = torch.nn.Parameter(scale - 1)
    return encoder.encode(text)


# --- one PiD file in models/diffusion_models, for core and for the pack ------------------------------------------

KEYS = Path(__file__).resolve().parents[1] / "data" / "checkpoint_keys" / "flux2_2kto4k_v1pt5.tsv"
# "pid" in the name: the pack lists the files of diffusion_models whose name says PiD (as Comfy-Org's repacks do)
FULL_SIZE_PID = "pidtest-random-pid_v1pt5_flux2_2kto4k_bf16.safetensors"
FLUX2_LATENT_PX = 16  # one Flux.2 latent cell; PiD draws it at 4x: 64 px
CAPTION_WIDTH = 2304  # Gemma-2-2B's hidden size, the caption width of every released checkpoint


@pytest.fixture(scope="module")
def full_size_pid_file(comfy_server) -> Iterator[dict]:
    """A random full-size v1.5 Flux.2 PiD checkpoint in the official key layout (bf16, 2.8 GB, about 20 s to write) in
    models/diffusion_models, once per session (this module runs once) and removed after it: core builds its PiD
    network with the released widths and depth (14 patch blocks) whatever the file holds, so no tiny network can
    stand in. Yields its path and each weight's sum of squares."""
    from tiny import random_official_weights

    path = comfy_server.models_dir / "diffusion_models" / FULL_SIZE_PID
    weights = random_official_weights(KEYS, seed=0)
    save_file(weights, str(path))
    facts = {"path": path, "square_sums": {key: square_sum(w).item() for key, w in weights.items()}}
    del weights
    yield facts
    path.unlink()


def square_sum(tensor: torch.Tensor) -> torch.Tensor:
    """As the test pack's PiDTestModelInfo computes it: one float64 dot."""
    flat = tensor.reshape(-1).double()
    return torch.dot(flat, flat)


def file_key(core_key: str) -> str:
    """The official key of a parameter of core's PidNet: core splits each pixel block's modulation
    (``adaLN_modulation.0``) into its attention and MLP halves (``adaLN_modulation_msa`` / ``_mlp``)."""
    for half in ("adaLN_modulation_msa.", "adaLN_modulation_mlp."):
        core_key = core_key.replace(half, "adaLN_modulation.0.")
    return core_key


def combo_options(info: dict, name: str) -> list[str]:
    spec = info["input"]["required"][name]
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


def test_core_and_the_pack_list_and_load_the_same_pid_file(comfy_server, full_size_pid_file):
    """Core's UNETLoader and Load PiD Decoder both offer a PiD file of models/diffusion_models, and both load it:
    core builds its own PiD model from it (model_base.PiD around PidNet, the Flux.2 v1.5 variant read from the keys,
    every weight the file's: the same sum of squares, tensor by tensor) and samples a picture with it; the pack's
    decoder decodes a Flux.2 latent with it."""
    from pid_graphs import Graph, out, record

    name = full_size_pid_file["path"].name
    assert name in combo_options(comfy_server.object_info("UNETLoader"), "unet_name")
    assert name in combo_options(comfy_server.object_info("PixelDecoderPiD_LoadDecoder"), "pid_name")

    g = Graph()
    caption = g.node("PiDTestCaptionConditioning", batch=1, tokens=300, width=CAPTION_WIDTH, seed=1)
    latent = g.node("EmptyFlux2LatentImage", width=FLUX2_LATENT_PX, height=FLUX2_LATENT_PX, batch_size=1)
    # core: UNETLoader -> its PiD sampling (PiDConditioning on the Flux.2 latent, one step), as its template does
    core = g.node("UNETLoader", unet_name=name, weight_dtype="default")
    g.node("PiDTestModelInfo", model=out(core), name="core-pid-model")
    positive = g.node("PiDConditioning", positive=out(caption), latent=out(latent), latent_format="flux",
                      degrade_sigma=0.0)  # fmt: skip
    negative = g.node("ConditioningZeroOut", conditioning=out(caption))
    pixels = g.node("EmptyChromaRadianceLatentImage", width=4 * FLUX2_LATENT_PX, height=4 * FLUX2_LATENT_PX,
                    batch_size=1)  # fmt: skip
    sigmas = g.node("BasicScheduler", model=out(core), scheduler="simple", steps=1, denoise=1.0)
    sampler = g.node("KSamplerSelect", sampler_name="euler")
    sampled = g.node("SamplerCustom", model=out(core), add_noise=True, noise_seed=0, cfg=1.0, positive=out(positive),
                     negative=out(negative), sampler=out(sampler), sigmas=out(sigmas), latent_image=out(pixels))
    g.node("PiDTestSave", name="core-pid-sampled", latent=out(sampled))
    # the pack: Load PiD Decoder -> PiD Decode of the same latent
    loader = g.node("PixelDecoderPiD_LoadDecoder", pid_name=name, latent_space="auto", weight_dtype="bf16",
                    vae_name="none")  # fmt: skip
    image = g.node("PixelDecoderPiD_Decode", pid_decoder=out(loader), latent=out(latent), size="native 4x", steps=1,
                   seed=0, sigma=0.0, latent_space="auto", caption=out(caption))  # fmt: skip
    g.node("PiDTestSave", name="pack-pid-decoded", image=out(image))
    try:
        comfy_server.run(g, timeout=600)
    finally:
        comfy_server.free()  # core's copy (fp32 on the CPU, 5.3 GB) and the pack's (bf16): not for the tests after

    sums, info = record(comfy_server, "core-pid-model")
    assert info["model_class"] == "comfy.model_base.PiD" and info["network_class"] == "comfy.ldm.pixeldit.pid.PidNet"
    v1_5_flux2 = {"image_model": "pid", "lq_latent_channels": 128, "latent_spatial_down_factor": 16,
                  "lq_latent_unpatchify_factor": 2, "pit_lq_inject": True, "lq_hidden_dim": 1024, "lq_interval": 2}
    assert {k: info["unet_config"].get(k) for k in v1_5_flux2} == v1_5_flux2
    core_sums: dict[str, float] = {}
    for key, value in sums.items():
        official = file_key(key.removeprefix("square_sum."))
        core_sums[official] = core_sums.get(official, 0.0) + value.item()
    expected = full_size_pid_file["square_sums"]
    assert sorted(core_sums) == sorted(expected), set(core_sums) ^ set(expected)
    unequal = [k for k in expected if core_sums[k] != pytest.approx(expected[k], rel=1e-9)]
    assert not unequal, f"weights of core's model that are not the file's: {unequal[:10]}"
    core_pixels = record(comfy_server, "core-pid-sampled")[0]["latent"]
    ours = record(comfy_server, "pack-pid-decoded")[0]["image"]
    side = 4 * FLUX2_LATENT_PX
    assert core_pixels.shape == (1, 3, side, side) and ours.shape == (1, side, side, 3)
    for picture in (core_pixels, ours):
        assert picture.isfinite().all() and picture.std() > 1e-3

