"""neodragon: mobile text-to-video with a pyramidal-flow MMDiT (Neodragon), plus SHiRA and FouRA adapters."""

from importlib import import_module

__version__ = "0.1.0"

# Loaded on first use so that `neodragon --help` does not import torch and diffusers.
_LAZY = {
    "NeodragonPipeline": "neodragon.pipelines",
    "PyramidFlowMatchScheduler": "neodragon.schedulers",
    "load_pipeline": "neodragon.presets",
    "export_to_video": "neodragon.utils.video",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'neodragon' has no attribute {name!r}")
