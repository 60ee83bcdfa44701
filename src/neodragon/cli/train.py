"""``neodragon train ...``: the nano teacher's training commands (run under ``accelerate launch`` for DDP)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .errors import FriendlyGroup

app = typer.Typer(cls=FriendlyGroup, no_args_is_help=True,
                  help="Train the nano teacher (VAE, latent cache, DiT) and export it, and the 2x super-resolution "
                  "model. Every run resumes from its "
                  "newest checkpoint in --output; use `accelerate launch --num_processes N -m neodragon train ...` "
                  "for several processes.")

OUTPUT = typer.Option(..., "--output", "-o", help="Run folder: checkpoints, log.jsonl, final/.")
STEPS = typer.Option(1000, "--steps", help="Total optimiser steps (a resumed run continues up to this).")
BATCH = typer.Option(4, "--batch-size", help="Videos per process and step.")
LR = typer.Option(2e-4, "--lr", help="Peak learning rate (linear warm-up, then cosine decay to 10% of it).")
SAVE = typer.Option(250, "--save-every", help="Checkpoint interval in steps.")
SEED = typer.Option(0, "--seed", help="Seeds the initial weights and every draw: the same seed, the same run.")
MAX_MINUTES = typer.Option(None, "--max-minutes", help="Stop after this much wall time (checkpoint and final/ "
                           "are written as at the end); the learning rate decays over whichever of --steps and "
                           "--max-minutes runs out first.")


def _known_styles(values: list[str]) -> list[str]:
    from ..data import STYLES as KNOWN

    unknown = [v for v in values if v not in KNOWN]
    if unknown:
        raise typer.BadParameter(f"unknown style {', '.join(unknown)}; choose from {', '.join(KNOWN)}")
    return values


STYLES = typer.Option(["none"], "--style", callback=_known_styles,
                      help="ShapesWorld style drawn per video; repeat to mix (and weight) styles.")


def train_config(output: Path, steps: int, batch_size: int, lr: float, save_every: int, seed: int, warmup: int,
            max_minutes: float | None = None, ema_decay: float | None = None):
    from ..training.trainer import TrainConfig

    if max_minutes is not None and max_minutes <= 0:
        raise typer.BadParameter(f"--max-minutes must be positive, got {max_minutes}")
    try:
        return TrainConfig(output_dir=str(output), max_steps=steps, batch_size=batch_size, learning_rate=lr,
                           save_every=save_every, seed=seed, warmup_steps=min(warmup, max(1, steps // 10)),
                           max_minutes=max_minutes, ema_decay=ema_decay)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err


@app.command()
def vae(output: Path = OUTPUT, steps: int = STEPS, batch_size: int = BATCH, lr: float = LR,
        save_every: int = SAVE, seed: int = SEED,
        num_frames: int = typer.Option(17, "--num-frames", help="Frames per training clip (1 + 8k)."),
        crop: int = typer.Option(64, "--crop", help="Square training crop of the 128x128 renders (0: none)."),
        kl_weight: float = typer.Option(1e-6, "--kl-weight", help="Weight of the KL term to N(0, I)."),
        latent_l2: float = typer.Option(1e-3, "--latent-l2", help="L2 penalty on the posterior means (their scale)."),
        edge_weight: float = typer.Option(0.5, "--edge-weight", help="Weight of the L1 of finite differences "
                                          "(edges and motion)."),
        mse_weight: float = typer.Option(2.0, "--mse-weight", help="Weight of the (object-weighted) MSE term."),
        object_weight: float = typer.Option(3.0, "--object-weight",
                                            help="Extra L1 weight of object pixels (their coverage times this)."),
        eval_videos: int = typer.Option(32, "--eval-videos", help="Held-out videos for the final PSNR and judge "
                                        "scores."),
        init_from: Path = typer.Option(None, "--init-from", help="Start from a trained VAE folder (a final/)."),
        freeze_encoder: bool = typer.Option(False, "--freeze-encoder",
                                            help="Train the decoder only: the latent space stays as it is."),
        style: list[str] = STYLES, max_minutes: float = MAX_MINUTES) -> None:
    """Train the teacher's causal video VAE on ShapesWorld; writes final/ with latent statistics and PSNR."""
    from ..recipes.vae import train_vae
    from ..training.vae import VAELossWeights

    metrics = train_vae(train_config(output, steps, batch_size, lr, save_every, seed, 200, max_minutes),
                        num_frames=num_frames,
                        crop=crop or None, eval_videos=eval_videos, init_from=init_from,
                        freeze_encoder=freeze_encoder, styles=style,
                        weights=VAELossWeights(edges=edge_weight, mse=mse_weight, kl=kl_weight, latent_l2=latent_l2,
                                               objects=object_weight))
    if metrics:
        typer.echo(json.dumps(metrics, indent=2))


