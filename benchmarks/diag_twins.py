"""Does a nano DiT draw the shape its caption names? The shape-twin pair error, per pyramid stage.

A shape twin (`neodragon train encode-latents --twins`) is a training video re-rendered with another shape and its
caption's shape word changed, nothing else. Given a video and its twin with the same noise, timestep and history, a
DiT that reads the shape word predicts two velocities that differ as the two targets do; one that ignores the word
predicts the same for both. ``pair_error`` measures this: 1 for a word-blind DiT, 0 for a perfect one. Computed
here on twins of videos the DiTs never saw (another ``--seed``), without caption dropout, over the same training
draws for every DiT:

    neodragon train encode-latents --vae nano -o /work/runs/twins/heldout --num-videos 256 --seed 3 --twins
    python benchmarks/diag_twins.py --latents /work/runs/twins/heldout \
        --dit src/neodragon/weights/nano/diffusion_transformer_320p_multistep_t2v /work/runs/twins/ft-pair/final \
        --out docs/results/teacher-twins.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from bench_core import ReportHead, finish_report

from neodragon.models.mmdit import PyramidMMDiT
from neodragon.recipes.nano import LatentCache, batch_flow_matching_loss, flow_matching_batches, teacher_training_data
from neodragon.recipes.teacher import TeacherRecipe
from neodragon.recipes.training import TrainConfig
from neodragon.schedulers import PyramidFlowMatchScheduler


@torch.no_grad()
def pair_errors(dit: PyramidMMDiT, cache: LatentCache, text, steps: int, batch_size: int) -> dict[tuple, list]:
    """Relative pair error, pair MSE and flow-matching loss of ``steps`` batches, grouped by (stage, unit 0 or
    later)."""
    scheduler = PyramidFlowMatchScheduler()
    config = TrainConfig(output_dir="unused", batch_size=batch_size, seed=0)
    batches = flow_matching_batches(cache, text, config, 0.0, scheduler.config.stages, twins=True)
    recipe = TeacherRecipe(text_dropout=0.0, pair_weight=1.0)
    groups: dict[tuple, list] = {}
    for step in range(steps):
        batch = batches(step, 0, 1)
        if not len(batch["twin_source"]):
            continue
        out = batch_flow_matching_loss(dit, scheduler, batch, recipe)
        key = (batch["stage"], "0" if batch["unit"] == 0 else "1-2")
        groups.setdefault(key, []).append((float(out["pair"]), float(out["pair_mse"]),
                                           float(out["loss"] - out["pair_mse"])))
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latents", type=Path, required=True, help="an `encode-latents --twins` folder")
    parser.add_argument("--dit", type=Path, nargs="+", required=True, help="DiT folders (final/ or a bundle's)")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("docs/results/teacher-twins.md"))
    args = parser.parse_args()
    report = ReportHead()
    cache, text = teacher_training_data(args.latents, TeacherRecipe(), "cpu")
    if not (cache.twin >= 0).any():
        parser.error(f"{args.latents} holds no shape twins: encode it with `encode-latents --twins`.")
    rows = ["| DiT | stage | units | batches | pair error (relative) | pair MSE | flow-matching loss |",
            "|---|---:|---|---:|---:|---:|---:|"]
    for folder in args.dit:
        dit = PyramidMMDiT.from_pretrained(folder).float().eval()
        groups = pair_errors(dit, cache, text, args.steps, args.batch_size)
        for (stage, units), values in sorted(groups.items()):
            pair, mse, loss = (sum(v[i] for v in values) / len(values) for i in (0, 1, 2))
            rows.append(f"| {folder} | {stage} | {units} | {len(values)} | {pair:.3f} | {mse:.5f} | {loss:.4f} |")
        every = [v for values in groups.values() for v in values]
        pair, mse, loss = (sum(v[i] for v in every) / len(every) for i in (0, 1, 2))
        rows.append(f"| {folder} | all | all | {len(every)} | **{pair:.3f}** | {mse:.5f} | {loss:.4f} |")
    legend = (f"{int((cache.twin >= 0).sum()) // 2} twin pairs in {args.latents}, {args.steps} batches of "
              f"{args.batch_size} (plus twins) per DiT. Pair error: 1 = the DiT draws a video and its twin alike "
              "(ignores the shape word), 0 = each as its target.")
    finish_report(args.out, "Shape-twin pair error of nano DiTs", report, "2 threads", [legend, "", *rows])


if __name__ == "__main__":
    main()
