"""`neodragon prune importance | apply | recover`: Neodragon's recipe 3 on a checkpoint's multistep DiT.

``importance`` scores every block (two-modality cosine distance over calibration prompts, and the measured cost of
removing it), ``apply`` writes the checkpoint folder without the chosen blocks (``pruning.json`` records which),
and ``recover`` fine-tunes a pruned folder: stage 1 with pyramidal flow matching on ground-truth latents and
corrupted history, stage 2 with feature matching to the unpruned DiT (the paper runs stage 2 after stage 1)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import set_seed
from safetensors import safe_open

from ..eval.judge import load_judge
from ..eval.metrics import evaluate
from ..eval.prompts import load_prompt_set
from ..models.mmdit import PyramidMMDiT
from ..pipelines.neodragon import SUBFOLDERS, NeodragonPipeline, PipelineConfig
from ..presets import checkpoint_folder
from ..training.flow_matching import FlowMatchingConfig, batch_flow_matching_loss, flow_matching_batches
from ..training.latents import CaptionEncodings, LatentCache, PipelineConditioning, encode_latents
from ..training.pruning import (
    HeldOutDraws,
    RecoveryWeights,
    block_mapping,
    importance_probe,
    kept_blocks,
    prune_blocks,
    recovery_loss,
)
from ..training.text_distillation import distillation_prompts
from ..training.trainer import TrainConfig, Trainer, cpu_only
from ..utils.checkpoint import strip_machine_paths
from ..utils.video import atomic_folder, atomic_path

PRUNING_FILE = "pruning.json"
DIT = SUBFOLDERS["monolithic", "transformer"]


def dit_checkpoint(model: str | Path) -> Path:
    folder = checkpoint_folder(model)
    if folder is None or not (folder / DIT).is_dir():
        raise FileNotFoundError(f"{model} is not a checkpoint folder with a multistep DiT ({DIT}/): pruning works "
                                "on a preset with bundled weights or a checkpoint folder.")
    return folder


def monolithic_pipeline(folder: Path) -> NeodragonPipeline:
    pipe = NeodragonPipeline.from_pretrained(folder, mode="monolithic", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- importance -----------------------------------------------------------------------------------------------


def measure_importance(model: str | Path, out_dir: str | Path, prompts: int = 32, samples: int = 2,
                       heldout_videos: int = 64, prompt_set: str | None = "nano-eval", eval_limit: int | None = None,
                       seed: int = 0) -> dict:
    """Score every block of ``model``'s multistep DiT and write ``importance.json`` / ``importance.md``.

    - cosine importance (visual, text) over ``prompts`` calibration prompts from the caption grammar (never the
      evaluation prompts) x ``samples`` seeds, every denoising step of the model's own schedule, both CFG branches;
    - the held-out flow-matching loss of the DiT with each block removed, on ``heldout_videos`` unseen videos
      (paired draws: the same noise for every variant);
    - with ``prompt_set``, VBench-nano of each single-block removal (``eval_limit``: its first N prompts).
    """
    folder = dit_checkpoint(model)
    pipe = monolithic_pipeline(folder)
    dit = pipe.transformer
    exclude = [e.caption for name in ("nano-eval", "nano-heldout") for e in load_prompt_set(name)]
    calibration = distillation_prompts(prompts, seed=seed + 1, exclude=exclude)
    with importance_probe(dit) as scores:
        for index, prompt in enumerate(calibration):
            for sample in range(samples):
                generator = torch.Generator().manual_seed(seed * 100_003 + index * samples + sample)
                pipe(prompt, generator=generator, output_type="latent")
        importance = scores()

    draws = _heldout_draws(pipe, heldout_videos, seed)
    layers = dit.config.num_layers
    variants: dict[str, PyramidMMDiT] = {"none": dit, **{str(b): prune_blocks(dit, [b]) for b in range(layers - 1)}}
    loss = {name: draws.loss(variant, pipe.scheduler) for name, variant in variants.items()}
    vbench = _vbench_per_variant(pipe, variants, prompt_set, eval_limit) if prompt_set else None
    result = {"model": str(model), "num_layers": layers, "calibration": {"prompts": prompts, "samples": samples,
              "dit_calls": importance.calls, "seed": seed}, "heldout_videos": heldout_videos,
              "visual": importance.visual, "text": importance.text, "heldout_loss": loss,
              "vbench": vbench, "vbench_prompt_set": prompt_set, "vbench_limit": eval_limit}
    _write_importance(Path(out_dir), result)
    return result


def _heldout_draws(pipe: NeodragonPipeline, count: int, seed: int) -> HeldOutDraws:
    """Unseen videos of the training distribution (another base seed), encoded by the model's own VAE."""
    with tempfile.TemporaryDirectory() as tmp:
        encode_latents(pipe.vae, tmp, count, seed=10_000 + seed)
        cache = LatentCache(tmp)
    return HeldOutDraws(cache, CaptionEncodings(PipelineConditioning(pipe), cache.captions), seed=seed)


