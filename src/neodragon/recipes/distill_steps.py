"""`neodragon distill steps`: pyramidal DMD (Neodragon's recipe 4). The checkpoint's multistep DiT is the frozen
real score and the starting point of both the generator and the fake score; the result is the same folder with
the generator as its DiT, sampled 1-1-1 without CFG by default (4-4-4 with ``--steps 4``)."""

from __future__ import annotations

import copy
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import set_seed

from ..models.mmdit import PyramidMMDiT
from ..pipelines.neodragon import SUBFOLDERS, ModeDefaults, PipelineConfig
from ..training.dmd import DMDConfig, dmd_losses
from ..training.flow_matching import FlowMatchingConfig, flow_matching_batches
from ..training.latents import CaptionEncodings, LatentCache, PipelineConditioning
from ..training.trainer import TrainConfig, Trainer, cpu_only
from .prune import copy_with_dit, dit_checkpoint, monolithic_pipeline

RECORD_FILE = "step_distillation.json"
HYBRID_RECORD_FILE = "hybrid_distillation.json"


def distill_steps(config: TrainConfig, teacher: str | Path, latents_dir: str | Path | list[str | Path],
                  dmd: DMDConfig | None = None, objective: FlowMatchingConfig | None = None) -> Path:
    """Train the one-step-per-stage generator on cached latents (their captions are the prompts, their frames the
    history and the regression targets); writes ``final/`` (the generator) and ``checkpoint/``. The real score's
    guidance is the teacher's own monolithic CFG scales where ``dmd`` leaves it None (and without ``dmd``)."""
    folder = dit_checkpoint(teacher)
    pipe = monolithic_pipeline(folder)
    defaults = pipe.pipeline_config.modes["monolithic"]
    dmd = dmd or DMDConfig(guidance_scale=None, video_guidance_scale=None)
    dmd = replace(dmd, guidance_scale=defaults.guidance_scale if dmd.guidance_scale is None else dmd.guidance_scale,
                  video_guidance_scale=defaults.video_guidance_scale if dmd.video_guidance_scale is None
                  else dmd.video_guidance_scale)
    objective = replace(objective or FlowMatchingConfig(), text_dropout=0.0,
                        history_corruption=dmd.history_corruption)
    set_seed(config.seed)
    device = PartialState(cpu=cpu_only()).device
    cache = LatentCache(latents_dir).to(device)
    negative = pipe.pipeline_config.negative_prompt
    text = CaptionEncodings(PipelineConditioning(pipe.to(device)), cache.captions + [negative])
    real_score = pipe.transformer.eval().requires_grad_(False)  # fp32, as monolithic_pipeline loads it
    generator, fake_score = copy.deepcopy(real_score).train(), copy.deepcopy(real_score).train()
    for module in (generator, fake_score):
        module.requires_grad_(True)
    flow_batches = flow_matching_batches(cache, text, config, objective, pipe.scheduler.config.stages)

    def batch_fn(step: int, rank: int, world: int) -> dict:
        batch = flow_batches(step, rank, world)
        return {**batch, "uncond": text.encode([negative] * batch["latents"].shape[0]), "role": dmd.role(step)}

    def loss_fn(batch: dict) -> dict:
        return dmd_losses(trainer.modules["generator"], trainer.modules["fake"], real_score, pipe.scheduler, batch,
                          dmd, batch["role"])

    trainer = Trainer(config, {"generator": generator, "fake": fake_score}, batch_fn, loss_fn)
    trainer.resume()
    trainer.fit()
    out = Path(config.output_dir)
    with trainer.averaged_weights():
        trainer.save_model("generator", out / "final")
    if trainer.accelerator.is_main_process:
        export_distilled(folder, out / "final", out / "checkpoint",
                         {"teacher": str(teacher), "steps": trainer.step, "dmd": asdict(dmd)})
    trainer.accelerator.wait_for_everyone()
    return out / "checkpoint"


def export_distilled(teacher: Path, dit_dir: Path, out: Path, record: dict) -> Path:
    """``teacher``'s folder with the distilled DiT (in the teacher's stored dtype) in place of its multistep DiT and
    monolithic 1-1-1 sampling without CFG as its default (frame 0 included), plus ``step_distillation.json``. A
    release-layout folder keeps its own hybrid-mode DiT."""
    config = PipelineConfig.load(teacher)
    one_step = replace(config.modes["monolithic"], num_inference_steps=[1, 1, 1], video_num_inference_steps=[1, 1, 1],
                       guidance_scale=0.0, video_guidance_scale=0.0)
    config = replace(config, default_mode="monolithic", modes={**config.modes, "monolithic": one_step})
    return copy_with_dit(teacher, PyramidMMDiT.from_pretrained(dit_dir), out, {RECORD_FILE: record}, pipeline=config)


def export_hybrid_distilled(teacher: str | Path, dit_dir: str | Path, out: str | Path, first_frame_steps: int = 20,
                            first_frame_guidance: float | None = None) -> Path:
    """The release's two-DiT layout: ``teacher``'s folder, whose multistep pair makes frame 0 (``first_frame:
    pyramid_dit``, ``first_frame_steps`` per stage with CFG ``first_frame_guidance``, by default the teacher's
    frame-0 scale), with the distilled DiT of ``dit_dir`` as the hybrid pair, 1-1-1 without CFG from frame 1, and
    hybrid mode as the default. The DMD generator was trained on the teacher's ContextAdapter, so the hybrid pair
    gets a copy of it."""
    folder = dit_checkpoint(teacher)
    config = PipelineConfig.load(folder)
    frame0 = config.modes["monolithic"]
    guidance = frame0.guidance_scale if first_frame_guidance is None else first_frame_guidance
    modes = {"hybrid": ModeDefaults([1, 1, 1], [1, 1, 1], 0.0, 0.0),
             "monolithic": replace(frame0, num_inference_steps=[first_frame_steps] * 3, guidance_scale=guidance)}
    config = replace(config, default_mode="hybrid", first_frame="pyramid_dit", hybrid_dit="distilled", modes=modes)
    adapter = folder / SUBFOLDERS["monolithic", "context_adapter"]
    hybrid_pair = (SUBFOLDERS["hybrid", "transformer"], SUBFOLDERS["hybrid", "context_adapter"])
    record = {"teacher": str(teacher), "generator": str(dit_dir), "first_frame_steps": first_frame_steps,
              "first_frame_guidance": guidance}
    return copy_with_dit(folder, PyramidMMDiT.from_pretrained(dit_dir), Path(out), {HYBRID_RECORD_FILE: record},
                         ignore=shutil.ignore_patterns(*hybrid_pair), pipeline=config, subfolder=hybrid_pair[0],
                         copies={hybrid_pair[1]: adapter} if adapter.is_dir() else None)
