"""Pyramidal flow matching (Pyramid-Flow's objective): the loss the nano teacher DiT and DiT adapters train with.

Every step draws one autoregressive unit u and one pyramid stage s for the whole batch (so every sample has the
same clip layout); the history is the clean latent frames before u, laid out as the sampler's history pyramid
and corrupted with noise of sigma ~ U(0, 1/3); the current frame is the stage-s interpolant at a uniform
timestep index, and the DiT regresses the rectified-flow velocity start - end. 10% of captions are dropped to
the empty prompt so that the model can be sampled with classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..schedulers import PyramidFlowMatchScheduler
from .latents import CaptionEncodings, LatentCache
from .trainer import TrainConfig, cycle_indices


@dataclass
class FlowMatchingConfig:
    """Settings of the pyramidal flow-matching objective."""

    text_dropout: float = 0.1
    history_corruption: float = 1 / 3
    unit_weights: tuple[float, ...] | None = None  # how often each autoregressive unit is drawn (None: uniform)
    stage_weights: tuple[float, ...] | None = None  # how often each pyramid stage is drawn (None: uniform)

    def __post_init__(self) -> None:
        for name in ("unit_weights", "stage_weights"):
            weights = getattr(self, name)
            if weights is not None and (min(weights) < 0 or sum(weights) <= 0):
                raise ValueError(f"{name} must be non-negative with a positive sum, got {weights}.")


def drop_captions(captions: list[str], probability: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by the empty (unconditional) prompt with ``probability``."""
    keep = torch.rand(len(captions), generator=generator) >= probability
    return [c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """A generator that depends only on (seed, step, rank), so resumed runs draw the same numbers."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


def sample_unit_and_stage(num_latent_frames: int, num_stages: int, seed: int, step: int,
                          unit_weights: Sequence[float] | None = None,
                          stage_weights: Sequence[float] | None = None) -> tuple[int, int]:
    """The (unit, stage) of a step, identical on every process so that all ranks build the same layout; uniform
    unless weights are given (one per unit / stage, any positive scale)."""
    generator = step_generator(seed, step, rank=-1)
    unit = _draw_index(num_latent_frames, unit_weights, "unit", generator)
    return unit, _draw_index(num_stages, stage_weights, "stage", generator)


def _draw_index(count: int, weights: Sequence[float] | None, what: str, generator: torch.Generator) -> int:
    if weights is None:  # the uniform draw of runs made before weights existed, so that they resume identically
        return int(torch.randint(count, (1,), generator=generator))
    if len(weights) != count:
        raise ValueError(f"{what} weights need one number per {what} ({count}), got {len(weights)}: {weights}.")
    return int(torch.multinomial(torch.tensor(weights, dtype=torch.float64), 1, generator=generator))


def flow_matching_inputs(scheduler: PyramidFlowMatchScheduler, latents: torch.Tensor, unit: int, stage: int,
                         generator: torch.Generator, history_corruption: float = 1 / 3,
                         ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """One draw of the objective at (unit, stage) for normalised clean latents ``[B, C, T, H, W]`` (whole videos):
    the DiT's clips (the corrupted history pyramid, then the noisy current frame), the velocity target and the
    timestep."""
    history = corrupted_history(scheduler, latents, unit, stage, generator, history_corruption)
    current = latents[:, :, unit : unit + 1]
    noise = torch.randn(current.shape, generator=generator)
    index = torch.randint(scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    noisy, target, timestep = scheduler.training_target(current, noise.to(current), stage, index)
    return history + [noisy], target, timestep


def flow_matching_loss(dit: nn.Module, scheduler: PyramidFlowMatchScheduler, latents: torch.Tensor,
                       context: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor, unit: int, stage: int,
                       generator: torch.Generator, history_corruption: float = 1 / 3) -> dict[str, torch.Tensor]:
    """Loss at (unit, stage) for a batch of normalised clean latents ``[B, C, T, H, W]`` (whole videos)."""
    clips, target, timestep = flow_matching_inputs(scheduler, latents, unit, stage, generator, history_corruption)
    prediction = dit([clips], context, mask, pooled, timestep)[0]
    loss = F.mse_loss(prediction.float(), target.float())
    return {"loss": loss, "unit": torch.tensor(float(unit)), "stage": torch.tensor(float(stage))}


def corrupted_history(scheduler: PyramidFlowMatchScheduler, latents: torch.Tensor, unit: int, stage: int,
                       generator: torch.Generator, max_sigma: float) -> list[torch.Tensor]:
    """The clean frames before ``unit`` as the stage's history pyramid, noise-corrupted (empty at unit 0)."""
    if unit == 0:
        return []
    clean = scheduler.build_history([latents[:, :, i : i + 1] for i in range(unit)])[stage]
    history = scheduler.corrupt_history(clean, generator=generator, max_sigma=max_sigma)
    return [clip.to(latents.device, latents.dtype) for clip in history]


def flow_matching_batches(cache: LatentCache, text: CaptionEncodings, config: TrainConfig,
                          objective: FlowMatchingConfig, stages: int,
                          device: torch.device | str | None = None) -> Callable[[int, int, int], dict]:
    """``batch_fn(step, rank, world)`` of a pyramidal flow-matching run (the teacher, adapters): latents, encoded
    captions after dropout, and the step's unit, stage and generator, all a pure function of (step, rank).
    Batches go to ``device``, by default they stay where the cache and encodings are (on a GPU, a round trip
    through the CPU took over a quarter of an H100's step at batch 1,024)."""

    def batch_fn(step: int, rank: int, world: int) -> dict:
        indices = list(cycle_indices(step, rank, world, config.batch_size))
        generator = step_generator(config.seed, step, rank)
        latents, captions = cache.batch(indices)
        captions = drop_captions(captions, objective.text_dropout, generator)
        unit, stage = sample_unit_and_stage(latents.shape[2], stages, config.seed, step, objective.unit_weights,
                                            objective.stage_weights)
        return {"latents": latents.to(device=device), "encoding": text.encode(captions).to(device=device),
                "unit": unit, "stage": stage, "generator": generator}

    return batch_fn


def batch_flow_matching_loss(dit: nn.Module, scheduler: PyramidFlowMatchScheduler, batch: dict,
                             objective: FlowMatchingConfig) -> dict[str, torch.Tensor]:
    """``flow_matching_loss`` on a batch of ``flow_matching_batches``."""
    enc = batch["encoding"]
    return flow_matching_loss(dit, scheduler, batch["latents"], enc.tokens, enc.mask, enc.pooled, batch["unit"],
                              batch["stage"], batch["generator"], objective.history_corruption)