def _vbench_per_variant(pipe: NeodragonPipeline, variants: dict[str, PyramidMMDiT], prompt_set: str,
                        limit: int | None) -> dict[str, dict]:
    entries, judge = load_prompt_set(prompt_set)[:limit], load_judge()
    original, scores = pipe.transformer, {}
    try:
        for name, variant in variants.items():
            pipe.transformer = variant

            def generate(caption: str, seed: int) -> torch.Tensor:
                generator = torch.Generator("cpu").manual_seed(seed)
                return pipe(caption, generator=generator, output_type="pt").frames[0]

            result = evaluate(generate, entries, judge, progress=False)["generated"]
            scores[name] = {"total": result["total"], **result["dimensions"]}
    finally:
        pipe.transformer = original
    return scores


def _write_importance(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "importance.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    with atomic_path(out / "importance.md", overwrite=True) as tmp:
        tmp.write_text(importance_table(result))


def importance_table(result: dict) -> str:
    """The importance result as a markdown table, one row per block (the first row: nothing removed)."""
    vbench = result.get("vbench") or {}
    dims = {"shape": "object_class", "colour": "colour", "motion": "motion", "count": "multiple_objects",
            "relation": "spatial_relationship"}
    head = "| block removed | BI visual | BI text | held-out FM loss |"
    if vbench:
        head += " VBench-nano total | " + " | ".join(dims) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in ["none", *(str(b) for b in range(result["num_layers"] - 1))]:
        index = None if name == "none" else int(name)
        visual = "" if index is None else f"{result['visual'][index]:.5f}"
        text = "" if index is None or result["text"][index] is None else f"{result['text'][index]:.5f}"
        row = f"| {name} | {visual} | {text} | {result['heldout_loss'][name]:.4f} |"
        if vbench:
            scores = vbench[name]
            row += f" {scores['total']:.4f} | " + " | ".join(
                "n/a" if scores.get(key) is None else f"{100 * scores[key]:.1f}%" for key in dims.values()) + " |"
        lines.append(row)
    last = result["num_layers"] - 1  # kept always: the only block that does not update the text
    lines.append(f"| {last} (last, kept) | {result['visual'][last]:.5f} | n/a | n/a |"
                 + " n/a |" * (6 if vbench else 0))
    return "\n".join(lines) + "\n"


# -- apply ----------------------------------------------------------------------------------------------------


def apply_pruning(model: str | Path, drop: Sequence[int], out_dir: str | Path) -> Path:
    """``model``'s checkpoint folder copied to ``out_dir`` with its multistep DiT pruned of ``drop`` (same dtype),
    and ``pruning.json`` (source, dropped and kept teacher blocks). DiT adapters are left out: their layer names
    follow the unpruned block indices."""
    source = dit_checkpoint(model)
    dit = PyramidMMDiT.from_pretrained(source / DIT)
    kept = kept_blocks(dit.config.num_layers, drop)
    record = {"source": str(model), "source_layers": dit.config.num_layers, "dropped": sorted(set(drop)),
              "kept": kept, "recovery": []}
    return copy_with_dit(source, prune_blocks(dit, drop), Path(out_dir), {PRUNING_FILE: record},
                         ignore=_without_dit_adapters(source))


def copy_with_dit(source: Path, dit: PyramidMMDiT, out: Path, records: dict[str, dict],
                  ignore: Callable[[str, list[str]], list[str]] | None = None,
                  pipeline: PipelineConfig | None = None, subfolder: str = DIT,
                  copies: dict[str, Path] | None = None) -> Path:
    """``source`` copied to ``out`` with ``dit`` as its DiT in ``subfolder`` (by default the multistep one; in the
    dtype ``source`` stores its multistep DiT in), the folders of ``copies`` copied in under their names, each of
    ``records`` written as a JSON file and, if given, another ``pipeline`` config; written atomically
    (``atomic_folder``), so an interrupted write leaves no half-written checkpoint."""
    with atomic_folder(out, overwrite=True) as tmp:
        shutil.copytree(source, tmp, ignore=ignore, dirs_exist_ok=True)
        shutil.rmtree(tmp / subfolder, ignore_errors=True)
        dit.to(stored_dtype(source / DIT)).save_pretrained(tmp / subfolder)
        for name, folder in (copies or {}).items():
            shutil.rmtree(tmp / name, ignore_errors=True)
            shutil.copytree(folder, tmp / name)
        for name, record in records.items():
            (tmp / name).write_text(json.dumps(record, indent=1) + "\n")
        if pipeline is not None:
            pipeline.save(tmp)
        strip_machine_paths(tmp)
    return out


def stored_dtype(model_dir: Path) -> torch.dtype:
    """The dtype a model folder's weights are stored in (``from_pretrained`` loads them as fp32)."""
    with safe_open(str(model_dir / "diffusion_pytorch_model.safetensors"), framework="pt") as handle:
        return handle.get_tensor(next(iter(handle.keys()))).dtype


def _without_dit_adapters(root: Path) -> Callable[[str, list[str]], list[str]]:
    def ignore(folder: str, names: list[str]) -> list[str]:
        if Path(folder).parent != root / "adapters":
            return []
        info = Path(folder) / "adapter.json"
        component = json.loads(info.read_text()).get("component") if info.is_file() else None
        return names if component == "transformer" else []
    return ignore


def read_pruning(folder: str | Path) -> dict:
    """``pruning.json`` of a pruned checkpoint folder."""
    path = Path(folder) / PRUNING_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {PRUNING_FILE}: `neodragon prune recover` takes the folder "
                                "written by `neodragon prune apply` (or by an earlier recovery stage).")
    return json.loads(path.read_text())


