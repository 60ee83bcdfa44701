import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from neodragon.pipelines import NeodragonPipeline
from neodragon.pipelines.neodragon import resolve_checkpoint
from neodragon.presets import create_random_checkpoint, reduced_official_preset

PROMPT = "a red circle moving to the right"
SIZE = dict(num_frames=17, height=64, width=64)
FAST = dict(num_inference_steps=2, video_num_inference_steps=1)  # monolithic at test speed


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return create_random_checkpoint(reduced_official_preset(), tmp_path_factory.mktemp("official-reduced"))


@pytest.fixture(scope="module")
def pipes(checkpoint):
    loaded = {mode: NeodragonPipeline.from_pretrained(checkpoint, mode=mode) for mode in ("hybrid", "monolithic")}
    for pipe in loaded.values():
        pipe.set_progress_bar_config(disable=True)
    return loaded


def generate(pipe, seed=0, prompt=PROMPT, **kwargs):
    extra = FAST if pipe.mode == "monolithic" else {}
    args = {**SIZE, **extra, "output_type": "np", **kwargs}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **args).frames


@pytest.mark.parametrize("mode", ["hybrid", "monolithic"])
def test_generates_video_of_the_right_shape_and_range(pipes, mode):
    frames = generate(pipes[mode])
    assert frames.shape == (1, 17, 64, 64, 3)
    assert frames.dtype == np.float32 and frames.min() >= 0.0 and frames.max() <= 1.0
    assert np.isfinite(frames).all()


@pytest.mark.parametrize("mode", ["hybrid", "monolithic"])
def test_seed_determinism(pipes, mode):
    a, b, c = generate(pipes[mode], seed=1), generate(pipes[mode], seed=1), generate(pipes[mode], seed=2)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


def test_modes_load_their_own_pair(pipes, checkpoint):
    assert pipes["hybrid"].first_frame_generator is not None
    assert pipes["monolithic"].first_frame_generator is None
    assert pipes["hybrid"].transformer.config.num_layers == pipes["monolithic"].transformer.config.num_layers
    hybrid_weight = pipes["hybrid"].transformer.proj_out.weight
    assert not torch.equal(hybrid_weight, pipes["monolithic"].transformer.proj_out.weight)


def test_output_types_batch_and_frame_counts(pipes):
    pipe = pipes["monolithic"]
    pil = generate(pipe, prompt=[PROMPT, "a blue square"], num_frames=9, output_type="pil")
    assert len(pil) == 2 and len(pil[0]) == 9 and isinstance(pil[0][0], Image.Image) and pil[0][0].size == (64, 64)
    pt = generate(pipe, num_frames=9, output_type="pt")
    assert pt.shape == (1, 9, 3, 64, 64)
    latents = generate(pipe, num_frames=25, output_type="latent")
    assert latents.shape == (1, 16, 4, 8, 8)
    wide = generate(pipes["hybrid"], num_frames=1, height=64, width=128)
    assert wide.shape == (1, 1, 64, 128, 3)


def test_callback_sees_every_step_and_can_edit_latents(pipes):
    seen = []

    def callback(pipe, step, timestep, state):
        seen.append((state["unit"], state["stage"], step, timestep))
        return {"latents": torch.zeros_like(state["latents"])}

    generate(pipes["hybrid"], callback_on_step_end=callback)
    assert [(u, s) for u, s, _, _ in seen] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert [t for *_, t in seen[:3]] == [1000.0, 744.0, 386.0]


def test_guidance_and_steps_overrides(pipes):
    calls = []
    pipe = pipes["hybrid"]
    generate(pipe, video_num_inference_steps=[2, 1, 1], callback_on_step_end=lambda *a: calls.append(a[1]))
    assert len(calls) == 2 * 4
    cfg = generate(pipe, video_guidance_scale=3.0, seed=3)
    assert np.abs(cfg - generate(pipe, seed=3)).max() > 1e-5


def test_super_resolution_doubles_resolution(pipes):
    frames = generate(pipes["hybrid"], num_frames=9, super_resolution=True)
    assert frames.shape == (1, 9, 128, 128, 3)


