"""Captions: the reference's prompt layout on a tiny tokenizer, loading the tokenizer, the cached
empty-caption embedding, and ``decode --caption/--gemma`` on the command line."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from pid_core import captions
from pid_core.__main__ import main
from pid_core.captions import (
    CAPTION_LENGTH,
    CHI_PROMPT,
    NEGATIVE_PROMPT,
    CaptionEncoder,
    CaptionTokenizer,
    cached_caption_embedding,
    empty_caption_embedding,
    keep_positions,
    lacks_system_prompt,
    load_tokenizer,
    tokenize_captions,
)
from pid_core.gemma import GemmaConfig, GemmaError, read_gemma
import tiny_gemma as tg
from tiny import tiny_network

LONG = "A lighthouse on a rocky cliff, waves crashing below, seagulls in a stormy sky. " * 20
CAPTIONS = ["", "a cat", LONG, "Ünïcödé ☃ caption\nover two lines, 1234", "<bos> literal"]


@pytest.fixture(scope="module")
def tokenizer() -> CaptionTokenizer:
    return CaptionTokenizer(tg.tokenizer_model())


# --------------------------------------------------------------------------- layout


def test_layout_equals_the_reference_tokenizer_call(tmp_path, tokenizer):
    """transformers' Gemma tokenizer called as the reference calls it, on the same SentencePiece model."""
    transformers = pytest.importorskip("transformers")
    reference = transformers.GemmaTokenizer(vocab_file=str(tg.write_tokenizer(tmp_path / "tokenizer.model")))
    reference.padding_side = "right"
    chi = "\n".join(CHI_PROMPT)
    n_chi = len(reference.encode(chi))
    want = reference([chi + c for c in CAPTIONS], max_length=n_chi + 298, padding="max_length", truncation=True,
                     return_tensors="pt")
    got = tokenize_captions(tokenizer, CAPTIONS)
    assert got.chi_tokens == n_chi
    assert torch.equal(got.input_ids, want.input_ids)
    assert torch.equal(got.attention_mask, want.attention_mask)


def test_layout_facts(tokenizer):
    tokens = tokenize_captions(tokenizer, CAPTIONS)
    chi = "\n".join(CHI_PROMPT)
    assert len(CHI_PROMPT) == 8 and chi.endswith("User Prompt: ")
    chi_ids = tokenizer.encode(chi)
    assert chi_ids[0] == tokenizer.bos_id == 2 and tokenizer.pad_id == 0  # Gemma's ids
    assert tokens.chi_tokens == len(chi_ids) > 100
    total = tokens.chi_tokens + 298
    assert tokens.input_ids.shape == tokens.attention_mask.shape == (len(CAPTIONS), total)
    assert (tokens.input_ids[:, 0] == tokenizer.bos_id).all()  # BOS kept
    for row, caption in enumerate(CAPTIONS):
        ids, mask = tokens.input_ids[row], tokens.attention_mask[row]
        count = int(mask.sum())
        assert mask[:count].all() and not mask[count:].any()  # right padding
        assert (ids[count:] == tokenizer.pad_id).all()
        full = tokenizer.encode(chi + caption)  # caption appended with no separator
        assert ids[:count].tolist() == full[:total]
    empty, short, long = (int(tokens.attention_mask[i].sum()) for i in range(3))
    assert empty == tokens.chi_tokens and short > empty
    assert len(tokenizer.encode(chi + LONG)) > total and long == total  # truncated to the budget


def test_kept_positions_are_bos_and_the_last_299(tokenizer):
    tokens = tokenize_captions(tokenizer, [""])
    total = tokens.input_ids.shape[1]
    positions = torch.arange(total, dtype=torch.float32)[None, :, None].expand(1, total, 3)
    kept = keep_positions(positions)[0, :, 0].long().tolist()
    assert len(kept) == 300
    assert kept == [0, *range(total - 299, total)]
    assert kept[1] == tokens.chi_tokens - 1  # the window starts at the last system-prompt token
    with pytest.raises(ValueError, match="system prompt"):
        keep_positions(torch.zeros(1, 299, 3))


# --------------------------------------------------------------------------- encoder and tokenizer sources


