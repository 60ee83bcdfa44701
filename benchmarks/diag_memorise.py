"""Can a nano DiT memorise the shapes of a few training videos? A cheap capacity probe for the teacher's shape failure.

A DiT that cannot reproduce the shapes of 32 videos it was trained on, from their exact training captions, cannot
learn shapes from thousands. ``subset`` writes the first N one-object videos (``--objects 2``: two-object videos, a
probe of attribute binding) of an `encode-latents` folder as a latent folder of their own, and a prompt set with
their exact training captions; train any DiT on it with
`neodragon train teacher`, export it, and ``score`` it:

    python benchmarks/diag_memorise.py subset --latents /work/runs/latents --count 32 --out /work/runs/overfit/set32
    neodragon train teacher --latents /work/runs/overfit/set32 -o /work/runs/overfit/s6x4 --steps 3000 --lr 5e-4
    neodragon train export-teacher --vae /work/runs/vae-decoder-styles/final --dit /work/runs/overfit/s6x4/final \
        -o /work/runs/overfit/export-s6x4
    python benchmarks/diag_memorise.py score --set /work/runs/overfit/set32 --model /work/runs/overfit/export-s6x4 \
        --guidance 1 2 5 --out docs/results/teacher-memorise.md

``score`` reports, on the subset: the judge's reading of the decoded training latents themselves (the bound), of
the model's samples at each guidance scale (later frames at min(guidance, 4)), with the relative latent error per
frame against the training latent; and, per pyramid stage, the relative error of frame 0 when the sampler's Euler
steps integrate that stage alone from the exact point where training starts it (no guidance): which stage fails
to reproduce what it was trained on. ``swap`` copies a subset with each caption's shape word swapped, scored
against the named shape or the video's own: whether a DiT that draws the shapes follows the shape word.
``families`` writes one-object scenes each drawn with every shape it allows, captions differing only in the shape
word: fitted to them, a DiT must read the word."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from bench_core import ReportHead, report_preamble, write_atomic
from safetensors.torch import save_file

from neodragon import load_pipeline
from neodragon.data import SHAPES, other_shapes, sample, shape_variant
from neodragon.data.captions import SHAPE_WORDS
from neodragon.eval.judge import load_judge
from neodragon.eval.metrics import semantic_scores
from neodragon.eval.prompts import _entry, _items, _object_dimensions, load_prompt_set, save_prompt_set
from neodragon.recipes.nano import LatentCache, clip_batch, encode_rendered, latent_object_cover
from neodragon.recipes.teacher import OTHER_SHAPE, swap_caption_word
from neodragon.recipes.vae import load_trained_vae

ATTRIBUTES = ("shape", "colour", "motion", "count")
SHARD = "shard_00000.safetensors"


def write_subset(latents_dir: Path, count: int, out: Path, vae_dir: Path | None = None, size: int = 128,
                 skip: int = 0, objects: int = 1) -> None:
    """``count`` videos with ``objects`` objects of the (unshuffled, seed-0 `train` split) cache, after the first
    ``skip`` such ones (videos a probe trained on 'skip' videos never saw), with a prompt set.
    With ``vae_dir``, the same videos are rendered at ``size`` x ``size`` and encoded by that VAE instead: at
    256, objects cover twice as many latent pixels, as with a 4x-compression VAE at 128."""
    cache = LatentCache(latents_dir)
    rows, entries, seen = [], [], 0
    for (index, spec, render_seed), caption in zip(_items("train"), cache.captions, strict=False):
        seen += len(spec.objects) == objects
        if len(spec.objects) == objects and seen > skip:
            rows.append(index)
            entry = _entry("train", index, spec, render_seed, _object_dimensions(spec))
            entries.append(dataclasses.replace(entry, caption=caption))
        if len(rows) == count:
            break
    latents, captions = cache.batch(rows)
    if vae_dir is not None:
        latents, cover = encode_videos(vae_dir, rows, size)
    else:  # the cache may predate stored covers: render them
        _, coverage, _ = clip_batch("train", rows, 17, size)
        cover = latent_object_cover(coverage, latents.shape[2:])
    out.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents.contiguous(), "cover": cover.contiguous()}, str(out / SHARD),
              metadata={"captions": json.dumps(captions)})
    save_prompt_set(entries, out / "prompts.json", f"memorise-{count}")
    (out / "geometry.json").write_text(json.dumps({"height": size, "width": size}) + "\n")


def write_swapped(set_dir: Path, out: Path, labels: str) -> None:
    """The subset ``set_dir`` with each caption's shape word swapped for another class's (`swap_caption_word`):
    same latents and seeds. ``labels`` says what the judge is scored against: the shape the caption now names
    ("caption": does the DiT follow the word?) or the shape of the training video ("video": does it draw what it
    memorised for that video?)."""
    entries = load_prompt_set(set_dir / "prompts.json")
    swapped = []
    for entry in entries:
        caption = swap_caption_word(entry.caption)
        if caption is None:
            raise SystemExit(f"{set_dir}: '{entry.caption}' is not a one-object caption; `swap` takes such sets only.")
        scene = entry.scene
        if labels == "caption":
            shape = OTHER_SHAPE[scene["objects"][0]["shape"]]  # every synonym of a class goes to the same class
            scene = {**scene, "objects": [{**scene["objects"][0], "shape": shape}]}
        swapped.append(dataclasses.replace(entry, caption=caption, scene=scene))
    out.mkdir(parents=True, exist_ok=True)
    save_file({"latents": LatentCache(set_dir).latents.contiguous()}, str(out / SHARD),
              metadata={"captions": json.dumps([e.caption for e in swapped])})
    save_prompt_set(swapped, out / "prompts.json", f"{set_dir.name}-shape-swapped-{labels}-labels")
    (out / "geometry.json").write_text((set_dir / "geometry.json").read_text())


def write_families(count: int, out: Path, skip: int = 0) -> None:
    """``count`` one-object `train` scenes (after the first ``skip``), each drawn with every shape it allows (all
    but held-out combinations and spinning round shapes) and captioned with that shape's plain word, nothing else
    changed: within a family only the shape word tells the videos apart, so a DiT that fits them draws each shape
    only if it reads the word."""
    variants, scenes = [], 0
    for index, spec, render_seed in _items("train"):
        if len(spec.objects) == 1:
            allowed = {spec.objects[0].shape, *other_shapes("train", spec.objects[0])}
            scenes += 1
            if scenes > skip:
                variants += [((index, spec, render_seed), shape) for shape in SHAPES if shape in allowed]
        if scenes == skip + count:
            break
    vae, stats = load_trained_vae("nano")
    latents, captions, cover, _ = encode_rendered(
        vae.float().eval(), stats, range(len(variants)), 4, "cpu",
        lambda k: shape_variant("train", variants[k][0][0], variants[k][1], SHAPE_WORDS[variants[k][1]][0]))
    entries = []
    for ((index, spec, render_seed), shape), caption in zip(variants, captions, strict=True):
        variant = dataclasses.replace(spec, objects=(dataclasses.replace(spec.objects[0], shape=shape),))
        entry = _entry("train", index, variant, render_seed, _object_dimensions(variant))
        entries.append(dataclasses.replace(entry, id=f"{entry.id}-{shape}", caption=caption))
    out.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents.contiguous(), "cover": cover.contiguous()}, str(out / SHARD),
              metadata={"captions": json.dumps(captions)})
    save_prompt_set(entries, out / "prompts.json", f"shape-families-{count}")
    (out / "geometry.json").write_text(json.dumps({"height": 128, "width": 128}) + "\n")


def encode_videos(vae_dir: Path, rows: list[int], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Items ``rows`` of the `train` split rendered at ``size`` and encoded as `encode-latents` does: latents and
    object covers."""
    vae, stats = load_trained_vae(vae_dir)
    vae = vae.float().eval()
    latents, _, cover, _ = encode_rendered(vae, stats, rows, 4, "cpu",
                                           lambda i: sample("train", i, height=size, width=size))
    return latents, cover