@app.command("encode-latents")
def encode_latents(vae_dir: Path = typer.Option(..., "--vae", help="A trained VAE: the final/ of `train vae`, a "
                                                "checkpoint folder, or 'nano' (the bundled model's)."),
                   output: Path = OUTPUT,
                   num_videos: int = typer.Option(4096, "--num-videos", help="Training videos to encode."),
                   batch_size: int = typer.Option(8, "--batch-size", help="Videos per VAE call."),
                   seed: int = typer.Option(0, "--seed", help="Base seed of the ShapesWorld items."),
                   style: list[str] = STYLES,
                   first_frames: bool = typer.Option(False, "--first-frames", help="Keep frame 0 of each video "
                                                     "only: the training set of `train first-frame`.")) -> None:
    """Encode training videos once into normalised latent shards (resumable, split across processes; the VAE runs
    on each process's accelerator, rendering on its CPU)."""
    from accelerate import PartialState

    from ..presets import load_video_vae
    from ..training.latents import encode_latents as encode
    from ..training.trainer import cpu_only

    state = PartialState(cpu=cpu_only())
    encode(load_video_vae(vae_dir), output, num_videos, batch_size, seed, state.process_index, state.num_processes,
           style, state.device, first_frames)


@app.command()
def teacher(latents: list[Path] = typer.Option(..., "--latents",
                                              help="Output of `train encode-latents`; repeat to mix folders."),
            output: Path = OUTPUT, steps: int = STEPS,
            batch_size: int = typer.Option(16, "--batch-size", help="Latent videos per process and step."),
            lr: float = LR, save_every: int = SAVE, seed: int = SEED,
            text_dropout: float = typer.Option(0.1, "--text-dropout", help="Share of captions dropped to the empty "
                                               "prompt (what classifier-free guidance needs)."),
            init_from: Path = typer.Option(None, "--init-from", help="Start from a trained DiT: a `train teacher` "
                                           "final/ or a bundle's transformer folder (fresh optimiser); with more "
                                           "--layers than it has, it grows (new blocks start as the identity)."),
            max_minutes: float = MAX_MINUTES,
            unit_weights: str = typer.Option(None, "--unit-weights", help="How often each autoregressive unit is "
                                             "trained, comma-separated, e.g. 2,1,1 for the first frame twice as "
                                             "often (default: uniform)."),
            stage_weights: str = typer.Option(None, "--stage-weights", help="The same for the pyramid stages "
                                              "(lowest resolution first), e.g. 1,1,2 (default: uniform)."),
            layers: int = typer.Option(None, "--layers", help="DiT depth (default: the nano teacher preset's, 6)."),
            heads: int = typer.Option(None, "--heads", help="DiT attention heads of width 32 (default: the "
                                      "preset's, 4); a resumed run needs the same --layers / --heads / --patch-size."),
            patch_size: int = typer.Option(None, "--patch-size", help="Latent pixels per token side: 2 (the "
                                           "preset's) or 1 (four times the tokens) (default: 2)."),
            sample_size: int = typer.Option(None, "--sample-size", help="The DiT config's sample_size, which only "
                                            "sets the spacing of its sincos position table: sample_size / patch "
                                            "size / 16 per token (the preset's 16: 0.5); with --init-from of "
                                            "another, the table is rebuilt and the weights kept (default: "
                                            "--init-from's, else the preset's)."),
            compile_blocks: bool = typer.Option(False, "--compile", help="torch.compile the transformer blocks "
                                                "(dynamic shapes): the same losses, a faster step (1.27x on a "
                                                "2-core CPU) after a compile of about 2 minutes."),
            ema_decay: float = typer.Option(None, "--ema-decay", help="Also keep an exponential moving average "
                                            "of the weights with this decay (e.g. 0.999), saved with every "
                                            "checkpoint; final/ is then the average and final-raw/ the last "
                                            "weights (default: off).")) -> None:
    """Train the nano teacher DiT with pyramidal flow matching on cached latents."""
    from ..models.mmdit import PyramidMMDiT
    from ..recipes.teacher import teacher_dit_config, train_teacher
    from ..training.flow_matching import FlowMatchingConfig

    if sample_size is None and init_from is not None and (init_from / "config.json").is_file():
        sample_size = PyramidMMDiT.load_config(init_from).get("sample_size")  # keep its table
    try:
        dit_config = teacher_dit_config(layers, heads, patch_size, sample_size)
        objective = FlowMatchingConfig(text_dropout=text_dropout,
                                       unit_weights=_weights(unit_weights, "--unit-weights"),
                                       stage_weights=_weights(stage_weights, "--stage-weights"))
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    train_teacher(train_config(output, steps, batch_size, lr, save_every, seed, 500, max_minutes, ema_decay), latents,
                  objective, init_from, dit_config, compile_blocks)


