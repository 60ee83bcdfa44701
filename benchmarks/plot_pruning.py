"""Pictures of recipe 3: the block-importance chart (from `neodragon prune importance`'s importance.json) and the
recovery curves (from the runs' log.jsonl). Drawn with PIL, which the package already needs. From the repository
root:

    python benchmarks/plot_pruning.py importance runs/imp/importance.json --out docs/results/pruning-importance.png
    python benchmarks/plot_pruning.py curves 'stage 1=runs/s1' 'stage 2=runs/s2' --key to_truth,loss \
        --out docs/results/pruning-recovery.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

from neodragon.training.trainer import read_log
from neodragon.utils.video import atomic_path

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
WIDTH, HEIGHT, MARGIN = 900, 420, 60


def _frame(title: str) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 15), title, fill="black")
    draw.line([(MARGIN, HEIGHT - MARGIN), (WIDTH - 20, HEIGHT - MARGIN)], fill="black")
    draw.line([(MARGIN, 40), (MARGIN, HEIGHT - MARGIN)], fill="black")
    return image, draw


def _legend(draw: ImageDraw.ImageDraw, names: list[str]) -> None:
    for i, name in enumerate(names):
        x = MARGIN + 10 + 210 * (i % 4)
        y = 28 + 12 * (i // 4) + 10
        draw.rectangle([x, y, x + 10, y + 8], fill=COLOURS[i % len(COLOURS)])
        draw.text((x + 14, y - 2), name, fill="black")


def importance_chart(result: dict) -> Image.Image:
    """Per block, four bars each scaled to its largest value: the two cosine importances and the two measured
    costs of removing the block (held-out loss increase, VBench-nano total drop)."""
    blocks = range(result["num_layers"] - 1)  # the last block is always kept
    base_loss = result["heldout_loss"]["none"]
    series = {"BI visual": [result["visual"][b] for b in blocks],
              "BI text": [result["text"][b] or 0.0 for b in blocks],
              "held-out loss increase": [result["heldout_loss"][str(b)] - base_loss for b in blocks]}
    if result.get("vbench"):
        base = result["vbench"]["none"]["total"]
        series["VBench-nano total drop"] = [base - result["vbench"][str(b)]["total"] for b in blocks]
    image, draw = _frame("Block importance and the measured cost of removing each block (each series / its max)")
    _legend(draw, [f"{name} (max {max(values):.4g})" for name, values in series.items()])
    slot = (WIDTH - MARGIN - 40) / len(blocks)
    bar = slot * 0.8 / len(series)
    for i, values in enumerate(series.values()):
        top = max(max(values), 1e-12)
        for b, value in zip(blocks, values, strict=True):
            x = MARGIN + 10 + b * slot + i * bar
            y = HEIGHT - MARGIN - max(value, 0.0) / top * (HEIGHT - MARGIN - 80)
            draw.rectangle([x, y, x + bar - 2, HEIGHT - MARGIN], fill=COLOURS[i])
    for b in blocks:
        draw.text((MARGIN + 10 + b * slot + slot * 0.35, HEIGHT - MARGIN + 8), f"block {b}", fill="black")
    return image


def _smooth(points: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """Trailing mean over ``window`` logged points (single batches are noisy: one unit, one stage each)."""
    values = [v for _, v in points]
    return [(s, sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1]))
            for i, (s, _) in enumerate(points)]


def curves_chart(runs: dict[str, list[dict]], key: str, window: int = 1) -> Image.Image:
    """``key`` of each run's log against its step, as a trailing mean over ``window`` logged points. ``key`` may
    list alternatives (``to_truth,loss``: stage 2 logs its flow-matching loss as to_truth, stage 1 as loss)."""
    def value(record: dict) -> float | None:
        return next((record[k] for k in key.split(",") if k in record), None)

    points = {name: _smooth([(r["step"], value(r)) for r in log if value(r) is not None], window)
              for name, log in runs.items()}
    steps = [s for p in points.values() for s, _ in p]
    values = [v for p in points.values() for _, v in p]
    low, high, last = min(values), max(values), max(steps)
    image, draw = _frame(f"Recovery: {key} per step, mean of {window} logged points (y from {low:.4g} to {high:.4g})")
    _legend(draw, list(points))
    for i, series in enumerate(points.values()):
        xy = [(MARGIN + s / last * (WIDTH - MARGIN - 30),
               HEIGHT - MARGIN - (v - low) / max(high - low, 1e-12) * (HEIGHT - MARGIN - 80)) for s, v in series]
        draw.line(xy, fill=COLOURS[i % len(COLOURS)], width=2)
    draw.text((WIDTH - 120, HEIGHT - MARGIN + 8), f"step {last}", fill="black")
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    importance = sub.add_parser("importance")
    importance.add_argument("result", type=Path)
    curves = sub.add_parser("curves")
    curves.add_argument("runs", nargs="+", help="NAME=RUN_FOLDER")
    curves.add_argument("--key", default="loss")
    curves.add_argument("--window", type=int, default=20, help="trailing mean over this many logged points")
    for command in (importance, curves):
        command.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.what == "importance":
        image = importance_chart(json.loads(args.result.read_text()))
    else:
        image = curves_chart({name: read_log(folder) for name, folder in (r.split("=", 1) for r in args.runs)},
                             args.key, args.window)
    with atomic_path(args.out, overwrite=True) as tmp:
        image.save(tmp, format="PNG")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
