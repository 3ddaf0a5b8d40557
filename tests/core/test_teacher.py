"""The undistilled teachers: recognised as such, and sampled as the official code samples them.

Golden data (tests/data/golden/teacher/, README beside the golden files says how): the official
``PidModel.generate_samples_from_batch`` with its DPM-Solver on a tiny random v1.5 Flux teacher (with the
training-only auxiliary RGB head, as the official teacher network has), fp32 and bf16, 1 to 25 steps, with and
without guidance.
"""

from __future__ import annotations

import json
import math
import warnings
from functools import cache
from pathlib import Path

import planted_bugs
import pytest
import torch
from comparison import BF16, FP32, TEACHER_FP32
from safetensors import safe_open
from test_parity import comfy_latent

from pid_core.__main__ import main
from pid_core.api import build_network, decode
from pid_core.checkpoint import LoadedCheckpoint, canonical_state_dict, inspect_state_dict, load_checkpoint
from pid_core.memory import estimate
from pid_core.network import PiDNetwork
from pid_core.teacher import dynamic_shift, sample_teacher, teacher_timesteps

TEACHER = Path(__file__).parent.parent / "data" / "golden" / "teacher"
WEIGHTS = TEACHER / "flux_2kto4k_v1pt5_teacher.weights.safetensors"
RUNS = sorted(p.name for p in TEACHER.glob("teacher__*.safetensors") if "bf16" not in p.name)
SEED = 42


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@cache
def golden(run: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return read(TEACHER / run)


@cache
def teacher(dtype: torch.dtype = torch.float32) -> tuple[PiDNetwork, LoadedCheckpoint]:
    tensors, layout = canonical_state_dict(read(WEIGHTS)[0])
    loaded = LoadedCheckpoint(inspect_state_dict(tensors, WEIGHTS, layout, space="flux"), tensors)
    return build_network(loaded, dtype), loaded


def run_settings(meta: dict[str, str]) -> tuple[int, float, float]:
    solver = json.loads(meta["solver"])
    return solver["steps"], float(meta["cfg_scale"]), solver["flow_shift"]


def ours(run: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Our teacher sampler around our network, the two guidance branches in one network call."""
    g, meta = golden(run)
    steps, cfg, shift = run_settings(meta)
    net = teacher(dtype)[0]
    latent, sigma = g["inputs.lq_latent"], g["inputs.degrade_sigma"]
    branches = 2 if cfg != 1 else 1
    caption = g["inputs.caption_embs"]
    y = torch.cat([g["inputs.null_caption_embs"].expand_as(caption), caption]) if branches == 2 else caption

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return net(x, t, y, latent.repeat(branches, 1, 1, 1), sigma.repeat(branches)).float()

    return sample_teacher(denoise, g["inputs.noise"].shape, seed=SEED, steps=steps, cfg=cfg, shift=shift)


# --- recognising a teacher ---------------------------------------------------------------------------------


def test_the_training_only_head_marks_an_undistilled_checkpoint_and_is_left_out():
    net, loaded = teacher()
    info = loaded.info
    assert not info.distilled and "undistilled (from its training-only tensors)" in info.detected
    assert info.released == "flux_2kto4k_v1pt5_undistilled" and info.to_json()["distilled"] is False
    assert any(k.startswith("lq_proj.lq_aux_rgb_head.") for k in loaded.state_dict)
    assert not any(k.startswith("lq_proj.lq_aux_rgb_head.") for k in net.state_dict())


def test_a_teacher_without_its_head_is_known_by_its_folder_name(tmp_path):
    from safetensors.torch import save_file

    tensors = {k: v for k, v in read(WEIGHTS)[0].items() if ".lq_aux_rgb_head." not in k}
    for folder, distilled in [("PiD_v1pt5_res2kto4k_sr4x_official_flux_undistilled", False),
                              ("PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step", True), ("pid", True)]:  # fmt: skip
        path = tmp_path / folder / "model.safetensors"
        path.parent.mkdir()
        save_file(tensors, str(path))
        info = load_checkpoint(path, space="flux").info
        assert info.distilled is distilled, folder
        assert any(a.startswith("distilled" if distilled else "undistilled") for a in info.assumed), info.assumed


def test_info_says_undistilled(tmp_path, capsys):
    path = tmp_path / "PiD_v1pt5_res2kto4k_sr4x_official_flux_undistilled" / "model_ema_bf16.safetensors"
    path.parent.mkdir()
    path.write_bytes(WEIGHTS.read_bytes())
    assert main(["info", str(path), "--space", "flux"]) == 0
    assert "distilled: no (undistilled teacher" in capsys.readouterr().out
    assert main(["info", str(path), "--space", "flux", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["distilled"] is False and facts["released_checkpoint"] == "flux_2kto4k_v1pt5_undistilled"


# --- the sampler against the official one ------------------------------------------------------------------


@pytest.mark.parametrize("run", RUNS)
def test_time_steps_and_shift_are_the_reference_ones(run):
    g, meta = golden(run)
    steps, _, shift = run_settings(meta)
    height, width = g["inputs.noise"].shape[-2:]
    if "shift" not in run:
        assert shift == pytest.approx(dynamic_shift(height, width), rel=1e-12)
    FP32.check(teacher_timesteps(steps, shift), g["inputs.timesteps"])
    assert teacher_timesteps(steps, shift)[-1] == 0


def test_network_matches_the_reference_call_by_call():
    g, _ = golden("teacher__64x64__n4__cfg5.safetensors")
    net = teacher()[0]
    captions = (g["inputs.null_caption_embs"], g["inputs.caption_embs"])
    calls = sorted({int(k.split(".")[0][4:]) for k in g if k.startswith("call")})
    assert len(calls) == 8 and [g[f"call{i}.branch"].item() for i in calls] == [0, 1] * 4  # uncond first
    with torch.inference_mode():
        for i in calls:
            v = net(g[f"call{i}.x"], g[f"call{i}.t"], captions[int(g[f"call{i}.branch"])], g["inputs.lq_latent"],
                    g["inputs.degrade_sigma"])  # fmt: skip
            FP32.check(v, g[f"call{i}.v"], f"call {i}")


@pytest.mark.parametrize("run", RUNS)
def test_sampler_matches_the_reference_end_to_end(run):
    g, _ = golden(run)
    assert sampler_differences(run) == []


def sampler_differences(run: str) -> list[str]:
    g, _ = golden(run)
    out = ours(run)
    return TEACHER_FP32.failures(out, g["output.x0_unclamped"]) + TEACHER_FP32.failures(out.clamp(-1, 1), g["output.sample"])


def test_guidance_and_steps_matter_in_the_golden_runs():
    """The runs differ where the settings differ, so the end-to-end comparisons above tell the settings apart."""
    out = {run: golden(run)[0]["output.x0_unclamped"] for run in RUNS if "64x64" in run and "b2" not in run}
    base = out["teacher__64x64__n4__cfg5.safetensors"]
    for other in ("n4__cfg1", "n2__cfg5", "n4__cfg5__shift3", "n25__cfg5"):
        assert not TEACHER_FP32.holds(out[f"teacher__64x64__{other}.safetensors"], base), other


def test_bf16_mode_follows_the_reference_bf16_run_call_by_call():
    """Our bf16 network (bf16 weights, bf16 autocast) on the inputs of the reference's bf16 calls of the first
    step. Further on, guidance scales the branches' bf16 differences by up to 2 cfg - 1 = 9, so whole bf16 runs
    drift apart as far as bf16 and fp32 runs do; the sampler's own arithmetic is fp32 either way."""
    g, _ = golden("teacher__64x64__n4__cfg5__bf16.safetensors")
    fp32 = golden("teacher__64x64__n4__cfg5.safetensors")[0]
    assert not BF16.holds(g["call0.v"], fp32["call0.v"]) or not FP32.holds(g["call0.v"], fp32["call0.v"])
    net = teacher(torch.bfloat16)[0]
    captions = (g["inputs.null_caption_embs"], g["inputs.caption_embs"])
    latent = g["inputs.lq_latent"].to(torch.bfloat16).float()  # the reference rounds the latent through bf16
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in (0, 1):
            v = net(g[f"call{i}.x"], g[f"call{i}.t"], captions[int(g[f"call{i}.branch"])], latent, g["inputs.degrade_sigma"])
            BF16.check(v.float(), g[f"call{i}.v"], f"call {i}")


def test_public_decode_of_a_teacher_matches_the_reference():
    """A ComfyUI-convention latent through decode() with the checkpoint's info: teacher defaults picked by itself."""
    g, meta = golden("teacher__64x64__n4__cfg5__b2.safetensors")
    net, loaded = teacher()
    latent, sigma = g["inputs.lq_latent"], g["inputs.degrade_sigma"]
    image = decode(net, comfy_latent(latent, "flux", sigma), space="flux", sigma=sigma, caption=g["inputs.caption_embs"],
                   negative_caption=g["inputs.null_caption_embs"], steps=4, seed=SEED, info=loaded.info)  # fmt: skip
    TEACHER_FP32.check(image, g["output.sample"])


# --- decode() with a teacher ---------------------------------------------------------------------------------


def count_calls(net: PiDNetwork) -> list[int]:
    forward, batches = net.forward, []

    def counted(x, *args, **kwargs):
        batches.append(x.shape[0])
        return forward(x, *args, **kwargs)

    net.forward = counted
    return batches


def tiny_teacher_decode(**kwargs) -> tuple[torch.Tensor, list[int]]:
    tensors, layout = canonical_state_dict(read(WEIGHTS)[0])
    loaded = LoadedCheckpoint(inspect_state_dict(tensors, WEIGHTS, layout, space="flux"), tensors)
    net = build_network(loaded, torch.float32)
    batches = count_calls(net)
    g, _ = golden("teacher__64x64__n4__cfg5__b2.safetensors")
    args = dict(space="flux", sigma=g["inputs.degrade_sigma"], caption=g["inputs.caption_embs"],
                negative_caption=g["inputs.null_caption_embs"], seed=SEED, info=loaded.info)  # fmt: skip
    image = decode(net, comfy_latent(g["inputs.lq_latent"], "flux", g["inputs.degrade_sigma"]), **{**args, **kwargs})
    return image, batches


def test_a_teacher_runs_25_guided_steps_by_default_with_both_branches_in_one_call():
    _, batches = tiny_teacher_decode()
    assert batches == [4] * 25  # 2 pictures x 2 branches, one network call per step


def test_the_branches_go_one_after_the_other_when_memory_is_short():
    together, _ = tiny_teacher_decode(steps=3)
    net = teacher()[0]
    one, two = (estimate(net.config, 64, 64, batch=4, items_per_call=n, weight_dtype=torch.float32,
                         compute_dtype=torch.float32, pixel_chunk=net.pixel_chunk).activations for n in (1, 2))  # fmt: skip
    apart, batches = tiny_teacher_decode(steps=3, memory_budget=(one + two) // 2)  # room for one item, not two
    assert batches == [1] * 12  # 4 items (2 pictures x 2 branches) one at a time, 3 steps
    TEACHER_FP32.check(apart, together)


def test_cfg_1_runs_one_branch_and_needs_no_negative_caption():
    image, batches = tiny_teacher_decode(steps=2, cfg=1.0, negative_caption=None)
    assert batches == [2, 2]
    guided, _ = tiny_teacher_decode(steps=2)
    assert not TEACHER_FP32.holds(image, guided)


def test_guidance_without_the_negative_caption_is_a_clear_error():
    with pytest.raises(ValueError, match="needs the negative prompt's embedding.*connect PiD Caption"):
        tiny_teacher_decode(steps=2, negative_caption=None)


def test_a_student_ignores_cfg_with_a_warning():
    from tiny import tiny_network

    net = tiny_network("flux_2k")
    latent = torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(1))
    plain = decode(net, latent, space="flux", caption=torch.zeros(1, 300, net.config.txt_embed_dim), steps=2)
    with pytest.warns(UserWarning, match="cfg 5 is ignored: this PiD checkpoint is a distilled student"):
        guided = decode(net, latent, space="flux", caption=torch.zeros(1, 300, net.config.txt_embed_dim), steps=2,
                        cfg=5.0)  # fmt: skip
    assert torch.equal(plain, guided)


@pytest.mark.parametrize("steps", [0, 201, 2.5])
def test_teacher_steps_out_of_range_are_refused(steps):
    with pytest.raises(ValueError, match="An undistilled PiD runs 1 to 200 steps"):
        teacher_timesteps(steps, 6.0)


def test_dynamic_shift_is_six_at_2048_px():
    assert dynamic_shift(2048, 2048) == 6.0
    assert dynamic_shift(4096, 4096) == pytest.approx(6.0 * math.sqrt(2))


def test_cli_decodes_a_teacher_with_cfg_and_shift(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "PiD_v1pt5_res2kto4k_sr4x_official_flux_undistilled" / "model_ema_bf16.safetensors"
    path.parent.mkdir()
    path.write_bytes(WEIGHTS.read_bytes())
    g, _ = golden("teacher__64x64__n4__cfg5.safetensors")
    save_file({"latent": comfy_latent(g["inputs.lq_latent"], "flux", g["inputs.degrade_sigma"])},
              str(tmp_path / "in.safetensors"))  # fmt: skip
    save_file({"caption": g["inputs.caption_embs"]}, str(tmp_path / "caption.safetensors"))
    save_file({"caption": g["inputs.null_caption_embs"]}, str(tmp_path / "negative.safetensors"))
    common = ["decode", str(path), str(tmp_path / "in.safetensors"), "--space", "flux", "--sigma", "0.3",
              "--precision", "fp32", "--caption-embedding", str(tmp_path / "caption.safetensors"), "--seed", "42"]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*common, "--steps", "4", "--negative-caption-embedding", str(tmp_path / "negative.safetensors"),
                     "--out", str(tmp_path / "a.safetensors")]) == 0  # fmt: skip
        assert main([*common, "--steps", "4", "--out", str(tmp_path / "b.safetensors")]) == 2  # no negative caption
        assert main([*common, "--steps", "4", "--cfg", "1", "--shift", "3", "--out", str(tmp_path / "c.safetensors")]) == 0
    a = read(tmp_path / "a.safetensors")[0]["image"]
    TEACHER_FP32.check(a, g["output.sample"])
    assert not TEACHER_FP32.holds(read(tmp_path / "c.safetensors")[0]["image"], a)


@pytest.mark.parametrize("bug", [planted_bugs.teacher_shift_dropped, planted_bugs.teacher_first_order_only])
def test_the_teacher_comparison_sees_planted_bugs(bug):
    with bug():
        assert sampler_differences("teacher__64x128__n4__cfg5.safetensors"), f"{bug.__name__} went unnoticed"
