"""How much of a model's object accuracy comes from split objects? Re-reads `neodragon eval run` results.

When the judge sees more objects than the prompt names, the scoring matches each prompted object to the predicted
one that agrees best, so a single object drawn as several blobs gets several guesses at its shape and colour.
`by_object_count(...)["if_count_right"]` (in every `eval run` since 2026-11-27) scores only the videos with the
prompted number of objects; this recomputes it from the per-prompt rows of older result files:

    python benchmarks/diag_split_objects.py docs/results/vbench-nano-teacher-eval.json ... \
        --out docs/results/teacher-split-objects.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_core import ReportHead, finish_report

from neodragon.eval.judge import OBJECT_ATTRIBUTES
from neodragon.eval.metrics import by_object_count
from neodragon.eval.prompts import load_prompt_set


def rows_for(path: Path) -> list[str]:
    results = json.loads(path.read_text())
    entries = {e.id: e for e in load_prompt_set(results["prompt_set"])}
    table = by_object_count([p["correct"] for p in results["per_prompt"]],
                            [entries[p["id"]] for p in results["per_prompt"]])
    rows = []
    for n, group in table.items():
        right = group["if_count_right"]
        cells = [f"{group[a]:.0%} / " + ("-" if right[a] is None else f"{right[a]:.0%}") for a in OBJECT_ATTRIBUTES]
        rows.append(f"| {path.name} | {n} | {group['prompts']} | {group['count']:.0%} | {right['prompts']} | "
                    + " | ".join(cells) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="`eval run` JSON files")
    parser.add_argument("--out", type=Path, default=Path("docs/results/teacher-split-objects.md"))
    args = parser.parse_args()
    report = ReportHead()
    lines = ["| results | objects | prompts | count right | prompts with count right | "
             + " | ".join(f"{a}: all / count right" for a in OBJECT_ATTRIBUTES) + " |",
             "|---|---:|---:|---:|---:|" + "---|" * len(OBJECT_ATTRIBUTES)]
    for path in args.results:
        lines += rows_for(path)
    finish_report(args.out, "Object accuracy with and without split objects", report, "reads files only", lines)


if __name__ == "__main__":
    main()
