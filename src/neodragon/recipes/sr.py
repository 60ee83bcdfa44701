"""`neodragon train sr`: a QuickSRNet 2x super-resolution model trained to upscale what a VAE decodes, on pairs of
decoded low-resolution frames and real high-resolution frames (``training/sr.py``). Writes ``final/`` (the model,
float32, with ``metrics.json``) and, when the VAE comes from a checkpoint folder or a preset, ``checkpoint/``: that
folder with the model added as ``super_resolution/`` (float16), which `neodragon generate` then uses by default."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate.utils import set_seed

from ..eval.upscaling import upscaler_quality
from ..models.sr import QuickSRNet
from ..pipelines.neodragon import SUBFOLDERS
from ..presets import checkpoint_folder, load_video_vae
from ..training.sr import (
    PairStore,
    SRObjective,
    build_folder_pairs,
    build_shapes_world_pairs,
    folder_pairs,
    list_videos,
    read_video,
    shapes_world_pairs,
    video_clips,
)
from ..training.trainer import TrainConfig, Trainer, make_accelerator
from ..utils.checkpoint import strip_machine_paths
from ..utils.video import atomic_path

PAIRS = "pairs"


def train_sr(config: TrainConfig, teacher: str | Path = "nano", size: str = "small", anchor: bool | None = None,
             edge_weight: float = 0.0, crop: int | None = 48, num_frames: int = 17, lr_size: int = 128,
             pair_videos: int = 256, styles: Sequence[str] = ("none",), pairs_dir: str | Path | None = None,
             videos_dir: str | Path | None = None, degradation: str = "vae", eval_videos: int = 16,
             eval_videos_dir: str | Path | None = None) -> dict:
    """Train a QuickSRNet of family member ``size`` (``anchor`` overrides whether it has the input-to-output anchor;
    None keeps the member's own) for the VAE of ``teacher``.

    The pairs come from ShapesWorld (``pair_videos`` training videos at ``lr_size``, the VAE round trip of each
    against its render at twice the size) or, with ``videos_dir``, from the user's videos (``degradation``: "vae" or
    "bicubic"); they are made once, before the clock of ``max_minutes`` starts, into ``pairs_dir`` (default: the run
    folder's ``pairs/``; another run may share it). ``metrics.json`` holds PSNR and SSIM of the model, bicubic and
    nearest upscaling on held-out videos: ``eval_videos`` videos of ShapesWorld's ``eval`` split, or with
    ``videos_dir`` the videos of ``eval_videos_dir`` (none without it)."""
    set_seed(config.seed)  # before the model is built: the same seed gives the same initial weights
    overrides = {} if anchor is None else {"use_ito_connection": anchor}
    model = QuickSRNet.variant(size, **overrides)
    accelerator = make_accelerator(config.mixed_precision)
    vae = load_video_vae(teacher).float().eval() if videos_dir is None or degradation == "vae" else None
    pairs = Path(pairs_dir) if pairs_dir is not None else Path(config.output_dir) / PAIRS
    rank, world = accelerator.process_index, accelerator.num_processes
    progress = accelerator.is_local_main_process
    if videos_dir is None:
        build_shapes_world_pairs(pairs, vae, pair_videos, num_frames, lr_size, config.seed, styles,
                                 model.config.scale_factor, rank, world, progress)
    else:
        build_folder_pairs(pairs, videos_dir, vae, num_frames, degradation, model.config.scale_factor, rank, world,
                           progress)
    accelerator.wait_for_everyone()
    store = PairStore(pairs)

    def batch_fn(step: int, process: int, _world: int) -> dict:
        return store.batch(step, process, config.batch_size, crop, config.seed)

    trainer = Trainer(config, {"objective": SRObjective(model, edge_weight)}, batch_fn,
                      lambda batch: trainer.modules["objective"](batch["lr"], batch["hr"]), accelerator=accelerator)
    trainer.resume()
    trainer.fit()
    metrics: dict = {}
    if accelerator.is_main_process:
        trained = trainer.unwrap("objective").model.eval()
        metrics = {"size": size, "anchor": trained.config.use_ito_connection,
                   "parameters": sum(p.numel() for p in trained.parameters()),
                   "scale": trained.config.scale_factor, "pairs": str(pairs), "training_frames": len(store),
                   "steps": trainer.step,
                   **_held_out(trained, vae, videos_dir, eval_videos_dir, degradation, eval_videos, num_frames,
                               lr_size, config.seed, styles)}
        output = Path(config.output_dir)
        final = save_model(trained, output / "final")
        _write_text(final / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        source = checkpoint_folder(teacher)
        if source is not None:
            export_with_super_resolution(source, final, output / "checkpoint")
    accelerator.wait_for_everyone()
    return metrics


@torch.no_grad()
def _held_out(model: QuickSRNet, vae, videos_dir, eval_videos_dir, degradation: str, count: int, num_frames: int,
              lr_size: int, seed: int, styles: Sequence[str]) -> dict:
    if videos_dir is None:
        if count < 1:
            return {}
        low, high, _ = shapes_world_pairs(vae, "eval", range(count), num_frames, lr_size, seed, styles,
                                          model.config.scale_factor)
        source = f"{count} ShapesWorld eval videos, styles {', '.join(styles)}"
    elif eval_videos_dir is not None:
        clips = [folder_pairs(vae, video_clips(read_video(path), num_frames), degradation, model.config.scale_factor)
                 for path in list_videos(eval_videos_dir)]
        by_size: dict = {}
        for low, high, _ in clips:  # clips of one size are scored together
            by_size.setdefault(tuple(high.shape[-2:]), []).append((low, high))
        scores = [(len(group), upscaler_quality(torch.cat([g[0] for g in group]), torch.cat([g[1] for g in group]),
                                                {"sr": model})) for group in by_size.values()]
        total = sum(n for n, _ in scores)
        merged = {name: {key: sum(n * s[name][key] for n, s in scores) / total for key in scores[0][1][name]}
                  for name in scores[0][1]}
        return {"held_out": f"the videos of {eval_videos_dir}", "quality": merged}
    else:
        return {"held_out": "none (pass --eval-videos-dir)"}
    return {"held_out": source, "quality": upscaler_quality(low, high, {"sr": model})}


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(text)


def _replace_folder(build: Path, target: Path) -> Path:
    """Move the finished folder ``build`` to ``target``, replacing an older one."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(build, 0o777 & ~umask)  # mkdtemp makes 0700; give the folder ordinary permissions
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(build, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(build, target)
    return target


def save_model(model: QuickSRNet, folder: str | Path) -> Path:
    """``model`` saved as ``folder``, whole or not at all."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    model.save_pretrained(build)
    strip_machine_paths(build)
    return _replace_folder(build, folder)


def export_with_super_resolution(checkpoint: str | Path, sr_dir: str | Path, out_dir: str | Path,
                                 dtype: torch.dtype = torch.float16) -> Path:
    """``checkpoint`` copied to ``out_dir`` with the QuickSRNet of ``sr_dir`` (cast to ``dtype``) as its
    ``super_resolution/`` (replacing one it has)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    shutil.rmtree(build)
    shutil.copytree(checkpoint, build, ignore=lambda folder, names: [
        n for n in names if Path(folder) == Path(checkpoint) and n == SUBFOLDERS["super_resolution"]])
    QuickSRNet.from_pretrained(sr_dir, torch_dtype=dtype).save_pretrained(build / SUBFOLDERS["super_resolution"])
    strip_machine_paths(build)
    return _replace_folder(build, out)
