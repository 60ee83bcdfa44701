"""`neodragon train first-frame` and `neodragon train export-hybrid`: the nano first-frame generator (the SSD-1B
role of hybrid mode), trained by rectified flow on cached frame-0 latents with the checkpoint's own frozen text
stack, and the hybrid checkpoint folder that pairs it with the checkpoint's multi-step DiT."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import set_seed

from ..models.first_frame import LATENT_UNET_SUBFOLDER, LatentFirstFrameGenerator, latent_unet
from ..pipelines.neodragon import ModeDefaults, PipelineConfig, load_text_stack
from ..presets import local_folder
from ..training.first_frame import first_frame_batches, first_frame_loss
from ..training.latents import CaptionEncodings, LatentCache
from ..training.trainer import TrainConfig, Trainer, cpu_only
from ..utils.checkpoint import strip_machine_paths


def train_first_frame(config: TrainConfig, latents_dir: str | Path | Sequence[str | Path], model: str | Path = "nano",
                      block_out_channels: Sequence[int] = (64, 96, 96), text_dropout: float = 0.1) -> Path:
    """Train a ``LatentFirstFrameGenerator`` on frame-0 latent folders, conditioned on the text stack of checkpoint
    ``model`` (whose VAE must have encoded the latents); writes ``final/`` (the weight average when the run keeps
    one) and returns it."""
    set_seed(config.seed)  # before the UNet is built: the same seed gives the same initial weights
    device = PartialState(cpu=cpu_only()).device
    cache = LatentCache(latents_dir).to(device)
    text = CaptionEncodings(load_text_stack(local_folder(model)).to(device), cache.captions)
    unet = latent_unet(cache.latents.shape[1], text.tokens.shape[-1], text.pooled.shape[-1], cache.latents.shape[-1],
                       tuple(block_out_channels))
    generator = LatentFirstFrameGenerator(unet)
    trainer = Trainer(config, {"generator": generator}, first_frame_batches(cache, text, config, text_dropout),
                      lambda batch: first_frame_loss(trainer.modules["generator"], batch))
    trainer.resume()
    trainer.fit()
    final = Path(config.output_dir) / "final"
    if trainer.accelerator.is_main_process:
        with trainer.averaged_weights():
            trainer.unwrap("generator").save_pretrained(final)
    trainer.accelerator.wait_for_everyone()
    return final


def export_hybrid(checkpoint: str | Path, generator_dir: str | Path, out_dir: str | Path,
                  num_inference_steps: int = 20, guidance_scale: float = 4.0,
                  video_defaults: ModeDefaults | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """``checkpoint`` (a monolithic folder) copied to ``out_dir`` with the first-frame generator of
    ``generator_dir`` (a `train first-frame` ``final/``, cast to ``dtype``) and hybrid mode as its default: frame 0
    from the generator, the later frames from the checkpoint's multi-step DiT with ``video_defaults`` (by default
    the monolithic mode's later-frame steps and guidance)."""
    source, out = local_folder(checkpoint), Path(out_dir)
    generator = LatentFirstFrameGenerator.from_pretrained(generator_dir, torch_dtype=dtype)
    config = PipelineConfig.load(source)
    later = config.modes["monolithic"]
    video_defaults = video_defaults or ModeDefaults(later.video_num_inference_steps, later.video_num_inference_steps,
                                                    later.video_guidance_scale, later.video_guidance_scale)
    config = dataclasses.replace(config, default_mode="hybrid", first_frame="latent_unet", hybrid_dit="multistep",
                                 first_frame_steps=num_inference_steps, first_frame_guidance=guidance_scale,
                                 modes={**config.modes, "hybrid": video_defaults})
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(LATENT_UNET_SUBFOLDER))
    generator.save_pretrained(tmp)
    config.save(tmp)
    strip_machine_paths(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
