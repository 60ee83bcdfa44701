"""The nano teacher's recipes: a step of each trainer, resume, the latent cache, export to a runnable checkpoint, a
2-process smoke run, and runs that repeat exactly from their seed in fresh processes."""

import inspect
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import SUBPROCESS_ENV, run_two_processes
from safetensors.torch import load_file

from neodragon.models.mmdit import PyramidMMDiT
from neodragon.models.sentence import SentenceTextEncoder
from neodragon.models.text import TextEncoding
from neodragon.models.vae import LATENT_STATISTICS, AsymmetricCausalVideoVAE
from neodragon.pipelines import NeodragonPipeline
from neodragon.pipelines.neodragon import SUBFOLDERS
from neodragon.presets import bundled_weights, load_video_vae, nano_teacher_preset
from neodragon.recipes.teacher import export_teacher, grow_depth, respace_positions, teacher_dit_config, train_teacher
from neodragon.recipes.vae import train_vae
from neodragon.schedulers import PyramidFlowMatchScheduler
from neodragon.training.clips import clip_batch, object_crop_offset, video_batch
from neodragon.training.flow_matching import (
    FlowMatchingConfig,
    batch_flow_matching_loss,
    flow_matching_batches,
    flow_matching_loss,
    sample_unit_and_stage,
    step_generator,
)
from neodragon.training.latents import CaptionEncodings, LatentCache, encode_latents
from neodragon.training.trainer import TrainConfig, read_log
from neodragon.training.vae import (
    VAELossWeights,
    start_nearly_deterministic,
    vae_losses,
    variance_preserving_init,
)

WEIGHTS = "diffusion_pytorch_model.safetensors"
# Runs in fresh processes, two at a time: one thread each, so that the pair shares the CPUs instead of fighting.
VAE_ARGS = ["--steps", "2", "--batch-size", "1", "--crop", "32", "--num-frames", "9", "--save-every", "2",
            "--eval-videos", "1"]


def config(path, steps, batch_size=1, save_every=1):
    return TrainConfig(output_dir=str(path), max_steps=steps, batch_size=batch_size, warmup_steps=1,
                       save_every=save_every, log_every=1)


def run_in_fresh_processes(*commands, timeout=300):
    """Run ``python -m neodragon <command>`` for each command at once, each in its own new process."""
    with ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in commands]  # a full pipe would stall
        processes = [subprocess.Popen([sys.executable, "-m", "neodragon", *command], env=SUBPROCESS_ENV,
                                      stdout=subprocess.DEVNULL, stderr=log)
                     for command, log in zip(commands, logs, strict=True)]
        try:
            for process, log in zip(processes, logs, strict=True):
                process.wait(timeout=timeout)
                log.seek(0)
                assert process.returncode == 0, log.read()[-3000:]
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()


def assert_same_run(a, b):
    """The same logged losses (not the wall time) and the same final weights, bit for bit."""
    logs = [[{k: v for k, v in record.items() if k != "elapsed_s"} for record in read_log(run)] for run in (a, b)]
    assert logs[0] and logs[0] == logs[1]
    weights = [load_file(str(run / "final" / WEIGHTS)) for run in (a, b)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def cli(*args):
    from typer.testing import CliRunner

    from neodragon.cli.train import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def vae_runs(tmp_path_factory):
    """Two `train vae` runs of the same seed, each in a fresh process. The first is the VAE the other tests use."""
    runs = [tmp_path_factory.mktemp("vae"), tmp_path_factory.mktemp("vae-again")]
    run_in_fresh_processes(*(["train", "vae", "-o", str(run), *VAE_ARGS] for run in runs))
    return runs


@pytest.fixture(scope="module")
def vae_run(vae_runs):
    return vae_runs[0]


@pytest.fixture(scope="module")
def latents(vae_run, tmp_path_factory):
    return encode_latents(load_video_vae(vae_run / "final"), tmp_path_factory.mktemp("latents"), num_videos=6,
                          batch_size=3)


@pytest.fixture(scope="module")
def teacher_runs(latents, tmp_path_factory):
    """Two `train_teacher` runs of the same seed after different global random draws, as two fresh processes start
    from. (A pair of fresh processes, as for the VAE, took about 10 s more on 2 CPUs: the imports of the stack.)"""
    runs = [tmp_path_factory.mktemp("dit"), tmp_path_factory.mktemp("dit-again")]
    for scramble, run in enumerate(runs, start=1):
        torch.manual_seed(scramble)
        np.random.seed(scramble)
        random.seed(scramble)
        train_teacher(config(run, 2, save_every=2), latents)
    return runs


@pytest.fixture(scope="module")
def exported(vae_run, teacher_runs, tmp_path_factory):
    return export_teacher(vae_run / "final", teacher_runs[0] / "final", tmp_path_factory.mktemp("export"))


# -- the VAE ----------------------------------------------------------------------------------------------------


def test_vae_step_writes_final_model_with_its_latent_statistics(vae_run):
    final = vae_run / "final"
    assert (final / WEIGHTS).is_file()
    metrics = json.loads((final / "metrics.json").read_text())
    stats = AsymmetricCausalVideoVAE.from_pretrained(final).latent_statistics()
    defaults = reference_latent_statistics()
    assert stats == {k: metrics[k] for k in LATENT_STATISTICS} and all(stats[k] != defaults[k] for k in stats)
    assert stats["image_latent_scale"] > 0 and stats["video_latent_scale"] > 0 and np.isfinite(metrics["eval_psnr_db"])
    judged = metrics["judge_accuracy"]
    assert judged["real"]["colour"] == 1.0 and 0 <= judged["reconstructed"]["colour"] <= 1
    assert read_log(vae_run)[-1]["step"] == 2
    assert not (vae_run / "final" / "latent_stats.json").exists()  # the statistics live in the VAE's config


def test_vae_training_repeats_exactly_in_fresh_processes(vae_runs):
    assert_same_run(*vae_runs)


def test_vae_resume_continues_from_checkpoint(vae_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(vae_run, run)  # the shared run stays as it is
    train_vae(config(run, 3), num_frames=9, crop=32, eval_videos=1)
    assert [r["step"] for r in read_log(run)] == [2, 3]


def test_decoder_finetune_keeps_the_latent_space(vae_run, tmp_path):
    start = AsymmetricCausalVideoVAE.from_pretrained(vae_run / "final")
    train_vae(config(tmp_path, 1), num_frames=9, crop=32, eval_videos=1, init_from=vae_run / "final",
              freeze_encoder=True)
    tuned = AsymmetricCausalVideoVAE.from_pretrained(tmp_path / "final")
    before, after = start.state_dict(), tuned.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))


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


