"""Recipe 3, block pruning: importance on a DiT with a known identity block, the pruned DiT and checkpoint folder,
the stage-2 loss on known inputs, and both recovery stages (one step, resume, 2 processes)."""

import json
import shutil

import pytest
import torch
from conftest import run_two_processes
from typer.testing import CliRunner

from neodragon.cli import app
from neodragon.models.mmdit import PyramidMMDiT
from neodragon.pipelines import NeodragonPipeline
from neodragon.pipelines.neodragon import SUBFOLDERS
from neodragon.presets import create_random_checkpoint, load_pipeline, load_video_vae, nano_teacher_preset
from neodragon.recipes.prune import apply_pruning, measure_importance, read_pruning, recover, stored_dtype
from neodragon.training.flow_matching import flow_matching_loss
from neodragon.training.latents import CaptionEncodings, LatentCache, PipelineConditioning, encode_latents
from neodragon.training.pruning import (
    RecoveryWeights,
    block_mapping,
    kept_blocks,
    prune_blocks,
    recovery_loss,
)
from neodragon.training.trainer import LOG_FILE, TrainConfig, read_log

DIT = SUBFOLDERS["monolithic", "transformer"]
IDENTITY = 2


def make_identity(dit: PyramidMMDiT, index: int) -> None:
    """Zero a block's AdaLN-Zero modulation: its gates are then 0, so it returns both streams unchanged."""
    block = dit.transformer_blocks[index]
    for norm in (block.norm1, block.norm1_context):
        torch.nn.init.zeros_(norm.linear.weight)
        torch.nn.init.zeros_(norm.linear.bias)


