"""neodragon: mobile text-to-video with a pyramidal-flow MMDiT (Neodragon), plus SHiRA and FouRA adapters."""

__version__ = "0.1.0"