def _weights(text: str | None, option: str) -> tuple[float, ...] | None:
    """``"2,1,1"`` -> ``(2.0, 1.0, 1.0)``; None stays None."""
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{option} takes comma-separated numbers such as 2,1,1, got {text!r}.") from None


@app.command("export-teacher")
def export_teacher(vae_dir: Path = typer.Option(..., "--vae", help="As in encode-latents."),
                   dit_dir: Path = typer.Option(..., "--dit", help="A trained DiT: the final/ of `train teacher`."),
                   output: Path = typer.Option(..., "--output", "-o", help="Checkpoint folder to write."),
                   fp16: bool = typer.Option(True, "--fp16/--fp32", help="Cast weights (fp16 for bundling).")) -> None:
    """Assemble a runnable checkpoint folder (official layout) from a trained VAE and DiT."""
    import torch

    from ..recipes.teacher import export_teacher as export

    folder = export(vae_dir, dit_dir, output, torch.float16 if fp16 else torch.float32)
    typer.echo(f"wrote {folder}")


@app.command("first-frame")
def first_frame(latents: list[Path] = typer.Option(..., "--latents", help="Output of `train encode-latents "
                                                   "--first-frames`; repeat to mix folders."),
                output: Path = OUTPUT,
                model: str = typer.Option("nano", "--model", help="The checkpoint whose frozen text stack "
                                          "conditions the generator and whose VAE encoded the latents."),
                widths: str = typer.Option("64,96,96", "--widths", help="The UNet's channels per level, full "
                                           "latent resolution first (cross-attention below the first)."),
                steps: int = STEPS, batch_size: int = typer.Option(64, "--batch-size", help="Frames per process "
                                                                   "and step."),
                lr: float = typer.Option(5e-4, "--lr", help="Peak learning rate (linear warm-up, then cosine decay "
                                         "to 10% of it)."),
                save_every: int = SAVE, seed: int = SEED, max_minutes: float = MAX_MINUTES,
                text_dropout: float = typer.Option(0.1, "--text-dropout", help="Share of captions dropped to the "
                                                   "empty prompt (what classifier-free guidance needs)."),
                ema_decay: float = typer.Option(0.999, "--ema-decay", help="Decay of the weight average that "
                                                "final/ holds (0 turns it off)."),
                object_weight: float = typer.Option(0.0, "--object-weight", help="Weigh the latent pixels that hold "
                                                    "objects 1 + this many times in the loss.")) -> None:
    """Train the nano first-frame generator (hybrid mode's frame 0) by rectified flow on frame-0 latents."""
    from ..recipes.first_frame import train_first_frame

    try:
        channels = [int(part) for part in widths.split(",")]
    except ValueError:
        raise typer.BadParameter(f"--widths takes comma-separated integers such as 64,96,96, got {widths!r}.") from None
    if len(channels) < 2 or min(channels) < 16 or any(c % 16 for c in channels):
        raise typer.BadParameter(f"--widths needs at least two levels, each a multiple of 16; got {widths!r}.")
    config = train_config(output, steps, batch_size, lr, save_every, seed, 500, max_minutes, ema_decay or None)
    typer.echo(f"wrote {train_first_frame(config, latents, model, channels, text_dropout, object_weight)}")


@app.command("export-hybrid")
def export_hybrid(generator_dir: Path = typer.Option(..., "--first-frame", help="A trained generator: the final/ "
                                                     "of `train first-frame`."),
                  output: Path = typer.Option(..., "--output", "-o", help="Checkpoint folder to write."),
                  model: str = typer.Option("nano", "--model", help="The monolithic checkpoint to extend."),
                  steps: int = typer.Option(20, "--first-frame-steps", help="The generator's Euler steps."),
                  guidance: float = typer.Option(4.0, "--first-frame-guidance", help="The generator's CFG scale."),
                  hybrid_default: bool = typer.Option(True, "--hybrid-default/--keep-default-mode", help="Make "
                                                      "hybrid the folder's default mode, or keep the model's own "
                                                      "(hybrid then runs with --mode hybrid).")
                  ) -> None:
    """Write ``model`` with the first-frame generator added (and hybrid mode as its default)."""
    from ..recipes.first_frame import export_hybrid as export

    typer.echo(f"wrote {export(model, generator_dir, output, steps, guidance, hybrid_default=hybrid_default)}")


