"""Deployment benchmark: export, W8A16 quantisation, and per graph its shapes, size, SQNR and ONNX Runtime latency;
the whole pipeline's latency and peak RSS per backend; VBench-nano of PyTorch fp32 against the graphs. One run.

Run from the repository root:

    python benchmarks/bench_deploy.py --model nano --work /tmp/deploy-nano --threads 2 --out docs/results/deploy.md

Every step is a `neodragon` command or its own process (so each backend's peak RSS is its own); the graph latencies
are measured in this process on a held-out prompt's recorded inputs.
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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from bench_core import ReportHead, peak_rss_gib, per_call_ms, report_preamble, write_atomic

PROMPTS = ("a red circle moving to the right", "two blue squares moving up", "a small green triangle on the left")
BACKENDS = (("PyTorch fp32", "pytorch", None), ("ORT fp32", "onnxruntime", "fp32"),
            ("ORT W8A16", "onnxruntime", "w8a16"))
DIMENSIONS = (("object_class", "shape"), ("colour", "colour"), ("motion", "motion"), ("multiple_objects", "count"),
              ("spatial_relationship", "relation"))


def neodragon(*args: str) -> float:
    """Run a `neodragon` command; its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "neodragon", *args], check=True)
    return time.perf_counter() - start


def measure_pipeline(model: str, backend: str, threads: int, repeats: int) -> dict:
    """Load, one warm-up video, then the median over ``repeats`` x PROMPTS of whole-video generation (no SR)."""
    torch.set_num_threads(threads)
    if backend == "onnxruntime":
        from neodragon.deploy.runtime import load_onnx_pipeline

        pipe = load_onnx_pipeline(model, threads)
    else:
        from neodragon.presets import load_pipeline

        pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)

    def generate(prompt: str) -> float:
        start = time.perf_counter()
        pipe(prompt, generator=torch.Generator().manual_seed(0), output_type="pt")
        return time.perf_counter() - start

    generate(PROMPTS[0])
    times = [generate(p) for _ in range(repeats) for p in PROMPTS]
    return {"total_s": statistics.median(times), "peak_rss_gib": peak_rss_gib()}


def graph_latencies(fp32: Path, quantised: Path, threads: int) -> dict[str, dict[str, float]]:
    """Median ms per call of every graph, fp32 and quantised, on the inputs it gets for a held-out prompt."""
    from neodragon.deploy.export import Manifest
    from neodragon.deploy.quantize import heldout_prompt_set, record_feeds
    from neodragon.deploy.runtime import session

    feeds = record_feeds(fp32, heldout_prompt_set(1), max_feeds=1, threads=threads)
    rows = {}
    for name, spec in Manifest.load(fp32).graphs.items():
        feed = feeds[name][0]
        rows[name] = {kind: per_call_ms(lambda s=session(folder / spec.file, threads), f=feed: s.run(None, f), 3)
                      for kind, folder in (("fp32", fp32), ("quantised", quantised))}
    return rows


@dataclass
class Report(ReportHead):
    model: str = ""
    steps: dict[str, float] = field(default_factory=dict)
    export_rss_gib: float = 0.0
    sqnr: dict = field(default_factory=dict)
    shapes: dict[str, str] = field(default_factory=dict)
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    pipelines: dict[str, dict] = field(default_factory=dict)
    vbench: dict[str, dict] = field(default_factory=dict)


