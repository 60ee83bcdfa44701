"""How a VBench-nano judge reads real videos whose objects wobble from frame to frame.

Generated objects are never pixel-exact from frame to frame (docs/journal/nano-teacher.md). This renders real
held-out videos with a per-frame jitter (``render(..., jitter=J)``: size by up to J, place by up to J radii; every
label stays true) and reports each judge's accuracy per level, with the motion accuracy on still objects
separately.

    python benchmarks/bench_judge_jitter.py --judge <judge folder> [<judge folder> ...] --count 500 \
        --levels 0 0.05 0.1 0.15 0.2 --out docs/results/judge-jitter.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neodragon.eval.judge import load_judge, real_predictions
from neodragon.eval.metrics import accuracy_table
from neodragon.utils.video import atomic_path

COLUMNS = ("shape", "colour", "size", "motion", "count", "relation", "combination")


def still_accuracy(predicted: list[dict], truth: list[dict]) -> tuple[int, int]:
    """(right, total) motion readings of the objects that do not move (one-object videos)."""
    pairs = [(p["objects"][0]["motion"], t["objects"][0]["motion"]) for p, t in zip(predicted, truth, strict=True)
             if len(t["objects"]) == 1 and len(p["objects"]) == 1 and t["objects"][0]["motion"] == "still"]
    return sum(p == t for p, t in pairs), len(pairs)


def rows(judge_path: str, count: int, levels: list[float]) -> list[str]:
    judge = load_judge(None if judge_path == "bundled" else judge_path)
    out = []
    for level in levels:
        predicted, truth, _ = real_predictions(judge, "heldout", count, jitter=level)
        table = accuracy_table(predicted, truth)
        right, total = still_accuracy(predicted, truth)
        cells = " | ".join(f"{100 * table[c]:.1f}%" for c in COLUMNS)
        out.append(f"| {judge_path} | {level:g} | {cells} | {right}/{total} |")
        print(out[-1], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--judge", nargs="+", default=["bundled"], help="Judge folders ('bundled': the package's).")
    parser.add_argument("--count", type=int, default=500, help="Real held-out videos per level (every style).")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.15, 0.2])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    lines = ["# Judge accuracy on real held-out videos with per-frame jitter\n",
             f"`python benchmarks/bench_judge_jitter.py {' '.join(sys.argv[1:])}`\n",
             f"{args.count} videos of the `heldout` split per level, every style. Jitter J: each object's size "
             "changes by up to J and its centre by up to J radii, independently per frame; labels unchanged. "
             "`still`: motion readings right / one-object videos whose object is still.\n",
             "| judge | jitter | " + " | ".join(COLUMNS) + " | still |",
             "|---|---:|" + "---:|" * len(COLUMNS) + "---:|"]
    for judge_path in args.judge:
        lines += rows(judge_path, args.count, args.levels)
    with atomic_path(args.out, overwrite=True) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
