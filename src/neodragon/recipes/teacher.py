"""Pyramidal flow matching for the nano teacher DiT (Pyramid-Flow's objective at nano scale).

Every step draws one autoregressive unit u and one pyramid stage s for the whole batch (so every sample has the
same clip layout); the history is the clean latent frames before u, laid out as the sampler's history pyramid
and corrupted with noise of sigma ~ U(0, 1/3); the current frame is the stage-s interpolant at a uniform
timestep index, and the DiT regresses the rectified-flow velocity start - end. 10% of captions are dropped to
the empty prompt so that the model can be sampled with classifier-free guidance.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.captions import COLOUR_SHAPE, COLOUR_WORDS, SHAPE_WORDS, replace_shape_word
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
    pair_weight: float = 0.0  # weight of the shape-twin difference error (needs latents encoded with twins)
    pair_max_stage: int = 2  # the twin term applies at the pyramid stages up to this one
    unit_weights: tuple[float, ...] | None = None  # how often each autoregressive unit is drawn (None: uniform)
    stage_weights: tuple[float, ...] | None = None  # how often each pyramid stage is drawn (None: uniform)

    def __post_init__(self) -> None:
        for name in ("unit_weights", "stage_weights"):
            weights = getattr(self, name)
            if weights is not None and (min(weights) < 0 or sum(weights) <= 0):
                raise ValueError(f"{name} must be non-negative with a positive sum, got {weights}.")


def _next_class(words: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Each synonym -> the first synonym of the next class (another class, same caption grammar)."""
    names = list(words)
    return {w: words[names[(i + 1) % len(names)]][0] for i, name in enumerate(names) for w in words[name]}


OTHER_SHAPE, OTHER_COLOUR = _next_class(SHAPE_WORDS), _next_class(COLOUR_WORDS)


@functools.cache  # called for every sample of every step on a bounded set of captions
def swap_caption_word(caption: str, word: str = "shape") -> str | None:
    """The caption with its object's shape (or colour) word replaced by another class's, or None unless the
    caption names exactly one "<colour> <shape>" (one-object captions)."""
    if word not in ("shape", "colour"):
        raise ValueError(f"word must be 'shape' or 'colour', got {word!r}")
    found = COLOUR_SHAPE.findall(caption)
    if len(found) != 1:
        return None
    colour, shape = found[0]
    if word == "shape":
        return replace_shape_word(caption, OTHER_SHAPE[shape])
    return caption.replace(f"{colour} {shape}", f"{OTHER_COLOUR[colour]} {shape}")


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


def flow_matching_loss(dit: PyramidMMDiT, scheduler: PyramidFlowMatchScheduler, latents: torch.Tensor,
                       context: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor, unit: int, stage: int,
                       generator: torch.Generator, recipe: TeacherRecipe, swapped: TextEncoding | None = None,
                       has_swap: torch.Tensor | None = None, cover: torch.Tensor | None = None,
                       twin_source: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Loss at (unit, stage) for a batch of normalised clean latents ``[B, C, T, H, W]`` (whole videos). With
    ``recipe.shape_contrast``, ``swapped`` holds the shape-swapped captions' encodings and ``has_swap`` [B] marks
    the samples that have one. With ``recipe.object_weight``, ``cover`` ``[B, 1, T, H, W]`` is the objects'
    coverage of each latent pixel (``LatentCache.object_cover``). With ``twin_source`` [K], the last K samples are
    the shape twins of the samples it names: each shares its original's noise, timestep and history corruption,
    so that the two targets differ only in the object's shape, and ``recipe.pair_weight`` weighs ``pair_error`` (at
    stages up to ``recipe.pair_max_stage``; it is logged at every stage)."""
    originals = latents.shape[0] - (0 if twin_source is None else len(twin_source))
    draws = generator.get_state()
    history = _corrupted_history(scheduler, latents[:originals], unit, stage, generator, recipe)
    if twin_source is not None:  # the twins' history: the same draws, on the originals with each twin in place
        counterparts = latents[:originals].clone()
        counterparts[twin_source.to(latents.device)] = latents[originals:]
        twin_history = _corrupted_history(scheduler, counterparts, unit, stage,
                                          torch.Generator().set_state(draws), recipe)
        history = [torch.cat([h, t[twin_source.to(t.device)]]) for h, t in zip(history, twin_history, strict=True)]
    current = latents[:, :, unit : unit + 1]
    noise = torch.randn(current[:originals].shape, generator=generator)
    index = torch.randint(scheduler.config.num_train_timesteps, (originals,), generator=generator)
    if twin_source is not None:
        source = twin_source.cpu()  # the draws are made on the CPU; Accelerate moves the batch to the device
        noise, index = torch.cat([noise, noise[source]]), torch.cat([index, index[source]])
    noisy, target, timestep = scheduler.training_target(current, noise.to(current), stage, index)
    prediction = dit([history + [noisy]], context, mask, pooled, timestep)[0]
    loss = weighted_mse(prediction, target, recipe.object_weight, cover, unit)
    out = {"unit": torch.tensor(float(unit)), "stage": torch.tensor(float(stage))}
    if twin_source is not None and recipe.pair_weight:
        pair_loss, out["pair"] = pair_error(prediction, target, twin_source)
        out["pairs"], out["pair_mse"] = torch.tensor(float(len(twin_source))), pair_loss.detach()
        loss = loss + recipe.pair_weight * (stage <= recipe.pair_max_stage) * pair_loss
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


def _corrupted_history(scheduler: PyramidFlowMatchScheduler, latents: torch.Tensor, unit: int, stage: int,
                       generator: torch.Generator, recipe: TeacherRecipe) -> list[torch.Tensor]:
    """The clean frames before ``unit`` as the stage's history pyramid, noise-corrupted (empty at unit 0)."""
    if unit == 0:
        return []
    clean = scheduler.build_history([latents[:, :, i : i + 1] for i in range(unit)])[stage]
    history = scheduler.corrupt_history(clean, generator=generator, max_sigma=recipe.history_corruption)
    return [clip.to(latents.device, latents.dtype) for clip in history]


def pair_error(prediction: torch.Tensor, target: torch.Tensor,
               twin_source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How the difference between each original's prediction and its twin's (the last ``len(twin_source)``
    samples) misses the targets' difference: its mean squared error (the loss term, in the units of the flow-matching
    loss), and that error relative to the targets' difference (1 when the DiT draws a video and its twin alike, that
    is ignores the shape word; 0 when it draws each as its target). The relative error is no loss: where the
    targets barely differ (the lowest stage) it is large and noisy."""
    rows = twin_source.to(prediction.device)
    originals = prediction.shape[0] - len(rows)
    predicted, wanted = ((x[:originals][rows].float() - x[originals:].float()) for x in (prediction, target))
    error = (predicted - wanted).square()
    if not len(rows):
        return error.sum(), error.sum()  # zeros that keep the graph
    return error.mean(), (error.sum() / wanted.square().sum().clamp_min(1e-12)).detach()


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
