"""Style adapters at an equal parameter budget: SHiRA, LoRA and FouRA each learn two ShapesWorld styles on one
model; the VBench-nano judge scores style strength, content preservation, diversity and two-style fusion.

Run from the repository root once the trained nano teacher exists (the default model is the bundled nano one):

    python benchmarks/bench_style_adapters.py --model <checkpoint folder> --styles neon stripes --steps 500 \\
        --prompts 8 --seeds 4 --threads 2

Adapters are trained with ``neodragon.adapters.training.train_adapter`` into ``--runs`` (a rerun resumes them),
on the DiT (``--component dit``) or on the VAE decoder (``--component decoder``). Every variant (base, A, B, A+B)
generates the first ``--prompts`` prompts of ``nano-eval`` with the same seeds, so the variants see the same
initial noise; decoder adapters leave the DiT as it is, so its latents are generated once per seed and every
variant decodes them. The markdown report is rewritten atomically after every section; the
contact sheet (first prompt, seed 0) goes next to it as a PNG.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from bench_core import ReportHead, report_preamble, write_atomic
from diffusers.utils import logging as diffusers_logging

from neodragon.adapters.loading import (
    COMPONENTS,
    SHIRA_FILE,
    activate_peft_adapters,
    adapted_module,
    load_peft_adapters,
)
from neodragon.adapters.shira import ShiraAdapter, fuse_adapters
from neodragon.adapters.switching import AdapterSwitcher
from neodragon.adapters.training import METHODS, AdapterRecipe, encode_training_data, train_adapter
from neodragon.data import STYLES, Sample, preview_sheet
from neodragon.eval import Judge, accuracy_table, load_judge, load_prompt_set
from neodragon.eval.prompts import PromptEntry
from neodragon.pipelines.neodragon import NeodragonPipeline
from neodragon.presets import load_pipeline
from neodragon.training.trainer import TrainConfig
from neodragon.utils.video import atomic_path

CONTENT = ("shape", "colour", "motion")
TARGETS = {"dit": "`DIT_TARGETS`", "decoder": "every `Conv2d` of the VAE decoder"}
OBJECTIVES = {
    "dit": "pyramidal flow matching (`recipes.teacher.flow_matching_loss`) with content-only captions (the style is "
           "not named, so the adapter makes it the default look) and 10 % caption dropout",
    "decoder": "style transfer: the decoder maps the frozen encoder's latent of an unstyled video to the same scene "
               "in the style (`recipes.vae.reconstruction_losses`: object-weighted L1 + MSE + edges, on crops around "
               "the objects, `--crop` pixels)",
}
LEARNT_STYLE_ACCURACY = 0.5  # the judge must read the style alone on half the videos for a concept loss


@dataclass
class Judged:
    """The judge's view of one variant's videos (seed-major: seed s, prompt n at ``s * prompts + n``)."""

    scenes: list[dict]
    features: torch.Tensor  # [seeds, prompts, D]: object + scene embeddings
    style_probs: torch.Tensor  # [seeds * prompts, len(STYLES)]
    sheet_video: torch.Tensor  # first prompt, first seed: [3, T, H, W] in [-1, 1]

    def style_accuracy(self, style: str) -> float:
        return sum(scene["style"] == style for scene in self.scenes) / len(self.scenes)

    def style_prob(self, style: str) -> float:
        return self.style_probs[:, STYLES.index(style)].mean().item()

    def diversity(self) -> float:
        """Mean over prompts of the mean pairwise L2 distance between the seeds' features."""
        per_prompt = self.features.transpose(0, 1)  # [prompts, seeds, D]
        prompts, seeds = per_prompt.shape[:2]
        if seeds < 2:
            return float("nan")
        return (torch.cdist(per_prompt, per_prompt).sum() / (prompts * seeds * (seeds - 1))).item()


@dataclass
class Report(ReportHead):
    training: list[str] = field(default_factory=list)
    judged: dict[str, Judged] = field(default_factory=dict)  # "base", "<method> <style>[+<style>]"
    params: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- training


def recipe_for(args: argparse.Namespace, method: str, style: str) -> AdapterRecipe:
    return AdapterRecipe(method=method, style=style, component=args.component, rank=args.rank,
                         num_videos=args.videos, crop=args.crop)


