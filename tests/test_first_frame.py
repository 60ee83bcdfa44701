"""The nano first-frame generator (hybrid mode's frame 0): frame-0 latents, the UNet's sampling, its training (one
step, resume, 2 processes), the hybrid export and the pipeline's hybrid path."""

import json
import shutil

import pytest
import torch
from conftest import run_two_processes
from safetensors.torch import load_file

from neodragon.data import sample
from neodragon.models.first_frame import LATENT_UNET_SUBFOLDER, LatentFirstFrameGenerator, latent_unet
from neodragon.pipelines import NeodragonPipeline
from neodragon.pipelines.neodragon import PIPELINE_CONFIG, SUBFOLDERS, dit_mode
from neodragon.presets import load_pipeline, load_video_vae
from neodragon.recipes.first_frame import export_hybrid, train_first_frame
from neodragon.training.first_frame import first_frame_batches
from neodragon.training.latents import CaptionEncodings, LatentCache, encode_latents
from neodragon.training.trainer import LOG_FILE, TrainConfig, read_log

UNET_WEIGHTS = f"{LATENT_UNET_SUBFOLDER}/diffusion_pytorch_model.safetensors"
WIDTHS = (16, 32)


def config(path, steps, save_every=2):
    return TrainConfig(output_dir=str(path), max_steps=steps, batch_size=2, warmup_steps=1, save_every=save_every,
                       log_every=1)


@pytest.fixture(scope="module")
def frame_latents(tmp_path_factory):
    return encode_latents(load_video_vae("nano"), tmp_path_factory.mktemp("frame0"), num_videos=4, batch_size=2,
                          first_frames=True)


@pytest.fixture(scope="module")
def trained(frame_latents, tmp_path_factory):
    run = tmp_path_factory.mktemp("first-frame")
    train_first_frame(config(run, 4), frame_latents, "nano", WIDTHS)
    return run


@pytest.fixture(scope="module")
def hybrid(trained, tmp_path_factory):
    return export_hybrid("nano", trained / "final", tmp_path_factory.mktemp("hybrid") / "model",
                         num_inference_steps=2, guidance_scale=3.0)


def test_first_frame_latents_are_frame_zero_of_the_video_latents(frame_latents):
    cache = LatentCache(frame_latents)
    assert cache.latents.shape == (4, 8, 1, 16, 16)
    vae = load_video_vae("nano").float()
    video = torch.stack([sample("train", i).video for i in range(2)])
    with torch.no_grad():
        whole = vae.normalize_latents(vae.encode(video).latent_dist.mean)
    # the causal encoder gives frame 0 the latent it has in the whole video (what the DiT's history saw)
    torch.testing.assert_close(cache.latents[:2], whole[:, :, :1], atol=1e-4, rtol=1e-4)
    # the objects' coverage at the latent resolution: every latent pixel that holds part of an object
    assert cache.coverage.shape == (4, 1, 1, 16, 16)
    covered = torch.nn.functional.max_pool2d(sample("train", 0).coverage[:1], 8)[0] > 0
    assert torch.equal(cache.coverage[0, 0, 0] > 0, covered) and 0 < covered.float().mean() < 0.5


def test_generator_samples_a_seeded_latent_with_and_without_guidance():
    pipe = load_pipeline("nano")
    generator = LatentFirstFrameGenerator(latent_unet(8, 384, 384, 16, WIDTHS), num_inference_steps=2)
    args = (pipe, ["a red circle", "a blue star"], "", 128, 128)
    first = generator.first_frame_latents(*args, torch.Generator().manual_seed(0))
    assert first.shape == (2, 8, 1, 16, 16) and torch.isfinite(first).all()
    torch.testing.assert_close(first, generator.first_frame_latents(*args, torch.Generator().manual_seed(0)))
    generator.guidance_scale = 1.0  # no CFG: one UNet pass per step, a different field
    assert not torch.allclose(first, generator.first_frame_latents(*args, torch.Generator().manual_seed(0)))


def test_batches_drop_captions_and_reject_video_latents(frame_latents, tmp_path):
    pipe = load_pipeline("nano")
    cache = LatentCache(frame_latents)
    text = CaptionEncodings(pipe.text_encoder, cache.captions)
    batch_fn = first_frame_batches(cache, text, config(tmp_path, 1), text_dropout=1.0)
    batch = batch_fn(0, 0, 1)
    assert batch["latents"].shape == (2, 8, 16, 16) and batch["sigmas"].shape == (2,)
    torch.testing.assert_close(batch["encoding"].tokens, text.encode(["", ""]).tokens)
    torch.testing.assert_close(batch_fn(0, 0, 1)["noise"], batch["noise"])  # a pure function of (step, rank)
    assert torch.equal(batch["weights"], torch.ones(2, 1, 16, 16))
    weighted = first_frame_batches(cache, text, config(tmp_path, 1), object_weight=9.0)(0, 0, 1)["weights"]
    torch.testing.assert_close(weighted, 1 + 9 * cache.coverage[:2, :, 0])
    cache.coverage = None  # shards encoded before coverage was stored
    with pytest.raises(ValueError, match="coverage"):
        first_frame_batches(cache, text, config(tmp_path, 1), object_weight=9.0)
    cache.latents = cache.latents.repeat(1, 1, 3, 1, 1)
    with pytest.raises(ValueError, match="--first-frames"):
        first_frame_batches(cache, text, config(tmp_path, 1))