def reference_latent_statistics():
    """The VAE config's defaults: the reference model's constants."""
    parameters = inspect.signature(AsymmetricCausalVideoVAE.__init__).parameters
    return {key: parameters[key].default for key in LATENT_STATISTICS}


def tiny_vae():
    return AsymmetricCausalVideoVAE(encoder_out_channels=4, encoder_layers_per_block=(1, 1, 1, 1),
                                    encoder_block_out_channels=(8, 8, 8, 8), encoder_norm_num_groups=0,
                                    decoder_num_features=(8, 8, 8, 8))


def test_vae_training_starts_from_a_nearly_deterministic_posterior():
    vae = tiny_vae()
    x = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    before = vae.encode(x).latent_dist
    start_nearly_deterministic(vae)
    after = vae.encode(x).latent_dist
    assert before.std.mean() > 0.5
    torch.testing.assert_close(after.std, torch.full_like(after.std, math.exp(-5.0)), rtol=0.2, atol=0)
    torch.testing.assert_close(after.mean, before.mean)  # only the log-variance half changes


def test_vae_object_weight_emphasises_covered_pixels():
    torch.manual_seed(0)
    vae = tiny_vae()
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


# -- training clips ---------------------------------------------------------------------------------------------


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


# -- the latent cache -------------------------------------------------------------------------------------------


def test_latent_cache_is_normalised_and_resumable(latents, vae_run):
    cache = LatentCache(latents)
    assert len(cache) == 6 and cache.latents.shape == (6, 8, 3, 16, 16)
    batch, captions = cache.batch(range(4, 8))
    assert batch.shape[0] == 4 and captions[2] == cache.captions[0]  # indices wrap around
    assert torch.equal(batch[2], cache.latents[0])
    assert cache.latents.abs().mean() > 0.1  # normalised: no longer at the raw latents' scale of about 0.01
    before = sorted(p.stat().st_mtime_ns for p in latents.iterdir())
    encode_latents(load_video_vae(vae_run / "final"), latents, num_videos=6)  # nothing left to do
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