def test_save_pretrained_round_trip(pipes, tmp_path):
    pipe = pipes["hybrid"]
    pipe.save_pretrained(tmp_path / "saved")
    again = NeodragonPipeline.from_pretrained(tmp_path / "saved", mode="hybrid")
    again.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(generate(again, seed=5), generate(pipe, seed=5))


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt=""), "non-empty"),
    (dict(prompt=["ok", "  "]), "non-empty"),
    (dict(num_frames=16), "1 \\+ 8k"),
    (dict(height=100), "multiples of 64"),
    (dict(width=0), "multiples of 64"),
    (dict(video_num_inference_steps=[1, 1]), "3 positive integers"),
    (dict(output_type="gif"), "output_type"),
])
def test_bad_inputs(pipes, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(pipes["hybrid"], **kwargs)


def test_unknown_mode(checkpoint):
    with pytest.raises(ValueError, match="Unknown mode"):
        NeodragonPipeline.from_pretrained(checkpoint, mode="turbo")


def test_missing_component_folder(checkpoint, tmp_path):
    broken = shutil.copytree(checkpoint, tmp_path / "broken")
    shutil.rmtree(broken / "causal_video_vae")
    with pytest.raises(FileNotFoundError, match="causal_video_vae"):
        NeodragonPipeline.from_pretrained(broken, mode="monolithic")
    shutil.copytree(checkpoint / "causal_video_vae", broken / "causal_video_vae")
    shutil.rmtree(broken / "ssd_1b_unet")
    with pytest.raises(FileNotFoundError, match="ssd_1b_unet"):
        NeodragonPipeline.from_pretrained(broken, mode="hybrid")


def test_config_weights_mismatch_and_corrupt_weights(checkpoint, tmp_path):
    broken = shutil.copytree(checkpoint, tmp_path / "broken")
    config_file = broken / "diffusion_transformer_320p_multistep_t2v" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "attention_head_dim": 8}))
    with pytest.raises(ValueError, match="PyramidMMDiT.*same model"):
        NeodragonPipeline.from_pretrained(broken, mode="monolithic")
    (broken / "causal_video_vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="AsymmetricCausalVideoVAE"):
        NeodragonPipeline.from_pretrained(broken, mode="hybrid")


def test_hub_id_fails_clearly_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="Could not download"):
        resolve_checkpoint("neodragon-test/does-not-exist", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder nor a hub id"):
        resolve_checkpoint(tmp_path / "no" / "such" / "folder")


def test_video_steps_and_guidance_follow_the_calls_unit0_values(pipes):
    """As `neodragon generate --steps 2`: the call's steps apply to every frame unless video steps are given."""
    calls = []
    generate(pipes["monolithic"], num_frames=17, num_inference_steps=2, video_num_inference_steps=None,
             callback_on_step_end=lambda *a: calls.append(a[3]["unit"]))
    assert calls == [unit for unit in range(3) for _ in range(3 * 2)]
    calls.clear()
    generate(pipes["monolithic"], num_frames=17, num_inference_steps=2, video_num_inference_steps=1,
             callback_on_step_end=lambda *a: calls.append(a[3]["unit"]))
    assert calls == [0] * 6 + [1] * 3 + [2] * 3


def test_first_frame_generator_is_a_registered_component(pipes, checkpoint, tmp_path):
    pipe = pipes["hybrid"]
    assert pipe.config["first_frame_generator"][1] == "SSD1BFirstFrameGenerator"
    assert pipes["monolithic"].config["first_frame_generator"] == (None, None)


def test_pyramid_first_frame_generator_samples_frame0_with_the_multistep_pair(tmp_path):
    """A preset without an image model makes frame 0 with its monolithic DiT pair, a registered component that
    save_pretrained writes and from_pretrained loads back."""
    from neodragon.pipelines.neodragon import PyramidFirstFrameGenerator
    from neodragon.presets import nano_student_preset

    folder = create_random_checkpoint(nano_student_preset(), tmp_path / "student")
    pipe = NeodragonPipeline.from_pretrained(folder, mode="hybrid")
    pipe.set_progress_bar_config(disable=True)
    generator = pipe.first_frame_generator
    assert isinstance(generator, PyramidFirstFrameGenerator)
    assert generator.transformer is not pipe.transformer  # the multi-step pair, not the hybrid DiT
    assert pipe.config["first_frame_generator"][1] == "PyramidFirstFrameGenerator"
    generator.num_inference_steps = [1, 1, 1]
    frames = generate(pipe, num_frames=9, seed=2)
    assert frames.shape == (1, 9, 64, 64, 3)
    pipe.save_pretrained(tmp_path / "saved")
    again = NeodragonPipeline.from_pretrained(tmp_path / "saved", mode="hybrid")
    again.set_progress_bar_config(disable=True)
    again.first_frame_generator.num_inference_steps = [1, 1, 1]
    np.testing.assert_array_equal(generate(again, num_frames=9, seed=2), frames)


def test_latent_constants_live_in_the_vae_config(pipes, checkpoint, tmp_path):
    vae = pipes["hybrid"].vae
    release_defaults = {"image_latent_shift": 0.1490, "image_latent_scale": 0.5430, "video_latent_shift": -0.2343,
                        "video_latent_scale": 0.3031}
    assert vae.latent_statistics() == release_defaults  # the release's VAE config has none: its reference values
    z = torch.randn(1, vae.config.encoder_out_channels, 3, 4, 4)
    torch.testing.assert_close(vae.denormalize_latents(vae.normalize_latents(z)), z)
    legacy = tmp_path / "legacy"
    shutil.copytree(checkpoint, legacy)
    config = json.loads((legacy / "pipeline_config.json").read_text())
    (legacy / "pipeline_config.json").write_text(json.dumps({**config, "image_latent_shift": 0.1}))
    with pytest.raises(ValueError, match="causal_video_vae/config.json"):
        NeodragonPipeline.from_pretrained(legacy, mode="monolithic")


def test_a_prompt_longer_than_the_text_encoder_reads_is_reported(pipes):
    limit = pipes["monolithic"].text_encoder.max_sequence_length
    with pytest.warns(UserWarning, match=r"tokens long, but the text encoder reads only the first .*ignored"):
        generate(pipes["monolithic"], prompt="red " * (2 * limit), num_frames=1)
