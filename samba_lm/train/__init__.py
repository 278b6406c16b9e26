"""Training: TrainConfig, the trainer recipe, distributed setup."""

from .config import TrainConfig
from .trainer import train

__all__ = ["TrainConfig", "train"]
