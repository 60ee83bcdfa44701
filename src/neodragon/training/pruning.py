"""Recipe 3, MMDiT block pruning (Neodragon §4): how much each block changes its tokens, what removing it costs,
the removal itself, and the stage-2 recovery loss (feature matching to the unpruned teacher).

Block importance is the paper's two-modality score: one minus the cosine similarity between a block's input and
output tokens, for the visual tokens of the frame being generated and for the real (unpadded) text tokens
separately, averaged over calibration prompts, every denoising step and both CFG branches. A block that leaves its
tokens nearly unchanged scores near 0. The paper found the two scores uncorrelated and had to judge the removals
by eye; here ``removal_effects`` measures that judgement instead (held-out flow-matching loss, optionally
VBench-nano).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.mmdit import PyramidMMDiT
from ..schedulers import PyramidFlowMatchScheduler
from .flow_matching import flow_matching_inputs
from .latents import CaptionEncodings, LatentCache


@dataclass
class BlockImportance:
    """Per block, the mean cosine distance between its input and output tokens (``text`` is None for the last
    block, which reads the text but does not update it); ``calls`` counts the DiT calls averaged over."""

    visual: list[float]
    text: list[float | None]
    calls: int


class _BlockMeans:
    """A running weighted mean per block."""

    def __init__(self, blocks: int):
        self.sums, self.counts = [0.0] * blocks, [0.0] * blocks

    def add(self, index: int, values: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        weights = torch.ones_like(values) if weights is None else weights
        self.sums[index] += float((values * weights).sum())
        self.counts[index] += float(weights.sum())

    def means(self) -> list[float | None]:
        return [s / c if c else None for s, c in zip(self.sums, self.counts, strict=True)]


def _cosine_distance(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(before.float(), after.float(), dim=-1)


@contextmanager
def importance_probe(dit: PyramidMMDiT) -> Iterator[Callable[[], BlockImportance]]:
    """Hooks that score every block of ``dit`` on each forward made inside the block; yields a function that
    returns the scores so far. Only the current clip's visual tokens count (the history's are context the output
    never reads), and only the real text tokens (padding is masked out)."""
    visual, text = _BlockMeans(len(dit.transformer_blocks)), _BlockMeans(len(dit.transformer_blocks))
    call = {"current_tokens": 0, "text_mask": None, "count": 0}  # what the DiT call being run feeds its blocks

    def before_dit(module: nn.Module, args: tuple, kwargs: dict) -> None:
        stages = args[0] if args else kwargs["sample"]
        if len(stages) != 1:
            raise ValueError("Block importance reads one pyramid stage per DiT call (the sampler's calls).")
        clips = stages[0] if isinstance(stages[0], (list, tuple)) else [stages[0]]
        current, patch = clips[-1], dit.config.patch_size
        call["current_tokens"] = current.shape[2] * (current.shape[-2] // patch) * (current.shape[-1] // patch)
        call["text_mask"] = (args[2] if len(args) > 2 else kwargs["encoder_attention_mask"]).float()
        call["count"] += 1

    def after_block(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: tuple) -> None:
            hidden_in, context_in = args[0], args[1]
            hidden_out, context_out = output
            n = call["current_tokens"]
            visual.add(index, _cosine_distance(hidden_in[:, -n:], hidden_out[:, -n:]))
            if context_out is not None:
                text.add(index, _cosine_distance(context_in, context_out), call["text_mask"].to(context_in.device))
        return hook

    handles = [dit.register_forward_pre_hook(before_dit, with_kwargs=True)]
    handles += [block.register_forward_hook(after_block(i)) for i, block in enumerate(dit.transformer_blocks)]
    try:
        yield lambda: BlockImportance(visual=visual.means(), text=text.means(), calls=call["count"])
    finally:
        for handle in handles:
            handle.remove()


def check_drop(num_layers: int, drop: Sequence[int]) -> list[int]:
    """``drop`` sorted, after checking it names distinct blocks other than the last (the last block is the only
    one that does not update the text, so it has no stand-in) and leaves at least one more."""
    dropped = sorted(set(drop))
    if len(dropped) != len(drop):
        raise ValueError(f"Blocks to drop are listed twice: {list(drop)}.")
    bad = [b for b in dropped if not 0 <= b < num_layers - 1]
    if bad:
        raise ValueError(f"Blocks {bad} cannot be dropped: this DiT has blocks 0..{num_layers - 1}, and the last one "
                         f"({num_layers - 1}) must stay (it is the only block that does not update the text).")
    if len(dropped) > num_layers - 2:
        raise ValueError(f"Dropping {len(dropped)} of {num_layers} blocks leaves fewer than 2; drop fewer.")
    return dropped


def prune_blocks(dit: PyramidMMDiT, drop: Sequence[int]) -> PyramidMMDiT:
    """A copy of ``dit`` without the blocks ``drop``; the rest keep their weights and order, and the config's
    ``num_layers`` follows, so ``save_pretrained`` writes a folder ``from_pretrained`` loads as it is."""
    dropped = check_drop(dit.config.num_layers, drop)
    pruned = copy.deepcopy(dit)
    pruned.transformer_blocks = nn.ModuleList(
        block for i, block in enumerate(pruned.transformer_blocks) if i not in dropped)
    pruned.register_to_config(num_layers=len(pruned.transformer_blocks))
    return pruned


def kept_blocks(num_layers: int, drop: Sequence[int]) -> list[int]:
    """The teacher's index of each block the pruned DiT keeps, in order."""
    dropped = set(check_drop(num_layers, drop))
    return [i for i in range(num_layers) if i not in dropped]


