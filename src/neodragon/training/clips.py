"""Training clips of ShapesWorld: rendered videos and captions, optionally cropped around the objects."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..data import sample


def video_batch(split: str, indices, num_frames: int, size: int, crop: int | None = None,
                seed: int = 0, styles: Sequence[str] = ("none",)) -> tuple[torch.Tensor, list[str]]:
    """Rendered ShapesWorld videos ``[B, 3, T, H, W]`` and captions, optionally cropped (see ``clip_batch``)."""
    videos, _, captions = clip_batch(split, indices, num_frames, size, crop, seed, styles)
    return videos, captions


def clip_batch(split: str, indices, num_frames: int, size: int, crop: int | None = None,
               seed: int = 0, styles: Sequence[str] = ("none",)) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``video_batch`` plus the objects' coverage ``[B, 1, T, H, W]``, cropped alike. Each item's style is drawn
    from ``styles`` (repeat a style to weight it); an index shows the same scene whatever the styles.

    A crop is square and placed around the objects' mean position (jittered by up to a quarter of the crop,
    fixed by the index): a crop at a uniform position misses the objects more often than not, and the VAE then
    learns the backgrounds only. Translation keeps the objects' scale, and the causal conv VAE is size-agnostic.
    """
    items = [sample(split, i, seed, num_frames=num_frames, height=size, width=size, styles=styles) for i in indices]
    videos = torch.stack([item.video for item in items])
    coverage = torch.stack([item.coverage for item in items])[:, None]
    if crop is not None and crop < size:
        offsets = [object_crop_offset(item.coverage, crop, np.random.default_rng([seed, i, 7]))
                   for item, i in zip(items, indices, strict=True)]
        videos, coverage = (torch.stack([v[..., y : y + crop, x : x + crop] for v, (y, x) in
                                         zip(tensor, offsets, strict=True)]) for tensor in (videos, coverage))
    return videos, coverage, [item.caption for item in items]


def object_crop_offset(coverage: torch.Tensor, crop: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a ``crop`` square around the centroid of ``coverage`` [T, H, W], jittered."""
    height, width = coverage.shape[-2:]
    mass = coverage.sum(0).double()
    total = float(mass.sum())
    if total > 0:
        centre = [float((mass.sum(1 - axis) * torch.arange(n)).sum()) / total
                  for axis, n in ((0, height), (1, width))]
    else:
        centre = [height / 2, width / 2]
    jitter = rng.integers(-(crop // 4), crop // 4 + 1, 2)
    return tuple(int(np.clip(round(c - crop / 2) + j, 0, n - crop))
                 for c, j, n in zip(centre, jitter, (height, width), strict=True))
