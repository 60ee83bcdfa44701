"""``neodragon eval ...``: VBench-nano of a model, and training the judge."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import typer

from .errors import FriendlyGroup, check_new_output, check_weight_files, fail
from .generate import DTYPES, load_model, local_checkpoint, parse_steps

app = typer.Typer(cls=FriendlyGroup, add_completion=False, no_args_is_help=True)


@app.callback()
def main() -> None:
    """VBench-nano: score a model on a fixed prompt set with a judge trained on real ShapesWorld videos."""


def _git_revision() -> str:
    folder = Path(__file__).parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=folder, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _provenance() -> dict[str, str]:
    """How and where a result was made: the command line, UTC date, git revision and machine."""
    return {"command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_revision": _git_revision(),
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs"}


@app.command()
def run(
    model: str = typer.Argument("nano", help="'nano' (bundled), a checkpoint folder, or a hub id."),
    prompt_set: str = typer.Option("nano-eval", "--prompt-set", help="nano-eval, nano-heldout or a JSON file."),
    out: Path = typer.Option(..., "--out", help="Results JSON; the markdown table goes next to it (.md)."),
    judge_path: Path = typer.Option(None, "--judge", help="Judge folder (default: the bundled judge)."),
    mode: str = typer.Option(None, "--mode", help="hybrid or monolithic (default: the model's)."),
    steps: str = typer.Option(None, "--steps", help="Steps per stage, e.g. 8,8,8 or 4 (default: the model's)."),
    video_steps: str = typer.Option(None, "--video-steps", help="Steps per stage for frames after the first."),
    guidance: float = typer.Option(None, "--guidance", help="CFG scale of the first frame."),
    video_guidance: float = typer.Option(None, "--video-guidance", help="CFG scale of later frames."),
    limit: int = typer.Option(None, "--limit", min=1, help="Only the first N prompts (a quick look)."),
    seed_offset: int = typer.Option(0, "--seed-offset", help="Added to every prompt's seed: rerun with another "
                                    "offset to see how far the scores move by chance."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps ..."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16: the weights' and "
                              "activations' precision while generating."),
    backend: str = typer.Option("pytorch", "--backend", help="pytorch, or onnxruntime for an exported folder "
                                "(`neodragon deploy export` / `deploy quantize`)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing result files."),
) -> None:
    """Generate every prompt of a prompt set with MODEL and score the videos with VBench-nano."""
    import torch

    from ..eval.judge import load_judge
    from ..eval.metrics import evaluate, markdown_table
    from ..eval.prompts import load_prompt_set
    from ..utils.video import atomic_path

    table_path = out.with_suffix(".md")
    if out.suffix.lower() == ".md":
        fail(f"--out is the results JSON (the table goes next to it as .md); got {out}")
    for path in (out, table_path):
        check_new_output(path, overwrite)
    if dtype not in DTYPES:
        fail(f"--dtype must be one of {', '.join(sorted(set(DTYPES)))}; got {dtype!r}")
    step_list, video_step_list = parse_steps(steps), parse_steps(video_steps, "--video-steps")
    check_weight_files(local_checkpoint(model))
    try:
        entries = load_prompt_set(prompt_set)[:limit]
        judge = load_judge(judge_path)
        pipe = load_model(model, mode, dtype, device, backend)
    except (ValueError, FileNotFoundError, OSError) as err:
        fail(str(err))
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=step_list, guidance_scale=guidance, video_guidance_scale=video_guidance,
                video_num_inference_steps=video_step_list if video_steps is not None else step_list)

    def generate(caption: str, seed: int) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(seed + seed_offset)
        return pipe(caption, generator=generator, output_type="pt", **call).frames[0]

    results = {"model": model, "prompt_set": prompt_set, "prompts": len(entries), **_provenance(),
               "device": device, "dtype": DTYPES[dtype], "backend": backend, "mode": pipe.mode,
               "seed_offset": seed_offset,
               "sampling": {k: v for k, v in call.items() if v is not None},
               "judge": str(judge_path) if judge_path else "bundled", **evaluate(generate, entries, judge)}
    with atomic_path(out, overwrite) as tmp:
        tmp.write_text(json.dumps(results, indent=1) + "\n")
    header = (f"# VBench-nano: {model} on {prompt_set} ({len(entries)} prompts)\n\n"
              f"`{results['command']}` — {results['date']}, git {results['git_revision']}\n\n")
    with atomic_path(table_path, overwrite) as tmp:
        tmp.write_text(header + markdown_table(results))
    g = results["generated"]
    typer.echo(f"quality {g['quality']:.4f}  semantic {g['semantic']:.4f}  total {g['total']:.4f}; "
               f"wrote {out} and {table_path}")


@app.command("vae")
def vae(
    folder: Path = typer.Argument(..., help="'nano' (bundled), a VAE folder (`train vae`'s final/) or a checkpoint "
                                            "folder."),
    videos: int = typer.Option(100, "--videos", min=1, help="Real held-out `eval` videos (every style)."),
    out: Path = typer.Option(None, "--out", help="Also write the results JSON here."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    seed: int = typer.Option(0, "--seed", help="Base seed of the held-out videos."),
) -> None:
    """Reconstruct real held-out ShapesWorld videos with a VAE; PSNR and the judge's accuracy on them, per style."""
    from ..eval.reconstruction import judged_reconstructions
    from ..models.vae import AsymmetricCausalVideoVAE
    from ..presets import video_vae_folder
    from ..utils.video import atomic_path

    check_new_output(out, overwrite)
    try:
        source = video_vae_folder(folder)
    except FileNotFoundError:
        fail(f"cannot load a VAE from {folder}: no such folder. Pass 'nano', the final/ of `neodragon train vae` "
             "or a checkpoint folder.")
    check_weight_files(source)
    try:
        model = AsymmetricCausalVideoVAE.from_pretrained(source).eval()
    except (ValueError, OSError) as err:
        fail(f"cannot load a VAE from {source}: {err}")
    results = {"vae": str(folder), "videos": videos, "seed": seed, **_provenance(),
               **judged_reconstructions(model, videos, seed)}
    text = json.dumps(results, indent=1) + "\n"
    if out is not None:
        with atomic_path(out, overwrite) as tmp:
            tmp.write_text(text)
    typer.echo(text)


