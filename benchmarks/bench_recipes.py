"""The compression recipes side by side, in one run: for each model, parameters per component, peak RSS and latency
per component of one video (``bench_generation``), and VBench-nano on ``nano-eval`` and ``nano-heldout``.

Run from the repository root, the teacher first (the other rows are compared against it):

    python benchmarks/bench_recipes.py --models teacher=nano "+text encoder=runs/td/checkpoint" \
        "+text encoder +decoder=runs/td-dd/checkpoint" --threads 2 --out docs/results/recipes.md

Each model is measured in its own process (its peak RSS is its own, taken before VBench-nano runs). The markdown
report is rewritten atomically after each model; the full per-model results go next to it as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from bench_core import ReportHead, report_preamble, write_atomic
from bench_generation import COMPONENTS, measure

PROMPT_SETS = ("nano-eval", "nano-heldout")
DIMENSIONS = (("total", "total"), ("object_class", "shape"), ("colour", "colour"), ("motion", "motion"),
              ("multiple_objects", "count"), ("spatial_relationship", "relation"), ("appearance_style", "style"))
PARAMETERS = ("text_encoder", "context_adapter", "first_frame_generator", "transformer", "vae_decoder")
TIMED = tuple(c for c in COMPONENTS if c != "super_resolution")  # the recipes' rows generate without SR


def vbench(model: str, prompt_set: str) -> dict:
    """VBench-nano of ``model`` on ``prompt_set`` with the model's own defaults (as `neodragon eval run`)."""
    from neodragon.eval.judge import load_judge
    from neodragon.eval.metrics import evaluate
    from neodragon.eval.prompts import load_prompt_set
    from neodragon.presets import load_pipeline

    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)

    def generate(caption: str, seed: int) -> torch.Tensor:
        return pipe(caption, generator=torch.Generator("cpu").manual_seed(seed), output_type="pt").frames[0]

    results = evaluate(generate, load_prompt_set(prompt_set), load_judge(None))
    return {"total": results["generated"]["total"], **results["generated"]["dimensions"]}


def measure_model(model: str, threads: int, repeats: int) -> dict:
    row = measure(model, repeats, threads, super_resolution=False)  # peak RSS is read here, before VBench-nano
    row["vbench"] = {name: vbench(model, name) for name in PROMPT_SETS}
    return row


@dataclass
class Report(ReportHead):
    rows: list[tuple[str, dict]] = field(default_factory=list)


def render(report: Report, finished: bool) -> str:
    lines = report_preamble("Compression recipes: teacher and students", report, finished,
                            "other jobs on the machine inflate the times; compare rows of the same run")
    lines += ["", "Latency: one 17 x 128 x 128 video, \"a red circle moving to the right\", seed 0, the model's "
              "defaults, median of the timed videos after a warm-up. VBench-nano: `neodragon eval run` on the "
              "whole prompt set with the bundled judge.", "",
              "| model | mode | total (s) | " + " | ".join(f"{c} (s)" for c in TIMED)
              + " | NFE (DiT calls / batch items) | peak RSS (GiB) | "
              + " | ".join(f"{c} params" for c in PARAMETERS) + " |",
              "|---" * (5 + len(TIMED) + len(PARAMETERS)) + "|"]
    for name, row in report.rows:
        parts = row["components_s"]
        lines.append(f"| {name} | {row['mode']} | {row['total_s']:.2f} | "
                     + " | ".join(f"{parts[c]:.3f}" for c in TIMED)
                     + f" | {row['transformer_calls']} / {row['transformer_batch_items']}"
                     + f" | {row['peak_rss_gib']:.2f} | "
                     + " | ".join(f"{row['params'][c]:,}" for c in PARAMETERS) + " |")
    for prompt_set in PROMPT_SETS:
        lines += ["", f"VBench-nano on `{prompt_set}` (total, then accuracy per semantic dimension; in brackets the "
                  "difference to the first row, in points):", "",
                  "| model | " + " | ".join(label for _, label in DIMENSIONS) + " |",
                  "|---" * (1 + len(DIMENSIONS)) + "|"]
        base = report.rows[0][1]["vbench"][prompt_set] if report.rows else {}
        for name, row in report.rows:
            scores = row["vbench"][prompt_set]
            first = row is report.rows[0][1]
            lines.append(f"| {name} | " + " | ".join(_cell(scores, base, key, first) for key, _ in DIMENSIONS) + " |")
    lines += ["", "Models:", ""] + [f"- {name}: `{row['model']}`" for name, row in report.rows]
    return "\n".join(lines) + "\n"


def _cell(scores: dict, base: dict, key: str, first: bool) -> str:
    """One VBench-nano cell: the score, and after the first row its difference to the first row in points (n/a
    where the prompt set does not exercise the dimension, e.g. no style prompts)."""
    if scores.get(key) is None:
        return "n/a"
    cell = f"{scores[key]:.4f}" if key == "total" else f"{100 * scores[key]:.1f}%"
    if first or base.get(key) is None:
        return cell
    return f"{cell} ({100 * (scores[key] - base[key]):+.1f})"


def run_all(args: argparse.Namespace) -> None:
    report = Report()
    for spec in args.models:
        name, _, model = spec.partition("=") if "=" in spec else (spec, "", spec)
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            subprocess.run([sys.executable, __file__, "--measure", model, "--result", str(result), "--threads",
                            str(args.threads), "--repeats", str(args.repeats)], check=True)
            report.rows.append((name, json.loads(result.read_text())))
        write_atomic(args.out, render(report, False))
        write_atomic(args.out.with_suffix(".json"), json.dumps(dict(report.rows), indent=1) + "\n")
    write_atomic(args.out, render(report, True))
    print(render(report, True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["teacher=nano"],
                        help="NAME=MODEL pairs (MODEL: a preset or a checkpoint folder); the first is the baseline")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/results/recipes.md"))
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        args.result.write_text(json.dumps(measure_model(args.measure, args.threads, args.repeats)))
    else:
        run_all(args)


if __name__ == "__main__":
    main()
