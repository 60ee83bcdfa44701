"""Reusable training code: the Accelerate loop, the objectives and the data they read. Recipes build on it."""

from .trainer import TrainConfig, Trainer, cycle_indices, read_log

__all__ = ["TrainConfig", "Trainer", "cycle_indices", "read_log"]
