"""Experiment: the nano teacher DiT with a convolutional refiner on its output, fine-tuned like `train teacher`.

The DiT turns each 2 x 2 latent patch into one token and back with a linear map, so a shape edge that crosses a
token boundary must be agreed on by two tokens through attention alone. U-ViT adds a 3 x 3 convolution after
the patch-to-latent map for this reason. Here a small block at latent-pixel resolution (3 x 3 convolutions,
``width`` channels) sees the DiT's velocity and the noisy input and adds a correction; its last layer starts at
zero, so the fine-tune starts from exactly the given DiT's function. Same seed as a plain `train teacher` run,
hence the same batches: compare the two with ``benchmarks/compare_runs.py``.

    python benchmarks/exp_output_refiner.py --latents /work/runs/families/fam64 -o /work/runs/lr/ft64-refiner64 \
        --init-from <DiT folder> --steps 3000 --lr 2e-4 --width 64
"""

from __future__ import annotations

import argparse
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import neodragon.recipes.nano as nano
from neodragon.models.mmdit import PyramidMMDiT
from neodragon.recipes.cli import _config
from neodragon.recipes.teacher import TeacherRecipe


def add_refiner(dit: PyramidMMDiT, width: int) -> PyramidMMDiT:
    channels = dit.config.in_channels
    dit.refiner_in = nn.Conv2d(2 * channels, width, 3, padding=1)
    dit.refiner_mid = nn.Conv2d(width, width, 3, padding=1)
    dit.refiner_out = nn.Conv2d(width, channels, 3, padding=1)
    nn.init.zeros_(dit.refiner_out.weight)
    nn.init.zeros_(dit.refiner_out.bias)
    plain = PyramidMMDiT._forward_stage

    def forward_stage(self, clips, context, text_mask, temb):
        velocity = plain(self, clips, context, text_mask, temb)
        batch, frames = velocity.shape[0], velocity.shape[2]
        x = torch.cat([velocity, clips[-1].to(velocity.dtype)], 1).transpose(1, 2).flatten(0, 1)
        correction = self.refiner_out(F.silu(self.refiner_mid(F.silu(self.refiner_in(x)))))
        return velocity + correction.unflatten(0, (batch, frames)).transpose(1, 2)

    dit._forward_stage = types.MethodType(forward_stage, dit)
    return dit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latents", type=Path, required=True)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--init-from", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args()
    plain_initial = nano._initial_dit
    nano._initial_dit = lambda config, init_from: add_refiner(plain_initial(config, init_from), args.width)
    # `train teacher`'s own config for batch 16, --save-every 500, seed 0 and its 500 warm-up steps
    config = _config(args.output, args.steps, 16, args.lr, 500, 0, 500)
    nano.train_teacher(config, [args.latents], TeacherRecipe(), args.init_from)


if __name__ == "__main__":
    main()
