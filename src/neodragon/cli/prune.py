"""``neodragon prune ...``: recipe 3, block pruning with two-stage recovery (run `recover` under
``accelerate launch`` for several processes)."""

from __future__ import annotations

from pathlib import Path

import typer

from .errors import FriendlyGroup, fail
from .train import MAX_MINUTES, OUTPUT, SAVE, SEED, STEPS, train_config

app = typer.Typer(cls=FriendlyGroup, no_args_is_help=True,
                  help="Block pruning of the multistep DiT: score the blocks, drop some, recover in two stages.")


def _blocks(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"comma-separated block indices such as 1,3; got {text!r}") from None


@app.command()
def importance(model: str = typer.Argument("nano", help="A preset with bundled weights or a checkpoint folder."),
               output: Path = typer.Option(..., "--output", "-o", help="Folder for importance.json / .md."),
               prompts: int = typer.Option(32, "--prompts", min=1, help="Calibration prompts (caption grammar, "
                                           "never the evaluation prompts)."),
               samples: int = typer.Option(2, "--samples", min=1, help="Seeds per calibration prompt."),
               heldout_videos: int = typer.Option(64, "--heldout-videos", min=1, help="Unseen videos for the "
                                                  "held-out flow-matching loss of each removal."),
               prompt_set: str = typer.Option("nano-eval", "--prompt-set", help="VBench-nano prompt set scored for "
                                              "each single-block removal ('none' to skip)."),
               limit: int = typer.Option(None, "--limit", min=1, help="Only the first N prompts of --prompt-set."),
               seed: int = SEED,
               overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing importance.json.")
               ) -> None:
    """Score each block of MODEL's multistep DiT: cosine importance of the visual and text tokens, and what removing
    it costs (held-out flow-matching loss, VBench-nano)."""
    from ..recipes.prune import importance_table, measure_importance

    if (output / "importance.json").exists() and not overwrite:
        fail(f"{output / 'importance.json'} exists; pass --overwrite to replace it.")
    try:
        result = measure_importance(model, output, prompts, samples, heldout_videos,
                                    None if prompt_set == "none" else prompt_set, limit, seed)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    typer.echo(importance_table(result))
    typer.echo(f"wrote {output / 'importance.json'} and {output / 'importance.md'}")


@app.command()
def apply(model: str = typer.Argument(..., help="A preset with bundled weights or a checkpoint folder."),
          drop: str = typer.Option(..., "--drop", help="Blocks to remove, e.g. 1,3 (never the last one)."),
          output: Path = typer.Option(..., "--output", "-o", help="The pruned checkpoint folder."),
          overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder.")) -> None:
    """Write MODEL's checkpoint folder without the blocks --drop, with pruning.json (loadable by `generate`)."""
    from ..recipes.prune import apply_pruning

    if output.exists() and not overwrite:
        fail(f"{output} exists; pass --overwrite to replace it.")
    try:
        out = apply_pruning(model, _blocks(drop), output)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    typer.echo(f"wrote {out}")


@app.command()
def recover(pruned: Path = typer.Argument(..., help="A folder written by `prune apply` or by an earlier stage "
                                          "(its checkpoint/)."),
            stage: int = typer.Option(..., "--stage", help="1: flow matching on ground-truth latents; 2: feature "
                                      "matching to the unpruned DiT (run after stage 1)."),
            latents: list[Path] = typer.Option(..., "--latents", help="Latent folders of `train encode-latents` "
                                               "made with this model's VAE (repeat to mix)."),
            output: Path = OUTPUT, steps: int = STEPS, batch_size: int = typer.Option(16, "--batch-size",
                                                                                      help="Videos per process "
                                                                                      "and step."),
            lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate (linear warm-up, then cosine decay to "
                                     "10% of it)."),
            save_every: int = SAVE, seed: int = SEED,
            mapping: str = typer.Option("simple", "--mapping", help="Stage 2's block mapping: simple (each block "
                                        "to the teacher block it came from) or next (to the input of the next "
                                        "kept teacher block)."),
            visual_weight: float = typer.Option(1.0, "--visual-weight", help="Stage 2: MSE of visual tokens."),
            text_weight: float = typer.Option(1.0, "--text-weight", help="Stage 2: cosine distance of text tokens."),
            teacher_weight: float = typer.Option(1.0, "--teacher-weight", help="Stage 2: flow matching to the "
                                                 "teacher's velocity."),
            truth_weight: float = typer.Option(1.0, "--truth-weight", help="Stage 2: flow matching to the "
                                               "ground truth."),
            max_minutes: float = MAX_MINUTES) -> None:
    """Fine-tune a pruned DiT; writes final/ (the DiT) and checkpoint/ (the runnable folder)."""
    from ..recipes.prune import recover as run_recovery
    from ..training.pruning import RecoveryWeights

    if stage not in (1, 2):
        raise typer.BadParameter(f"--stage is 1 or 2, got {stage}")
    if mapping not in ("simple", "next"):
        raise typer.BadParameter(f"--mapping is simple or next, got {mapping!r}")
    weights = RecoveryWeights(visual_weight, text_weight, teacher_weight, truth_weight)
    try:
        out = run_recovery(train_config(output, steps, batch_size, lr, save_every, seed, 100, max_minutes),
                           pruned, stage, latents, weights, mapping)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    typer.echo(f"wrote {out}")
