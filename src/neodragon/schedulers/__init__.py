from .pyramid_flow import PyramidFlowMatchScheduler

__all__ = ["PyramidFlowMatchScheduler"]