def render(report: Report, finished: bool) -> str:
    lines = report_preamble(f"Deployment benchmark: {report.model} as static ONNX graphs, W8A16", report, finished,
                            "other jobs on the machine inflate the times; compare rows of the same run")
    if report.steps:
        lines += ["", "Steps: " + ", ".join(f"{k} {v:.0f} s" for k, v in report.steps.items())
                  + f"; peak RSS of the export process {report.export_rss_gib:.2f} GiB."]
    if report.sqnr:
        lines += _graph_table(report)
    if report.pipelines:
        lines += ["", "Whole pipeline, 17 frames, no SR (as VBench-nano generates): median over "
                  f"{len(PROMPTS)} prompts x repeats after a warm-up video, model loaded; peak RSS of the process.", "",
                  "| backend | video (s) | peak RSS (GiB) | VBench-nano total | "
                  + " | ".join(label for _, label in DIMENSIONS) + " |", "|---" * (4 + len(DIMENSIONS)) + "|"]
        for name, row in report.pipelines.items():
            scores = report.vbench.get(name)
            cells = ([f"{scores['total']:.4f}", *(f"{100 * scores[key]:.1f}%" for key, _ in DIMENSIONS)]
                     if scores else ["–"] * (1 + len(DIMENSIONS)))
            lines.append(f"| {name} | {row['total_s']:.3f} | {row['peak_rss_gib']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _graph_table(report: Report) -> list[str]:
    from neodragon.deploy.quantize import paper_sqnr

    rows = report.sqnr["graphs"]
    lines = ["", f"Per graph (SQNR on {report.sqnr['heldout_prompts']} held-out nano-eval prompts; calibration "
             f"{report.sqnr['calibration']['prompts']} caption-grammar prompts, at most "
             f"{report.sqnr['calibration']['max_feeds_per_graph']} feeds per graph). Latency: ONNX Runtime CPU "
             "execution provider, median ms per call.", "",
             "| graph | inputs | precision | fp32 (KB) | quantised (KB) | SQNR (dB) | paper (dB) | fp32 (ms) | "
             "quantised (ms) |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        latency = report.latency.get(name, {})
        lines.append(f"| {name} | {report.shapes.get(name, '')} | {row['precision']} | "
                     f"{row['bytes_fp32'] / 1024:.0f} | {row['bytes'] / 1024:.0f} | {row['sqnr_db']:.1f} | "
                     f"{paper_sqnr(row)} | "
                     f"{latency.get('fp32', float('nan')):.2f} | {latency.get('quantised', float('nan')):.2f} |")
    total = [sum(r[k] for r in rows.values()) / 2**20 for k in ("bytes_fp32", "bytes")]
    lines += ["", f"On disk: {total[0]:.1f} MiB fp32, {total[1]:.1f} MiB quantised (every DiT graph holds its own "
              "copy of the weights)."]
    if "lift" in report.sqnr:
        lift = report.sqnr["lift"]
        lines += ["", f"Sensitivity of the worst graph, {lift['graph']}: keeping the {len(lift['float_nodes'])} nodes "
                  f"that read its most sensitive weights in float moved its SQNR from {lift['sqnr_db_before']:.1f} to "
                  f"{lift['sqnr_db_after']:.1f} dB ({lift['kept']} kept); the per-node table is in sqnr.md."]
    return lines


def run_all(args: argparse.Namespace) -> None:
    report = Report(model=args.model)
    fp32, quantised = args.work / "fp32", args.work / "w8a16"
    save = lambda finished: write_atomic(args.out, render(report, finished))  # noqa: E731
    report.steps["export"] = neodragon("deploy", "export", args.model, "-o", str(fp32), "--overwrite")
    report.export_rss_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    report.steps["quantise"] = neodragon("deploy", "quantize", str(fp32), "-o", str(quantised), "--keep-float",
                                         str(args.keep_float), "--threads", str(args.threads), "--overwrite")
    report.sqnr = json.loads((quantised / "sqnr.json").read_text())
    from neodragon.deploy.export import Manifest

    report.shapes = {name: " ".join("x".join(map(str, t.shape)) for t in spec.inputs if t.name.startswith("clip_"))
                     or ", ".join("x".join(map(str, t.shape)) for t in spec.inputs)
                     for name, spec in Manifest.load(fp32).graphs.items()}
    report.latency = graph_latencies(fp32, quantised, args.threads)
    save(False)
    for name, backend, precision in BACKENDS:
        model = args.model if precision is None else str(args.work / precision)
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            subprocess.run([sys.executable, __file__, "--measure", model, "--backend", backend, "--result",
                            str(result), "--threads", str(args.threads), "--repeats", str(args.repeats)], check=True)
            report.pipelines[name] = json.loads(result.read_text())
        save(False)
        if not args.skip_vbench:
            out = args.work / f"vbench-{backend}-{precision or 'fp32'}.json"
            neodragon("eval", "run", model, "--backend", backend, "--out", str(out), "--overwrite",
                      *(["--limit", str(args.limit)] if args.limit else []))
            generated = json.loads(out.read_text())["generated"]
            report.vbench[name] = {"total": generated["total"], **generated["dimensions"]}
            save(False)
    save(True)
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nano", help="nano or a checkpoint folder")
    parser.add_argument("--work", type=Path, help="folder for the exported and quantised graphs (required)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep-float", type=int, default=8)
    parser.add_argument("--limit", type=int, help="VBench-nano on the first N nano-eval prompts only")
    parser.add_argument("--skip-vbench", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("docs/results/deploy.md"))
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        args.result.write_text(json.dumps(measure_pipeline(args.measure, args.backend, args.threads, args.repeats)))
    elif args.work is None:
        parser.error("--work is required")
    else:
        run_all(args)


if __name__ == "__main__":
    main()
