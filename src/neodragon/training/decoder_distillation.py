"""Asymmetric decoder distillation (Neodragon's recipe 2): keep a trained VAE's encoder, and so its latent space,
frozen, and train a lighter TAEHV-style decoder to decode those latents.

The student learns from two targets at once: the real frames (``reconstruction_losses``: pixel L1 and MSE weighted
towards the objects, plus the edge term, the structural term that runs offline) and the teacher decoder's output
on the same latents (L1), which carries what the teacher learnt beyond any one training clip. The DiT, trained on
the frozen latent space, needs no retraining.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.vae import AsymmetricCausalVideoVAE
from .vae import VAELossWeights, reconstruction_losses, variance_preserving_init

ENCODER_SIDE = ("encoder.", "quant_conv.")  # what defines the latent space: frozen and copied from the teacher


def student_vae(teacher: AsymmetricCausalVideoVAE, decoder_num_features: Sequence[int]) -> AsymmetricCausalVideoVAE:
    """A VAE with ``teacher``'s encoder side (weights copied, frozen) and a fresh TAEHV-style decoder of widths
    ``decoder_num_features`` (four numbers, from the latent side to the pixels). The teacher's decoder may be
    TAEHV-style or the native causal one (the release's Pyramid-Flow decoder); ``post_quant_conv`` starts from the
    teacher's and trains with the decoder."""
    if len(decoder_num_features) != 4 or min(decoder_num_features) < 1:
        raise ValueError(f"decoder_num_features takes four positive widths, e.g. 48,24,12,12; got "
                         f"{list(decoder_num_features)}.")
    config = {key: value for key, value in teacher.config.items() if not key.startswith("_")}
    student = AsymmetricCausalVideoVAE(**{**config, "decoder_type": "taehv",
                                          "decoder_num_features": list(decoder_num_features)})
    variance_preserving_init(student)
    kept = {k: v for k, v in teacher.state_dict().items() if not k.startswith("decoder.")}
    missing, unexpected = student.load_state_dict(kept, strict=False)
    if unexpected or any(not k.startswith("decoder.") for k in missing):
        raise ValueError(f"The teacher VAE does not fit the student's encoder: unexpected {unexpected[:3]}, missing "
                         f"{[k for k in missing if not k.startswith('decoder.')][:3]}.")
    for name, parameter in student.named_parameters():
        parameter.requires_grad_(not name.startswith(ENCODER_SIDE))
    return student


class DecoderDistillation(nn.Module):
    """The student and the frozen teacher with the distillation loss as ``forward`` (DDP wraps ``forward``):
    ``reconstruction_losses`` of the student's decoding against the real video, plus ``teacher_weight`` times the
    L1 to the teacher decoder's output on the same latents (the frozen encoder's posterior means)."""

    def __init__(self, student: AsymmetricCausalVideoVAE, teacher: AsymmetricCausalVideoVAE,
                 weights: VAELossWeights | None = None, teacher_weight: float = 1.0):
        super().__init__()
        self.student, self.weights, self.teacher_weight = student, weights or VAELossWeights(), teacher_weight
        self.teacher = teacher.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> DecoderDistillation:
        """Only the student trains: the teacher stays in eval mode whatever the Trainer sets."""
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, video: torch.Tensor, coverage: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            latents = self.student.encode(video).latent_dist.mean
            target = self.teacher.decode(latents).sample if self.teacher_weight else None
        decoded = self.student.decode(latents).sample
        terms = reconstruction_losses(decoded, video, self.weights, coverage)
        if target is not None:
            distill = F.l1_loss(decoded, target)
            terms["loss"] = terms["loss"] + self.teacher_weight * distill
            terms["teacher_l1"] = distill.detach()
        return terms
