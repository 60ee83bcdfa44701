"""Super-resolution of the bundled model: quality on held-out real videos, latency, and VBench-nano with and without
SR, in one run.

    python benchmarks/bench_sr.py --model nano --videos 32 --threads 1 --out docs/results/sr.md

Quality: the first ``--videos`` items of ShapesWorld's `eval` split (styles drawn from all five), rendered at the
model's size and passed through its VAE (encode -> posterior mean -> decode): these decoded frames are upscaled 2x by
the model's QuickSRNet, by bicubic and by nearest interpolation, and each is scored against the same scenes rendered
at twice the size (mean per-frame PSNR and SSIM, ``eval.upscaling.upscaler_quality``).

Latency: ``QuickSRNet.upscale_video`` (as the pipeline calls it, 16 frames per call, float32) on one 17-frame video,
median of ``--repeats`` timed calls after a warm-up: at nano size (128 x 128 -> 256 x 256, the trained weights) and at
the official 320 x 512 -> 640 x 1024 (random weights of the same configuration; the time does not depend on them).

VBench-nano: every prompt of ``--prompt-set`` (``--limit``: the first N) is generated once with the model's default
sampling; its decoded frames are scored as they are (128 x 128, "without SR") and after SR (256 x 256) reduced back
to 128 x 128 by 2 x 2 averaging ("with SR"), since the judge reads 128 x 128 frames. Both rows come from the same
latents, so they differ only by the round trip through SR.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from bench_core import ReportHead, finish_report, write_atomic

from neodragon.data import STYLES
from neodragon.eval.judge import load_judge
from neodragon.eval.metrics import evaluate
from neodragon.eval.prompts import load_prompt_set
from neodragon.eval.upscaling import area_downsample, classical_upscale, upscaler_quality
from neodragon.models.sr import VARIANTS, QuickSRNet
from neodragon.presets import load_pipeline
from neodragon.training.sr import shapes_world_pairs


@dataclass
class Report(ReportHead):
    model: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    latency: list[dict] = field(default_factory=list)
    vbench: dict = field(default_factory=dict)


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


@torch.no_grad()
def latency(model: QuickSRNet, height: int, width: int, frames: int, repeats: int, weights: str) -> dict:
    video = torch.rand(1, 3, frames, height, width) * 2 - 1
    return {"input": [frames, height, width], "output": [frames, 2 * height, 2 * width], "weights": weights,
            "sr_ms": median_ms(lambda: model.upscale_video(video), repeats),
            "bicubic_ms": median_ms(lambda: classical_upscale(video, "bicubic"), repeats)}


@torch.no_grad()
def vbench(pipe, prompt_set: str, limit: int | None) -> dict:
    entries = load_prompt_set(prompt_set)[:limit]
    judge = load_judge(None)
    plain, upscaled = {}, {}
    started = time.perf_counter()
    for k, entry in enumerate(entries):
        latents = pipe(entry.caption, generator=torch.Generator("cpu").manual_seed(entry.seed),
                       output_type="latent").frames
        video = pipe.decode_latents(latents).clamp(-1, 1)
        sr = area_downsample(pipe.super_resolution.upscale_video(video))
        plain[entry.caption, entry.seed] = ((video[0] + 1) / 2).transpose(0, 1)  # [T, 3, H, W] in [0, 1]
        upscaled[entry.caption, entry.seed] = ((sr[0].clamp(-1, 1) + 1) / 2).transpose(0, 1)
        print(f"generated {k + 1}/{len(entries)}", flush=True)
    generation_s = time.perf_counter() - started
    results = {}
    for name, frames in (("without_sr", plain), ("with_sr", upscaled)):
        scored = evaluate(lambda caption, seed, frames=frames: frames[caption, seed], entries, judge, progress=False)
        results[name] = scored
    return {"prompt_set": prompt_set, "prompts": len(entries), "generation_s": generation_s, **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nano", help="A preset or checkpoint folder with super_resolution/.")
    parser.add_argument("--videos", type=int, default=32, help="Held-out eval videos for PSNR/SSIM.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-set", default="nano-eval")
    parser.add_argument("--limit", type=int, default=None, help="VBench-nano on the first N prompts only.")
    parser.add_argument("--out", type=Path, default=Path("docs/results/sr.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = Report()
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    if pipe.super_resolution is None:
        raise SystemExit(f"{args.model} has no super_resolution/ component")
    sr = pipe.super_resolution.float().eval()
    config = {k: v for k, v in sr.config.items() if not k.startswith("_")}
    size = pipe.pipeline_config.height
    report.model = {"model": args.model, "variant": sr.variant_name, "parameters": sum(p.numel() for p in
                                                                                     sr.parameters()), **config}

    vae = pipe.vae.float().eval()
    low, high, _ = shapes_world_pairs(vae, "eval", range(args.videos), 17, size, 0, STYLES)
    report.quality = upscaler_quality(low, high, {"QuickSRNet": sr})
    print(json.dumps(report.quality), flush=True)

    report.latency.append(latency(sr, size, pipe.pipeline_config.width, 17, args.repeats, "trained"))
    official = QuickSRNet(**config).eval()
    report.latency.append(latency(official, 320, 512, 17, max(1, args.repeats // 2), "random"))
    print(json.dumps(report.latency), flush=True)

    report.vbench = vbench(pipe, args.prompt_set, args.limit)
    body = table(report, args)
    json_path = args.out.with_suffix(".json")
    write_atomic(json_path, json.dumps({"command": report.argv, "model": report.model, "quality": report.quality,
                                        "latency": report.latency, "vbench": report.vbench}, indent=1) + "\n")
    finish_report(args.out, "Super-resolution: QuickSRNet 2x on decoded frames", report,
                  "other jobs on the machine inflate the times; compare rows of this run", body)


def table(report: Report, args: argparse.Namespace) -> list[str]:
    m = report.model
    anchor = "with" if m["use_ito_connection"] else "no"
    family = next((name for name, v in VARIANTS.items() if v["num_channels"] == m["num_channels"]
                   and v["num_intermediate_layers"] == m["num_intermediate_layers"]), "custom")
    lines = [f"Model: `{m['model']}`'s `super_resolution/`: QuickSRNet-{family.capitalize()} "
             f"{m['scale_factor']}x ({m['num_channels']} channels, {m['num_intermediate_layers']} intermediate "
             f"layers, {anchor} anchor), {m['parameters']:,} parameters.", "",
             "## Quality on held-out real videos", "",
             f"The first {args.videos} `eval` videos (17 frames, styles drawn from {', '.join(STYLES)}), decoded by "
             "the model's VAE at 128 x 128 and upscaled to 256 x 256, against the same scenes rendered at 256 x 256 "
             "(mean per-frame PSNR; SSIM with an 11 x 11 Gaussian window).", "",
             "| upscaler | PSNR (dB) | SSIM |", "|---|---:|---:|"]
    for name, q in report.quality.items():
        lines.append(f"| {name} | {q['psnr_db']:.2f} | {q['ssim']:.4f} |")
    lines += ["", "## Latency per 17-frame video (this CPU)", "",
              f"`QuickSRNet.upscale_video` as the pipeline calls it (16 frames per call, float32, {args.threads} "
              "thread(s)), median after a warm-up; bicubic interpolation of the same frames for scale.", "",
              "| input (T x H x W) | output | weights | SR (ms) | SR per frame (ms) | bicubic (ms) |",
              "|---|---|---|---:|---:|---:|"]
    for row in report.latency:
        t, h, w = row["input"]
        _, oh, ow = row["output"]
        lines.append(f"| {t} x {h} x {w} | {t} x {oh} x {ow} | {row['weights']} | {row['sr_ms']:.1f} | "
                     f"{row['sr_ms'] / t:.1f} | {row['bicubic_ms']:.1f} |")
    v = report.vbench
    limited = f" (the first {v['prompts']} prompts: `--limit {args.limit}`)" if args.limit else ""
    lines += ["", "## VBench-nano with and without SR", "",
              f"`{v['prompt_set']}`{limited}, {v['prompts']} prompts, each generated once with the model's default "
              f"sampling ({v['generation_s'] / 60:.1f} min). Without SR the judge reads the decoded 128 x 128 frames; "
              "with SR it reads the 256 x 256 SR frames reduced back to 128 x 128 by 2 x 2 averaging (the judge "
              "reads 128 x 128). Same latents for both rows.", "",
              "| frames | total | quality | semantic | imaging quality | temporal flickering | shape | colour | "
              "motion |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("without_sr", "with_sr"):
        g = v[name]["generated"]
        d = g["dimensions"]

        def fmt(key: str, d=d) -> str:
            return "-" if d.get(key) is None else f"{d[key]:.4f}"

        lines.append(f"| {name.replace('_', ' ')} | {g['total']:.4f} | {g['quality']:.4f} | {g['semantic']:.4f} | "
                     f"{fmt('imaging_quality')} | {fmt('temporal_flickering')} | {fmt('object_class')} | "
                     f"{fmt('colour')} | {fmt('motion')} |")
    real = v["without_sr"]["real"]
    lines += ["", f"Real videos of the same prompts score total {real['total']:.4f} under this judge (the ceiling). "
              "All dimensions: the JSON next to this file."]
    return lines


if __name__ == "__main__":
    main()
