"""How well a VAE keeps a video: PSNR of its reconstructions, and whether VBench-nano's judge still reads the
caption in them."""

from __future__ import annotations

import torch

from ..models.vae import AsymmetricCausalVideoVAE
from .judge import load_judge, real_videos, scene_dict
from .metrics import accuracy_table


def psnr(reference: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """Per-video PSNR in dB for videos in [-1, 1] (peak-to-peak 2)."""
    mse = (reference.clamp(-1, 1) - estimate.clamp(-1, 1)).square().flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-10))


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
