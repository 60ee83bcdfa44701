"""`neodragon distill text-encoder`: prompt-only text-encoder distillation (Neodragon's recipe 1). A DT5 +
ContextAdapter student, with small pooled encoders, learns the conditioning the teacher's frozen DiT receives; the
result is the teacher's checkpoint folder with the student text stack in the release layout (``tokenizer*/``,
``text_encoder*/``, the mode's ``context_adapter*/``) and the DiT without its ``context_embedder``."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..eval.prompts import PROMPT_SETS, load_prompt_set
from ..models.context_adapter import ContextAdapter
from ..models.first_frame import LATENT_UNET_SUBFOLDER
from ..models.text import StudentTextConfig, TextEncoderBundle, TextEncoding, student_text_stack, subset_tokenizer
from ..pipelines.neodragon import SUBFOLDERS, NeodragonPipeline, PipelineConfig
from ..presets import NANO_VOCAB, load_pipeline, local_folder
from ..training.text_distillation import (
    TextDistillation,
    TrajectoryRecorder,
    conditioning_loss,
    distillation_prompts,
    teacher_conditioning,
    without_context_embedder,
)
from ..training.trainer import TrainConfig, Trainer, cycle_indices, make_accelerator
from ..utils.checkpoint import strip_machine_paths

TARGETS_FILE = "teacher_targets.safetensors"
STUDENT_CONFIG = "student_text_config.json"


def distill_text_encoder(config: TrainConfig, teacher: str | Path = "nano", mode: str = "trainable-dt5",
                         student: StudentTextConfig | None = None, num_prompts: int = 20000,
                         init_text_encoder: str | Path | None = None, trajectory_weight: float = 0.0,
                         trajectory_prompts: int = 256, prompts_file: str | Path | None = None,
                         cache_targets: bool = True, pooled_weight: float = 1.0) -> dict:
    """Distil the teacher's text stack into the student on prompts alone: ``num_prompts`` prompts of ShapesWorld's
    caption grammar, or the lines of ``prompts_file`` (never the evaluation prompts). ``cache_targets`` computes
    the teacher's conditioning of every prompt once (fine for the nano corpus); without it the teacher runs on each
    batch (the official scale, where a cache would not fit). Writes ``final/`` (student text stack and
    ContextAdapter, ``metrics.json`` with held-out conditioning errors) and ``checkpoint/`` (the teacher's folder
    with the student in place)."""
    student = student or StudentTextConfig()
    accelerator = make_accelerator(config.mixed_precision)
    set_seed(config.seed)
    pipe = load_pipeline(str(teacher)).to(accelerator.device, torch.float32)
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    prompts = [pipe.pipeline_config.negative_prompt, *_training_prompts(num_prompts, config.seed, prompts_file)]
    length = pipe.text_encoder.max_sequence_length
    if init_text_encoder is not None:  # e.g. the release's DT5, which reads the teacher T5's own tokens
        text = TextEncoderBundle.from_pretrained(init_text_encoder, max_sequence_length=length)
    else:
        tokenizer = subset_tokenizer(_teacher_tokenizer(pipe), [*prompts, *NANO_VOCAB], length)
        text = student_text_stack(tokenizer, pipe.transformer.config.pooled_projection_dim, student, length)
    ids = text.tokenize(prompts)
    dit_width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    adapter = ContextAdapter(**student.adapter_config(dit_width, text.token_dim))
    transformer = without_context_embedder(pipe.transformer).to(accelerator.device) if trajectory_weight else None
    objective = TextDistillation(text, adapter, mode, transformer, trajectory_weight,
                                 train_pooled=init_text_encoder is None, pooled_weight=pooled_weight)
    cached = _teacher_targets(pipe, prompts, output / TARGETS_FILE, accelerator) if cache_targets else None
    bank = _trajectory_bank(pipe, prompts[1 : 1 + trajectory_prompts], config.seed) if trajectory_weight else None

    def rows_of(rows: list[int]) -> dict:
        targets = (TextEncoding(*(getattr(cached, f)[rows] for f in ("tokens", "mask", "pooled"))) if cached
                   is not None else teacher_conditioning(pipe, [prompts[r] for r in rows]))
        return _rows(ids, targets, rows)

    def batch_fn(step: int, rank: int, world: int) -> dict:
        # the negative prompt (what CFG's unconditional branch reads) is in every batch
        rows = [0, *(1 + i % (len(prompts) - 1) for i in cycle_indices(step, rank, world, config.batch_size - 1))]
        if bank is None:
            return rows_of(rows)
        trajectory, extra = _trajectory_rows(bank, step, rank, config)
        trajectory["prompt"] = trajectory["prompt"] + len(rows)  # their prompts follow the batch's own
        return {**rows_of(rows + [1 + i for i in extra]), "trajectory": trajectory}

    trainer = Trainer(config, {"objective": objective}, batch_fn, lambda batch: trainer.modules["objective"](batch),
                      accelerator=accelerator)
    trainer.resume()
    trainer.fit()
    metrics = {}
    if accelerator.is_main_process:
        distilled = trainer.unwrap("objective").eval()
        metrics = _held_out_errors(pipe, distilled)
        metrics.update(_parameter_counts(pipe, distilled), mode=mode, prompts=num_prompts,
                       trajectory_weight=trajectory_weight, pooled_weight=pooled_weight)
        final = output / "final"
        distilled.text.save_pretrained(final)
        distilled.adapter.save_pretrained(final / SUBFOLDERS[pipe.mode, "context_adapter"])
        (final / STUDENT_CONFIG).write_text(student.to_json())
        (final / "metrics.json").write_text(json.dumps(metrics, indent=2))
        export_with_text_encoder(local_folder(teacher), final, output / "checkpoint", pipe.mode)
    accelerator.wait_for_everyone()
    return metrics


def _training_prompts(count: int, seed: int, prompts_file: str | Path | None) -> list[str]:
    """Grammar prompts, or the distinct non-empty lines of ``prompts_file``; never an evaluation prompt."""
    evaluation = {entry.caption for name in PROMPT_SETS for entry in load_prompt_set(name)}
    if prompts_file is None:
        return distillation_prompts(count, seed, evaluation)
    lines = dict.fromkeys(line.strip() for line in Path(prompts_file).read_text().splitlines())
    prompts = [line for line in lines if line and line not in evaluation]
    if not prompts:
        raise ValueError(f"{prompts_file} holds no training prompt (one per line, evaluation prompts left out).")
    return prompts


def _teacher_tokenizer(pipe: NeodragonPipeline):
    tokenizer = getattr(pipe.text_encoder, "tokenizer", None) or getattr(pipe.text_encoder, "token_tokenizer", None)
    if tokenizer is None:
        raise ValueError("The teacher's text stack has no tokenizer to cut the student's from.")
    return tokenizer


def _teacher_targets(pipe: NeodragonPipeline, prompts: list[str], cache: Path, accelerator: Accelerator):
    """The teacher's conditioning of every prompt, computed once per run folder (the main process writes it)."""
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    if accelerator.is_main_process and not cache.is_file():
        targets = teacher_conditioning(pipe, prompts)
        tmp = cache.with_suffix(".tmp")
        save_file({"tokens": targets.tokens.half(), "mask": targets.mask.to(torch.int8),
                   "pooled": targets.pooled.half()}, str(tmp), metadata={"prompts_sha256": digest})
        tmp.rename(cache)
    accelerator.wait_for_everyone()
    with safe_open(str(cache), framework="pt") as handle:
        if handle.metadata().get("prompts_sha256") != digest:
            raise ValueError(f"{cache} holds the targets of other prompts: it belongs to another run; use a new "
                             "--output.")
    stored = load_file(str(cache))
    return TextEncoding(stored["tokens"].float(), stored["mask"].long(), stored["pooled"].float())


