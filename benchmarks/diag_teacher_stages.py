"""Where the nano teacher DiT loses its objects: per-stage errors on object and background latents, sampling
started from the true lower stage, and short stage-2 training runs of wider DiT variants.

Run from the repository root (sections are independent; ``errors`` and ``forced`` need a trained DiT):

    python benchmarks/diag_teacher_stages.py --dit /work/runs/teacher/final --latents /work/runs/latents \
        --sections errors forced --figure docs/results/teacher-stages.png
    python benchmarks/diag_teacher_stages.py --latents /work/runs/latents --sections capacity --capacity-steps 600
    python benchmarks/diag_teacher_stages.py --dit /work/runs/teacher/final --latents /work/runs/latents \
        --sections weighting --object-weights 0 10
    python benchmarks/diag_teacher_stages.py --sections shift
    python benchmarks/diag_teacher_stages.py --dit src/neodragon/weights/nano/diffusion_transformer_320p_multistep_t2v \
        --sections words --out words.md
    python benchmarks/diag_teacher_stages.py --dit /work/runs/teacher/final --latents /work/runs/latents --sections swap

Sections:
- ``errors``: the flow-matching velocity error of frame 0 (the unit without history) at every pyramid stage and
  three points of the stage window, split into latent pixels that an object covers and background pixels, on
  training latents with their own captions, and the whole loss with the captions against the empty prompt.
- ``forced``: frame 0 sampled as the pipeline does (8 Euler steps per stage, guidance 5), but starting at stage k
  from the true stage-(k-1) latent of a training video, upsampled and noised as in training: which stage loses
  the object. The figure shows real, then starts at stage 0, 1 and 2, for each video.
- ``capacity``: stage-2 flow matching of frame 0 from scratch for DiT variants (JSON overrides of the nano-teacher
  DiT config), on the cache's videos except the evaluation ones: object and background error after N steps.
- ``weighting``: the trained DiT fine-tuned at stage 2 with the squared error weighted up on object pixels (the
  VAE's ``--object-weight`` idea applied to flow matching): does the DiT then use the caption for object detail?
- ``swap``: object error of frame 0 at each stage with the true caption, with its shape word or its colour word
  replaced by another shape or colour, with the empty prompt, and with only the token stream or only the pooled
  vector of the true caption: which words does the DiT use, where, and through which path?
- ``contrast``: the trained DiT fine-tuned at stage 2 with a hinge that makes the true shape word fit the target
  better than a swapped one (0: plain fine-tuning): does the DiT then draw the shape the caption names?
- ``words``: how different the text conditioning is when only the shape word, or only the colour word, of a
  caption changes: mean pairwise distance over the classes' words relative to the mean norm, for MiniLM's token
  states, the same after the DiT's ``context_embedder``, and the pooled vector. Does the text side carry shape as
  distinctly as colour?
- ``shift``: how far the VAE's frame-0 latent moves when a still object moves by a fraction of a latent pixel,
  against how far it moves when the shape changes at the same place: what the DiT must get right to draw a shape.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_core import ReportHead, report_preamble, write_atomic
from PIL import Image
from safetensors.torch import load_file

from neodragon import load_pipeline
from neodragon.data import COLOURS, SHAPES, ObjectSpec, SceneSpec, render
from neodragon.models.mmdit import PyramidMMDiT
from neodragon.pipelines.neodragon import NeodragonPipeline
from neodragon.presets import nano_teacher_preset
from neodragon.recipes.nano import CaptionEncodings, LatentCache, clip_batch
from neodragon.recipes.teacher import (
    TeacherRecipe,
    contrast_hinge,
    flow_matching_loss,
    swap_caption_word,
    weighted_mse,
)

SECTIONS = ("errors", "forced", "capacity", "weighting", "swap", "contrast", "shift", "words")
WORD_TEMPLATES = {  # one slot each; the other words fixed
    "shape": ("a small red {} moving to the right", "a large blue {} rests on a white background", "a green {} spins"),
    "colour": ("a small {} circle moving to the right", "a large {} star rests on a white background",
               "a {} heart spins"),
}
TAUS = (0.9, 0.5, 0.1)
FIGURE_ROWS = 8  # videos shown in the `forced` figure
DEFAULT_VARIANTS = ('{}', '{"patch_size": 1}', '{"num_layers": 8, "num_attention_heads": 6}')


def load_dit(path: Path) -> PyramidMMDiT:
    """A ``train teacher`` final/ folder, or one of its Accelerate checkpoints (``model.safetensors``)."""
    if (path / "config.json").is_file():
        return PyramidMMDiT.from_pretrained(path).float().eval()
    dit = PyramidMMDiT(**nano_teacher_preset().dit)
    dit.load_state_dict(load_file(str(path / "model.safetensors")))
    return dit.eval()


def object_masks(count: int, stages: int = 3, seed: int = 0) -> list[torch.Tensor]:
    """Per stage (lowest first), which frame-0 latent pixels of the first ``count`` training videos (rendered
    with ``seed``, the `encode-latents` seed) an object covers (more than 5% of the 8 x 8 pixel block, then
    max-pooled to the stage's resolution)."""
    _, coverage, _ = clip_batch("train", range(count), 17, 128, seed=seed)
    full = F.avg_pool2d(coverage[:, :, 0], 8) > 0.05
    return [F.max_pool2d(full.float(), 2 ** (stages - 1 - s)).bool() for s in range(stages)]


def velocity_errors(dit: PyramidMMDiT, pipe: NeodragonPipeline, latents: torch.Tensor, context, masks,
                    stage: int, tau: float) -> tuple[float, float]:
    """Mean squared velocity error on object and background pixels of frame 0 at (stage, tau)."""
    scheduler = pipe.scheduler
    index = int((scheduler.sigmas_per_stage[stage] - tau).abs().argmin())
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(stage))
    noisy, target, timestep = scheduler.training_target(latents, noise, stage, index)
    with torch.no_grad():
        prediction = dit([[noisy]], context.context, context.mask, context.pooled, timestep)[0]
    error = (prediction - target).square().mean(1)[:, 0]
    mask = masks[stage][:, 0]
    return error[mask].mean().item(), error[~mask].mean().item()


