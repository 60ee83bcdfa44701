"""Compare the logged losses of `train teacher` runs that share a seed (so the same batches, units, stages and noise).

For each run: the mean logged loss per stage over step windows, and the geometric mean of its per-step loss
ratio to the first run (the control) over the steps both logged at the same stage. Pairing removes most of
the noise that comes from drawing a different unit and stage each step.

    python benchmarks/compare_runs.py /work/runs/families/ft64 /work/runs/lr/ft64-lr8e-4 --window 1000
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def read_log(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    return {row["step"]: row for row in rows}


def stage_means(log: dict[int, dict], lo: int, hi: int, stages: int = 3) -> list[float]:
    means = []
    for stage in range(stages):
        losses = [r["loss"] for s, r in log.items() if lo <= s < hi and int(r["stage"]) == stage]
        means.append(sum(losses) / len(losses) if losses else math.nan)
    return means


def paired_ratio(control: dict[int, dict], run: dict[int, dict], lo: int, hi: int,
                 stage: int | None = None) -> tuple[float, int]:
    """Geometric mean of run / control over the steps in [lo, hi) that both logged at the same stage (``stage``
    only, if given), and how many there were."""
    ratios = [run[s]["loss"] / control[s]["loss"] for s in control
              if lo <= s < hi and s in run and run[s]["stage"] == control[s]["stage"] and control[s]["loss"] > 0
              and (stage is None or int(control[s]["stage"]) == stage)]
    if not ratios:
        return math.nan, 0
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios)), len(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="Run folders (with log.jsonl); the first is the control.")
    parser.add_argument("--window", type=int, default=1000, help="Steps per window.")
    args = parser.parse_args()
    logs = [read_log(run) for run in args.runs]
    first, last = min(logs[0]), max(max(log) for log in logs)
    print("| run | steps | mean loss, stage 0 / 1 / 2 | loss / control's (geometric mean, paired steps) | the same, "
          "stage 0 / 1 / 2 |")
    print("|---|---|---|---:|---|")
    for run, log in zip(args.runs, logs, strict=True):
        for lo in range(first - first % args.window, last, args.window):
            hi = lo + args.window if lo + args.window < last else last + 1  # the last step joins the last window
            means = " / ".join(f"{m:.4f}" for m in stage_means(log, lo, hi))
            ratio, pairs = paired_ratio(logs[0], log, lo, hi)
            by_stage = " / ".join(f"{paired_ratio(logs[0], log, lo, hi, stage)[0]:.3f}" for stage in range(3))
            print(f"| {run} | {lo}-{hi} | {means} | {ratio:.3f} ({pairs}) | {by_stage} |")


if __name__ == "__main__":
    main()