def judged(judge, frames: torch.Tensor, entries) -> dict[str, float]:
    """Fraction of videos ([B, 3, T, H, W] in [-1, 1]) whose judged object attribute matches the prompt."""
    scenes, _ = judge.predict(frames.clamp(-1, 1))
    rows = [semantic_scores(p, e.scene) for p, e in zip(scenes, entries, strict=True)]
    return {a: sum(r[a] for r in rows) / len(rows) for a in ATTRIBUTES}


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    return torch.cat([pipe.decode_latents(chunk) for chunk in latents.split(8)])


def sample_rows(pipe, judge, entries, cached: torch.Tensor, guidances: list[float], geometry: dict,
                steps: int) -> list[str]:
    bound = judged(judge, decode(pipe, cached), entries)
    rows = ["| samples | shape | colour | motion | count | latent error, frames 0 / 1 / 2 |",
            "|---|---:|---:|---:|---:|---|",
            "| decoded training latents (the bound) | " + " | ".join(f"{v:.0%}" for v in bound.values()) + " | 0 |"]
    for g in guidances:
        latents = torch.cat([pipe([e.caption], generator=torch.Generator().manual_seed(e.seed), guidance_scale=g,
                                  video_guidance_scale=min(g, 4.0), num_inference_steps=steps, output_type="latent",
                                  **geometry).frames.float()
                             for e in entries])
        error = (latents - cached).square().mean((1, 3, 4)).sum(0) / cached.square().mean((1, 3, 4)).sum(0)
        scores = judged(judge, decode(pipe, latents), entries)
        rows.append(f"| guidance {g:g} | " + " | ".join(f"{v:.0%}" for v in scores.values()) + " | "
                    + " / ".join(f"{e:.3f}" for e in error.tolist()) + " |")
    return rows


