"""Asymmetric decoder distillation (recipe 2): the student keeps the teacher's latent space, the loss on known
inputs, one step, resume, export -> load -> generate, the official-scale config at reduced widths, 2 processes."""

import json

import pytest
import torch
from conftest import run_two_processes
from typer.testing import CliRunner

from neodragon.cli import app
from neodragon.models.vae import AsymmetricCausalVideoVAE, TAEHVDecoder
from neodragon.pipelines import NeodragonPipeline
from neodragon.presets import bundled_weights, load_video_vae, reduced_official_preset
from neodragon.recipes.distill_decoder import distill_decoder
from neodragon.training.decoder_distillation import (
    DecoderDistillation,
    _copies,
    _decoder_convs,
    can_cut,
    inherit_decoder,
    student_vae,
)
from neodragon.training.trainer import TrainConfig, read_log
from neodragon.training.vae import VAELossWeights, reconstruction_losses

WIDTHS = (16, 8, 8, 8)


@pytest.fixture(scope="module")
def teacher():
    return load_video_vae("nano").float().eval()


def video(frames=9, size=32, seed=0):
    return torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_student_keeps_the_teachers_latent_space_and_trains_only_its_decoder(teacher):
    student = student_vae(teacher, WIDTHS)
    x = video()
    with torch.no_grad():
        torch.testing.assert_close(student.encode(x).latent_dist.mean, teacher.encode(x).latent_dist.mean,
                                   rtol=0, atol=0)
    assert student.latent_statistics() == teacher.latent_statistics()
    assert student.config.decoder_num_features == list(WIDTHS)
    trainable = {name.split(".")[0] for name, p in student.named_parameters() if p.requires_grad}
    assert trainable == {"decoder", "post_quant_conv"}
    with pytest.raises(ValueError, match="four positive widths"):
        student_vae(teacher, (16, 8, 8))


def test_distillation_loss_on_known_inputs(teacher):
    twin = student_vae(teacher, teacher.config.decoder_num_features)
    twin.load_state_dict(teacher.state_dict())  # a student that decodes exactly as the teacher does
    x, weights = video(), VAELossWeights()
    terms = DecoderDistillation(twin, teacher, weights, teacher_weight=2.0)(x)
    assert terms["teacher_l1"] == 0
    with torch.no_grad():
        expected = reconstruction_losses(teacher.decode(teacher.encode(x).latent_dist.mean).sample, x, weights)
    torch.testing.assert_close(terms["loss"], expected["loss"])
    fresh = DecoderDistillation(student_vae(teacher, WIDTHS), teacher, weights, teacher_weight=2.0)
    with_teacher = fresh(x)
    assert with_teacher["teacher_l1"] > 0
    fresh.teacher_weight = 0.0
    without = fresh(x)
    assert "teacher_l1" not in without
    torch.testing.assert_close(with_teacher["loss"] - without["loss"], 2.0 * with_teacher["teacher_l1"])
    fresh.train()
    assert fresh.student.training and not fresh.teacher.training  # the teacher stays in eval mode


def test_inherited_decoder_is_a_cut_of_the_teachers(teacher):
    z = teacher.encode(video()).latent_dist.mean
    full = student_vae(teacher, teacher.config.decoder_num_features, inherit=True)
    with torch.no_grad():  # at the teacher's widths the cut keeps every channel: the teacher itself
        torch.testing.assert_close(full.decode(z).sample, teacher.decode(z).sample, rtol=0, atol=0)
    cut = student_vae(teacher, WIDTHS, inherit=True).decoder
    first = cut.blocks[1].weight  # latent -> the first width group: its rows are some of the teacher's rows
    rows = teacher.decoder.blocks[1].weight.flatten(1)
    assert all(any(torch.equal(row, kept) for kept in rows) for row in first.flatten(1))
    with pytest.raises(ValueError, match="wider teacher"):
        student_vae(teacher, (128, 8, 8, 8), inherit=True)
    assert can_cut(teacher, WIDTHS) and not can_cut(teacher, (128, 8, 8, 8))
    auto = student_vae(teacher, WIDTHS, inherit=None).decoder  # the default: cut where it can
    assert torch.equal(auto.blocks[1].weight, cut.blocks[1].weight)


