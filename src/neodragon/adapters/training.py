"""Adapter training for personalisation: one SHiRA, LoRA or FouRA adapter on a checkpoint's DiT, learnt with
pyramidal flow matching (``training.flow_matching``) on ShapesWorld videos of one style, or on its VAE decoder,
learnt as a style transfer from the latents of unstyled videos to the same scenes in the style.

Design choices:

- **Budget.** PEFT's r convention by default, ``r = 1``: SHiRA trains ``r * (in + out)`` entries of each targeted
  layer, exactly the parameter count of a rank-r LoRA (``matching_lora_config``) and of a rank-r FouRA, so the
  three methods train the same number of numbers. On the nano DiTs (128 wide) r = 1 is a SHiRA density of 1.2 %
  (1.6 % of each attention weight, 1.0 % of each feed-forward weight), the 1-2 % of the SHiRA paper. A density
  budget is accepted too; LoRA then takes the nearest rank per layer and FouRA the single rank nearest to SHiRA's
  total, which match it only roughly on narrow layers (1 % of a 128 x 128 weight is 0.64 of a rank).
- **Components.** ``"dit"`` adapts ``DIT_TARGETS``. ``"decoder"`` adapts every ``Conv2d`` of the VAE decoder:
  a ShapesWorld style is a rendering transform (glow, outline, mosaic), and the decoder is where a nano model's
  fine detail is made (the nano DiT does not learn detail that fine, docs/results/adapters-style.md). The
  decoder learns it from pairs: the frozen encoder's posterior mean of an unstyled video, and the same scene
  rendered in the style, scored with the VAE's reconstruction terms on crops placed around the objects.
- **Targets and start.** The component's targets for all three; LoRA and FouRA use ``alpha = r`` (scaling 1, SHiRA's
  convention). Every adapter starts as a no-op (zero values, zero B).
- **Data.** Items ``0 .. num_videos - 1`` of ShapesWorld's train split rendered in the style at the checkpoint's
  geometry, encoded once by the checkpoint's VAE (posterior mean) and normalised with its latent constants. The
  captions describe the content only (the same item's unstyled caption), so the adapter makes the style the
  model's default look rather than teaching a new word (``style_in_caption`` keeps the style words). Captions
  are dropped to the empty prompt as in the teacher's recipe, so the unconditional branch of CFG learns the
  style as well. A decoder adapter's pairs are the same items: the unstyled render's posterior mean (not
  normalised: the decoder reads raw latents) and the styled render.
- **Runs** go through ``training.Trainer``: seeded (masks and initial weights come from the seed) and
  resumable. The DiT is trained as a copy, so the pipeline passed in is left as it was.
- **Output.** ``<output>/final/``: ``adapter.json`` (method, style, budget, parameter count) and the weights,
  ``adapter.safetensors`` (``ShiraAdapter.save``) or PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``.
  The folder is written beside ``final/`` and renamed into place.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model
from torch import nn

from ..data import STYLES, sample
from ..models.mmdit import DIT_TARGETS
from ..pipelines.neodragon import NeodragonPipeline
from ..training.clips import object_crop_offset
from ..training.flow_matching import FlowMatchingConfig, batch_flow_matching_loss, flow_matching_batches
from ..training.latents import CaptionEncodings, LatentCache, PipelineConditioning
from ..training.trainer import TrainConfig, Trainer, cycle_indices, make_accelerator, read_log
from ..training.vae import VAELossWeights, reconstruction_losses
from .foura import FouraConfig
from .loading import INFO_FILE, SHIRA_FILE, adapted_module, check_component
from .lora import matching_lora_config
from .shira import MaskSpec, ShiraAdapter, add_shira, build_shira, get_shira, matrix_shape, names_regex

METHODS = ("shira", "lora", "foura")
FINAL = "final"
ENCODE_BATCH = 8  # videos per VAE call while encoding the training set
CALIBRATION_STEPS = 4  # first training batches, whose gradients score the entries of grad / snip masks


@dataclass
class AdapterRecipe:
    """Which adapter is trained on which videos; the optimisation settings are ``TrainConfig``'s.

    The budget is ``rank`` (``r * (in + out)`` per layer) or ``density`` (SHiRA's fraction of each weight), not
    both. ``num_frames``, ``height`` and ``width`` default to the checkpoint's generation geometry. ``component``
    is the adapted module (module docstring); ``crop`` is the decoder's square training crop in pixels (a multiple
    of the VAE's spatial factor; 0: whole frames).
    """

    method: str = "shira"
    style: str = "neon"
    component: str = "dit"
    crop: int = 48
    rank: int | None = 1
    density: float | None = None
    strategy: str = "random"
    num_videos: int = 64
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    style_in_caption: bool = False
    text_dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown adapter method {self.method!r}; choose one of {', '.join(METHODS)}.")
        check_component(self.component)
        if self.crop < 0:
            raise ValueError(f"crop must be >= 0 pixels (0: whole frames), got {self.crop}.")
        if self.style not in STYLES:
            raise ValueError(f"Unknown style {self.style!r}; ShapesWorld's styles are {', '.join(STYLES)}.")
        if self.num_videos < 1:
            raise ValueError(f"num_videos must be >= 1, got {self.num_videos}.")
        if self.rank is not None and self.density is not None:
            raise ValueError("Give the budget as a rank or as a density, not both.")
        if not 0 <= self.text_dropout < 1:
            raise ValueError(f"text_dropout must be in [0, 1), got {self.text_dropout}.")
        self.mask_spec(0)  # budget and strategy errors now, not after the data is encoded

    def mask_spec(self, seed: int, target_modules: str | list[str] = DIT_TARGETS) -> MaskSpec:
        """SHiRA's masks for this budget; their entry count also sizes the LoRA and FouRA ranks."""
        return MaskSpec(target_modules=target_modules, strategy=self.strategy, density=self.density, r=self.rank,
                        seed=seed)


class StyleData(LatentCache):
    """The training set held in memory, not read from shards: normalised latents ``[N, C, T, h, w]`` and the
    prompts the pipeline would see (``batch`` wraps around as the teacher's cache does)."""

    def __init__(self, latents: torch.Tensor, captions: list[str]):
        # LatentCache.__init__ is not called: it reads shards from a folder
        self.latents, self.captions = latents, captions


@dataclass
class StylePairs:
    """A decoder adapter's training set in memory: the frozen encoder's posterior means of unstyled videos
    ``[N, C, T, h, w]``, the same scenes rendered in the style ``[N, 3, F, H, W]`` (float16, they are large) and
    the objects' coverage ``[N, F, H, W]`` (float16), which places the crops and weighs the loss."""

    latents: torch.Tensor
    videos: torch.Tensor
    coverage: torch.Tensor


@dataclass
class TrainedAdapter:
    """A finished run: the adapter folder, the trained (wrapped) copy of the component and its last log record."""

    path: Path
    model: nn.Module
    parameters: int
    record: dict


# ---------------------------------------------------------------------------------------------- data


def _geometry(pipe: NeodragonPipeline, recipe: AdapterRecipe) -> dict[str, int]:
    cfg = pipe.pipeline_config
    return {"num_frames": recipe.num_frames or cfg.num_frames, "height": recipe.height or cfg.height,
            "width": recipe.width or cfg.width}


@torch.no_grad()
def encode_style_videos(pipe: NeodragonPipeline, recipe: AdapterRecipe, seed: int = 0) -> StyleData:
    """Render the recipe's training videos in its style and encode them once with the pipeline's VAE."""
    geometry = _geometry(pipe, recipe)
    latents, captions = [], []
    for start in range(0, recipe.num_videos, ENCODE_BATCH):
        indices = range(start, min(start + ENCODE_BATCH, recipe.num_videos))
        items = [sample("train", i, seed, styles=(recipe.style,), **geometry) for i in indices]
        videos = torch.stack([item.video for item in items]).to(pipe.vae.device, pipe.vae.dtype)
        latents.append(pipe.vae.normalize_latents(pipe.vae.encode(videos).latent_dist.mean.float().cpu()))
        if recipe.style_in_caption:
            captions += [item.caption for item in items]
        else:  # the same scene and wording without the style phrase (one frame is enough for the caption)
            captions += [sample("train", i, seed, **{**geometry, "num_frames": 1}).caption for i in indices]
    modifier = pipe.pipeline_config.prompt_modifier
    return StyleData(torch.cat(latents), [caption + modifier for caption in captions])


@torch.no_grad()
def encode_style_pairs(pipe: NeodragonPipeline, recipe: AdapterRecipe, seed: int = 0) -> StylePairs:
    """Render each training scene unstyled and in the recipe's style; encode the unstyled one with the VAE."""
    geometry = _geometry(pipe, recipe)
    latents, videos, coverage = [], [], []
    for start in range(0, recipe.num_videos, ENCODE_BATCH):
        indices = range(start, min(start + ENCODE_BATCH, recipe.num_videos))
        plain = torch.stack([sample("train", i, seed, **geometry).video for i in indices])
        styled = [sample("train", i, seed, styles=(recipe.style,), **geometry) for i in indices]
        latents.append(pipe.vae.encode(plain.to(pipe.vae.device, pipe.vae.dtype)).latent_dist.mean.float().cpu())
        videos.append(torch.stack([item.video for item in styled]).half())
        coverage.append(torch.stack([item.coverage for item in styled]).half())
    return StylePairs(torch.cat(latents), torch.cat(videos), torch.cat(coverage))


def _decoder_objective(pipe: NeodragonPipeline, data: StylePairs, config: TrainConfig, recipe: AdapterRecipe,
                       device: torch.device):
    """``batch_fn`` and ``loss(model, batch)`` of a decoder adapter: latent crops around the objects (a pure
    function of seed, step and item), decoded through a frozen copy of ``post_quant_conv``."""
    factor = data.videos.shape[-1] // data.latents.shape[-1]
    size = data.videos.shape[-1]
    crop = recipe.crop or size
    if crop % factor or crop > size:
        raise ValueError(f"crop must be a multiple of the VAE's spatial factor {factor} and at most {size} pixels, "
                         f"got {crop}.")
    post_quant_conv = copy.deepcopy(pipe.vae.post_quant_conv).float().to(device).requires_grad_(False)
    weights = VAELossWeights()

    def batch_fn(step: int, rank: int, world: int) -> dict:
        items = [i % len(data.latents) for i in cycle_indices(step, rank, world, config.batch_size)]
        latents, videos, coverage = [], [], []
        for i in items:
            y, x = (c // factor for c in object_crop_offset(data.coverage[i].float(), crop,
                                                              np.random.default_rng([config.seed, step, i])))
            latents.append(data.latents[i, ..., y : y + crop // factor, x : x + crop // factor])
            pixels = (..., slice(y * factor, y * factor + crop), slice(x * factor, x * factor + crop))
            videos.append(data.videos[i][pixels])
            coverage.append(data.coverage[i][pixels])
        return {"latents": torch.stack(latents).to(device), "videos": torch.stack(videos).float().to(device),
                "coverage": torch.stack(coverage)[:, None].float().to(device)}

    def loss(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        recon = model(post_quant_conv(batch["latents"]))
        return reconstruction_losses(recon, batch["videos"], weights, batch["coverage"])

    return batch_fn, loss


# ---------------------------------------------------------------------------------------------- adapters


def component_targets(module: nn.Module, component: str) -> str:
    """``target_modules`` of a component: ``DIT_TARGETS``, or every ``Conv2d`` of a decoder."""
    if component == "dit":
        return DIT_TARGETS
    return names_regex(n for n, m in module.named_modules() if isinstance(m, nn.Conv2d))


def foura_rank(masks: ShiraAdapter) -> int:
    """The single FouRA rank whose ``r * (in + out)`` over the masks' layers is closest to their entry count."""
    per_rank = sum(sum(matrix_shape(shape)) for shape in masks.shapes.values())
    return max(1, round(masks.num_params / per_rank))


def attach_adapter(dit: nn.Module, method: str, spec: MaskSpec, calibration: dict | None = None) -> nn.Module:
    """``dit`` with a fresh no-op adapter of ``method`` whose parameters are the only trainable ones.

    ``spec`` sets SHiRA's entries and, through their count, the LoRA and FouRA ranks. ``calibration`` holds the
    ``loss_fn`` and ``batches`` that ``grad`` / ``snip`` masks are scored with.
    """
    if method == "shira":
        add_shira(dit, build_shira(dit, spec, **(calibration or {})))
        return dit
    masks = build_shira(dit, replace(spec, strategy="random"))  # LoRA / FouRA need only the counts
    if method == "lora":
        return get_peft_model(dit, matching_lora_config(masks))
    r = foura_rank(masks)
    return get_peft_model(dit, FouraConfig(r=r, foura_alpha=r, target_modules=names_regex(masks.shapes)))


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_adapter(model: nn.Module, info: dict, folder: str | Path) -> Path:
    """Write the adapter of a model from ``attach_adapter`` and ``info`` (``adapter.json``) to ``folder``,
    atomically: everything is written to a sibling folder that then replaces ``folder``."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        if info["method"] == "shira":
            get_shira(model, info).save(staging / SHIRA_FILE)
        else:
            model.save_pretrained(staging)
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2))
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            os.replace(folder, old)
            os.replace(staging, folder)
            shutil.rmtree(old)
        else:
            os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


# ---------------------------------------------------------------------------------------------- training


def _dit_objective(pipe: NeodragonPipeline, data: StyleData, config: TrainConfig, recipe: AdapterRecipe,
                   device: torch.device):
    """``batch_fn`` and ``loss(model, batch)`` of a DiT adapter: the teacher's pyramidal flow matching."""
    text = CaptionEncodings(PipelineConditioning(pipe), data.captions)
    objective = FlowMatchingConfig(text_dropout=recipe.text_dropout)
    batch_fn = flow_matching_batches(data, text, config, objective, pipe.scheduler.config.stages, device)

    def loss(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return batch_flow_matching_loss(model, pipe.scheduler, batch, objective)

    return batch_fn, loss


def encode_training_data(pipe: NeodragonPipeline, recipe: AdapterRecipe, seed: int = 0) -> StyleData | StylePairs:
    """The recipe's training set: ``encode_style_videos`` for a DiT adapter, ``encode_style_pairs`` for a decoder."""
    encode = encode_style_videos if recipe.component == "dit" else encode_style_pairs
    return encode(pipe, recipe, seed)


def train_adapter(pipe: NeodragonPipeline, config: TrainConfig, recipe: AdapterRecipe,
                  data: StyleData | StylePairs | None = None) -> TrainedAdapter:
    """Train one adapter on a copy of the recipe's component and write it to ``<config.output_dir>/final``.

    ``data`` (from ``encode_training_data``) lets several runs share one encoded training set.
    """
    accelerator = make_accelerator(config.mixed_precision)
    if data is None:
        data = encode_training_data(pipe, recipe, config.seed)
    objective = _dit_objective if recipe.component == "dit" else _decoder_objective
    batch_fn, loss = objective(pipe, data, config, recipe, accelerator.device)

    calibration = None
    if recipe.method == "shira" and recipe.strategy in ("grad", "snip"):
        calibration = {"loss_fn": lambda model, batch: loss(model, batch)["loss"],
                       "batches": [batch_fn(step, 0, 1) for step in range(CALIBRATION_STEPS)]}
    module = copy.deepcopy(adapted_module(pipe, recipe.component)).float().to(accelerator.device)
    spec = recipe.mask_spec(config.seed, component_targets(module, recipe.component))
    with torch.random.fork_rng(devices=[]):  # seeded adapter initialisation without touching the caller's RNG
        torch.manual_seed(config.seed)
        model = attach_adapter(module, recipe.method, spec, calibration)
    parameters = trainable_parameters(model)
    name = recipe.component
    trainer = Trainer(config, {name: model}, batch_fn, lambda batch: loss(trainer.modules[name], batch), accelerator)
    trainer.resume()
    trainer.fit()
    model = trainer.unwrap(name)
    final = Path(config.output_dir) / FINAL
    if accelerator.is_main_process:
        info = {"method": recipe.method, "style": recipe.style, "component": recipe.component,
                "parameters": parameters, "steps": trainer.step, "seed": config.seed, "recipe": asdict(recipe)}
        save_adapter(model, info, final)
    accelerator.wait_for_everyone()
    return TrainedAdapter(final, model, parameters, (read_log(config.output_dir) or [{}])[-1])