def errors_rows(dit: PyramidMMDiT, pipe: NeodragonPipeline, cache: LatentCache, count: int,
                seed: int) -> list[str]:
    latents, captions = cache.batch(range(count))
    frame0, masks = latents[:, :, :1].float(), object_masks(count, seed=seed)
    cond, empty = pipe.encode_prompt(captions), pipe.encode_prompt([""] * count)
    rows = [f"{count} cached videos, frame 0; object pixels are {masks[-1].float().mean():.1%} of the latent.", "",
            "| stage | tau | object error | background error | ratio |", "|---:|---:|---:|---:|---:|"]
    for stage in range(3):
        for tau in TAUS:
            obj, bg = velocity_errors(dit, pipe, frame0, cond, masks, stage, tau)
            rows.append(f"| {stage} | {tau} | {obj:.3f} | {bg:.3f} | {obj / bg:.1f}x |")
    rows += ["", "Whole-frame loss (uniform timesteps) with the captions and with the empty prompt:", "",
             "| stage | captions | empty prompt |", "|---:|---:|---:|"]
    for stage in range(3):
        losses = []
        for text in (cond, empty):
            generator = torch.Generator().manual_seed(stage)
            with torch.no_grad():
                losses.append(flow_matching_loss(dit, pipe.scheduler, latents.float(), text.context, text.mask,
                                                 text.pooled, 0, stage, generator, TeacherRecipe())["loss"].item())
        rows.append(f"| {stage} | {losses[0]:.4f} | {losses[1]:.4f} |")
    return rows


