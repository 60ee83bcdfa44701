"""The causal video VAE's training objective (reconstruction + edges + a small KL term) and its initialisation.

The edge term (L1 between spatial and temporal finite differences) is the perceptual term: it needs no
pretrained network, so it works offline, and it keeps thin outlines and motion sharp where plain L1 blurs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from ..models.vae import AsymmetricCausalVideoVAE, CausalResnetBlock3D, MemBlock


@dataclass
class VAELossWeights:
    """Weights of the VAE objective."""

    edges: float = 0.5
    # L1 alone left a freshly initialised VAE at a constant output for longer (9.9 dB after 200 steps against
    # 16.0 dB with this term, docs/journal/nano-teacher.md): its gradient grows with the error.
    mse: float = 2.0
    kl: float = 1e-6
    # The TAEHV-style decoder soft-clamps its input to +-3, so the latent means must stay small. A KL weight
    # strong enough for that also pulls the posterior std to 1 (at 1e-3 the posterior collapsed, at 1e-4 the
    # std reached 1.3): an L2 penalty on the means alone keeps their scale without adding noise.
    latent_l2: float = 1e-3
    # Objects cover a few percent of a ShapesWorld frame, yet they carry everything a caption says; unweighted,
    # the VAE learnt the backgrounds and kept the objects as faint grey blobs (docs/journal/nano-teacher.md).
    objects: float = 3.0


def finite_differences(video: torch.Tensor) -> list[torch.Tensor]:
    """Differences along H, W and T of ``[B, C, T, H, W]``."""
    return [video.diff(dim=dim) for dim in (-2, -1, 2) if video.shape[dim] > 1]


def reconstruction_losses(recon: torch.Tensor, video: torch.Tensor, weights: VAELossWeights,
                          coverage: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The pixel terms of the objective, ``loss = l1 + mse + edges`` weighted; the L1 and MSE terms weigh each
    pixel by ``1 + weights.objects * coverage`` (normalised to a weighted mean) when the objects' coverage is
    given. Also what a decoder adapter learns a style with (``adapters.training``)."""
    pixel_weight = 1 + weights.objects * coverage if coverage is not None else torch.ones_like(video[:, :1])
    error, total_weight = recon - video, pixel_weight.mean()
    l1 = (error.abs() * pixel_weight).mean() / total_weight
    mse = (error.square() * pixel_weight).mean() / total_weight
    edges = sum((a - b).abs().mean() for a, b in zip(finite_differences(recon), finite_differences(video),
                                                      strict=True))
    loss = l1 + weights.mse * mse + weights.edges * edges
    return {"loss": loss, "l1": l1.detach(), "mse": mse.detach(), "edges": edges.detach()}


def vae_losses(vae: AsymmetricCausalVideoVAE, video: torch.Tensor, weights: VAELossWeights,
               coverage: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Reconstruct ``video`` through a posterior sample and score it: ``reconstruction_losses`` plus the latent
    terms."""
    posterior = vae.encode(video).latent_dist
    terms = reconstruction_losses(vae.decode(posterior.sample()).sample, video, weights, coverage)
    # Per-element KL to N(0, I); diffusers' .kl() sums over image axes only, which does not fit 5-D latents.
    kl = 0.5 * (posterior.mean.square() + posterior.var - 1.0 - posterior.logvar).mean()
    latent_l2 = posterior.mean.square().mean()
    terms["loss"] = terms["loss"] + weights.kl * kl + weights.latent_l2 * latent_l2
    return {**terms, "kl": kl.detach(), "latent_l2": latent_l2.detach()}


class VAEObjective(nn.Module):
    """The VAE with its loss as ``forward``, so that DDP (which only wraps ``forward``) syncs its gradients."""

    def __init__(self, vae: AsymmetricCausalVideoVAE, weights: VAELossWeights):
        super().__init__()
        self.vae, self.weights = vae, weights

    def forward(self, video: torch.Tensor, coverage: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return vae_losses(self.vae, video, self.weights, coverage)


@torch.no_grad()
def latent_statistics(vae: AsymmetricCausalVideoVAE, videos: torch.Tensor) -> dict[str, float]:
    """Shift and scale that give the first latent frame and the later ones zero mean and unit variance, keyed as
    the VAE's config keys them (``AsymmetricCausalVideoVAE.normalize_latents``)."""
    z = vae.encode(videos).latent_dist.mean
    first, rest = z[:, :, :1], z[:, :, 1:]
    return {"image_latent_shift": first.mean().item(), "image_latent_scale": 1.0 / first.std().item(),
            "video_latent_shift": rest.mean().item(), "video_latent_scale": 1.0 / rest.std().item()}


def start_nearly_deterministic(vae: AsymmetricCausalVideoVAE, log_variance: float = -10.0) -> None:
    """Start the posterior at std e^-5 instead of 1. When the noise is larger than the latent means (about 0.03
    at init), the decoder learns to ignore the latent and outputs the mean colour (docs/journal/nano-teacher.md)."""
    channels = vae.config.encoder_out_channels
    with torch.no_grad():
        vae.quant_conv.conv.bias[channels:].fill_(log_variance)


def variance_preserving_init(vae: AsymmetricCausalVideoVAE) -> None:
    """He-initialise the convs (gain 1 in the SiLU encoder and for the decoder's output conv, ReLU gain inside
    the decoder) and start each residual branch (encoder resnets and attention, decoder MemBlocks) at zero, so
    that every block begins as its skip path; the posterior's log-variance starts input-independent.

    Without normalisation, PyTorch's default conv init shrinks the signal at every layer: at init the nano
    encoder's output changed by 6e-5 between a red and a cyan input, and the decoder's output by 8e-4 between
    two random latents. Luminance was learnt eventually, colour never (docs/journal/nano-teacher.md).
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
