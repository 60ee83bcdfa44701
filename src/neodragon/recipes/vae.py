"""Training the nano teacher's causal video VAE on ShapesWorld: reconstruction + edges + a small KL term.

The edge term (L1 between spatial and temporal finite differences) is the perceptual term: it needs no
pretrained network, so it works offline, and it keeps thin outlines and motion sharp where plain L1 blurs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..models.vae import AsymmetricCausalVideoVAE
from ..pipelines.neodragon import PIPELINE_CONFIG, SUBFOLDERS, PipelineConfig
from ..presets import PRESETS, bundled_weights

LATENT_STATS = "latent_stats.json"


@dataclass
class VAELossWeights:
    """Weights of the VAE objective."""

    edges: float = 0.5
    # L1 alone left a freshly initialised VAE at a constant output for longer (9.9 dB after 200 steps against
    # 16.0 dB with this term, docs/results/nano-teacher.md): its gradient grows with the error.
    mse: float = 2.0
    kl: float = 1e-6
    # The TAEHV-style decoder soft-clamps its input to +-3, so the latent means must stay small. A KL weight
    # strong enough for that also pulls the posterior std to 1 (at 1e-3 the posterior collapsed, at 1e-4 the
    # std reached 1.3): an L2 penalty on the means alone keeps their scale without adding noise.
    latent_l2: float = 1e-3
    # Objects cover a few percent of a ShapesWorld frame, yet they carry everything a caption says; unweighted,
    # the VAE learnt the backgrounds and kept the objects as faint grey blobs (docs/results/nano-teacher.md).
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


def psnr(reference: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """Per-video PSNR in dB for videos in [-1, 1] (peak-to-peak 2)."""
    mse = (reference.clamp(-1, 1) - estimate.clamp(-1, 1)).square().flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-10))


@torch.no_grad()
def latent_statistics(vae: AsymmetricCausalVideoVAE, videos: torch.Tensor) -> dict[str, float]:
    """Shift and scale that give the first latent frame and the later ones zero mean and unit variance.

    Neodragon normalises them separately (image and video constants) because the causal encoder sees the
    first frame alone; ``(z - shift) * scale`` is the normalised latent.
    """
    z = vae.encode(videos).latent_dist.mean
    first, rest = z[:, :, :1], z[:, :, 1:]
    return {"image_latent_shift": first.mean().item(), "image_latent_scale": 1.0 / first.std().item(),
            "video_latent_shift": rest.mean().item(), "video_latent_scale": 1.0 / rest.std().item()}


@torch.no_grad()
def reconstruct(vae: AsymmetricCausalVideoVAE, videos: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Mean-latent reconstructions (deterministic), clamped to [-1, 1]."""
    return torch.cat([vae.decode(vae.encode(chunk).latent_dist.mean).sample.clamp(-1, 1)
                      for chunk in videos.split(batch_size)])


def reconstruction_psnr(vae: AsymmetricCausalVideoVAE, videos: torch.Tensor, batch_size: int = 4) -> float:
    """Mean PSNR of mean-latent reconstructions."""
    return psnr(videos, reconstruct(vae, videos, batch_size)).mean().item()


def judged_reconstructions(vae: AsymmetricCausalVideoVAE, count: int = 32, seed: int = 0) -> dict[str, dict]:
    """VBench-nano's judge on ``count`` held-out ``eval`` videos (every style) and on their reconstructions, each
    scored against the true labels: PSNR says how close the pixels are, this says whether the caption survived.
    ``reconstructed_by_style`` splits the reconstructions' scores by the videos' true style."""
    from ..eval.judge import load_judge, real_videos, scene_dict
    from ..eval.metrics import accuracy_table

    judge = load_judge()
    videos, labels = real_videos("eval", range(count), seed=seed)
    truth = [scene_dict(labels, i) for i in range(count)]
    reconstructions = reconstruct(vae, videos)
    predicted = {name: judge.predict(clip)[0] for name, clip in (("real", videos), ("reconstructed", reconstructions))}
    result = {name: accuracy_table(scenes, truth) for name, scenes in predicted.items()}
    by_style = {}
    for style in sorted({t["style"] for t in truth}):
        rows = [i for i, t in enumerate(truth) if t["style"] == style]
        by_style[style] = {"videos": len(rows), **accuracy_table([predicted["reconstructed"][i] for i in rows],
                                                                 [truth[i] for i in rows])}
    return {**result, "reconstructed_by_style": by_style, "psnr_db": psnr(videos, reconstructions).mean().item()}


def save_latent_statistics(stats: dict[str, float], folder: str | Path) -> None:
    (Path(folder) / LATENT_STATS).write_text(json.dumps(stats, indent=2))


def load_latent_statistics(folder: str | Path) -> dict[str, float]:
    path = Path(folder) / LATENT_STATS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: train the VAE with `neodragon train vae` first.")
    return json.loads(path.read_text())


def load_trained_vae(source: str | Path) -> tuple[AsymmetricCausalVideoVAE, dict[str, float]]:
    """A trained VAE and its latent statistics, from the ``final/`` of `train vae`, a checkpoint folder in the
    pipeline layout, or a bundled preset's name (``nano``): then latents are those the bundled DiT was trained on,
    without the training run's folder."""
    folder = Path(source)
    if not folder.is_dir() and str(source) in PRESETS:
        folder = bundled_weights(str(source))
        if folder is None:
            raise FileNotFoundError(f"No trained weights are bundled for the '{source}' preset.")
    if not folder.is_dir():
        raise FileNotFoundError(f"VAE folder {folder} does not exist: pass the final/ of `neodragon train vae`, a "
                                "checkpoint folder, or 'nano' for the bundled model's VAE.")
    if (folder / PIPELINE_CONFIG).is_file():
        stats = PipelineConfig.load(folder).latent_statistics()
        return AsymmetricCausalVideoVAE.from_pretrained(folder / SUBFOLDERS["vae"]), stats
    return AsymmetricCausalVideoVAE.from_pretrained(folder), load_latent_statistics(folder)
