"""Recipe 4, pyramidal DMD: the update schedule, the generator's sampling points, both losses on known inputs, and
the trainer (steps, exact resume, export -> load -> generate, 2 processes)."""

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import run_two_processes

from neodragon.models.mmdit import PyramidMMDiT
from neodragon.pipelines import NeodragonPipeline
from neodragon.pipelines.neodragon import PipelineConfig
from neodragon.presets import create_random_checkpoint, load_pipeline, load_video_vae, reduced_official_preset
from neodragon.recipes.distill_steps import RECORD_FILE, distill_steps
from neodragon.recipes.prune import apply_pruning, read_pruning
from neodragon.schedulers import PyramidFlowMatchScheduler
from neodragon.training.dmd import DMDConfig, dmd_losses, student_indices
from neodragon.training.latents import CaptionEncodings, LatentCache, PipelineConditioning, encode_latents
from neodragon.training.trainer import LOG_FILE, TrainConfig, read_log


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    return encode_latents(load_video_vae("nano"), tmp_path_factory.mktemp("latents"), num_videos=4, batch_size=2)


def test_schedule_and_student_points():
    config = DMDConfig(fake_updates=2)
    assert [config.role(step) for step in range(6)] == ["fake", "fake", "generator"] * 2
    scheduler = PyramidFlowMatchScheduler()
    assert student_indices(scheduler, 4).tolist() == [0, 333, 666, 999]
    assert student_indices(scheduler, 1).tolist() == [0]  # 1-1-1 sampling reads the stage start
    # the points are the sampler's own: local sigma 1 at the stage start, as stage_sigmas gives it
    assert scheduler.sigmas_per_stage[1][0] == scheduler.stage_sigmas(1, 1)[0] == 1.0
    with pytest.raises(ValueError, match="student_steps"):
        DMDConfig(student_steps=0)


def _batch(pipe, latents, unit=1, stage=1):
    cache = LatentCache(latents)
    video, captions = cache.batch(range(2))
    text = CaptionEncodings(PipelineConditioning(pipe), captions)
    return {"latents": video, "encoding": text.encode(captions), "uncond": text.encode(["", ""]), "unit": unit,
            "stage": stage, "generator": torch.Generator().manual_seed(0)}


@pytest.mark.parametrize("stage", [0, 2])
def test_identical_scores_give_no_dmd_gradient(latents, stage):
    pipe = load_pipeline("nano", torch_dtype=torch.float32)
    real = pipe.transformer.float().eval()
    generator, fake = copy.deepcopy(real), copy.deepcopy(real)
    config = DMDConfig(guidance_scale=1.0, video_guidance_scale=1.0, regression_weight=0.0)
    losses = dmd_losses(generator, fake, real, pipe.scheduler, _batch(pipe, latents, stage=stage), config, "generator")
    assert losses["real_fake_gap"] == 0 and losses["dmd"] == 0
    losses["loss"].backward()
    assert all(p.grad is None or not p.grad.any() for p in generator.parameters())


def test_each_role_trains_its_own_network(latents):
    pipe = load_pipeline("nano", torch_dtype=torch.float32)
    real = pipe.transformer.float().eval().requires_grad_(False)
    generator, fake = copy.deepcopy(real).requires_grad_(True), copy.deepcopy(real).requires_grad_(True)
    config = DMDConfig()  # CFG 5 / 4: the real score now differs from the fake one
    losses = dmd_losses(generator, fake, real, pipe.scheduler, _batch(pipe, latents), config, "generator")
    assert losses["dmd"] > 0 and losses["regression"] > 0 and losses["real_fake_gap"] > 0
    losses["loss"].backward()
    assert generator.proj_out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in fake.parameters())
    generator.zero_grad(set_to_none=True)
    losses = dmd_losses(generator, fake, real, pipe.scheduler, _batch(pipe, latents), config, "fake")
    losses["loss"].backward()
    assert fake.proj_out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in generator.parameters())


def config(run, steps):
    return TrainConfig(output_dir=str(run), max_steps=steps, batch_size=2, warmup_steps=1, save_every=3, log_every=1)


