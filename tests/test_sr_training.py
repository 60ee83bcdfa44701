"""QuickSRNet 2x super-resolution: state-dict keys and shapes, the training pairs (aligned renders, the pair store),
the loss on known inputs, one step, resume, export -> load, generate with and without SR (Python, CLI, batch,
info), a folder of the user's own videos, and 2 processes."""

import json
import shutil

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_two_processes
from safetensors.torch import load_file
from typer.testing import CliRunner

from neodragon.cli import app
from neodragon.data import sample
from neodragon.eval.upscaling import area_downsample, classical_upscale, ssim, upscaler_quality
from neodragon.models.sr import VARIANTS, QuickSRNet
from neodragon.pipelines import NeodragonPipeline
from neodragon.presets import bundled_weights, create_random_checkpoint, reduced_official_preset
from neodragon.recipes.sr import train_sr
from neodragon.training.sr import (
    PairStore,
    build_folder_pairs,
    build_shapes_world_pairs,
    read_video,
    shapes_world_pairs,
    sr_losses,
    video_clips,
)
from neodragon.training.trainer import TrainConfig, read_log

TINY = dict(crop=16, num_frames=9, pair_videos=2, eval_videos=1, styles=("none",))
runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the model ---------------------------------------------------------------------------------------------------

def test_state_dict_keys_follow_the_quicksrnet_layout():
    """The model-zoo QuickSRNet names: ``cnn`` (first conv and the intermediate convs, activations between them),
    ``conv_last``, and for the anchored variants ``anchor`` (a bias-free 1x1 conv here)."""
    small = QuickSRNet.variant("small")
    convs = [f"cnn.{2 * i}.{p}" for i in range(3) for p in ("weight", "bias")]
    assert list(small.state_dict()) == [*convs, "conv_last.weight", "conv_last.bias"]
    assert small.state_dict()["conv_last.weight"].shape == (12, 32, 3, 3)
    large = QuickSRNet.variant("large")
    assert "anchor.weight" in large.state_dict() and len(large.state_dict()) == 2 * 12 + 2 + 1
    assert QuickSRNet.variant("medium").variant_name == "medium"
    assert QuickSRNet.variant("small", use_ito_connection=True).variant_name is None
    with pytest.raises(ValueError, match="unknown QuickSRNet size"):
        QuickSRNet.variant("huge")
    assert set(VARIANTS) == {"small", "medium", "large"}


def test_upscale_video_in_chunks_equals_one_call():
    model = QuickSRNet.variant("small")
    video = torch.rand(2, 3, 5, 8, 12) * 2 - 1
    whole = model(video)
    assert whole.shape == (2, 3, 5, 16, 24)
    torch.testing.assert_close(model.upscale_video(video, frames_per_call=3), whole)
    torch.testing.assert_close(model.upscale_video(video * 3), model((video * 3).clamp(-1, 1)))  # clamped input
    with torch.no_grad():  # float16 weights still return float32
        half = QuickSRNet.variant("small").half()
        assert half.upscale_video(video).dtype == torch.float32
    with pytest.raises(ValueError, match="B, C, T, H, W"):
        model.upscale_video(video[:, :, 0])


# -- data and metrics -----------------------------------------------------------------------------------------

def test_the_1x_render_is_the_2x_render_averaged():
    for index in range(3):
        low = sample("train", index, 0, num_frames=9, height=64, width=64).video
        high = sample("train", index, 0, num_frames=9, height=128, width=128).video
        reduced = area_downsample(high[None])[0]
        assert (reduced - low).abs().mean() < 2e-3
        shifted = (reduced[..., 1:] - low[..., :-1]).abs().mean()
        assert (reduced - low).abs().mean() < shifted  # aligned, not off by a pixel