def _rows(ids: dict, targets: TextEncoding, rows: list[int]) -> dict:
    index = torch.tensor(rows)
    if not torch.equal(ids["attention_mask"][index].long(), targets.mask.long().cpu()):
        raise ValueError("The student's tokens do not line up with the teacher's on the training prompts: start "
                         "from a text stack whose tokenizer is the teacher's (or cut from it).")
    return {"pooled_ids": [pooled[index] for pooled in ids["pooled_ids"]], "input_ids": ids["input_ids"][index],
            "attention_mask": ids["attention_mask"][index], "target_tokens": targets.tokens,
            "target_pooled": targets.pooled}


@torch.no_grad()
def _trajectory_bank(pipe: NeodragonPipeline, prompts: list[str], seed: int, batch_size: int = 32) -> list[dict]:
    """Per pyramid stage, the frame-0 states the teacher's DiT is called at while sampling ``prompts`` with the
    model's own steps and guidance: latents, timesteps, conditional velocities and the prompt of each."""
    defaults = pipe.pipeline_config.modes[pipe.mode]
    recorder = TrajectoryRecorder(pipe.transformer, cfg=defaults.guidance_scale > 1.0)
    pipe.set_progress_bar_config(disable=True)
    owners = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            before = len(recorder.states)
            # no prompt modifier: the recorded velocities belong to the prompts exactly as the student reads them
            pipe(chunk, num_frames=1, output_type="latent", prompt_modifier="",
                 generator=torch.Generator().manual_seed(seed + start))
            owners += [torch.arange(start, start + len(chunk))] * (len(recorder.states) - before)
    finally:
        recorder.remove()
    stages: dict[tuple, dict] = {}
    for state, owner in zip(recorder.states, owners, strict=True):
        entry = stages.setdefault(tuple(state["latents"].shape[2:]), {k: [] for k in (*state, "prompt")})
        for key, value in (*state.items(), ("prompt", owner)):
            entry[key].append(value)
    return [{key: torch.cat(values) for key, values in entry.items()} for entry in stages.values()]


