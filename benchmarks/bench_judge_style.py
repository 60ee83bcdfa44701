"""How a VBench-nano judge reads the style of real videos seen through a VAE decoder's blur.

Generated videos come out of the nano VAE's decoder, whose 8 x 8 latent grid smears and blocks fine detail; a judge
trained on crisp renders read that as pixel art. This reads real held-out videos (every style) as rendered, blended
with a copy rebuilt from their 8 x 8 block means (``grid_blur``: bilinear, or blocky), and decoded by a VAE from
their own latents (a VAE's reconstruction: the closest real stand-in for a generated video). Per judge and version:
accuracy per style, how many non-pixel videos are read as pixel art, and shape and colour accuracy.

    python benchmarks/bench_judge_style.py --judge <judge folder> [...] --vae nano --count 200 \
        --out docs/results/judge-style.md
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from neodragon.data import STYLES
from neodragon.eval.judge import grid_blur, load_judge, real_videos, scene_dict
from neodragon.eval.metrics import accuracy_table
from neodragon.eval.reconstruction import reconstruct
from neodragon.presets import load_video_vae
from neodragon.utils.video import atomic_path

BLURS = {"grid blur 0.3": (0.3, False), "grid blur 0.6": (0.6, False), "grid blur 0.6, blocky": (0.6, True)}


def versions(vae_source: str | None) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Name -> transform of a batch of real videos [B, 3, T, H, W]."""
    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"as rendered": lambda videos: videos}
    for name, (strength, blocky) in BLURS.items():
        out[name] = lambda videos, s=strength, b=blocky: torch.stack([grid_blur(v, s, b) for v in videos])
    if vae_source is not None:
        vae = load_video_vae(vae_source)
        out[f"VAE `{vae_source}` reconstruction"] = lambda videos: reconstruct(vae, videos)
    return out


def row(judge_name: str, version: str, predicted: list[dict], truth: list[dict]) -> str:
    table = accuracy_table(predicted, truth)
    per_style = []
    for style in STYLES:
        pairs = [p["style"] == t["style"] for p, t in zip(predicted, truth, strict=True) if t["style"] == style]
        per_style.append(f"{sum(pairs)}/{len(pairs)}")
    others = [p["style"] for p, t in zip(predicted, truth, strict=True) if t["style"] != "pixel"]
    percent = {key: f"{100 * table[key]:.1f}%" for key in ("style", "shape", "colour")}
    return (f"| {judge_name} | {version} | {percent['style']} | " + " | ".join(per_style)
            + f" | {others.count('pixel')}/{len(others)} | {percent['shape']} | {percent['colour']} |")


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--judge", nargs="+", default=["bundled"], help="Judge folders ('bundled': the package's).")
    parser.add_argument("--vae", default="nano", help="VAE for the reconstruction rows ('nano', a `train vae` "
                                                      "folder, or 'none').")
    parser.add_argument("--count", type=int, default=200, help="Real held-out videos (every style).")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    videos, labels = real_videos("heldout", range(args.count))
    truth = [scene_dict(labels, i) for i in range(args.count)]
    inputs = {name: torch.cat([transform(chunk) for chunk in videos.split(20)])
              for name, transform in versions(None if args.vae == "none" else args.vae).items()}
    lines = ["# Judge style readings through a VAE decoder's blur\n",
             f"`python benchmarks/bench_judge_style.py {' '.join(sys.argv[1:])}`\n",
             f"The first {args.count} videos of the `heldout` split (every style), exact renders. Grid blur s: "
             "each frame blended by s with a copy rebuilt from its 8 x 8 block means (bilinear, or blocky); VAE "
             "reconstruction: encoded and decoded. Style columns: right / videos of that style; `read as pixel`: "
             "non-pixel videos whose style the judge reads as pixel art.\n",
             "| judge | videos | style | " + " | ".join(STYLES) + " | read as pixel | shape | colour |",
             "|---|---|---:|" + "---:|" * len(STYLES) + "---:|---:|---:|"]
    for judge_path in args.judge:
        judge = load_judge(None if judge_path == "bundled" else judge_path)
        for name, batch in inputs.items():
            lines.append(row(judge_path, name, judge.predict(batch)[0], truth))
            print(lines[-1], flush=True)
    with atomic_path(args.out, overwrite=True) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