def test_object_weight_moves_the_loss_towards_the_objects():
    from neodragon.models.text import TextEncoding
    from neodragon.training.first_frame import first_frame_loss

    class Zero(torch.nn.Module):  # predicts velocity 0: the error is the target itself
        def forward(self, latents, sigmas, tokens, mask, pooled):
            return torch.zeros_like(latents)

    latents, noise = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    text = TextEncoding(torch.zeros(1, 1, 4), torch.ones(1, 1, dtype=torch.long), torch.zeros(1, 4))
    batch = {"latents": latents, "noise": noise, "sigmas": torch.zeros(1), "encoding": text}
    plain = first_frame_loss(Zero(), {**batch, "weights": torch.ones(1, 1, 2, 2)})["loss"]
    object_pixel = torch.tensor([[[[4.0, 1.0], [1.0, 1.0]]]])
    assert plain.item() == pytest.approx(0.25)
    assert first_frame_loss(Zero(), {**batch, "weights": object_pixel})["loss"].item() == pytest.approx(4 / 7)


def test_training_resumes_to_the_same_weights(trained, frame_latents, tmp_path):
    log = read_log(trained)
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in log)
    interrupted = tmp_path / "run"  # the same run, cut off after its step-2 checkpoint
    shutil.copytree(trained, interrupted, ignore=shutil.ignore_patterns("step_4", "final"))
    (interrupted / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in log[:2]))
    train_first_frame(config(interrupted, 4), frame_latents, "nano", WIDTHS)
    assert [r["loss"] for r in read_log(interrupted)] == [r["loss"] for r in log]
    straight, resumed = (load_file(str(run / "final" / UNET_WEIGHTS)) for run in (trained, interrupted))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_hybrid_export_loads_and_generates(hybrid, tmp_path):
    config = json.loads((hybrid / PIPELINE_CONFIG).read_text())
    assert config["default_mode"] == "hybrid" and config["first_frame"] == "latent_unet"
    assert load_file(str(hybrid / UNET_WEIGHTS))["conv_in.weight"].dtype == torch.float16
    assert not (hybrid / SUBFOLDERS["hybrid", "transformer"]).exists()  # the multi-step DiT serves both modes
    pipe = NeodragonPipeline.from_pretrained(hybrid, torch_dtype=torch.float32)
    assert pipe.mode == "hybrid" and isinstance(pipe.first_frame_generator, LatentFirstFrameGenerator)
    assert pipe.first_frame_generator.num_inference_steps == 2 and pipe.first_frame_generator.guidance_scale == 3.0
    pipe.set_progress_bar_config(disable=True)
    run = dict(num_frames=9, video_num_inference_steps=1, output_type="latent")
    latents = pipe("a red circle moving to the right", generator=torch.Generator().manual_seed(0), **run).frames
    again = pipe("a red circle moving to the right", generator=torch.Generator().manual_seed(0), **run).frames
    assert latents.shape == (1, 8, 2, 16, 16) and torch.equal(latents, again)
    # frame 0 is the generator's latent as it is: no decode/encode round trip
    frame0 = pipe.first_frame_generator.first_frame_latents(pipe, ["a red circle moving to the right"], "", 128, 128,
                                                            torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents[:, :, :1], frame0)
    pipe.save_pretrained(tmp_path / "saved")  # round trip: the generator and the shared DiT come back
    assert (tmp_path / "saved" / UNET_WEIGHTS).is_file()
    assert (tmp_path / "saved" / SUBFOLDERS["monolithic", "transformer"]).is_dir()
    assert NeodragonPipeline.from_pretrained(tmp_path / "saved").mode == "hybrid"
    assert NeodragonPipeline.from_pretrained(hybrid, mode="monolithic").first_frame_generator is None


def test_hybrid_export_can_keep_the_default_mode(trained, tmp_path):
    kept = export_hybrid("nano", trained / "final", tmp_path / "model", hybrid_default=False)
    config = json.loads((kept / PIPELINE_CONFIG).read_text())
    assert config["default_mode"] == "monolithic" and config["first_frame"] == "latent_unet"
    assert NeodragonPipeline.from_pretrained(kept).first_frame_generator is None
    assert isinstance(NeodragonPipeline.from_pretrained(kept, mode="hybrid").first_frame_generator,
                      LatentFirstFrameGenerator)


def test_hybrid_errors_say_what_to_do(hybrid, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hybrid, broken, ignore=shutil.ignore_patterns(LATENT_UNET_SUBFOLDER))
    with pytest.raises(FileNotFoundError, match="first_frame_unet"):
        NeodragonPipeline.from_pretrained(broken)
    config = json.loads((broken / PIPELINE_CONFIG).read_text())
    (broken / PIPELINE_CONFIG).write_text(json.dumps({**config, "hybrid_dit": "fast"}))
    with pytest.raises(ValueError, match="hybrid_dit"):
        NeodragonPipeline.from_pretrained(broken)


def test_dit_mode_maps_hybrid_to_the_multistep_pair_when_asked():
    from neodragon.pipelines.neodragon import PipelineConfig

    assert dit_mode(PipelineConfig(), "hybrid") == "hybrid"
    assert dit_mode(PipelineConfig(hybrid_dit="multistep"), "hybrid") == "monolithic"
    assert dit_mode(PipelineConfig(hybrid_dit="multistep"), "monolithic") == "monolithic"


def test_cli_rejects_bad_widths(frame_latents, tmp_path):
    from typer.testing import CliRunner

    from neodragon.cli.train import app

    result = CliRunner().invoke(app, ["first-frame", "--latents", str(frame_latents), "-o", str(tmp_path),
                                      "--widths", "64,20"])
    assert result.exit_code != 0 and "multiple of 16" in result.output


def test_two_process_training_smoke(frame_latents, tmp_path):
    log = run_two_processes(tmp_path / "ddp", "train", "first-frame", "--latents", str(frame_latents), "--widths",
                            "16,32", "--steps", "2", "--batch-size", "1", "--save-every", "2")
    assert log[-1]["step"] == 2
    assert (tmp_path / "ddp" / "final" / UNET_WEIGHTS).is_file()

