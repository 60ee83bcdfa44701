"""Why two style adapters interfere when fused: weight-space and output-space measurements of the decoder adapters
that ``benchmarks/bench_style_adapters.py --component decoder`` trained.

    python benchmarks/bench_style_fusion.py --runs runs/style-decoder-r2 --styles neon outline \\
        --out docs/results/adapters-style-fusion.md

Per method, with A and B the two styles' adapters and D the decoder:

- weight space: the adapters' dense deltas over all targeted layers, their size relative to the weights
  (``||dW|| / ||W||``), the cosine between the two deltas, and SHiRA's AWOM (mean over layers of the spectral norm
  of ``dW_A^T dW_B`` on the weights viewed as matrices; 0 for orthogonal adapters);
- output space, on latents of held-out real videos: how far each adapter moves the video
  (``||D_A(z) - D(z)|| / ||D(z)||``), and how far the fused pair is from the sum of the two moves, relative to
  that sum (0: the styles add up; 1: the fused output is as far from the sum as the sum is from the base).
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from bench_core import ReportHead, report_preamble, write_atomic
from bench_style_adapters import adapters_on
from peft import PeftModel

from neodragon.adapters.loading import load_adapter
from neodragon.adapters.shira import matrix_shape, remove_shira
from neodragon.adapters.training import METHODS
from neodragon.data import sample
from neodragon.presets import load_pipeline


def dense_deltas(decoder: torch.nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    """Per targeted layer, the adapter's merged weight minus the original weight."""
    base = {n: m.weight.detach().clone() for n, m in decoder.named_modules() if isinstance(m, torch.nn.Conv2d)}
    merged = load_adapter(copy.deepcopy(decoder), folder)
    if isinstance(merged, PeftModel):
        merged = merged.merge_and_unload()
    else:
        remove_shira(merged, merge=True)
    weights = {n: m.weight.detach() for n, m in merged.named_modules() if isinstance(m, torch.nn.Conv2d)}
    return {n: weights[n] - w for n, w in base.items() if not torch.equal(weights[n], w)}


def weight_rows(decoder: torch.nn.Module, runs: Path, styles: Sequence[str]) -> list[str]:
    weights = {n: m.weight.detach() for n, m in decoder.named_modules() if isinstance(m, torch.nn.Conv2d)}
    total = sum(w.square().sum() for w in weights.values()).sqrt()
    rows = []
    for method in METHODS:
        a, b = (dense_deltas(decoder, runs / f"{method}-{style}" / "final") for style in styles)
        norm_a, norm_b = (sum(d.square().sum() for d in x.values()).sqrt() for x in (a, b))
        dot = sum((a[n] * b[n]).sum() for n in a.keys() & b.keys())
        awom = [torch.linalg.matrix_norm(a[n].reshape(matrix_shape(a[n].shape)).double().T
                                         @ b[n].reshape(matrix_shape(b[n].shape)).double(), ord=2).item()
                for n in a.keys() & b.keys()]
        rows.append(f"| {method} | {norm_a / total:.3f} | {norm_b / total:.3f} | {dot / (norm_a * norm_b):+.3f} | "
                    f"{sum(awom) / len(awom):.2e} |")
    return rows


@torch.no_grad()
def output_rows(pipe, runs: Path, styles: Sequence[str], videos: int) -> list[str]:
    clips = torch.stack([sample("eval", i, 0).video for i in range(videos)])
    latents = pipe.vae.encode(clips).latent_dist.mean
    base = pipe.vae.decode(latents).sample
    rows = []
    for method in METHODS:
        folders = {style: runs / f"{method}-{style}" / "final" for style in styles}
        with adapters_on(method, pipe.vae.decoder, folders) as activate:
            moves = {}
            for key in ([styles[0]], [styles[1]], list(styles)):
                activate(key)
                moves["+".join(key)] = pipe.vae.decode(latents).sample - base
        move_a, move_b, fused = moves.values()
        summed = move_a + move_b
        rel = [(m.norm() / base.norm()).item() for m in (move_a, move_b, fused)]
        rows.append(f"| {method} | {rel[0]:.3f} | {rel[1]:.3f} | {rel[2]:.3f} | "
                    f"{((fused - summed).norm() / summed.norm()).item():.3f} |")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="--runs of bench_style_adapters.py (decoder)")
    parser.add_argument("--styles", nargs=2, default=["neon", "outline"])
    parser.add_argument("--model", default="nano")
    parser.add_argument("--videos", type=int, default=8, help="held-out eval videos for the output measurements")
    parser.add_argument("--out", type=Path, default=Path("docs/results/adapters-style-fusion.md"))
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.model, mode="monolithic", torch_dtype=torch.float32, load_super_resolution=False)
    report = ReportHead()
    a, b = args.styles
    body = ["", f"Decoder adapters of `{args.runs}` (styles A = `{a}`, B = `{b}`).", "", "## Weight space", "",
            "| Method | dW_A / W | dW_B / W | cosine(dW_A, dW_B) | mean AWOM |", "|---|---|---|---|---|",
            *weight_rows(pipe.vae.decoder, args.runs, args.styles),
            "", f"## Output space ({args.videos} held-out `eval` videos, posterior-mean latents)", "",
            "| Method | move A / video | move B / video | move A+B / video | (A+B - (A + B)) / (A + B) |",
            "|---|---|---|---|---|", *output_rows(pipe, args.runs, args.styles, args.videos)]
    head = report_preamble("Style-adapter fusion: weight and output space", report, True,
                           "other processes sharing the cores slow the run down, they do not change the numbers")
    write_atomic(args.out, "\n".join(head + body) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