def test_distill_steps_resumes_exactly_and_exports_a_one_step_model(latents, tmp_path):
    checkpoint = distill_steps(config(tmp_path / "run", 6), "nano", latents)
    run = checkpoint.parent
    log = read_log(run)
    assert [("dmd" in r, "fake_fm" in r) for r in log] == [(False, True), (False, True), (True, False)] * 2
    interrupted = tmp_path / "interrupted"  # the same run, cut off after its step-3 checkpoint
    shutil.copytree(run, interrupted, ignore=shutil.ignore_patterns("step_6", "final", "checkpoint"))
    (interrupted / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in log[:3]))
    distill_steps(config(interrupted, 6), "nano", latents)
    assert [r["loss"] for r in read_log(interrupted)] == [r["loss"] for r in log]
    a, b = (PyramidMMDiT.from_pretrained(folder / "final") for folder in (run, interrupted))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))

    defaults = PipelineConfig.load(checkpoint).modes["monolithic"]
    assert defaults.num_inference_steps == [1, 1, 1] and defaults.video_num_inference_steps == [1, 1, 1]
    assert defaults.guidance_scale == 0 and defaults.video_guidance_scale == 0
    assert json.loads((checkpoint / RECORD_FILE).read_text())["steps"] == 6
    pipe = NeodragonPipeline.from_pretrained(checkpoint)
    calls = []
    pipe.transformer.register_forward_hook(lambda module, args, output: calls.append(args[1].shape[0]))
    video = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="pt").frames
    assert video.shape == (1, 17, 3, 128, 128) and torch.isfinite(video).all()
    assert calls == [1] * 9  # 3 latent frames x 3 stages, one step each, no CFG


def test_distill_steps_runs_as_two_processes(latents, tmp_path):
    log = run_two_processes(tmp_path / "run", "distill", "steps", "--teacher", "nano", "--latents", str(latents),
                            "--steps", "3", "--batch-size", "1", "--save-every", "3")
    assert log[-1]["step"] == 3 and (tmp_path / "run" / "checkpoint" / RECORD_FILE).is_file()


def test_official_layout_prunes_recovers_and_distils_under_fsdp(tmp_path):
    """The release's layout at reduced widths (16-channel latent, DT5 + ContextAdapter) through the whole DiT chain,
    with the FSDP configuration documented for the release's scale, as two CPU processes."""
    preset = reduced_official_preset()
    root = create_random_checkpoint(replace(preset, dit={**preset.dit, "num_layers": 4}), tmp_path / "model")
    pruned = apply_pruning(root, [1], tmp_path / "pruned")
    latents = encode_latents(load_video_vae(root), tmp_path / "latents", num_videos=2, batch_size=2)
    fsdp = Path(__file__).parents[1] / "configs" / "accelerate" / "fsdp.yaml"
    run_two_processes(tmp_path / "recovered", "prune", "recover", str(pruned), "--stage", "2", "--latents",
                      str(latents), "--steps", "2", "--batch-size", "1", "--save-every", "2", config_file=fsdp)
    recovered = tmp_path / "recovered" / "checkpoint"
    assert [r["stage"] for r in read_pruning(recovered)["recovery"]] == [2]
    log = run_two_processes(tmp_path / "distilled", "distill", "steps", "--teacher", str(recovered), "--latents",
                            str(latents), "--steps", "3", "--batch-size", "1", "--save-every", "3", config_file=fsdp)
    assert "dmd" in log[-1]
    pipe = NeodragonPipeline.from_pretrained(tmp_path / "distilled" / "checkpoint")
    assert pipe.transformer.config.num_layers == 3
    video = pipe("a red circle", num_frames=9, generator=torch.Generator().manual_seed(0), output_type="pt").frames
    assert torch.isfinite(video).all()


def test_hybrid_export_makes_frame_0_with_the_teacher_and_later_frames_with_the_generator(tmp_path):
    from typer.testing import CliRunner

    from neodragon.cli import app
    from neodragon.presets import checkpoint_folder
    from neodragon.recipes.prune import DIT

    generator = PyramidMMDiT.from_pretrained(checkpoint_folder("nano") / DIT)
    with torch.no_grad():
        generator.proj_out.bias.add_(0.1)  # tell the two DiTs apart
    generator.save_pretrained(tmp_path / "generator")
    result = CliRunner().invoke(app, ["distill", "hybrid", "--teacher", "nano", "--generator",
                                      str(tmp_path / "generator"), "-o", str(tmp_path / "hybrid"),
                                      "--first-frame-steps", "2"])
    assert result.exit_code == 0, result.output
    pipe = NeodragonPipeline.from_pretrained(tmp_path / "hybrid")
    assert pipe.mode == "hybrid"
    # the generator, stored in the teacher's dtype (fp16 in the bundle)
    assert torch.equal(pipe.transformer.proj_out.bias, generator.proj_out.bias.half().float())
    teacher_calls, generator_calls = [], []
    pipe.first_frame_generator.transformer.register_forward_hook(
        lambda module, args, output: teacher_calls.append(args[1].shape[0]))
    pipe.transformer.register_forward_hook(lambda module, args, output: generator_calls.append(args[1].shape[0]))
    video = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="pt").frames
    assert video.shape == (1, 17, 3, 128, 128) and torch.isfinite(video).all()
    assert teacher_calls == [2] * 6  # frame 0: 2 steps x 3 stages, CFG (negative + prompt rows)
    assert generator_calls == [1] * 6  # latent frames 1-2: 1 step x 3 stages, no CFG
