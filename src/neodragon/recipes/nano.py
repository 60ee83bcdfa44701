"""Training the nano teacher end to end: the VAE, a latent cache, the DiT, and the exported checkpoint folder.

Each function is one `neodragon train ...` command; every run is seeded and resumable (see ``training.py``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from diffusers.models.attention_processor import Attention
from safetensors.torch import save_file
from torch import nn

from ..data import Sample, sample, shape_twin
from ..models.mmdit import JointTransformerBlock, PyramidMMDiT
from ..models.sentence import SentenceTextEncoder
from ..models.text import TextEncoding
from ..models.vae import AsymmetricCausalVideoVAE, CausalResnetBlock3D, MemBlock
from ..pipelines.neodragon import SUBFOLDERS, PipelineConfig
from ..presets import nano_teacher_preset
from ..schedulers import PyramidFlowMatchScheduler
from .teacher import (
    TeacherRecipe,
    drop_captions,
    flow_matching_loss,
    normalize_latents,
    sample_unit_and_stage,
    step_generator,
    swap_caption_word,
)
from .training import TrainConfig, Trainer, cycle_indices
from .vae import (
    VAELossWeights,
    VAEObjective,
    judged_reconstructions,
    latent_statistics,
    load_trained_vae,
    reconstruction_psnr,
    save_latent_statistics,
)

SHARD = 256  # latents per cache file


@torch.no_grad()
def encode_items(vae: AsymmetricCausalVideoVAE, stats: dict[str, float], items: Sequence[Sample],
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Rendered items as a latent cache holds them: normalised latent means, captions, objects' latent cover."""
    videos = torch.stack([item.video for item in items]).to(device)
    latents = normalize_latents(vae.encode(videos).latent_dist.mean.cpu(), stats)
    coverage = torch.stack([item.coverage for item in items])[:, None]
    return latents, [item.caption for item in items], latent_object_cover(coverage, latents.shape[2:])