def swapped_captions(captions: list[str]) -> tuple[list[int], dict[str, list[str]]]:
    """Indices of one-object captions and those captions with the shape or the colour word swapped."""
    keep = [i for i, caption in enumerate(captions) if swap_caption_word(caption) is not None]
    return keep, {f"{word} swapped": [swap_caption_word(captions[i], word) for i in keep]
                  for word in ("shape", "colour")}


def swap_rows(dit: PyramidMMDiT, pipe: NeodragonPipeline, cache: LatentCache, count: int, seed: int) -> list[str]:
    latents, captions = cache.batch(range(count))
    keep, variants = swapped_captions(captions)
    frame0 = latents[keep][:, :, :1].float()
    masks = [m[keep] for m in object_masks(count, seed=seed)]
    texts = {"true caption": [captions[i] for i in keep], **variants, "empty prompt": [""] * len(keep)}
    encoded = {name: pipe.encode_prompt(t) for name, t in texts.items()}
    true, empty = encoded["true caption"], encoded["empty prompt"]
    # Which path carries the words: the token stream (joint attention) or the pooled vector (AdaLN)?
    encoded["empty tokens, true pooled"] = type(true)(empty.context, empty.mask, true.pooled)
    encoded["true tokens, empty pooled"] = type(true)(true.context, true.mask, empty.pooled)
    rows = [f"{len(keep)} one-object videos of the first {count}, frame 0; object-pixel velocity error (tau 0.5 "
            "and 0.9); in brackets, relative to the true caption. Example: "
            f"\"{texts['true caption'][0]}\" -> \"{variants['shape swapped'][0]}\".", "",
            "| stage | tau | " + " | ".join(encoded) + " |", "|---:|---:|" + "---:|" * len(encoded)]
    for stage in range(3):
        for tau in (0.5, 0.9):
            errors = [velocity_errors(dit, pipe, frame0, e, masks, stage, tau)[0] for e in encoded.values()]
            cells = [f"{errors[0]:.3f}"] + [f"{e:.3f} ({e / errors[0] - 1:+.0%})" for e in errors[1:]]
            rows.append(f"| {stage} | {tau} | " + " | ".join(cells) + " |")
    return rows


def sample_from_stage(pipe: NeodragonPipeline, frame0: torch.Tensor, text, first_stage: int,
                      generator: torch.Generator, steps: int = 8, guidance: float = 5.0) -> torch.Tensor:
    """Frame 0 sampled by the pipeline's own sampler, starting at ``first_stage`` from the true lower-stage
    latent (``text`` holds the unconditional and the conditional half)."""
    scheduler = pipe.scheduler
    clean = scheduler.latent_pyramid(frame0)
    noise = scheduler.noise_pyramid(torch.randn(frame0.shape, generator=generator))[first_stage]
    if first_stage == 0:
        latents = noise
    else:
        lower, start = clean[first_stage - 1], scheduler.start_sigmas[first_stage]
        up = F.interpolate(lower[:, :, 0], scale_factor=2, mode="nearest").unsqueeze(2)  # one frame
        latents = start * noise + (1 - start) * up
    return pipe.sample_unit(latents, None, text, [steps] * scheduler.config.stages, guidance, generator,
                            first_stage=first_stage)


