"""Prompt-only text-encoder distillation (recipe 1): the loss on known inputs, the student's aligned tokenizer, the
prompt corpus, the DiT without its context embedder, the trajectory term, one step, resume, export -> load ->
generate, the official-scale path at reduced widths, 2 processes."""

import dataclasses
import json
import shutil

import pytest
import torch
from conftest import run_two_processes
from safetensors import safe_open
from typer.testing import CliRunner

from neodragon.cli import app
from neodragon.data import caption_vocabulary
from neodragon.eval.prompts import load_prompt_set
from neodragon.models.context_adapter import ContextAdapter
from neodragon.models.mmdit import PyramidMMDiT
from neodragon.models.sentence import SentenceTextEncoder
from neodragon.models.text import (
    StudentTextConfig,
    TextEncoderBundle,
    TextEncoding,
    student_text_stack,
    subset_tokenizer,
)
from neodragon.pipelines import NeodragonPipeline
from neodragon.presets import create_random_checkpoint, reduced_official_preset
from neodragon.recipes.distill_text_encoder import distill_text_encoder
from neodragon.training.text_distillation import (
    TextDistillation,
    TrajectoryRecorder,
    conditioning_loss,
    distillation_prompts,
    without_context_embedder,
)
from neodragon.training.trainer import TrainConfig, read_log

TINY = StudentTextConfig(d_model=32, num_layers=1, num_heads=2, d_ff=64, token_dim=32, pooled_hidden=32,
                         pooled_layers=1, adapter_depths=(32,))
DIT = "diffusion_transformer_320p_multistep_t2v"


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return SentenceTextEncoder.from_source().tokenizer


