"""Model configs, network builders and weight loading."""

from .config import ModelConfig
from .networks import build_autoencoder, build_unet

__all__ = ["ModelConfig", "build_autoencoder", "build_unet"]
