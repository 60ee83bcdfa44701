"""Model components of Neodragon, each a diffusers ModelMixin (or a transformers PreTrainedModel for DT5)."""

from .context_adapter import ContextAdapter, SkipMLP
from .first_frame import FirstFrameGenerator, SSD1BFirstFrameGenerator
from .mmdit import PyramidMMDiT
from .sr import QuickSRNet
from .text import T5EncoderWithProjection, T5ProjectionConfig, TextEncoderBundle, TextEncoding
from .vae import AsymmetricCausalVideoVAE

__all__ = [
    "AsymmetricCausalVideoVAE",
    "ContextAdapter",
    "FirstFrameGenerator",
    "PyramidMMDiT",
    "QuickSRNet",
    "SSD1BFirstFrameGenerator",
    "SkipMLP",
    "T5EncoderWithProjection",
    "T5ProjectionConfig",
    "TextEncoderBundle",
    "TextEncoding",
]
