"""Tiny random-weight models for tests and demos (seconds on CPU, no real data needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from .models.config import ModelConfig
from .models.networks import build_autoencoder, build_unet
from .normative import NormativeModel

__all__ = ["tiny_config", "make_tiny_model", "add_fast_preset", "add_tiny_refiner", "toy_normative"]


def toy_normative() -> NormativeModel:
    """A plausible hand-made normative model (not fit on data) for tests."""
    import math

    return NormativeModel(
        coefs={
            "brain": [math.log(0.85), -0.03, -0.01, 0.0],
            "gm": [math.log(0.45), -0.04, -0.01, -0.01],
            "wm": [math.log(0.37), 0.0, -0.02, 0.01],
            "lateral_ventricles": [math.log(0.012), 0.25, 0.05, 0.1],
            "hippocampus": [math.log(0.0055), -0.03, -0.02, 0.0],
        },
        resid_sd={"brain": 0.03, "gm": 0.05, "wm": 0.05, "lateral_ventricles": 0.4, "hippocampus": 0.08},
        n_subjects=0,
    )


def tiny_config(shape=(32, 32, 32), name: str = "tiny-test-model") -> ModelConfig:
    covariates = ["age", "sex", "brain", "lateral_ventricles", "hippocampus"]
    n_cond = len(covariates) + 1
    return ModelConfig(
        name=name,
        version="0.0.0-test",
        autoencoder={
            "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": 2,
            "channels": [8, 8], "num_res_blocks": 1, "norm_num_groups": 4,
            "attention_levels": [False, False],
            "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False,
        },
        unet={
            "spatial_dims": 3, "in_channels": 2 + n_cond, "out_channels": 2, "channels": [8, 8],
            "attention_levels": [False, True], "num_res_blocks": 1, "num_head_channels": 8,
            "norm_num_groups": 4, "with_conditioning": True, "cross_attention_dim": n_cond,
        },
        scheduler={"num_train_timesteps": 1000, "schedule": "scaled_linear_beta",
                   "beta_start": 0.0015, "beta_end": 0.0205, "prediction_type": "epsilon"},
        covariates=covariates,
        covariate_ranges={"age": [20, 90], "brain": [0.7, 0.95], "lateral_ventricles": [0.0, 0.06], "hippocampus": [0.003, 0.007]},
        sampling={"steps": 3, "guidance_scale": 1.0, "bf16": False},
        latent_scale=1.0,
        grid={"shape": list(shape), "spacing": 2.0, "origin": [-(shape[0] - 1), -(shape[1] - 1), -(shape[2] - 1)]},
        normative=toy_normative().to_dict(),
        reference="random weights, for tests only",
    )


def make_tiny_model(folder: str | Path, seed: int = 0, shape=(32, 32, 32)) -> Path:
    """Write a random-weight tiny model folder loadable by :func:`synth.load_generator`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(shape)
    torch.manual_seed(seed)
    ae, unet = build_autoencoder(cfg.autoencoder), build_unet(cfg.unet)
    with torch.no_grad():  # MONAI zero-initialises output convs: perturb them so conditions matter
        for p in unet.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, 0.05)
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(folder / "autoencoder.safetensors"))
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(folder / "unet.safetensors"))
    from .io import sha256_file

    cfg.weights_sha256 = {f: sha256_file(folder / f) for f in ("autoencoder.safetensors", "unet.safetensors")}
    cfg.save(folder)
    return folder


def add_fast_preset(folder: str | Path, steps: int = 2) -> Path:
    """Give a tiny model folder a ``fast`` sampling preset of the shipped model's kind (DPM-Solver++(2M) on
    log-SNR spacing, guidance on t = 300-999, ``steps`` steps); returns the folder."""
    folder = Path(folder)
    cfg = ModelConfig.load(folder)
    cfg.sampling = {**cfg.sampling, "fast": {"sampler": "dpm++2m", "steps": steps, "spacing": "logsnr",
                                             "guidance_interval": [300, 999]}}
    cfg.save(folder)
    return folder


def add_tiny_refiner(folder: str | Path, seed: int = 0) -> Path:
    """Give a tiny model folder a random-weight refiner (width 4, 2 layers), set up as the shipped model's is
    (applied by default to the standard sampling, left out of the fast preset), and a fast sampling preset
    (:func:`add_fast_preset`); returns the folder."""
    from .io import sha256_file
    from .models.refiner import build_refiner
    from .train.package import save_weights

    folder = Path(folder)
    cfg = ModelConfig.load(folder)
    arch = {"width": 4, "layers": 2, "context": 0}
    net = build_refiner(arch)
    torch.manual_seed(seed)
    with torch.no_grad():  # the last layer starts at zero (the identity): perturb every weight so refining shows
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_weights(net.state_dict(), folder / "refiner.safetensors")
    cfg.refiner = {**arch, "default": True, "fast_default": False, "steps": 0, "trained": "random weights, for tests only"}
    cfg.weights_sha256 = {**cfg.weights_sha256, "refiner.safetensors": sha256_file(folder / "refiner.safetensors")}
    cfg.save(folder)
    return add_fast_preset(folder)