def test_bundled_vae_encodes_latents_with_the_bundles_statistics(tmp_path):
    bundle = bundled_weights("nano")
    vae_config = json.loads((bundle / SUBFOLDERS["vae"] / "config.json").read_text())
    vae = load_video_vae("nano")
    stats = vae.latent_statistics()
    assert stats == {k: vae_config[k] for k in LATENT_STATISTICS}
    assert stats != reference_latent_statistics()  # the trained values
    assert load_video_vae(bundle).latent_statistics() == stats  # the checkpoint folder itself
    pipeline_config = json.loads((bundle / "pipeline_config.json").read_text())
    assert not set(LATENT_STATISTICS) & set(pipeline_config)  # the VAE's config alone holds them
    # what export-teacher writes, then export-hybrid --keep-default-mode (the bundled first-frame generator)
    nano_teacher_preset().pipeline.with_latent_first_frame(20, 4.0, hybrid_default=False).save(tmp_path)
    assert json.loads((tmp_path / "pipeline_config.json").read_text()) == pipeline_config
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_video_vae(tmp_path / "missing")
    shard = encode_latents(vae, tmp_path / "latents", num_videos=2, batch_size=2) / "shard_00000.safetensors"
    latents = load_file(str(shard))["latents"]
    videos, _ = video_batch("train", range(2), 17, 128)
    with torch.no_grad():
        raw = vae.float().encode(videos).latent_dist.mean
    first = (raw[:, :, :1] - stats["image_latent_shift"]) * stats["image_latent_scale"]
    rest = (raw[:, :, 1:] - stats["video_latent_shift"]) * stats["video_latent_scale"]
    torch.testing.assert_close(latents, torch.cat([first, rest], dim=2), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(vae.denormalize_latents(latents), raw, rtol=1e-4, atol=1e-5)


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

    class Encoder:
        def __init__(self, device):
            self.device = device

        def encode(self, prompts):
            n, device = len(prompts), self.device
            return TextEncoding(torch.zeros(n, 4, 8, device=device),
                                torch.ones(n, 4, dtype=torch.long, device=device), torch.zeros(n, 8, device=device))

    def batch(device, to=None):
        cache = LatentCache.__new__(LatentCache)
        cache.latents = torch.zeros(6, 8, 3, 16, 16, device=device)
        cache.captions = [f"caption {i % 3}" for i in range(6)]
        text = CaptionEncodings(Encoder(device), cache.captions)
        return flow_matching_batches(cache, text, TrainConfig(output_dir="unused", batch_size=4),
                                     FlowMatchingConfig(), 3, device=to)(0, 0, 1)

    on_meta = batch("meta")
    assert on_meta["latents"].shape == (4, 8, 3, 16, 16) and on_meta["encoding"].tokens.shape == (4, 4, 8)
    assert {on_meta["latents"].device.type, on_meta["encoding"].tokens.device.type,
            on_meta["encoding"].mask.device.type, on_meta["encoding"].pooled.device.type} == {"meta"}
    moved = batch("cpu", to="meta")  # an explicit device moves the batch there
    assert {moved["latents"].device.type, moved["encoding"].pooled.device.type} == {"meta"}
    again = batch("cpu")  # a pure function of (step, rank)
    assert (again["unit"], again["stage"]) == (moved["unit"], moved["stage"])


# -- the teacher DiT --------------------------------------------------------------------------------------------


def test_teacher_training_repeats_exactly_from_its_seed(teacher_runs):
    assert_same_run(*teacher_runs)
    assert read_log(teacher_runs[0])[-1]["loss"] > 0
    assert json.loads((teacher_runs[0] / "final" / "objective.json").read_text()) == json.loads(
        json.dumps(asdict(FlowMatchingConfig())))


def test_teacher_step_export_and_generate(vae_run, exported):
    weights = exported / SUBFOLDERS["monolithic", "transformer"] / WEIGHTS
    assert weights.stat().st_size < 10 * 2**20  # fp16
    pipe = NeodragonPipeline.from_pretrained(exported, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    # the latent space the DiT was trained in: the trained VAE's statistics travel in its config
    assert pipe.vae.latent_statistics() == pytest.approx(load_video_vae(vae_run / "final").latent_statistics())
    frames = pipe("a red circle moving to the right", num_frames=9, num_inference_steps=1,
                  video_num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="np").frames
    assert frames.shape == (1, 9, 128, 128, 3) and np.isfinite(frames).all()


def test_exported_and_bundled_configs_name_no_machine_folder(exported, vae_run, teacher_runs, tmp_path):
    # a plain save after from_pretrained records the folder the weights came from
    PyramidMMDiT.from_pretrained(teacher_runs[0] / "final").save_pretrained(tmp_path)
    assert "_name_or_path" in json.loads((tmp_path / "config.json").read_text())
    configs = sorted(exported.rglob("config.json"))
    assert {p.parent.name for p in configs} >= {SUBFOLDERS["vae"], SUBFOLDERS["monolithic", "transformer"]}
    assert not [p for p in configs if "_name_or_path" in json.loads(p.read_text())]
    sources = [str(vae_run), str(teacher_runs[0])]  # nor does any other file of the export name them
    assert not [p for p in exported.rglob("*.json") if any(s in p.read_text() for s in sources)]
    bundled = sorted(bundled_weights("nano").parent.rglob("config.json"))  # src/neodragon/weights/**/config.json
    assert len(bundled) >= 3 and not [p for p in bundled if "_name_or_path" in json.loads(p.read_text())]


def test_two_process_training_smoke(latents, tmp_path):
    log = run_two_processes(tmp_path / "ddp", "train", "teacher", "--latents", str(latents), "--steps", "2",
                            "--batch-size", "1", "--save-every", "2")
    assert log[-1]["step"] == 2
    assert (tmp_path / "ddp" / "final" / WEIGHTS).is_file()


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


def test_teacher_size_options_train_export_and_load(vae_run, latents, tmp_path):
    args = ["teacher", "--latents", latents, "-o", tmp_path / "run", "--steps", "1", "--batch-size", "2",
            "--layers", "2", "--heads", "2", "--patch-size", "1", "--sample-size", "32"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    dit = PyramidMMDiT.from_pretrained(tmp_path / "run" / "final")
    assert (dit.config.num_layers, dit.config.num_attention_heads, dit.config.caption_projection_dim,
            dit.config.patch_size, dit.config.sample_size) == (2, 2, 64, 1, 32)
    assert sum(p.numel() for p in dit.parameters()) < sum(
        p.numel() for p in PyramidMMDiT(**nano_teacher_preset().dit).parameters())
    pipe = NeodragonPipeline.from_pretrained(export_teacher(vae_run / "final", tmp_path / "run" / "final",
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
    result = cli(*args[:4], continued, *args[5:-2], "--init-from", tmp_path / "run" / "final")
    assert result.exit_code == 0, result.output
    assert PyramidMMDiT.from_pretrained(continued / "final").config.sample_size == 32
    result = cli(*args[:5], "--layers", "0")
    assert result.exit_code == 2 and "layers must be >= 1" in result.output
    result = cli(*args[:5], "--patch-size", "4")
    assert result.exit_code == 2 and "patch_size must be 1 or 2" in result.output
    result = cli(*args[:5], "--sample-size", "1")
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


# -- the flow-matching objective --------------------------------------------------------------------------------


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
        FlowMatchingConfig(stage_weights=(1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="positive sum"):
        FlowMatchingConfig(unit_weights=(0.0, 0.0, 0.0))


def test_batch_flow_matching_loss_is_the_loss_of_the_batch():
    torch.manual_seed(0)
    dit = PyramidMMDiT(**dict(nano_teacher_preset().dit, num_layers=2))
    latents = torch.randn(2, 8, 3, 16, 16)
    encoding = TextEncoding(torch.randn(2, 5, 384), torch.ones(2, 5, dtype=torch.long), torch.randn(2, 384))
    objective = FlowMatchingConfig(history_corruption=0.2)
    batch = {"latents": latents, "encoding": encoding, "unit": 2, "stage": 1,
             "generator": torch.Generator().manual_seed(3)}
    via_batch = batch_flow_matching_loss(dit, PyramidFlowMatchScheduler(), batch, objective)
    direct = flow_matching_loss(dit, PyramidFlowMatchScheduler(), latents, encoding.tokens, encoding.mask,
                                encoding.pooled, 2, 1, torch.Generator().manual_seed(3), history_corruption=0.2)
    assert via_batch.keys() == direct.keys() == {"loss", "unit", "stage"}
    torch.testing.assert_close(via_batch["loss"], direct["loss"], rtol=0, atol=0)
    assert (float(direct["unit"]), float(direct["stage"])) == (2.0, 1.0) and direct["loss"] > 0


def test_teacher_trains_on_the_weighted_unit_and_stage(latents, tmp_path):
    objective = FlowMatchingConfig(unit_weights=(1.0, 0.0, 0.0), stage_weights=(0.0, 0.0, 1.0))
    train_teacher(config(tmp_path / "run", 3, batch_size=2), latents, objective)
    assert {(row["unit"], row["stage"]) for row in read_log(tmp_path / "run")} == {(0.0, 2.0)}
    saved = json.loads((tmp_path / "run" / "final" / "objective.json").read_text())
    assert saved["stage_weights"] == [0.0, 0.0, 1.0] and saved["unit_weights"] == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"one number per unit \(3\), got 2"):
        train_teacher(config(tmp_path / "bad", 1, batch_size=2), latents, FlowMatchingConfig(unit_weights=(2.0, 1.0)))
    assert not (tmp_path / "bad").exists()


# -- the train command line -------------------------------------------------------------------------------------


def test_train_cli_rejects_unknown_styles(tmp_path):
    result = cli("encode-latents", "--vae", tmp_path, "-o", tmp_path / "out", "--style", "neon", "--style", "sepia")
    assert result.exit_code == 2 and "unknown style sepia" in result.output
    assert not (tmp_path / "out").exists()  # rejected before anything is written


def test_train_cli_rejects_a_non_positive_time_budget(tmp_path):
    result = cli("teacher", "--latents", tmp_path, "-o", tmp_path / "run", "--max-minutes", "0")
    assert result.exit_code == 2 and "--max-minutes must be positive" in result.output
    assert not (tmp_path / "run").exists()

