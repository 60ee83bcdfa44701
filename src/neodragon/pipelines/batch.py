"""Batch generation: a prompts file read into validated jobs (one video per line), per-prompt seeds, the share of
one process among several (``accelerate launch`` / ``torchrun``), and the manifest of what was written.

A video depends only on its own line and the batch-wide settings, never on the number of processes: every job has
its own seed and its own pipeline call, and the jobs are dealt out to the processes by index.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..utils.video import atomic_path, export_to_video

if TYPE_CHECKING:
    from .neodragon import NeodragonPipeline

MANIFEST = "manifest.jsonl"
# The pipeline argument of every option a batch can set; the first six may also be set per prompt.
PIPELINE_ARGUMENTS = {"num_frames": "num_frames", "steps": "num_inference_steps",
                      "video_steps": "video_num_inference_steps", "guidance": "guidance_scale",
                      "video_guidance": "video_guidance_scale", "negative_prompt": "negative_prompt",
                      "height": "height", "width": "width", "sr": "super_resolution"}
PROMPT_OPTIONS = ("num_frames", "steps", "video_steps", "guidance", "video_guidance", "negative_prompt")
JSON_KEYS = ("prompt", "seed", "name", *PROMPT_OPTIONS)
PLAN_ARGUMENTS = ("num_frames", "height", "width", "steps", "video_steps", "guidance", "video_guidance")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
SLUG_LENGTH = 40
# A process that finishes its share early waits for the slowest one (a resumed batch may have nothing left to do on
# some ranks); the launcher ends every process when one fails, so this only bounds a wait that cannot end.
RANK_WAIT = timedelta(days=7)


@dataclass(frozen=True)
class BatchJob:
    """One video of a batch: ``index`` counts from 0 (line ``index + 1`` of the file), ``options`` are the
    per-prompt options the line sets (keys of ``PROMPT_OPTIONS``)."""

    index: int
    prompt: str
    seed: int
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def line(self) -> int:
        return self.index + 1

    @property
    def filename(self) -> str:
        return f"{self.name}.mp4"

    def settings(self, batch_options: Mapping[str, Any]) -> dict[str, Any]:
        """The batch-wide options overridden by this prompt's own, unset ones left out (the model's defaults)."""
        merged = {**batch_options, **self.options}
        return {key: value for key, value in merged.items() if value is not None}


def derive_seed(base_seed: int, index: int) -> int:
    """The seed of the prompt at ``index`` that sets none: ``base_seed + index``, so line 1 of a batch run with
    ``--seed S`` is the video of ``neodragon generate PROMPT --seed S``."""
    return base_seed + index


def slug(prompt: str) -> str:
    """A short file-name form of a prompt: lower-case ASCII words joined by '-', cut at a word boundary."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    if len(words) > SLUG_LENGTH:
        cut = words[:SLUG_LENGTH + 1]
        words = cut.rsplit("-", 1)[0] if "-" in cut else cut[:SLUG_LENGTH]
    return words or "video"


def default_name(index: int, prompt: str, count: int) -> str:
    """``0003-a-red-circle-moving``: the index, zero-padded to the batch's size (4 digits at least), and a slug."""
    return f"{index:0{max(4, len(str(count - 1)))}d}-{slug(prompt)}"


