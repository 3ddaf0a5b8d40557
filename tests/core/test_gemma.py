"""The Gemma-2 caption encoder: equal to transformers' Gemma2Model as the reference ran it, and the three
weight layouts it is read from (Comfy-Org repack, its fp8_scaled variant, Hugging Face shards)."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from comparison import GEMMA_TOLERANCE
from safetensors.torch import save_file

from pid_core.captions import CaptionTokenizer, keep_positions, tokenize_captions
from pid_core.gemma import Gemma2Encoder, GemmaError, build_gemma, load_gemma, read_gemma
from pid_core.layers import CastOps
import tiny_gemma as tg

CAPTIONS = ["", "a red fox at sunset", "Portrait of an old sailor with a grey beard, oil painting. " * 30]


@pytest.fixture(scope="module")
def tokens():
    return tokenize_captions(CaptionTokenizer(tg.tokenizer_model()), CAPTIONS)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """The parity model as a Hugging Face snapshot, in fp32 so both sides start from the same values."""
    config = tg.hf_config()
    folder = tg.write_hf(tmp_path_factory.mktemp("hf") / "gemma-2-tiny-it", tg.random_weights(tg.config_of(config), 1),
                         config, dtype=torch.float32)
    return folder


def reference_encoder(folder, dtype):
    """What the reference does: AutoModelForCausalLM.from_pretrained(..., bf16).get_decoder(), SDPA attention."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    decoder = model.get_decoder().eval()
    assert decoder.config._attn_implementation == "sdpa" and decoder.config.attn_logit_softcapping == 50.0
    return decoder



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_equals_transformers_gemma2_on_all_kept_positions(hf_folder, tokens, dtype):
    ours, weights = load_gemma(hf_folder, dtype)
    assert weights.layout == "hf" and ours.config.head_dim == 16 and ours.config.sliding_window == 200
    reference = reference_encoder(hf_folder, dtype)
    with torch.inference_mode():
        got = keep_positions(ours(tokens.input_ids, tokens.attention_mask))
        want = keep_positions(reference(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state)
    assert got.shape == (len(CAPTIONS), 300, 64) and got.dtype == want.dtype == dtype
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, **GEMMA_TOLERANCE[dtype])