def stage_rows(pipe, cached: torch.Tensor, captions: list[str], steps: int) -> list[str]:
    """Each stage integrated alone from its exact training start point; error relative to the stage's flow."""
    scheduler, frame0 = pipe.scheduler, cached[:, :, :1]
    cond = pipe.encode_prompt(captions)
    noise = torch.randn(frame0.shape, generator=torch.Generator().manual_seed(1))
    rows = ["| stage | error of the stage's end point / length of its flow |", "|---:|---:|"]
    for stage in range(scheduler.config.stages):
        start, velocity, _ = scheduler.training_target(frame0, noise, stage, 0)  # index 0: the window's start
        # the pipeline's own sampler, started at `stage` and given no later stage to go on to
        x = pipe.sample_unit(start, None, cond, [steps] * (stage + 1), 1.0, first_stage=stage)
        end = start - velocity
        rows.append(f"| {stage} | {(x - end).square().mean() / velocity.square().mean():.4f} |")
    return rows


def score(args: argparse.Namespace) -> None:
    report = ReportHead()
    entries = load_prompt_set(args.set / "prompts.json")
    cache = LatentCache(args.set)
    cached = cache.latents.float()
    if cache.captions != [e.caption for e in entries]:
        raise SystemExit(f"{args.set}: the prompt set does not match the latents; re-run `subset`.")
    judge, body = load_judge(None), []
    geometry = json.loads((args.set / "geometry.json").read_text())
    for model in args.model:
        pipe = load_pipeline(str(model))
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            rows = [f"## {model}", "", f"Samples: frame 0 with {args.steps} Euler steps per stage, later frames with "
                    "the model's defaults.", "", *sample_rows(pipe, judge, entries, cached, args.guidance, geometry,
                                                              args.steps), "",
                    f"Frame 0, each stage alone from its training start point, {args.steps} Euler steps, no guidance:",
                    "", *stage_rows(pipe, cached, cache.captions, args.steps), ""]
        print("\n".join(rows), flush=True)
        body += rows
    head = report_preamble(f"Nano DiT memorisation probe: {len(entries)} videos of {args.set.name}", report, True,
                           "other jobs may share the cores")
    if args.append and args.out.exists():  # keep the earlier report; this run's head replaces the title
        head = [args.out.read_text(), "# Separate run, appended", *head[1:]]
    write_atomic(args.out, "\n".join([*head, "", *body]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    subset = commands.add_parser("subset", help="Write the subset's latents and prompt set.")
    subset.add_argument("--latents", type=Path, required=True, help="A `train encode-latents` folder (seed 0).")
    subset.add_argument("--count", type=int, default=32)
    subset.add_argument("--skip", type=int, default=0, help="Leave out the first SKIP videos of the kind.")
    subset.add_argument("--objects", type=int, choices=(1, 2), default=1, help="Objects per video.")
    subset.add_argument("--out", type=Path, required=True)
    subset.add_argument("--vae", type=Path, help="Re-render the videos at --size and encode them with this VAE "
                        "(a `train vae` final/, a checkpoint folder or 'nano').")
    subset.add_argument("--size", type=int, default=128, help="Frame size with --vae.")
    families = commands.add_parser("families", help="One-object scenes, each drawn with every shape: only the "
                                   "shape word tells a family's videos apart.")
    families.add_argument("--count", type=int, default=4, help="Scenes (each x the 6-8 shapes it allows).")
    families.add_argument("--skip", type=int, default=0, help="Leave out the first SKIP such scenes.")
    families.add_argument("--out", type=Path, required=True)
    swap = commands.add_parser("swap", help="A copy of a one-object subset with each caption's shape word swapped.")
    swap.add_argument("--set", type=Path, required=True, help="The folder `subset` wrote.")
    swap.add_argument("--labels", choices=("caption", "video"), required=True, help="Score the samples against "
                      "the shape the swapped caption names, or against the training video's shape.")
    swap.add_argument("--out", type=Path, required=True)
    scoring = commands.add_parser("score", help="Judge a model's samples of the subset.")
    scoring.add_argument("--set", type=Path, required=True, help="The folder `subset` wrote.")
    scoring.add_argument("--model", type=Path, nargs="+", required=True, help="Exported checkpoint folders.")
    scoring.add_argument("--guidance", nargs="+", type=float, default=[1.0, 2.0, 5.0])
    scoring.add_argument("--steps", type=int, default=8, help="Euler steps per stage for frame 0, in the "
                         "samples and the stage check (8, as in every report made before the bundle sampled with 20).")
    scoring.add_argument("--out", type=Path, default=Path("docs/results/teacher-memorise.md"))
    scoring.add_argument("--append", action="store_true", help="Add to --out instead of replacing it.")
    args = parser.parse_args()
    if args.command == "subset":
        if args.size != 128 and args.vae is None:
            parser.error("--size needs --vae (the cached latents are 128 x 128)")
        write_subset(args.latents, args.count, args.out, args.vae, args.size, args.skip, args.objects)
    elif args.command == "families":
        write_families(args.count, args.out, args.skip)
    elif args.command == "swap":
        write_swapped(args.set, args.out, args.labels)
    else:
        score(args)


if __name__ == "__main__":
    main()
