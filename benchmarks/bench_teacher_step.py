"""Where one nano-teacher training step spends its time: batch assembly, the copy to the accelerator, and the DiT's
forward + backward + AdamW step, per batch size and per (unit, stage). Runs on CUDA when there is a GPU.

Run from the repository root, on a latent cache and a trained DiT, or freshly initialised DiTs of given sizes
(step time does not depend on the weights):

    python benchmarks/bench_teacher_step.py --latents runs/latents \
        --dit src/neodragon/weights/nano/diffusion_transformer_320p_multistep_t2v --batch-sizes 256 1024 4096
    python benchmarks/bench_teacher_step.py --latents runs/latents --size 6x4 --size 10x5
    python benchmarks/bench_teacher_step.py --latents runs/latents --size 10x5 --compile default

Prints milliseconds per step, averaged over the steps after ``--warmup``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from accelerate.utils import send_to_device

from neodragon.models.mmdit import PyramidMMDiT
from neodragon.recipes.teacher import teacher_dit_config, teacher_training_data
from neodragon.schedulers import PyramidFlowMatchScheduler
from neodragon.training.flow_matching import FlowMatchingConfig, batch_flow_matching_loss, flow_matching_batches
from neodragon.training.trainer import TrainConfig


def profile(batch_fn, dit: PyramidMMDiT, device: str, steps: int, warmup: int,
            layouts: int) -> tuple[dict, dict, float]:
    """Milliseconds per step of each phase, and of forward + backward + step per (unit, stage), and the seconds of
    warm-up. Warm-up lasts ``warmup`` steps and until each of the ``layouts`` (unit, stage) pairs has run (so that
    a compiled DiT has compiled everything it will)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    scheduler, objective = PyramidFlowMatchScheduler(), FlowMatchingConfig()
    optimizer = torch.optim.AdamW(dit.parameters(), lr=1e-5)
    phases, per_stage, seen = {"batch": 0.0, "to_device": 0.0, "fwd_bwd_step": 0.0}, {}, set()

    def train_step(batch: dict) -> None:
        batch_flow_matching_loss(dit, scheduler, batch, objective)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started, warmup_steps = time.perf_counter(), 0
    while warmup_steps < warmup or len(seen) < layouts:
        batch = batch_fn(warmup_steps, 0, 1)
        train_step(batch)
        seen.add((batch["unit"], batch["stage"]))
        warmup_steps += 1
    sync()
    warmup_s = time.perf_counter() - started
    for step in range(warmup_steps, warmup_steps + steps):
        t0 = time.perf_counter()
        batch = batch_fn(step, 0, 1)
        t1 = time.perf_counter()
        batch = send_to_device(batch, device)
        sync()
        t2 = time.perf_counter()
        train_step(batch)
        sync()
        t3 = time.perf_counter()
        for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            phases[name] += seconds
        per_stage.setdefault((batch["unit"], batch["stage"]), []).append(t3 - t2)
    return ({k: round(v / steps * 1000, 1) for k, v in phases.items()},
            {k: round(sum(v) / len(v) * 1000, 1) for k, v in sorted(per_stage.items())}, warmup_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=Path, required=True, help="A `train encode-latents` folder.")
    sources = parser.add_mutually_exclusive_group(required=True)
    sources.add_argument("--dit", type=Path, help="A trained DiT folder (final/ or a bundle's).")
    sources.add_argument("--size", action="append", help="LAYERSxHEADS of a fresh DiT (as `train teacher "
                         "--layers --heads`); repeat to compare sizes.")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--cache-device", choices=["accelerator", "cpu"], default="accelerator",
                        help="Where the latent cache lives: on the accelerator as in `train teacher`, or on the CPU "
                        "(as `train teacher` did before 2026-11-26).")
    parser.add_argument("--compile", choices=["off", "default", "reduce-overhead"], default="off",
                        help="Compile the transformer blocks (dynamic shapes) in this torch.compile mode, as "
                        "`train teacher --compile` does in its default mode.")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cache, text = teacher_training_data(args.latents, device)
    if args.cache_device == "cpu":
        cache.to("cpu")
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, {len(cache)} cached videos")
    for name, dit in _dits(args.dit, args.size or []):
        dit = dit.float().to(device)
        if args.compile != "off":
            dit.compile_repeated_blocks(dynamic=True, mode=args.compile)
        print(f"DiT {name}: {sum(p.numel() for p in dit.parameters()) / 1e6:.2f} M parameters, compile "
              f"{args.compile}")
        layouts = cache.latents.shape[2] * PyramidFlowMatchScheduler().config.stages
        for batch_size in args.batch_sizes:
            config = TrainConfig("unused", batch_size=batch_size)
            batch_fn = flow_matching_batches(cache, text, config, FlowMatchingConfig(), 3)
            phases, per_stage, warmup_s = profile(batch_fn, dit, device, args.steps, args.warmup, layouts)
            print(f"batch {batch_size}: warm-up {warmup_s:.1f} s; ms per step {phases}; forward+backward+step by "
                  f"(unit, stage) {per_stage}", flush=True)


def _dits(folder: Path | None, sizes: list[str]):
    """(name, DiT) pairs: the trained one in ``folder``, or fresh ones of each ``LAYERSxHEADS`` size."""
    if folder is not None:
        yield str(folder), PyramidMMDiT.from_pretrained(folder)
    for size in sizes:
        layers, heads = (int(n) for n in size.lower().split("x"))
        yield size, PyramidMMDiT(**teacher_dit_config(layers, heads))


if __name__ == "__main__":
    main()
