"""Does guiding away from other shape words make a nano teacher draw the named shape? A sampling-time probe.

Classifier-free guidance pushes a sample away from the negative prompt as a whole. Shape-word guidance adds a
push away from the same caption with another shape word, so that only the direction the shape word controls is
amplified: for each guided step of a one-object caption c with another-shape caption c',

    v = v(neg) + g (v(c) - v(neg)) + g k (v(c) - v(c')),

with v(c') the mean over every other shape class with ``--all`` (7 more DiT rows per step), else the velocity for
the next class's word (``OTHER_SHAPE``, one more row). The DiT's forward is wrapped for the probe; the pipeline is
unchanged. Scores the one-object prompts of ``nano-eval`` with the bundled judge; ``--k 0`` is the plain sampler.

    python benchmarks/diag_shape_guidance.py --model nano --k 0 1 --out docs/results/teacher-shape-guidance.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from bench_core import ReportHead, finish_report

from neodragon import load_pipeline
from neodragon.data.captions import COLOUR_SHAPE, SHAPE_WORDS, replace_shape_word
from neodragon.eval.judge import load_judge
from neodragon.eval.metrics import evaluate
from neodragon.eval.prompts import load_prompt_set
from neodragon.recipes.teacher import swap_caption_word


def other_captions(caption: str, every_shape: bool) -> list[str]:
    """The caption with its shape word replaced by the next class's word, or by each other class's."""
    if not every_shape:
        other = swap_caption_word(caption)
        return [other] if other else []
    found = COLOUR_SHAPE.findall(caption)
    if len(found) != 1:
        return []
    shape = next(name for name, words in SHAPE_WORDS.items() if found[0][1] in words)
    return [replace_shape_word(caption, words[0]) for name, words in SHAPE_WORDS.items() if name != shape]


class ShapeGuidedSampler:
    """Wraps a pipeline's DiT so that every CFG call also pushes away from the other-shape captions."""

    def __init__(self, pipe, k: float, every_shape: bool):
        self.pipe, self.k, self.every_shape, self.other = pipe, k, every_shape, None
        self.forward = pipe.transformer.forward
        pipe.transformer.forward = self.guided_forward

    def guided_forward(self, sample, context, mask, pooled, timestep):
        out = self.forward(sample, context, mask, pooled, timestep)
        half = sample[0][-1].shape[0] // 2
        if self.other is None or self.k == 0 or context.shape[0] != 2 * half:
            return out  # unguided call, or a caption without one "<colour> <shape>"
        rows = self.other.context.shape[0]
        clips = [[clip[half:].repeat(rows, *[1] * (clip.ndim - 1)) for clip in sample[0]]]
        away = self.forward(clips, self.other.context, self.other.mask, self.other.pooled,
                            timestep[half:].repeat(rows))[0].mean(0, keepdim=True)
        uncond, text = out[0].chunk(2)
        return [torch.cat([uncond, text + self.k * (text - away)])]

    def __call__(self, caption: str, seed: int) -> torch.Tensor:
        others = other_captions(caption, self.every_shape)
        self.other = self.pipe.encode_prompt(others) if others else None
        generator = torch.Generator("cpu").manual_seed(seed)
        return self.pipe(caption, generator=generator, output_type="pt").frames[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="nano", help="'nano' or an exported teacher folder")
    parser.add_argument("--k", type=float, nargs="+", default=[0.0, 1.0], help="shape-guidance scales (x g)")
    parser.add_argument("--all", action="store_true", help="push away from every other shape (mean velocity)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/teacher-shape-guidance.md"))
    args = parser.parse_args()
    report = ReportHead()
    pipe = load_pipeline(args.model, mode="monolithic")
    pipe.set_progress_bar_config(disable=True)
    sampler, judge = ShapeGuidedSampler(pipe, 0.0, args.all), load_judge()
    entries = [e for e in load_prompt_set("nano-eval")
               if len(e.scene["objects"]) == 1 and "object_class" in e.dimensions]
    attributes = ("shape", "colour", "motion", "count")
    rows = ["| k | prompts | " + " | ".join(attributes) + " | shape, one object seen | imaging quality |",
            "|---:|---:|" + "---:|" * (len(attributes) + 2)]
    for k in args.k:
        sampler.k = k
        results = evaluate(sampler, entries, judge, progress=False)
        table = results["by_object_count"]["generated"]["1"]
        single = table["if_count_right"]
        rows.append(f"| {k:g} | {table['prompts']} | " + " | ".join(f"{table[a]:.1%}" for a in attributes)
                    + f" | {single['shape'] or 0:.1%} of {single['prompts']} | "
                    + f"{results['generated']['dimensions']['imaging_quality']:.3f} |")
        print(rows[-1], flush=True)
    legend = (f"One-object `nano-eval` prompts, the model's default steps and guidance g; pushed away from "
              f"{'every other shape word (mean velocity)' if args.all else 'the next shape class word'}, "
              "scale g x k. Chance for shape: 12.5%.")
    finish_report(args.out, f"Shape-word guidance on {args.model}", report, "2 threads", [legend, "", *rows])


if __name__ == "__main__":
    main()