@app.command("sr")
def sr(output: Path = OUTPUT,
       teacher: str = typer.Option("nano", "--teacher", help="The model whose VAE decodes the low-resolution "
                                   "frames: a preset, a checkpoint folder (then checkpoint/ is that folder with the "
                                   "SR model added), or a VAE folder (`train vae` final/)."),
       size: str = typer.Option("small", "--size", help="QuickSRNet family member: small (32 channels, 2 "
                                "intermediate layers), medium (32, 5) or large (64, 11, with the anchor)."),
       anchor: bool = typer.Option(None, "--anchor/--no-anchor", help="Add (or drop) the input-to-output anchor, "
                                   "which starts the model as nearest-neighbour upsampling (default: the size's "
                                   "own: only large has it)."),
       steps: int = STEPS, batch_size: int = typer.Option(16, "--batch-size", help="Crops per process and step."),
       lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate (linear warm-up, then cosine decay to 10% "
                                "of it)."),
       save_every: int = SAVE, seed: int = SEED,
       crop: int = typer.Option(48, "--crop", help="Square crop of the low-resolution frames, in pixels (0: whole "
                                "frames)."),
       edge_weight: float = typer.Option(0.0, "--edge-weight", help="Weight of the L1 of finite differences (edges) "
                                         "beside the pixel L1."),
       num_frames: int = typer.Option(17, "--num-frames", help="Frames per clip passed through the VAE (1 + 8k)."),
       pair_videos: int = typer.Option(256, "--pair-videos", help="ShapesWorld training videos made into pairs "
                                       "(each passes through the VAE once)."),
       pairs: Path = typer.Option(None, "--pairs", help="Folder of the pair store (default: <output>/pairs); runs "
                                  "with the same data settings may share one."),
       style: list[str] = typer.Option(list(("none", "neon", "stripes", "pixel", "outline")), "--style",
                                       callback=_known_styles, help="ShapesWorld style drawn per video; repeat to "
                                       "mix (default: all five)."),
       videos_dir: Path = typer.Option(None, "--videos-dir", help="Train on the videos of this folder instead of "
                                       "ShapesWorld (the official scale): their frames are the targets."),
       degradation: str = typer.Option("vae", "--degradation", help="With --videos-dir, how the input is made from "
                                       "a target: vae (2x2 average, then the VAE round trip) or bicubic (antialiased "
                                       "bicubic reduction, no VAE)."),
       eval_videos: int = typer.Option(16, "--eval-videos", help="Held-out ShapesWorld eval videos for the final "
                                       "PSNR/SSIM of SR, bicubic and nearest."),
       eval_videos_dir: Path = typer.Option(None, "--eval-videos-dir", help="With --videos-dir, the held-out videos "
                                            "scored at the end."),
       max_minutes: float = MAX_MINUTES) -> None:
    """Train a QuickSRNet 2x super-resolution model on decoded frames; writes final/ and checkpoint/."""
    from ..models.sr import VARIANTS
    from ..recipes.sr import train_sr
    from ..training.sr import DEGRADATIONS

    if size not in VARIANTS:
        raise typer.BadParameter(f"--size takes one of {', '.join(VARIANTS)}; got {size!r}")
    if degradation not in DEGRADATIONS:
        raise typer.BadParameter(f"--degradation takes one of {', '.join(DEGRADATIONS)}; got {degradation!r}")
    if crop < 0 or 0 < crop < 8:
        raise typer.BadParameter(f"--crop must be 0 (whole frames) or at least 8 pixels; got {crop}")
    if videos_dir is not None and not videos_dir.is_dir():
        raise typer.BadParameter(f"--videos-dir {videos_dir} is not a folder")
    metrics = train_sr(train_config(output, steps, batch_size, lr, save_every, seed, 200, max_minutes), teacher,
                       size, anchor, edge_weight, crop or None, num_frames, pair_videos=pair_videos, styles=style,
                       pairs_dir=pairs, videos_dir=videos_dir, degradation=degradation, eval_videos=eval_videos,
                       eval_videos_dir=eval_videos_dir)
    if metrics:
        typer.echo(json.dumps(metrics, indent=2))