# -- the measured effect of removing a block -------------------------------------------------------------------


@dataclass
class HeldOutDraws:
    """A fixed set of flow-matching draws (every unit and stage, the same noise for every model scored), so that
    differences between models are paired rather than resampled."""

    cache: LatentCache
    text: CaptionEncodings
    batch_size: int = 32
    seed: int = 0
    history_corruption: float = 0.0  # the sampler's history is clean

    @torch.no_grad()
    def loss(self, dit: nn.Module, scheduler: PyramidFlowMatchScheduler) -> float:
        """Mean flow-matching MSE of ``dit`` over all draws."""
        total, count = 0.0, 0
        num_units = self.cache.latents.shape[2]
        for start in range(0, len(self.cache), self.batch_size):
            latents, captions = self.cache.batch(range(start, min(start + self.batch_size, len(self.cache))))
            enc = self.text.encode(captions)
            for unit in range(num_units):
                for stage in range(scheduler.config.stages):
                    draw = ((self.seed * 1_000_003 + start) * 101 + unit) * 11 + stage
                    generator = torch.Generator().manual_seed(draw)
                    clips, target, timestep = flow_matching_inputs(scheduler, latents, unit, stage, generator,
                                                                   self.history_corruption)
                    prediction = dit([clips], enc.tokens, enc.mask, enc.pooled, timestep)[0]
                    total += float(F.mse_loss(prediction.float(), target.float(), reduction="sum"))
                    count += target.numel()
        return total / count


# -- stage 2: feature matching to the unpruned teacher ---------------------------------------------------------


@dataclass
class RecoveryWeights:
    """Weights of stage 2's four terms (the paper does not give its own)."""

    visual: float = 1.0  # MSE between mapped blocks' visual tokens
    text: float = 1.0  # cosine distance between mapped blocks' text tokens
    teacher: float = 1.0  # flow matching against the teacher's velocity
    ground_truth: float = 1.0  # flow matching against the ground-truth velocity


def block_mapping(kept: Sequence[int], num_teacher_layers: int, rule: str = "simple") -> list[int]:
    """The teacher block whose output each student block's output is matched to. ``simple`` (the paper's deployed
    choice): the block it was copied from. ``next``: the block just before the next kept one, i.e. the input of
    the next retained teacher block, which already includes the dropped blocks' work."""
    if rule == "simple":
        return list(kept)
    if rule == "next":
        return [nxt - 1 for nxt in [*kept[1:], num_teacher_layers]]
    raise ValueError(f"Block mapping is 'simple' or 'next', got {rule!r}.")


@contextmanager
def block_outputs(dit: PyramidMMDiT) -> Iterator[list]:
    """Inside the block, a list that each forward fills with every block's (visual, text) output, in order."""
    outputs: list = []
    handles = [block.register_forward_hook(lambda module, args, output: outputs.append(output))
               for block in dit.transformer_blocks]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def recovery_loss(student: nn.Module, teacher: PyramidMMDiT, scheduler: PyramidFlowMatchScheduler, batch: dict,
                  mapping: Sequence[int], weights: RecoveryWeights,
                  history_corruption: float = 1 / 3) -> dict[str, torch.Tensor]:
    """Stage 2 on one flow-matching batch: the student and the frozen teacher see the same noisy inputs; visual
    tokens are matched by MSE and text tokens by cosine distance at the mapped blocks (wherever both blocks update
    the text), and the student's velocity is regressed on the teacher's and on the ground truth."""
    enc = batch["encoding"]
    clips, target, timestep = flow_matching_inputs(scheduler, batch["latents"], batch["unit"], batch["stage"],
                                                   batch["generator"], history_corruption)
    args = ([clips], enc.tokens, enc.mask, enc.pooled, timestep)
    with torch.no_grad(), block_outputs(teacher) as teacher_features:
        teacher_velocity = teacher(*args)[0].float()
    student_module = getattr(student, "module", student)  # DDP wraps the model; hooks go on the model itself
    with block_outputs(student_module) as student_features:
        velocity = student(*args)[0].float()
    visual, text = velocity.new_zeros(()), velocity.new_zeros(())
    text_pairs = 0
    real_text = enc.mask.float()[..., None]
    for (hidden, context), index in zip(student_features, mapping, strict=True):
        teacher_hidden, teacher_context = teacher_features[index]
        visual = visual + F.mse_loss(hidden.float(), teacher_hidden.float())
        if context is not None and teacher_context is not None:
            distance = _cosine_distance(context, teacher_context)[..., None]
            text = text + (distance * real_text).sum() / real_text.sum().clamp(min=1)
            text_pairs += 1
    visual = visual / len(mapping)
    text = text / max(text_pairs, 1)
    to_teacher = F.mse_loss(velocity, teacher_velocity)
    to_truth = F.mse_loss(velocity, target.float())
    loss = (weights.visual * visual + weights.text * text + weights.teacher * to_teacher
            + weights.ground_truth * to_truth)
    return {"loss": loss, "visual": visual.detach(), "text": text.detach(), "to_teacher": to_teacher.detach(),
            "to_truth": to_truth.detach()}