def _trajectory_rows(bank: list[dict], step: int, rank: int, config: TrainConfig) -> tuple[dict, list[int]]:
    """One stage's states for this step (stages take turns), drawn by a generator seeded from the step; returns
    them with their prompts' corpus indices, which the caller appends to the batch."""
    stage = bank[step % len(bank)]
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step * 101 + rank)
    pick = torch.randint(len(stage["prompt"]), (config.batch_size,), generator=generator)
    owners = stage["prompt"][pick]
    unique, position = torch.unique(owners, return_inverse=True)
    states = {key: stage[key][pick] for key in ("latents", "timestep", "velocity")}
    return {**states, "prompt": position}, unique.tolist()


@torch.no_grad()
def _held_out_errors(pipe: NeodragonPipeline, distilled: TextDistillation) -> dict:
    """Conditioning errors of the student on the evaluation prompts (never trained on), per prompt set."""
    metrics = {}
    for name in PROMPT_SETS:
        prompts = [entry.caption for entry in load_prompt_set(name)]
        target = teacher_conditioning(pipe, prompts)
        got = distilled.condition(**distilled.text.tokenize(prompts))
        mask = got.mask.bool() & target.mask.bool()
        cosine = torch.nn.functional.cosine_similarity(got.tokens, target.tokens, dim=-1)[mask]
        metrics[name] = {"token_loss": conditioning_loss(got.tokens, target.tokens, mask).item(),
                         "token_cosine": cosine.mean().item(),
                         "pooled_loss": conditioning_loss(got.pooled, target.pooled).item(),
                         "pooled_cosine": torch.nn.functional.cosine_similarity(
                             got.pooled, target.pooled, dim=-1).mean().item(),
                         "aligned_prompts": int((got.mask == target.mask).all(-1).sum()), "prompts": len(prompts)}
    return metrics


def _parameter_counts(pipe: NeodragonPipeline, distilled: TextDistillation) -> dict:
    def count(module) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    teacher = count(pipe.text_encoder) + count(pipe.context_adapter) + count(pipe.transformer.context_embedder)
    student = count(distilled.text) + count(distilled.adapter)
    return {"teacher_text_parameters": teacher, "student_text_parameters": student,
            "compression": round(teacher / student, 2)}


def export_with_text_encoder(checkpoint: str | Path, text_dir: str | Path, out_dir: str | Path, mode: str,
                             dtype: torch.dtype = torch.float16) -> Path:
    """``checkpoint`` copied to ``out_dir`` with the student text stack and ContextAdapter of ``text_dir`` (cast to
    ``dtype``, fp16 for bundling) in place of its text encoder, and its ``mode`` DiT without the
    ``context_embedder`` the adapter replaces. A latent first-frame generator reads the teacher's text stack, so it
    is left out: hybrid mode then makes frame 0 with the multi-step DiT."""
    checkpoint, text_dir, out = Path(checkpoint), Path(text_dir), Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    replaced = {item.name for item in text_dir.iterdir() if item.is_dir()}

    def teacher_text_stack(folder: str, names: list[str]) -> list[str]:
        if Path(folder) != checkpoint:
            return []
        readers = ("text_encoder", "tokenizer", LATENT_UNET_SUBFOLDER)
        return [n for n in names if n in replaced or n.startswith(readers)]

    shutil.copytree(checkpoint, out, ignore=teacher_text_stack)
    TextEncoderBundle.from_pretrained(text_dir).to(dtype).save_pretrained(out)  # all fp16 on disk; loads in float32
    adapter = SUBFOLDERS[mode, "context_adapter"]
    ContextAdapter.from_pretrained(text_dir / adapter, torch_dtype=dtype).save_pretrained(out / adapter)
    _drop_context_embedder(out / SUBFOLDERS[mode, "transformer"])
    config = PipelineConfig.load(out)
    if config.first_frame == "latent_unet":
        replace(config, first_frame="pyramid_dit").save(out)
    strip_machine_paths(out)
    return out


def _drop_context_embedder(dit_dir: Path) -> None:
    """Remove the ``context_embedder`` from a saved DiT in place (weights keep their stored dtype)."""
    weights = dit_dir / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    kept = {key: value for key, value in state.items() if not key.startswith("context_embedder.")}
    if len(kept) == len(state):
        return
    config_path = dit_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["use_context_embedder"] = False
    save_file(kept, str(weights), metadata={"format": "pt"})
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
