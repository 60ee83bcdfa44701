"""SHiRA and FouRA adapters, and the PEFT LoRA baseline sized to match them.

- :mod:`.shira`: masks (struct, random, wm, grad, snip), training layers, files, PEFT interop, fusion metrics.
- :mod:`.switching`: ``AdapterSwitcher``, fused-mode switching between SHiRA adapters.
- :mod:`.foura`: FouRA as the PEFT method ``"foura"`` (registered on import).
- :mod:`.lora`: PEFT LoRA configs with a SHiRA adapter's parameter count.
- :mod:`.loading`: inference-time loading: ``find_adapter``, ``load_adapter``, ``attach_trained_adapters``
  (imports no training code).
- :mod:`.training`: ``train_adapter``, one style adapter (SHiRA, LoRA or FouRA at an equal budget) on a checkpoint's
  DiT or decoder (``neodragon adapter train``).
"""

from importlib import import_module

# Loaded on first use: FouRA and LoRA import peft, which takes seconds.
_LAZY = {
    "DIT_TARGETS": "neodragon.models.mmdit",
    **dict.fromkeys(("MaskSpec", "ShiraAdapter", "ShiraLayer", "add_shira", "build_shira",
                     "fuse_adapters", "get_shira", "orthogonality", "overlap_stats", "remove_shira"),
                    "neodragon.adapters.shira"),
    "AdapterSwitcher": "neodragon.adapters.switching",
    **dict.fromkeys(("FouraConfig", "FouraModel", "FouraLinear", "FouraConv2d"), "neodragon.adapters.foura"),
    **dict.fromkeys(("matching_lora_config", "lora_param_count"), "neodragon.adapters.lora"),
    **dict.fromkeys(("attach_trained_adapters", "checkpoint_adapters", "find_adapter", "load_adapter", "read_info"),
                    "neodragon.adapters.loading"),
    **dict.fromkeys(("AdapterRecipe", "METHODS", "StyleData", "TrainedAdapter", "encode_style_videos",
                     "train_adapter"), "neodragon.adapters.training"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'neodragon.adapters' has no attribute {name!r}")