@app.command("train-judge")
def train_judge(
    output_dir: Path = typer.Argument(Path("runs/judge"), help="Checkpoints, log.jsonl and judge/ go here."),
    steps: int = typer.Option(6500, "--steps", min=1, help="Total optimiser steps."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Videos per step."),
    learning_rate: float = typer.Option(2e-3, "--lr", help="Peak learning rate."),
    warmup: int = typer.Option(100, "--warmup", help="Linear warm-up steps of the learning rate."),
    save_every: int = typer.Option(250, "--save-every", min=1, help="Checkpoint interval in steps."),
    eval_videos: int = typer.Option(1000, "--eval-videos", min=1, help="Real eval and heldout videos to score."),
    workers: int = typer.Option(1, "--workers", min=0, help="Processes that render the training videos."),
    threads: int = typer.Option(1, "--threads", min=1, help="Torch threads of the training process."),
    seed: int = typer.Option(0, "--seed", help="Seeds the initial weights and the training videos."),
    jitter: float = typer.Option(0.1, "--jitter", min=0.0, max=0.5,
                                 help="Half of the training videos wobble per frame by up to this much (size, "
                                      "and place in radii); 0 trains on exact renders only."),
    grid_blur: float = typer.Option(0.0, "--grid-blur", min=0.0, max=1.0,
                                    help="Half of the training videos are blended by up to this much with a copy "
                                         "rebuilt from their 8x8 block means (a VAE decoder's blur); 0 (the "
                                         "bundled judge): none. See docs/results/judge.md before using it."),
    export: Path = typer.Option(None, "--export", help="Also write the float16 judge here (the bundled copy)."),
) -> None:
    """Train the judge on real ShapesWorld videos (train split, every style); resumes from the last checkpoint."""
    import torch

    from ..eval.judge import export_judge
    from ..eval.judge import train_judge as train
    from ..training.trainer import TrainConfig

    torch.set_num_threads(threads)
    config = TrainConfig(output_dir=str(output_dir), max_steps=steps, batch_size=batch_size,
                         learning_rate=learning_rate, weight_decay=1e-4, warmup_steps=warmup, grad_clip=0.0,
                         save_every=save_every, log_every=25, seed=seed)
    judge = train(config, eval_videos, workers, jitter, grid_blur)
    if export is not None:
        export_judge(judge, export)
    for key, table in judge.config.calibration.items():
        if key.startswith("accuracy_"):
            typer.echo(f"{key.removeprefix('accuracy_')}: " + "  ".join(f"{k} {v:.4f}" for k, v in table.items()))
    typer.echo(f"FVD-nano of noise videos: {judge.config.calibration['fvd_noise']:.2f}; judge in {output_dir}/judge"
               + (f" and {export}" if export is not None else ""))
