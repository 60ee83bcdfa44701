"""A contact sheet of generated videos for prompts spread over a VBench-nano prompt set: one row per prompt and
model (its caption, then frames evenly spaced from first to last), each prompt at its own seed, so that models given
together are compared on the same prompts and seeds. Run from the repository root:

    python benchmarks/contact_sheet.py --model nano --count 16 --out docs/results/first-frame-sheet.png
    python benchmarks/contact_sheet.py --model teacher=nano --model student=runs/student --count 8 --out sheet.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from neodragon.data import Sample, preview_sheet
from neodragon.eval.prompts import load_prompt_set
from neodragon.presets import load_pipeline
from neodragon.utils.video import atomic_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="a preset or a checkpoint folder, NAME=MODEL to label "
                        "its rows; repeat to compare models (default: nano)")
    parser.add_argument("--mode", help="hybrid or monolithic (default: the model's)")
    parser.add_argument("--prompt-set", default="nano-eval")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--frames", type=int, default=6, help="frames per row")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    entries = load_prompt_set(args.prompt_set)
    picks = [entries[round(i * (len(entries) - 1) / max(args.count - 1, 1))] for i in range(args.count)]
    models = [spec.partition("=")[::2] if "=" in spec else (spec, spec) for spec in args.model or ["nano"]]
    pipes = []
    for _, model in models:
        pipes.append(load_pipeline(model, mode=args.mode))
        pipes[-1].set_progress_bar_config(disable=True)
    samples = []
    for entry in picks:
        for (name, _), pipe in zip(models, pipes, strict=True):
            video = pipe(entry.caption, generator=torch.Generator().manual_seed(entry.seed), output_type="pt").frames[0]
            caption = f"[{name}] {entry.caption}" if len(models) > 1 else entry.caption
            samples.append(Sample(video.transpose(0, 1) * 2 - 1, caption, labels=None))
    with atomic_path(args.out, overwrite=True) as tmp:
        preview_sheet(samples, frames=args.frames).save(tmp, format="PNG")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
