"""One step of each nano trainer, resume, export to a runnable checkpoint, and a 2-process smoke run."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from neodragon.models.mmdit import PyramidMMDiT
from neodragon.models.sentence import SentenceTextEncoder
from neodragon.models.text import TextEncoding
from neodragon.models.vae import AsymmetricCausalVideoVAE
from neodragon.pipelines import NeodragonPipeline
from neodragon.presets import nano_teacher_preset
from neodragon.recipes.nano import (
    CaptionEncodings,
    LatentCache,
    clip_batch,
    encode_latents,
    export_teacher,
    flow_matching_batches,
    grow_depth,
    latent_object_cover,
    object_crop_offset,
    respace_positions,
    start_nearly_deterministic,
    teacher_dit_config,
    train_teacher,
    train_vae,
    variance_preserving_init,
    video_batch,
)
from neodragon.recipes.teacher import (
    TeacherRecipe,
    flow_matching_loss,
    pair_error,
    sample_unit_and_stage,
    step_generator,
    swap_caption_word,
    weighted_mse,
)
from neodragon.recipes.training import TrainConfig, read_log
from neodragon.recipes.vae import VAELossWeights, load_trained_vae, vae_losses
from neodragon.schedulers import PyramidFlowMatchScheduler


def config(path, steps, batch_size=1, save_every=1):
    return TrainConfig(output_dir=str(path), max_steps=steps, batch_size=batch_size, warmup_steps=1,
                       save_every=save_every, log_every=1)


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("vae")
    metrics = train_vae(config(run, 1), num_frames=9, crop=32, eval_videos=2)
    return run, metrics


@pytest.fixture(scope="module")
def latents(vae_run, tmp_path_factory):
    return encode_latents(vae_run[0] / "final", tmp_path_factory.mktemp("latents"), num_videos=6, batch_size=3)


def test_vae_step_writes_final_model_and_statistics(vae_run):
    run, metrics = vae_run
    assert (run / "final" / "diffusion_pytorch_model.safetensors").is_file()
    stats = json.loads((run / "final" / "latent_stats.json").read_text())
    assert stats["image_latent_scale"] > 0 and np.isfinite(metrics["eval_psnr_db"])
    judged = metrics["judge_accuracy"]
    assert judged["real"]["colour"] == 1.0 and 0 <= judged["reconstructed"]["colour"] <= 1
    assert read_log(run)[-1]["step"] == 1


def test_vae_resume_continues_from_checkpoint(vae_run):
    run, _ = vae_run
    train_vae(config(run, 2), num_frames=9, crop=32, eval_videos=1)
    assert [r["step"] for r in read_log(run)] == [1, 2]


def test_variance_preserving_init_keeps_colour_visible():
    """With the default init the no-norm VAE barely depends on its input, and colour is never learnt."""
    torch.manual_seed(0)
    video = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    swapped = video[:, [2, 1, 0]]  # red <-> blue

    def colour_sensitivity(vae):
        with torch.no_grad():
            z, z_swapped = (vae.encode(v).latent_dist.mean for v in (video, swapped))
            latents = torch.randn(2, 8, 2, 4, 4)
            out = vae.decode(latents).sample
        return (z - z_swapped).abs().mean() / z.abs().mean(), (out[0] - out[1]).abs().mean()

    vae = AsymmetricCausalVideoVAE(encoder_out_channels=8, encoder_layers_per_block=[1, 1, 1, 1],
                                   encoder_block_out_channels=[16, 32, 64, 64], encoder_norm_num_groups=0,
                                   decoder_num_features=[48, 32, 24, 24])
    default_encoder, default_decoder = colour_sensitivity(vae)
    variance_preserving_init(vae)
    start_nearly_deterministic(vae)
    encoder, decoder = colour_sensitivity(vae)
    assert encoder > 0.1 and encoder > 10 * default_encoder
    assert decoder > 0.05 and decoder > 10 * default_decoder
    assert torch.allclose(vae.encode(video).latent_dist.std, torch.tensor(math.exp(-5.0)))


def test_training_crops_hold_the_objects():
    coverage = torch.zeros(5, 128, 128)
    coverage[:, 100:110, 4:14] = 1
    for seed in range(5):
        y, x = object_crop_offset(coverage, 48, np.random.default_rng(seed))
        assert 0 <= y <= 80 and 0 <= x <= 80
        assert coverage[:, y : y + 48, x : x + 48].sum() == coverage.sum()  # the whole object is inside
    _, cropped, _ = clip_batch("train", range(8), 9, 128, crop=48)
    assert cropped.shape[-2:] == (48, 48) and all(c.sum() > 0 for c in cropped)


def test_training_clips_take_styles():
    plain, _, plain_captions = clip_batch("train", range(4), 9, 64)
    styled, coverage, captions = clip_batch("train", range(4), 9, 64, styles=("neon", "stripes"))
    again, _, _ = clip_batch("train", range(4), 9, 64, styles=("neon", "stripes"))
    assert torch.equal(styled, again)  # deterministic per index
    assert all(("neon" in c) or ("strip" in c) for c in captions) and not any("neon" in c for c in plain_captions)
    assert all(not torch.equal(a, b) for a, b in zip(plain, styled, strict=True))
    assert coverage.shape == (4, 1, 9, 64, 64)
    with pytest.raises(ValueError, match="'sepia' is not one of"):
        clip_batch("train", range(4), 9, 64, styles=("none", "sepia"))  # caught before any item draws it


def test_decoder_finetune_keeps_the_latent_space(vae_run, tmp_path):
    start = AsymmetricCausalVideoVAE.from_pretrained(vae_run[0] / "final")
    train_vae(config(tmp_path, 1), num_frames=9, crop=32, eval_videos=1, init_from=vae_run[0] / "final",
              freeze_encoder=True)
    tuned = AsymmetricCausalVideoVAE.from_pretrained(tmp_path / "final")
    before, after = start.state_dict(), tuned.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))


def test_latent_cache_is_normalised_and_resumable(latents, vae_run):
    cache = LatentCache(latents)
    assert len(cache) == 6 and cache.latents.shape == (6, 8, 3, 16, 16)
    batch, captions = cache.batch(range(4, 8))
    assert batch.shape[0] == 4 and captions[2] == cache.captions[0]  # indices wrap around
    assert cache.cover.shape == (6, 1, 3, 16, 16) and cache.cover.amax() > 0.5  # every video has an object
    assert torch.equal(cache.object_cover(range(4, 8))[2], cache.cover[0])
    before = sorted(p.stat().st_mtime_ns for p in latents.iterdir())
    encode_latents(vae_run[0] / "final", latents, num_videos=6)  # nothing left to do
    assert sorted(p.stat().st_mtime_ns for p in latents.iterdir()) == before


def test_latent_cache_mixes_folders_and_names_bad_shards(latents, tmp_path):
    single = LatentCache(latents)
    mixed = LatentCache([latents, latents])
    assert len(mixed) == 2 * len(single)
    assert sorted(mixed.captions) == sorted(single.captions * 2)
    assert mixed.captions[: len(single)] != single.captions  # interleaved, not one folder after the other
    assert mixed.captions == LatentCache([latents, latents]).captions  # by a fixed permutation
    (tmp_path / "shard_00000.safetensors").write_bytes(b"not a shard")
    with pytest.raises(ValueError, match="shard_00000.safetensors is not a readable latent shard"):
        LatentCache(tmp_path)
    with pytest.raises(FileNotFoundError, match="encode-latents"):
        LatentCache(tmp_path / "empty")


def test_teacher_step_export_and_generate(vae_run, latents, tmp_path):
    train_teacher(config(tmp_path / "dit", 1, batch_size=2), latents)
    assert read_log(tmp_path / "dit")[-1]["loss"] > 0
    folder = export_teacher(vae_run[0] / "final", tmp_path / "dit" / "final", tmp_path / "export")
    weights = folder / "diffusion_transformer_320p_multistep_t2v" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 10 * 2**20  # fp16
    pipe = NeodragonPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    stats = json.loads((vae_run[0] / "final" / "latent_stats.json").read_text())
    assert pipe.pipeline_config.video_latent_scale == pytest.approx(stats["video_latent_scale"])
    frames = pipe("a red circle moving to the right", num_frames=9, num_inference_steps=1,
                  video_num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="np").frames
    assert frames.shape == (1, 9, 128, 128, 3) and np.isfinite(frames).all()


def test_two_process_training_smoke(latents, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "neodragon", "train", "teacher", "--latents", str(latents), "-o", str(tmp_path / "ddp"),
               "--steps", "2", "--batch-size", "1", "--save-every", "2"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_log(tmp_path / "ddp")[-1]["step"] == 2
    assert (tmp_path / "ddp" / "final" / "diffusion_pytorch_model.safetensors").is_file()


def test_caption_encodings_match_the_text_encoder():
    text = SentenceTextEncoder.from_source("all-MiniLM-L6-v2", 32)
    captions = ["a red circle moving to the right", "a tiny blue cross", "a red circle moving to the right"]
    bank = CaptionEncodings(text, captions, batch_size=2)
    assert len(bank.row) == 3  # two distinct captions and the empty prompt
    asked = ["", "a tiny blue cross", "a red circle moving to the right"]
    cached, direct = bank.encode(asked), text.encode(asked)
    for key in ("tokens", "mask", "pooled"):
        torch.testing.assert_close(getattr(cached, key), getattr(direct, key), atol=1e-5, rtol=1e-5)


def test_flow_matching_batches_stay_on_the_datas_device():
    """On a GPU the cache and the encodings live there; a batch must not make a round trip through the CPU. The
    meta device stands in for the GPU: any copy to the CPU would fail."""

    class MetaEncoder:
        def encode(self, prompts):
            n = len(prompts)
            return TextEncoding(torch.zeros(n, 4, 8, device="meta"), torch.ones(n, 4, dtype=torch.long, device="meta"),
                                torch.zeros(n, 8, device="meta"))

    cache = LatentCache.__new__(LatentCache)
    cache.latents, cache.captions = torch.zeros(6, 8, 3, 16, 16, device="meta"), [f"caption {i % 3}" for i in range(6)]
    cache.cover = torch.zeros(6, 1, 3, 16, 16, device="meta")
    text = CaptionEncodings(MetaEncoder(), cache.captions)
    batch = flow_matching_batches(cache, text, TrainConfig(output_dir="unused", batch_size=4), 0.1, 3,
                                  shape_contrast=True, object_cover=True)(0, 0, 1)
    assert batch["latents"].shape == (4, 8, 3, 16, 16) and batch["cover"].shape == (4, 1, 3, 16, 16)
    assert {batch["latents"].device.type, batch["encoding"].tokens.device.type,
            batch["swapped"].pooled.device.type, batch["cover"].device.type} == {"meta"}


def test_object_weight_emphasises_covered_pixels():
    torch.manual_seed(0)
    vae = AsymmetricCausalVideoVAE(encoder_out_channels=4, encoder_layers_per_block=(1, 1, 1, 1),
                                   encoder_block_out_channels=(8, 8, 8, 8), encoder_norm_num_groups=0,
                                   decoder_num_features=(8, 8, 8, 8))
    video, coverage = torch.zeros(1, 3, 1, 16, 16), torch.zeros(1, 1, 1, 16, 16)
    video[..., :4, :4], coverage[..., :4, :4] = 1, 1  # a bright object: most of the untrained VAE's error
    plain, weighted = (vae_losses(vae, video, VAELossWeights(objects=w), coverage)["l1"] for w in (0.0, 20.0))
    with torch.no_grad():
        error = (vae(video).sample - video).abs().mean(1, keepdim=True)
    share = (error * coverage).sum() / error.sum()  # the object's share of the unweighted error
    expected_ratio = (1 + 20 * share) / (1 + 20 * coverage.mean())
    # the posterior sample differs between the two calls, so compare loosely
    assert expected_ratio > 2
    assert weighted.item() / plain.item() == pytest.approx(expected_ratio.item(), rel=0.2)


def test_vae_training_starts_from_a_nearly_deterministic_posterior():
    vae = AsymmetricCausalVideoVAE(encoder_out_channels=4, encoder_layers_per_block=(1, 1, 1, 1),
                                   encoder_block_out_channels=(8, 8, 8, 8), encoder_norm_num_groups=0,
                                   decoder_num_features=(8, 8, 8, 8))
    x = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    before = vae.encode(x).latent_dist
    start_nearly_deterministic(vae)
    after = vae.encode(x).latent_dist
    assert before.std.mean() > 0.5
    torch.testing.assert_close(after.std, torch.full_like(after.std, math.exp(-5.0)), rtol=0.2, atol=0)
    torch.testing.assert_close(after.mean, before.mean)  # only the log-variance half changes


def test_bundled_vae_encodes_latents_with_the_bundles_statistics(tmp_path):
    from neodragon.presets import bundled_weights

    bundle = bundled_weights("nano")
    config = json.loads((bundle / "pipeline_config.json").read_text())
    vae, stats = load_trained_vae("nano")
    assert stats == {k: config[k] for k in stats} and len(stats) == 4
    assert load_trained_vae(bundle)[1] == stats  # the checkpoint folder itself
    replace(nano_teacher_preset().pipeline, **stats).save(tmp_path)  # what export-teacher writes
    assert json.loads((tmp_path / "pipeline_config.json").read_text()) == config
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_trained_vae(tmp_path / "missing")
    shard = encode_latents("nano", tmp_path / "latents", num_videos=2, batch_size=2) / "shard_00000.safetensors"
    latents = load_file(str(shard))["latents"]
    videos, _ = video_batch("train", range(2), 17, 128)
    with torch.no_grad():
        raw = vae.float().encode(videos).latent_dist.mean
    first = (raw[:, :, :1] - stats["image_latent_shift"]) * stats["image_latent_scale"]
    torch.testing.assert_close(latents[:, :, :1], first, rtol=1e-4, atol=1e-4)


def test_train_cli_rejects_unknown_styles(tmp_path):
    from typer.testing import CliRunner

    from neodragon.recipes.cli import app

    result = CliRunner().invoke(app, ["encode-latents", "--vae", str(tmp_path), "-o", str(tmp_path / "out"),
                                      "--style", "neon", "--style", "sepia"])
    assert result.exit_code == 2 and "unknown style sepia" in result.output
    assert not (tmp_path / "out").exists()  # rejected before anything is written


def test_teacher_init_from_loads_a_trained_dit(latents, tmp_path):
    torch.manual_seed(123)
    PyramidMMDiT(**nano_teacher_preset().dit).to(torch.float16).save_pretrained(tmp_path / "init")  # as bundled
    frozen_lr = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=1, batch_size=2, warmup_steps=1,
                            learning_rate=0.0)
    train_teacher(frozen_lr, latents, init_from=tmp_path / "init")
    start = PyramidMMDiT.from_pretrained(tmp_path / "init").float().state_dict()
    end = PyramidMMDiT.from_pretrained(tmp_path / "run" / "final").state_dict()
    assert all(end[k].dtype == torch.float32 and torch.equal(end[k], start[k]) for k in start)

    for name, size in (("narrower", {"num_attention_heads": 2, "caption_projection_dim": 64}),
                       ("deeper", {"num_layers": 7})):  # a DiT can grow deeper, not shallower or wider
        PyramidMMDiT(**dict(nano_teacher_preset().dit, **size)).save_pretrained(tmp_path / name)
        with pytest.raises(ValueError, match="not a nano teacher DiT of this size"):
            train_teacher(config(tmp_path / "bad", 1), latents, init_from=tmp_path / name)


def test_teacher_with_weight_average_writes_the_average_and_the_last_weights(latents, tmp_path):
    torch.manual_seed(5)
    PyramidMMDiT(**nano_teacher_preset().dit).save_pretrained(tmp_path / "init")
    run = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=2, warmup_steps=1, save_every=1,
                      ema_decay=0.999)
    train_teacher(run, latents, init_from=tmp_path / "init")
    start = PyramidMMDiT.from_pretrained(tmp_path / "init").state_dict()
    average = PyramidMMDiT.from_pretrained(tmp_path / "run" / "final").state_dict()
    last = PyramidMMDiT.from_pretrained(tmp_path / "run" / "final-raw").state_dict()
    moved = [k for k in start if not torch.equal(start[k], last[k])]
    assert moved
    # the EMA's warm-up decay is 0 at its first update and 2/11 at its second: a mix of both steps' weights
    assert all(not torch.equal(average[k], last[k]) for k in moved)
    assert (tmp_path / "run" / "checkpoints" / "step_2" / "ema.safetensors").is_file()


def test_grow_depth_keeps_the_function_and_trains_the_new_blocks(latents, tmp_path):
    torch.manual_seed(0)
    dit = PyramidMMDiT(**dict(nano_teacher_preset().dit, num_layers=3)).eval()
    inputs = ([[torch.randn(2, 8, 1, 16, 16)]], torch.randn(2, 32, 384), torch.ones(2, 32, dtype=torch.long),
              torch.randn(2, 384), torch.tensor([500.0, 300.0]))
    with torch.no_grad():
        before = dit(*inputs)[0]
    old = list(dit.transformer_blocks)
    grown = grow_depth(dit, 6)
    is_old = [any(block is o for o in old) for block in grown.transformer_blocks]
    assert is_old == [True, False, False, True, False, True]  # spread over the depth; the text-only block stays last
    assert grown.config.num_layers == 6 and grown.transformer_blocks[-1].context_pre_only
    with torch.no_grad():
        torch.testing.assert_close(grown(*inputs)[0], before, rtol=0, atol=0)
    grown(*inputs)[0].square().mean().backward()
    new = [block for block, was_old in zip(grown.transformer_blocks, is_old, strict=True) if not was_old]
    assert all(block.norm1.linear.weight.grad.abs().sum() > 0 for block in new)  # the gates learn first
    with pytest.raises(ValueError, match="at least 2 layers"):
        grow_depth(PyramidMMDiT(**dict(nano_teacher_preset().dit, num_layers=1)), 3)

    PyramidMMDiT(**dict(nano_teacher_preset().dit, num_layers=2)).save_pretrained(tmp_path / "shallow")
    train_teacher(config(tmp_path / "run", 1), latents, init_from=tmp_path / "shallow",
                  dit_config=teacher_dit_config(layers=3))
    assert PyramidMMDiT.from_pretrained(tmp_path / "run" / "final").config.num_layers == 3


def test_train_cli_rejects_a_non_positive_time_budget(tmp_path):
    from typer.testing import CliRunner

    from neodragon.recipes.cli import app

    result = CliRunner().invoke(app, ["teacher", "--latents", str(tmp_path), "-o", str(tmp_path / "run"),
                                      "--max-minutes", "0"])
    assert result.exit_code == 2 and "--max-minutes must be positive" in result.output
    assert not (tmp_path / "run").exists()


def test_swap_caption_word_changes_one_objects_shape_or_colour():
    assert swap_caption_word("a small yellow triangle rests") == "a small yellow star rests"
    assert swap_caption_word("a huge yellow rhombus moving right", "colour") == "a huge green rhombus moving right"
    assert swap_caption_word("a big red plus sign moving up") == "a big red ring moving up"  # two-word synonym
    assert swap_caption_word("a red circle to the left of a blue star") is None  # two objects
    assert swap_caption_word("") is None


def test_shape_contrast_adds_the_hinge_on_swapped_samples_only():
    torch.manual_seed(0)
    dit = PyramidMMDiT(**nano_teacher_preset().dit)

    latents = torch.randn(3, 8, 3, 16, 16)
    tokens, mask, pooled = torch.randn(3, 5, 384), torch.ones(3, 5, dtype=torch.long), torch.randn(3, 384)
    same = type("Enc", (), {"tokens": tokens, "mask": mask, "pooled": pooled})()

    def loss(recipe, has_swap):
        return flow_matching_loss(dit, PyramidFlowMatchScheduler(), latents, tokens, mask, pooled, 1, 2,
                                  torch.Generator().manual_seed(3), recipe, same, has_swap)

    plain = loss(TeacherRecipe(), torch.ones(3, dtype=torch.bool))
    none = loss(TeacherRecipe(shape_contrast=1.0), torch.zeros(3, dtype=torch.bool))
    assert "contrast" not in plain and none["contrast"] == 0 and torch.equal(none["loss"], plain["loss"])
    # A "swapped" caption identical to the true one fits exactly as well, so the hinge is margin * error.
    both = loss(TeacherRecipe(shape_contrast=2.0, contrast_margin=0.1), torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(both["contrast"], 0.1 * plain["loss"])
    torch.testing.assert_close(both["loss"], 1.2 * plain["loss"])


def test_teacher_step_with_shape_contrast_logs_the_hinge(latents, tmp_path):
    train_teacher(config(tmp_path / "dit", 1, batch_size=6), latents, TeacherRecipe(shape_contrast=0.5))
    record = read_log(tmp_path / "dit")[-1]
    assert record["contrast"] >= 0 and record["loss"] > 0


def test_teacher_size_options_train_export_and_load(vae_run, latents, tmp_path):
    from typer.testing import CliRunner

    from neodragon.recipes.cli import app

    args = ["teacher", "--latents", str(latents), "-o", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2",
            "--layers", "2", "--heads", "2", "--patch-size", "1", "--sample-size", "32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    dit = PyramidMMDiT.from_pretrained(tmp_path / "run" / "final")
    assert (dit.config.num_layers, dit.config.num_attention_heads, dit.config.caption_projection_dim,
            dit.config.patch_size, dit.config.sample_size) == (2, 2, 64, 1, 32)
    assert sum(p.numel() for p in dit.parameters()) < sum(
        p.numel() for p in PyramidMMDiT(**nano_teacher_preset().dit).parameters())
    pipe = NeodragonPipeline.from_pretrained(export_teacher(vae_run[0] / "final", tmp_path / "run" / "final",
                                                            tmp_path / "export"), torch_dtype=torch.float32)
    assert pipe.transformer.config.num_layers == 2
    pipe.set_progress_bar_config(disable=True)
    latent = pipe("a red circle", num_frames=9, num_inference_steps=1, video_num_inference_steps=1,
                  generator=torch.Generator().manual_seed(0), output_type="latent").frames
    assert latent.shape == (1, 8, 2, 16, 16) and torch.isfinite(latent).all()  # a token per latent pixel samples
    with pytest.raises(ValueError, match="give the --heads and --patch-size it was trained with"):  # another size
        train_teacher(config(tmp_path / "bad", 1), latents, init_from=tmp_path / "run" / "final")
    train_teacher(config(tmp_path / "respaced", 1), latents, init_from=tmp_path / "run" / "final",
                  dit_config=teacher_dit_config(2, 2, 1, sample_size=16))  # another position table only: allowed
    assert PyramidMMDiT.from_pretrained(tmp_path / "respaced" / "final").config.sample_size == 16
    continued = tmp_path / "continued"  # the CLI keeps --init-from's table unless told otherwise
    result = CliRunner().invoke(app, [*args[:4], str(continued), *args[5:-2],
                                      "--init-from", str(tmp_path / "run" / "final")])
    assert result.exit_code == 0, result.output
    assert PyramidMMDiT.from_pretrained(continued / "final").config.sample_size == 32
    result = CliRunner().invoke(app, [*args[:5], "--layers", "0"])
    assert result.exit_code == 2 and "layers must be >= 1" in result.output
    result = CliRunner().invoke(app, [*args[:5], "--patch-size", "4"])
    assert result.exit_code == 2 and "patch_size must be 1 or 2" in result.output
    result = CliRunner().invoke(app, [*args[:5], "--sample-size", "1"])
    assert result.exit_code == 2 and "sample_size must be at least the patch size" in result.output


def test_respace_positions_rebuilds_only_the_position_table():
    dit = PyramidMMDiT(**{**nano_teacher_preset().dit, "num_layers": 2})
    respaced = respace_positions(dit, 64)
    fresh = PyramidMMDiT(**{**nano_teacher_preset().dit, "num_layers": 2, "sample_size": 64})
    assert respaced.config.sample_size == 64
    assert torch.equal(respaced.pos_embed.pos_embed, fresh.pos_embed.pos_embed)
    assert not torch.allclose(respaced.pos_embed.pos_embed, dit.pos_embed.pos_embed)
    trained, kept = dict(dit.named_parameters()), dict(respaced.named_parameters())
    assert trained.keys() == kept.keys() and all(torch.equal(trained[k], kept[k]) for k in trained)


def test_latent_object_cover_takes_the_largest_coverage_each_latent_pixel_encodes():
    coverage = torch.zeros(1, 1, 17, 16, 16)
    coverage[0, 0, 0, 15, 0] = 1.0  # frame 0 is latent frame 0 alone
    coverage[0, 0, 5, 3, 9] = 0.5  # frames 1-8 make latent frame 1
    coverage[0, 0, 6, 3, 9] = 0.25
    cover = latent_object_cover(coverage, (3, 2, 2))
    expected = torch.zeros(1, 1, 3, 2, 2)
    expected[0, 0, 0, 1, 0], expected[0, 0, 1, 0, 1] = 1.0, 0.5
    assert cover.dtype == torch.float16 and torch.equal(cover.float(), expected)


def test_weighted_mse_weighs_the_covered_pixels():
    prediction, target = torch.zeros(1, 1, 1, 2, 2), torch.zeros(1, 1, 1, 2, 2)
    target[..., 0, 0] = 1.0  # the only error sits on the object
    cover = torch.zeros(1, 1, 3, 2, 2)
    cover[0, 0, 1, 0, 0] = 1.0  # the object, in latent frame 1
    assert weighted_mse(prediction, target, 0.0, None, unit=1) == pytest.approx(1 / 4)
    # weights 4, 1, 1, 1: (4 * 1 / 4) / mean weight 7/4
    assert weighted_mse(prediction, target, 3.0, cover, unit=1) == pytest.approx(4 / 7)
    assert weighted_mse(prediction, target, 3.0, cover, unit=0) == pytest.approx(1 / 4)  # no object in frame 0
    # a lower stage max-pools the cover: one latent pixel, covered, so every error counts alike
    assert weighted_mse(prediction[..., :1, :1], target[..., :1, :1], 3.0, cover, unit=1) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="object cover"):
        weighted_mse(prediction, target, 3.0, None, unit=1)


def test_teacher_trains_with_object_weight_and_names_coverless_latents(latents, tmp_path):
    train_teacher(config(tmp_path / "run", 1, batch_size=2), latents, TeacherRecipe(object_weight=4.0))
    assert read_log(tmp_path / "run")[-1]["loss"] > 0
    assert json.loads((tmp_path / "run" / "final" / "recipe.json").read_text())["object_weight"] == 4.0
    shard = load_file(str(latents / "shard_00000.safetensors"))
    old = tmp_path / "old"
    old.mkdir()
    save_file({"latents": shard["latents"]}, str(old / "shard_00000.safetensors"),
              metadata={"captions": json.dumps(LatentCache(latents).captions)})  # written before covers were stored
    assert LatentCache(old).cover is None
    with pytest.raises(ValueError, match="re-encode"):
        train_teacher(config(tmp_path / "old-run", 1, batch_size=2), old, TeacherRecipe(object_weight=4.0))
    assert not (tmp_path / "old-run").exists()  # refused before anything is written


def test_unit_and_stage_weights_skew_the_draw():
    for step in range(20):  # no weights: the draws of runs made before weights existed, so they resume alike
        generator = step_generator(0, step, rank=-1)
        old = (int(torch.randint(3, (1,), generator=generator)), int(torch.randint(3, (1,), generator=generator)))
        assert sample_unit_and_stage(3, 3, 0, step) == old
    assert {sample_unit_and_stage(3, 3, 0, s, (1, 0, 0), (0, 0, 5)) for s in range(50)} == {(0, 2)}
    draws = [sample_unit_and_stage(3, 3, 0, s, (8, 1, 1), None) for s in range(400)]
    assert 0.7 < sum(unit == 0 for unit, _ in draws) / 400 < 0.9
    assert {stage for _, stage in draws} == {0, 1, 2}
    with pytest.raises(ValueError, match="one number per unit"):
        sample_unit_and_stage(3, 3, 0, 0, (1, 1), None)
    with pytest.raises(ValueError, match="non-negative"):
        TeacherRecipe(stage_weights=(1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="positive sum"):
        TeacherRecipe(unit_weights=(0.0, 0.0, 0.0))


def test_teacher_trains_on_the_weighted_unit_and_stage(latents, tmp_path):
    recipe = TeacherRecipe(unit_weights=(1.0, 0.0, 0.0), stage_weights=(0.0, 0.0, 1.0))
    train_teacher(config(tmp_path / "run", 3, batch_size=2), latents, recipe)
    assert {(row["unit"], row["stage"]) for row in read_log(tmp_path / "run")} == {(0.0, 2.0)}
    assert json.loads((tmp_path / "run" / "final" / "recipe.json").read_text())["stage_weights"] == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match=r"one number per unit \(3\), got 2"):
        train_teacher(config(tmp_path / "bad", 1, batch_size=2), latents, TeacherRecipe(unit_weights=(2.0, 1.0)))
    assert not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def twin_latents(vae_run, tmp_path_factory):
    from typer.testing import CliRunner

    from neodragon.recipes.cli import app

    out = tmp_path_factory.mktemp("twins")
    result = CliRunner().invoke(app, ["encode-latents", "--vae", str(vae_run[0] / "final"), "-o", str(out),
                                      "--num-videos", "6", "--batch-size", "4", "--twins"])
    assert result.exit_code == 0, result.output
    return out


def test_latent_cache_links_each_video_to_its_shape_twin(twin_latents, latents):
    from neodragon.data.captions import COLOUR_SHAPE

    cache = LatentCache(twin_latents)
    originals = LatentCache(latents)
    assert torch.equal(cache.latents[:6], originals.latents) and cache.captions[:6] == originals.captions
    linked = (cache.twin >= 0).nonzero().flatten().tolist()
    assert linked and len(cache) == 6 + len(linked) // 2
    for row in linked:
        twin = int(cache.twin[row])
        assert int(cache.twin[twin]) == row and twin != row
        # the two captions differ only in the shape word, the two latents only where the object is
        assert COLOUR_SHAPE.sub("X", cache.captions[row]).replace("X", "") == COLOUR_SHAPE.sub(
            "X", cache.captions[twin]).replace("X", "") and cache.captions[row] != cache.captions[twin]
        assert not torch.equal(cache.latents[row], cache.latents[twin])
    # mixing folders permutes the rows; the links follow them
    mixed = LatentCache([latents, twin_latents])
    for row in (mixed.twin >= 0).nonzero().flatten().tolist():
        twin = int(mixed.twin[row])
        assert int(mixed.twin[twin]) == row and swap_caption_word(mixed.captions[row]) is not None
    assert (mixed.twin >= 0).sum() == len(linked)


def test_twins_share_their_originals_draws():
    torch.manual_seed(0)
    dit = PyramidMMDiT(**nano_teacher_preset().dit)
    latents = torch.randn(3, 8, 3, 16, 16)
    tokens, mask, pooled = torch.randn(3, 5, 384), torch.ones(3, 5, dtype=torch.long), torch.randn(3, 384)

    def loss(latents, tokens, mask, pooled, recipe, twin_source=None):
        return flow_matching_loss(dit, PyramidFlowMatchScheduler(), latents, tokens, mask, pooled, 2, 1,
                                  torch.Generator().manual_seed(3), recipe, twin_source=twin_source)

    plain = loss(latents, tokens, mask, pooled, TeacherRecipe())
    # "twins" identical to their originals get the same noise, timestep and history: the same loss, no pair error
    source = torch.tensor([2, 0, 1])
    doubled = loss(torch.cat([latents, latents[source]]), *(torch.cat([x, x[source]]) for x in (tokens, mask, pooled)),
                   TeacherRecipe(pair_weight=1.0), source)
    torch.testing.assert_close(doubled["loss"], plain["loss"])
    assert doubled["pair"] == 0
    # a real twin (the object moved in one frame) makes a pair error that counts with pair_weight
    twin = latents[:1].clone()
    twin[:, :, :, 4:8, 4:8] += 1.0
    one = [torch.cat([x, x[:1]]) for x in (tokens, mask, pooled)]
    weighted = [loss(torch.cat([latents, twin]), *one, TeacherRecipe(pair_weight=w), torch.tensor([0]))
                for w in (0.0, 1.0, 2.0)]
    assert weighted[1]["pair"] > 0 and weighted[1]["pairs"] == 1 and "pair" not in weighted[0]
    assert weighted[1]["loss"] > weighted[0]["loss"]
    torch.testing.assert_close(weighted[2]["loss"] - weighted[1]["loss"], weighted[1]["loss"] - weighted[0]["loss"])
    below = loss(torch.cat([latents, twin]), *one, TeacherRecipe(pair_weight=1.0, pair_max_stage=0), torch.tensor([0]))
    assert below["pair"] == weighted[1]["pair"] and torch.equal(below["loss"], weighted[0]["loss"])  # stage 1 > 0


def test_pair_error_is_one_for_a_word_blind_model_and_zero_for_a_perfect_one():
    target = torch.randn(4, 2, 1, 3, 3)  # samples 2, 3 are the twins of samples 1, 0
    source = torch.tensor([1, 0])
    blind = target.clone()
    blind[2:] = blind[source]  # the twins drawn exactly as their originals
    difference = target[:2][source] - target[2:]
    mse, relative = pair_error(blind, target, source)
    assert relative == pytest.approx(1.0) and mse == pytest.approx(float(difference.square().mean()))
    assert pair_error(target, target, source) == (0, 0)
    assert pair_error(target + 0.5, target, source)[1] == pytest.approx(0.0, abs=1e-6)  # a shared offset cancels
    assert pair_error(target, target, torch.tensor([], dtype=torch.int64)) == (0, 0)  # a batch without twins


def test_teacher_trains_with_pair_weight_and_needs_twins(twin_latents, latents, tmp_path):
    from typer.testing import CliRunner

    from neodragon.recipes.cli import app

    result = CliRunner().invoke(app, ["teacher", "--latents", str(latents), "--latents", str(twin_latents), "-o",
                                      str(tmp_path / "run"), "--steps", "1", "--batch-size", "6", "--pair-weight", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "final" / "recipe.json").read_text())["pair_weight"] == 1.0
    record = read_log(tmp_path / "run")[-1]
    assert record["pair"] > 0 and record["pairs"] > 0 and record["loss"] > 0
    with pytest.raises(ValueError, match="--twins"):
        train_teacher(config(tmp_path / "none", 1, batch_size=2), latents, TeacherRecipe(pair_weight=1.0))
    assert not (tmp_path / "none").exists()
