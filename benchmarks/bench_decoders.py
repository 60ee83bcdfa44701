"""Decoders of one latent space side by side: decode latency of a 17-frame video, decoder parameters, and PSNR of
reconstructions of held-out real ShapesWorld videos, for the teacher VAE and the students of `neodragon distill
decoder` (they share the teacher's frozen encoder, so every row decodes the same latents).

    python benchmarks/bench_decoders.py --vae nano runs/dd-64/final runs/dd-48/final \\
        --videos 100 --threads 2 --out docs/results/decoder-distillation.md

Latency: the decoder alone (``vae.decode``, float32) on the latents of one 17 x 128 x 128 video, median of
``--repeats`` timed calls after a warm-up call; all rows in one process, one after the other, so they see the same
machine load. PSNR: ``eval.reconstruction.reconstruction_psnr`` on the first ``--videos`` items of the `eval` split
in every style, the videos `neodragon eval vae` reads (``eval.judge.real_videos``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from bench_core import ReportHead, finish_report

from neodragon.data import STYLES
from neodragon.eval.judge import real_videos
from neodragon.eval.reconstruction import reconstruction_psnr
from neodragon.presets import load_video_vae


@dataclass
class Report(ReportHead):
    rows: list[dict] = field(default_factory=list)


@torch.no_grad()
def decode_ms(vae, latents: torch.Tensor, repeats: int) -> float:
    vae.decode(latents)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        vae.decode(latents)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure(source: str, videos: torch.Tensor, repeats: int) -> dict:
    vae = load_video_vae(source).float().eval()
    with torch.no_grad():
        latents = vae.encode(videos[:1]).latent_dist.mean
    return {"vae": source, "widths": list(vae.config.decoder_num_features), "type": vae.config.decoder_type,
            "decoder_parameters": sum(p.numel() for p in vae.decoder.parameters()),
            "decode_ms": decode_ms(vae, latents, repeats), "psnr_db": reconstruction_psnr(vae, videos)}


def table(report: Report, videos: int) -> list[str]:
    base = report.rows[0]
    lines = [f"PSNR on the first {videos} `eval` videos (styles drawn from {', '.join(STYLES)}); latency of "
             "`vae.decode` on the latents of one 17 x 128 x 128 video; speed-up and PSNR change against the first "
             "row.", "",
             "| VAE | decoder widths | decoder parameters | decode (ms) | speed-up | PSNR (dB) | PSNR change (dB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in report.rows:
        lines.append(f"| `{row['vae']}` | {','.join(map(str, row['widths']))} ({row['type']}) | "
                     f"{row['decoder_parameters']:,} | {row['decode_ms']:.1f} | "
                     f"{base['decode_ms'] / row['decode_ms']:.2f}x | {row['psnr_db']:.2f} | "
                     f"{row['psnr_db'] - base['psnr_db']:+.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", nargs="+", required=True, help="The teacher first ('nano' or a folder), then the "
                        "students (`distill decoder` final/ folders or checkpoint folders).")
    parser.add_argument("--videos", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/results/decoder-distillation.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = Report()
    videos, _ = real_videos("eval", range(args.videos))
    for source in args.vae:
        report.rows.append(measure(source, videos, args.repeats))
        print(json.dumps(report.rows[-1]), flush=True)
    finish_report(args.out, "Decoder distillation: speed and reconstruction of held-out videos", report,
                  "other jobs on the machine inflate the times; compare rows of this run", table(report, args.videos))


if __name__ == "__main__":
    main()