@pytest.fixture(scope="module")
def comfy_gemma(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text_encoders")
    return tg.write_comfy(folder / "gemma_2_2b_it_elm_bf16.safetensors", tg.random_weights(tg.COMFY_CONFIG, 4))


def test_encode_gives_the_kept_final_states(comfy_gemma, tokenizer):
    encoder = CaptionEncoder.load(comfy_gemma)
    out = encoder.encode(["a cat", LONG])
    assert out.shape == (2, 300, 64) and out.dtype == torch.bfloat16 and out.device.type == "cpu"
    tokens = tokenize_captions(tokenizer, ["a cat", LONG])
    with torch.inference_mode():
        direct = keep_positions(encoder.model(tokens.input_ids, tokens.attention_mask))
    torch.testing.assert_close(out, direct, rtol=0, atol=0)
    torch.testing.assert_close(encoder.encode("a cat"), out[:1], rtol=0, atol=0)


def test_an_empty_text_encoded_without_the_system_prompt_is_recognised(comfy_gemma, tokenizer):
    """BOS then padding alone (ComfyUI core's pixeldit encoding of "") repeats one vector after BOS; PiD's own
    captions, empty or not, never do, nor does an all-zero caption count."""
    encoder = CaptionEncoder.load(comfy_gemma)
    ids = torch.full((1, CAPTION_LENGTH), tokenizer.pad_id)
    ids[0, 0] = tokenizer.bos_id
    mask = (ids != tokenizer.pad_id).long()
    with torch.inference_mode():
        bos_and_padding = encoder.model(ids, mask)
    ours = encoder.encode(["", "a cat", LONG])
    assert lacks_system_prompt(bos_and_padding)
    assert not any(lacks_system_prompt(c[None]) for c in ours)
    assert lacks_system_prompt(torch.cat([ours[:1], bos_and_padding]))  # any picture of a batch
    assert not lacks_system_prompt(torch.zeros_like(bos_and_padding))
    nearly = bos_and_padding.clone()
    nearly[0, -1] += 0.01 * nearly[0, -1].norm()  # one padding position off by 1%: not one repeated vector
    assert not lacks_system_prompt(nearly)


def test_tokenizer_from_embedded_beside_or_named(tmp_path, comfy_gemma):
    assert load_tokenizer(read_gemma(comfy_gemma)).vocab_size == tg.VOCAB
    sd = tg.random_weights(tg.COMFY_CONFIG, 4)
    config = tg.hf_config(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                          query_pre_attn_scalar=256, sliding_window=4096)
    folder = tg.write_hf(tmp_path / "gemma-2-2b-it", sd, config, shards=1)
    assert load_tokenizer(read_gemma(folder)).vocab_size == tg.VOCAB  # tokenizer.model beside
    moved = tmp_path / "elsewhere.model"
    (folder / "tokenizer.model").rename(moved)
    with pytest.raises(GemmaError, match="no tokenizer.model is beside it"):
        load_tokenizer(read_gemma(folder))
    assert load_tokenizer(read_gemma(folder), moved).vocab_size == tg.VOCAB
    with pytest.raises(GemmaError, match="not a SentencePiece"):
        CaptionTokenizer(b"not a model")


def test_tokenizer_larger_than_the_embeddings_is_refused(tmp_path):
    small = GemmaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, num_kv_heads=1)
    path = tg.write_comfy(tmp_path / "gemma_2_2b_it.safetensors", tg.random_weights(small))
    with pytest.raises(GemmaError, match="only 100 embeddings"):
        CaptionEncoder.load(path).encode("a cat")


# --------------------------------------------------------------------------- empty-caption cache


def test_empty_caption_is_computed_once_and_cached_by_content(tmp_path, comfy_gemma, monkeypatch):
    cache = tmp_path / "cache"
    first = empty_caption_embedding(comfy_gemma, cache)
    assert first.shape == (1, 300, 64) and first.dtype == torch.bfloat16
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1 and files[0].stat().st_size < 100_000
    torch.testing.assert_close(first, CaptionEncoder.load(comfy_gemma).encode(""), rtol=0, atol=0)

    def no_loading(*_args, **_kwargs):
        raise AssertionError("Gemma was loaded although the empty caption is cached")

    monkeypatch.setattr(CaptionEncoder, "load", no_loading)
    renamed = shutil.copy(comfy_gemma, tmp_path / "my_copy_of_gemma_it.safetensors")
    torch.testing.assert_close(empty_caption_embedding(renamed, cache), first, rtol=0, atol=0)
    monkeypatch.undo()

    other = tg.write_comfy(tmp_path / "other_gemma_it.safetensors", tg.random_weights(tg.COMFY_CONFIG, 5))
    second = empty_caption_embedding(other, cache)
    assert len(list(cache.glob("*.safetensors"))) == 2 and not torch.equal(first, second)
    fp32 = empty_caption_embedding(comfy_gemma, cache, dtype=torch.float32)  # another compute dtype, another entry
    assert fp32.dtype == torch.float32 and len(list(cache.glob("*.safetensors"))) == 3


