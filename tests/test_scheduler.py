import json
import math
import time

import pytest
import torch
from conftest import FIXTURES, load_io

from neodragon.schedulers import PyramidFlowMatchScheduler

SCHED = json.loads((FIXTURES / "scheduler.json").read_text())
CLIPS_PER_STAGE = json.loads((FIXTURES / "manifest.json").read_text())["components"]["history"]["clips_per_stage"]


@pytest.fixture(scope="module")
def sched() -> PyramidFlowMatchScheduler:
    return PyramidFlowMatchScheduler()


@pytest.fixture(scope="module")
def history_io() -> dict[str, torch.Tensor]:
    return load_io("history_io.safetensors")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def to_blocks(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [N, 4] with each 2x2 block read row by row."""
    b, c, t, h, w = x.shape
    return x.reshape(b, c, t, h // 2, 2, w // 2, 2).permute(0, 1, 2, 3, 5, 4, 6).reshape(-1, 4)


# ---------------------------------------------------------------- reference numbers


def test_config_matches_fixture(sched):
    expected = {k: v for k, v in SCHED["config"].items() if not k.startswith("_")}
    got = {k: v for k, v in sched.config.items() if not k.startswith("_")}
    assert got.keys() == expected.keys()
    assert got["num_train_timesteps"] == expected["num_train_timesteps"]
    assert got["stages"] == expected["stages"]
    assert got["gamma"] == pytest.approx(expected["gamma"])
    assert list(got["stage_range"]) == pytest.approx(expected["stage_range"])


@pytest.mark.parametrize("key", sorted(SCHED["stages"]))
def test_stage_timesteps_and_sigmas(sched, key):
    n, stage = (int(p[1:]) for p in key.split("_"))
    ref = SCHED["stages"][key]
    ts = sched.stage_timesteps(n, stage)
    sig = sched.stage_sigmas(n, stage)
    assert ts.dtype == torch.float32 and ts.shape == (n,)
    assert sig.shape == (n + 1,) and sig[-1] == 0
    torch.testing.assert_close(ts.double(), torch.tensor(ref["timesteps"], dtype=torch.float64), rtol=0, atol=1e-4)
    torch.testing.assert_close(sig.double(), torch.tensor(ref["sigmas"], dtype=torch.float64), rtol=0, atol=1e-4)


def test_stage_sigma_constants(sched):
    for name in ("start_sigmas", "end_sigmas", "orig_start_sigmas"):
        expected = [SCHED[name][str(k)] for k in range(3)]
        assert getattr(sched, name) == pytest.approx(expected, abs=1e-6), name


def test_renoise_coefficients(sched):
    for stage in (1, 2):
        alpha, beta = sched.renoise_coefficients(stage)
        assert alpha == pytest.approx(SCHED["renoise"][str(stage)]["alpha"], abs=1e-6)
        assert beta == pytest.approx(SCHED["renoise"][str(stage)]["beta"], abs=1e-6)


def test_windows_and_local_sigmas(sched):
    for k, (first, last) in enumerate([(1000, 744.256), (744, 386.358), (386, 1.385)]):
        window = sched.timesteps_per_stage[k]
        assert window.shape == (1000,)
        assert window[0].item() == pytest.approx(first, abs=1e-4)
        assert window[-1].item() == pytest.approx(last, abs=1e-4)
        local = sched.sigmas_per_stage[k]
        assert local[0].item() == 1.0 and local[-1].item() == pytest.approx(0.001)


# ---------------------------------------------------------------- history and noise pyramids


@pytest.mark.parametrize("unit", range(1, 7))
def test_history_matches_fixture(sched, history_io, unit):
    generated = [history_io[f"gen{i}"] for i in range(unit)]
    history = sched.build_history(generated)
    assert [len(clips) for clips in history] == CLIPS_PER_STAGE[str(unit)]
    for stage, clips in enumerate(history):
        for i, clip in enumerate(clips):
            ref = history_io[f"u{unit}_s{stage}_c{i}"]
            assert clip.shape == ref.shape, (stage, i)
            torch.testing.assert_close(clip, ref, rtol=0, atol=1e-5)


def test_history_from_cached_pyramids(sched, history_io):
    generated = [history_io[f"gen{i}"] for i in range(6)]
    cached = [sched.latent_pyramid(g) for g in generated]
    for a, b in zip(sched.history_from_pyramids(cached), sched.build_history(generated), strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    assert sched.build_history([]) == [[], [], []]


def test_latent_pyramid_uses_successive_halving(sched, history_io):
    pyr = sched.latent_pyramid(history_io["gen0"])
    assert [tuple(p.shape[-2:]) for p in pyr] == [(2, 4), (4, 8), (8, 16)]
    torch.testing.assert_close(pyr[0], history_io["u1_s0_c0"], rtol=0, atol=1e-6)


def test_noise_pyramid_matches_fixture(sched, history_io):
    pyr = sched.noise_pyramid(history_io["noise_full"])
    assert len(pyr) == 3
    torch.testing.assert_close(pyr[2], history_io["noise_full"])
    torch.testing.assert_close(pyr[1], history_io["noise_down1"], rtol=0, atol=1e-6)
    torch.testing.assert_close(pyr[0], history_io["noise_down2"], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- block noise and renoising


def test_block_noise_covariance(sched):
    noise = sched.block_noise((4, 5, 4, 100, 100), generator=gen(1))  # 200k blocks
    blocks = to_blocks(noise).double()
    assert blocks.shape[0] == 200_000
    gamma = sched.config.gamma
    sigma = (1 + gamma) * torch.eye(4, dtype=torch.float64) - gamma * torch.ones(4, 4, dtype=torch.float64)
    assert blocks.mean(0).abs().max() < 0.01
    assert (torch.cov(blocks.T) - sigma).abs().max() < 0.02
    # At γ = 1/3 each block sums to zero, which only holds if the blocks are aligned with the 2x2 grid.
    assert blocks.sum(1).abs().max() < 1e-5


def test_block_noise_layout_and_cast(sched):
    noise = sched.block_noise((1, 1, 1, 4, 4), generator=gen(3), dtype=torch.bfloat16)
    assert noise.dtype == torch.bfloat16 and noise.shape == (1, 1, 1, 4, 4)
    fp32 = sched.block_noise((1, 1, 1, 4, 4), generator=gen(3))
    torch.testing.assert_close(noise, fp32.to(torch.bfloat16))
    # Block (0, 0) holds the first 4-vector row by row: [[v0, v1], [v2, v3]].
    z = torch.randn((1, 1, 1, 2, 2, 4), generator=gen(3))
    first = z[0, 0, 0, 0, 0] @ sched._block_factor.T
    torch.testing.assert_close(fp32[0, 0, 0, :2, :2].reshape(4), first)


@pytest.mark.parametrize("stage", [1, 2])
def test_renoised_marginal(sched, stage):
    e = sched.end_sigmas[stage - 1]
    s = sched.start_sigmas[stage]
    # Pure noise at the end of stage k-1 is e·n with n iid unit variance (the noise pyramid keeps it white).
    x = e * torch.randn((8, 4, 2, 32, 32), generator=gen(stage))
    out = sched.upsample_and_renoise(x, stage, generator=gen(10 + stage))
    assert out.shape == (8, 4, 2, 64, 64)
    blocks = to_blocks(out).double()
    cov = torch.cov(blocks.T)
    # Per pixel variance s_k², and the upsampled copies become uncorrelated inside each block.
    assert cov.diagonal().mean().item() == pytest.approx(s**2, rel=0.02)
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 0.01
    assert blocks.mean().abs() < 0.01


def test_renoise_signal_coefficient_matches_start(sched):
    for stage in (1, 2):
        alpha, beta = sched.renoise_coefficients(stage)
        e, s = sched.end_sigmas[stage - 1], sched.start_sigmas[stage]
        assert alpha * (1 - e) == pytest.approx(1 - s, abs=1e-12)
        assert alpha**2 * e**2 + beta**2 == pytest.approx(s**2, abs=1e-12)


def test_block_noise_throughput(sched):
    # Hybrid-mode sizes: 16x40x64 into stage 2 (10,240 blocks per channel group); timing is only reported.
    t0 = time.perf_counter()
    for _ in range(10):
        noise = sched.block_noise((1, 16, 1, 40, 64), generator=gen(0))
    elapsed = (time.perf_counter() - t0) / 10
    print(f"block_noise [1,16,1,40,64]: {elapsed * 1e3:.2f} ms per call")
    assert torch.isfinite(noise).all()


# ---------------------------------------------------------------- step


def test_step_euler_dtype_and_sigma_types(sched):
    v = torch.randn(1, 4, 1, 8, 8, generator=gen(0)).to(torch.bfloat16)
    x = torch.randn(1, 4, 1, 8, 8, generator=gen(1)).to(torch.bfloat16)
    out = sched.step(v, 1.0, 0.0, x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, (x.float() - v.float()).to(torch.bfloat16))
    v32, x32 = v.float(), x.float()
    out_t = sched.step(v32, torch.tensor(0.889), torch.tensor(0.778), x32)
    torch.testing.assert_close(out_t, x32 + (0.778 - 0.889) * v32)


# ---------------------------------------------------------------- training side


def test_sample_training_points(sched):
    stage, index = sched.sample_training_points(30_000, generator=gen(0))
    assert stage.dtype == torch.long and index.dtype == torch.long
    assert stage.shape == index.shape == (30_000,)
    assert stage.min() >= 0 and stage.max() <= 2 and index.min() >= 0 and index.max() <= 999
    assert (torch.bincount(stage, minlength=3).float() / 30_000 - 1 / 3).abs().max() < 0.02
    assert index.float().mean().item() == pytest.approx(499.5, abs=10)
    only_last, _ = sched.sample_training_points(100, generator=gen(0), stage_ratios=[0, 0, 1])
    assert (only_last == 2).all()


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_training_target_euler_lands_on_end(sched, stage):
    b = 3
    clean = torch.randn(b, 4, 2, 16, 32, generator=gen(0))
    noise = torch.randn(b, 4, 2, 16, 32, generator=gen(1))
    index = torch.tensor([0, 417, 999])
    noisy, v, timestep = sched.training_target(clean, noise, stage, index)

    x_k = sched.latent_pyramid(clean)[stage]
    n_k = sched.noise_pyramid(noise)[stage]
    e = sched.end_sigmas[stage]
    end = x_k if stage == 2 else e * n_k + (1 - e) * x_k
    tau = sched.sigmas_per_stage[stage][index].float().view(b, 1, 1, 1, 1)
    landed = noisy + (0 - tau) * v
    torch.testing.assert_close(landed, end, rtol=0, atol=2e-6)
    # τ = 1 (index 0) is the start point itself; start − v is the end point.
    torch.testing.assert_close(noisy[0] - v[0], end[0], rtol=0, atol=2e-6)
    if stage == 0:
        torch.testing.assert_close(noisy[0], n_k[0])
    torch.testing.assert_close(timestep, sched.timesteps_per_stage[stage][index])
    assert noisy.shape == v.shape == x_k.shape

    # A scalar index is broadcast over the batch.
    _, _, ts = sched.training_target(clean, noise, stage, 417)
    assert ts.shape == (b,) and (ts == sched.timesteps_per_stage[stage][417]).all()


@pytest.mark.parametrize("stage", [1, 2])
def test_training_start_matches_renoised_previous_end(sched, stage):
    b = 4096
    clean = torch.randn(1, 2, 1, 8, 8, generator=gen(5)).expand(b, -1, -1, -1, -1)
    noise_a = torch.randn(b, 2, 1, 8, 8, generator=gen(6))
    noise_b = torch.randn(b, 2, 1, 8, 8, generator=gen(7))
    start, _, _ = sched.training_target(clean, noise_a, stage, 0)
    prev_noisy, prev_v, _ = sched.training_target(clean, noise_b, stage - 1, 0)
    renoised = sched.upsample_and_renoise(prev_noisy - prev_v, stage, generator=gen(8))
    assert renoised.shape == start.shape
    # Same per-pixel mean (1 − s_k)·Up(x_{k−1}) and the same variance s_k².
    assert (start.mean(0) - renoised.mean(0)).abs().max() < 0.08
    s2 = sched.start_sigmas[stage] ** 2
    assert start.var(0).mean().item() == pytest.approx(s2, rel=0.03)
    assert renoised.var(0).mean().item() == pytest.approx(s2, rel=0.03)


def test_corrupt_history(sched):
    clips = [torch.zeros(64, 2, 3, 4, 8), torch.zeros(64, 2, 1, 8, 16)]
    out = sched.corrupt_history(clips, generator=gen(0))
    assert [o.shape for o in out] == [c.shape for c in clips]
    std0 = out[0].flatten(1).std(1)
    std1 = out[1].flatten(1).std(1)
    assert std0.max() < 0.45 and std0.min() >= 0
    # One σ per sample shared by all its clips.
    assert (std0 / std1.clamp_min(1e-8) - 1).abs().median() < 0.2
    ones = [torch.ones(2, 1, 1, 2, 2)]
    torch.testing.assert_close(sched.corrupt_history(ones, generator=gen(0), max_sigma=0.0)[0], ones[0])


# ---------------------------------------------------------------- determinism, config, errors


def test_seed_determinism(sched):
    x = torch.randn(1, 2, 1, 4, 4, generator=gen(9))
    calls = {
        "block": lambda g: sched.block_noise((1, 2, 1, 4, 4), generator=g),
        "renoise": lambda g: sched.upsample_and_renoise(x, 1, generator=g),
        "points": lambda g: torch.stack(sched.sample_training_points(16, generator=g)),
        "corrupt": lambda g: sched.corrupt_history([x], generator=g)[0],
    }
    for name, fn in calls.items():
        torch.testing.assert_close(fn(gen(42)), fn(gen(42)), rtol=0, atol=0, msg=name)
        assert not torch.equal(fn(gen(42)), fn(gen(43))), name


def test_config_round_trip(sched, tmp_path):
    sched.save_config(tmp_path)
    loaded = PyramidFlowMatchScheduler.from_config(PyramidFlowMatchScheduler.load_config(tmp_path))
    assert loaded.config["stages"] == 3 and loaded.config["num_train_timesteps"] == 1000
    assert list(loaded.config["stage_range"]) == pytest.approx(list(sched.config["stage_range"]))
    assert loaded.start_sigmas == sched.start_sigmas and loaded.end_sigmas == sched.end_sigmas
    torch.testing.assert_close(loaded.stage_timesteps(10, 2), sched.stage_timesteps(10, 2))
    again = PyramidFlowMatchScheduler.from_config(sched.config)
    assert math.isclose(again.config["gamma"], 1 / 3)


def test_invalid_arguments(sched):
    with pytest.raises(ValueError, match="even H and W"):
        sched.block_noise((1, 1, 1, 3, 4))
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        sched.block_noise((1, 4, 4))
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        sched.stage_timesteps(0, 0)
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        sched.stage_sigmas(0, 1)
    with pytest.raises(ValueError, match=r"stage must be an int in \[0, 2\]"):
        sched.stage_timesteps(1, 3)
    with pytest.raises(ValueError, match=r"stage must be an int in \[1, 2\]"):
        sched.renoise_coefficients(0)
    with pytest.raises(ValueError, match=r"stage must be an int in \[1, 2\]"):
        sched.upsample_and_renoise(torch.zeros(1, 1, 1, 2, 2), 0)
    with pytest.raises(ValueError, match="divisible by 4"):
        sched.noise_pyramid(torch.zeros(1, 1, 1, 6, 8))
    with pytest.raises(ValueError, match="index must be"):
        sched.training_target(torch.zeros(2, 1, 1, 4, 4), torch.zeros(2, 1, 1, 4, 4), 0, 1000)
    with pytest.raises(ValueError, match="gamma"):
        PyramidFlowMatchScheduler(gamma=0.5)
    with pytest.raises(ValueError, match="stage_range"):
        PyramidFlowMatchScheduler(stages=2)
