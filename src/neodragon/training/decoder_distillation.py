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

from ..models.vae import AsymmetricCausalVideoVAE, MemBlock, TAEHVDecoder, TGrow
from .vae import VAELossWeights, reconstruction_losses, variance_preserving_init

ENCODER_SIDE = ("encoder.", "quant_conv.")  # what defines the latent space: frozen and copied from the teacher


def can_cut(teacher: AsymmetricCausalVideoVAE, decoder_num_features: Sequence[int]) -> bool:
    """Whether ``inherit_decoder`` can make a decoder of these widths from ``teacher``'s: a TAEHV-style teacher at
    least as wide in every width group."""
    return teacher.config.decoder_type == "taehv" and all(
        width <= own for width, own in zip(decoder_num_features, teacher.config.decoder_num_features, strict=False))


def student_vae(teacher: AsymmetricCausalVideoVAE, decoder_num_features: Sequence[int],
                inherit: bool | None = False) -> AsymmetricCausalVideoVAE:
    """A VAE with ``teacher``'s encoder side (weights copied, frozen) and a TAEHV-style decoder of widths
    ``decoder_num_features`` (four numbers, from the latent side to the pixels): fresh, or with ``inherit`` cut from
    a TAEHV-style teacher decoder by ``inherit_decoder`` (None: cut when ``can_cut``, else fresh). The teacher's
    decoder may be TAEHV-style or the native causal one (the release's Pyramid-Flow decoder); ``post_quant_conv``
    starts from the teacher's and trains with the decoder."""
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
    if inherit is None:
        inherit = can_cut(teacher, decoder_num_features)
    if inherit:
        if teacher.config.decoder_type != "taehv":
            raise ValueError("Only a TAEHV-style teacher decoder can be cut into the student (this teacher's is "
                             f"{teacher.config.decoder_type!r}); start the student fresh instead.")
        inherit_decoder(student.decoder, teacher.decoder)
    for name, parameter in student.named_parameters():
        parameter.requires_grad_(not name.startswith(ENCODER_SIDE))
    return student


def _decoder_convs(decoder: TAEHVDecoder) -> list[tuple[nn.Conv2d, int | None, int | None, int, int]]:
    """Every conv of a TAEHV decoder as (conv, input width group, output width group, input copies, output
    copies). Group ``i`` is the channels of width ``num_features[i]``; None is the latent or RGB side. A MemBlock's
    first conv reads two copies of its group (the frame and its memory), a TGrow writes ``stride`` copies."""
    plain = [block for block in decoder.blocks if isinstance(block, nn.Conv2d)]
    convs, group = [], None
    for block in decoder.blocks:
        if isinstance(block, nn.Conv2d):
            after = None if block is plain[-1] else (0 if group is None else group + 1)
            convs.append((block, group, after, 1, 1))
            group = after
        elif isinstance(block, MemBlock):
            first, second, third = block.conv[0], block.conv[2], block.conv[4]
            convs += [(first, group, group, 2, 1), (second, group, group, 1, 1), (third, group, group, 1, 1)]
        elif isinstance(block, TGrow):
            convs.append((block.conv, group, group, 1, block.stride))
    return convs


def _group_widths(convs: list) -> dict[int, int]:
    return {group: conv.in_channels // copies for conv, group, _, copies, _ in convs if group is not None}


def _copies(index: torch.Tensor | None, width: int, copies: int) -> slice | torch.Tensor:
    """The channels of ``copies`` stacked copies of a width group that ``index`` keeps (all of them for None)."""
    return slice(None) if index is None else torch.cat([index + k * width for k in range(copies)])


@torch.no_grad()
def inherit_decoder(student: TAEHVDecoder, teacher: TAEHVDecoder) -> None:
    """Start ``student`` from a cut of the wider ``teacher`` (same layout, every width at most the teacher's):
    in each width group it keeps the teacher's channels that the following layers read most strongly (the largest
    sum of squared input weights) and copies the weights between kept channels. At equal widths this is the
    teacher itself. A cut decoder starts far closer to the teacher's output than a fresh one, so the short
    recovery training that follows has less to learn."""
    small_convs, large_convs = _decoder_convs(student), _decoder_convs(teacher)
    widths, targets = _group_widths(large_convs), _group_widths(small_convs)
    kept = {}
    for group, width in widths.items():
        if targets[group] > width:
            raise ValueError(f"inherit_decoder cuts a wider teacher: width group {group} has {targets[group]} "
                             f"channels in the student and {width} in the teacher.")
        strength = sum(conv.weight.pow(2).sum((0, 2, 3)).reshape(copies, width).sum(0)
                       for conv, g, _, copies, _ in large_convs if g == group)
        kept[group] = strength.topk(targets[group]).indices.sort().values
    pairs = zip(small_convs, large_convs, strict=True)
    for (small, group_in, group_out, copies_in, copies_out), (large, *_) in pairs:
        rows = _copies(kept.get(group_out), widths.get(group_out, 0), copies_out)
        columns = _copies(kept.get(group_in), widths.get(group_in, 0), copies_in)
        small.weight.copy_(large.weight[rows][:, columns])
        if small.bias is not None:
            small.bias.copy_(large.bias[rows])


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