def test_metrics_on_known_inputs():
    video = torch.rand(1, 3, 2, 16, 16) * 2 - 1
    assert ssim(video, video).item() == pytest.approx(1.0, abs=1e-5)
    assert ssim(video, -video).item() < 0.5
    flat = torch.zeros(1, 3, 1, 4, 4)
    assert torch.equal(classical_upscale(flat, "nearest"), torch.zeros(1, 3, 1, 8, 8))
    high = classical_upscale(video, "nearest")
    scores = upscaler_quality(area_downsample(high), high, {"anchor": QuickSRNet.variant("large")})
    assert scores["nearest"]["psnr_db"] > 60 and scores["anchor"]["psnr_db"] > 60  # untrained anchor = nearest
    assert set(scores) == {"anchor", "nearest", "bicubic"}


def test_loss_on_known_inputs():
    target = torch.rand(2, 3, 8, 8) * 2 - 1
    assert sr_losses(target, target)["loss"] == 0
    shifted = sr_losses(target + 0.1, target, edge_weight=5.0)  # a constant offset has the target's edges
    assert shifted["l1"].item() == pytest.approx(0.1, abs=1e-6)
    assert shifted["edge"].item() == pytest.approx(0.0, abs=1e-6)
    assert shifted["loss"].item() == pytest.approx(0.1, abs=1e-5)
    noisy = target + torch.randn_like(target) * 0.1
    terms = sr_losses(noisy, target, edge_weight=0.5)
    expected_edge = (F.l1_loss(torch.diff(noisy, dim=-1), torch.diff(target, dim=-1))
                     + F.l1_loss(torch.diff(noisy, dim=-2), torch.diff(target, dim=-2))) / 2
    torch.testing.assert_close(terms["loss"], F.l1_loss(noisy, target) + 0.5 * expected_edge)
    assert "edge" not in sr_losses(noisy, target)


def test_pair_store_crops_are_aligned_and_deterministic(tmp_path):
    """Without the VAE the input is the 1x render, so a crop of it is its target crop averaged 2 x 2."""
    build_shapes_world_pairs(tmp_path / "p", None, 3, num_frames=9, size=64, progress=False)
    store = PairStore(tmp_path / "p")
    assert len(store) == 27 and store.scale == 2
    batch = store.batch(5, 0, 6, crop=16, seed=1)
    assert batch["lr"].shape == (6, 3, 16, 16) and batch["hr"].shape == (6, 3, 32, 32)
    assert (F.avg_pool2d(batch["hr"], 2) - batch["lr"]).abs().mean() < 2e-2  # uint8 storage + anti-aliasing
    again = PairStore(tmp_path / "p").batch(5, 0, 6, crop=16, seed=1)
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    assert not torch.equal(store.batch(5, 1, 6, crop=16, seed=1)["lr"], batch["lr"])  # another rank, other crops
    assert store.batch(0, 0, 2, crop=None)["hr"].shape == (2, 3, 128, 128)
    with pytest.raises(ValueError, match="made differently"):
        build_shapes_world_pairs(tmp_path / "p", None, 4, num_frames=9, size=64, progress=False)


def test_vae_pairs_carry_the_decoders_degradation():
    from neodragon.presets import load_video_vae

    vae = load_video_vae("nano").float().eval()
    low, high, centres = shapes_world_pairs(vae, "eval", [0], num_frames=9, size=64)
    render, _, _ = shapes_world_pairs(None, "eval", [0], num_frames=9, size=64)
    assert low.shape == (1, 3, 9, 64, 64) and high.shape == (1, 3, 9, 128, 128) and centres.shape == (1, 9, 2)
    assert low.abs().max() <= 1 and 0 < (low - render).abs().mean() < 0.2


# -- the recipe -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sr-run")
    config = TrainConfig(output_dir=str(folder), max_steps=2, batch_size=2, warmup_steps=1, save_every=2,
                         log_every=1, learning_rate=1e-3)
    metrics = train_sr(config, "nano", "small", **TINY)
    return folder, metrics


