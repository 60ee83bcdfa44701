"""``neodragon adapter ...``: train an adapter, inspect adapter files, convert SHiRA adapters to and from PEFT, fuse
SHiRA adapters, export a compact copy to ship with a model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from .errors import FriendlyGroup, check_new_output, check_weight_files, console, fail

app = typer.Typer(cls=FriendlyGroup, add_completion=False, no_args_is_help=True,
                  help="SHiRA / FouRA adapters: train one, inspect files, convert SHiRA to and from PEFT, fuse SHiRA "
                  "adapters.")

if TYPE_CHECKING:
    from ..adapters.training import AdapterRecipe, TrainedAdapter
    from ..training.trainer import TrainConfig


def _dit_on_meta(model: str):
    """The DiT as shapes only (meta device): ``nano``, ``official`` or a folder with the DiT's config.json."""
    import torch

    from ..models.mmdit import PyramidMMDiT
    from ..presets import PRESETS

    if model in PRESETS:
        config = PRESETS[model]().dit
    elif model == "official":
        config = {}
    else:
        folder = Path(model)
        folder = folder if (folder / "config.json").is_file() else folder / "diffusion_transformer_320p"
        if not (folder / "config.json").is_file():
            fail(f"--model {model!r}: expected a preset ({', '.join(PRESETS)}), 'official' (the release's DiT) or a "
                 "folder with the DiT's config.json.")
        config = PyramidMMDiT.load_config(folder)
    with torch.device("meta"):
        return PyramidMMDiT.from_config(config)


def _peft_summary(folder: Path) -> dict:
    from safetensors import safe_open

    config = json.loads((folder / "adapter_config.json").read_text())
    weights = folder / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}  # noqa: SIM118
    params = sum(math.prod(s) for k, s in shapes.items() if not k.endswith("shira_indices"))
    return {"format": f"PEFT {config.get('peft_type')}", "r": config.get("r"),
            "target_modules": config.get("target_modules"), "tensors": len(shapes), "parameters": params,
            "bytes": weights.stat().st_size}


def _shira_summary(path: Path) -> dict:
    from ..adapters.shira import ShiraAdapter

    adapter = ShiraAdapter.load(path)
    kinds = sorted({"Linear" if len(s) == 2 else f"Conv{len(s) - 2}d" for s in adapter.shapes.values()})
    return {"format": "neodragon SHiRA", "layers": len(adapter.shapes), "layer_types": kinds,
            "parameters": adapter.num_params, "density": adapter.density(), "metadata": adapter.metadata,
            "bytes": path.stat().st_size, "bytes_per_entry": path.stat().st_size / max(adapter.num_params, 1)}


