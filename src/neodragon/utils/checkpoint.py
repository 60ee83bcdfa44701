"""Describing a checkpoint folder without loading it: classes, parameter counts and sizes from file headers."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from safetensors import safe_open

# Files that mark a component folder, with the class to report when the file does not name one.
CONFIG_FILES = {"config.json": None, "scheduler_config.json": None, "tokenizer_config.json": None,
                "sentence_encoder.json": "SentenceTextEncoder"}


def package_weights(name: str) -> Path:
    """The folder ``weights/<name>`` shipped inside the package (it may not exist)."""
    return Path(str(resources.files("neodragon"))) / "weights" / name


@dataclass
class ComponentInfo:
    """One sub-folder of a checkpoint: its class, size on disk, tensor elements and config."""

    name: str
    class_name: str
    num_elements: int
    bytes_on_disk: int
    dtypes: list[str]
    config: dict = field(repr=False)


def _read_header(file: Path) -> tuple[int, set[str]]:
    count, dtypes = 0, set()
    with safe_open(str(file), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
            tensor_slice = handle.get_slice(key)
            shape = tensor_slice.get_shape()
            count += math.prod(shape)
            dtypes.add(tensor_slice.get_dtype())
    return count, dtypes


def describe_checkpoint(root: str | Path) -> list[ComponentInfo]:
    """Every component sub-folder that holds a ``config.json`` (tokenizers are listed with 0 elements)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a checkpoint folder.")
    components = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        config_file = next((folder / n for n in CONFIG_FILES if (folder / n).is_file()), None)
        if config_file is None:
            continue
        config = json.loads(config_file.read_text())
        class_name = (config.get("_class_name") or (config.get("architectures") or [None])[0]
                      or config.get("tokenizer_class") or CONFIG_FILES[config_file.name] or "?")
        elements, dtypes = 0, set()
        for weights in folder.glob("*.safetensors"):
            count, kinds = _read_header(weights)
            elements, dtypes = elements + count, dtypes | kinds
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        components.append(ComponentInfo(folder.name, class_name, elements, size, sorted(dtypes), config))
    return components
