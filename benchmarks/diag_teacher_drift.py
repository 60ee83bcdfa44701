"""Why do the teacher's still objects not stay still? Error accumulation against a per-unit bias.

For real videos of one still object (`eval` split, never trained on), frame 0 is the video's own latent; the later
latent frames (units 1 and 2 of a 17-frame video, eight video frames each) are generated two ways with the same
noise and captions:

- autoregressive: each unit's history is the units generated before it, as in `neodragon generate`;
- teacher-forced: each unit's history is the real video's latents (a perfectly still history).

A still video's frames all equal frame 0, so the report gives, per unit, the mean absolute pixel change from
frame 0 (of 1; the real videos' is 0) and the object's area relative to frame 0 (pixels that differ from the
background corner by more than 0.3). If the teacher-forced units stay still while the autoregressive ones drift more
with every unit, the drift is accumulated error (the DiT's own history is out of its training distribution); if
both drift alike, each unit is biased by itself.

    python benchmarks/diag_teacher_drift.py --count 16 --out docs/results/teacher-drift.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from bench_core import ReportHead, report_preamble, write_atomic

from neodragon import load_pipeline
from neodragon.eval.prompts import _entry, _items, _object_dimensions
from neodragon.recipes.teacher import normalize_latents

MODES = ("autoregressive", "teacher-forced")


def still_entries(count: int, start: int) -> list:
    """The first ``count`` one-object still scenes of the `eval` split from index ``start`` on."""
    entries = []
    for index, spec, seed in _items("eval"):
        if index >= start and len(spec.objects) == 1 and spec.objects[0].motion == "still":
            entries.append(_entry("eval", index, spec, seed, _object_dimensions(spec)))
        if len(entries) == count:
            return entries
    raise AssertionError("unreachable: the eval split is endless")


def generate_units(pipe, real: torch.Tensor, caption: str, seed: int, teacher_forced: bool) -> torch.Tensor:
    """Latents [1, C, T, h, w]: the real frame 0, then units 1.. sampled with the pipeline's own unit sampler."""
    plan = pipe._plan(caption, None, None, None, None, None, None, None, None)
    generator = torch.Generator().manual_seed(seed)
    noise = pipe.prepare_noise(1, plan.latent_frames, plan.height, plan.width, generator)
    cond, uncond = pipe.encode_prompt([caption]), pipe.encode_prompt([pipe.pipeline_config.negative_prompt])
    generated = [real[:, :, :1]]
    for unit in range(1, plan.latent_frames):
        source = [real[:, :, i : i + 1] for i in range(unit)] if teacher_forced else generated
        history = pipe.scheduler.build_history(source)
        scale = plan.guidance(unit)
        generated.append(pipe.sample_unit(noise[:, :, unit : unit + 1], history,
                                          uncond.cat(cond) if scale > 1.0 else cond, plan.steps(unit), scale,
                                          generator, unit))
    return torch.cat(generated, dim=2)


def stillness(video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame of [3, T, H, W] in [0, 1]: mean |f_t - f_0| and object area / frame 0's area."""
    change = (video - video[:, :1]).abs().mean(dim=(0, 2, 3))
    background = video[:, 0, :4, :4].mean(dim=(1, 2)).view(3, 1, 1, 1)
    area = ((video - background).abs().sum(0) > 0.3).float().sum((1, 2))
    return change, area / area[0].clamp(min=1)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=16, help="Still one-object videos.")
    parser.add_argument("--start", type=int, default=2000, help="First `eval` item (nano-eval uses the first ones).")
    parser.add_argument("--model", default="nano")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    report = ReportHead()
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    stats = pipe.pipeline_config.latent_statistics()
    sums = {mode: [] for mode in ("real", *MODES)}
    per = pipe.vae.config.temporal_downsample_scale  # video frames per later latent frame
    units = (pipe.pipeline_config.num_frames - 1) // per + 1
    for entry in still_entries(args.count, args.start):
        video = entry.render().unsqueeze(0)
        real = normalize_latents(pipe.vae.encode(video.to(pipe.vae.dtype)).latent_dist.mean.float(), stats)
        sums["real"].append(stillness(((pipe.decode_latents(real)[0] + 1) / 2).clamp(0, 1)))
        for mode in MODES:
            latents = generate_units(pipe, real, entry.caption, entry.seed, mode == "teacher-forced")
            sums[mode].append(stillness(((pipe.decode_latents(latents)[0] + 1) / 2).clamp(0, 1)))
    lines = report_preamble("Teacher drift on still objects: autoregressive against teacher-forced units", report,
                            True, "other jobs may share the 2 cores")
    lines += ["", f"{args.count} still one-object videos of the `eval` split from item {args.start}; frame 0 is the "
              f"real latent in every row. Unit 0 is frame 0, unit u covers frames {per}u-{per - 1} .. {per}u. "
              "Cells: change from frame 0 / object area relative to frame 0, mean over the unit's frames and the "
              "videos.", "", "| history | " + " | ".join(f"unit {u}" for u in range(1, units)) + " |",
              "|---|" + "---:|" * (units - 1)]
    frames = [slice(per * (u - 1) + 1, per * u + 1) for u in range(1, units)]
    for mode, rows in sums.items():
        change = torch.stack([c for c, _ in rows]).mean(0)
        area = torch.stack([a for _, a in rows]).mean(0)
        cells = [f"{change[f].mean():.4f} / {area[f].mean():.2f}" for f in frames]
        label = "decoded real latents (the VAE alone)" if mode == "real" else mode
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    write_atomic(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines[-4:]))


if __name__ == "__main__":
    main()