def train_all(pipe: NeodragonPipeline, args: argparse.Namespace, report: Report,
              save: Callable[[], None]) -> dict[str, dict[str, Path]]:
    """Both style adapters of every method; each style's videos are encoded once for the three methods."""
    folders: dict[str, dict[str, Path]] = {method: {} for method in METHODS}
    for seed, style in enumerate(args.styles, start=args.seed):  # other seeds: SHiRA masks of A and B differ
        data = encode_training_data(pipe, recipe_for(args, "shira", style), seed)
        for method in METHODS:
            print(f"training {method} on {style} ...", file=sys.stderr, flush=True)
            config = TrainConfig(output_dir=str(args.runs / f"{method}-{style}"), max_steps=args.steps,
                                 batch_size=args.batch_size, learning_rate=args.lr, seed=seed,
                                 warmup_steps=min(100, max(1, args.steps // 10)), save_every=max(1, args.steps // 4))
            recipe = recipe_for(args, method, style)
            run = train_adapter(pipe, config, recipe, data)
            folders[method][style] = run.path
            report.params[method] = run.parameters
            loss = run.record.get("loss", float("nan"))
            report.training.append(f"| {method} | {style} | {run.parameters:,} | {loss:.4f} | "
                                   f"{run.record.get('elapsed_s', float('nan')):,.0f} |")
            save()
    return folders


# ---------------------------------------------------------------------------------------------- generation


@contextmanager
def adapters_on(method: str, module: torch.nn.Module,
                folders: dict[str, Path]) -> Iterator[Callable[[Sequence[str]], None]]:
    """Load a method's style adapters onto the pipeline's adapted module (DiT or decoder); yields
    ``activate(styles)``, which makes exactly those adapters act. SHiRA: their ``fuse_adapters`` sum scattered into
    the weights (``AdapterSwitcher``); LoRA: PEFT with those adapters active; FouRA: the same, composed at strength 1
    each (``set_strengths``). The module gets its original weights and layers back on exit."""
    if method == "shira":
        adapters = {style: ShiraAdapter.load(folder / SHIRA_FILE) for style, folder in folders.items()}
        switcher = AdapterSwitcher(module)
        try:
            yield lambda styles: switcher.apply(fuse_adapters([adapters[s] for s in styles]))
        finally:
            switcher.restore()
        return
    model = load_peft_adapters(module, folders)
    try:
        yield lambda styles: activate_peft_adapters(model, list(styles))
    finally:
        model.unload()


@torch.no_grad()
def generate(pipe: NeodragonPipeline, entries: Sequence[PromptEntry], seed: int, args: argparse.Namespace,
             latents: dict[int, torch.Tensor]) -> torch.Tensor:
    """One seed's videos ``[B, 3, T, H, W]`` in [-1, 1] (the judge's input). With decoder adapters the DiT's
    latents are the same for every variant: they are generated once per seed (``latents``) and decoded."""
    steps = {"num_inference_steps": args.sample_steps, "video_num_inference_steps": args.sample_steps}
    call = {"generator": torch.Generator().manual_seed(seed), **(steps if args.sample_steps else {})}
    captions = [e.caption for e in entries]
    if args.component == "dit":
        return pipe(captions, output_type="pt", **call).frames.float().transpose(1, 2) * 2 - 1
    if seed not in latents:
        latents[seed] = pipe(captions, output_type="latent", **call).frames
    return pipe.decode_latents(latents[seed]).clamp(-1, 1)


@torch.no_grad()
def judge_variant(pipe: NeodragonPipeline, judge: Judge, entries: Sequence[PromptEntry],
                  args: argparse.Namespace, latents: dict[int, torch.Tensor]) -> Judged:
    """Generate every prompt with every seed (one batch per seed) and judge the videos."""
    scenes, features, probs, sheet = [], [], [], None
    for seed in range(args.seeds):
        videos = generate(pipe, entries, seed, args, latents)
        predicted, feats = judge.predict(videos)
        scenes += predicted
        features.append(feats)
        probs.append(judge(videos)["style"].float().softmax(-1))
        sheet = videos[0] if sheet is None else sheet
    return Judged(scenes, torch.stack(features), torch.cat(probs), sheet)


# ---------------------------------------------------------------------------------------------- report


def variant_row(label: str, params: str, judged: Judged, base: Judged, entries: Sequence[PromptEntry],
                styles: Sequence[str]) -> str:
    content = accuracy_table(judged.scenes, [e.scene for e in entries] * (len(judged.scenes) // len(entries)))
    cells = [label, params,
             *[f"{judged.style_accuracy(s):.2f} | {judged.style_prob(s):.3f}" for s in styles],
             *[f"{content[key]:.2f}" for key in CONTENT], f"{judged.diversity() / base.diversity():.2f}"]
    return "| " + " | ".join(cells) + " |"


def fusion_row(method: str, report: Report, styles: Sequence[str]) -> str:
    fused = report.judged[f"{method} {'+'.join(styles)}"]
    cells = [method]
    for style in styles:
        single = report.judged[f"{method} {style}"]
        alone, together = single.style_prob(style), fused.style_prob(style)
        # a ratio against a style the adapter never produced says nothing about fusion
        learnt = single.style_accuracy(style) >= LEARNT_STYLE_ACCURACY
        cells += [f"{alone:.3f}", f"{together:.3f}", f"{1 - together / alone:+.2f}" if learnt else "n/a (not learnt)"]
    return "| " + " | ".join(cells) + " |"


def render(report: Report, args: argparse.Namespace, entries: Sequence[PromptEntry], finished: bool) -> str:
    a, b = args.styles
    lines = report_preamble("Style adapters: SHiRA vs LoRA vs FouRA at an equal budget", report, finished,
                            "other processes sharing the cores slow the run down, they do not change the scores")
    lines += ["", "## Setup", "",
              f"- Model: `{args.model}` (monolithic DiT, float32). Styles A = `{a}`, B = `{b}` (ShapesWorld).",
              f"- Adapters on the **{args.component}**: `neodragon.adapters.training.train_adapter`, budget "
              f"r = {args.rank} (r x (fan_in + out) trainable numbers per targeted layer "
              f"({TARGETS[args.component]}) for all three methods: SHiRA random mask, PEFT LoRA with "
              "`matching_lora_config`, FouRA DCT without gate, alpha = r).",
              f"- Training: {OBJECTIVES[args.component]}, {args.steps} steps, batch {args.batch_size}, AdamW lr "
              f"{args.lr:g} (warm-up, cosine), on {args.videos} train-split videos of the style. Style A uses seed "
              f"{args.seed}, style B seed {args.seed + 1} (different SHiRA masks).",
              f"- Generation: the first {len(entries)} prompts of `nano-eval` x {args.seeds} seeds (one batch per "
              "seed: every variant starts from the same noise), "
              + (f"{args.sample_steps} step(s) per pyramid stage" if args.sample_steps else "the checkpoint's "
                 "default steps and guidance") + ".",
              "- Style strength: the judge's style accuracy for the style (acc) and its mean softmax probability (P). "
              "Content: the judge's shape / colour / motion accuracy against the prompts' labels "
              "(`eval.metrics.accuracy_table`). Diversity: mean pairwise L2 distance between the seeds' judge "
              "features (object + scene embeddings) of a prompt, averaged over prompts, relative to the base model.",
              "- Fusion (A+B): SHiRA `fuse_adapters` applied by `AdapterSwitcher`; LoRA PEFT with both adapters "
              "active; FouRA both active, composed with `set_strengths` (1 each). Concept loss of a style = "
              "1 - P(style | A+B) / P(style | that adapter alone), reported where the judge reads the style "
              f"in at least {LEARNT_STYLE_ACCURACY:.0%} of the videos of that adapter alone."]
    if report.training:
        lines += ["", "## Training", "",
                  "| Method | Style | Trainable numbers | Final loss | Training s (from log.jsonl) |",
                  "|---|---|---|---|---|", *report.training]
    if "base" in report.judged:
        base = report.judged["base"]
        lines += ["", "## Style strength, content and diversity", "",
                  f"| Variant | Params | {a} acc | P({a}) | {b} acc | P({b}) | Shape | Colour | Motion | "
                  "Diversity vs base |", "|---|---|---|---|---|---|---|---|---|---|",
                  variant_row("base", "0", base, base, entries, args.styles)]
        for key, judged in report.judged.items():
            if key != "base":
                params = f"{report.params[key.split()[0]] * len(key.split()[1].split('+')):,}"
                lines.append(variant_row(key, params, judged, base, entries, args.styles))
    fused = [m for m in METHODS if f"{m} {a}+{b}" in report.judged]
    if fused:
        lines += ["", "## Multi-adapter fusion", "",
                  f"| Method | P({a}) alone | P({a}) in A+B | Concept loss {a} | P({b}) alone | P({b}) in A+B | "
                  f"Concept loss {b} |", "|---|---|---|---|---|---|---|",
                  *[fusion_row(m, report, args.styles) for m in fused]]
    if finished:
        lines += ["", "## Contact sheet", "", f"![contact sheet]({args.out.with_suffix('.png').name})", "",
                  f"First prompt (\"{entries[0].caption}\"), seed 0; rows: base, then A, B, A+B of each method."]
    return "\n".join(lines) + "\n"


def write_sheet(report: Report, entries: Sequence[PromptEntry], path: Path) -> None:
    rows = [Sample(judged.sheet_video, f"{key}: {entries[0].caption}" if key == "base" else key, None)
            for key, judged in report.judged.items()]
    with atomic_path(path, overwrite=True) as tmp:
        preview_sheet(rows).save(tmp, format="PNG")


# ---------------------------------------------------------------------------------------------- main


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nano", help="checkpoint folder or preset (load_pipeline)")
    parser.add_argument("--styles", nargs=2, default=["neon", "stripes"], choices=STYLES[1:], metavar="STYLE")
    parser.add_argument("--steps", type=int, default=500, help="training steps per adapter")
    parser.add_argument("--prompts", type=int, default=8, help="first N prompts of nano-eval")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt (diversity needs >= 2)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("docs/results/adapters-style.md"))
    parser.add_argument("--runs", type=Path, default=Path("runs/style-adapters"), help="adapter runs (resumable)")
    parser.add_argument("--component", choices=COMPONENTS, default="dit", help="module the adapters train on")
    parser.add_argument("--crop", type=int, default=48, help="decoder adapters: training crop in pixels")
    parser.add_argument("--rank", type=int, default=1, help="budget: r x (in + out) per layer, every method")
    parser.add_argument("--videos", type=int, default=64, help="training videos per style")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-steps", type=int, help="steps per pyramid stage (default: the checkpoint's)")
    parser.add_argument("--judge", type=Path, help="judge folder (default: the bundled one)")
    args = parser.parse_args(argv)
    if args.styles[0] == args.styles[1]:
        parser.error("give two different styles")
    if min(args.steps, args.prompts, args.seeds, args.threads, args.rank, args.videos, args.batch_size) < 1:
        parser.error("steps, prompts, seeds, threads, rank, videos and batch size must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    diffusers_logging.set_verbosity_error()
    report = Report()
    entries = load_prompt_set("nano-eval")[: args.prompts]

    def save(finished: bool = False) -> None:
        write_atomic(args.out, render(report, args, entries, finished))

    pipe = load_pipeline(args.model, mode="monolithic", torch_dtype=torch.float32, load_super_resolution=False)
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge(args.judge)
    folders = train_all(pipe, args, report, save)
    report.load["after training"] = os.getloadavg()
    print("generating: base ...", file=sys.stderr, flush=True)
    latents: dict[int, torch.Tensor] = {}
    report.judged["base"] = judge_variant(pipe, judge, entries, args, latents)
    for method in METHODS:
        with adapters_on(method, adapted_module(pipe, args.component), folders[method]) as activate:
            for styles in ([args.styles[0]], [args.styles[1]], args.styles):
                print(f"generating: {method} {'+'.join(styles)} ...", file=sys.stderr, flush=True)
                activate(styles)
                report.judged[f"{method} {'+'.join(styles)}"] = judge_variant(pipe, judge, entries, args, latents)
        save()
    write_sheet(report, entries, args.out.with_suffix(".png"))
    save(finished=True)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
