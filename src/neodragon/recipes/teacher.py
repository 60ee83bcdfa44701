"""Pyramidal flow matching for the nano teacher DiT (Pyramid-Flow's objective at nano scale).

Every step draws one autoregressive unit u and one pyramid stage s for the whole batch (so every sample has the
same clip layout); the history is the clean latent frames before u, laid out as the sampler's history pyramid
and corrupted with noise of sigma ~ U(0, 1/3); the current frame is the stage-s interpolant at a uniform
timestep index, and the DiT regresses the rectified-flow velocity start - end. 10% of captions are dropped to
the empty prompt so that the model can be sampled with classifier-free guidance.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.captions import COLOUR_WORDS, SHAPE_WORDS
from ..models.mmdit import PyramidMMDiT
from ..models.text import TextEncoding
from ..schedulers import PyramidFlowMatchScheduler


@dataclass
class TeacherRecipe:
    """Settings of the pyramidal flow-matching objective."""

    text_dropout: float = 0.1
    history_corruption: float = 1 / 3
    shape_contrast: float = 0.0  # weight of the shape-word hinge (0: plain flow matching)
    contrast_margin: float = 0.1  # the swapped caption's error must exceed the true one's by this fraction
    object_weight: float = 0.0  # extra loss weight on latent pixels the objects cover (0: plain flow matching)


def _next_class(words: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Each synonym -> the first synonym of the next class (another class, same caption grammar)."""
    names = list(words)
    return {w: words[names[(i + 1) % len(names)]][0] for i, name in enumerate(names) for w in words[name]}


OTHER_SHAPE, OTHER_COLOUR = _next_class(SHAPE_WORDS), _next_class(COLOUR_WORDS)
_COLOUR_SHAPE = re.compile(rf"\b({'|'.join(OTHER_COLOUR)}) ({'|'.join(sorted(OTHER_SHAPE, key=len, reverse=True))})\b")


@functools.cache  # called for every sample of every step on a bounded set of captions
def swap_caption_word(caption: str, word: str = "shape") -> str | None:
    """The caption with its object's shape (or colour) word replaced by another class's, or None unless the
    caption names exactly one "<colour> <shape>" (one-object captions)."""
    if word not in ("shape", "colour"):
        raise ValueError(f"word must be 'shape' or 'colour', got {word!r}")
    found = _COLOUR_SHAPE.findall(caption)
    if len(found) != 1:
        return None
    colour, shape = found[0]
    swapped = f"{colour} {OTHER_SHAPE[shape]}" if word == "shape" else f"{OTHER_COLOUR[colour]} {shape}"
    return caption.replace(f"{colour} {shape}", swapped)


def normalize_latents(latents: torch.Tensor, stats: dict[str, float]) -> torch.Tensor:
    """Frame 0 with the image constants, later frames with the video constants: ``(z - shift) * scale``."""
    first = (latents[:, :, :1] - stats["image_latent_shift"]) * stats["image_latent_scale"]
    rest = (latents[:, :, 1:] - stats["video_latent_shift"]) * stats["video_latent_scale"]
    return torch.cat([first, rest], dim=2)


def drop_captions(captions: list[str], probability: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by the empty (unconditional) prompt with ``probability``."""
    keep = torch.rand(len(captions), generator=generator) >= probability
    return [c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """A generator that depends only on (seed, step, rank), so resumed runs draw the same numbers."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


def sample_unit_and_stage(num_latent_frames: int, num_stages: int, seed: int, step: int) -> tuple[int, int]:
    """The (unit, stage) of a step, identical on every process so that all ranks build the same layout."""
    generator = step_generator(seed, step, rank=-1)
    unit = int(torch.randint(num_latent_frames, (1,), generator=generator))
    return unit, int(torch.randint(num_stages, (1,), generator=generator))


def flow_matching_loss(dit: PyramidMMDiT, scheduler: PyramidFlowMatchScheduler, latents: torch.Tensor,
                       context: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor, unit: int, stage: int,
                       generator: torch.Generator, recipe: TeacherRecipe, swapped: TextEncoding | None = None,
                       has_swap: torch.Tensor | None = None,
                       cover: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Loss at (unit, stage) for a batch of normalised clean latents ``[B, C, T, H, W]`` (whole videos). With
    ``recipe.shape_contrast``, ``swapped`` holds the shape-swapped captions' encodings and ``has_swap`` [B] marks
    the samples that have one. With ``recipe.object_weight``, ``cover`` ``[B, 1, T, H, W]`` is the objects'
    coverage of each latent pixel (``LatentCache.object_cover``)."""
    batch = latents.shape[0]
    history = []
    if unit > 0:
        clean = scheduler.build_history([latents[:, :, i : i + 1] for i in range(unit)])[stage]
        history = scheduler.corrupt_history(clean, generator=generator, max_sigma=recipe.history_corruption)
        history = [clip.to(latents.device, latents.dtype) for clip in history]
    current = latents[:, :, unit : unit + 1]
    noise = torch.randn(current.shape, generator=generator).to(current)
    index = torch.randint(scheduler.config.num_train_timesteps, (batch,), generator=generator)
    noisy, target, timestep = scheduler.training_target(current, noise, stage, index)
    prediction = dit([history + [noisy]], context, mask, pooled, timestep)[0]
    loss = weighted_mse(prediction, target, recipe.object_weight, cover, unit)
    out = {"unit": torch.tensor(float(unit)), "stage": torch.tensor(float(stage))}
    if recipe.shape_contrast and swapped is not None:
        keep = has_swap.to(latents.device)
        hinge = prediction.new_zeros(())
        if keep.any():
            swap_prediction = dit([[clip[keep] for clip in history] + [noisy[keep]]], swapped.tokens[keep],
                                  swapped.mask[keep], swapped.pooled[keep], timestep[keep])[0]
            true_error, swap_error = ((p.float() - target[keep].float()).square().flatten(1).mean(1)
                                      for p in (prediction[keep], swap_prediction))
            hinge = contrast_hinge(true_error, swap_error, recipe.contrast_margin)
        out["contrast"] = hinge.detach()
        loss = loss + recipe.shape_contrast * hinge
    return {"loss": loss, **out}


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, object_weight: float,
                 cover: torch.Tensor | None, unit: int) -> torch.Tensor:
    """Mean squared error, with ``1 + object_weight`` times the weight on the latent pixels the objects cover
    (coverage of frame ``unit`` max-pooled to the stage's size), normalised by the mean weight. Objects fill a few
    percent of a latent, so a plain mean spends almost all of the loss on the background."""
    if not object_weight:
        return F.mse_loss(prediction.float(), target.float())
    if cover is None:
        raise ValueError("object_weight needs the latents' object cover (LatentCache.object_cover).")
    weight = 1 + object_weight * F.adaptive_max_pool3d(cover[:, :, unit : unit + 1].float(), target.shape[2:])
    return (weight * (prediction.float() - target.float()).square()).mean() / weight.mean()


def contrast_hinge(true_error: torch.Tensor, swapped_error: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean of ``relu((1 + margin) * E - E_swap)`` over samples: each true caption must fit its target better than
    the swapped caption by the fraction ``margin``."""
    return F.relu((1 + margin) * true_error - swapped_error).mean()