def test_cut_finds_a_decoder_hidden_among_dead_channels():
    """A small decoder written into scattered channels of a wider one whose other channels are dead (zero
    weights): the cut must pick exactly those channels, through the MemBlocks' [frame, memory] input and the
    TGrows' stacked outputs, and decode as the small one does."""
    torch.manual_seed(0)
    kept, widths = (8, 6, 6, 4), dict(enumerate((12, 10, 9, 7)))
    small, wide = TAEHVDecoder(4, kept), TAEHVDecoder(4, tuple(widths.values()))
    places = {g: torch.randperm(widths[g])[:k].sort().values for g, k in enumerate(kept)}
    with torch.no_grad():
        for (to, g_in, g_out, c_in, c_out), (into, *_) in zip(_decoder_convs(small), _decoder_convs(wide),
                                                              strict=True):
            into.weight.zero_()
            rows = _copies(places.get(g_out), widths.get(g_out, 0), c_out)
            columns = _copies(places.get(g_in), widths.get(g_in, 0), c_in)
            rows = torch.arange(into.out_channels)[rows]
            columns = torch.arange(into.in_channels)[columns]
            into.weight[rows[:, None], columns] = to.weight
            if into.bias is not None:
                into.bias.zero_()
                into.bias[rows] = to.bias
        cut = TAEHVDecoder(4, kept)
        inherit_decoder(cut, wide)
        z = torch.randn(1, 4, 2, 4, 4)
        torch.testing.assert_close(cut(z), small(z))


def test_official_scale_config_at_reduced_widths():
    """The release's case: a native causal decoder (Pyramid-Flow's) as the teacher, a TAEHV-style student."""
    config = {**reduced_official_preset().vae, "decoder_type": "causal", "decoder_block_out_channels": [8, 8, 8, 8],
              "decoder_layers_per_block": [1, 1, 1, 1], "decoder_norm_num_groups": 4}
    native = AsymmetricCausalVideoVAE(**config).eval()
    student = student_vae(native, WIDTHS)
    assert student.config.decoder_type == "taehv" and student.config.encoder_out_channels == 16
    terms = DecoderDistillation(student, native)(video(size=16))
    terms["loss"].backward()
    assert all(p.grad is None for p in student.encoder.parameters())
    assert student.decoder.blocks[1].weight.grad is not None
    with pytest.raises(ValueError, match="TAEHV-style teacher"):
        student_vae(native, WIDTHS, inherit=True)
    assert not can_cut(native, WIDTHS)
    student_vae(native, WIDTHS, inherit=None)  # the default starts fresh from a native decoder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distill-decoder")
    config = TrainConfig(output_dir=str(folder), max_steps=2, batch_size=1, warmup_steps=1, save_every=2,
                         log_every=1)
    metrics = distill_decoder(config, "nano", WIDTHS, crop=32, num_frames=9, eval_videos=1)
    return folder, metrics


def test_one_step_writes_the_student_and_the_checkpoint(run):
    folder, metrics = run
    assert [r["step"] for r in read_log(folder)] == [1, 2] and "teacher_l1" in read_log(folder)[0]
    assert metrics["student_decoder_parameters"] < metrics["teacher_decoder_parameters"] / 4
    assert json.loads((folder / "final" / "metrics.json").read_text()) == metrics
    checkpoint = folder / "checkpoint"
    assert not (checkpoint / "adapters").exists()  # the teacher's decoder adapters do not fit the new decoder
    bundle = bundled_weights("nano")
    dit = "diffusion_transformer_320p_multistep_t2v/diffusion_pytorch_model.safetensors"
    assert (checkpoint / dit).read_bytes() == (bundle / dit).read_bytes()
    vae_config = json.loads((checkpoint / "causal_video_vae" / "config.json").read_text())
    assert vae_config["decoder_num_features"] == list(WIDTHS) and "_name_or_path" not in vae_config


def test_resume_continues_from_the_checkpoint(run, tmp_path):
    import shutil

    folder, _ = run
    shutil.copytree(folder, tmp_path / "run")
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=3, batch_size=1, warmup_steps=1, save_every=3,
                         log_every=1)
    distill_decoder(config, "nano", WIDTHS, crop=32, num_frames=9, eval_videos=1)
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1, 2, 3]


def test_exported_checkpoint_loads_and_generates(run):
    folder, _ = run
    pipe = NeodragonPipeline.from_pretrained(folder / "checkpoint")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.decoder_num_features == list(WIDTHS)
    frames = pipe("a red circle moving to the right", num_frames=9, num_inference_steps=1, output_type="np",
                  generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 9, 128, 128, 3)


def test_cli_rejects_bad_widths(tmp_path):
    result = CliRunner().invoke(app, ["distill", "decoder", "-o", str(tmp_path / "x"), "--widths", "16,8"])
    assert result.exit_code != 0 and "four positive widths" in result.output
    assert not (tmp_path / "x").exists()


def test_two_process_distillation_smoke(tmp_path):
    log = run_two_processes(tmp_path / "ddp", "distill", "decoder", "--widths", "16,8,8,8", "--steps", "2",
                            "--batch-size", "1", "--save-every", "2", "--crop", "32", "--num-frames", "9",
                            "--eval-videos", "1")
    assert log[-1]["step"] == 2
    assert (tmp_path / "ddp" / "checkpoint" / "causal_video_vae" / "config.json").is_file()
