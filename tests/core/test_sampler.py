"""The student sampler: schedules, the loop against a hand-written one, noise order, callbacks."""

import pytest
import torch

from pid_core.sampler import STUDENT_T_LIST, sample, timesteps, to_image

T0, T1, T2, T3, T4 = STUDENT_T_LIST
SHAPE = (2, 3, 4, 8)

# Reference subsampling, computed by hand: idx = round_half_even(4k/n), k = 0..n
REFERENCE = {
    1: (1.0, 0.0),
    2: (T0, T2, T4),  # 0, 2, 4
    3: (T0, T1, T3, T4),  # 0, 1.33, 2.67, 4 -> 0, 1, 3, 4
    4: STUDENT_T_LIST,
    5: (T0, T1, T2, T2, T3, T4),  # 0, .8, 1.6, 2.4, 3.2, 4 -> 0, 1, 2, 2, 3, 4
    6: (T0, T1, T1, T2, T3, T3, T4),  # 0, .67, 1.33, 2, 2.67, 3.33, 4 -> 0, 1, 1, 2, 3, 3, 4
    7: (T0, T1, T1, T2, T2, T3, T3, T4),  # 0, .57, 1.14, 1.71, 2.29, 2.86, 3.43, 4
    8: (T0, T0, T1, T2, T2, T2, T3, T4, T4),  # 0, .5->0, 1, 1.5->2, 2, 2.5->2, 3, 3.5->4, 4
}


@pytest.mark.parametrize("steps", range(1, 9))
def test_reference_schedule(steps):
    assert timesteps(steps, "reference") == pytest.approx(REFERENCE[steps], abs=0)


@pytest.mark.parametrize("steps", range(1, 5))
def test_spread_equals_reference_up_to_four_steps(steps):
    assert timesteps(steps) == REFERENCE[steps]


def test_spread_interpolates_for_five_to_eight_steps():
    # 5 steps: fractional indices 0, .8, 1.6, 2.4, 3.2, 4
    assert timesteps(5) == pytest.approx(
        (T0, T0 + 0.8 * (T1 - T0), T1 + 0.6 * (T2 - T1), T2 + 0.4 * (T3 - T2), T3 + 0.2 * (T4 - T3), 0.0)
    )
    # 8 steps: halfway points between list entries
    assert timesteps(8) == pytest.approx((T0, (T0 + T1) / 2, T1, (T1 + T2) / 2, T2, (T2 + T3) / 2, T3, T3 / 2, 0.0))
    for steps in range(5, 9):
        ts = timesteps(steps)
        assert len(ts) == steps + 1 and ts[0] == T0 and ts[-1] == 0.0
        assert all(a > b for a, b in zip(ts, ts[1:])), ts  # distinct, strictly decreasing


@pytest.mark.parametrize("steps", [0, 9, -1, 2.0, "4", True])
def test_bad_step_count(steps):
    with pytest.raises(ValueError, match="1 to 8 steps"):
        timesteps(steps)


def test_bad_schedule():
    with pytest.raises(ValueError, match="Unknown schedule 'karras'"):
        timesteps(4, "karras")


# ---- the loop ---------------------------------------------------------------------------------------


class LinearDenoise:
    """v = a * x + b * t_scaled / 1000, recording its calls."""

    def __init__(self, a=0.5, b=0.25):
        self.a, self.b, self.calls = a, b, []

    def __call__(self, x, t_scaled):
        self.calls.append((x.clone(), t_scaled.clone()))
        return self.a * x + self.b * (t_scaled / 1000).view(-1, 1, 1, 1)


def f32(t):
    return torch.tensor(t, dtype=torch.float32).item()


def hand_written_loop(ts, seed, a=0.5, b=0.25):
    gen = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(SHAPE, dtype=torch.float32, generator=gen)
    for t, t_next in zip(ts[:-1], ts[1:]):
        t, t_next = f32(t), f32(t_next)
        v = a * x + b * torch.tensor(t * 1000, dtype=torch.float32) / 1000
        x0 = (x.double() - t * v.double()).float()
        if t_next > 0:
            x = (1 - t_next) * x0 + t_next * torch.randn(SHAPE, dtype=torch.float32, generator=gen)
        else:
            x = x0
    return x0


