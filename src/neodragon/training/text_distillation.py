"""Prompt-only text-encoder distillation (Neodragon's recipe 1): a small DT5 + ContextAdapter (and small pooled
encoders) learns to produce the conditioning a frozen DiT receives from the big text encoder, from prompts alone.

The loss sits where the paper puts it: on the tokens that enter the DiT's blocks (the frozen ``context_embedder``'s
output for the teacher, the ContextAdapter's for the student), MSE + 0.1 x cosine distance over the valid tokens,
plus the same loss on the pooled vector that conditions the DiT's timestep embedding. The student's tokenizer keeps
the pieces the teacher's tokenizer uses on the training prompts, so the two token streams align one to one.

Modes (paper §2): ``replace`` trains the ContextAdapter (and the pooled encoders) on a frozen DT5; ``trainable-dt5``
also trains DT5. The optional trajectory term (DistillT5's) compares the frozen DiT's velocity under the student's
conditioning with the teacher's, at states recorded along the teacher's own sampling path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import SPLITS, STYLES, make_caption, sample_spec
from ..models.context_adapter import ContextAdapter
from ..models.mmdit import PyramidMMDiT
from ..models.text import TextEncoderBundle, TextEncoding
from ..pipelines.neodragon import NeodragonPipeline

MODES = ("replace", "trainable-dt5")
COSINE_WEIGHT = 0.1  # the paper's w_cd (w_mse = 1)


# -- data -------------------------------------------------------------------------------------------------------


def distillation_prompts(count: int, seed: int = 0, exclude: Iterable[str] = ()) -> list[str]:
    """``count`` distinct prompts from ShapesWorld's caption grammar: scenes drawn like every split's (so the
    held-out combinations' words appear), every style, complete and partial captions, each phrased with the
    grammar's synonyms and templates; never one of ``exclude`` (the evaluation prompts)."""
    rng = np.random.default_rng([seed, 0x7E57])
    seen, prompts = set(exclude), []
    for _ in range(50 * count):
        spec = dataclasses.replace(sample_spec(rng, SPLITS[int(rng.integers(len(SPLITS)))]),
                                   style=STYLES[int(rng.integers(len(STYLES)))])
        caption = make_caption(spec, int(rng.integers(2**63)), complete=bool(rng.random() < 0.5))
        if caption not in seen:
            seen.add(caption)
            prompts.append(caption)
            if len(prompts) == count:
                return prompts
    raise ValueError(f"the caption grammar gave only {len(prompts)} distinct prompts; ask for fewer.")


def without_context_embedder(transformer: PyramidMMDiT) -> PyramidMMDiT:
    """A copy of ``transformer`` that reads its context already at its own width (the release's DiT layout): the
    ContextAdapter takes the ``context_embedder``'s place."""
    config = {key: value for key, value in transformer.config.items() if not key.startswith("_")}
    replaced = PyramidMMDiT(**{**config, "use_context_embedder": False}).to(transformer.dtype)
    state = {k: v for k, v in transformer.state_dict().items() if not k.startswith("context_embedder.")}
    replaced.load_state_dict(state)
    return replaced


# -- loss -------------------------------------------------------------------------------------------------------


def conditioning_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                      cosine_weight: float = COSINE_WEIGHT) -> torch.Tensor:
    """The paper's L_distil: MSE + ``cosine_weight`` x (1 - cosine similarity) per vector along the last axis,
    averaged over the vectors that ``mask`` ([B, L], 1 = valid) keeps (all of them without a mask)."""
    per_vector = (prediction - target).pow(2).mean(-1) + cosine_weight * (
        1 - F.cosine_similarity(prediction, target, dim=-1, eps=1e-6))
    if mask is None:
        return per_vector.mean()
    weights = mask.to(per_vector.dtype)
    return (per_vector * weights).sum() / weights.sum().clamp(min=1)


