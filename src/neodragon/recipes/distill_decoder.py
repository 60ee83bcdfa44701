"""`neodragon distill decoder`: asymmetric decoder distillation (Neodragon's recipe 2). A TAEHV-style decoder,
lighter than the teacher's, learns to decode the teacher VAE's frozen latent space; the result is the teacher's
checkpoint folder with the new VAE in ``causal_video_vae/``, which the teacher's DiT drives unchanged."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate.utils import set_seed

from ..eval.reconstruction import reconstruction_psnr
from ..models.vae import AsymmetricCausalVideoVAE
from ..pipelines.neodragon import SUBFOLDERS
from ..presets import checkpoint_folder, load_video_vae
from ..training.clips import clip_batch, video_batch
from ..training.decoder_distillation import DecoderDistillation, can_cut, student_vae
from ..training.trainer import TrainConfig, Trainer, cycle_indices
from ..training.vae import VAELossWeights
from ..utils.checkpoint import strip_machine_paths

# Folders of the teacher's checkpoint that the new decoder does not fit: decoder adapters are trained on the
# teacher's decoder layers, whose widths the student does not share (they are retrained for it).
NOT_COPIED = ("adapters", SUBFOLDERS["vae"])


def distill_decoder(config: TrainConfig, teacher: str | Path, decoder_num_features: Sequence[int],
                    weights: VAELossWeights | None = None, teacher_weight: float = 1.0, num_frames: int = 17,
                    size: int = 128, crop: int | None = 48, styles: Sequence[str] = ("none",),
                    eval_videos: int = 32, inherit: bool | None = None) -> dict:
    """Train the student decoder on ShapesWorld clips (cropped around the objects, as `train vae` does), then write
    ``final/`` (the student VAE, with ``metrics.json``: held-out PSNR of student and teacher) and, when ``teacher``
    is a checkpoint folder or a preset, ``checkpoint/``: that folder with the student VAE in fp16. ``inherit``
    starts the student decoder as a cut of the teacher's (``inherit_decoder``) instead of fresh; None does so
    whenever the teacher's decoder can be cut to these widths."""
    set_seed(config.seed)  # before the student is built: the same seed gives the same initial decoder
    teacher_vae = load_video_vae(teacher).float()
    inherit = can_cut(teacher_vae, decoder_num_features) if inherit is None else inherit
    student = student_vae(teacher_vae, decoder_num_features, inherit)

    def batch_fn(step: int, rank: int, world: int) -> dict:
        videos, coverage, _ = clip_batch("train", cycle_indices(step, rank, world, config.batch_size), num_frames,
                                         size, crop, config.seed, styles)
        return {"video": videos, "coverage": coverage}

    objective = DecoderDistillation(student, teacher_vae, weights, teacher_weight)
    trainer = Trainer(config, {"objective": objective}, batch_fn,
                      lambda batch: trainer.modules["objective"](batch["video"], batch["coverage"]))
    trainer.resume()
    trainer.fit()
    metrics = {}
    if trainer.accelerator.is_main_process:
        distilled = trainer.unwrap("objective")
        metrics = _held_out_psnr(distilled.student.eval(), distilled.teacher, eval_videos, size, config.seed)
        metrics["init"] = "teacher" if inherit else "random"
        final = Path(config.output_dir) / "final"
        distilled.student.save_pretrained(final)
        (final / "metrics.json").write_text(json.dumps(metrics, indent=2))
        source = checkpoint_folder(teacher)
        if source is not None:
            export_with_decoder(source, final, Path(config.output_dir) / "checkpoint")
    trainer.accelerator.wait_for_everyone()
    return metrics


def _held_out_psnr(student, teacher, count: int, size: int, seed: int) -> dict:
    videos, _ = video_batch("eval", range(count), 17, size, seed=seed)
    return {"eval_videos": count, "student_psnr_db": reconstruction_psnr(student, videos),
            "teacher_psnr_db": reconstruction_psnr(teacher, videos),
            "student_decoder_parameters": sum(p.numel() for p in student.decoder.parameters()),
            "teacher_decoder_parameters": sum(p.numel() for p in teacher.decoder.parameters())}


def export_with_decoder(checkpoint: str | Path, vae_dir: str | Path, out_dir: str | Path,
                        dtype: torch.dtype = torch.float16) -> Path:
    """``checkpoint`` copied to ``out_dir`` with the VAE of ``vae_dir`` (cast to ``dtype``) in its place; the
    teacher's decoder adapters are left out (they do not fit the new decoder)."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(checkpoint, out, ignore=lambda folder, names: [n for n in names if Path(folder) ==
                                                                    Path(checkpoint) and n in NOT_COPIED])
    AsymmetricCausalVideoVAE.from_pretrained(vae_dir, torch_dtype=dtype).save_pretrained(out / SUBFOLDERS["vae"])
    strip_machine_paths(out)
    return out
