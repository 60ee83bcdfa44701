"""Rectified-flow training of a first-frame generator on cached frame-0 latents (`train encode-latents
--first-frames`): the UNet regresses the velocity ``noise - latent`` at ``sigma ~ U(0, 1)``, with captions dropped
to the empty prompt so that it can be sampled with classifier-free guidance, and optionally the latent pixels that
hold objects weighted up."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..models.first_frame import LatentFirstFrameGenerator
from .flow_matching import drop_captions, step_generator
from .latents import CaptionEncodings, LatentCache
from .trainer import TrainConfig, cycle_indices


def first_frame_batches(cache: LatentCache, text: CaptionEncodings, config: TrainConfig,
                        text_dropout: float = 0.1, object_weight: float = 0.0) -> Callable[[int, int, int], dict]:
    """``batch_fn(step, rank, world)``: frame-0 latents ``[B, C, h, w]``, their noise and noise levels, the
    encoded captions after dropout and per-pixel loss weights ``1 + object_weight x coverage`` ``[B, 1, h, w]``,
    all a pure function of (step, rank)."""
    if cache.latents.shape[2] != 1:
        raise ValueError(f"The latent cache holds {cache.latents.shape[2]}-frame latents; a first-frame generator "
                         "trains on frame 0 only: encode with `neodragon train encode-latents --first-frames`.")
    if object_weight and cache.coverage is None:
        raise ValueError("An object weight needs the objects' coverage, which these latent shards lack: encode them "
                         "again with `neodragon train encode-latents --first-frames` (into a new folder).")

    def batch_fn(step: int, rank: int, world: int) -> dict:
        generator = step_generator(config.seed, step, rank)
        indices = list(cycle_indices(step, rank, world, config.batch_size))
        latents, captions = cache.batch(indices)
        latents = latents[:, :, 0]
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        sigmas = torch.rand(len(latents), generator=generator).to(latents)
        weights = torch.ones_like(latents[:, :1])
        if object_weight:
            rows = torch.tensor(cache.rows(indices), device=cache.coverage.device)
            weights = weights + object_weight * cache.coverage[rows, :, 0]
        return {"latents": latents, "noise": noise, "sigmas": sigmas, "weights": weights,
                "encoding": text.encode(drop_captions(captions, text_dropout, generator))}

    return batch_fn


def first_frame_loss(model: LatentFirstFrameGenerator | torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Squared error of the predicted velocity, weighted per latent pixel (the objects of a nano frame are a few of
    its 256 latent pixels) and normalised by the weights' mean. ``model`` may be wrapped for DDP, so it is called,
    not asked for a method."""
    latents, noise, sigmas, text = batch["latents"], batch["noise"], batch["sigmas"], batch["encoding"]
    noisy = latents + sigmas[:, None, None, None] * (noise - latents)
    prediction = model(noisy, sigmas, text.tokens, text.mask, text.pooled)
    weights = batch["weights"].expand_as(latents)
    error = (prediction.float() - (noise - latents).float()).square()
    return {"loss": (weights * error).sum() / weights.sum()}