def test_one_step_writes_the_model_metrics_and_checkpoint(run):
    folder, metrics = run
    assert [r["step"] for r in read_log(folder)] == [1, 2] and "l1" in read_log(folder)[0]
    assert metrics["size"] == "small" and not metrics["anchor"] and metrics["parameters"] == 22_860
    assert set(metrics["quality"]) == {"sr", "nearest", "bicubic"}
    assert json.loads((folder / "final" / "metrics.json").read_text()) == metrics
    final = QuickSRNet.from_pretrained(folder / "final")
    assert final.dtype == torch.float32 and final.variant_name == "small"
    checkpoint = folder / "checkpoint"
    bundle = bundled_weights("nano")
    dit = "diffusion_transformer_320p_multistep_t2v/diffusion_pytorch_model.safetensors"
    assert (checkpoint / dit).read_bytes() == (bundle / dit).read_bytes()
    config = json.loads((checkpoint / "super_resolution" / "config.json").read_text())
    assert config["num_intermediate_layers"] == 2 and "_name_or_path" not in config
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_resume_continues_from_the_checkpoint(run, tmp_path):
    folder, _ = run
    shutil.copytree(folder, tmp_path / "run")
    shard = tmp_path / "run" / "pairs" / "shard_00000.safetensors"
    made = shard.stat().st_mtime_ns
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=3, batch_size=2, warmup_steps=1, save_every=3,
                         log_every=1, learning_rate=1e-3)
    train_sr(config, "nano", "small", **TINY)
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1, 2, 3]
    assert shard.stat().st_mtime_ns == made  # the pairs are reused, not made again


def test_exported_checkpoint_generates_with_and_without_sr(run):
    folder, _ = run
    pipe = NeodragonPipeline.from_pretrained(folder / "checkpoint")
    pipe.set_progress_bar_config(disable=True)
    stored = load_file(folder / "checkpoint" / "super_resolution" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float16} and pipe.super_resolution is not None
    call = dict(num_frames=9, num_inference_steps=1, video_num_inference_steps=1, output_type="np")
    plain = pipe("a red circle", generator=torch.Generator().manual_seed(0), **call).frames
    upscaled = pipe("a red circle", generator=torch.Generator().manual_seed(0), super_resolution=True,
                    **call).frames
    assert plain.shape == (1, 9, 128, 128, 3) and upscaled.shape == (1, 9, 256, 256, 3)


def test_cli_generate_info_and_batch_with_sr(run, tmp_path):
    folder, _ = run
    model = str(folder / "checkpoint")
    args = ["generate", "a red circle moving to the right", "--model", model, "--num-frames", "9", "--steps", "1"]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "sr.mp4")])
    assert result.exit_code == 0, result.output
    assert imageio.mimread(tmp_path / "sr.mp4")[0].shape == (256, 256, 3) and "256x256" in result.output
    result = runner.invoke(app, [*args, "--no-sr", "-o", str(tmp_path / "plain.mp4")])
    assert result.exit_code == 0, result.output
    assert imageio.mimread(tmp_path / "plain.mp4")[0].shape == (128, 128, 3)

    info = runner.invoke(app, ["info", model, "--json"])
    summary = json.loads(info.output)["super_resolution"]
    assert summary["variant"] == "small" and summary["scale"] == 2 and summary["parameters"] == 22_860
    assert summary["output_size"] == [256, 256]
    assert "QuickSRNet-Small 2x" in " ".join(runner.invoke(app, ["info", model]).output.split())

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    for flag, size, recorded in (([], 256, True), (["--no-sr"], 128, None)):
        out = tmp_path / f"batch{size}"
        result = runner.invoke(app, ["generate", "--prompts-file", str(prompts), "-o", str(out), "--model", model,
                                     "--num-frames", "1", "--steps", "1", *flag])
        assert result.exit_code == 0, result.output
        record = json.loads((out / "manifest.jsonl").read_text())
        assert record["options"].get("sr") == recorded
        assert imageio.mimread(out / record["file"])[0].shape == (size, size, 3)