class TextDistillation(nn.Module):
    """The student text stack and ContextAdapter, with the distillation loss as ``forward`` (DDP wraps
    ``forward``). ``mode`` "replace" freezes DT5; "trainable-dt5" trains it too. The pooled encoders train with
    ``train_pooled`` (new ones must; the release's CLIPs, kept from the teacher, need not). With ``transformer``
    (the frozen DiT without its context_embedder) and ``trajectory_weight`` > 0, the batch's recorded teacher states
    add the trajectory term: MSE between the DiT's velocity under the student's conditioning and the teacher's
    recorded velocity. ``pooled_weight`` scales the pooled vector's term against the tokens'."""

    def __init__(self, text: TextEncoderBundle, adapter: ContextAdapter, mode: str = "trainable-dt5",
                 transformer: PyramidMMDiT | None = None, trajectory_weight: float = 0.0,
                 train_pooled: bool = True, pooled_weight: float = 1.0):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}.")
        if trajectory_weight and transformer is None:
            raise ValueError("the trajectory term needs the frozen DiT (transformer=).")
        self.text, self.adapter, self.mode, self.trajectory_weight = text, adapter, mode, trajectory_weight
        self.text.token_encoder.requires_grad_(mode == "trainable-dt5")
        self.text.pooled_encoders.requires_grad_(train_pooled)
        self.train_pooled, self.pooled_weight = train_pooled, pooled_weight
        # a tuple keeps the frozen DiT out of the module tree: out of checkpoints, so a run resumes with or
        # without the trajectory term (the caller puts it on the training device)
        self._frozen = (transformer.eval().requires_grad_(False),) if transformer is not None else ()

    def train(self, mode: bool = True) -> TextDistillation:
        """Frozen parts stay in eval mode whatever the Trainer sets."""
        super().train(mode)
        if self.mode == "replace":
            self.text.token_encoder.eval()
        if not self.train_pooled:
            self.text.pooled_encoders.eval()
        return self

    def condition(self, pooled_ids: Sequence[torch.Tensor], input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> TextEncoding:
        """The student's conditioning: pooled vector and the ContextAdapter's tokens (what enters the DiT)."""
        encoding = self.text(pooled_ids, input_ids, attention_mask)
        return TextEncoding(self.adapter(encoding.tokens), encoding.mask, encoding.pooled)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        student = self.condition(batch["pooled_ids"], batch["input_ids"], batch["attention_mask"])
        tokens = conditioning_loss(student.tokens, batch["target_tokens"], student.mask)
        pooled = conditioning_loss(student.pooled, batch["target_pooled"])
        terms = {"loss": tokens + self.pooled_weight * pooled, "tokens": tokens.detach(), "pooled": pooled.detach()}
        if self.trajectory_weight and "trajectory" in batch:
            trajectory = self.trajectory_loss(student, batch["trajectory"])
            terms["loss"] = terms["loss"] + self.trajectory_weight * trajectory
            terms["trajectory"] = trajectory.detach()
        return terms

    def trajectory_loss(self, student: TextEncoding, states: dict) -> torch.Tensor:
        """MSE between the frozen DiT's velocity with the student's conditioning of prompt ``states["prompt"]``
        (indices into the batch) and the teacher's velocity recorded at the same state."""
        index, transformer = states["prompt"], self._frozen[0]
        velocity = transformer([[states["latents"]]], student.tokens[index], student.mask[index],
                                    student.pooled[index], states["timestep"])[0]
        return F.mse_loss(velocity.float(), states["velocity"].float())


# -- teacher side -----------------------------------------------------------------------------------------------


@torch.no_grad()
def teacher_conditioning(pipe: NeodragonPipeline, prompts: Sequence[str], batch_size: int = 256) -> TextEncoding:
    """What the teacher's DiT blocks receive for ``prompts``: tokens after its ContextAdapter or its
    ``context_embedder``, the mask, and the pooled vector (fp32, on the CPU)."""
    parts = []
    for start in range(0, len(prompts), batch_size):
        cond = pipe.encode_prompt(list(prompts[start : start + batch_size]))
        tokens = cond.context
        if pipe.transformer.context_embedder is not None:
            tokens = pipe.transformer.context_embedder(tokens)
        parts.append(TextEncoding(tokens.float().cpu(), cond.mask.cpu(), cond.pooled.float().cpu()))
    return TextEncoding(*(torch.cat([getattr(p, field) for p in parts]) for field in ("tokens", "mask", "pooled")))


class TrajectoryRecorder:
    """Records the states at which the DiT is called while the teacher samples (a forward hook): the latent
    being denoised, its timestep, and the conditional velocity (with ``cfg`` the batch is [uncond; cond] and the
    second half is kept). Only calls without history (frame 0) are kept, so every state is one clip."""

    def __init__(self, transformer: nn.Module, cfg: bool):
        self.states: list[dict] = []
        self.cfg = cfg
        self.handle = transformer.register_forward_hook(self._record)

    def _record(self, module, args, output) -> None:
        clips, timestep = args[0][0], torch.as_tensor(args[4])
        if len(clips) != 1:
            return
        rows = slice(clips[-1].shape[0] // 2, None) if self.cfg else slice(None)
        self.states.append({"latents": clips[-1][rows].float().cpu(),
                            "timestep": timestep.expand(clips[-1].shape[0])[rows].float().cpu(),
                            "velocity": output[0][rows].float().cpu()})

    def remove(self) -> None:
        self.handle.remove()
