"""CPU generation benchmark: latency per component, parameters per component, peak RAM and NFE of whole videos.

Run from the repository root:

    python benchmarks/bench_generation.py --models nano --repeats 3 --threads 2

``--models`` takes ``nano`` (the bundled model) and checkpoint folders; the first is the baseline row that the
others (e.g. the outputs of the compression recipes) are compared against in the same run. Each model is measured
in its own process, so that its peak RSS is its own. The markdown report is rewritten atomically after each model.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from bench_core import ReportHead, report_preamble, write_atomic

COMPONENTS = ("text_encoder", "context_adapter", "first_frame_generator", "transformer", "vae_decoder",
              "super_resolution")
PROMPT = "a red circle moving to the right"


class ComponentClock:
    """Wall time and call count per pipeline component, from wrappers around the methods the pipeline calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.batch: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, owner: object, method: str) -> None:
        inner = getattr(owner, method)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            self.batch[name] += len(first) if first is not None else 1
            return out

        setattr(owner, method, timed)

    def reset(self) -> None:
        for table in (self.seconds, self.calls, self.batch):
            table.clear()


def instrument(pipe) -> ComponentClock:
    clock = ComponentClock()
    clock.wrap("text_encoder", pipe.text_encoder, "encode")
    clock.wrap("transformer", pipe.transformer, "forward")
    clock.wrap("vae_decoder", pipe.vae, "decode")
    for name in ("context_adapter", "super_resolution"):
        if getattr(pipe, name) is not None:
            clock.wrap(name, getattr(pipe, name), "forward")
    generator = pipe.first_frame_generator
    if generator is not None:  # the nano UNet's own calls (its prompt encoding counts as text_encoder); else all of it
        clock.wrap("first_frame_generator", generator, "forward" if isinstance(generator, torch.nn.Module) and
                   hasattr(generator, "unet") else "first_frame_latents")
    return clock


def parameter_counts(pipe) -> dict[str, int]:
    def count(module) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    generator = pipe.first_frame_generator
    return {"text_encoder": count(pipe.text_encoder), "context_adapter": count(pipe.context_adapter),
            "first_frame_generator": count(generator) if isinstance(generator, torch.nn.Module) else 0,
            "transformer": count(pipe.transformer), "vae_decoder": count(pipe.vae.decoder),
            "vae_encoder (not used to generate)": count(pipe.vae.encoder),
            "super_resolution": count(pipe.super_resolution)}


def measure(model: str, repeats: int, threads: int, super_resolution: bool) -> dict:
    """One model: load, one warm-up video, then ``repeats`` timed videos with the same prompt and seed.
    ``model`` may end in ``@bfloat16`` or ``@float16`` to load it in that dtype (default: as the pipeline loads)."""
    from neodragon.presets import load_pipeline

    torch.set_num_threads(threads)
    model, _, dtype = model.partition("@")
    start = time.perf_counter()
    pipe = load_pipeline(model, torch_dtype=getattr(torch, dtype) if dtype else None)
    load_s = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)
    clock = instrument(pipe)

    def generate() -> float:
        begin = time.perf_counter()
        pipe(PROMPT, generator=torch.Generator().manual_seed(0), super_resolution=super_resolution,
             output_type="pt")
        return time.perf_counter() - begin

    generate()
    totals, per_component = [], defaultdict(list)
    for _ in range(repeats):
        clock.reset()
        totals.append(generate())
        for name in COMPONENTS:
            per_component[name].append(clock.seconds.get(name, 0.0))
        calls, batch = dict(clock.calls), dict(clock.batch)
    cfg = pipe.pipeline_config
    return {"model": model, "mode": pipe.mode, "load_s": load_s, "total_s": statistics.median(totals),
            "components_s": {k: statistics.median(v) for k, v in per_component.items()},
            "transformer_calls": calls.get("transformer", 0), "transformer_batch_items": batch.get("transformer", 0),
            "first_frame_calls": calls.get("first_frame_generator", 0),
            "first_frame_batch_items": batch.get("first_frame_generator", 0),
            "params": parameter_counts(pipe),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "video": f"{cfg.num_frames} x {cfg.height} x {cfg.width}", "threads": threads,
            "dtype": str(pipe.dtype).replace("torch.", "")}


@dataclass
class Report(ReportHead):
    rows: list[dict] = field(default_factory=list)


def render(report: Report, finished: bool) -> str:
    lines = report_preamble("Generation benchmark (CPU): latency, parameters, peak RAM, NFE", report, finished,
                            "other jobs on the machine inflate the times; compare rows of the same run")
    lines += ["", f"Prompt: \"{PROMPT}\", seed 0, the model's default mode, steps and guidance; median of the timed "
              "videos after one warm-up video. NFE counts DiT forward calls; with CFG one call carries the "
              "conditional and the unconditional batch, so batch items = 2 x calls. In hybrid mode the first-frame "
              "generator's UNet calls are its own column (its prompt encoding counts as text_encoder).", "",
              "| model | mode | video | dtype | threads | total (s) | " + " | ".join(f"{c} (s)" for c in COMPONENTS)
              + " | other (s) | NFE (calls / batch items) | peak RSS (GiB) | load (s) |",
              "|---" * (10 + len(COMPONENTS)) + "|"]
    for row in report.rows:
        parts = row["components_s"]
        other = row["total_s"] - sum(parts.values())
        lines.append(f"| {row['model']} | {row['mode']} | {row['video']} | {row['dtype']} | {row['threads']} | "
                     f"{row['total_s']:.2f} | "
                     + " | ".join(f"{parts[c]:.3f}" for c in COMPONENTS)
                     + f" | {other:.3f} | {row['transformer_calls']} / {row['transformer_batch_items']} | "
                       f"{row['peak_rss_gib']:.2f} | {row['load_s']:.1f} |")
    if report.rows:
        names = list(report.rows[0]["params"])
        lines += ["", "Parameters per component:", "", "| model | " + " | ".join(names) + " |",
                  "|---" * (1 + len(names)) + "|"]
        lines += [f"| {row['model']} | " + " | ".join(f"{row['params'][n]:,}" for n in names) + " |"
                  for row in report.rows]
    return "\n".join(lines) + "\n"


def run_all(args: argparse.Namespace) -> None:
    report = Report()
    save: Callable[[bool], None] = lambda finished: write_atomic(args.out, render(report, finished))  # noqa: E731
    for model in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            cmd = [sys.executable, __file__, "--measure", model, "--result", str(result), "--repeats",
                   str(args.repeats), "--threads", str(args.threads)] + (["--super-resolution"] if args.sr else [])
            subprocess.run(cmd, check=True)
            report.rows.append(json.loads(result.read_text()))
        print(json.dumps(report.rows[-1], indent=1))
        save(False)
    save(True)
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["nano"],
                        help="nano and/or checkpoint folders, each optionally MODEL@bfloat16 (or @float16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--super-resolution", dest="sr", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("docs/results/generation.md"))
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        args.result.write_text(json.dumps(measure(args.measure, args.repeats, args.threads, args.sr)))
    else:
        run_all(args)


if __name__ == "__main__":
    main()
