"""Training defaults (the first stage's architecture, the patch discriminator and its smallest input) and
the model-folder test, without importing torch: the CLI checks arguments against them before it loads anything heavy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_AE", "DEFAULT_DISCRIMINATOR", "smallest_disc_crop", "is_model_folder"]

DEFAULT_AE: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "latent_channels": 4,
    "channels": [16, 32, 64],
    "num_res_blocks": 1,
    "norm_num_groups": 16,
    "attention_levels": [False, False, False],
    "with_encoder_nonlocal_attn": False,
    "with_decoder_nonlocal_attn": False,
}

DEFAULT_DISCRIMINATOR: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "channels": 32,
    "num_layers_d": 3,
    "norm": "INSTANCE",
}


def smallest_disc_crop(discriminator: dict[str, Any]) -> int:
    """The smallest cube a ``PatchDiscriminator`` of this config takes, ``3 x 2**num_layers_d`` voxels (its last
    normalised layer must keep more than one voxel; found by trying every size for 1-4 layers)."""
    return 3 * 2 ** int(discriminator.get("num_layers_d", 3))


def is_model_folder(path: str | Path) -> bool:
    """A packaged LDM folder (``config.json`` + ``autoencoder.safetensors``), as opposed to a training run."""
    p = Path(path)
    return (p / "config.json").is_file() and (p / "autoencoder.safetensors").is_file()