def test_conditioning_loss_on_known_inputs():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert conditioning_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    b = torch.tensor([[0.0, 1.0], [0.0, 2.0]])  # first pair orthogonal: MSE (1 + 1) / 2, cosine distance 1
    assert conditioning_loss(b[:1], a[:1]).item() == pytest.approx(1.0 + 0.1)
    tokens, target = b.unsqueeze(0), a.unsqueeze(0)
    mask = torch.tensor([[0, 1]])  # only the identical pair counts
    assert conditioning_loss(tokens, target, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert conditioning_loss(tokens, target, torch.tensor([[1, 1]])).item() == pytest.approx(1.1 / 2)


def test_subset_tokenizer_reads_grammar_prompts_exactly_as_the_teacher(minilm_tokenizer):
    prompts = distillation_prompts(200, seed=3)
    student = subset_tokenizer(minilm_tokenizer, [*prompts, *caption_vocabulary()], 32)
    assert len(student) < 300 < len(minilm_tokenizer)
    held_out = [entry.caption for entry in load_prompt_set("nano-heldout")]
    for prompt in [*prompts[:50], *held_out, ""]:
        ours = student.convert_ids_to_tokens(student(prompt).input_ids)
        assert ours == minilm_tokenizer.convert_ids_to_tokens(minilm_tokenizer(prompt).input_ids)
    assert student.convert_ids_to_tokens(student("a zebra").input_ids)[2] == "[UNK]"
    assert student.pad_token_id == 0 and student.sep_token_id != 2  # CLIP's legacy eos rule stays off


def test_distillation_prompts_are_distinct_deterministic_and_never_evaluation_prompts():
    evaluation = {entry.caption for entry in load_prompt_set("nano-eval")}
    prompts = distillation_prompts(300, seed=1, exclude=evaluation)
    assert len(set(prompts)) == 300 and not evaluation & set(prompts)
    assert prompts == distillation_prompts(300, seed=1, exclude=evaluation) != distillation_prompts(300, seed=2)
    words = {w for p in prompts for w in p.replace(",", " ").replace(".", " ").split()}
    assert {"neon", "stripes", "outline", "pixel", "orange", "bouncing"} <= words


def test_dit_without_context_embedder_gives_the_same_velocity():
    teacher = PyramidMMDiT(sample_size=8, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                           caption_projection_dim=16, pooled_projection_dim=12, pos_embed_max_size=8,
                           max_num_frames=8, joint_attention_dim=20, use_context_embedder=True).eval()
    student = without_context_embedder(teacher)
    assert student.context_embedder is None and not student.config.use_context_embedder
    latents, tokens = torch.randn(2, 4, 1, 8, 8), torch.randn(2, 5, 20)
    mask, pooled, t = torch.ones(2, 5, dtype=torch.long), torch.randn(2, 12), torch.tensor([500.0, 900.0])
    with torch.no_grad():
        expected = teacher([[latents]], tokens, mask, pooled, t)[0]
        got = student([[latents]], teacher.context_embedder(tokens), mask, pooled, t)[0]
    torch.testing.assert_close(got, expected)


def _student(minilm_tokenizer, prompts):
    tokenizer = subset_tokenizer(minilm_tokenizer, [*prompts, *caption_vocabulary()], 32)
    return student_text_stack(tokenizer, 384, TINY, 32), ContextAdapter(**TINY.adapter_config(128))


def test_modes_train_what_they_say(minilm_tokenizer):
    prompts = ["a red circle moving left", "a blue square"]
    for mode, dt5_trains in (("replace", False), ("trainable-dt5", True)):
        text, adapter = _student(minilm_tokenizer, prompts)
        objective = TextDistillation(text, adapter, mode).train()
        batch = {**text.tokenize(prompts), "target_tokens": torch.randn(2, 32, 128),
                 "target_pooled": torch.randn(2, 384)}
        terms = objective(batch)
        terms["loss"].backward()
        assert set(terms) == {"loss", "tokens", "pooled"}
        assert (text.token_encoder.final_projection[0].weight.grad is not None) == dt5_trains
        assert adapter.network_layers[0][1].weight.grad is not None
        assert text.pooled_encoders[0].text_projection.weight.grad is not None
        assert text.token_encoder.training == dt5_trains
    with pytest.raises(ValueError, match="unknown mode"):
        TextDistillation(text, adapter, "extend")


def test_pooled_weight_scales_only_the_pooled_term(minilm_tokenizer):
    prompts = ["a red circle moving left", "a blue square"]
    text, adapter = _student(minilm_tokenizer, prompts)
    batch = {**text.tokenize(prompts), "target_tokens": torch.randn(2, 32, 128), "target_pooled": torch.randn(2, 384)}
    with torch.no_grad():
        plain = TextDistillation(text, adapter)(batch)
        weighted = TextDistillation(text, adapter, pooled_weight=10.0)(batch)
    torch.testing.assert_close(weighted["pooled"], plain["pooled"])
    torch.testing.assert_close(weighted["loss"], plain["tokens"] + 10.0 * plain["pooled"])


def test_trajectory_term_is_zero_for_the_teachers_own_conditioning(tmp_path):
    """States recorded while a teacher samples, replayed through the DiT without its context embedder with the
    teacher's conditioning, give back the recorded velocities."""
    folder = create_random_checkpoint(_reduced_teacher_preset(), tmp_path)
    pipe = NeodragonPipeline.from_pretrained(folder, mode="monolithic")
    pipe.set_progress_bar_config(disable=True)
    recorder = TrajectoryRecorder(pipe.transformer, cfg=True)
    prompts = ["a red circle", "a blue square moving left"]
    pipe(prompts, num_frames=1, num_inference_steps=2, guidance_scale=3.0, output_type="latent", prompt_modifier="",
         generator=torch.Generator().manual_seed(0), height=64, width=64)
    recorder.remove()
    assert len(recorder.states) == 6 and recorder.states[0]["latents"].shape[0] == 2
    cond = pipe.encode_prompt(prompts)
    adapter = ContextAdapter(**TINY.adapter_config(32, pipe.text_encoder.token_dim))
    text = TextDistillation(pipe.text_encoder, adapter, transformer=without_context_embedder(pipe.transformer),
                            trajectory_weight=1.0)
    teacher_tokens = TextEncoding(pipe.transformer.context_embedder(cond.context), cond.mask, cond.pooled)
    for state in recorder.states:
        with torch.no_grad():
            loss = text.trajectory_loss(teacher_tokens, {**state, "prompt": torch.arange(2)})
        assert loss.item() < 1e-10


def _reduced_teacher_preset():
    """The official layout at test size as a Pyramid-Flow-style teacher: a TextEncoderBundle whose DT5 plays
    T5-XXL, read by the DiT through its own context_embedder."""
    preset = reduced_official_preset()
    preset.dit = {**preset.dit, "use_context_embedder": True}
    preset.context_adapter = None
    preset.ssd_1b = None
    preset.modes = ("monolithic",)
    preset.pipeline = dataclasses.replace(preset.pipeline, default_mode="monolithic")
    return preset


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distill-text")
    config = TrainConfig(output_dir=str(folder), max_steps=2, batch_size=4, warmup_steps=1, save_every=2,
                         log_every=1)
    metrics = distill_text_encoder(config, "nano", student=TINY, num_prompts=40, trajectory_weight=0.5,
                                   trajectory_prompts=2)
    return folder, metrics


def test_one_step_writes_the_student_and_the_checkpoint(run):
    folder, metrics = run
    log = read_log(folder)
    assert [r["step"] for r in log] == [1, 2] and {"tokens", "pooled", "trajectory"} <= set(log[0])
    assert metrics["student_text_parameters"] * 10 <= metrics["teacher_text_parameters"]
    assert metrics["nano-eval"]["aligned_prompts"] == metrics["nano-eval"]["prompts"] == 93
    assert json.loads((folder / "final" / "metrics.json").read_text()) == metrics
    checkpoint = folder / "checkpoint"
    for name in ("tokenizer_3", "text_encoder_3", "text_encoder", "text_encoder_2", "context_adapter_multistep_t2v"):
        assert (checkpoint / name).is_dir(), name
    assert not (checkpoint / "text_encoder" / "sentence_encoder.json").exists()
    assert json.loads((checkpoint / DIT / "config.json").read_text())["use_context_embedder"] is False
    # the teacher's first-frame generator reads the text stack the student replaced: left out
    assert not (checkpoint / "first_frame_unet").exists()
    assert json.loads((checkpoint / "pipeline_config.json").read_text())["first_frame"] == "pyramid_dit"
    student = [*checkpoint.glob("text_encoder*/*.safetensors"), *checkpoint.glob("context_adapter*/*.safetensors")]
    assert len(student) == 4
    for weights in student:  # stored fp16, for bundling
        with safe_open(str(weights), "pt") as handle:
            assert {handle.get_slice(key).get_dtype() for key in handle.keys()} == {"F16"}, weights  # noqa: SIM118


def test_resume_continues_from_the_checkpoint(run, tmp_path):
    folder, _ = run
    shutil.copytree(folder, tmp_path / "run")
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=3, batch_size=4, warmup_steps=1, save_every=3,
                         log_every=1)
    distill_text_encoder(config, "nano", student=TINY, num_prompts=40)
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1, 2, 3]


