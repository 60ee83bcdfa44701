"""Peak memory of exporting one DiT graph at the official width, measured for a few block counts and extrapolated
linearly to the release's 18 blocks (1.5 B parameters).

Run from the repository root:

    python benchmarks/bench_export_memory.py --layers 1 2 3 --out docs/results/deploy-export-memory.md

Each export runs in its own process (random weights; the memory does not depend on their values) at the official
stage-2 shape of the last latent frame of a 49-frame video (the largest DiT graph), and reports its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_core import ReportHead, peak_rss_gib, report_preamble, write_atomic

OFFICIAL_LAYERS = 18


def export_once(layers: int, folder: Path) -> dict:
    from neodragon.deploy.export import DiTStageGraph, export_graph
    from neodragon.models.mmdit import PyramidMMDiT

    torch.manual_seed(0)
    dit = PyramidMMDiT(num_layers=layers).eval()  # the release's widths: 24 heads x 64, 4096-d text, 2048 pooled
    shapes = _official_last_call_shapes()
    context, mask = torch.randn(1, 128, 1536), torch.ones(1, 128, dtype=torch.long)
    args = (context, mask, torch.randn(1, 2048), torch.tensor([500.0]), *(torch.randn(s) for s in shapes))
    names = ["context", "mask", "pooled", "timestep", *(f"clip_{i}" for i in range(len(shapes)))]
    (folder / "graphs").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    export_graph(DiTStageGraph(dit), args, names, ["velocity"], folder, "dit", "transformer")
    seconds = time.perf_counter() - start
    return {"layers": layers, "params": sum(p.numel() for p in dit.parameters()), "seconds": seconds,
            "peak_rss_gib": peak_rss_gib(),
            "clips": [list(s) for s in shapes]}


def _official_last_call_shapes() -> list[tuple[int, ...]]:
    """Clip shapes of the official schedule's largest call: stage 2 of latent frame 6 (49 frames, 320x512)."""
    from neodragon.schedulers import PyramidFlowMatchScheduler

    scheduler = PyramidFlowMatchScheduler()
    pyramid = scheduler.latent_pyramid(torch.zeros(1, 16, 1, 40, 64))
    history = scheduler.history_from_pyramids([pyramid] * 6)
    return [tuple(c.shape) for c in [*history[2], pyramid[2]]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=Path("docs/results/deploy-export-memory.md"))
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        with tempfile.TemporaryDirectory() as tmp:
            args.result.write_text(json.dumps(export_once(args.measure, Path(tmp))))
        return
    head, rows = ReportHead(), []
    for layers in args.layers:
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            subprocess.run([sys.executable, __file__, "--measure", str(layers), "--result", str(result)], check=True)
            rows.append(json.loads(result.read_text()))
        print(rows[-1])
    params, rss = np.array([r["params"] for r in rows], float), np.array([r["peak_rss_gib"] for r in rows])
    per_param, base = np.polyfit(params, rss, 1)
    per_layer = (params[-1] - params[0]) / (rows[-1]["layers"] - rows[0]["layers"]) if len(rows) > 1 else 0.0
    official = params[0] + per_layer * (OFFICIAL_LAYERS - rows[0]["layers"])
    lines = report_preamble("Export memory of the official DiT (one graph)", head, True, "")
    lines += ["", f"Largest official graph: stage 2 of latent frame 6, clips {rows[0]['clips']}, 128 text tokens.", "",
              "| blocks | parameters | export (s) | peak RSS (GiB) |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['layers']} | {r['params'] / 1e6:.0f} M | {r['seconds']:.0f} | {r['peak_rss_gib']:.2f} |"
              for r in rows]
    lines += ["", f"Linear fit: peak RSS = {base:.2f} GiB + {per_param * 2**30:.1f} bytes per parameter. At the "
              f"release's {OFFICIAL_LAYERS} blocks ({official / 1e9:.2f} B parameters) that is "
              f"**{base + per_param * official:.1f} GiB** for one DiT graph (fp32 export with the PyTorch check; "
              "weights above 1 GiB go to an external data file)."]
    write_atomic(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
