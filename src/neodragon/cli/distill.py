"""``neodragon distill ...``: the compression recipes that shrink a trained model into the nano student (run under
``accelerate launch`` for several processes)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .errors import FriendlyGroup, fail
from .train import BATCH, LR, MAX_MINUTES, OUTPUT, SAVE, SEED, STEPS, STYLES, train_config

app = typer.Typer(cls=FriendlyGroup, no_args_is_help=True,
                  help="Compression recipes: distil a lighter component from a trained model. Every run resumes "
                  "from its newest checkpoint in --output.")


def _widths(text: str) -> list[int]:
    """``"48,24,12,12"`` -> [48, 24, 12, 12]; ``student_vae`` says what makes a valid set."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"four comma-separated widths such as 48,24,12,12; got {text!r}") from None


@app.command()
def decoder(teacher: str = typer.Option("nano", "--teacher", help="The model whose encoder and latent space are "
                                        "kept: a preset, a checkpoint folder, or a VAE folder (`train vae` final/)."),
            output: Path = OUTPUT, steps: int = STEPS, batch_size: int = BATCH, lr: float = LR,
            save_every: int = SAVE, seed: int = SEED,
            widths: str = typer.Option("64,32,16,16", "--widths", help="The student decoder's four widths, from "
                                       "the latent side to the pixels (the nano teacher's: 96,64,48,48)."),
            teacher_weight: float = typer.Option(1.0, "--teacher-weight", help="Weight of the L1 to the teacher "
                                                 "decoder's output on the same latents (0: real frames only)."),
            edge_weight: float = typer.Option(0.5, "--edge-weight", help="Weight of the L1 of finite differences "
                                              "against the real frames (edges and motion)."),
            mse_weight: float = typer.Option(2.0, "--mse-weight", help="Weight of the (object-weighted) MSE term."),
            object_weight: float = typer.Option(3.0, "--object-weight", help="Extra weight of object pixels in the "
                                                "L1 and MSE terms (their coverage times this)."),
            num_frames: int = typer.Option(17, "--num-frames", help="Frames per training clip (1 + 8k)."),
            crop: int = typer.Option(48, "--crop", help="Square training crop of the 128x128 renders (0: none)."),
            eval_videos: int = typer.Option(32, "--eval-videos", help="Held-out videos for the final PSNR of "
                                            "student and teacher."),
            init: str = typer.Option("auto", "--init", help="teacher: cut the student from the teacher's "
                                     "TAEHV-style decoder (the channels its layers read most); random: a fresh "
                                     "decoder; auto: teacher where the teacher's decoder can be cut, else random."),
            style: list[str] = STYLES, max_minutes: float = MAX_MINUTES) -> None:
    """Asymmetric decoder distillation: a lighter TAEHV-style decoder for the teacher's frozen latent space; writes
    final/ (the VAE) and checkpoint/ (the teacher's folder with it)."""
    from ..recipes.distill_decoder import distill_decoder
    from ..training.vae import VAELossWeights

    if init not in ("auto", "random", "teacher"):
        raise typer.BadParameter(f"--init takes auto, teacher or random; got {init!r}")
    metrics = distill_decoder(train_config(output, steps, batch_size, lr, save_every, seed, 200, max_minutes),
                              teacher, _widths(widths),
                              VAELossWeights(edges=edge_weight, mse=mse_weight, objects=object_weight),
                              teacher_weight, num_frames, crop=crop or None, styles=style, eval_videos=eval_videos,
                              inherit={"auto": None, "teacher": True, "random": False}[init])
    if metrics:
        typer.echo(json.dumps(metrics, indent=2))