def test_exported_checkpoint_loads_and_generates(run):
    folder, _ = run
    pipe = NeodragonPipeline.from_pretrained(folder / "checkpoint")
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.text_encoder, TextEncoderBundle) and pipe.context_adapter is not None
    assert {p.dtype for p in pipe.text_encoder.parameters()} == {torch.float32}  # fp16 on disk, float32 loaded
    assert pipe.transformer.context_embedder is None
    frames = pipe("a red circle moving to the right", num_frames=9, num_inference_steps=1, output_type="np",
                  generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 9, 128, 128, 3)


def test_official_scale_path_at_reduced_widths(tmp_path):
    """The release's case: the teacher's own T5-family encoder and tokenizer stay the student's starting point
    (--init-text-encoder, the released DT5), Replace mode trains only the ContextAdapter, on the user's prompts with
    the teacher run on each batch."""
    teacher = create_random_checkpoint(_reduced_teacher_preset(), tmp_path / "teacher")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\n\na blue square\na red circle moving left\na cat on a beach\n")
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=1, batch_size=3, warmup_steps=1, save_every=1,
                         log_every=1)
    distill_text_encoder(config, str(teacher), "replace", TINY, init_text_encoder=teacher, prompts_file=prompts,
                         cache_targets=False)
    assert not (tmp_path / "run" / "teacher_targets.safetensors").exists()
    pipe = NeodragonPipeline.from_pretrained(tmp_path / "run" / "checkpoint", mode="monolithic")
    assert pipe.context_adapter.config.output_dims == 32 and pipe.transformer.context_embedder is None


def test_release_sizes_match_the_released_context_adapter():
    from neodragon.models.context_adapter import context_adapter_num_parameters

    release = StudentTextConfig.release()
    config = release.adapter_config(output_dims=1536)
    assert config["layer_depths"] == [4096] * 4 and config["input_dims"] == 4096
    assert abs(context_adapter_num_parameters(**config) - 130.0e6) / 130.0e6 < 0.01  # ~130.0 M (reference §2)


def test_cli_rejects_an_unknown_mode(tmp_path):
    result = CliRunner().invoke(app, ["distill", "text-encoder", "-o", str(tmp_path / "x"), "--mode", "extend"])
    assert result.exit_code != 0 and "--mode must be one of" in result.output
    assert not (tmp_path / "x").exists()


def test_two_process_distillation_smoke(tmp_path):
    log = run_two_processes(tmp_path / "ddp", "distill", "text-encoder", "--steps", "2", "--batch-size", "4",
                            "--save-every", "2", "--prompts", "32")
    assert log[-1]["step"] == 2
    assert (tmp_path / "ddp" / "checkpoint" / "text_encoder_3" / "config.json").is_file()


def test_the_multi_gpu_accelerate_config_is_valid():
    from pathlib import Path

    from accelerate.commands.config.config_args import ClusterConfig

    path = Path(__file__).parents[1] / "configs" / "accelerate" / "multi-gpu.yaml"
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type == "MULTI_GPU" and config.mixed_precision == "bf16" and config.num_processes > 1