@pytest.fixture(scope="module")
def identity_checkpoint(tmp_path_factory):
    """A random nano-teacher checkpoint whose block 2 is the identity, sampled with 2 steps per stage."""
    root = create_random_checkpoint(nano_teacher_preset(), tmp_path_factory.mktemp("identity"))
    dit = PyramidMMDiT.from_pretrained(root / DIT)
    make_identity(dit, IDENTITY)
    dit.save_pretrained(root / DIT)
    config = json.loads((root / "pipeline_config.json").read_text())
    config["modes"]["monolithic"].update(num_inference_steps=[2, 2, 2], video_num_inference_steps=[1, 1, 1])
    (root / "pipeline_config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    return encode_latents(load_video_vae("nano"), tmp_path_factory.mktemp("latents"), num_videos=4, batch_size=2)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    return apply_pruning("nano", [1, 3], tmp_path_factory.mktemp("pruned") / "model")


def test_importance_scores_an_identity_block_zero(identity_checkpoint, tmp_path):
    result = measure_importance(identity_checkpoint, tmp_path, prompts=2, samples=1, heldout_videos=2,
                                prompt_set=None)
    layers = result["num_layers"]
    assert result["visual"][IDENTITY] < 1e-7 and result["text"][IDENTITY] < 1e-7
    others = [b for b in range(layers) if b != IDENTITY]
    assert min(result["visual"][b] for b in others) > 1e-5
    assert result["text"][layers - 1] is None  # the last block reads the text but does not update it
    assert min(result["text"][b] for b in others[:-1]) > 1e-5
    # 2 prompts x (unit 0: 2+2+2 steps, units 1-2: 1+1+1) DiT calls, CFG batched in each
    assert result["calibration"]["dit_calls"] == 2 * (6 + 3 + 3)
    losses = result["heldout_loss"]
    assert losses[str(IDENTITY)] == pytest.approx(losses["none"], rel=1e-5)
    assert all(losses[str(b)] != pytest.approx(losses["none"], rel=1e-3) for b in others[:-1])
    table = (tmp_path / "importance.md").read_text()
    assert table.count("\n") == layers + 3 and "(last, kept)" in table
    assert json.loads((tmp_path / "importance.json").read_text())["visual"] == result["visual"]


def test_prune_blocks_keeps_the_other_blocks_weights():
    dit = load_pipeline("nano").transformer
    pruned = prune_blocks(dit, [3, 1])
    assert pruned.config.num_layers == 4 and dit.config.num_layers == 6
    kept = kept_blocks(6, [1, 3])
    assert kept == [0, 2, 4, 5]
    for new, old in enumerate(kept):
        for (name, value), (_, original) in zip(pruned.transformer_blocks[new].state_dict().items(),
                                                dit.transformer_blocks[old].state_dict().items(), strict=True):
            assert torch.equal(value, original), name
    for bad, message in (([5], "must stay"), ([1, 1], "twice"), ([7], "cannot be dropped"),
                         ([0, 1, 2, 3, 4], "fewer than 2")):
        with pytest.raises(ValueError, match=message):
            prune_blocks(dit, bad)


def test_apply_writes_a_folder_that_loads_and_generates(pruned, tmp_path):
    record = read_pruning(pruned)
    assert record["kept"] == [0, 2, 4, 5] and record["dropped"] == [1, 3] and record["recovery"] == []
    assert stored_dtype(pruned / DIT) == torch.float16  # as the bundle stores it
    pipe = NeodragonPipeline.from_pretrained(pruned)
    assert pipe.transformer.config.num_layers == 4
    video = pipe("a red circle", num_inference_steps=1, generator=torch.Generator().manual_seed(0),
                 output_type="pt").frames
    assert video.shape == (1, 17, 3, 128, 128) and torch.isfinite(video).all()
    runner = CliRunner()
    result = runner.invoke(app, ["prune", "apply", "nano", "--drop", "1", "-o", str(pruned)])
    assert result.exit_code != 0 and "--overwrite" in result.output
    result = runner.invoke(app, ["prune", "apply", "nano", "--drop", "5", "-o", str(tmp_path / "x")])
    assert result.exit_code != 0 and "must stay" in result.output
    (tmp_path / "importance.json").write_text("{}")
    result = runner.invoke(app, ["prune", "importance", "nano", "-o", str(tmp_path)])
    assert result.exit_code != 0 and "--overwrite" in result.output
    result = runner.invoke(app, ["prune", "recover", "nano", "--stage", "1", "--latents", str(tmp_path),
                                 "-o", str(tmp_path / "run")])
    assert result.exit_code != 0 and "pruning.json" in result.output


def test_block_mapping_rules():
    assert block_mapping([0, 2, 4, 5], 6, "simple") == [0, 2, 4, 5]
    assert block_mapping([0, 2, 4, 5], 6, "next") == [1, 3, 4, 5]
    with pytest.raises(ValueError, match="simple"):
        block_mapping([0, 1], 2, "nearest")


def _batch(pipe, latents):
    cache = LatentCache(latents)
    video, captions = cache.batch(range(2))
    return {"latents": video, "encoding": CaptionEncodings(PipelineConditioning(pipe), captions).encode(captions),
            "unit": 1, "stage": 2, "generator": torch.Generator().manual_seed(0)}


def test_recovery_loss_is_plain_flow_matching_when_an_identity_block_is_dropped(identity_checkpoint, latents):
    pipe = NeodragonPipeline.from_pretrained(identity_checkpoint, torch_dtype=torch.float32)
    teacher = pipe.transformer.eval()
    student = prune_blocks(teacher, [IDENTITY])
    mapping = block_mapping(kept_blocks(6, [IDENTITY]), 6)
    weights = RecoveryWeights(visual=1.0, text=1.0, teacher=1.0, ground_truth=1.0)
    losses = recovery_loss(student, teacher, pipe.scheduler, _batch(pipe, latents), mapping, weights)
    assert losses["visual"] < 1e-10 and losses["text"] < 1e-6 and losses["to_teacher"] < 1e-10
    batch = _batch(pipe, latents)
    enc = batch["encoding"]
    plain = flow_matching_loss(teacher, pipe.scheduler, batch["latents"], enc.tokens, enc.mask, enc.pooled, 1, 2,
                               batch["generator"])["loss"]
    torch.testing.assert_close(losses["to_truth"], plain, rtol=1e-5, atol=1e-6)
    # a real block dropped: every term is positive, and only the student gets gradients
    student = prune_blocks(teacher, [1])
    losses = recovery_loss(student, teacher, pipe.scheduler, _batch(pipe, latents), block_mapping([0, 2, 3, 4, 5], 6),
                           weights)
    assert all(losses[k] > 1e-6 for k in ("visual", "text", "to_teacher"))
    losses["loss"].backward()
    assert student.proj_out.weight.grad is not None and teacher.proj_out.weight.grad is None


def config(run, steps):
    return TrainConfig(output_dir=str(run), max_steps=steps, batch_size=2, warmup_steps=1, save_every=2, log_every=1)


@pytest.mark.parametrize("stage", [1, 2])
def test_recovery_resumes_exactly_and_exports(stage, pruned, latents, tmp_path):
    straight = recover(config(tmp_path / "straight", 4), pruned, stage, latents).parent
    log = read_log(straight)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    if stage == 2:
        assert {"visual", "text", "to_teacher", "to_truth"} <= set(log[-1])
    interrupted = tmp_path / "interrupted"  # the same run, cut off after its step-2 checkpoint
    shutil.copytree(straight, interrupted, ignore=shutil.ignore_patterns("step_4", "final", "checkpoint"))
    (interrupted / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in log[:2]))
    resumed = recover(config(interrupted, 4), pruned, stage, latents)
    assert [r["loss"] for r in read_log(interrupted)] == [r["loss"] for r in log]
    a, b = (PyramidMMDiT.from_pretrained(run / "final") for run in (straight, interrupted))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    record = read_pruning(resumed)
    assert record["recovery"] == [{"stage": stage, "steps": 4, "run": "interrupted",
                                   **({"mapping": "simple", "weights": vars(RecoveryWeights())} if stage == 2
                                      else {})}]
    assert stored_dtype(resumed / DIT) == torch.float16
    assert NeodragonPipeline.from_pretrained(resumed).transformer.config.num_layers == 4


def test_stage_two_runs_as_two_processes(pruned, latents, tmp_path):
    log = run_two_processes(tmp_path / "run", "prune", "recover", str(pruned), "--stage", "2", "--latents",
                            str(latents), "--steps", "2", "--batch-size", "1", "--save-every", "2")
    assert log[-1]["step"] == 2
    assert (tmp_path / "run" / "checkpoint" / "pruning.json").is_file()
