"""Generation pipelines."""

from .neodragon import NeodragonPipeline, NeodragonPipelineOutput, PipelineConfig

__all__ = ["NeodragonPipeline", "NeodragonPipelineOutput", "PipelineConfig"]
