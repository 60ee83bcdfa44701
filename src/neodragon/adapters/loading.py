"""Adapters at inference: find a trained adapter (a folder, or one a checkpoint ships), read its ``adapter.json``
and make it act on a pipeline, as diffusers' ``loaders`` do for LoRA (``load_lora_weights``, ``set_adapters``).
Nothing here imports the training code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from peft import PeftModel
from torch import nn

from .foura import FouraModel
from .shira import ShiraAdapter, add_shira, fuse_adapters
from .switching import AdapterSwitcher

if TYPE_CHECKING:
    from ..pipelines.neodragon import NeodragonPipeline

COMPONENTS = ("dit", "decoder")
INFO_FILE = "adapter.json"
SHIRA_FILE = "adapter.safetensors"
ADAPTERS_FOLDER = "adapters"  # a checkpoint's ready-made adapters: <checkpoint>/adapters/<name>/


def check_component(component: str) -> None:
    if component not in COMPONENTS:
        raise ValueError(f"Unknown component {component!r}; adapters train on one of {', '.join(COMPONENTS)}.")


def adapted_module(pipe: NeodragonPipeline, component: str) -> nn.Module:
    """The pipeline's module that a ``component`` adapter wraps (its layer names are relative to it)."""
    check_component(component)
    return pipe.transformer if component == "dit" else pipe.vae.decoder


def read_info(folder: str | Path) -> dict:
    """``adapter.json`` of a trained adapter folder (``component`` is ``"dit"`` in files written before decoder
    adapters existed)."""
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a trained adapter folder (no {INFO_FILE}); pass the final/ folder "
                                "written by `neodragon adapter train`.")
    return {"component": "dit", **json.loads(path.read_text())}


def checkpoint_adapters(checkpoint: str | Path | None) -> dict[str, Path]:
    """The ready-made adapters a checkpoint folder ships, by name (``<checkpoint>/adapters/<name>/``)."""
    folder = Path(checkpoint) / ADAPTERS_FOLDER if checkpoint is not None else None
    if folder is None or not folder.is_dir():
        return {}
    return {p.name: p for p in sorted(folder.iterdir()) if (p / INFO_FILE).is_file()}


def find_adapter(name_or_path: str | Path, checkpoint: str | Path | None = None) -> Path:
    """A trained adapter folder given as a path, or by the name of one of ``checkpoint``'s ready-made adapters."""
    path = Path(name_or_path)
    if (path / INFO_FILE).is_file():
        return path
    shipped = checkpoint_adapters(checkpoint)
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    names = ", ".join(shipped) or "none"
    raise FileNotFoundError(f"{name_or_path} is not a trained adapter folder (no {INFO_FILE}) nor one of the model's "
                            f"own adapters ({names}); pass the final/ folder written by `neodragon adapter train`.")


def load_adapter(module: nn.Module, folder: str | Path, adapter_name: str = "default") -> nn.Module:
    """``module`` (the DiT, or the decoder for a decoder adapter: ``adapted_module``) with the trained adapter of
    ``folder`` attached unmerged (frozen), ready for inference."""
    info = read_info(folder)
    if info["method"] == "shira":
        add_shira(module, ShiraAdapter.load(Path(folder) / SHIRA_FILE), trainable=False)
        return module
    return PeftModel.from_pretrained(module, str(folder), adapter_name=adapter_name)


def attach_trained_adapters(pipe: NeodragonPipeline, folders: list[str | Path]) -> None:
    """Make trained adapters act on the pipeline, each on its component, at strength 1, for good.

    Per component, SHiRA adapters are fused (``fuse_adapters``) and scattered into the weights
    (``AdapterSwitcher``); PEFT adapters (LoRA or FouRA, one method per component) are loaded and all activated.
    """
    groups: dict[str, dict[str, list[tuple[str, Path]]]] = {}
    for index, folder in enumerate(folders):
        info = read_info(folder)
        groups.setdefault(info["component"], {}).setdefault(info["method"], []).append((f"adapter{index}",
                                                                                       Path(folder)))
    for component, methods in groups.items():
        module = adapted_module(pipe, component)
        if len(methods.keys() - {"shira"}) > 1:
            raise ValueError(f"The {component} adapters mix {' and '.join(sorted(methods.keys() - {'shira'}))}; PEFT "
                             "activates one method per model. Apply adapters of one PEFT method (SHiRA mixes).")
        if "shira" in methods:
            fused = fuse_adapters([ShiraAdapter.load(folder / SHIRA_FILE) for _, folder in methods.pop("shira")])
            AdapterSwitcher(module).apply(fused)
        for named in methods.values():
            model = load_peft_adapters(module, dict(named))
            activate_peft_adapters(model, [name for name, _ in named])
            model.eval()


def load_peft_adapters(module: nn.Module, folders: dict[str, str | Path]) -> PeftModel:
    """PEFT adapters (LoRA or FouRA, one method) of ``folders`` loaded unmerged onto ``module`` under their names."""
    (first, path), *others = folders.items()
    model = load_adapter(module, path, adapter_name=first)
    for name, path in others:
        model.load_adapter(str(path), adapter_name=name)
    return model


def activate_peft_adapters(model: PeftModel, names: list[str]) -> None:
    """Make exactly the adapters ``names`` act, at strength 1 each (FouRA composes them with ``set_strengths``)."""
    model.base_model.set_adapter(list(names))
    if isinstance(model.base_model, FouraModel):
        model.base_model.set_strengths(dict.fromkeys(names, 1.0))
