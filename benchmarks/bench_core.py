"""CPU benchmarks of the core: one hybrid unit of the official PyramidMMDiT, the block-noise sampler, peak RAM.

Run from the repository root:

    python benchmarks/bench_core.py --dtype float32 bfloat16 --units 1 2 3 4 5 6 --repeats 3

The DiT has random weights (the timing does not depend on their values). The report is markdown, rewritten
atomically after every finished section so that an interrupted run still leaves the sections it completed.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil
import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from diffusers.utils import logging as diffusers_logging

from neodragon.models import PyramidMMDiT
from neodragon.schedulers import PyramidFlowMatchScheduler

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ALL_UNITS = (1, 2, 3, 4, 5, 6)  # hybrid mode: SSD-1B supplies unit 0, the DiT makes latent frames 1..6
LATENT_FRAME = (1, 16, 1, 40, 64)  # one 320x512 latent frame
TEXT_TOKENS, REAL_TEXT_TOKENS, POOLED_DIM = 128, 20, 2048
# Architecture reference §5.5: image tokens per unit at stages 0 / 1 / 2 (add 128 text tokens).
EXPECTED_IMAGE_TOKENS = {1: (80, 320, 1280), 2: (120, 360, 1440), 3: (160, 400, 1480),
                         4: (200, 440, 1520), 5: (240, 480, 1560), 6: (280, 520, 1600)}
PARTS = ("renoise", "DiT", "step")


@dataclass
class UnitTiming:
    unit: int
    history_ms: float
    samples_ms: np.ndarray  # [repeats, stages, parts]: upsample_and_renoise, DiT forward, scheduler.step

    @property
    def stage_ms(self) -> np.ndarray:
        return np.median(self.samples_ms.sum(axis=2), axis=0)

    @property
    def total_s(self) -> float:
        return float(np.median(self.samples_ms.sum(axis=(1, 2)))) / 1000

    @property
    def min_total_s(self) -> float:
        return float(self.samples_ms.sum(axis=(1, 2)).min()) / 1000


@dataclass
class ReportHead:
    """The head of every benchmark report, filled in when a run starts: command, start time, machine, load."""

    argv: str = field(default_factory=lambda: "python " + shlex.join(sys.argv))
    started: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    header: list[str] = field(default_factory=lambda: machine_lines())
    load: dict[str, tuple[float, ...]] = field(default_factory=lambda: {"start": os.getloadavg()})


@dataclass
class Report(ReportHead):
    params: int = 0
    buffer_elems: int = 0
    build_s: float = 0.0
    rss_gib: dict[str, float] = field(default_factory=dict)
    tokens: dict[int, tuple[int, ...]] = field(default_factory=dict)
    dit: dict[str, list[UnitTiming]] = field(default_factory=dict)
    noise_rows: list[str] = field(default_factory=list)
    noise_notes: list[str] = field(default_factory=list)
    repeats: int = 0


# ---------------------------------------------------------------------------------------------- helpers


def gib(num_bytes: float) -> float:
    return num_bytes / 2**30


def run(cmd: Sequence[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine_lines() -> list[str]:
    model = next((line.split(":", 1)[1].strip() for line in run(["lscpu"]).splitlines()
                  if line.startswith("Model name")), "unknown")
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    rev = run(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    if run(["git", "status", "--porcelain"]):
        rev += "+dirty"
    return [
        f"- CPU: {model} (`platform.processor()` = `{platform.processor() or 'n/a'}`), "
        f"{os.cpu_count()} logical cores, RAM {gib(psutil.virtual_memory().total):.1f} GiB",
        f"- ISA flags: {', '.join(isa) or 'none of avx512f/avx512_bf16/amx_bf16'}; "
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}",
        f"- torch {torch.__version__}, `torch.get_num_threads()` = {torch.get_num_threads()}, "
        f"Python {platform.python_version()}",
        f"- Git revision: `{rev}`",
    ]


def timed_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def batch_ms(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) * 1000


def per_call_ms(fn: Callable[[], object], repeats: int, min_ms: float = 300.0) -> float:
    """Median per-call time over `repeats` batches, each batch long enough to time reliably."""
    fn()
    calls = 1
    while batch_ms(fn, calls) < min_ms:
        calls *= 2
    return statistics.median(batch_ms(fn, calls) / calls for _ in range(repeats))


def peak_rss_gib() -> float:
    """This process's peak RSS since its exec (VmHWM): ``ru_maxrss`` of a child also counts the parent's RSS at the
    fork."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) / 2**20


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(handle.name, 0o644)
    os.replace(handle.name, path)


