"""Tiny random-weight VQ models for tests and demos (seconds on CPU, no real data needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..io import sha256_file
from ..testing import toy_normative
from .config import VQModelConfig
from .transformer import CodeTransformer
from .vqvae import build_vqvae

__all__ = ["tiny_vq_config", "make_tiny_vq_model"]


def tiny_vq_config(shape=(16, 16, 16), name: str = "tiny-vq-model", attention: str = "linear",
                   wavefront: bool = False) -> VQModelConfig:
    """A tiny config; ``wavefront``: attention blocks of one x-slab of codes and the wavefront inputs."""
    covariates = ["age", "sex", "brain", "lateral_ventricles", "hippocampus"]
    code = [s // 2 for s in shape]
    return VQModelConfig(
        name=name,
        version="0.0.0-test",
        vqvae={
            "autoencoder": {
                "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": 2,
                "channels": [8, 8], "num_res_blocks": 1, "norm_num_groups": 4,
                "attention_levels": [False, False],
                "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False,
            },
            "num_embeddings": 16, "embedding_dim": 2, "commitment_cost": 0.25, "decay": 0.99,
        },
        transformer={"num_tokens": 16, "seq_len": code[0] * code[1] * code[2], "n_conditioning": len(covariates) + 1,
                     "d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32, "attention": attention, "dropout": 0.0,
                     "code_shape": code, **({"window": code[1] * code[2], "wavefront": True} if wavefront else {})},
        covariates=covariates,
        covariate_ranges={"age": [20, 90], "brain": [0.7, 0.95], "lateral_ventricles": [0.0, 0.06], "hippocampus": [0.003, 0.007]},
        sampling={"guidance_scale": 1.0, "temperature": 1.0, "top_k": None},
        grid={"shape": list(shape), "spacing": 2.0, "origin": [-(shape[0] - 1), -(shape[1] - 1), -(shape[2] - 1)]},
        normative=toy_normative().to_dict(),
        reference="random weights, for tests only",
    )


def make_tiny_vq_model(folder: str | Path, seed: int = 0, shape=(16, 16, 16), attention: str = "linear",
                       wavefront: bool = False) -> Path:
    """Write a random-weight tiny VQ model folder loadable by :func:`synth.load_generator` (``wavefront``:
    its transformer decodes x-slabs side by side)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = tiny_vq_config(shape, attention=attention, wavefront=wavefront)
    torch.manual_seed(seed)
    vqvae = build_vqvae(cfg.vqvae)
    with torch.no_grad():  # a codebook on the scale of the random encoder's outputs, so codes vary
        x = torch.rand(2, 1, *shape)
        z = vqvae.encode_continuous(x)
        vqvae.quantizer.init_codebook(z.movedim(1, -1).reshape(-1, z.shape[1]), iters=5, seed=seed)
    tf = CodeTransformer(**cfg.transformer, engine="torch")
    with torch.no_grad():  # sharper than the random init, so sampled codes depend on the condition
        tf.cond_proj.weight.mul_(5.0)
        tf.head.weight.mul_(5.0)
    save_file({k: v.contiguous() for k, v in vqvae.state_dict().items()}, str(folder / "vqvae.safetensors"))
    save_file({k: v.contiguous() for k, v in tf.state_dict().items()}, str(folder / "transformer.safetensors"))
    cfg.weights_sha256 = {f: sha256_file(folder / f) for f in ("vqvae.safetensors", "transformer.safetensors")}
    cfg.save(folder)
    return folder