def read_prompts_file(path: str | Path, base_seed: int = 0) -> list[BatchJob]:
    """The jobs of a prompts file: one prompt per line, or a JSON object per line (every line of a ``.jsonl`` file,
    and a line of any other file that starts with ``{``). Raises ValueError naming the file and line for a blank
    line, invalid JSON, an unknown key or a bad value, two prompts with the same output name, or no prompts."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); save it as UTF-8.") from err
    if not text.strip():
        raise ValueError(f"{path} has no prompts: write one prompt per line.")
    lines = text.splitlines()  # a final newline makes no empty last line
    entries = [_parse_line(line, path, number, path.suffix.lower() == ".jsonl")
               for number, line in enumerate(lines, start=1)]
    jobs = [_job(entry, index, len(entries), base_seed) for index, entry in enumerate(entries)]
    _check_unique_names(jobs, path)
    return jobs


def _parse_line(line: str, path: Path, number: int, jsonl: bool) -> dict[str, Any]:
    where = f"{path} line {number}"
    if not line.strip():
        raise ValueError(f"{where} is blank: remove it (every line is one video; a final newline is fine).")
    if not jsonl and not line.lstrip().startswith("{"):
        return {"prompt": line.strip()}
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON ({err.msg} at column {err.colno}); write an object such as "
                         '{"prompt": "a red circle", "seed": 3}.') from err
    if not isinstance(entry, dict):
        raise ValueError(f'{where} must be a JSON object such as {{"prompt": "a red circle"}}; got '
                         f"{type(entry).__name__}.")
    _check_entry(entry, where)
    return entry


def _check_entry(entry: dict[str, Any], where: str) -> None:
    unknown = sorted(set(entry) - set(JSON_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; a line may set {', '.join(JSON_KEYS)} (mode, height, "
                         "width and the rest are set for the whole batch on the command line).")
    if not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
        raise ValueError(f'{where} needs "prompt": non-empty text such as "a red circle moving to the right".')
    for key, (check, wanted) in _VALUE_CHECKS.items():
        if key in entry and not check(entry[key]):
            raise ValueError(f'{where}: "{key}" must be {wanted}; got {entry[key]!r}.')
    if "name" in entry and entry["name"].lower().endswith(".mp4"):
        raise ValueError(f'{where}: "name" is the file name without .mp4; got {entry["name"]!r}.')


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_steps(value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    return bool(values) and all(_is_int(v) and v >= 1 for v in values)


_VALUE_CHECKS = {
    "seed": (lambda v: _is_int(v) and 0 <= v < 2**63, "an integer from 0 to 2**63 - 1"),
    "name": (lambda v: isinstance(v, str) and NAME_PATTERN.fullmatch(v) is not None,
             "a file name of up to 100 letters, digits, '.', '_' or '-' that starts with a letter or digit"),
    "num_frames": (lambda v: _is_int(v) and v >= 1, "a positive integer (1 + 8k)"),
    "steps": (_is_steps, "a positive integer or a list of one per pyramid stage such as [20, 20, 20]"),
    "video_steps": (_is_steps, "a positive integer or a list of one per pyramid stage such as [20, 20, 20]"),
    "guidance": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    "video_guidance": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    "negative_prompt": (lambda v: isinstance(v, str), "text"),
}


def _job(entry: dict[str, Any], index: int, count: int, base_seed: int) -> BatchJob:
    return BatchJob(index=index, prompt=entry["prompt"], seed=entry.get("seed", derive_seed(base_seed, index)),
                    name=entry.get("name") or default_name(index, entry["prompt"], count),
                    options={key: entry[key] for key in PROMPT_OPTIONS if key in entry})


def _check_unique_names(jobs: list[BatchJob], path: Path) -> None:
    first: dict[str, BatchJob] = {}
    for job in jobs:
        key = job.name.casefold()  # names that differ only in case are one file on macOS and Windows
        if key in first:
            raise ValueError(f"{path} line {job.line}: the output name {job.name!r} is already used by line "
                             f'{first[key].line} ({first[key].name!r}); give each prompt its own "name".')
        first[key] = job


def shard(jobs: list[BatchJob], rank: int, world_size: int) -> list[BatchJob]:
    """The jobs of process ``rank`` among ``world_size``: those whose index is ``rank`` modulo ``world_size``."""
    return [job for job in jobs if job.index % world_size == rank]


@dataclass(frozen=True)
class Ranks:
    """This process's place among those that ``accelerate launch`` or ``torchrun`` started (alone: 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Ranks:
        """From ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, which both launchers set."""
        try:
            ranks = cls(*(int(environ.get(name, default)) for name, default in
                          (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"))))
        except ValueError as err:
            raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers ({err}); start the processes with "
                             "accelerate launch or torchrun.") from err
        if not 0 <= ranks.rank < ranks.world_size:
            raise ValueError(f"RANK={ranks.rank} is not between 0 and WORLD_SIZE-1={ranks.world_size - 1}.")
        return ranks

    def device(self, device: str) -> str:
        """``cuda`` means this process's own GPU when several processes share a machine."""
        return f"cuda:{self.local_rank}" if device == "cuda" and self.world_size > 1 else device


@contextmanager
def process_group(ranks: Ranks) -> Iterator[None]:
    """A gloo process group (CPU only, whatever device generates) for the ranks to meet at the end; nothing when
    the process is alone. Needs ``MASTER_ADDR`` and ``MASTER_PORT``, which the launchers set."""
    if ranks.world_size == 1:
        yield
        return
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world_size, timeout=RANK_WAIT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def check_jobs(pipe: NeodragonPipeline, jobs: list[BatchJob], batch_options: Mapping[str, Any],
               source: str | Path) -> None:
    """Every job's settings checked against the loaded model before any video is made, so that a bad line stops
    the batch at once and a warning (a prompt longer than the text encoder reads) names its line."""
    for job in jobs:
        settings = job.settings(batch_options)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                pipe._plan(job.prompt, prompt_modifier=None, **{key: settings.get(key) for key in PLAN_ARGUMENTS})
            except ValueError as err:
                raise ValueError(f"{source} line {job.line}: {err}") from err
        for warning in caught:
            warnings.warn(f"{source} line {job.line}: {warning.message}", warning.category, stacklevel=2)


def generate_jobs(pipe: NeodragonPipeline, jobs: list[BatchJob], folder: str | Path, batch_options: Mapping[str, Any],
                  fps: int, overwrite: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Generate ``jobs`` one by one into ``folder`` (``name.mp4``, written atomically), skipping those already
    there unless ``overwrite``; the manifest record of each. Shows a progress bar over the jobs if ``progress``."""
    import torch
    from tqdm.auto import tqdm

    folder = Path(folder)
    pipe.set_progress_bar_config(disable=True)  # the bar over prompts replaces the per-step one
    records = []
    with warnings.catch_warnings(), tqdm(jobs, unit="video", disable=not progress, dynamic_ncols=True) as bar:
        warnings.simplefilter("ignore", UserWarning)  # check_jobs has reported them, with their line
        for job in bar:
            settings = job.settings(batch_options)
            status = "skipped"
            if overwrite or not (folder / job.filename).exists():
                kwargs = {PIPELINE_ARGUMENTS[key]: value for key, value in settings.items()}
                frames = pipe(job.prompt, generator=torch.Generator("cpu").manual_seed(job.seed), **kwargs).frames[0]
                export_to_video(frames, folder / job.filename, fps=fps, overwrite=overwrite)
                status = "written"
            records.append(manifest_record(job, settings, status))
    return records


def manifest_record(job: BatchJob, settings: Mapping[str, Any], status: str) -> dict[str, Any]:
    """One manifest line: what a video is (prompt, seed, options) and whether this run wrote or skipped it."""
    return {"index": job.index, "line": job.line, "name": job.name, "file": job.filename, "prompt": job.prompt,
            "seed": job.seed, "options": dict(settings), "status": status}


def gather_records(records: list[dict[str, Any]], ranks: Ranks) -> list[dict[str, Any]] | None:
    """Every rank's manifest records on rank 0, sorted by index; None on the other ranks. A collective call: every
    rank of the process group must make it."""
    if ranks.world_size == 1:
        return sorted(records, key=lambda record: record["index"])
    import torch.distributed as dist

    parts = [None] * ranks.world_size if ranks.rank == 0 else None
    dist.gather_object(records, parts, dst=0)
    if ranks.rank != 0:
        return None
    return sorted((record for part in parts for record in part), key=lambda record: record["index"])


def write_manifest(folder: str | Path, records: list[dict[str, Any]]) -> Path:
    """``folder/manifest.jsonl``, one record per line in index order, replaced atomically."""
    path = Path(folder) / MANIFEST
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records),
                       encoding="utf-8")
    return path