# ---------------------------------------------------------------------------------------------- DiT


def build_dit(seed: int = 0) -> PyramidMMDiT:
    """Official config built on the meta device, materialised on the CPU with N(0, 0.02) weights."""
    with torch.device("meta"):
        dit = PyramidMMDiT()
    dit.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    cfg = dit.config
    table = get_2d_sincos_pos_embed(cfg.num_attention_heads * cfg.attention_head_dim, cfg.pos_embed_max_size,
                                    base_size=cfg.sample_size // cfg.patch_size, output_type="pt")
    with torch.no_grad():
        for param in dit.parameters():
            param.normal_(0.0, 0.02, generator=generator)
        dit.pos_embed.pos_embed.copy_(table.float().unsqueeze(0))
    return dit.eval()


def image_tokens(clips: Sequence[torch.Tensor], patch: int = 2) -> int:
    return sum(c.shape[2] * c.shape[3] * c.shape[4] // patch**2 for c in clips)


def unit_tokens(scheduler: PyramidFlowMatchScheduler, unit: int) -> tuple[int, ...]:
    """Image tokens per stage (history + current) for `unit`, from the real history construction."""
    history = scheduler.build_history([torch.zeros(LATENT_FRAME)] * unit)
    h, w = LATENT_FRAME[-2:]
    stages = scheduler.config.stages
    return tuple(image_tokens([*history[s], torch.zeros(1, 16, 1, h >> (stages - 1 - s), w >> (stages - 1 - s))])
                 for s in range(stages))


def run_unit(dit: PyramidMMDiT, scheduler: PyramidFlowMatchScheduler, history: list[list[torch.Tensor]],
             latents: torch.Tensor, cond: tuple[torch.Tensor, ...], generator: torch.Generator) -> np.ndarray:
    """3 stages x 1 step as in the hybrid pipeline; returns ms [stages, (renoise, DiT, step)]."""
    out = np.zeros((scheduler.config.stages, len(PARTS)))
    for stage in range(scheduler.config.stages):
        t0 = time.perf_counter()
        if stage:
            latents = scheduler.upsample_and_renoise(latents, stage, generator=generator)
        t1 = time.perf_counter()
        timestep = scheduler.stage_timesteps(1, stage).to(latents.dtype)
        sigmas = scheduler.stage_sigmas(1, stage).to(latents.dtype)
        velocity = dit([[*history[stage], latents]], *cond, timestep)[0]
        t2 = time.perf_counter()
        latents = scheduler.step(velocity, sigmas[0], sigmas[1], latents)
        out[stage] = (t1 - t0, t2 - t1, time.perf_counter() - t2)
    if not torch.isfinite(latents).all():
        raise RuntimeError("non-finite latents from the benchmark unit")
    return out * 1000


def bench_dit(dit: PyramidMMDiT, scheduler: PyramidFlowMatchScheduler, dtype: torch.dtype, units: Sequence[int],
              repeats: int) -> list[UnitTiming]:
    generator = torch.Generator().manual_seed(1)
    mask = torch.zeros(1, TEXT_TOKENS, dtype=torch.long)
    mask[:, :REAL_TEXT_TOKENS] = 1
    cond = (torch.randn(1, TEXT_TOKENS, 1536, generator=generator).to(dtype), mask,
            torch.randn(1, POOLED_DIM, generator=generator).to(dtype))
    results = []
    with torch.inference_mode():
        for unit in units:
            generated = [torch.randn(LATENT_FRAME, generator=generator).to(dtype) for _ in range(unit)]
            history_ms = per_call_ms(lambda g=generated: scheduler.build_history(g), repeats)
            history = scheduler.build_history(generated)
            noise = scheduler.noise_pyramid(torch.randn(LATENT_FRAME, generator=generator))[0].to(dtype)
            run_unit(dit, scheduler, history, noise, cond, generator)  # warm-up
            samples = np.stack([run_unit(dit, scheduler, history, noise, cond, generator) for _ in range(repeats)])
            results.append(UnitTiming(unit, history_ms, samples))
            print(f"  {str(dtype)[6:]} unit {unit}: stages {np.round(results[-1].stage_ms).tolist()} ms, "
                  f"total {results[-1].total_s:.2f} s", file=sys.stderr, flush=True)
    return results


def estimate_stage_ms(timings: list[UnitTiming], tokens: dict[int, tuple[int, ...]]) -> dict[int, np.ndarray]:
    """Per-unit stage ms: measured where available, else a per-stage linear fit of ms against tokens."""
    measured = {t.unit: t.stage_ms for t in timings}
    out = {}
    for unit in ALL_UNITS:
        if unit in measured:
            out[unit] = measured[unit]
            continue
        est = []
        for s in range(len(tokens[unit])):
            xs = np.array([tokens[u][s] for u in measured], dtype=float)
            ys = np.array([measured[u][s] for u in measured])
            if len(measured) == 1:  # proportional to the joint sequence length (image + text tokens)
                est.append(ys[0] * (tokens[unit][s] + TEXT_TOKENS) / (xs[0] + TEXT_TOKENS))
            else:
                slope, intercept = np.polyfit(xs, ys, 1)
                est.append(slope * tokens[unit][s] + intercept)
        out[unit] = np.array(est)
    return out


# ---------------------------------------------------------------------------------------------- block noise


def reference_block_noise(num_blocks: int, gamma: float) -> torch.Tensor:
    """Pyramid-Flow / Neodragon reference: one 4-D MultivariateNormal draw per 2x2 block in a Python loop."""
    dist = torch.distributions.MultivariateNormal(torch.zeros(4), torch.eye(4) * (1 + gamma) - torch.ones(4, 4) * gamma)
    return torch.stack([dist.sample() for _ in range(num_blocks)])  # [blocks, 4]; the reference then rearranges


def block_covariance(noise: torch.Tensor) -> torch.Tensor:
    b, c, t, h, w = noise.shape
    blocks = noise.reshape(b, c, t, h // 2, 2, w // 2, 2).permute(0, 1, 2, 3, 5, 4, 6).reshape(-1, 4).double()
    return blocks.T @ blocks / blocks.shape[0]


def bench_block_noise(scheduler: PyramidFlowMatchScheduler, repeats: int, baseline_blocks: int,
                      report: Report) -> None:
    gamma = scheduler.config.gamma
    generator = torch.Generator().manual_seed(2)
    ref_ms = statistics.median(timed_ms(lambda: reference_block_noise(baseline_blocks, gamma))
                               for _ in range(repeats)) / baseline_blocks
    target = torch.eye(4, dtype=torch.float64) * (1 + gamma) - gamma
    for shape in ((1, 16, 1, 20, 32), (1, 16, 1, 40, 64)):
        blocks = shape[0] * shape[1] * shape[2] * (shape[3] // 2) * (shape[4] // 2)
        vec_ms = per_call_ms(lambda s=shape: scheduler.block_noise(s, generator=generator), repeats)
        call_ref_ms = ref_ms * blocks
        report.noise_rows.append(
            f"| {list(shape)} | {blocks:,} | {vec_ms:.3f} | {blocks / vec_ms * 1e3:,.0f} | {call_ref_ms:,.1f} | "
            f"{1e3 / ref_ms:,.0f} | **{call_ref_ms / vec_ms:,.0f}x** |"
        )
    big = scheduler.block_noise((64, 16, 1, 40, 64), generator=generator)
    err_vec = (block_covariance(big) - target).abs().max().item()
    ref = reference_block_noise(20_000, gamma)
    err_ref = ((ref.double().T @ ref.double()) / ref.shape[0] - target).abs().max().item()
    report.noise_notes = [
        f"- Reference per-block cost: {ref_ms * 1e3:.1f} us (median of {repeats} loops of {baseline_blocks:,} "
        "blocks, including the `MultivariateNormal` construction and the final `torch.stack`); per-call figures "
        "are that cost times the block count. The reference's final `rearrange` is not timed (one reshape).",
        f"- Sanity check, max |empirical block covariance - Sigma|: vectorised {err_vec:.4f} "
        f"({big.numel() // 4:,} blocks), reference loop {err_ref:.4f} (20,000 blocks).",
    ]


# ---------------------------------------------------------------------------------------------- report


def report_preamble(title: str, report, finished: bool, load_note: str) -> list[str]:
    """Title, date, command, machine, load average and wall time: the head of every benchmark report."""
    loads = {**report.load, ("end" if finished else "now"): os.getloadavg()}
    wall = time.time() - report.started.timestamp()
    return [
        f"# {title}",
        "",
        f"- Date (UTC): {report.started:%Y-%m-%d %H:%M:%S}" + ("" if finished else " (run still in progress)"),
        f"- Command: `{report.argv}`",
        *report.header,
        "- Load average (1/5/15 min): " + ", ".join(f"{k} {'/'.join(f'{x:.2f}' for x in v)}" for k, v in loads.items()),
        f"  ({load_note})",
        f"- Wall time of the whole run: {wall / 60:.1f} min" + ("" if finished else " so far"),
    ]


def finish_report(path: Path, title: str, report: ReportHead, load_note: str, body: Sequence[str]) -> None:
    """Write a finished run's report (the preamble, a blank line, then ``body``) atomically and print it."""
    text = "\n".join([*report_preamble(title, report, True, load_note), "", *body, ""])
    write_atomic(path, text)
    print(text)


def render(report: Report, args: argparse.Namespace, finished: bool) -> str:
    lines = [
        *report_preamble("Core benchmarks (CPU)", report, finished,
                         "the benchmark itself keeps both cores busy, so readings taken after it started are ~2 on an "
                         "otherwise idle machine and only the excess over 2 is outside load; another process may "
                         "share the 2 cores; the median vs min columns below show the run-to-run spread"),
        "",
        "## 1. DiT: one hybrid unit of the official `PyramidMMDiT`",
        "",
        f"Official default config (18 blocks, width 1536), **{report.params:,} learnable parameters** "
        f"+ a {report.buffer_elems:,}-element sincos buffer (192x192x1536); random N(0, 0.02) weights, built on "
        f"the meta device then materialised ({report.build_s:.0f} s). Batch 1, {TEXT_TOKENS} text tokens "
        f"({REAL_TEXT_TOKENS} real, rest masked), `torch.inference_mode()`. Per unit u the history is "
        f"`scheduler.build_history` of u random clean latent frames {list(LATENT_FRAME)}; the unit runs "
        "3 stages x 1 step exactly as the hybrid pipeline: `upsample_and_renoise` (stages 1, 2), DiT forward, "
        f"`scheduler.step`. Median of {report.repeats} runs after one warm-up run; bf16 = model cast with "
        "`.to(torch.bfloat16)`, bf16 inputs (block noise still drawn in fp32, then cast).",
        "",
        "Image tokens per stage from the real history construction, against §5.5 "
        "(each stage also has 128 text tokens):",
        "",
        "| Unit | Stage 0 | Stage 1 | Stage 2 | Matches §5.5 |",
        "|---|---|---|---|---|",
    ]
    for unit, toks in report.tokens.items():
        ok = "yes" if toks == EXPECTED_IMAGE_TOKENS[unit] else f"**no** (expected {EXPECTED_IMAGE_TOKENS[unit]})"
        lines.append(f"| {unit} | {toks[0]} | {toks[1]} | {toks[2]} | {ok} |")
    summary = []
    for name, timings in report.dit.items():
        lines += ["", f"### {name}", "",
                  "| Unit | Stage | Tokens (image+text) | renoise ms | DiT ms | step ms | Stage ms |",
                  "|---|---|---|---|---|---|---|"]
        for t in timings:
            med = np.median(t.samples_ms, axis=0)
            for s, stage_ms in enumerate(t.stage_ms):
                lines.append(f"| {t.unit} | {s} | {report.tokens[t.unit][s]} + {TEXT_TOKENS} | {med[s, 0]:.1f} | "
                             f"{med[s, 1]:,.0f} | {med[s, 2]:.2f} | {stage_ms:,.0f} |")
        lines += ["", "| Unit | history build ms | Unit s (median) | Unit s (min) |", "|---|---|---|---|"]
        lines += [f"| {t.unit} | {t.history_ms:.2f} | **{t.total_s:.2f}** | {t.min_total_s:.2f} |" for t in timings]
        per_unit = estimate_stage_ms(timings, report.tokens)
        missing = [u for u in ALL_UNITS if u not in {t.unit for t in timings}]
        video_s = sum(float(v.sum()) for v in per_unit.values()) / 1000
        how = ("all six units measured" if not missing else
               f"units {missing} **extrapolated** (per-stage linear fit of ms against image tokens) "
               f"from measured units {[t.unit for t in timings]}")
        lines += ["", f"Whole 49-frame hybrid video, DiT part (units 1..6, 18 forward passes): **{video_s:.1f} s** "
                  f"({how}; excludes SSD-1B, text encoders and the VAE)."]
        summary.append(f"| {name} | " + " | ".join(f"{x:,.0f}" for x in per_unit[6]) +
                       f" | {float(per_unit[6].sum()) / 1000:.2f} | {video_s:.1f} |")
    if summary:
        lines += ["", "Summary (unit 6 per-stage ms; estimated if unit 6 was not measured):", "",
                  "| dtype | Stage 0 ms | Stage 1 ms | Stage 2 ms | Unit 6 s | 49-frame video DiT s |",
                  "|---|---|---|---|---|---|", *summary]
    if report.noise_rows:
        lines += ["", "## 2. Block-noise sampler", "",
                  "Vectorised `PyramidFlowMatchScheduler.block_noise` (one `randn` and a 4x4 matmul) against a "
                  "re-creation of the reference's loop (`MultivariateNormal(zeros(4), cov).sample()` once per "
                  f"2x2 block), at the stage-1 and stage-2 renoise sizes; vectorised: median of {args.repeats} "
                  "timed batches of calls.",
                  "",
                  "| Shape | Blocks | Vectorised ms/call | Vectorised blocks/s | Reference ms/call (extrap.) | "
                  "Reference blocks/s | Speed-up |",
                  "|---|---|---|---|---|---|---|", *report.noise_rows, "", *report.noise_notes]
    maxrss = gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    lines += ["", "## 3. Memory", "",
              f"- Parameters: {report.params:,} learnable ({gib(report.params * 4):.2f} GiB in fp32, "
              f"{gib(report.params * 2):.2f} GiB in bf16) + {report.buffer_elems:,} buffer elements",
              *[f"- RSS {where}: {value:.2f} GiB (psutil)" for where, value in report.rss_gib.items()],
              f"- Peak RSS of the process{'' if finished else ' so far'}: {maxrss:.2f} GiB "
              "(`resource.getrusage(RUSAGE_SELF).ru_maxrss`; includes the fp32 -> bf16 cast)"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float32"])
    parser.add_argument("--units", nargs="+", type=int, choices=ALL_UNITS, default=[1, 6])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-blocks", type=int, default=2000, help="blocks timed in the reference loop")
    parser.add_argument("--out", type=Path, default=Path("docs/results/core-benchmarks.md"))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    diffusers_logging.set_verbosity_error()  # silence the "cast with .to()" advisory on the bf16 cast

    report = Report(repeats=args.repeats)
    scheduler = PyramidFlowMatchScheduler()
    report.tokens = {u: unit_tokens(scheduler, u) for u in ALL_UNITS}

    def save(finished: bool = False) -> None:
        write_atomic(args.out, render(report, args, finished))

    print("block noise ...", file=sys.stderr, flush=True)
    bench_block_noise(scheduler, args.repeats, args.baseline_blocks, report)
    save()

    print("building the DiT ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    dit = build_dit()
    report.build_s = time.perf_counter() - start
    report.params = sum(p.numel() for p in dit.parameters())
    report.buffer_elems = sum(b.numel() for b in dit.buffers())
    report.rss_gib["after building the fp32 model"] = gib(psutil.Process().memory_info().rss)
    units = sorted(set(args.units))
    for name in args.dtype:
        dtype = DTYPES[name]
        if dit.dtype != dtype:
            dit.to(dtype)
            report.rss_gib[f"after casting to {name}"] = gib(psutil.Process().memory_info().rss)
        print(f"DiT {name} ...", file=sys.stderr, flush=True)
        report.dit[name] = bench_dit(dit, scheduler, dtype, units, args.repeats)
        report.load[f"after {name}"] = os.getloadavg()
        save()
    save(finished=True)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
