"""A latent cache: the training videos encoded once by a frozen VAE into normalised latent shards, and a frozen text
encoder's output for every caption. Flow-matching runs (the teacher DiT, DiT adapters) read their batches from it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..data import Sample, sample
from ..models.text import TextEncoding
from ..models.vae import AsymmetricCausalVideoVAE

if TYPE_CHECKING:
    from ..pipelines.neodragon import NeodragonPipeline

SHARD = 256  # latents per cache file


def _read_shard(path: Path) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
    """A latent shard's latents, captions and (first-frame shards) object coverage; a file that is not a readable
    shard gets a message naming it."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            coverage = handle.get_tensor("coverage") if "coverage" in handle.keys() else None  # noqa: SIM118
            return handle.get_tensor("latents"), json.loads(handle.metadata()["captions"]), coverage
    except Exception as error:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{path} is not a readable latent shard ({error}); delete it and re-run "
                         "`neodragon train encode-latents`, which re-creates missing shards.") from error


def latent_coverage(items: Sequence[Sample], down: int) -> torch.Tensor:
    """Frame 0's object coverage at the latent resolution, ``[B, 1, 1, h, w]``: the largest coverage of the pixels
    each latent pixel encodes, so a latent pixel that holds any part of an object counts as object."""
    coverage = torch.stack([item.coverage[:1] for item in items])  # [B, 1, H, W]
    return F.max_pool2d(coverage, down).unsqueeze(1)


@torch.no_grad()
def encode_latents(vae: AsymmetricCausalVideoVAE, out_dir: str | Path, num_videos: int, batch_size: int = 8,
                   seed: int = 0, rank: int = 0, world: int = 1, styles: Sequence[str] = ("none",),
                   device: torch.device | str = "cpu", first_frames: bool = False) -> Path:
    """Encode ``num_videos`` ShapesWorld training videos (17 x 128 x 128, drawn in ``styles``) once into shards of
    normalised latent means (``vae.normalize_latents``) with their captions (which name the style, as ShapesWorld's
    do). Shards already on disk are skipped, so an interrupted run resumes; ranks split the shards between them.
    Videos are rendered ``batch_size`` at a time (a shard's videos would take the best part of a GB).
    ``first_frames`` keeps frame 0 of each video only (latents ``[N, C, 1, h, w]``, what a first-frame generator
    trains on), with its object coverage (``latent_coverage``): the scene is laid out for the whole video, so frame 0
    places each object where its motion starts, and the causal encoder gives frame 0 the latent it has in the whole
    video's encoding."""
    vae = vae.float().eval().to(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for shard in range(rank, -(-num_videos // SHARD), world):
        path = out / f"shard_{shard:05d}.safetensors"
        if path.is_file():
            continue
        latents, captions, coverage = [], [], []
        for start in range(shard * SHARD, min((shard + 1) * SHARD, num_videos), batch_size):
            stop = min(start + batch_size, (shard + 1) * SHARD, num_videos)
            items = [sample("train", i, seed, styles=styles) for i in range(start, stop)]
            videos = torch.stack([item.video[:, :1] if first_frames else item.video for item in items]).to(device)
            latents.append(vae.normalize_latents(vae.encode(videos).latent_dist.mean).cpu())
            captions += [item.caption for item in items]
            if first_frames:
                coverage.append(latent_coverage(items, vae.config.spatial_downsample_scale))
        tensors = {"latents": torch.cat(latents).contiguous()}
        if first_frames:
            tensors["coverage"] = torch.cat(coverage).half().contiguous()
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"captions": json.dumps(captions)})
        os.replace(tmp, path)
    return out


class LatentCache:
    """The encoded training set, held in memory (a few MB at nano size), from one or more `encode-latents` folders.

    Several folders (say, unstyled and styled videos) are interleaved by a fixed permutation, so that every batch
    mixes them; a single folder keeps its order, which is what earlier runs were trained and resumed on.
    """

    def __init__(self, folders: str | Path | Sequence[str | Path]):
        folders = [folders] if isinstance(folders, str | Path) else list(folders)
        latents, captions, coverage = [], [], []
        for folder in folders:
            shards = sorted(Path(folder).glob("shard_*.safetensors"))
            if not shards:
                raise FileNotFoundError(f"No latent shards in {folder}: run `neodragon train encode-latents` first.")
            for shard in shards:
                tensors, metadata, covered = _read_shard(shard)
                latents.append(tensors)
                captions += metadata
                coverage.append(covered)
        self.latents, self.captions = torch.cat(latents), captions
        # the objects' coverage at the latent resolution (first-frame shards); None if any shard lacks it
        self.coverage = None if any(c is None for c in coverage) else torch.cat(coverage).float()
        if len(folders) > 1:
            order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(0))
            self.latents, self.captions = self.latents[order], [captions[i] for i in order.tolist()]
            self.coverage = None if self.coverage is None else self.coverage[order]

    def __len__(self) -> int:
        return len(self.captions)

    def to(self, device: torch.device | str) -> LatentCache:
        """Hold the latents on ``device``: on a GPU, batches are then gathered there, with no per-step copy (at
        batch 1,024 on an H100, assembling and copying took a third of the step)."""
        self.latents = self.latents.to(device)
        self.coverage = None if self.coverage is None else self.coverage.to(device)
        return self

    def rows(self, indices) -> list[int]:
        """The cache rows of sample indices, which wrap around."""
        return [i % len(self) for i in indices]

    def batch(self, indices) -> tuple[torch.Tensor, list[str]]:
        rows = self.rows(indices)
        return self.latents[torch.tensor(rows, device=self.latents.device)], [self.captions[i] for i in rows]


class CaptionEncoder(Protocol):
    """Anything that turns prompts into the DiT's text conditioning: a text encoder, or a pipeline's whole text
    path (``PipelineConditioning``)."""

    def encode(self, prompts: list[str]) -> TextEncoding: ...


class CaptionEncodings:
    """A frozen encoder's output for every caption of the cache and the empty prompt, computed once: the nano
    DiTs are small enough that encoding each batch afresh would take as long as their own training step."""

    def __init__(self, text: CaptionEncoder, captions: list[str], batch_size: int = 256):
        unique = sorted(set(captions) | {""})
        self.row = {caption: i for i, caption in enumerate(unique)}
        with torch.no_grad():
            parts = [text.encode(unique[i : i + batch_size]) for i in range(0, len(unique), batch_size)]
        self.tokens, self.mask, self.pooled = (torch.cat([getattr(p, k) for p in parts])
                                               for k in ("tokens", "mask", "pooled"))

    def encode(self, captions: list[str]) -> TextEncoding:
        rows = torch.tensor([self.row[c] for c in captions], device=self.tokens.device)
        return TextEncoding(self.tokens[rows], self.mask[rows], self.pooled[rows])


class PipelineConditioning:
    """The conditioning a pipeline's DiT reads (text stack, then its ContextAdapter when it has one) as a
    ``TextEncoding``, so that ``CaptionEncodings`` can cache it."""

    def __init__(self, pipe: NeodragonPipeline):
        self.pipe = pipe

    def encode(self, prompts: list[str]) -> TextEncoding:
        cond = self.pipe.encode_prompt(list(prompts))
        return TextEncoding(cond.context, cond.mask, cond.pooled)
