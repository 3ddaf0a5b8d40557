"""PiD Caption in a real ComfyUI server: a Gemma-2 CLIP built from ComfyUI's own classes, a Gemma-2 file, and the
conditioning PiD Decode takes.

One tiny Gemma-2 (hidden size 32, the tiny PiD networks' ``txt_embed_dim``; 3 layers, as ComfyUI's lumina2 CLIP
reads the penultimate one; seeded random weights; the SentencePiece tokenizer of ``tests/core/tiny_gemma.py``) is
written in the Comfy-Org layout to models/text_encoders. The server turns it into a CLIP the way Load CLIP does
(test pack node ``PiDTestGemmaCLIP``) and PiD Caption encodes through that CLIP and through ``gemma_name``; the
expected embedding is computed here with ``pid_core`` (whose layout is tested against transformers in
tests/core). ``PiDTestSaveConditioning`` writes the CONDITIONING tensors for comparison.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from pid_graphs import Graph, fails_with, out, save_official
from safetensors import safe_open
from tiny import tiny_network
from tiny_gemma import random_weights, tokenizer_model, write_comfy, write_comfy_fp8

from pid_core.api import PiDDecoder
from pid_core.captions import CAPTION_LENGTH, NEGATIVE_PROMPT, CaptionEncoder, CaptionTokenizer, tokenize_captions
from pid_core.gemma import GemmaConfig, build_gemma, gemma_weights_from_state_dict

CAPTION = "A red fox jumps over the lazy dog near a quiet river at sunset."
OTHER = "Portrait of an old sailor with a grey beard, oil painting, dramatic light."
HIDDEN = 32  # the tiny PiD networks' txt_embed_dim (tests/core/tiny.py)
# ComfyUI's Gemma2_2B_Config keeps Gemma-2's head width (256) and query scale, as pid_core assumes without config.json
CONFIG = GemmaConfig(
    vocab_size=600, hidden_size=HIDDEN, intermediate_size=64, num_layers=3, num_heads=2, num_kv_heads=1
)

GEMMA_IT = "pidtest-caption-gemma-2-tiny-it.safetensors"
GEMMA_FP8 = "pidtest-caption-gemma-2-tiny-it_fp8_scaled.safetensors"
GEMMA_BASE = "pidtest-caption-gemma-2-tiny-base.safetensors"  # same weights, a name that does not say -it
FLUX_PID = "pidtest-caption/PiD_res2k_sr4x_official_flux_distill_4step/model_ema_bf16.pth"
# a tiny v1.5 teacher: the student's network plus the training-only aux RGB head that marks undistilled files
TEACHER_PID = "pidtest-caption/PiD_v1pt5_res2kto4k_sr4x_official_flux_undistilled/model_ema_bf16.pth"
LATENT_SIDE = 32  # px of the empty latent: 4x4 Flux cells, decoded to 128x128


@pytest.fixture(scope="module")
def models(comfy_server) -> dict[str, Path]:
    """The tiny Gemma files in models/text_encoders and a tiny Flux PiD checkpoint in models/pid."""
    encoders = comfy_server.models_dir / "text_encoders"
    weights = random_weights(CONFIG, seed=3)
    write_comfy(encoders / GEMMA_IT, weights)
    write_comfy(encoders / GEMMA_BASE, weights)
    write_comfy_fp8(encoders / GEMMA_FP8, weights)
    pid = comfy_server.models_dir / "pid" / FLUX_PID
    save_official(tiny_network("flux_2k", seed=0), pid)
    teacher = comfy_server.models_dir / "pid" / TEACHER_PID
    teacher.parent.mkdir(parents=True, exist_ok=True)
    tensors = tiny_network("flux_2kto4k_v1pt5", seed=4).state_dict()
    aux = {"0.weight": [32], "0.bias": [32], "1.weight": [32, 32], "1.bias": [32], "3.weight": [48, 32], "3.bias": [48]}
    tensors |= {f"lq_proj.lq_aux_rgb_head.{k}": torch.randn(shape) for k, shape in aux.items()}
    torch.save({f"net.{k}": v.to(torch.bfloat16) for k, v in tensors.items()}, teacher)
    return {"it": encoders / GEMMA_IT, "fp8": encoders / GEMMA_FP8, "pid": pid, "teacher": teacher}


# --- graphs and records ---------------------------------------------------------------------------------------


def caption(g: Graph, text: str, gemma_name: str = "none", clip: str | None = None) -> str:
    inputs = {"text": text, "gemma_name": gemma_name} | ({"clip": out(clip)} if clip else {})
    return g.node("PixelDecoderPiD_Caption", **inputs)


def save(g: Graph, conditioning: str, name: str) -> None:
    g.node("PiDTestSaveConditioning", conditioning=out(conditioning), name=name)


def decode(g: Graph, conditioning: str | None, seed: int = 0, pid_name: str = FLUX_PID, steps: int = 1,
           **optional) -> str:
    loader = g.node("PixelDecoderPiD_LoadDecoder", pid_name=pid_name, latent_space="flux", weight_dtype="bf16",
                    vae_name="none")
    latent = g.node("EmptySD3LatentImage", width=LATENT_SIDE, height=LATENT_SIDE, batch_size=1)
    extra = ({"caption": out(conditioning)} if conditioning else {}) | optional
    return g.node("PixelDecoderPiD_Decode", pid_decoder=out(loader), latent=out(latent), size="native 4x",
                  steps=steps, seed=seed, sigma=0.0, latent_space="auto", **extra)


def record(server, name: str) -> tuple[torch.Tensor, dict]:
    path = server.output_dir / "pidtest-tensors" / f"{name}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        return tensors.get("cond", tensors.get("image")), json.loads((f.metadata() or {}).get("json", "{}"))


def negative_caption(server, name: str) -> torch.Tensor:
    with safe_open(str(server.output_dir / "pidtest-tensors" / f"{name}.safetensors"), framework="pt") as f:
        return f.get_tensor("pid_negative_caption")


def expected(path: Path, *texts: str) -> list[torch.Tensor]:
    """pid_core's embeddings of ``texts`` on the file's weights and embedded tokenizer."""
    encoder = CaptionEncoder.load(path)
    return [encoder.encode(t) for t in texts]


# --- the embedding --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["it", "fp8"])
def test_caption_through_a_gemma_clip_equals_pid_core_and_the_gemma_file(comfy_server, models, variant):
    name = models[variant].name
    g = Graph()
    clip = g.node("PiDTestGemmaCLIP", clip_name=name)
    save(g, caption(g, CAPTION, clip=clip), f"cap-clip-{variant}")
    save(g, caption(g, CAPTION, gemma_name=name), f"cap-file-{variant}")
    save(g, caption(g, OTHER, gemma_name=name), f"cap-other-{variant}")
    comfy_server.run(g)

    through_clip, meta = record(comfy_server, f"cap-clip-{variant}")
    through_file, _ = record(comfy_server, f"cap-file-{variant}")
    other, _ = record(comfy_server, f"cap-other-{variant}")
    reference, reference_other, negative = expected(models[variant], CAPTION, OTHER, NEGATIVE_PROMPT)

    assert meta == {"entries": 1, "pid_caption": True}
    for way in ("clip", "file"):  # the negative prompt's embedding rides along, for undistilled checkpoints
        assert torch.equal(negative_caption(comfy_server, f"cap-{way}-{variant}"), negative)
    assert through_clip.shape == (1, CAPTION_LENGTH, HIDDEN) and through_clip.dtype == torch.bfloat16
    assert torch.equal(through_clip, reference)
    assert torch.equal(through_file, reference)
    assert torch.equal(other, reference_other)
    # the reference layout: position 0 is BOS (the same state for every caption), the rest differs
    tokenizer = CaptionTokenizer(tokenizer_model())
    assert tokenize_captions(tokenizer, [CAPTION]).input_ids[0, 0] == tokenizer.bos_id
    assert torch.equal(through_clip[0, 0], other[0, 0])
    bos_alone = CaptionEncoder.load(models[variant]).model(torch.tensor([[tokenizer.bos_id]]), dtype=torch.bfloat16)
    torch.testing.assert_close(through_clip[0, 0], bos_alone[0, 0], rtol=2e-2, atol=2e-2)
    assert not torch.equal(through_clip[0, 1:], other[0, 1:])


def test_clip_weights_are_used_without_a_copy():
    weights = {f"model.{k}": v.to(torch.bfloat16) for k, v in random_weights(CONFIG, seed=3).items()}
    model = build_gemma(gemma_weights_from_state_dict(weights, tokenizer_model(), "clip"), torch.bfloat16, device=None)
    assert model.embed_tokens.weight.data_ptr() == weights["model.embed_tokens.weight"].data_ptr()
    assert model.layers[2].mlp.down_proj.weight.data_ptr() == weights["model.layers.2.mlp.down_proj.weight"].data_ptr()


def test_empty_caption_keeps_the_system_prompt(comfy_server, models):
    g = Graph()
    save(g, caption(g, "", clip=g.node("PiDTestGemmaCLIP", clip_name=GEMMA_IT)), "cap-empty")
    comfy_server.run(g)
    (reference,) = expected(models["it"], "")
    assert torch.equal(record(comfy_server, "cap-empty")[0], reference)


# --- into PiD Decode ------------------------------------------------------------------------------------------


def test_caption_and_a_plain_300_token_conditioning_feed_pid_decode(comfy_server, models):
    g = Graph()
    ours = caption(g, CAPTION, gemma_name=GEMMA_IT)
    plain = g.node("PiDTestCaptionConditioning", batch=1, tokens=CAPTION_LENGTH, width=HIDDEN, seed=5)
    save(g, plain, "cap-plain")
    g.node("PiDTestSave", name="cap-decoded-ours", image=out(decode(g, ours)))
    g.node("PiDTestSave", name="cap-decoded-plain", image=out(decode(g, plain)))
    comfy_server.run(g)

    decoder = PiDDecoder.load(models["pid"])
    latent = torch.zeros(1, 16, LATENT_SIDE // 8, LATENT_SIDE // 8)

    def reference(embedding: torch.Tensor) -> torch.Tensor:
        image = decoder.decode(latent, sigma=0.0, caption=embedding, steps=1, seed=0)
        return ((image + 1) * 0.5).permute(0, 2, 3, 1)

    (embedding,) = expected(models["it"], CAPTION)
    decoded_ours = record(comfy_server, "cap-decoded-ours")[0]
    decoded_plain = record(comfy_server, "cap-decoded-plain")[0]
    assert decoded_ours.shape == (1, 4 * LATENT_SIDE, 4 * LATENT_SIDE, 3)
    assert torch.equal(decoded_ours, reference(embedding))
    assert torch.equal(decoded_plain, reference(record(comfy_server, "cap-plain")[0]))
    assert not torch.equal(decoded_ours, decoded_plain)


def test_an_undistilled_checkpoint_decodes_with_guidance_against_the_negative_prompt(comfy_server, models):
    """PiD Decode on a teacher: its own steps (0 = auto: 25) and cfg 5 by default, the negative prompt's embedding
    from PiD Caption; equal to pid_core's teacher decode. cfg 1 runs without guidance; guidance without a negative
    prompt (a plain conditioning) is a clear error."""
    g = Graph()
    ours = caption(g, CAPTION, gemma_name=GEMMA_IT)
    g.node("PiDTestSave", name="teacher-auto", image=out(decode(g, ours, pid_name=TEACHER_PID, steps=0)))
    g.node("PiDTestSave", name="teacher-cfg1", image=out(decode(g, ours, pid_name=TEACHER_PID, steps=3, cfg=1.0)))
    comfy_server.run(g)

    decoder = PiDDecoder.load(models["teacher"], space="flux")
    assert not decoder.info.distilled
    latent = torch.zeros(1, 16, LATENT_SIDE // 8, LATENT_SIDE // 8)
    embedding, negative = expected(models["it"], CAPTION, NEGATIVE_PROMPT)

    def reference(**kwargs) -> torch.Tensor:
        image = decoder.decode(latent, sigma=0.0, caption=embedding, negative_caption=negative, seed=0, **kwargs)
        return ((image + 1) * 0.5).permute(0, 2, 3, 1)

    assert torch.equal(record(comfy_server, "teacher-auto")[0], reference())  # 25 steps, cfg 5
    assert torch.equal(record(comfy_server, "teacher-cfg1")[0], reference(steps=3, cfg=1.0))

    g = Graph()
    plain = g.node("PiDTestCaptionConditioning", batch=1, tokens=CAPTION_LENGTH, width=HIDDEN, seed=5)
    g.node("PiDTestSave", name="teacher-plain", image=out(decode(g, plain, pid_name=TEACHER_PID, steps=2)))
    fails_with(comfy_server, g, "PixelDecoderPiD_Decode", "negative prompt's embedding", "PiD Caption", "cfg to 1")


def test_conditioning_of_the_wrong_width_is_refused(comfy_server, models):
    g = Graph()
    wide = g.node("PiDTestCaptionConditioning", batch=1, tokens=CAPTION_LENGTH, width=2 * HIDDEN, seed=5)
    g.node("PiDTestSave", name="cap-wide", image=out(decode(g, wide)))
    fails_with(comfy_server, g, "PixelDecoderPiD_Decode", f"(1, {CAPTION_LENGTH}, {2 * HIDDEN})",
               f"[B, {CAPTION_LENGTH}, {HIDDEN}]", "PiD Caption")


def test_a_text_encoders_conditioning_is_refused_as_a_caption(comfy_server, models):
    """A diffusion model's CLIP Text Encode (here: 77 positions of the right width) is not PiD's layout."""
    g = Graph()
    stock = g.node("PiDTestCaptionConditioning", batch=1, tokens=77, width=HIDDEN, seed=5)
    g.node("PiDTestSave", name="cap-stock", image=out(decode(g, stock)))
    fails_with(comfy_server, g, "PixelDecoderPiD_Decode", "is not a PiD caption", f"(1, 77, {HIDDEN})",
               "connect PiD Caption")


def _decoded_without_caption(server, name: str, seed: int) -> tuple[torch.Tensor, dict[str, str], str]:
    g = Graph()
    node = decode(g, None, seed=seed)
    g.node("PiDTestSave", name=name, image=out(node))
    entry, texts = server.run_showing_texts(g)
    assert entry["status"]["status_str"] == "success", entry["status"]
    return record(server, name)[0], texts, node


def test_without_a_caption_the_empty_caption_comes_from_gemma_then_the_cache_else_zeros_with_a_warning(
    comfy_server, models
):
    """No caption: the empty caption's embedding from a Gemma-2 file under its released name (computed once, then
    cached), from the cache once that file is gone; with neither, an all-zero caption and a warning on the node."""
    released = comfy_server.models_dir / "text_encoders" / "gemma_2_2b_it_elm_bf16.safetensors"
    cache = comfy_server.base_dir / "pid-cache"
    decoder = PiDDecoder.load(models["pid"])
    latent = torch.zeros(1, 16, LATENT_SIDE // 8, LATENT_SIDE // 8)

    def reference(embedding: torch.Tensor | None, seed: int) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the all-zero caption's warning
            image = decoder.decode(latent, sigma=0.0, caption=embedding, steps=1, seed=seed)
        return ((image + 1) * 0.5).permute(0, 2, 3, 1)

    (empty,) = expected(models["it"], "")
    try:
        shutil.copy(models["it"], released)
        image, texts, node = _decoded_without_caption(comfy_server, "nocap-gemma", seed=21)
        assert torch.equal(image, reference(empty, 21))
        assert len(list(cache.glob("pid_empty_caption_*.safetensors"))) == 1
        assert "all-zero caption" not in texts.get(node, "")
        released.unlink()
        image, texts, node = _decoded_without_caption(comfy_server, "nocap-cache", seed=22)
        assert torch.equal(image, reference(empty, 22)) and "all-zero caption" not in texts.get(node, "")
    finally:
        released.unlink(missing_ok=True)
        shutil.rmtree(cache, ignore_errors=True)  # other tests decode without a caption on this server
    image, texts, node = _decoded_without_caption(comfy_server, "nocap-zeros", seed=23)
    assert torch.equal(image, reference(None, 23))
    assert "all-zero caption" in texts.get(node, ""), texts  # shown on the PiD Decode node, not only in the log


# --- errors and warnings --------------------------------------------------------------------------------------


def test_caption_needs_exactly_one_of_clip_and_gemma_name(comfy_server, models):
    g = Graph()
    save(g, caption(g, CAPTION), "cap-none")
    fails_with(comfy_server, g, "PixelDecoderPiD_Caption", "needs Gemma-2-2B-it", "gemma_name")
    g = Graph()
    save(g, caption(g, CAPTION, gemma_name=GEMMA_IT, clip=g.node("PiDTestGemmaCLIP", clip_name=GEMMA_IT)), "cap-both")
    fails_with(comfy_server, g, "PixelDecoderPiD_Caption", "both a CLIP and gemma_name")


def test_caption_refuses_a_clip_that_is_not_gemma(comfy_server, models):
    g = Graph()
    save(g, caption(g, CAPTION, clip=g.node("PiDTestTinyCLIPL")), "cap-clip-l")
    fails_with(comfy_server, g, "PixelDecoderPiD_Caption", "not a Gemma-2 text encoder", "clip_l", "lumina2")


def test_caption_with_a_base_gemma_warns_in_the_log(comfy_server, models):
    g = Graph()
    save(g, caption(g, OTHER, gemma_name=GEMMA_BASE), "cap-base")
    start = len(comfy_server.log())
    comfy_server.run(g)
    assert "looks like a base (not instruction-tuned) Gemma-2" in comfy_server.log()[start:]
    assert GEMMA_BASE in comfy_server.log()[start:]


def test_caption_node_definition(comfy_server):
    node = comfy_server.object_info("PixelDecoderPiD_Caption")
    assert node["display_name"] == "PiD Caption" and node["category"] == "PiD" and len(node["description"]) > 40
    assert node["input_order"] == {"required": ["text", "gemma_name"], "optional": ["clip"]}
    assert node["output"] == ["CONDITIONING"]
    gemma_name = node["input"]["required"]["gemma_name"]
    assert gemma_name[0] == "COMBO" and gemma_name[1]["options"][0] == "none" and gemma_name[1]["default"] == "none"
    for section in ("required", "optional"):
        for name, spec in node["input"][section].items():
            assert len(spec[1].get("tooltip", "")) > 10, name
