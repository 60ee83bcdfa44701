"""The ``neodragon`` command line: ``generate`` a video from text, ``info`` about a model."""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Neodragon mobile text-to-video: generate videos, inspect models.")
console = Console(stderr=True)

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _parse_steps(value: str | None) -> int | list[int] | None:
    if value is None:
        return None
    try:
        steps = [int(v) for v in value.split(",")]
    except ValueError as err:
        raise typer.BadParameter(f"steps: an int or one int per stage like 20,20,20; got {value!r}") from err
    return steps[0] if len(steps) == 1 else steps


def _quiet_loading() -> None:
    """Per-file loading bars of transformers/diffusers would drown the generation progress bar."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def _checkpoint_root(model: str) -> Path | None:
    """The local folder ``model`` loads from; None for a preset without bundled weights."""
    from .pipelines.neodragon import resolve_checkpoint
    from .presets import PRESETS, bundled_weights

    return bundled_weights(model) if model in PRESETS else resolve_checkpoint(model)


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=1)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="What the video shows, e.g. 'a red circle moving to the right'."),
    output: Path = typer.Option(Path("out.mp4"), "-o", "--output", help="Where to write the mp4."),
    model: str = typer.Option("nano", "--model", help="'nano' (bundled), a checkpoint folder, or a hub id."),
    mode: str = typer.Option(None, "--mode", help="hybrid or monolithic (default: the model's default)."),
    num_frames: int = typer.Option(None, "--num-frames", help="1 + 8k frames (default: the model's)."),
    height: int = typer.Option(None, "--height"),
    width: int = typer.Option(None, "--width"),
    seed: int = typer.Option(0, "--seed", help="Same seed, same video."),
    steps: str = typer.Option(None, "--steps", help="Steps per stage for every frame, e.g. 20,20,20 or 4."),
    video_steps: str = typer.Option(None, "--video-steps", help="Steps per stage for frames after the first."),
    guidance: float = typer.Option(None, "--guidance", help="CFG scale for every frame (> 1 enables CFG)."),
    video_guidance: float = typer.Option(None, "--video-guidance", help="CFG scale for frames after the first."),
    negative_prompt: str = typer.Option(None, "--negative-prompt"),
    sr: bool = typer.Option(False, "--sr/--no-sr", help="2x super-resolution (needs a super_resolution/ model)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps ..."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    fps: int = typer.Option(None, "--fps", help="Frames per second of the mp4 (default: the model's)."),
    preview: Path = typer.Option(None, "--preview", help="Also write a contact sheet (.png) or animation (.gif)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
    adapter: list[str] = typer.Option(None, "--adapter", metavar="FOLDER|NAME",
                                      help="A trained adapter folder (the final/ of `neodragon adapter train`) or "
                                      "the name of one the model ships (`neodragon info`); repeat to apply several "
                                      "together."),
) -> None:
    """Generate a video from a text prompt and write it as an mp4."""
    import torch

    from .presets import load_pipeline
    from .utils.video import export_to_video, save_preview

    if output.suffix.lower() != ".mp4":
        _fail(f"--output must end with .mp4; got {output}")
    for path in (output, preview):
        if path is not None and path.exists() and not overwrite:
            _fail(f"{path} already exists; pass --overwrite or choose another name.")
    if dtype not in DTYPES:
        _fail(f"--dtype must be one of {sorted(set(DTYPES))}; got {dtype!r}")
    started = time.perf_counter()
    _quiet_loading()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            pipe = load_pipeline(model, mode=mode, torch_dtype=getattr(torch, DTYPES[dtype]))
        for warning in caught:
            if "weights" in str(warning.message):
                console.print(f"[bold yellow]warning:[/] {warning.message}")
        if adapter:
            from .adapters.training import attach_trained_adapters, find_adapter

            root = _checkpoint_root(model)
            try:
                attach_trained_adapters(pipe, [find_adapter(a, root) for a in adapter])
            except RuntimeError as err:  # PEFT's state-dict size mismatch
                _fail(f"an adapter does not fit this model ({str(err).splitlines()[0]}); use adapters trained for "
                      f"--model {model}.")
        pipe.to(device)
        step_list, video_step_list = _parse_steps(steps), _parse_steps(video_steps)
        frames = pipe(
            prompt, num_frames=num_frames, height=height, width=width, num_inference_steps=step_list,
            video_num_inference_steps=video_step_list if video_steps is not None else step_list,
            guidance_scale=guidance, video_guidance_scale=video_guidance if video_guidance is not None else guidance,
            negative_prompt=negative_prompt, super_resolution=sr,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).frames[0]
    except (ValueError, FileNotFoundError, OSError) as err:
        _fail(str(err))
    fps = fps or pipe.pipeline_config.fps
    export_to_video(frames, output, fps=fps, overwrite=overwrite)
    if preview is not None:
        save_preview(frames, preview, fps=fps, overwrite=overwrite)
    width_px, height_px = frames[0].size
    console.print(f"wrote [bold]{output}[/]: {len(frames)} frames {width_px}x{height_px} @ {fps} fps, "
                  f"mode {pipe.mode}, seed {seed}, {time.perf_counter() - started:.1f} s"
                  + (f"; preview {preview}" if preview else ""))


@app.command()
def info(
    model: str = typer.Argument("nano", help="'nano', a checkpoint folder, or a hub id."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Components of a model: class, parameter count, size on disk, dtypes and config; the adapters it ships."""
    from .adapters.training import checkpoint_adapters, read_info
    from .presets import PRESETS, create_random_checkpoint
    from .utils.checkpoint import describe_checkpoint

    _quiet_loading()
    with tempfile.TemporaryDirectory() as tmp:
        source = model
        try:
            folder = _checkpoint_root(model)
        except (FileNotFoundError, OSError) as err:
            _fail(str(err))
        if folder is None:
            folder, source = create_random_checkpoint(PRESETS[model](), tmp), f"{model} (random weights, untrained)"
        components = describe_checkpoint(folder)
        pipeline_config = folder / "pipeline_config.json"
        defaults = json.loads(pipeline_config.read_text()) if pipeline_config.is_file() else None
        adapters = {name: {k: read_info(path)[k] for k in ("method", "component", "style", "parameters")}
                    for name, path in checkpoint_adapters(folder).items()}
    if as_json:
        typer.echo(json.dumps({"model": source, "pipeline_config": defaults, "adapters": adapters,
                               "components": [vars(c) for c in components]}, indent=2, default=str))
        return
    table = Table(title=f"neodragon model: {source}")
    for column in ("component", "class", "parameters", "size", "dtypes"):
        table.add_column(column, justify="right" if column in ("parameters", "size") else "left")
    for c in components:
        table.add_row(c.name, c.class_name, f"{c.num_elements:,}" if c.num_elements else "-",
                      f"{c.bytes_on_disk / 2**20:.2f} MiB", ",".join(c.dtypes) or "-")
    Console().print(table)
    total = sum(c.num_elements for c in components)
    Console().print(f"total: {total:,} tensor elements, {sum(c.bytes_on_disk for c in components) / 2**20:.2f} MiB")
    for name, a in adapters.items():
        Console().print(f"adapter [bold]{name}[/]: {a['method']} on the {a['component']}, style {a['style']}, "
                        f"{a['parameters']:,} numbers (generate --adapter {name})")
    if defaults:
        Console().print_json(json.dumps(defaults))


def _register_subcommands() -> None:
    from .adapters.cli import app as adapter_app
    from .data.cli import app as data_app
    from .eval.cli import app as eval_app
    from .recipes.cli import app as train_app

    app.add_typer(train_app, name="train")
    app.add_typer(data_app, name="data", help="ShapesWorld, the nano world: previews of its captioned videos.")
    app.add_typer(adapter_app, name="adapter", help="SHiRA and FouRA adapters: train, inspect, convert, fuse, export.")
    app.add_typer(eval_app, name="eval", help="VBench-nano: score a model with the bundled judge; train the judge.")


_register_subcommands()


if __name__ == "__main__":
    app()
