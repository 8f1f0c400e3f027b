"""Build the MONAI networks of a :class:`ModelConfig`."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["autocast", "build_autoencoder", "build_unet", "count_parameters", "latent_mean"]


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CPU (avx512_bf16) and CUDA; a no-op when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def latent_mean(ae: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The mean of q(z|x) of an ``AutoencoderKL``: the latent the diffusion model is trained on."""
    return ae.quant_conv_mu(ae.encoder(x))


def build_autoencoder(kwargs: dict[str, Any]) -> torch.nn.Module:
    """MONAI ``AutoencoderKL`` (Rombach et al. 2022, Pinaya et al. 2022) from config keywords."""
    from monai.networks.nets import AutoencoderKL

    kw = dict(kwargs)
    for key in ("channels", "attention_levels"):
        if key in kw:
            kw[key] = tuple(kw[key])
    return AutoencoderKL(**kw)


def build_unet(kwargs: dict[str, Any]) -> torch.nn.Module:
    """MONAI ``DiffusionModelUNet`` (Ho et al. 2020; Rombach et al. 2022) from config keywords."""
    from monai.networks.nets import DiffusionModelUNet

    kw = dict(kwargs)
    for key in ("channels", "attention_levels", "num_head_channels", "num_res_blocks"):
        if isinstance(kw.get(key), list):
            kw[key] = tuple(kw[key])
    return DiffusionModelUNet(**kw)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
