"""Which half of a distilled text stack costs VBench-nano points: the token stream or the pooled vector?

Scores MODEL on a prompt set with the pooled vector of DONOR's text stack in place of its own (tokens unchanged):

    python experiments/text_pooled_swap.py runs/td/checkpoint nano --out student-tokens-teacher-pooled.json
"""

from __future__ import annotations

import argparse
import json

import torch

from neodragon.eval.judge import load_judge
from neodragon.eval.metrics import evaluate
from neodragon.eval.prompts import load_prompt_set
from neodragon.models.text import TextEncoding
from neodragon.presets import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("donor")
    parser.add_argument("--prompt-set", default="nano-eval")
    parser.add_argument("--seed-offset", type=int, default=0, help="added to every prompt's seed, as in `eval run`")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    pipe, donor = load_pipeline(args.model), load_pipeline(args.donor)
    own_encode = pipe.text_encoder.encode

    def encode(prompts: list[str]) -> TextEncoding:
        own = own_encode(prompts)
        return TextEncoding(own.tokens, own.mask, donor.text_encoder.encode(prompts).pooled)

    pipe.text_encoder.encode = encode
    pipe.set_progress_bar_config(disable=True)

    def generate(caption: str, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed + args.seed_offset)
        return pipe(caption, generator=generator, output_type="pt").frames[0]

    results = evaluate(generate, load_prompt_set(args.prompt_set), load_judge(None))
    with open(args.out, "w") as f:
        record = {"model": args.model, "pooled_from": args.donor, "seed_offset": args.seed_offset, **results}
        json.dump(record, f, indent=1)
    print({k: round(v, 4) for k, v in results["generated"].items() if isinstance(v, float)})


if __name__ == "__main__":
    main()
