"""VQ-VAE + autoregressive transformer: the second generator backend and the neural codec's model.

Tudosiu et al. 2022 (the Synthetic Brain Project). Heavy or optional parts (fast_transformers,
constriction) are imported only where needed.
"""

from .config import VQModelConfig
from .quantizer import EMAQuantizer
from .transformer import CodeTransformer, IncrementalDecoder, fast_transformers_available, resolve_engine
from .vqvae import DEFAULT_VQVAE, VQVAE, build_vqvae

__all__ = [
    "DEFAULT_VQVAE",
    "VQVAE",
    "CodeTransformer",
    "EMAQuantizer",
    "IncrementalDecoder",
    "VQModelConfig",
    "build_vqvae",
    "fast_transformers_available",
    "resolve_engine",
]
