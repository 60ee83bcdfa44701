"""Adapter training (SHiRA / LoRA / FouRA) on a random tiny nano-teacher checkpoint: one step, save, load back."""

import copy
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from neodragon.adapters.loading import attach_trained_adapters, load_adapter, read_info
from neodragon.adapters.shira import ShiraLayer
from neodragon.adapters.training import AdapterRecipe, encode_style_pairs, encode_style_videos, train_adapter
from neodragon.cli.adapter import app
from neodragon.data import sample
from neodragon.pipelines import NeodragonPipeline
from neodragon.presets import create_random_checkpoint, nano_teacher_preset
from neodragon.training.trainer import TrainConfig

TINY = dict(num_videos=2, num_frames=9, height=64, width=64)  # 2 latent frames of 8x8: a unit with history


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return create_random_checkpoint(nano_teacher_preset(), tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return NeodragonPipeline.from_pretrained(checkpoint, mode="monolithic", torch_dtype=torch.float32,
                                             load_super_resolution=False)


@pytest.fixture(scope="module")
def data(pipe):
    return encode_style_videos(pipe, AdapterRecipe(style="neon", **TINY))


def config(path, steps=1):
    return TrainConfig(output_dir=str(path), max_steps=steps, batch_size=2, learning_rate=1e-2, warmup_steps=1,
                       save_every=1, log_every=1)


def dit_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(1, 32, dtype=torch.long)
    mask[:, 10:] = 0
    return ([[torch.randn(1, 8, 1, 8, 8, generator=g)]], torch.randn(1, 32, 384, generator=g), mask,
            torch.randn(1, 384, generator=g), torch.tensor([500.0]))


def base_name(name: str) -> str:
    """A wrapped model's parameter name as the plain DiT spells it."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def test_style_data_is_normalised_latents_with_content_captions(pipe, data):
    assert data.latents.shape == (2, 8, 2, 8, 8) and torch.isfinite(data.latents).all()
    assert not any(word in caption for caption in data.captions for word in ("neon", "glow"))
    styled = encode_style_videos(pipe, AdapterRecipe(style="neon", style_in_caption=True, **TINY))
    assert torch.equal(styled.latents, data.latents)
    assert all(caption.startswith(plain) or caption.endswith(plain)
               for plain, caption in zip(data.captions, styled.captions, strict=True))


@pytest.mark.parametrize("method", ["shira", "lora", "foura"])
def test_one_step_trains_only_the_adapter_and_loads_back(method, pipe, data, tmp_path):
    base = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    run = train_adapter(pipe, config(tmp_path), AdapterRecipe(method=method, style="neon", **TINY), data)
    assert math.isfinite(run.record["loss"]) and run.record["step"] == 1
    changed = {base_name(n) for n, p in run.model.named_parameters()
               if base_name(n) not in base or not torch.equal(p, base[base_name(n)])}
    trainable = {base_name(n) for n, p in run.model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable  # only adapter parameters moved, and some did
    assert trainable.isdisjoint(base)
    assert all(torch.equal(p, base[n]) for n, p in pipe.transformer.named_parameters())  # the pipeline is untouched

    info = read_info(run.path)
    assert info["method"] == method and info["style"] == "neon" and info["parameters"] == run.parameters
    with torch.no_grad():
        trained = run.model.eval()(*dit_inputs())[0]
        loaded = load_adapter(copy.deepcopy(pipe.transformer), run.path).eval()(*dit_inputs())[0]
        plain = pipe.transformer(*dit_inputs())[0]
    torch.testing.assert_close(loaded, trained, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(trained, plain)


def test_the_three_methods_get_the_same_budget(pipe, data, tmp_path):
    counts = {m: train_adapter(pipe, config(tmp_path / m, steps=0), AdapterRecipe(method=m, rank=2, **TINY),
                               data).parameters for m in ("shira", "lora", "foura")}
    assert counts["shira"] == counts["lora"] == counts["foura"] > 0
    dense = {m: train_adapter(pipe, config(tmp_path / f"d{m}", steps=0),
                              AdapterRecipe(method=m, rank=None, density=0.05, **TINY), data).parameters
             for m in ("shira", "lora", "foura")}
    # a density budget: LoRA's per-layer and FouRA's single nearest rank round each layer's count
    assert max(dense.values()) / min(dense.values()) < 1.1


@pytest.fixture(scope="module")
def pairs(pipe):
    return encode_style_pairs(pipe, AdapterRecipe(style="outline", component="decoder", **TINY))


def decoder_recipe(method="shira", **kwargs):
    return AdapterRecipe(method=method, style="outline", component="decoder", **{**TINY, "crop": 32, **kwargs})


def test_style_pairs_are_unstyled_latents_and_styled_targets(pipe, pairs):
    assert pairs.latents.shape == (2, 8, 2, 8, 8) and pairs.videos.shape == (2, 3, 9, 64, 64)
    assert pairs.coverage.shape == (2, 9, 64, 64)
    plain = sample("train", 1, 0, num_frames=9, height=64, width=64)
    outlined = sample("train", 1, 0, num_frames=9, height=64, width=64, styles=("outline",))
    torch.testing.assert_close(pairs.videos[1].float(), outlined.video, atol=1e-3, rtol=0)
    assert not torch.allclose(outlined.video, plain.video, atol=0.1)
    with torch.no_grad():
        expected = pipe.vae.encode(plain.video[None]).latent_dist.mean
    torch.testing.assert_close(pairs.latents[1:], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["shira", "lora", "foura"])
def test_decoder_adapter_trains_only_itself_and_loads_back(method, pipe, pairs, tmp_path):
    base = {n: p.detach().clone() for n, p in pipe.vae.decoder.named_parameters()}
    run = train_adapter(pipe, config(tmp_path), decoder_recipe(method), pairs)
    assert math.isfinite(run.record["loss"]) and run.record["step"] == 1
    changed = {base_name(n) for n, p in run.model.named_parameters()
               if base_name(n) not in base or not torch.equal(p, base[base_name(n)])}
    trainable = {base_name(n) for n, p in run.model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable and trainable.isdisjoint(base)
    assert all(torch.equal(p, base[n]) for n, p in pipe.vae.decoder.named_parameters())
    assert read_info(run.path)["component"] == "decoder"
    z = pipe.vae.post_quant_conv(pairs.latents[:1])
    with torch.no_grad():
        trained = run.model.eval()(z)
        loaded = load_adapter(copy.deepcopy(pipe.vae.decoder), run.path).eval()(z)
        plain = pipe.vae.decoder(z)
    torch.testing.assert_close(loaded, trained, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(trained, plain)


def test_decoder_methods_get_the_same_budget_on_every_conv(pipe, pairs, tmp_path):
    counts = {m: train_adapter(pipe, config(tmp_path / m, steps=0), decoder_recipe(m, rank=2), pairs).parameters
              for m in ("shira", "lora", "foura")}
    convs = [m for m in pipe.vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert counts["shira"] == counts["lora"] == counts["foura"] == sum(
        2 * (m.out_channels + m.weight[0].numel()) for m in convs)


def test_decoder_crop_must_fit_the_latent_grid(pipe, pairs, tmp_path):
    for crop in (20, 128):
        with pytest.raises(ValueError, match="multiple of the VAE's spatial factor"):
            train_adapter(pipe, config(tmp_path / str(crop)), decoder_recipe(crop=crop), pairs)
    with pytest.raises(ValueError, match="Unknown component 'vae'"):
        AdapterRecipe(component="vae")


@pytest.mark.parametrize("option, value, message", [("--style", "sepia", "Unknown style 'sepia'"),
                                                    ("--method", "dora", "Unknown adapter method 'dora'"),
                                                    ("--component", "encoder", "Unknown component 'encoder'")])
def test_cli_rejects_bad_style_and_method(option, value, message, checkpoint, tmp_path):
    args = {"--style": "neon", "--method": "shira", "--component": "dit", option: value}
    result = CliRunner().invoke(app, ["train", str(checkpoint), "-o", str(tmp_path / "run"),
                                      *[x for kv in args.items() for x in kv]])
    assert result.exit_code == 1 and message in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


def test_cli_rejects_a_missing_checkpoint(tmp_path):
    result = CliRunner().invoke(app, ["train", str(tmp_path / "missing"), "--style", "neon", "-o", str(tmp_path / "r")])
    assert result.exit_code == 1 and "cannot load checkpoint" in " ".join(result.output.split())


def test_cli_trains_and_resumes(checkpoint, tmp_path):
    def train(steps):
        return CliRunner().invoke(app, ["train", str(checkpoint), "--style", "stripes", "--method", "foura", "-o",
                                        str(tmp_path), "--steps", str(steps), "--batch-size", "1", "--videos", "1",
                                        "--num-frames", "1", "--size", "64"])

    result = train(1)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    result = train(2)
    assert result.exit_code == 0, result.output
    assert read_info(tmp_path / "final")["steps"] == 2


def test_cli_trains_a_decoder_adapter(checkpoint, tmp_path):
    result = CliRunner().invoke(app, ["train", str(checkpoint), "--style", "neon", "--component", "decoder",
                                      "--crop", "32", "-o", str(tmp_path), "--steps", "1", "--batch-size", "1",
                                      "--videos", "1", "--num-frames", "9", "--size", "64"])
    assert result.exit_code == 0, result.output
    assert read_info(tmp_path / "final")["component"] == "decoder"
    assert (tmp_path / "final" / "adapter.safetensors").is_file()


@pytest.fixture(scope="module")
def trained(pipe, pairs, data, tmp_path_factory):
    """Three 1-step adapters: SHiRA on the decoder, LoRA and FouRA on the DiT."""
    root = tmp_path_factory.mktemp("adapters")
    return {"shira-decoder": train_adapter(pipe, config(root / "sd"), decoder_recipe("shira"), pairs).path,
            "lora-dit": train_adapter(pipe, config(root / "ld"), AdapterRecipe(method="lora", **TINY), data).path,
            "foura-dit": train_adapter(pipe, config(root / "fd"), AdapterRecipe(method="foura", **TINY), data).path}


def test_attach_trained_adapters_puts_each_on_its_component(checkpoint, trained, pairs):
    fresh = NeodragonPipeline.from_pretrained(checkpoint, mode="monolithic", load_super_resolution=False)
    z = pairs.latents[:1]
    with torch.no_grad():
        expected_video = load_adapter(copy.deepcopy(fresh.vae.decoder), trained["shira-decoder"])(
            fresh.vae.post_quant_conv(z))
        expected_dit = load_adapter(copy.deepcopy(fresh.transformer), trained["lora-dit"])(*dit_inputs())[0]
    attach_trained_adapters(fresh, [trained["shira-decoder"], trained["lora-dit"]])
    assert not any(isinstance(m, ShiraLayer) for m in fresh.vae.decoder.modules())  # fused into the weights
    with torch.no_grad():
        torch.testing.assert_close(fresh.vae.decode(z).sample, expected_video, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fresh.transformer(*dit_inputs())[0], expected_dit, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="one method per model"):
        attach_trained_adapters(fresh, [trained["lora-dit"], trained["foura-dit"]])


def test_generate_with_adapters(checkpoint, trained, tmp_path):
    from neodragon.cli import app as main_app

    def generate(name, *adapters):
        args = ["generate", "a red circle moving to the right", "-o", str(tmp_path / f"{name}.mp4"), "--model",
                str(checkpoint), "--num-frames", "9", "--height", "64", "--width", "64", "--steps", "1"]
        return CliRunner().invoke(main_app, args + [x for a in adapters for x in ("--adapter", str(a))])

    assert generate("plain").exit_code == 0
    result = generate("styled", trained["shira-decoder"], trained["foura-dit"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "styled.mp4").read_bytes() != (tmp_path / "plain.mp4").read_bytes()
    result = generate("bad", trained["lora-dit"], trained["foura-dit"])
    assert result.exit_code == 1 and "one method per model" in " ".join(result.output.split())
    assert not (tmp_path / "bad.mp4").exists()
    result = generate("missing", tmp_path)
    assert result.exit_code == 1 and "not a trained adapter folder" in " ".join(result.output.split())


def test_a_checkpoint_ships_named_adapters(checkpoint, trained, tmp_path):
    import shutil

    from neodragon.cli import app as main_app

    model = tmp_path / "model"
    shutil.copytree(checkpoint, model)
    shutil.copytree(trained["shira-decoder"], model / "adapters" / "glow")
    info = CliRunner().invoke(main_app, ["info", str(model), "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.output)["adapters"] == {"glow": {"method": "shira", "component": "decoder",
                                                            "style": "outline", "parameters": read_info(
                                                                trained["shira-decoder"])["parameters"]}}
    args = ["generate", "a red circle", "--model", str(model), "--num-frames", "9", "--height", "64", "--width", "64",
            "--steps", "1", "--adapter"]
    result = CliRunner().invoke(main_app, [*args, "glow", "-o", str(tmp_path / "glow.mp4")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main_app, [*args, "sparkle", "-o", str(tmp_path / "x.mp4")])
    assert result.exit_code == 1 and "model's own adapters (glow)" in " ".join(result.output.split())


def test_export_writes_a_compact_float16_copy(checkpoint, trained, pairs, tmp_path):
    from safetensors.torch import load_file

    for key, weights in (("shira-decoder", "adapter.safetensors"), ("lora-dit", "adapter_model.safetensors")):
        out = tmp_path / key
        result = CliRunner().invoke(app, ["export", str(trained[key]), "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert read_info(out) == read_info(trained[key])
        tensors = load_file(str(out / weights))
        assert {t.dtype for t in tensors.values()} <= {torch.float16, torch.int32}
        assert (out / weights).stat().st_size < (trained[key] / weights).stat().st_size
    fresh = NeodragonPipeline.from_pretrained(checkpoint, mode="monolithic", load_super_resolution=False)
    z = fresh.vae.post_quant_conv(pairs.latents[:1])
    with torch.no_grad():
        full = load_adapter(copy.deepcopy(fresh.vae.decoder), trained["shira-decoder"])(z)
        half = load_adapter(copy.deepcopy(fresh.vae.decoder), tmp_path / "shira-decoder")(z)
    torch.testing.assert_close(half, full, atol=2e-3, rtol=0)
    again = CliRunner().invoke(app, ["export", str(trained["lora-dit"]), "-o", str(tmp_path / "lora-dit")])
    assert again.exit_code == 1 and "already exists" in again.output