def forced_rows(pipe: NeodragonPipeline, cache: LatentCache, count: int, seed: int,
                figure: Path | None) -> list[str]:
    latents, captions = cache.batch(range(count))
    frame0, mask = latents[:, :, :1].float(), object_masks(count, seed=seed)[-1]
    text = pipe.encode_prompt([""] * count).cat(pipe.encode_prompt(captions))
    rows = [f"{count} cached videos, frame 0, 8 steps per stage, guidance 5; error against the real latent.", "",
            "| sampling starts at | object-pixel MSE | background MSE |", "|---|---:|---:|"]
    samples = []
    for first_stage in range(pipe.scheduler.config.stages):
        sample = sample_from_stage(pipe, frame0, text, first_stage, torch.Generator().manual_seed(first_stage))
        error = (sample - frame0).square().mean(1)[:, 0]
        source = "noise (the pipeline)" if first_stage == 0 else f"stage {first_stage}, true stage-{first_stage - 1}"
        rows.append(f"| {source} | {error[mask[:, 0]].mean():.3f} | {error[~mask[:, 0]].mean():.3f} |")
        samples.append(sample)
    if figure is not None:
        save_figure(pipe, [frame0, *samples], figure)
        rows += ["", f"Figure: [{figure.name}]({figure.name}) (rows: the first {FIGURE_ROWS} videos; columns: real, "
                 "then sampling started at stage 0, 1 and 2)."]
    return rows


def save_figure(pipe: NeodragonPipeline, frames: list[torch.Tensor], path: Path) -> None:
    with torch.no_grad():
        images = [pipe.decode_latents(torch.cat([f, f, f], dim=2)[:FIGURE_ROWS])[:, :, 0].clamp(-1, 1) for f in frames]
    grid = torch.cat([torch.cat([image[i] for image in images], 2) for i in range(images[0].shape[0])], 1)
    Image.fromarray(grid.add(1).mul(127.5).byte().permute(1, 2, 0).numpy()).save(path)


def train_frame0_stage2(dit: PyramidMMDiT, pipe: NeodragonPipeline, cache: LatentCache, text: CaptionEncodings,
                        rows: range, steps: int, lr: float, object_weight: float = 0.0,
                        contrast: float = 0.0, margin: float = 0.2, seed: int = 0) -> float:
    """Stage-2 flow matching of frame 0 on cache ``rows``, the squared error weighted ``1 + object_weight *
    coverage`` per latent pixel (normalised to a weighted mean); returns seconds per step. With ``contrast``, one-
    object videos also pay ``contrast * relu((1 + margin) * E - E_swap)``, where E and E_swap are the object-pixel
    errors with the true caption and with its shape word swapped: the true shape must fit better than another."""
    coverage = None
    if object_weight or contrast:
        _, pixels, _ = clip_batch("train", rows, 17, 128, seed=seed)
        coverage = F.avg_pool2d(pixels[:, :, 0], 8).unsqueeze(2)
    optimizer = torch.optim.AdamW(dit.train().parameters(), lr=lr, weight_decay=0.0)
    generator, start = torch.Generator().manual_seed(0), time.perf_counter()
    for _ in range(steps):
        picks = torch.randint(len(rows), (16,), generator=generator)
        latents, captions = cache.batch([rows[i] for i in picks.tolist()])
        latents, enc = latents[:, :, :1].float(), text.encode(captions)
        noise = torch.randn(latents.shape, generator=generator)
        noisy, target, timestep = pipe.scheduler.training_target(latents, noise, 2, torch.randint(
            pipe.scheduler.config.num_train_timesteps, (16,), generator=generator))
        prediction = dit([[noisy]], enc.tokens, enc.mask, enc.pooled, timestep)[0]
        loss = weighted_mse(prediction, target, object_weight, None if coverage is None else coverage[picks], unit=0)
        if contrast:
            loss = loss + contrast * shape_contrast(dit, pipe, captions, noisy, target, timestep,
                                                    (prediction - target).square(), coverage[picks], margin)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        optimizer.step()
    dit.eval()
    return (time.perf_counter() - start) / steps


def shape_contrast(dit: PyramidMMDiT, pipe: NeodragonPipeline, captions: list[str], noisy: torch.Tensor,
                   target: torch.Tensor, timestep: torch.Tensor, error: torch.Tensor, coverage: torch.Tensor,
                   margin: float) -> torch.Tensor:
    """Mean hinge ``relu((1 + margin) * E - E_swap)`` over the batch's one-object videos (0 if there are none)."""
    keep, variants = swapped_captions(captions)
    if not keep:
        return error.new_zeros(())
    swap = pipe.text_encoder.encode(variants["shape swapped"])
    swapped = (dit([[noisy[keep]]], swap.tokens, swap.mask, swap.pooled, timestep[keep])[0] - target[keep]).square()

    def object_error(err: torch.Tensor) -> torch.Tensor:
        weight = coverage[keep]
        return (err.mean(1, keepdim=True) * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1e-6)

    return contrast_hinge(object_error(error[keep]), object_error(swapped), margin)