def test_bf16_tolerance_catches_one_rounding_difference(hf_folder, tokens):
    """Rounding only the RoPE frequencies to bf16 (what `model.to(bf16)` does to transformers' buffer) is
    outside the bf16 tolerance: it is tight enough to see an arithmetic change."""
    ours, _ = load_gemma(hf_folder, torch.bfloat16)
    reference = reference_encoder(hf_folder, torch.bfloat16)
    reference.rotary_emb.inv_freq = reference.rotary_emb.inv_freq.to(torch.bfloat16)
    with torch.inference_mode():
        got = keep_positions(ours(tokens.input_ids, tokens.attention_mask))
        want = keep_positions(reference(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got, want, **GEMMA_TOLERANCE[torch.bfloat16])


def test_sliding_window_and_padding_mask_matter(hf_folder, tokens):
    """The 200-token window changes the kept states (the prompt is ~330 tokens before the caption), and the
    padding mask keeps padding out of every real token's state."""
    model, _ = load_gemma(hf_folder, torch.float32)
    ids, mask = tokens.input_ids[:2], tokens.attention_mask[:2]
    with torch.inference_mode():
        windowed = model(ids, mask)
        model.config = tg.config_of(tg.hf_config(sliding_window=4096))
        unwindowed = model(ids, mask)
        unmasked = model(ids, torch.ones_like(mask))
    assert not torch.allclose(keep_positions(windowed), keep_positions(unwindowed))
    real = mask.bool()
    # causal: real tokens come first, so they never see padding either way; padded positions do differ
    torch.testing.assert_close(unmasked[real], unwindowed[real])
    assert not torch.allclose(unmasked[~real], unwindowed[~real])


# --------------------------------------------------------------------------- layouts


@pytest.fixture(scope="module")
def comfy_weights():
    return tg.random_weights(tg.COMFY_CONFIG, seed=2)


def run(model: Gemma2Encoder, tokens) -> torch.Tensor:
    """The first 80 positions of two prompts: enough to compare weights, quick at head width 256."""
    with torch.inference_mode():
        return model(tokens.input_ids[:2, :80], tokens.attention_mask[:2, :80])


def test_comfy_repack_with_embedded_tokenizer(tmp_path, comfy_weights, tokens):
    path = tg.write_comfy(tmp_path / "gemma_2_2b_it_elm_bf16.safetensors", comfy_weights)
    weights = read_gemma(path)
    assert weights.layout == "comfy"
    assert weights.tokenizer_model == tg.tokenizer_model()
    # no config in the file: structure is Gemma-2's (head width 256, query scale 256, window 4096, sliding on even layers)
    assert weights.config == tg.COMFY_CONFIG
    assert [weights.config.is_sliding(i) for i in range(2)] == [True, False]
    assert set(weights.state_dict) == set(comfy_weights) and "spiece_model" not in weights.state_dict
    model = build_gemma(weights)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    expected = comfy_weights["layers.1.mlp.up_proj.weight"].bfloat16()
    torch.testing.assert_close(model.layers[1].mlp.up_proj.weight, expected, rtol=0, atol=0)


def test_hf_shards_equal_the_comfy_repack(tmp_path, comfy_weights, tokens):
    config = tg.hf_config(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                          query_pre_attn_scalar=256, sliding_window=4096)
    folder = tg.write_hf(tmp_path / "gemma-2-2b-it", comfy_weights, config, shards=3)
    comfy, _ = load_gemma(tg.write_comfy(tmp_path / "gemma_2_2b_it_elm_bf16.safetensors", comfy_weights))
    # the folder, its index json and any one shard name the same weights
    for given in (folder, folder / "model.safetensors.index.json", folder / "model-00002-of-00003.safetensors"):
        weights = read_gemma(given)
        assert weights.layout == "hf" and len(weights.files) == 3 and weights.tokenizer_model is None
        assert weights.tokenizer_file == folder / "tokenizer.model"
        assert weights.config == tg.COMFY_CONFIG
    hf, _ = load_gemma(folder)
    torch.testing.assert_close(run(hf, tokens), run(comfy, tokens), rtol=0, atol=0)


def test_fp8_scaled_is_dequantized_to_bf16(tmp_path, comfy_weights, tokens):
    path = tg.write_comfy_fp8(tmp_path / "gemma_2_2b_it_elm_fp8_scaled.safetensors", comfy_weights)
    weights = read_gemma(path)
    assert weights.layout == "comfy_fp8" and weights.tokenizer_model == tg.tokenizer_model()
    expected = tg.dequantized(comfy_weights)
    assert set(weights.state_dict) == set(expected)  # scales and the `scaled_fp8` marker consumed
    for key, value in expected.items():
        assert weights.state_dict[key].dtype == torch.bfloat16
        torch.testing.assert_close(weights.state_dict[key], value, rtol=0, atol=0)
    # and the dequantized model follows the bf16 one (float8 keeps 3 mantissa bits, so only roughly)
    fp8 = run(build_gemma(weights), tokens).float().flatten()
    bf16 = run(load_gemma(tg.write_comfy(tmp_path / "ref.safetensors", comfy_weights))[0], tokens).float().flatten()
    assert torch.nn.functional.cosine_similarity(fp8, bf16, dim=0) > 0.95


@pytest.mark.parametrize("name, metadata, warns", [
    ("gemma_2_2b_fp16.safetensors", None, True),  # Lumina 2's base Gemma
    ("gemma_2_2b_it_elm_bf16.safetensors", None, False),
    ("text_encoder.safetensors", {"modelspec.title": "Gemma 2 2B"}, True),
    ("text_encoder.safetensors", {"modelspec.title": "gemma-2-2b-it"}, False),
    ("text_encoder.safetensors", None, False),  # nothing says what it is
])
def test_warns_about_a_base_gemma(tmp_path, comfy_weights, name, metadata, warns):
    path = tg.write_comfy(tmp_path / name, comfy_weights, metadata=metadata)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_gemma(path)
    messages = [str(w.message) for w in caught if "instruction-tuned" in str(w.message)]
    assert bool(messages) == warns
    if warns:
        assert messages[0].count(". ") == 0 and "Gemma-2-2B-it" in messages[0]


def test_operations_namespace_builds_the_layers(tmp_path, comfy_weights, tokens):
    built = []

    class CountingLinear(CastOps.Linear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    class CastEmbedding(torch.nn.Embedding):
        pass

    ops = types.SimpleNamespace(Linear=CountingLinear, Embedding=CastEmbedding)
    model, _ = load_gemma(tg.write_comfy(tmp_path / "gemma_2_2b_it.safetensors", comfy_weights), operations=ops)
    assert len(built) == 7 * tg.COMFY_CONFIG.num_layers
    assert isinstance(model.embed_tokens, CastEmbedding)
    plain, _ = load_gemma(tmp_path / "gemma_2_2b_it.safetensors")
    torch.testing.assert_close(run(model, tokens), run(plain, tokens), rtol=0, atol=0)


# --------------------------------------------------------------------------- refusals


def test_refuses_files_that_are_not_gemma2(tmp_path, comfy_weights):
    pid = tmp_path / "pid.safetensors"
    save_file({"s_embedder.proj.weight": torch.zeros(4, 4)}, str(pid))
    with pytest.raises(GemmaError, match="not a Gemma-2 text encoder"):
        read_gemma(pid)
    gemma3 = tmp_path / "gemma3.safetensors"
    tg.write_comfy(gemma3, {**comfy_weights, "layers.0.self_attn.q_norm.weight": torch.zeros(256)})
    with pytest.raises(GemmaError, match="Gemma-3"):
        read_gemma(gemma3)
    gemma1 = tmp_path / "gemma1.safetensors"
    tg.write_comfy(gemma1, {k: v for k, v in comfy_weights.items() if "feedforward" not in k})
    with pytest.raises(GemmaError, match="Gemma-1"):
        read_gemma(gemma1)


def test_clear_errors_for_missing_and_broken_files(tmp_path, comfy_weights):
    with pytest.raises(GemmaError, match="not found"):
        read_gemma(tmp_path / "absent.safetensors")
    broken = tmp_path / "gemma_2_2b_it.safetensors"
    broken.write_bytes(tg.write_comfy(tmp_path / "full.safetensors", comfy_weights).read_bytes()[:5000])
    with pytest.raises(GemmaError, match="truncated"):
        read_gemma(broken)
    folder = tg.write_hf(tmp_path / "hf", comfy_weights, tg.hf_config(num_hidden_layers=2), shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(GemmaError, match="missing"):
        read_gemma(folder)
    partial = tmp_path / "partial.safetensors"
    tg.write_comfy(partial, {k: v for k, v in comfy_weights.items() if k != "layers.1.mlp.up_proj.weight"})
    with pytest.raises(GemmaError, match="lacks layers.1.mlp.up_proj.weight"):
        build_gemma(read_gemma(partial))
