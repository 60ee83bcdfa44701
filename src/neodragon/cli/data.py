"""``neodragon data ...``: look at ShapesWorld."""

from __future__ import annotations

from pathlib import Path

import typer

from .errors import FriendlyGroup, check_new_output, fail

app = typer.Typer(cls=FriendlyGroup, add_completion=False, no_args_is_help=True)


@app.callback()
def main() -> None:
    """ShapesWorld, the nano preset's video world."""  # a callback keeps `preview` a subcommand when run alone


@app.command()
def preview(
    output: Path = typer.Argument(..., help="Contact sheet to write (.png)."),
    split: str = typer.Option("train", "--split", help="train, eval or heldout."),
    count: int = typer.Option(8, "--count", min=1, help="Number of videos (one row each)."),
    frames: int = typer.Option(6, "--frames", min=1, help="Frames shown per video."),
    start: int = typer.Option(0, "--start", min=0, help="Index of the first item of the split."),
    seed: int = typer.Option(0, "--seed", min=0, help="Base seed of the split."),
    style: list[str] = typer.Option(["none"], "--style", help="Style drawn per video; repeat to mix styles."),
    num_frames: int = typer.Option(17, "--num-frames", help="1 + 8k frames."),
    height: int = typer.Option(128, "--height", help="Video height in pixels."),
    width: int = typer.Option(128, "--width", help="Video width in pixels."),
    gif: Path = typer.Option(None, "--gif", help="Also write the videos side by side as an animated GIF."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing files."),
) -> None:
    """Write a contact sheet of ShapesWorld videos with their captions."""
    from ..data.shapes_world import animation
    from ..data.shapes_world import preview as write_preview
    from ..utils.video import save_preview

    if output.suffix.lower() != ".png":
        fail(f"the contact sheet must be a .png; got {output.name}")
    if gif is not None and gif.suffix.lower() != ".gif":
        fail(f"--gif must end with .gif; got {gif.name}")
    for path in (output, gif):
        check_new_output(path, overwrite)
    try:
        samples = write_preview(output, split, count, frames, start=start, base_seed=seed, num_frames=num_frames,
                                height=height, width=width, styles=style, overwrite=overwrite)
    except ValueError as err:
        fail(str(err))
    if gif is not None:
        save_preview(animation(samples), gif, fps=8, overwrite=overwrite)
    for i, s in enumerate(samples):
        typer.echo(f"{start + i}: {s.caption}")
    typer.echo(f"wrote {output}" + (f" and {gif}" if gif is not None else ""))