def contrast_rows(dit_path: Path, pipe: NeodragonPipeline, cache: LatentCache, strengths: list[float], steps: int,
                  count: int, lr: float, seed: int, save_dir: Path | None = None) -> list[str]:
    text = CaptionEncodings(pipe.text_encoder, cache.captions)
    eval_latents, eval_captions = cache.batch(range(count))
    keep, variants = swapped_captions(eval_captions)
    frame0, masks = eval_latents[keep][:, :, :1].float(), [m[keep] for m in object_masks(count, seed=seed)]
    true, swapped = pipe.encode_prompt([eval_captions[i] for i in keep]), pipe.encode_prompt(variants["shape swapped"])
    rows = [f"The trained DiT fine-tuned at stage 2 (frame 0) for {steps} steps, batch 16, lr {lr}, on videos "
            f"{count}-{count + 1023}, with the shape-contrast term at each strength (0: plain fine-tuning); "
            f"object-pixel errors at stage 2 on the {len(keep)} one-object videos among 0-{count - 1}.", "",
            "| contrast | tau | object error, true caption | shape swapped | swap effect |",
            "|---:|---:|---:|---:|---:|"]
    for strength in strengths:
        dit = load_dit(dit_path)
        train_frame0_stage2(dit, pipe, cache, text, range(count, count + 1024), steps, lr, contrast=strength,
                            seed=seed)
        if save_dir is not None:  # for `train export-teacher` and `eval run`
            dit.save_pretrained(save_dir / f"contrast-{strength:g}")
        for tau in (0.5, 0.9):
            obj = velocity_errors(dit, pipe, frame0, true, masks, 2, tau)[0]
            obj_swap = velocity_errors(dit, pipe, frame0, swapped, masks, 2, tau)[0]
            rows.append(f"| {strength:g} | {tau} | {obj:.3f} | {obj_swap:.3f} | {obj_swap / obj - 1:+.0%} |")
            print(rows[-1], flush=True)
    return rows


def capacity_rows(pipe: NeodragonPipeline, cache: LatentCache, variants: list[str], steps: int, count: int,
                  lr: float) -> list[str]:
    text = CaptionEncodings(pipe.text_encoder, cache.captions)
    eval_latents, eval_captions = cache.batch(range(count))
    eval_text, masks = pipe.encode_prompt(eval_captions), object_masks(count)
    rows = [f"Stage-2 flow matching of frame 0 from scratch, batch 16, lr {lr}, {steps} steps on videos {count}+;"
            f" errors on videos 0-{count - 1} at tau 0.5.", "",
            "| variant | parameters | s / step | object error | background error |", "|---|---:|---:|---:|---:|"]
    for variant in variants:
        torch.manual_seed(0)
        dit = PyramidMMDiT(**{**nano_teacher_preset().dit, **json.loads(variant)})
        seconds = train_frame0_stage2(dit, pipe, cache, text, range(count, len(cache)), steps, lr)
        obj, bg = velocity_errors(dit, pipe, eval_latents[:, :, :1].float(), eval_text, masks, 2, 0.5)
        params = sum(p.numel() for p in dit.parameters()) / 1e6
        rows.append(f"| `{variant}` | {params:.2f} M | {seconds:.2f} | {obj:.3f} | {bg:.3f} |")
        print(rows[-1], flush=True)
    return rows