@pytest.mark.parametrize("steps, schedule", [(4, "spread"), (2, "spread"), (5, "reference"), (6, "spread")])
def test_sample_matches_hand_written_loop(steps, schedule):
    denoise = LinearDenoise()
    out = sample(denoise, SHAPE, seed=123, steps=steps, schedule=schedule)
    torch.testing.assert_close(out, hand_written_loop(timesteps(steps, schedule), 123), rtol=0, atol=0)
    assert len(denoise.calls) == steps
    t_seen = [t for _, t in denoise.calls]
    assert all(t.dtype == torch.float32 and t.shape == (SHAPE[0],) for t in t_seen)
    assert [t[0].item() for t in t_seen] == pytest.approx([1000 * t for t in timesteps(steps, schedule)[:-1]])


def test_first_input_is_the_seeded_noise_and_renoise_uses_the_next_draws():
    denoise = LinearDenoise(a=0.0, b=0.0)  # v = 0 -> x0 = x, so the noise order is directly visible
    sample(denoise, SHAPE, seed=7, steps=2)
    gen = torch.Generator("cpu").manual_seed(7)
    noise, eps = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    assert torch.equal(denoise.calls[0][0], noise)
    t_next = f32(T2)
    assert torch.equal(denoise.calls[1][0], (1 - t_next) * noise + t_next * eps)


def test_one_step_uses_t_1000_and_subtracts_the_full_velocity():
    denoise = LinearDenoise(a=0.0, b=1.0)  # v = t = 1 everywhere
    out = sample(denoise, SHAPE, seed=3, steps=1)
    assert denoise.calls[0][1].tolist() == [1000.0, 1000.0]
    noise = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(3))
    torch.testing.assert_close(out, noise - 1.0, rtol=0, atol=0)


def test_callback_receives_step_total_and_x0():
    seen = []
    out = sample(LinearDenoise(), SHAPE, seed=0, steps=3, callback=lambda i, n, x0: seen.append((i, n, x0)))
    assert [(i, n) for i, n, _ in seen] == [(0, 3), (1, 3), (2, 3)]
    assert torch.equal(seen[-1][2], out)
    assert all(x0.shape == SHAPE for _, _, x0 in seen)


def test_exception_in_callback_stops_sampling():
    denoise = LinearDenoise()

    def cancel(i, total, x0):
        if i == 1:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt, match="cancelled"):
        sample(denoise, SHAPE, seed=0, steps=4, callback=cancel)
    assert len(denoise.calls) == 2


def test_same_seed_same_result_and_different_seed_differs():
    a = sample(LinearDenoise(), SHAPE, seed=42)
    b = sample(LinearDenoise(), SHAPE, seed=42)
    c = sample(LinearDenoise(), SHAPE, seed=43)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_float64_matters_for_the_step_update():
    # t * v is 1 plus a tiny residue below float32 resolution: computing x - t*v in float32 rounds
    # the product first, float64 keeps it and rounds once, so the two differ for many elements.
    t = f32(T0)
    v_value = f32(1.0 / t)
    x = torch.ones(1, 3, 16, 16)
    x0_64 = (x.double() - t * torch.tensor(v_value, dtype=torch.float64)).float()
    x0_32 = x - torch.tensor(t, dtype=torch.float32) * torch.tensor(v_value, dtype=torch.float32)
    assert not torch.equal(x0_64, x0_32)  # the construction really separates the two

    calls = []

    def denoise(xin, t_scaled):
        calls.append(xin)
        return torch.full_like(xin, v_value) if len(calls) == 1 else torch.zeros_like(xin)

    # First step from the real noise; check the sampler's x0 against both formulas on that noise.
    seen = []
    sample(denoise, (1, 3, 16, 16), seed=1, steps=2, callback=lambda i, n, x0: seen.append(x0))
    noise = calls[0]
    want64 = (noise.double() - t * torch.tensor(v_value, dtype=torch.float64)).float()
    want32 = noise - torch.tensor(t) * torch.tensor(v_value)
    assert seen[0].dtype == torch.float32
    assert torch.equal(seen[0], want64)
    assert not torch.equal(seen[0], want32)


def test_denoise_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="denoise returned shape"):
        sample(lambda x, t: x[:, :1], SHAPE, seed=0)


def test_bad_shape():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        sample(LinearDenoise(), (3, 4, 8), seed=0)


def test_to_image_clamps_and_maps_to_unit_range():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0])
    assert to_image(x).tolist() == [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]