# -- recovery -------------------------------------------------------------------------------------------------


def recover(config: TrainConfig, pruned: str | Path, stage: int, latents_dir: str | Path | Sequence[str | Path],
            weights: RecoveryWeights | None = None, mapping: str = "simple",
            objective: FlowMatchingConfig | None = None) -> Path:
    """Fine-tune the DiT of a pruned folder (``apply_pruning``'s, or an earlier stage's ``checkpoint/``).

    Stage 1: pyramidal flow matching on the cached ground-truth latents, history corrupted as in teacher training.
    Stage 2: ``recovery_loss`` against the unpruned DiT named in ``pruning.json`` (``weights``; ``mapping``, see
    ``block_mapping``). Writes ``final/`` (the DiT) and ``checkpoint/`` (the folder with it, in the folder's dtype;
    its ``pruning.json`` lists the stages run). Text conditioning is the folder's own text stack, computed once."""
    if stage not in (1, 2):
        raise ValueError(f"Recovery has stages 1 and 2, got {stage}.")
    folder, objective = Path(pruned), objective or FlowMatchingConfig()
    record = read_pruning(folder)
    set_seed(config.seed)
    pipe = monolithic_pipeline(folder)
    device = PartialState(cpu=cpu_only()).device
    cache = LatentCache(latents_dir).to(device)
    text = CaptionEncodings(PipelineConditioning(pipe.to(device)), cache.captions)
    dit = pipe.transformer.train()
    batches = flow_matching_batches(cache, text, config, objective, pipe.scheduler.config.stages)
    if stage == 1:
        def loss_fn(batch: dict) -> dict:
            return batch_flow_matching_loss(trainer.modules["dit"], pipe.scheduler, batch, objective)
    else:
        teacher = monolithic_pipeline(dit_checkpoint(record["source"])).transformer
        teacher = teacher.to(device).eval().requires_grad_(False)
        if teacher.config.num_layers != record["source_layers"]:
            raise ValueError(f"{record['source']} has {teacher.config.num_layers} blocks, but {folder} was pruned "
                             f"from a {record['source_layers']}-block DiT; pass the folder pruned from it.")
        pairs, weights = block_mapping(record["kept"], record["source_layers"], mapping), weights or RecoveryWeights()

        def loss_fn(batch: dict) -> dict:
            return recovery_loss(trainer.modules["dit"], teacher, pipe.scheduler, batch, pairs, weights,
                                 objective.history_corruption)
    trainer = Trainer(config, {"dit": dit}, batches, loss_fn)
    trainer.resume()
    trainer.fit()
    out = Path(config.output_dir)
    trainer.save_model("dit", out / "final")
    if trainer.accelerator.is_main_process:
        _export_recovered(folder, out / "final", out / "checkpoint", {
            "stage": stage, "steps": trainer.step, "run": out.name,
            **({"mapping": mapping, "weights": vars(weights)} if stage == 2 else {})})
    trainer.accelerator.wait_for_everyone()
    return out / "checkpoint"


def _export_recovered(pruned: Path, dit_dir: Path, out: Path, stage_record: dict) -> None:
    record = read_pruning(pruned)
    record["recovery"] = [*record["recovery"], stage_record]
    copy_with_dit(pruned, PyramidMMDiT.from_pretrained(dit_dir), out, {PRUNING_FILE: record})