def weighting_rows(dit_path: Path, pipe: NeodragonPipeline, cache: LatentCache, weights: list[float], steps: int,
                   count: int, lr: float) -> list[str]:
    text = CaptionEncodings(pipe.text_encoder, cache.captions)
    eval_latents, eval_captions = cache.batch(range(count))
    frame0, masks = eval_latents[:, :, :1].float(), object_masks(count)
    cond, empty = pipe.encode_prompt(eval_captions), pipe.encode_prompt([""] * count)
    rows = [f"The trained DiT fine-tuned at stage 2 (frame 0) for {steps} steps, batch 16, lr {lr}, on videos "
            f"{count}-{count + 1023}, errors at tau 0.5 on videos 0-{count - 1} with their captions / the empty "
            "prompt.", "", "| object weight | object error | background error | object error, empty prompt |",
            "|---:|---:|---:|---:|"]
    for weight in weights:
        dit = load_dit(dit_path)
        train_frame0_stage2(dit, pipe, cache, text, range(count, count + 1024), steps, lr, weight)
        obj, bg = velocity_errors(dit, pipe, frame0, cond, masks, 2, 0.5)
        obj_empty, _ = velocity_errors(dit, pipe, frame0, empty, masks, 2, 0.5)
        rows.append(f"| {weight:g} | {obj:.3f} | {bg:.3f} | {obj_empty:.3f} |")
        print(rows[-1], flush=True)
    return rows


@torch.no_grad()
def words_rows(dit: PyramidMMDiT, pipe: NeodragonPipeline) -> list[str]:
    words = {"shape": SHAPES, "colour": COLOURS}
    rows = ["| word changed | MiniLM token states | after the DiT's context_embedder | pooled vector |",
            "|---|---:|---:|---:|"]
    for kind, templates in WORD_TEMPLATES.items():
        spreads = []
        for template in templates:
            encoding = pipe.text_encoder.encode([template.format(w) for w in words[kind]])
            views = (encoding.tokens, dit.context_embedder(encoding.tokens), encoding.pooled)
            spreads.append([mean_pairwise_distance(v.reshape(len(words[kind]), -1)) for v in views])
        means = torch.tensor(spreads).mean(0)
        rows.append(f"| {kind} ({len(words[kind])} words, {len(templates)} templates) | "
                    + " | ".join(f"{m:.3f}" for m in means) + " |")
    return rows


def mean_pairwise_distance(rows: torch.Tensor) -> float:
    """Mean L2 distance between distinct rows, relative to the rows' mean norm."""
    n = rows.shape[0]
    return (torch.cdist(rows, rows).sum() / (n * (n - 1)) / rows.norm(dim=1).mean()).item()


