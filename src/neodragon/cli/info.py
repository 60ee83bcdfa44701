"""``neodragon info``: the components of a model (class, parameters, size, dtypes), its defaults and adapters."""

from __future__ import annotations

import json
import tempfile

import typer
from rich.console import Console
from rich.table import Table

from .errors import check_weight_files, fail
from .generate import checkpoint_root, local_checkpoint, quiet_loading


def info(
    model: str = typer.Argument("nano", help="A preset (nano, nano-teacher, nano-student, official-reduced), a "
                                "checkpoint folder, or a hub id."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Components of a model: class, parameter count, size on disk, dtypes and config; the adapters it ships."""
    from ..adapters.loading import checkpoint_adapters, read_info
    from ..deploy.runtime import is_exported_folder
    from ..presets import PRESETS, create_random_checkpoint
    from ..utils.checkpoint import describe_checkpoint

    if is_exported_folder(model):
        exported_info(model, as_json)
        return
    check_weight_files(local_checkpoint(model))
    quiet_loading()
    with tempfile.TemporaryDirectory() as tmp:
        source = model
        folder = checkpoint_root(model)
        if folder is None:
            folder, source = create_random_checkpoint(PRESETS[model](), tmp), f"{model} (random weights, untrained)"
        components = describe_checkpoint(folder)
        pipeline_config = folder / "pipeline_config.json"
        defaults = json.loads(pipeline_config.read_text()) if pipeline_config.is_file() else None
        adapters = {name: {k: read_info(path)[k] for k in ("method", "component", "style", "parameters")}
                    for name, path in checkpoint_adapters(folder).items()}
    upscaler = super_resolution_summary(components, defaults)
    if as_json:
        typer.echo(json.dumps({"model": source, "pipeline_config": defaults, "adapters": adapters,
                               "super_resolution": upscaler, "components": [vars(c) for c in components]}, indent=2,
                              default=str))
        return
    out = Console()
    table = Table(title=f"neodragon model: {source}")
    for column in ("component", "class", "parameters", "size", "dtypes"):
        table.add_column(column, justify="right" if column in ("parameters", "size") else "left")
    for c in components:
        name = f"{c.class_name} ({c.referenced})" if c.referenced else c.class_name
        table.add_row(c.name, name, f"{c.num_elements:,}" if c.num_elements else "-",
                      f"{c.bytes_on_disk / 2**20:.2f} MiB", ",".join(c.dtypes) or "-")
    out.print(table)
    total = sum(c.num_elements for c in components)
    out.print(f"total: {total:,} tensor elements, {sum(c.bytes_on_disk for c in components) / 2**20:.2f} MiB"
              + (" (including the installed text encoder it references)" if any(c.referenced for c in components)
                 else ""))
    if upscaler is not None:
        out.print(f"super-resolution: {upscaler['description']}", highlight=False)
    for name, a in adapters.items():
        out.print(f"adapter [bold]{name}[/]: {a['method']} on the {a['component']}, style {a['style']}, "
                  f"{a['parameters']:,} numbers (generate --adapter {name})")
    if defaults:
        out.print_json(json.dumps(defaults))


def exported_info(folder: str, as_json: bool) -> None:
    """The graphs of a `deploy export` / `deploy quantize` folder: component, shapes, precision, size, check and
    SQNR (when quantised)."""
    from pathlib import Path

    from ..deploy.export import Manifest

    try:
        manifest = Manifest.load(folder)
    except ValueError as err:
        fail(str(err))
    report = Path(folder) / "sqnr.json"
    sqnr = json.loads(report.read_text())["graphs"] if report.is_file() else {}
    rows = []
    for spec in manifest.graphs.values():
        path = Path(folder) / spec.file
        size = sum(f.stat().st_size for f in (path, path.with_suffix(".onnx.data")) if f.is_file())
        rows.append({"graph": spec.name, "component": spec.component, "inputs": {t.name: t.shape for t in spec.inputs},
                     "precision": spec.precision, "bytes": size, "max_abs_error_fp32": spec.check.get("max_abs_error"),
                     "sqnr_db": sqnr.get(spec.name, {}).get("sqnr_db")})
    if as_json:
        typer.echo(json.dumps({"model": folder, "mode": manifest.mode, "scheme": manifest.scheme,
                               "video": [manifest.num_frames, manifest.height, manifest.width], "graphs": rows},
                              indent=2))
        return
    table = Table(title=f"exported model: {folder} ({manifest.scheme}, {manifest.mode} mode, {manifest.num_frames} "
                  f"frames at {manifest.height}x{manifest.width}; run with --backend onnxruntime)")
    for column in ("graph", "inputs (DiT: its clips)", "precision", "size", "SQNR"):
        table.add_column(column, justify="right" if column in ("size", "SQNR") else "left", no_wrap=column == "graph")
    for row in rows:
        inputs = {k: v for k, v in row["inputs"].items() if k.startswith("clip_")} or row["inputs"]
        shapes = " ".join("x".join(map(str, shape)) for shape in inputs.values())
        table.add_row(row["graph"], shapes, row["precision"], f"{row['bytes'] / 2**20:.2f} MiB",
                      "-" if row["sqnr_db"] is None else f"{row['sqnr_db']:.1f} dB")
    Console().print(table)


def super_resolution_summary(components: list, defaults: dict | None) -> dict | None:
    """The super-resolution network of a checkpoint (its ``super_resolution/`` component): family member,
    parameters, scale and the video size it makes from the model's default size; None when it has none."""
    from ..models.sr import variant_of
    from ..pipelines.neodragon import SUBFOLDERS

    found = next((c for c in components if c.name == SUBFOLDERS["super_resolution"]), None)
    if found is None:
        return None
    config = found.config
    variant = variant_of(config)
    scale = int(config.get("scale_factor", 2))
    summary = {"class": found.class_name, "variant": variant, "parameters": found.num_elements, "scale": scale,
               "num_channels": config.get("num_channels"), "num_intermediate_layers":
               config.get("num_intermediate_layers"), "anchor": bool(config.get("use_ito_connection"))}
    size = ""
    if defaults and defaults.get("height") and defaults.get("width"):
        h, w = defaults["height"], defaults["width"]
        summary["output_size"] = [h * scale, w * scale]
        size = f", {h}x{w} -> {h * scale}x{w * scale}"
    name = f"QuickSRNet-{variant.capitalize()}" if variant else "QuickSRNet"
    anchor = "with" if summary["anchor"] else "no"
    summary["description"] = (f"{name} {scale}x ({summary['num_channels']} channels, "
                              f"{summary['num_intermediate_layers']} intermediate layers, {anchor} anchor), "
                              f"{found.num_elements:,} parameters{size}; `generate` upscales by default (--no-sr to "
                              "skip)")
    return summary
