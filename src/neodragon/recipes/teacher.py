"""`neodragon train teacher` and `neodragon train export-teacher`: the nano teacher DiT, trained with pyramidal
flow matching on a latent cache, and the runnable checkpoint folder assembled from it and a trained VAE."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import set_seed
from torch import nn

from ..models.mmdit import JointTransformerBlock, PyramidMMDiT
from ..models.sentence import SentenceTextEncoder
from ..pipelines.neodragon import SUBFOLDERS, PipelineConfig
from ..presets import load_video_vae, nano_teacher_preset
from ..schedulers import PyramidFlowMatchScheduler
from ..training.flow_matching import (
    FlowMatchingConfig,
    batch_flow_matching_loss,
    flow_matching_batches,
    sample_unit_and_stage,
)
from ..training.latents import CaptionEncodings, LatentCache
from ..training.trainer import TrainConfig, Trainer, cpu_only
from ..utils.checkpoint import strip_machine_paths


def teacher_dit_config(layers: int | None = None, heads: int | None = None, patch_size: int | None = None,
                       sample_size: int | None = None) -> dict:
    """The nano teacher DiT's config, optionally deeper/shallower (``layers``), wider/narrower (``heads`` of the
    preset's head width), with another ``patch_size`` (1: a token per latent pixel, four times the tokens) or another
    ``sample_size``, which only sets the spacing of the fixed sincos position table: ``sample_size / patch_size /
    pos_embed_max_size`` per token. A resumed run must be given the same size."""
    config = dict(nano_teacher_preset().dit)
    if sample_size is not None:
        if sample_size < config["patch_size"]:
            raise ValueError(f"sample_size must be at least the patch size, got {sample_size}.")
        config["sample_size"] = sample_size
    if patch_size is not None:
        if patch_size not in (1, 2):
            raise ValueError(f"patch_size must be 1 or 2 (the nano latent's smallest stage is 4 x 4), "
                             f"got {patch_size}.")
        config["patch_size"] = patch_size
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}.")
        config["num_layers"] = layers
    if heads is not None:
        if heads < 1:
            raise ValueError(f"heads must be >= 1, got {heads}.")
        config["num_attention_heads"] = heads
        config["caption_projection_dim"] = heads * config["attention_head_dim"]  # the inner width, as in the release
    return config


def train_teacher(config: TrainConfig, latents_dir: str | Path | Sequence[str | Path],
                  objective: FlowMatchingConfig | None = None, init_from: str | Path | None = None,
                  dit_config: dict | None = None, compile_blocks: bool = False) -> None:
    """Pyramidal flow matching of the nano teacher DiT on cached latents (one or more folders, see
    ``LatentCache``), text from the frozen MiniLM. ``init_from`` starts a new run from a trained DiT folder (a
    ``final/`` or a bundle's transformer); a run folder with checkpoints resumes from them instead.
    ``dit_config`` (``teacher_dit_config``) sets the DiT's size; the default is the preset's. ``compile_blocks``
    compiles the transformer blocks with dynamic shapes (`compile_repeated_blocks`): the same numbers, fewer
    kernel launches, after a compile of a minute or two."""
    objective = objective or FlowMatchingConfig()
    set_seed(config.seed)  # before the DiT is built: the same seed gives the same initial weights
    cache, text = teacher_training_data(latents_dir, PartialState(cpu=cpu_only()).device)
    scheduler = PyramidFlowMatchScheduler()
    # fails now, before anything is written, if the unit or stage weights do not fit these latents
    sample_unit_and_stage(cache.latents.shape[2], scheduler.config.stages, config.seed, 0, objective.unit_weights,
                          objective.stage_weights)
    dit = _initial_dit(dit_config or teacher_dit_config(), init_from)
    if compile_blocks:
        dit.compile_repeated_blocks(dynamic=True)
    batches = flow_matching_batches(cache, text, config, objective, scheduler.config.stages)
    trainer = Trainer(config, {"dit": dit}, batches,
                      lambda batch: batch_flow_matching_loss(trainer.modules["dit"], scheduler, batch, objective))
    trainer.resume()
    trainer.fit()
    if trainer.accelerator.is_main_process:
        _save_final_dit(trainer, Path(config.output_dir), objective)
    trainer.accelerator.wait_for_everyone()


def _save_final_dit(trainer: Trainer, output_dir: Path, objective: FlowMatchingConfig) -> None:
    """``final/``: the DiT to export, the weight average when the run keeps one (then the last weights go to
    ``final-raw/``, for comparison)."""
    if trainer.ema is not None:
        trainer.unwrap("dit").save_pretrained(output_dir / "final-raw")
    with trainer.averaged_weights():
        trainer.unwrap("dit").save_pretrained(output_dir / "final")
    (output_dir / "final" / "objective.json").write_text(json.dumps(asdict(objective), indent=2))


def teacher_training_data(latents_dir: str | Path | Sequence[str | Path],
                          device: torch.device | str) -> tuple[LatentCache, CaptionEncodings]:
    """The latent cache and the frozen MiniLM's encodings of its captions, both held on ``device``."""
    preset = nano_teacher_preset()
    cache = LatentCache(latents_dir).to(device)
    encoder = SentenceTextEncoder.from_source(preset.text["sentence_encoder"], preset.text["max_sequence_length"])
    return cache, CaptionEncodings(encoder.to(device), cache.captions)


def _initial_dit(config: dict, init_from: str | Path | None) -> PyramidMMDiT:
    if init_from is None:
        return PyramidMMDiT(**config)
    dit = PyramidMMDiT.from_pretrained(init_from).float()
    if dit.config.sample_size != config["sample_size"]:
        dit = respace_positions(dit, config["sample_size"])
    mismatched = {k: (v, dit.config.get(k)) for k, v in config.items() if dit.config.get(k) != v}
    if set(mismatched) == {"num_layers"} and config["num_layers"] > dit.config.num_layers:
        return grow_depth(dit, config["num_layers"])
    if mismatched:
        raise ValueError(f"{init_from} is not a nano teacher DiT of this size: config differs in {mismatched} "
                         "(--init-from takes a `train teacher` final/ folder or a bundle's transformer folder; give "
                         "the --heads and --patch-size it was trained with, and --layers at least its depth).")
    return dit


def respace_positions(dit: PyramidMMDiT, sample_size: int) -> PyramidMMDiT:
    """``dit`` with its fixed sincos position table rebuilt for ``sample_size`` (another spacing) and every trained
    weight kept: the blocks then learn to read the new table."""
    config = {key: value for key, value in dit.config.items() if not key.startswith("_")}
    respaced = PyramidMMDiT(**{**config, "sample_size": sample_size})
    state = {key: value for key, value in dit.state_dict().items() if key != "pos_embed.pos_embed"}
    missing, unexpected = respaced.load_state_dict(state, strict=False)
    assert missing == ["pos_embed.pos_embed"] and not unexpected, (missing, unexpected)
    return respaced


def grow_depth(dit: PyramidMMDiT, num_layers: int, seed: int = 0) -> PyramidMMDiT:
    """``dit`` with ``num_layers`` blocks and the same function: new blocks are placed after the old ones in turn
    (never after the last, which only reads the text) with zeroed AdaLN-Zero modulation, so each starts as the
    identity on both streams and learns its gates first, as a fresh DiT's blocks do."""
    old = list(dit.transformer_blocks)
    if not 2 <= len(old) < num_layers:
        raise ValueError(f"Growing needs a DiT of at least 2 layers and a larger depth; got {len(old)} -> "
                         f"{num_layers}.")
    width, heads = dit.config.num_attention_heads * dit.config.attention_head_dim, dit.config.num_attention_heads
    extra = [0] * len(old)  # new blocks after each old one; the last old block gets none
    for i in range(num_layers - len(old)):
        extra[i % (len(old) - 1)] += 1
    blocks = []
    with torch.random.fork_rng():  # seeded weights, without touching the caller's random state
        torch.manual_seed(seed)
        for index, block in enumerate(old):
            blocks.append(block)
            for _ in range(extra[index]):
                new = JointTransformerBlock(width, heads, context_pre_only=False)
                for norm in (new.norm1, new.norm1_context):
                    nn.init.zeros_(norm.linear.weight)
                    nn.init.zeros_(norm.linear.bias)
                blocks.append(new)
    dit.transformer_blocks = nn.ModuleList(blocks)
    dit.register_to_config(num_layers=num_layers)
    return dit


def export_teacher(vae_source: str | Path, dit_dir: str | Path, out_dir: str | Path,
                   dtype: torch.dtype = torch.float16, pipeline: PipelineConfig | None = None) -> Path:
    """Assemble a checkpoint folder in the official layout (weights cast to ``dtype``, fp16 for bundling); the
    configs name no folder of the machine that made them."""
    preset = nano_teacher_preset()
    out = Path(out_dir)
    load_video_vae(vae_source).to(dtype).save_pretrained(out / SUBFOLDERS["vae"])
    PyramidMMDiT.from_pretrained(dit_dir).to(dtype).save_pretrained(out / SUBFOLDERS["monolithic", "transformer"])
    SentenceTextEncoder.from_source(preset.text["sentence_encoder"],
                                    preset.text["max_sequence_length"]).save_pretrained(out)
    PyramidFlowMatchScheduler().save_pretrained(out / "scheduler")
    (pipeline or preset.pipeline).save(out)
    strip_machine_paths(out)
    return out
