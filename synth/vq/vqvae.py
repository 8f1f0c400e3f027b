"""A 3D VQ-VAE on MONAI blocks: ``AutoencoderKL``'s encoder and decoder around an EMA quantiser.

Tudosiu et al., "Morphology-preserving autoregressive 3D generative modelling of the brain",
SASHIMI 2022 (the Synthetic Brain Project): a VQ-VAE turns a T1 volume into a grid of discrete
codes that a transformer models autoregressively. Here the encoder and decoder are MONAI's
``AutoencoderKL`` blocks (Pinaya et al. 2022) with the Gaussian bottleneck replaced by
:class:`~synth.vq.quantizer.EMAQuantizer`, so the project's trained first stage can initialise it
(same module names, ``--init-autoencoder``). With the default three levels the 80 x 96 x 80 grid
becomes 20 x 24 x 20 = 9,600 codes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models.networks import build_autoencoder
from ..train.defaults import DEFAULT_AE
from .quantizer import EMAQuantizer

__all__ = ["VQVAE", "VQVAEOutput", "DEFAULT_VQVAE"]

DEFAULT_VQVAE: dict[str, Any] = {
    # the LDM's first stage, so that a trained one can initialise this (--init-autoencoder)
    "autoencoder": copy.deepcopy(DEFAULT_AE),
    "num_embeddings": 512,
    "embedding_dim": 4,
    "commitment_cost": 0.25,
    "decay": 0.99,
}


@dataclass
class VQVAEOutput:
    """Reconstruction (B, 1, X, Y, Z), indices (B, x, y, z), commitment loss and codebook perplexity."""

    reconstruction: torch.Tensor
    indices: torch.Tensor
    commitment: torch.Tensor
    perplexity: torch.Tensor


class VQVAE(nn.Module):
    """Encoder -> (1x1 conv) -> vector quantiser -> (1x1 conv) -> decoder.

    Args:
        autoencoder: Keyword arguments of MONAI ``AutoencoderKL`` (its encoder, ``quant_conv_mu``,
            ``post_quant_conv`` and decoder are used; each level after the first halves the grid).
        num_embeddings: Codebook size.
        embedding_dim: Code dimension; a 1x1 convolution maps ``latent_channels`` to it when they differ.
        commitment_cost: Weight ``beta`` of the commitment loss (returned unweighted; the trainer weighs it).
        decay: EMA decay of the codebook.
    """

    def __init__(self, autoencoder: dict[str, Any], num_embeddings: int = 512, embedding_dim: int = 4,
                 commitment_cost: float = 0.25, decay: float = 0.99):
        super().__init__()
        self.ae = build_autoencoder(autoencoder)
        latent = int(autoencoder["latent_channels"])
        self.factor = 2 ** (len(autoencoder["channels"]) - 1)
        self.commitment_cost = commitment_cost
        self.pre = nn.Identity() if embedding_dim == latent else nn.Conv3d(latent, embedding_dim, 1)
        self.post = nn.Identity() if embedding_dim == latent else nn.Conv3d(embedding_dim, latent, 1)
        self.quantizer = EMAQuantizer(num_embeddings, embedding_dim, decay=decay)

    @property
    def num_embeddings(self) -> int:
        return self.quantizer.num_embeddings

    def code_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(x, y, z) code grid of an (X, Y, Z) image; each size must divide by the downsampling factor."""
        if any(s % self.factor for s in image_shape):
            raise ValueError(f"image shape {tuple(image_shape)} must divide by {self.factor} on every axis")
        return tuple(s // self.factor for s in image_shape)

    def encode_continuous(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) -> (B, D, x, y, z) encoder output before quantisation."""
        return self.pre(self.ae.quant_conv_mu(self.ae.encoder(x)))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) images in [0, 1] -> (B, x, y, z) int64 code indices."""
        self.code_shape(tuple(x.shape[2:]))
        return self.quantizer.assign(self.encode_continuous(x))

    def decode_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, x, y, z) code indices -> (B, 1, X, Y, Z) images (not clamped)."""
        z = self.quantizer.embed(indices)
        return self.ae.decode(self.post(z).to(next(self.ae.decoder.parameters()).dtype))

    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        q = self.quantizer(self.encode_continuous(x))
        recon = self.ae.decode(self.post(q.quantized))
        return VQVAEOutput(recon, q.indices, q.commitment, q.perplexity)


def build_vqvae(config: dict[str, Any]) -> VQVAE:
    """A :class:`VQVAE` from a config dict like :data:`DEFAULT_VQVAE`."""
    return VQVAE(config["autoencoder"], int(config["num_embeddings"]), int(config["embedding_dim"]),
                 float(config.get("commitment_cost", 0.25)), float(config.get("decay", 0.99)))