@app.command()
def info(
    path: Path = typer.Argument(..., help="A neodragon SHiRA .safetensors file or a PEFT adapter folder."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """What an adapter holds: format, layers, trainable entries, density, size on disk."""
    try:
        summary = _peft_summary(path) if path.is_dir() else _shira_summary(path)
    except (ValueError, FileNotFoundError, OSError) as err:
        fail(str(err))
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    table = Table(title=f"adapter: {path}", show_header=False)
    for key, value in summary.items():
        shown = f"{value:,}" if isinstance(value, int) else f"{value:.4g}" if isinstance(value, float) else str(value)
        table.add_row(key, shown)
    Console().print(table)


@app.command()
def convert(
    source: Path = typer.Argument(..., help="A neodragon SHiRA file (to PEFT) or a PEFT SHiRA folder (from PEFT)."),
    target: Path = typer.Argument(..., help="The PEFT folder or the .safetensors file to write."),
    model: str = typer.Option("nano", "--model", help="DiT whose layer shapes a PEFT adapter is read against: "
                              "'nano', 'official' or a folder with its config.json."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing target."),
) -> None:
    """Convert a SHiRA adapter between neodragon's file and PEFT's adapter folder (Linear layers)."""
    from ..adapters.shira import ShiraAdapter

    if not source.exists():
        fail(f"{source} does not exist: pass a neodragon SHiRA .safetensors file or a PEFT adapter folder.")
    check_new_output(target, overwrite, folder=not source.is_dir())  # to PEFT: a folder
    try:
        if source.is_dir():
            adapter = ShiraAdapter.from_peft(source, _dit_on_meta(model))
            adapter.save(target)
        else:
            adapter = ShiraAdapter.load(source)
            adapter.to_peft(target)
    except (ValueError, TypeError, FileNotFoundError, OSError) as err:
        fail(str(err))
    console.print(f"wrote [bold]{target}[/]: {len(adapter.shapes)} layers, {adapter.num_params:,} entries")


@app.command()
def fuse(
    adapters: list[Path] = typer.Argument(..., help="neodragon SHiRA files to fuse."),
    output: Path = typer.Option(..., "-o", "--output", help="The fused .safetensors file."),
    weights: str = typer.Option(None, "--weights", help="One weight per adapter, e.g. 1,0.5 (default: all 1)."),
    metrics: bool = typer.Option(False, "--metrics", help="Also report AWOM/AWOR (dense products; slow on wide "
                                 "layers)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
) -> None:
    """Fuse SHiRA adapters into one (weighted sum of sparse deltas) and report how much their masks overlap."""
    from ..adapters.shira import ShiraAdapter, fuse_adapters, overlap_stats

    check_new_output(output, overwrite)
    try:
        scales = [float(w) for w in weights.split(",")] if weights else None
        loaded = [ShiraAdapter.load(path) for path in adapters]
        fused = fuse_adapters(loaded, scales)
    except (ValueError, FileNotFoundError, OSError) as err:
        fail(str(err))
    table = Table(title="mask overlap (over shared layers)")
    for column in ("pair", "layers", "shared entries", "Jaccard", *(("mean AWOM", "mean AWOR") if metrics else ())):
        table.add_column(column)
    for i in range(len(loaded)):
        for j in range(i + 1, len(loaded)):
            stats = overlap_stats(loaded[i], loaded[j], metrics=metrics).values()
            rows = max(len(stats), 1)
            cells = [f"{adapters[i].name} + {adapters[j].name}", str(len(stats)),
                     f"{sum(s['shared'] for s in stats):,}", f"{sum(s['jaccard'] for s in stats) / rows:.4f}"]
            if metrics:
                cells += [f"{sum(s['awom'] for s in stats) / rows:.4g}", f"{sum(s['awor'] for s in stats) / rows:.4f}"]
            table.add_row(*cells)
    Console().print(table)
    fused.save(output)
    console.print(f"wrote [bold]{output}[/]: {len(fused.shapes)} layers, {fused.num_params:,} entries")


@app.command()
def export(
    folder: Path = typer.Argument(..., help="A trained adapter folder (the final/ of `neodragon adapter train`)."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder to write, e.g. <checkpoint>/adapters/<name> to "
                                "ship it with a model (`generate --adapter <name>`)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Write a compact copy of a trained adapter: its values / factors in float16, its adapter.json as it is."""
    import torch
    from safetensors.torch import load_file, save_file

    from ..adapters.loading import INFO_FILE, SHIRA_FILE, read_info
    from ..adapters.shira import ShiraAdapter
    from ..utils.video import atomic_path

    check_new_output(output, overwrite, folder=True)
    try:
        info = read_info(folder)
    except FileNotFoundError as err:
        fail(str(err))
    output.mkdir(parents=True, exist_ok=True)
    if info["method"] == "shira":
        ShiraAdapter.load(folder / SHIRA_FILE).save(output / SHIRA_FILE, dtype=torch.float16)
    else:
        weights = {k: v.half() for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
        with atomic_path(output / "adapter_model.safetensors", overwrite=True) as tmp:
            save_file(weights, tmp)
        (output / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    (output / INFO_FILE).write_text((folder / INFO_FILE).read_text())  # last: its presence marks a complete folder
    size = sum(p.stat().st_size for p in output.iterdir())
    console.print(f"wrote [bold]{output}[/]: {info['method']} {info['component']} adapter, "
                  f"{size / 1024:.0f} KiB")


@app.command()
def train(
    model: str = typer.Argument(..., help="Checkpoint folder (or a preset: 'nano', 'nano-teacher') whose "
                                "monolithic DiT or VAE decoder is adapted."),
    style: str = typer.Option(..., "--style", help="ShapesWorld style to learn, e.g. neon or stripes."),
    component: str = typer.Option("dit", "--component", help="dit (pyramidal flow matching on styled videos) or "
                                  "decoder (style transfer from the latents of unstyled videos)."),
    crop: int = typer.Option(48, "--crop", help="decoder: square training crop in pixels, a multiple of the "
                             "VAE's spatial factor (0: whole frames)."),
    output: Path = typer.Option(..., "-o", "--output", help="Run folder: checkpoints, log.jsonl and final/ (the "
                                "adapter). A run resumes from its newest checkpoint."),
    method: str = typer.Option("shira", "--method", help="shira, lora (PEFT) or foura (PEFT)."),
    rank: int = typer.Option(None, "--rank", help="Budget: r * (in + out) trainable numbers per layer, the same "
                             "for every method (default: 1, about 1.2 % of the nano DiT's targeted weights)."),
    density: float = typer.Option(None, "--density", help="Budget as SHiRA's fraction of each weight instead of "
                                  "--rank; LoRA / FouRA take the nearest ranks."),
    strategy: str = typer.Option("random", "--strategy", help="SHiRA mask: random, struct, wm, grad or snip."),
    steps: int = typer.Option(500, "--steps", help="Total optimiser steps."),
    batch_size: int = typer.Option(4, "--batch-size", help="Videos per process and step."),
    lr: float = typer.Option(5e-4, "--lr", help="Peak learning rate (linear warm-up, then cosine decay)."),
    save_every: int = typer.Option(100, "--save-every", help="Checkpoint interval in steps."),
    seed: int = typer.Option(0, "--seed", help="Seeds the data, the SHiRA mask and the adapter's initialisation."),
    videos: int = typer.Option(64, "--videos", help="Training videos of the style (encoded once)."),
    num_frames: int = typer.Option(None, "--num-frames", help="Frames per video (1 + 8k) (default: the "
                                   "checkpoint's)."),
    size: int = typer.Option(None, "--size", help="Square video size (default: the checkpoint's geometry)."),
    style_in_caption: bool = typer.Option(False, "--style-in-caption/--content-captions", help="Keep the style "
                                          "words in the captions (default: content only, the style becomes the "
                                          "default look)."),
    text_dropout: float = typer.Option(0.1, "--text-dropout", help="Fraction of captions dropped (for CFG)."),
) -> None:
    """Train one style adapter (SHiRA, LoRA or FouRA at an equal budget) on the DiT or the VAE decoder."""
    from ..adapters.training import AdapterRecipe
    from ..training.trainer import TrainConfig

    try:
        recipe = AdapterRecipe(method=method, style=style, component=component, crop=crop,
                               rank=1 if rank is None and density is None else rank, density=density,
                               strategy=strategy, num_videos=videos, num_frames=num_frames, height=size, width=size,
                               style_in_caption=style_in_caption, text_dropout=text_dropout)
    except ValueError as err:
        fail(str(err))
    config = TrainConfig(output_dir=str(output), max_steps=steps, batch_size=batch_size, learning_rate=lr,
                         save_every=save_every, seed=seed, warmup_steps=min(100, max(1, steps // 10)))
    run = _train(model, config, recipe)
    console.print(f"wrote [bold]{run.path}[/]: {recipe.method} {recipe.component} adapter for style "
                  f"{recipe.style!r}, {run.parameters:,} trainable numbers, "
                  f"loss {run.record.get('loss', float('nan')):.4f}")


def _train(model: str, config: TrainConfig, recipe: AdapterRecipe) -> TrainedAdapter:
    import torch

    from ..adapters.training import train_adapter
    from ..presets import load_pipeline
    from .generate import local_checkpoint

    check_weight_files(local_checkpoint(model))
    try:
        pipe = load_pipeline(model, mode="monolithic", torch_dtype=torch.float32, load_super_resolution=False)
    except (FileNotFoundError, ValueError, OSError) as err:
        fail(f"cannot load checkpoint {model!r}: {err}")
    pipe.set_progress_bar_config(disable=True)
    return train_adapter(pipe, config, recipe)
