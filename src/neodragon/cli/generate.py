"""``neodragon generate``: a video from a text prompt, written as an mp4 (and optionally a preview)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from .errors import check_new_output, check_weight_files, console, fail, warn

if TYPE_CHECKING:
    from ..pipelines import NeodragonPipeline
    from ..pipelines.batch import BatchJob, Ranks

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def parse_steps(value: str | None, option: str = "--steps") -> int | list[int] | None:
    """``"4"`` -> 4, ``"20,20,20"`` -> [20, 20, 20]; None stays None; anything else ends the command."""
    if value is None:
        return None
    try:
        steps = [int(v) for v in value.split(",")]
    except ValueError:
        fail(f"{option} takes an int or one int per pyramid stage such as 20,20,20; got {value!r}.")
    if any(s < 1 for s in steps):
        fail(f"{option} must be at least 1 step per stage; got {value!r}.")
    return steps[0] if len(steps) == 1 else steps


def quiet_loading() -> None:
    """Per-file loading bars of transformers/diffusers would drown the generation progress bar."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def checkpoint_root(model: str) -> Path | None:
    """The local folder ``model`` loads from; None for a preset without bundled weights."""
    from ..pipelines.neodragon import resolve_checkpoint
    from ..presets import PRESETS, bundled_weights

    return bundled_weights(model) if model in PRESETS else resolve_checkpoint(model)


def local_checkpoint(model: str) -> Path | None:
    """The folder ``model`` names when it is a preset's bundled weights or a local folder; None otherwise (a hub
    id is not downloaded here)."""
    from ..presets import PRESETS, bundled_weights

    if model in PRESETS:
        return bundled_weights(model)
    path = Path(model).expanduser()
    return path if path.is_dir() else None


def show_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for a command: the library's warnings about the user's input (a truncated prompt,
    random or mismatched weights) as ``warning:`` lines as they happen; other libraries' warnings are dropped."""
    text = str(message)
    if issubclass(category, UserWarning) and any(word in text for word in ("weights", "tokens", "prompt")):
        warn(text)