def shift_rows(pipe: NeodragonPipeline, shifts: tuple[int, ...] = (1, 2, 4, 8)) -> list[str]:
    """Squared latent distances (frame 0, summed over the latent) for every shape as a still red object on black,
    rendered at one place, then shifted right by k pixels (8 pixels = 1 latent pixel)."""
    rows = ["Squared distance between raw frame-0 latents (summed over channels and pixels, mean over the 8 shapes or "
            "their 28 pairs); a still red object on black, the same place for every shape.", "",
            "| object size | between two shapes | " + " | ".join(f"shifted {k} px" for k in shifts)
            + " | shifted 8 px vs the latent rolled by 1 |", "|---|" + "---:|" * (len(shifts) + 2)]
    for size in ("small", "large"):
        videos = torch.stack([render(SceneSpec((ObjectSpec(shape, "red", size, "still"),), "black"), 5).video
                              for shape in SHAPES])
        with torch.no_grad():
            latents = {k: pipe.vae.encode(torch.roll(videos, k, dims=-1)).latent_dist.mean[:, :, 0]
                       for k in (0, *shifts)}
        base, pairs = latents[0], torch.combinations(torch.arange(len(SHAPES)))
        between = (base[pairs[:, 0]] - base[pairs[:, 1]]).square().sum((1, 2, 3)).mean()
        moved = [(latents[k] - base).square().sum((1, 2, 3)).mean() for k in shifts]
        rolled = (latents[8] - torch.roll(base, 1, dims=-1)).square().sum((1, 2, 3)).mean()
        rows.append(f"| {size} | {between:.3g} | " + " | ".join(f"{d:.3g} ({d / between:.0%})" for d in moved)
                    + f" | {rolled:.3g} ({rolled / between:.0%}) |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=["errors", "forced"])
    parser.add_argument("--dit", type=Path, help="A trained teacher DiT: final/ or a checkpoint folder.")
    parser.add_argument("--latents", type=Path, help="The `train encode-latents` folder (all sections but shift).")
    parser.add_argument("--model", default="nano", help="Text stack, scheduler and VAE decoder to use.")
    parser.add_argument("--count", type=int, default=48, help="Videos of --latents to measure on.")
    parser.add_argument("--latents-seed", type=int, default=0,
                        help="The --seed the latents were encoded with (errors/forced re-render their objects).")
    parser.add_argument("--figure", type=Path, help="Where `forced` writes its figure (PNG).")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--capacity-steps", type=int, default=600)
    parser.add_argument("--object-weights", nargs="+", type=float, default=[0.0, 10.0])
    parser.add_argument("--weighting-steps", type=int, default=300, help="Fine-tuning steps of weighting/contrast.")
    parser.add_argument("--contrasts", nargs="+", type=float, default=[0.0, 1.0])
    parser.add_argument("--save-dir", type=Path, help="Where `contrast` saves each fine-tuned DiT.")
    parser.add_argument("--lr", type=float, default=5e-4, help="Learning rate of the capacity runs.")
    parser.add_argument("--weighting-lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/results/teacher-stages.md"))
    args = parser.parse_args()
    if {"errors", "forced", "weighting", "swap", "contrast", "words"} & set(args.sections) and args.dit is None:
        parser.error("--sections errors/forced/weighting/swap/contrast/words need --dit (a train teacher final/ or "
                     "checkpoint folder)")
    if set(args.sections) - {"shift", "words"} and args.latents is None:
        parser.error("every section but shift and words needs --latents (a `train encode-latents` folder)")
    torch.set_num_threads(args.threads)
    report = ReportHead()
    pipe = load_pipeline(args.model, torch_dtype=torch.float32)
    cache = LatentCache(args.latents) if args.latents else None
    dit = load_dit(args.dit) if args.dit else None
    if dit is not None:
        pipe.transformer = dit  # the pipeline's sampler runs the DiT under study
    body: list[str] = []
    for section in args.sections:
        print(f"running {section} ...", flush=True)
        rows = {
            "errors": lambda: errors_rows(dit, pipe, cache, args.count, args.latents_seed),
            "forced": lambda: forced_rows(pipe, cache, args.count, args.latents_seed, args.figure),
            "capacity": lambda: capacity_rows(pipe, cache, args.variants, args.capacity_steps, args.count, args.lr),
            "weighting": lambda: weighting_rows(args.dit, pipe, cache, args.object_weights, args.weighting_steps,
                                                args.count, args.weighting_lr),
            "swap": lambda: swap_rows(dit, pipe, cache, args.count, args.latents_seed),
            "contrast": lambda: contrast_rows(args.dit, pipe, cache, args.contrasts, args.weighting_steps, args.count,
                                              args.weighting_lr, args.latents_seed, args.save_dir),
            "shift": lambda: shift_rows(pipe),
            "words": lambda: words_rows(dit, pipe),
        }[section]()
        title = f"{section} ({args.dit})" if section not in ("capacity", "shift") else section
        body += ["", f"## {title}", "", *rows]
        print("\n".join(rows), flush=True)
    head = report_preamble("Nano teacher DiT: per-stage diagnosis (CPU)", report, True,
                           "other jobs may share the cores")
    write_atomic(args.out, "\n".join([*head, *body]) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
