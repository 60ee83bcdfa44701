"""Do decoder style adapters still make their style on a model? The judge's style reading of the first N
``nano-eval`` prompts (one seed each), decoded without and with each adapter from the same latents.

    python experiments/decoder_style_reading.py nano neon outline --prompts 24
    python experiments/decoder_style_reading.py runs/td-dd/checkpoint runs/ad/neon/final runs/ad/outline/final
"""

from __future__ import annotations

import argparse
import json

import torch

from neodragon.adapters.loading import attach_trained_adapters, find_adapter
from neodragon.eval.judge import load_judge
from neodragon.eval.prompts import load_prompt_set
from neodragon.presets import load_pipeline, local_folder


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("adapters", nargs="+", help="adapter folders or names the model ships")
    parser.add_argument("--prompts", type=int, default=24)
    args = parser.parse_args()
    judge = load_judge(None)
    entries = [e for e in load_prompt_set("nano-eval") if "style" not in e.scene or e.scene["style"] == "none"]
    captions = [e.caption for e in entries[: args.prompts]]
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.cat([pipe(c, generator=torch.Generator().manual_seed(i), output_type="latent").frames
                         for i, c in enumerate(captions)])
    readings = {"none": _styles(judge, pipe, latents)}
    for adapter in args.adapters:
        styled = load_pipeline(args.model)
        attach_trained_adapters(styled, [find_adapter(adapter, local_folder(args.model))])
        readings[adapter] = _styles(judge, styled, latents)
    print(json.dumps({"model": args.model, "prompts": len(captions), "style_readings": readings}, indent=1))


def _styles(judge, pipe, latents: torch.Tensor) -> dict[str, int]:
    videos = torch.cat([pipe.decode_latents(latents[i : i + 1]).clamp(-1, 1) for i in range(len(latents))])
    predicted, _ = judge.predict(videos)
    counts: dict[str, int] = {}
    for scene in predicted:
        counts[scene["style"]] = counts.get(scene["style"], 0) + 1
    return counts


if __name__ == "__main__":
    main()