def test_sr_flag_on_a_model_without_sr_is_one_error_line(tmp_path):
    checkpoint = create_random_checkpoint(reduced_official_preset(), tmp_path / "model")
    shutil.rmtree(checkpoint / "super_resolution")  # as the release's folder: no SR
    args = ["generate", "a red circle", "--model", str(checkpoint), "--num-frames", "1", "--height", "64", "--width",
            "64", "--steps", "1", "-o"]
    result = runner.invoke(app, [*args, str(tmp_path / "a.mp4"), "--sr"])
    assert result.exit_code == 1 and "no super-resolution network" in result.output
    assert not (tmp_path / "a.mp4").exists()
    result = runner.invoke(app, [*args, str(tmp_path / "b.mp4")])  # the default: no SR, no error
    assert result.exit_code == 0 and imageio.mimread(tmp_path / "b.mp4")[0].shape == (64, 64, 3)


def test_cli_rejects_bad_options(tmp_path):
    for extra, message in ((["--size", "huge"], "--size"), (["--degradation", "jpeg"], "--degradation"),
                           (["--crop", "3"], "--crop")):
        result = runner.invoke(app, ["train", "sr", "-o", str(tmp_path / "x"), *extra])
        assert result.exit_code != 0 and message in result.output
    assert not (tmp_path / "x").exists()


# -- the user's own videos --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    for k, frames in enumerate((9, 20)):  # 20 frames: two 9-frame clips, the rest dropped
        base = rng.integers(0, 255, (1, 4, 6, 3)).repeat(8, 1).repeat(8, 2)  # smooth enough for H.264
        video = np.concatenate([np.roll(base, t, axis=2) for t in range(frames)]).astype(np.uint8)
        imageio.mimwrite(folder / f"clip{k}.mp4", list(video), fps=8, macro_block_size=16)
    (folder / "notes.txt").write_text("not a video")
    return folder


def test_video_folder_pairs(video_folder, tmp_path):
    frames = read_video(video_folder / "clip1.mp4")
    assert frames.shape == (20, 32, 48, 3) and frames.dtype == torch.uint8
    clips = video_clips(frames, 9)
    assert clips.shape == (2, 3, 9, 32, 48) and clips.abs().max() <= 1
    assert video_clips(frames[:10], 17).shape == (1, 3, 9, 32, 48)  # shorter than a clip: 1 + 8k frames
    build_folder_pairs(tmp_path / "p", video_folder, None, num_frames=9, degradation="bicubic", progress=False)
    store = PairStore(tmp_path / "p")
    assert len(store) == 27 and store.meta["videos"][0].startswith("clip0.mp4")
    batch = store.batch(0, 0, 4, crop=8)
    assert batch["lr"].shape == (4, 3, 8, 8) and batch["hr"].shape == (4, 3, 16, 16)


def test_recipe_on_a_video_folder(video_folder, tmp_path):
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=1, batch_size=2, warmup_steps=1, save_every=1,
                         log_every=1)
    metrics = train_sr(config, "nano", "small", anchor=True, crop=8, num_frames=9, videos_dir=video_folder,
                       eval_videos_dir=video_folder)
    assert metrics["anchor"] and metrics["training_frames"] == 27
    assert set(metrics["quality"]) == {"sr", "nearest", "bicubic"}
    pairs = PairStore(tmp_path / "run" / "pairs")
    assert pairs.meta["degradation"] == "vae" and pairs.meta["vae"]


def test_two_process_sr_training(tmp_path):
    log = run_two_processes(tmp_path / "ddp", "train", "sr", "--steps", "2", "--batch-size", "2", "--save-every",
                            "2", "--crop", "16", "--num-frames", "9", "--pair-videos", "9", "--eval-videos", "1",
                            "--style", "none")
    assert log[-1]["step"] == 2
    assert len(PairStore(tmp_path / "ddp" / "pairs").meta["shards"]) == 2  # one shard made by each process
    assert (tmp_path / "ddp" / "checkpoint" / "super_resolution" / "config.json").is_file()