def latent_object_cover(coverage: torch.Tensor, latent_size: Sequence[int]) -> torch.Tensor:
    """Pixel coverage ``[B, 1, T, H, W]`` -> ``[B, 1, t, h, w]`` at the latent size ``(t, h, w)``: each latent
    pixel takes the largest coverage of the frames and pixels it encodes (the causal VAE's first latent frame is the
    first frame alone, each later one an equal group of frames)."""
    frames = latent_size[0]
    cover = coverage[:, :, :1]
    if frames > 1:
        rest = coverage[:, :, 1:]
        groups = rest.unflatten(2, (frames - 1, rest.shape[2] // (frames - 1))).amax(3)
        cover = torch.cat([cover, groups], dim=2)
    return F.adaptive_max_pool3d(cover.float(), tuple(latent_size)).to(torch.float16)


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


# -- VAE ------------------------------------------------------------------------------------------------------


def start_nearly_deterministic(vae: AsymmetricCausalVideoVAE, log_variance: float = -10.0) -> None:
    """Start the posterior at std e^-5 instead of 1. When the noise is larger than the latent means (about 0.03
    at init), the decoder learns to ignore the latent and outputs the mean colour (docs/results/nano-teacher.md)."""
    channels = vae.config.encoder_out_channels
    with torch.no_grad():
        vae.quant_conv.conv.bias[channels:].fill_(log_variance)


def variance_preserving_init(vae: AsymmetricCausalVideoVAE) -> None:
    """He-initialise the convs (gain 1 in the SiLU encoder and for the decoder's output conv, ReLU gain inside
    the decoder) and start each residual branch (encoder resnets and attention, decoder MemBlocks) at zero, so
    that every block begins as its skip path; the posterior's log-variance starts input-independent.

    Without normalisation, PyTorch's default conv init shrinks the signal at every layer: at init the nano
    encoder's output changed by 6e-5 between a red and a cyan input, and the decoder's output by 8e-4 between
    two random latents. Luminance was learnt eventually, colour never (docs/results/nano-teacher.md).
    """
    convs = [(m, "linear") for m in [*vae.encoder.modules(), *vae.quant_conv.modules(),
                                      *vae.post_quant_conv.modules()] if isinstance(m, nn.Conv3d)]
    convs += [(m, "relu") for m in vae.decoder.modules() if isinstance(m, nn.Conv2d)]
    convs[-1] = (convs[-1][0], "linear")  # the decoder's output conv
    for conv, nonlinearity in convs:
        nn.init.kaiming_normal_(conv.weight, nonlinearity=nonlinearity)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
    branch_ends = [m.conv2.conv for m in vae.encoder.modules() if isinstance(m, CausalResnetBlock3D)]
    branch_ends += [m.to_out[0] for m in vae.encoder.modules() if isinstance(m, Attention)]
    branch_ends += [m.conv[-1] for m in vae.decoder.modules() if isinstance(m, MemBlock)]
    for layer in branch_ends:
        nn.init.zeros_(layer.weight)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    with torch.no_grad():
        vae.quant_conv.conv.weight[vae.config.encoder_out_channels :].zero_()


def initial_teacher_vae() -> AsymmetricCausalVideoVAE:
    """The nano teacher VAE as ``train_vae`` starts it: variance-preserving init, nearly deterministic posterior."""
    vae = AsymmetricCausalVideoVAE(**nano_teacher_preset().vae)
    variance_preserving_init(vae)
    start_nearly_deterministic(vae)
    return vae


def train_vae(config: TrainConfig, num_frames: int = 17, size: int = 128, crop: int | None = 64,
              weights: VAELossWeights | None = None, eval_videos: int = 32, init_from: str | Path | None = None,
              freeze_encoder: bool = False, styles: Sequence[str] = ("none",)) -> dict:
    """Train the teacher VAE, then write ``final/`` with the model, latent statistics and held-out PSNR.

    ``init_from`` starts from a trained VAE folder; with ``freeze_encoder`` only the decoder side trains, so the
    latent space (and any latent cache or DiT built on it) stays valid while the reconstructions improve.
    Training clips are drawn in ``styles``; the latent statistics are always measured on unstyled videos.
    """
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
        metrics = {"eval_psnr_db": reconstruction_psnr(model, videos), "eval_videos": eval_videos, **stats,
                   "judge_accuracy": judged_reconstructions(model, eval_videos, config.seed)}
        final = Path(config.output_dir) / "final"
        model.save_pretrained(final)
        save_latent_statistics(stats, final)
        (final / "metrics.json").write_text(json.dumps(metrics, indent=2))
    trainer.accelerator.wait_for_everyone()
    return metrics


# -- latent cache ---------------------------------------------------------------------------------------------


def _read_shard(path: Path) -> tuple[torch.Tensor, list[str], torch.Tensor | None, torch.Tensor | None]:
    """A latent shard's latents, captions, object cover (None in shards written before it was stored) and shape
    twin rows (None without twins); a file that is not a readable shard gets a message naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            cover, twin = (handle.get_tensor(k) if k in keys else None for k in ("cover", "twin"))
            return handle.get_tensor("latents"), json.loads(handle.metadata()["captions"]), cover, twin
    except Exception as error:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{path} is not a readable latent shard ({error}); delete it and re-run "
                         "`neodragon train encode-latents`, which re-creates missing shards.") from error


@torch.no_grad()
def encode_latents(vae_dir: str | Path, out_dir: str | Path, num_videos: int, batch_size: int = 8,
                   seed: int = 0, rank: int = 0, world: int = 1, styles: Sequence[str] = ("none",),
                   device: torch.device | str = "cpu", twins: bool = False) -> Path:
    """Encode ``num_videos`` training videos (17 x 128 x 128, drawn in ``styles``) once into normalised latent
    shards, with their captions (which name the style, as ShapesWorld's do) and the objects' cover of each latent
    pixel (``latent_object_cover``). With ``twins``, each one-object video's ``shape_twin`` is stored too, as an
    extra row after the shard's videos, and a "twin" row index links the two (-1: none).

    Shards already on disk are skipped, so an interrupted run resumes; ranks split the shards between them.
    """
    vae, stats = load_trained_vae(vae_dir)
    vae = vae.float().eval().to(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for shard in range(rank, -(-num_videos // SHARD), world):
        path = out / f"shard_{shard:05d}.safetensors"
        if path.is_file():
            continue
        indices = range(shard * SHARD, min((shard + 1) * SHARD, num_videos))
        latents, captions, cover, _ = encode_rendered(vae, stats, indices, batch_size, device,
                                                       lambda i: sample("train", i, seed, styles=styles))
        tensors = {"latents": latents, "cover": cover}
        twin_latents, twin_captions, twin_cover, made = encode_rendered(
            vae, stats, indices if twins else [], batch_size, device,
            lambda i: shape_twin("train", i, seed, styles=styles))
        if made:  # a shard of two-object scenes only has no twins
            twin = torch.full((len(indices) + len(made),), -1, dtype=torch.int64)
            twin[made] = torch.arange(len(indices), len(twin))
            twin[len(indices):] = torch.tensor(made, dtype=torch.int64)
            tensors = {"latents": torch.cat([latents, twin_latents]), "cover": torch.cat([cover, twin_cover]),
                       "twin": twin}
            captions = captions + twin_captions
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"captions": json.dumps(captions)})
        os.replace(tmp, path)
    return out


@torch.no_grad()
def encode_rendered(vae: AsymmetricCausalVideoVAE, stats: dict[str, float], indices: Sequence[int],
                     batch_size: int, device: torch.device | str, render: Callable[[int], Sample | None],
                     ) -> tuple[torch.Tensor, list[str], torch.Tensor, list[int]]:
    """``encode_items`` over the items ``render(i)`` makes for ``indices`` (it may skip one by returning None),
    rendered ``batch_size`` at a time (a shard's videos would take the best part of a GB), and the positions in
    ``indices`` of the items made."""
    latents, captions, covers, made = [], [], [], []
    for start in range(0, len(indices), batch_size):
        items = [(k, render(indices[k])) for k in range(start, min(start + batch_size, len(indices)))]
        items = [(k, item) for k, item in items if item is not None]
        if items:
            encoded, texts, cover = encode_items(vae, stats, [item for _, item in items], device)
            latents.append(encoded)
            captions += texts
            covers.append(cover)
            made += [k for k, _ in items]
    if not made:
        return torch.empty(0), [], torch.empty(0), []
    return torch.cat(latents), captions, torch.cat(covers), made


class LatentCache:
    """The encoded training set, held in memory (a few MB at nano size), from one or more `encode-latents` folders.

    Several folders (say, unstyled and styled videos) are interleaved by a fixed permutation, so that every batch
    mixes them; a single folder keeps its order, which is what earlier runs were trained and resumed on.
    """

    def __init__(self, folders: str | Path | Sequence[str | Path]):
        folders = [folders] if isinstance(folders, str | Path) else list(folders)
        latents, captions, covers, twins = [], [], [], []
        for folder in folders:
            shards = sorted(Path(folder).glob("shard_*.safetensors"))
            if not shards:
                raise FileNotFoundError(f"No latent shards in {folder}: run `neodragon train encode-latents` first.")
            for shard in shards:
                tensors, metadata, cover, twin = _read_shard(shard)
                offset = len(captions)
                latents.append(tensors)
                captions += metadata
                covers.append(cover)
                twins.append(torch.full((len(metadata),), -1) if twin is None else torch.where(twin < 0, -1,
                                                                                               twin + offset))
        self.latents, self.captions = torch.cat(latents), captions
        # the objects' coverage per latent pixel [N, 1, t, h, w], if every shard has it
        self.cover = None if any(c is None for c in covers) else torch.cat(covers)
        # each row's shape twin (`encode-latents --twins`), -1 for none
        self.twin = torch.cat(twins)
        if len(folders) > 1:
            order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(0))
            self.latents, self.captions = self.latents[order], [captions[i] for i in order.tolist()]
            self.cover = None if self.cover is None else self.cover[order]
            position = torch.empty_like(order)
            position[order] = torch.arange(len(order))
            twin = self.twin[order]
            self.twin = torch.where(twin < 0, -1, position[twin.clamp_min(0)])

    def __len__(self) -> int:
        return len(self.captions)

    def to(self, device: torch.device | str) -> LatentCache:
        """Hold the latents on ``device``: on a GPU, batches are then gathered there, with no per-step copy (at
        batch 1,024 on an H100, assembling and copying took a third of the step)."""
        self.latents = self.latents.to(device)
        self.cover = None if self.cover is None else self.cover.to(device)
        return self

    def rows(self, indices) -> list[int]:
        """The cache rows of sample indices, which wrap around."""
        return [i % len(self) for i in indices]

    def batch(self, indices) -> tuple[torch.Tensor, list[str]]:
        rows = self.rows(indices)
        return self.latents[torch.tensor(rows, device=self.latents.device)], [self.captions[i] for i in rows]

    def object_cover(self, indices) -> torch.Tensor:
        """The objects' coverage ``[B, 1, t, h, w]`` of the latents ``batch(indices)`` returns."""
        if self.cover is None:
            raise ValueError("These latent shards hold no object cover (written before it was stored): re-encode "
                             "them with `neodragon train encode-latents` into a new folder.")
        return self.cover[torch.tensor(self.rows(indices), device=self.cover.device)]


class CaptionEncoder(Protocol):
    """Anything that turns prompts into the DiT's text conditioning: a text encoder, or a pipeline's whole text
    path (``neodragon.adapters.training.PipelineConditioning``)."""

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


# -- DiT ------------------------------------------------------------------------------------------------------


def flow_matching_batches(cache: LatentCache, text: CaptionEncodings, config: TrainConfig, text_dropout: float,
                          stages: int, device: torch.device | str | None = None, shape_contrast: bool = False,
                          object_cover: bool = False, twins: bool = False,
                          unit_weights: Sequence[float] | None = None,
                          stage_weights: Sequence[float] | None = None) -> Callable[[int, int, int], dict]:
    """``batch_fn(step, rank, world)`` of a pyramidal flow-matching run (the teacher, adapters): latents, encoded
    captions after dropout, and the step's unit, stage and generator, all a pure function of (step, rank). With
    ``shape_contrast``, also the shape-swapped captions' encodings and which samples have one; with
    ``object_cover``, the latents' object cover; with ``twins``, every sample that has a shape twin in the cache
    and kept its caption brings the twin along, appended after the batch (``twin_source``: the samples they belong
    to). ``unit_weights`` / ``stage_weights`` skew the draw of the step's unit and stage (``sample_unit_and_stage``).
    Batches go to ``device``, by default they stay where the cache and encodings are (on a GPU, a round trip
    through the CPU took over a quarter of an H100's step at batch 1,024)."""

    def batch_fn(step: int, rank: int, world: int) -> dict:
        indices = list(cycle_indices(step, rank, world, config.batch_size))
        generator = step_generator(config.seed, step, rank)
        captions = drop_captions([cache.captions[r] for r in cache.rows(indices)], text_dropout, generator)
        batch = {}
        if twins:
            partner = cache.twin[cache.rows(indices)].tolist()
            source = [k for k, (p, c) in enumerate(zip(partner, captions, strict=True)) if p >= 0 and c]
            indices += [partner[k] for k in source]
            captions += [cache.captions[partner[k]] for k in source]
            batch["twin_source"] = torch.tensor(source, dtype=torch.int64)
        latents = cache.batch(indices)[0]
        unit, stage = sample_unit_and_stage(latents.shape[2], stages, config.seed, step, unit_weights, stage_weights)
        batch |= {"latents": latents.to(device=device), "encoding": text.encode(captions).to(device=device),
                  "unit": unit, "stage": stage, "generator": generator}
        if object_cover:
            batch["cover"] = cache.object_cover(indices).to(device=device)
        if shape_contrast:
            swapped = [swap_caption_word(c) for c in captions]
            batch["has_swap"] = torch.tensor([s is not None for s in swapped])
            batch["swapped"] = text.encode([s or c for s, c in zip(swapped, captions, strict=True)]).to(device=device)
        return batch

    return batch_fn


def batch_flow_matching_loss(dit: nn.Module, scheduler: PyramidFlowMatchScheduler, batch: dict,
                             recipe: TeacherRecipe) -> dict[str, torch.Tensor]:
    """``flow_matching_loss`` on a batch of ``flow_matching_batches``."""
    enc = batch["encoding"]
    return flow_matching_loss(dit, scheduler, batch["latents"], enc.tokens, enc.mask, enc.pooled, batch["unit"],
                              batch["stage"], batch["generator"], recipe, batch.get("swapped"), batch.get("has_swap"),
                              batch.get("cover"), batch.get("twin_source"))


def teacher_dit_config(layers: int | None = None, heads: int | None = None, patch_size: int | None = None,
                       sample_size: int | None = None) -> dict:
    """The nano teacher DiT's config, optionally deeper/shallower (``layers``), wider/narrower (``heads`` of the
    preset's head width), with another ``patch_size`` (1: a token per latent pixel, four times the tokens) or another
    ``sample_size``, which only sets the spacing of the fixed sincos position table: ``sample_size / patch_size /
    pos_embed_max_size`` per token. A resumed run must be given the same size."""
    config = dict(nano_teacher_preset().dit)
    if sample_size is not None:
        if sample_size < config["patch_size"]:
            raise ValueError(f"sample_size must be at least the patch size, got {sample_size}.")
        config["sample_size"] = sample_size
    if patch_size is not None:
        if patch_size not in (1, 2):
            raise ValueError(f"patch_size must be 1 or 2 (the nano latent's smallest stage is 4 x 4), "
                             f"got {patch_size}.")
        config["patch_size"] = patch_size
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}.")
        config["num_layers"] = layers
    if heads is not None:
        if heads < 1:
            raise ValueError(f"heads must be >= 1, got {heads}.")
        config["num_attention_heads"] = heads
        config["caption_projection_dim"] = heads * config["attention_head_dim"]  # the inner width, as in the release
    return config


def train_teacher(config: TrainConfig, latents_dir: str | Path | Sequence[str | Path],
                  recipe: TeacherRecipe | None = None, init_from: str | Path | None = None,
                  dit_config: dict | None = None, compile_blocks: bool = False) -> None:
    """Pyramidal flow matching of the nano teacher DiT on cached latents (one or more folders, see
    ``LatentCache``), text from the frozen MiniLM. ``init_from`` starts a new run from a trained DiT folder (a
    ``final/`` or a bundle's transformer); a run folder with checkpoints resumes from them instead.
    ``dit_config`` (``teacher_dit_config``) sets the DiT's size; the default is the preset's. ``compile_blocks``
    compiles the transformer blocks with dynamic shapes (`compile_repeated_blocks`): the same numbers, fewer
    kernel launches, after a compile of a minute or two."""
    recipe = recipe or TeacherRecipe()
    cache, text = teacher_training_data(latents_dir, recipe, PartialState().device)
    if recipe.object_weight > 0:
        cache.object_cover([0])  # fails now, with what to do, if the shards predate stored covers
    if recipe.pair_weight > 0 and not (cache.twin >= 0).any():
        raise ValueError("pair_weight needs shape twins in the latent cache: encode a folder with "
                         "`neodragon train encode-latents --twins` and pass it with --latents.")
    scheduler = PyramidFlowMatchScheduler()
    # fails now, before anything is written, if the unit or stage weights do not fit these latents
    sample_unit_and_stage(cache.latents.shape[2], scheduler.config.stages, config.seed, 0, recipe.unit_weights,
                          recipe.stage_weights)
    dit = _initial_dit(dit_config or teacher_dit_config(), init_from)
    if compile_blocks:
        dit.compile_repeated_blocks(dynamic=True)

    trainer = Trainer(config, {"dit": dit}, flow_matching_batches(cache, text, config, recipe.text_dropout,
                                                                  scheduler.config.stages,
                                                                  shape_contrast=recipe.shape_contrast > 0,
                                                                  object_cover=recipe.object_weight > 0,
                                                                  twins=recipe.pair_weight > 0,
                                                                  unit_weights=recipe.unit_weights,
                                                                  stage_weights=recipe.stage_weights),
                      lambda batch: batch_flow_matching_loss(trainer.modules["dit"], scheduler, batch, recipe))
    trainer.resume()
    trainer.fit()
    if trainer.accelerator.is_main_process:
        _save_final_dit(trainer, Path(config.output_dir), recipe)
    trainer.accelerator.wait_for_everyone()


def _save_final_dit(trainer: Trainer, output_dir: Path, recipe: TeacherRecipe) -> None:
    """``final/``: the DiT to export, the weight average when the run keeps one (then the last weights go to
    ``final-raw/``, for comparison)."""
    if trainer.ema is not None:
        trainer.unwrap("dit").save_pretrained(output_dir / "final-raw")
    with trainer.averaged_weights():
        trainer.unwrap("dit").save_pretrained(output_dir / "final")
    (output_dir / "final" / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))


def teacher_training_data(latents_dir: str | Path | Sequence[str | Path], recipe: TeacherRecipe,
                          device: torch.device | str) -> tuple[LatentCache, CaptionEncodings]:
    """The latent cache and the frozen MiniLM's encodings of its captions (and, with ``recipe.shape_contrast``, of
    their shape-swapped versions), both held on ``device``."""
    preset = nano_teacher_preset()
    cache = LatentCache(latents_dir).to(device)
    captions = cache.captions
    if recipe.shape_contrast:
        captions = captions + [s for s in map(swap_caption_word, captions) if s is not None]
    encoder = SentenceTextEncoder.from_source(preset.text["sentence_encoder"], preset.text["max_sequence_length"])
    return cache, CaptionEncodings(encoder.to(device), captions)


def _initial_dit(config: dict, init_from: str | Path | None) -> PyramidMMDiT:
    if init_from is None:
        return PyramidMMDiT(**config)
    dit = PyramidMMDiT.from_pretrained(init_from).float()
    if dit.config.sample_size != config["sample_size"]:
        dit = respace_positions(dit, config["sample_size"])
    mismatched = {k: (v, dit.config.get(k)) for k, v in config.items() if dit.config.get(k) != v}
    if set(mismatched) == {"num_layers"} and config["num_layers"] > dit.config.num_layers:
        return grow_depth(dit, config["num_layers"])
    if mismatched:
        raise ValueError(f"{init_from} is not a nano teacher DiT of this size: config differs in {mismatched} "
                         "(--init-from takes a `train teacher` final/ folder or a bundle's transformer folder; give "
                         "the --heads and --patch-size it was trained with, and --layers at least its depth).")
    return dit


def respace_positions(dit: PyramidMMDiT, sample_size: int) -> PyramidMMDiT:
    """``dit`` with its fixed sincos position table rebuilt for ``sample_size`` (another spacing) and every trained
    weight kept: the blocks then learn to read the new table."""
    config = {key: value for key, value in dit.config.items() if not key.startswith("_")}
    respaced = PyramidMMDiT(**{**config, "sample_size": sample_size})
    state = {key: value for key, value in dit.state_dict().items() if key != "pos_embed.pos_embed"}
    missing, unexpected = respaced.load_state_dict(state, strict=False)
    assert missing == ["pos_embed.pos_embed"] and not unexpected, (missing, unexpected)
    return respaced


def grow_depth(dit: PyramidMMDiT, num_layers: int, seed: int = 0) -> PyramidMMDiT:
    """``dit`` with ``num_layers`` blocks and the same function: new blocks are placed after the old ones in turn
    (never after the last, which only reads the text) with zeroed AdaLN-Zero modulation, so each starts as the
    identity on both streams and learns its gates first, as a fresh DiT's blocks do."""
    old = list(dit.transformer_blocks)
    if not 2 <= len(old) < num_layers:
        raise ValueError(f"Growing needs a DiT of at least 2 layers and a larger depth; got {len(old)} -> "
                         f"{num_layers}.")
    width, heads = dit.config.num_attention_heads * dit.config.attention_head_dim, dit.config.num_attention_heads
    extra = [0] * len(old)  # new blocks after each old one; the last old block gets none
    for i in range(num_layers - len(old)):
        extra[i % (len(old) - 1)] += 1
    blocks = []
    with torch.random.fork_rng():  # seeded weights, without touching the caller's random state
        torch.manual_seed(seed)
        for index, block in enumerate(old):
            blocks.append(block)
            for _ in range(extra[index]):
                new = JointTransformerBlock(width, heads, context_pre_only=False)
                for norm in (new.norm1, new.norm1_context):
                    nn.init.zeros_(norm.linear.weight)
                    nn.init.zeros_(norm.linear.bias)
                blocks.append(new)
    dit.transformer_blocks = nn.ModuleList(blocks)
    dit.register_to_config(num_layers=num_layers)
    return dit


# -- export ---------------------------------------------------------------------------------------------------


def export_teacher(vae_dir: str | Path, dit_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float16,
                   pipeline: PipelineConfig | None = None) -> Path:
    """Assemble a checkpoint folder in the official layout (weights cast to ``dtype``, fp16 for bundling)."""
    preset = nano_teacher_preset()
    out = Path(out_dir)
    vae, stats = load_trained_vae(vae_dir)
    vae.to(dtype).save_pretrained(out / SUBFOLDERS["vae"])
    PyramidMMDiT.from_pretrained(dit_dir).to(dtype).save_pretrained(out / SUBFOLDERS["monolithic", "transformer"])
    SentenceTextEncoder.from_source(preset.text["sentence_encoder"],
                                    preset.text["max_sequence_length"]).save_pretrained(out)
    PyramidFlowMatchScheduler().save_pretrained(out / "scheduler")
    replace(pipeline or preset.pipeline, **stats).save(out)
    return out
