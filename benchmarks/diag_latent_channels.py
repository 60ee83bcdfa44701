"""Where in the latent's channels a shape lives, and how precisely the DiT predicts each channel at stage 2.

Three numbers per channel of frame 0's (normalised) latent:

- its share of the latent's variance over a latent cache;
- its share of the *shape* variance: within each shape family (`diag_memorise.py families`: one scene drawn with
  every shape, only the shape word changed), the variance across the family's shapes;
- the DiT's velocity error at the last pyramid stage relative to the detail that stage adds (the full-resolution
  latent minus the upsampled stage-1 latent), on latent pixels an object covers and on the background, averaged
  over three points of the stage's window.

If shapes lived in low-variance channels and the DiT were much less precise there, a per-channel loss weight or a
per-channel normalisation of the latent would be the lever.

    python benchmarks/diag_latent_channels.py --dit nano --latents /work/runs/latents \
        --families /work/runs/families/fam64 --count 96
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from neodragon import load_pipeline
from neodragon.data.captions import SHAPE_WORDS
from neodragon.recipes.nano import LatentCache


def shares(values: torch.Tensor) -> str:
    return " / ".join(f"{v:.2f}" for v in (values / values.sum()).tolist())


def shape_variance(cache: LatentCache) -> torch.Tensor:
    """Per-channel variance across the shapes of each family, pooled over families (frame 0)."""
    words = {w for ws in SHAPE_WORDS.values() for w in ws}
    families: dict[str, list[int]] = {}
    for row, caption in enumerate(cache.captions):
        key = " ".join("<shape>" if token in words else token for token in caption.split())
        families.setdefault(key, []).append(row)
    frame0, total, count = cache.latents.float()[:, :, 0], torch.zeros(cache.latents.shape[1]), 0
    for rows in families.values():
        if len(rows) > 1:
            x = frame0[rows]
            total += (x - x.mean(0)).square().sum((0, 2, 3))
            count += len(rows) - 1
    return total / count


@torch.no_grad()
def stage_errors(pipe, cache: LatentCache, count: int, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Velocity error / detail energy per channel, on object pixels (row 0) and background (row 1)."""
    scheduler, dit = pipe.scheduler, pipe.transformer
    frame0 = cache.latents[:count].float()[:, :, :1]
    cover = cache.object_cover(range(count)).float()[:, :, :1]
    noise = torch.randn(frame0.shape, generator=torch.Generator().manual_seed(1))
    error, detail = torch.zeros(2, frame0.shape[1]), torch.zeros(2, frame0.shape[1])
    for start in range(0, count, 16):
        rows = slice(start, min(start + 16, count))
        cond = pipe.encode_prompt(cache.captions[rows])
        pyramid = scheduler.latent_pyramid(frame0[rows])
        added = pyramid[stage] - F.interpolate(pyramid[stage - 1][:, :, 0], scale_factor=2, mode="nearest")[:, :, None]
        on_object = F.adaptive_max_pool3d(cover[rows], added.shape[2:]) > 0.1
        for index in (200, 500, 800):  # early, middle and late in the stage's window
            noisy, target, timestep = scheduler.training_target(frame0[rows], noise[rows], stage, index)
            prediction = dit([[noisy]], cond.context, cond.mask, cond.pooled, timestep)[0]
            for k, mask in enumerate((on_object, ~on_object)):
                error[k] += ((prediction - target).square() * mask).sum((0, 2, 3, 4))
                detail[k] += (added.square() * mask).sum((0, 2, 3, 4))
    return error / detail, detail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dit", default="nano", help="A model for load_pipeline: 'nano' or an exported folder.")
    parser.add_argument("--latents", type=Path, required=True, help="A latent cache for the variance shares.")
    parser.add_argument("--families", type=Path, required=True,
                        help="`diag_memorise.py families` output (has object covers): shape variance, errors.")
    parser.add_argument("--count", type=int, default=96, help="Family videos for the stage errors.")
    parser.add_argument("--stage", type=int, default=2)
    args = parser.parse_args()
    latents, families = LatentCache(args.latents), LatentCache(args.families)
    pipe = load_pipeline(args.dit)
    relative, detail = stage_errors(pipe, families, args.count, args.stage)
    print(f"channels 0-{latents.latents.shape[1] - 1} of frame 0, {args.latents} and {args.families}")
    print("| | per channel |", "|---|---|", sep="\n")
    print(f"| share of the latent's variance | {shares(latents.latents.float()[:, :, 0].var((0, 2, 3)))} |")
    print(f"| share of the variance across a family's shapes | {shares(shape_variance(families))} |")
    print(f"| share of the stage-{args.stage} detail on object pixels | {shares(detail[0])} |")
    for k, where in enumerate(("object pixels", "background")):
        print(f"| stage-{args.stage} velocity error / detail, {where} | "
              + " / ".join(f"{v:.2f}" for v in relative[k].tolist()) + " |")


if __name__ == "__main__":
    main()