def test_negative_prompt_embedding_is_cached_beside_the_empty_caption(tmp_path, comfy_gemma, monkeypatch):
    cache = tmp_path / "cache"
    negative = cached_caption_embedding(comfy_gemma, NEGATIVE_PROMPT, cache)
    torch.testing.assert_close(negative, CaptionEncoder.load(comfy_gemma).encode(NEGATIVE_PROMPT), rtol=0, atol=0)
    empty = empty_caption_embedding(comfy_gemma, cache)
    assert len(list(cache.glob("*.safetensors"))) == 2 and not torch.equal(negative, empty)
    monkeypatch.setattr(CaptionEncoder, "load", lambda *a, **k: pytest.fail("Gemma loaded for a cached caption"))
    torch.testing.assert_close(cached_caption_embedding(comfy_gemma, NEGATIVE_PROMPT, cache), negative, rtol=0, atol=0)


def test_any_cached_caption_finds_a_fixed_text_without_the_gemma_file(tmp_path, comfy_gemma):
    cache = tmp_path / "cache"
    assert captions.any_cached_caption("", 64, cache) is None  # nothing cached yet
    empty = empty_caption_embedding(comfy_gemma, cache)
    negative = cached_caption_embedding(comfy_gemma, NEGATIVE_PROMPT, cache)
    torch.testing.assert_close(captions.any_cached_caption("", 64, cache), empty, rtol=0, atol=0)
    torch.testing.assert_close(captions.any_cached_caption(NEGATIVE_PROMPT, 64, cache), negative, rtol=0, atol=0)
    assert captions.any_cached_caption("a cat", 64, cache) is None  # another text
    assert captions.any_cached_caption("", 2304, cache) is None  # another Gemma's width
    assert captions.any_cached_caption("", 64, cache, dtype=torch.float32) is None  # another arithmetic


def test_cache_dir_default_and_damaged_entries(tmp_path, comfy_gemma, monkeypatch):
    monkeypatch.setenv("PID_CACHE_DIR", str(tmp_path / "env_cache"))
    assert captions.cache_dir() == tmp_path / "env_cache"
    encoder = CaptionEncoder.load(comfy_gemma)
    good = encoder.empty_caption()
    (entry,) = (tmp_path / "env_cache").glob("*.safetensors")
    entry.write_bytes(b"garbage")
    torch.testing.assert_close(encoder.empty_caption(), good, rtol=0, atol=0)  # recomputed
    assert entry.stat().st_size > 1000
    monkeypatch.delenv("PID_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert captions.cache_dir() == tmp_path / "xdg" / "pid_core"


# --------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """A tiny Flux PiD (text width 32), a Gemma of hidden width 32 in the Comfy-Org layout, and a latent."""
    root = tmp_path_factory.mktemp("cli")
    folder = root / "PiD_res2k_sr4x_official_flux_distill_4step"
    folder.mkdir()
    checkpoint = folder / "model_ema_bf16.pth"
    torch.save({f"net.{k}": v.to(torch.bfloat16) for k, v in tiny_network("flux_2k").state_dict().items()}, checkpoint)
    config = GemmaConfig(vocab_size=tg.VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                         num_kv_heads=1)
    gemma = tg.write_comfy(root / "gemma_2_2b_it_elm_bf16.safetensors", tg.random_weights(config, 6))
    latent = root / "in.latent"
    save_file({"latent_tensor": torch.randn(1, 16, 2, 2) + 0.1159}, str(latent))
    return checkpoint, gemma, latent


def test_decode_with_caption_text_and_gemma(cli_files, tmp_path, capsys, monkeypatch):
    checkpoint, gemma, latent = cli_files
    monkeypatch.setenv("PID_CACHE_DIR", str(tmp_path / "cache"))
    common = ["decode", str(checkpoint), str(latent), "--steps", "1", "--gemma", str(gemma)]
    assert main([*common, "--caption", "a red fox", "--out", str(tmp_path / "fox.safetensors")]) == 0
    assert main([*common, "--out", str(tmp_path / "empty.safetensors")]) == 0  # no caption: the empty one
    err = capsys.readouterr().err
    assert "all-zero caption" not in err
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    from safetensors.torch import load_file

    fox, empty = (load_file(str(tmp_path / f"{n}.safetensors"))["image"] for n in ("fox", "empty"))
    assert fox.shape == empty.shape == (1, 3, 64, 64) and not torch.equal(fox, empty)


@pytest.mark.parametrize("extra, message", [
    (["--caption", "a fox"], "--caption needs --gemma"),
    (["--caption", "a fox", "--caption-embedding", "x.safetensors", "--gemma", "g.safetensors"], "not both"),
    (["--gemma", "absent.safetensors"], "Gemma-2 weights not found"),
])
def test_caption_argument_errors(cli_files, tmp_path, capsys, extra, message):
    checkpoint, _, latent = cli_files
    code = main(["decode", str(checkpoint), str(latent), "--out", str(tmp_path / "x.png"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and message in err[-1], err