def generate(
    prompt: str = typer.Argument(None, metavar="PROMPT", show_default=False, help="What the video shows, e.g. 'a "
                                 "red circle moving to the right'. Leave it out with --prompts-file."),
    prompts_file: Path = typer.Option(None, "--prompts-file", metavar="FILE", exists=True, dir_okay=False,
                                      help="Make one video per line of FILE into the -o folder, with a manifest.jsonl "
                                      "of what was written: a line is a prompt, or a JSON object (every line of a "
                                      ".jsonl file, and any line starting with {) with \"prompt\" and optionally "
                                      "\"seed\", \"name\" (the file name without .mp4) and any of num_frames, "
                                      "steps, video_steps, guidance, video_guidance, negative_prompt. Blank lines "
                                      "are errors. Videos already there are skipped, so a rerun resumes. Under "
                                      "accelerate launch or torchrun the processes share the prompts and make the "
                                      "same videos."),
    output: Path = typer.Option(None, "-o", "--output", show_default=False, help="Where to write the mp4 (default: "
                                "out.mp4); with --prompts-file, the folder for the videos and the manifest "
                                "(default: videos)."),
    model: str = typer.Option("nano", "--model", help="A preset ('nano', the bundled default; see `neodragon info`), "
                              "a checkpoint folder, or a hub id."),
    mode: str = typer.Option(None, "--mode", help="hybrid or monolithic (default: the model's)."),
    num_frames: int = typer.Option(None, "--num-frames", help="1 + 8k frames (default: the model's)."),
    height: int = typer.Option(None, "--height", help="Video height in pixels, a multiple of 64 (default: the "
                               "model's)."),
    width: int = typer.Option(None, "--width", help="Video width in pixels, a multiple of 64 (default: the model's)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same video. With --prompts-file, a line without its own "
                             "seed gets this seed plus its line number minus 1."),
    steps: str = typer.Option(None, "--steps", help="Steps per pyramid stage for every frame, e.g. 20,20,20 or 4 "
                              "(default: the model's)."),
    video_steps: str = typer.Option(None, "--video-steps", help="Steps per stage for the frames after the first "
                                    "(default: --steps, else the model's)."),
    guidance: float = typer.Option(None, "--guidance", help="CFG scale for every frame (> 1 enables CFG) (default: "
                                   "the model's)."),
    video_guidance: float = typer.Option(None, "--video-guidance", help="CFG scale for the frames after the first "
                                         "(default: --guidance, else the model's)."),
    negative_prompt: str = typer.Option(None, "--negative-prompt", help="What CFG steers away from (default: the "
                                        "model's)."),
    sr: bool = typer.Option(None, "--sr/--no-sr", show_default=False, help="Upscale the frames 2x with the model's "
                            "super-resolution network (its super_resolution/ folder; the bundled nano model has one: "
                            "128x128 -> 256x256) (default: on when the model has one)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps ... (cuda under several processes: "
                               "each process's own GPU)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    fps: int = typer.Option(None, "--fps", min=1, help="Frames per second of the mp4 (default: the model's)."),
    preview: Path = typer.Option(None, "--preview", help="Also write a contact sheet (.png) or animation (.gif)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files (with --prompts-file: "
                                   "remake the videos already there instead of skipping them)."),
    backend: str = typer.Option("pytorch", "--backend", help="pytorch, or onnxruntime for a folder from `neodragon "
                                "deploy export` / `deploy quantize` (its fp32 or W8A16 graphs, on the CPU)."),
    adapter: list[str] = typer.Option(None, "--adapter", metavar="FOLDER|NAME",
                                      help="A trained adapter folder (the final/ of `neodragon adapter train`) or "
                                      "the name of one the model ships (`neodragon info`); repeat to apply several "
                                      "together."),
) -> None:
    """Generate a video from a text prompt and write it as an mp4, or one video per line of a prompts file.

    With --prompts-file FILE -o DIR, line n of FILE (from 1) becomes DIR/NNNN-its-first-words.mp4 with NNNN = n - 1
    and seed --seed + n - 1, unless the line sets its own "name" or "seed"; DIR/manifest.jsonl lists every video
    (name, prompt, seed, options, written or skipped). Under `torchrun --standalone --nproc_per_node N -m neodragon
    generate ...` or `accelerate launch --num_processes N -m neodragon generate ...` the N processes share the
    lines and make the same videos as one process.
    """
    started = time.perf_counter()
    if prompts_file is not None:
        if prompt is not None:
            fail("give a PROMPT or --prompts-file, not both.", code=2)
        _check_batch_flags(output, preview, dtype)
        settings = {"num_frames": num_frames, "height": height, "width": width, "steps": parse_steps(steps),
                    "video_steps": parse_steps(video_steps, "--video-steps"), "guidance": guidance,
                    "video_guidance": video_guidance, "negative_prompt": negative_prompt, "sr": sr}
        folder = output or Path("videos")
        jobs = _read_jobs(prompts_file, folder, seed)
        check_weight_files(local_checkpoint(model))
        _generate_batch(jobs, prompts_file, folder, settings, fps, overwrite, started,
                        lambda ranks: load_model(model, mode, dtype, ranks.device(device), backend, adapter))
        return
    if prompt is None:
        fail("Missing argument 'PROMPT': give a prompt, e.g. 'a red circle moving to the right', or --prompts-file "
             "FILE (see 'neodragon generate --help').", code=2)
    output = output or Path("out.mp4")
    if not prompt.strip():
        fail("the prompt must be non-empty text, e.g. 'a red circle moving to the right'.")
    if output.suffix.lower() != ".mp4":
        fail(f"--output must end with .mp4; got {output}")
    if preview is not None and preview.suffix.lower() not in (".png", ".gif"):
        fail(f"--preview must end with .png or .gif; got {preview}")
    for path in (output, preview):
        check_new_output(path, overwrite)
    if dtype not in DTYPES:
        fail(f"--dtype must be one of {', '.join(sorted(set(DTYPES)))}; got {dtype!r}")
    step_list, video_step_list = parse_steps(steps), parse_steps(video_steps, "--video-steps")
    check_weight_files(local_checkpoint(model))

    import torch

    from ..utils.video import export_to_video, save_preview

    quiet_loading()
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = show_warnings  # restored when the block ends
        pipe = load_model(model, mode, dtype, device, backend, adapter)
        sr = use_super_resolution(pipe, sr)
        generation_started = time.perf_counter()
        frames = pipe(
            prompt, num_frames=num_frames, height=height, width=width, num_inference_steps=step_list,
            video_num_inference_steps=video_step_list, guidance_scale=guidance,
            video_guidance_scale=video_guidance, negative_prompt=negative_prompt, super_resolution=sr,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).frames[0]
        generation_s = time.perf_counter() - generation_started
    fps = fps or pipe.pipeline_config.fps
    export_to_video(frames, output, fps=fps, overwrite=overwrite)
    if preview is not None:
        save_preview(frames, preview, fps=fps, overwrite=overwrite)
    width_px, height_px = frames[0].size
    written = f"{output} and {preview}" if preview is not None else str(output)
    count = f"{len(frames)} frame" + ("s" if len(frames) != 1 else "")
    console.print(f"wrote {written}: {count}, {width_px}x{height_px} at {fps} fps, {pipe.mode} mode, seed {seed}, "
                  f"generation {generation_s:.1f} s, whole command {time.perf_counter() - started:.1f} s",
                  highlight=False, markup=False, soft_wrap=True)


def use_super_resolution(pipe: NeodragonPipeline, sr: bool | None) -> bool:
    """Whether to upscale: ``--sr`` / ``--no-sr`` as given, else when the model has a super-resolution network; ends
    the command when ``--sr`` asks for one the model lacks."""
    if sr and pipe.super_resolution is None:
        fail("--sr: this model has no super-resolution network (no super_resolution/ folder); leave out --sr, or "
             "add one with `neodragon train sr`.")
    return pipe.super_resolution is not None if sr is None else sr


def load_model(model: str, mode: str | None, dtype: str, device: str, backend: str = "pytorch",
               adapters: list[str] | None = None) -> NeodragonPipeline:
    """The pipeline of ``model`` on ``backend``; ends the command with a clear message on a bad combination."""
    import torch

    from ..deploy.runtime import is_exported_folder, load_onnx_pipeline
    from ..presets import load_pipeline

    if backend not in ("pytorch", "onnxruntime"):
        fail(f"--backend must be pytorch or onnxruntime; got {backend!r}.")
    exported = is_exported_folder(model)
    if backend == "pytorch" and exported:
        fail(f"{model} holds exported ONNX graphs (manifest.json); run it with --backend onnxruntime.")
    if backend == "pytorch":
        pipe = load_pipeline(model, mode=mode, torch_dtype=getattr(torch, DTYPES[dtype]))
        if adapters:
            _attach_adapters(pipe, model, adapters)
        return pipe.to(device)
    if not exported:
        fail(f"--backend onnxruntime runs a folder from `neodragon deploy export` (with manifest.json); {model} is "
             f"not one. Export it first: neodragon deploy export {model} -o DIR.")
    if adapters or device != "cpu" or DTYPES[dtype] != "float32":
        fail("--backend onnxruntime runs the exported graphs as they are, on the CPU: leave out --adapter (fuse "
             "adapters before exporting), --device and --dtype.")
    try:
        pipe = load_onnx_pipeline(model)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    if mode is not None and mode != pipe.mode:
        fail(f"{model} was exported in {pipe.mode} mode; leave out --mode {mode} or export that mode.")
    return pipe


def _check_batch_flags(output: Path | None, preview: Path | None, dtype: str) -> None:
    if output is not None and output.suffix.lower() == ".mp4":
        fail(f"with --prompts-file, -o names the folder for the videos; got {output}")
    if preview is not None:
        fail("--preview is for one prompt; leave it out with --prompts-file.")
    if dtype not in DTYPES:
        fail(f"--dtype must be one of {', '.join(sorted(set(DTYPES)))}; got {dtype!r}")


def _read_jobs(prompts_file: Path, folder: Path, seed: int) -> list[BatchJob]:
    from ..pipelines.batch import MANIFEST, read_prompts_file

    check_new_output(folder / MANIFEST, overwrite=True)  # the folder can hold new files
    try:
        return read_prompts_file(prompts_file, seed)
    except ValueError as err:
        fail(str(err))


def _generate_batch(jobs: list[BatchJob], prompts_file: Path, folder: Path, settings: dict, fps: int | None,
                    overwrite: bool, started: float, load: Callable[[Ranks], NeodragonPipeline]) -> None:
    """One video per job into ``folder``: this process's share of them, and on rank 0 the manifest of all of them
    once every process is done."""
    from ..pipelines.batch import Ranks, check_jobs, gather_records, generate_jobs, process_group, shard, write_manifest

    ranks = Ranks.from_env()
    quiet_loading()
    with warnings.catch_warnings():
        if ranks.rank == 0:
            warnings.simplefilter("always", UserWarning)
            warnings.showwarning = show_warnings
        else:
            warnings.simplefilter("ignore", UserWarning)  # every rank checks every line; rank 0 says it once
        pipe = load(ranks)
        # recorded in the manifest only when the frames are upscaled (a batch without SR lists no "sr")
        settings = {**settings, "sr": True if use_super_resolution(pipe, settings.get("sr")) else None}
        try:
            check_jobs(pipe, jobs, settings, prompts_file)
        except ValueError as err:
            fail(str(err))
    with process_group(ranks):
        records = generate_jobs(pipe, shard(jobs, ranks.rank, ranks.world_size), folder, settings,
                                fps or pipe.pipeline_config.fps, overwrite, progress=ranks.rank == 0)
        records = gather_records(records, ranks)
    if records is None:
        return
    manifest = write_manifest(folder, records)
    made = sum(record["status"] == "written" for record in records)
    processes = f"{ranks.world_size} process" + ("es" if ranks.world_size != 1 else "")
    console.print(f"wrote {made} of {len(records)} videos into {folder} ({len(records) - made} already there, "
                  f"skipped) and {manifest}: {pipe.mode} mode, {processes}, whole command "
                  f"{time.perf_counter() - started:.1f} s", highlight=False, markup=False, soft_wrap=True)


def _attach_adapters(pipe, model: str, adapters: list[str]) -> None:
    from ..adapters.loading import attach_trained_adapters, find_adapter

    try:
        attach_trained_adapters(pipe, [find_adapter(a, checkpoint_root(model)) for a in adapters])
    except RuntimeError as err:  # PEFT's state-dict size mismatch
        fail(f"an adapter does not fit this model ({str(err).splitlines()[0]}); use adapters trained for "
             f"--model {model}.")
