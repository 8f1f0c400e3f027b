"""VQ-VAE + autoregressive transformer: the second generator backend and the neural codec's model.

Tudosiu et al. 2022 (the Synthetic Brain Project). Names are imported lazily, so ``synth.vq.cli``
(parsed at every ``synthbrain`` call) does not import torch; fast_transformers and constriction
are imported only where needed.
"""

from importlib import import_module

_EXPORTS = {
    "DEFAULT_VQVAE": "vqvae",
    "VQVAE": "vqvae",
    "build_vqvae": "vqvae",
    "CodeTransformer": "transformer",
    "IncrementalDecoder": "transformer",
    "WavefrontDecoder": "transformer",
    "fast_transformers_available": "transformer",
    "resolve_engine": "transformer",
    "EMAQuantizer": "quantizer",
    "VQModelConfig": "config",
    "VQBrainGenerator": "generator",
    "sample_codes": "sampler",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