@app.command("text-encoder")
def text_encoder(teacher: str = typer.Option("nano", "--teacher", help="The model whose text conditioning is "
                                             "distilled: a preset or a checkpoint folder (its DiT stays frozen)."),
                 output: Path = OUTPUT, steps: int = typer.Option(3000, "--steps", help="Total optimiser steps (a "
                                                                  "resumed run continues up to this)."),
                 batch_size: int = typer.Option(64, "--batch-size", help="Prompts per process and step."),
                 lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate (linear warm-up, then cosine "
                                          "decay to 10% of it)."),
                 save_every: int = SAVE, seed: int = SEED,
                 mode: str = typer.Option("trainable-dt5", "--mode", help="replace: train the ContextAdapter (and "
                                          "pooled encoders) on a frozen DT5 (the paper's deployed mode; give the "
                                          "DT5 with --init-text-encoder); trainable-dt5: train DT5 too."),
                 prompts: int = typer.Option(20000, "--prompts", help="Distinct grammar prompts to distil on."),
                 init_text_encoder: Path = typer.Option(None, "--init-text-encoder", help="Start the student text "
                                                        "stack from this folder (final/ of an earlier run)."),
                 trajectory_weight: float = typer.Option(0.0, "--trajectory-weight", help="Weight of DistillT5's "
                                                         "trajectory term: the frozen DiT's velocity under student vs "
                                                         "teacher conditioning along the teacher's sampling path."),
                 trajectory_prompts: int = typer.Option(256, "--trajectory-prompts", help="Prompts whose sampling "
                                                        "path is recorded for the trajectory term."),
                 pooled_weight: float = typer.Option(1.0, "--pooled-weight", help="Weight of the pooled vector's "
                                                     "loss against the conditioning tokens' loss."),
                 prompts_file: Path = typer.Option(None, "--prompts-file", help="Distil on these prompts (one per "
                                                   "line) instead of ShapesWorld's caption grammar."),
                 cache_targets: bool = typer.Option(True, "--cache-targets/--online-targets", help="Compute the "
                                                    "teacher's conditioning of every prompt once and keep it in the "
                                                    "run folder, or run the teacher on each batch (large corpora)."),
                 student: str = typer.Option("nano", "--student", help="Student sizes: nano, or release (DistilT5 "
                                             "and the release's 4 x 4096 ContextAdapter)."),
                 max_minutes: float = MAX_MINUTES) -> None:
    """Prompt-only text-encoder distillation: a DT5 + ContextAdapter student replaces the teacher's text encoder
    and context embedder; writes final/ (the text stack) and checkpoint/ (the teacher's folder with it)."""
    from ..models.text import StudentTextConfig
    from ..recipes.distill_text_encoder import distill_text_encoder
    from ..training.text_distillation import MODES

    if mode not in MODES:
        raise typer.BadParameter(f"--mode must be one of {', '.join(MODES)}; got {mode!r}")
    sizes = {"nano": StudentTextConfig, "release": StudentTextConfig.release}
    if student not in sizes:
        raise typer.BadParameter(f"--student must be nano or release; got {student!r}")
    if prompts_file is not None and not prompts_file.is_file():
        raise typer.BadParameter(f"--prompts-file {prompts_file} does not exist")
    metrics = distill_text_encoder(train_config(output, steps, batch_size, lr, save_every, seed, 100, max_minutes),
                                   teacher, mode, sizes[student](), prompts, init_text_encoder, trajectory_weight,
                                   trajectory_prompts, prompts_file, cache_targets, pooled_weight)
    if metrics:
        typer.echo(json.dumps(metrics, indent=2))


@app.command()
def steps(teacher: str = typer.Option(..., "--teacher", help="A checkpoint folder whose multistep DiT is the frozen "
                                      "real score and the start of the generator (the pruned, recovered one)."),
          latents: list[Path] = typer.Option(..., "--latents", help="Latent folders of `train encode-latents` made "
                                             "with this model's VAE (repeat to mix): prompts, history, targets."),
          output: Path = OUTPUT, steps: int = STEPS,
          batch_size: int = typer.Option(8, "--batch-size", help="Videos per process and step."),
          lr: float = typer.Option(1e-5, "--lr", help="Peak learning rate of generator and fake score."),
          save_every: int = SAVE, seed: int = SEED,
          student_steps: int = typer.Option(4, "--student-steps", help="The generator learns from the points of a "
                                            "sampler with this many steps per stage (4: 4-4-4; 1-1-1 uses the "
                                            "first)."),
          fake_updates: int = typer.Option(2, "--fake-updates", help="Fake-score updates per generator update."),
          regression_weight: float = typer.Option(0.5, "--regression-weight", help="Weight of the Cauchy "
                                                  "regression to the ground-truth latents."),
          ema_decay: float = typer.Option(None, "--ema-decay", help="Keep a weight average (e.g. 0.99) and export "
                                          "it."),
          max_minutes: float = MAX_MINUTES) -> None:
    """Pyramidal DMD: a generator that crosses each pyramid stage in one step; writes final/ (the generator) and
    checkpoint/ (the teacher's folder with it, 1-1-1 without CFG by default)."""
    from ..recipes.distill_steps import distill_steps
    from ..training.dmd import DMDConfig

    try:  # the real score's CFG: the teacher's own
        dmd = DMDConfig(student_steps=student_steps, fake_updates=fake_updates, regression_weight=regression_weight,
                        guidance_scale=None, video_guidance_scale=None)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    try:
        out = distill_steps(train_config(output, steps, batch_size, lr, save_every, seed, 50, max_minutes,
                                         ema_decay), teacher, latents, dmd)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    typer.echo(f"wrote {out}")


@app.command()
def hybrid(teacher: str = typer.Option(..., "--teacher", help="The checkpoint folder `distill steps` distilled from: "
                                       "its multistep DiT makes frame 0."),
           generator: Path = typer.Option(..., "--generator", help="The DMD generator: final/ of `distill steps`."),
           output: Path = OUTPUT,
           first_frame_steps: int = typer.Option(20, "--first-frame-steps", min=1, help="Steps per stage of frame 0."),
           first_frame_guidance: float = typer.Option(None, "--first-frame-guidance", help="CFG scale of frame 0 "
                                                      "(default: the teacher's).")) -> None:
    """Hybrid mode for a step-distilled DiT (the release's two-DiT layout): frame 0 from the teacher's multistep DiT
    with CFG, the later frames from the generator in one step per stage."""
    from ..recipes.distill_steps import export_hybrid_distilled

    try:
        out = export_hybrid_distilled(teacher, generator, output, first_frame_steps, first_frame_guidance)
    except (ValueError, FileNotFoundError, OSError) as err:
        fail(str(err))
    typer.echo(f"wrote {out}")
