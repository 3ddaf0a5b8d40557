"""How the network runs: compute dtype per device, attention kernels, the NaN fallback, compiled blocks."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_network

from pid_core.api import decode
from pid_core.runtime import Fallback, attention_backend, compile_blocks, default_compute_dtype


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_compute_dtype_per_device(monkeypatch):
    assert default_compute_dtype("cpu", torch.bfloat16) == torch.bfloat16
    assert default_compute_dtype("cpu", torch.float32) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert default_compute_dtype("cuda", torch.bfloat16) == torch.float16  # e.g. a T4 or a GTX 1080
    assert default_compute_dtype("cuda", torch.float32) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert default_compute_dtype("cuda", torch.bfloat16) == torch.bfloat16


def decode_tiny(net, **kwargs) -> torch.Tensor:
    latent = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(1))
    caption = torch.randn(1, 300, net.config.txt_embed_dim, generator=torch.Generator().manual_seed(2))
    return decode(net, latent, space="flux", sigma=0.2, caption=caption, steps=2, seed=3, **kwargs)


def test_attention_kernels_agree_and_an_unavailable_one_is_explained():
    net = tiny_network("flux_2k")
    auto = decode_tiny(net)
    for name in ("math", "flash"):  # the two kernels a CPU has
        torch.testing.assert_close(decode_tiny(net, attention=name), auto, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="efficient attention kernel is not available here.*choose auto or math"):
        decode_tiny(net, attention="efficient")
    with pytest.raises(ValueError, match="Unknown attention backend 'xformers'"):
        decode_tiny(net, attention="xformers")


def test_fp16_compute_is_a_working_path():
    net = tiny_network("flux_2k").to(torch.bfloat16)
    fp16 = decode_tiny(net, compute_dtype=torch.float16)
    fp32 = decode_tiny(net, compute_dtype=torch.float32)
    assert torch.isfinite(fp16).all()
    assert 0 < relative_l2(fp16, fp32) < 0.02


def test_a_fused_kernel_giving_nan_falls_back_to_math_for_the_rest():
    def call() -> torch.Tensor:  # stands for a fused attention kernel that returns NaN on some GPUs
        fused = torch.backends.cuda.flash_sdp_enabled()
        return torch.tensor([float("nan") if fused else 1.0])

    run = Fallback(torch.device("cpu"), torch.float32)
    with pytest.warns(UserWarning, match="math attention kernel is used instead of the fused one"):
        assert run(call).item() == 1.0
    assert run.attention == "math"
    assert run(call).item() == 1.0  # stays on math, no new warning needed


def test_an_fp16_overflow_is_redone_in_fp32():
    x, w = torch.full((1, 4), 300.0), torch.full((2, 4), 300.0)  # 360000 > fp16's 65504
    call = lambda: torch.nn.functional.linear(x, w).float()  # noqa: E731

    run = Fallback(torch.device("cpu"), torch.float16, attention="math")
    with pytest.warns(UserWarning, match="computing in fp32 instead of float16"):
        assert run(call).tolist() == [[360000.0, 360000.0]]
    assert run.dtype == torch.float32


def test_output_that_stays_nan_is_an_error():
    run = Fallback(torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="NaN/inf values even with the math attention kernel in fp32"):
        run(lambda: torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="not available here"), attention_backend("cudnn"):
        torch.nn.functional.scaled_dot_product_attention(*torch.randn(3, 1, 1, 4, 8))


def test_compiled_blocks_give_the_same_decode():
    net = tiny_network("flux_2k")
    eager = decode_tiny(net)
    compile_blocks(net, backend="aot_eager")  # traced by dynamo and AOTAutograd, without code generation
    assert all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None
               for b in (*net.patch_blocks, *net.pixel_blocks))  # fmt: skip
    torch.testing.assert_close(decode_tiny(net), eager, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_blocks_compiled_by_inductor_give_the_same_decode():
    net = tiny_network("flux_2k")
    eager = decode_tiny(net)
    torch.testing.assert_close(decode_tiny(compile_blocks(net)), eager, rtol=0, atol=1e-4)
