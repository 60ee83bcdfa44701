"""`neodragon train first-frame` and `neodragon train export-hybrid`: the nano first-frame generator (the SSD-1B
role of hybrid mode), trained by rectified flow on cached frame-0 latents with the checkpoint's own frozen text
stack, and the hybrid checkpoint folder that pairs it with the checkpoint's multi-step DiT."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import set_seed

from ..models.first_frame import LATENT_UNET_SUBFOLDER, LatentFirstFrameGenerator, latent_unet
from ..pipelines.neodragon import PipelineConfig, load_text_stack
from ..presets import local_folder
from ..training.first_frame import first_frame_batches, first_frame_loss
from ..training.latents import CaptionEncodings, LatentCache
from ..training.trainer import TrainConfig, Trainer, cpu_only
from ..utils.checkpoint import strip_machine_paths
from ..utils.video import atomic_folder


def train_first_frame(config: TrainConfig, latents_dir: str | Path | Sequence[str | Path], model: str | Path = "nano",
                      block_out_channels: Sequence[int] = (64, 96, 96), text_dropout: float = 0.1,
                      object_weight: float = 0.0) -> Path:
    """Train a ``LatentFirstFrameGenerator`` on frame-0 latent folders, conditioned on the text stack of checkpoint
    ``model`` (whose VAE must have encoded the latents); writes ``final/`` (the weight average when the run keeps
    one) and returns it. ``object_weight`` weighs the latent pixels that hold objects ``1 + object_weight`` times
    (``first_frame_batches``)."""
    set_seed(config.seed)  # before the UNet is built: the same seed gives the same initial weights
    device = PartialState(cpu=cpu_only()).device
    cache = LatentCache(latents_dir).to(device)
    text = CaptionEncodings(load_text_stack(local_folder(model)).to(device), cache.captions)
    unet = latent_unet(cache.latents.shape[1], text.tokens.shape[-1], text.pooled.shape[-1], cache.latents.shape[-1],
                       tuple(block_out_channels))
    generator = LatentFirstFrameGenerator(unet)
    batches = first_frame_batches(cache, text, config, text_dropout, object_weight)
    trainer = Trainer(config, {"generator": generator}, batches,
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
                  dtype: torch.dtype = torch.float16, hybrid_default: bool = True) -> Path:
    """``checkpoint`` (a monolithic folder) copied to ``out_dir`` with the first-frame generator of
    ``generator_dir`` (a `train first-frame` ``final/``, cast to ``dtype``) and hybrid mode
    (``PipelineConfig.with_latent_first_frame``): frame 0 from the generator, the later frames from the
    checkpoint's multi-step DiT. Hybrid becomes the default mode unless ``hybrid_default`` is False."""
    source, out = local_folder(checkpoint), Path(out_dir)
    generator = LatentFirstFrameGenerator.from_pretrained(generator_dir, torch_dtype=dtype)
    config = PipelineConfig.load(source).with_latent_first_frame(num_inference_steps, guidance_scale, hybrid_default)
    with atomic_folder(out, overwrite=True) as tmp:
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(LATENT_UNET_SUBFOLDER), dirs_exist_ok=True)
        generator.save_pretrained(tmp)
        config.save(tmp)
        strip_machine_paths(tmp)
    return out
