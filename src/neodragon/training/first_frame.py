"""Rectified-flow training of a first-frame generator on cached frame-0 latents (`train encode-latents
--first-frames`): the UNet regresses the velocity ``noise - latent`` at ``sigma ~ U(0, 1)``, with captions dropped
to the empty prompt so that it can be sampled with classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..models.first_frame import LatentFirstFrameGenerator
from .flow_matching import drop_captions, step_generator
from .latents import CaptionEncodings, LatentCache
from .trainer import TrainConfig, cycle_indices


def first_frame_batches(cache: LatentCache, text: CaptionEncodings, config: TrainConfig,
                        text_dropout: float = 0.1) -> Callable[[int, int, int], dict]:
    """``batch_fn(step, rank, world)``: frame-0 latents ``[B, C, h, w]``, their noise and noise levels, and the
    encoded captions after dropout, all a pure function of (step, rank)."""
    if cache.latents.shape[2] != 1:
        raise ValueError(f"The latent cache holds {cache.latents.shape[2]}-frame latents; a first-frame generator "
                         "trains on frame 0 only: encode with `neodragon train encode-latents --first-frames`.")

    def batch_fn(step: int, rank: int, world: int) -> dict:
        generator = step_generator(config.seed, step, rank)
        latents, captions = cache.batch(list(cycle_indices(step, rank, world, config.batch_size)))
        latents = latents[:, :, 0]
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        sigmas = torch.rand(len(latents), generator=generator).to(latents)
        return {"latents": latents, "noise": noise, "sigmas": sigmas,
                "encoding": text.encode(drop_captions(captions, text_dropout, generator))}

    return batch_fn


def first_frame_loss(model: LatentFirstFrameGenerator | torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Mean squared error of the predicted velocity (``model`` may be wrapped for DDP, so it is called, not
    asked for a method)."""
    latents, noise, sigmas, text = batch["latents"], batch["noise"], batch["sigmas"], batch["encoding"]
    noisy = latents + sigmas[:, None, None, None] * (noise - latents)
    prediction = model(noisy, sigmas, text.tokens, text.mask, text.pooled)
    return {"loss": F.mse_loss(prediction.float(), (noise - latents).float())}
