"""`neodragon train vae`: the nano teacher's causal video VAE, trained on ShapesWorld crops."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from accelerate.utils import set_seed

from ..eval.reconstruction import judged_reconstructions, reconstruction_psnr
from ..models.vae import AsymmetricCausalVideoVAE
from ..presets import nano_teacher_preset
from ..training.clips import clip_batch, video_batch
from ..training.trainer import TrainConfig, Trainer, cycle_indices
from ..training.vae import (
    VAELossWeights,
    VAEObjective,
    latent_statistics,
    start_nearly_deterministic,
    variance_preserving_init,
)


def initial_teacher_vae() -> AsymmetricCausalVideoVAE:
    """The nano teacher VAE as ``train_vae`` starts it: variance-preserving init, nearly deterministic posterior."""
    vae = AsymmetricCausalVideoVAE(**nano_teacher_preset().vae)
    variance_preserving_init(vae)
    start_nearly_deterministic(vae)
    return vae


def train_vae(config: TrainConfig, num_frames: int = 17, size: int = 128, crop: int | None = 64,
              weights: VAELossWeights | None = None, eval_videos: int = 32, init_from: str | Path | None = None,
              freeze_encoder: bool = False, styles: Sequence[str] = ("none",)) -> dict:
    """Train the teacher VAE, then write ``final/``: the model with its latent statistics in its config, and
    ``metrics.json`` (held-out PSNR, the judge on reconstructions).

    ``init_from`` starts from a trained VAE folder; with ``freeze_encoder`` only the decoder side trains, so the
    latent space (and any latent cache or DiT built on it) stays valid while the reconstructions improve.
    Training clips are drawn in ``styles``; the latent statistics are always measured on unstyled videos.
    """
    set_seed(config.seed)  # before the model is built: the same seed gives the same initial weights
    weights = weights or VAELossWeights()
    vae = AsymmetricCausalVideoVAE.from_pretrained(init_from) if init_from is not None else initial_teacher_vae()
    if freeze_encoder:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)

    def batch_fn(step: int, rank: int, world: int) -> dict:
        videos, coverage, _ = clip_batch("train", cycle_indices(step, rank, world, config.batch_size), num_frames,
                                         size, crop, config.seed, styles)
        return {"video": videos.to(trainer.accelerator.device), "coverage": coverage.to(trainer.accelerator.device)}

    trainer = Trainer(config, {"objective": VAEObjective(vae, weights)}, batch_fn,
                      lambda batch: trainer.modules["objective"](batch["video"], batch["coverage"]))
    trainer.resume()
    trainer.fit()
    metrics = {}
    if trainer.accelerator.is_main_process:
        model = trainer.unwrap("objective").vae.eval()
        videos, _ = video_batch("eval", range(eval_videos), 17, size, seed=config.seed)
        stats = latent_statistics(model, videos)
        model.register_to_config(**stats)
        metrics = {"eval_psnr_db": reconstruction_psnr(model, videos), "eval_videos": eval_videos, **stats,
                   "judge_accuracy": judged_reconstructions(model, eval_videos, config.seed)}
        final = Path(config.output_dir) / "final"
        model.save_pretrained(final)
        (final / "metrics.json").write_text(json.dumps(metrics, indent=2))
    trainer.accelerator.wait_for_everyone()
    return metrics
