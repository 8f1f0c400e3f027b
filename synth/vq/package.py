"""Turn VQ training runs into a shippable model folder: safetensors + ``config.json`` (``backend: vq``)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..grid import MNI_2MM, Grid
from ..io import atomic_path, sha256_file
from .config import VQModelConfig
from .train import MODEL_VQVAE

__all__ = ["package_vq_model"]


def package_vq_model(tf_run: str | Path, out: str | Path, *, name: str = "synthbrain-vq-2mm", version: str = "0.1.0",
                     guidance_scale: float = 1.0, temperature: float = 1.0, top_k: int | None = None,
                     fp16: bool = True, vq_checkpoint: str | None = None) -> Path:
    """Write ``out/{config.json, vqvae.safetensors, transformer.safetensors}``.

    The VQ-VAE is the checkpoint the transformer was trained on (recorded in its run), or
    ``vq_checkpoint`` of the same run (e.g. ``last.pt`` of a decoder-only run that a validation
    preferred): it must then give the same codes (same encoder and codebook). Its codebook
    and quantiser statistics stay float32 (they decide which code a vector gets); the other
    weights are stored as fp16 when ``fp16``.
    """
    tf_state = torch.load(Path(tf_run) / "last.pt", map_location="cpu", weights_only=False)
    mc = tf_state["model_config"]
    shape = tuple(mc.get("image_shape") or MNI_2MM.shape)
    grid = MNI_2MM if shape == tuple(MNI_2MM.shape) else Grid(shape, MNI_2MM.spacing, tuple(-(s - 1) * MNI_2MM.spacing / 2 for s in shape))
    from_model = mc["vq_checkpoint"] == MODEL_VQVAE  # trained on a packaged model's VQ-VAE: ship it as it is
    if from_model:
        from safetensors.torch import load_file

        if vq_checkpoint and vq_checkpoint != MODEL_VQVAE:
            raise ValueError(f"the transformer was trained on the VQ-VAE of the model folder {mc['vq_run']}; "
                             f"it has no checkpoint {vq_checkpoint!r}")
        source = VQModelConfig.load(mc["vq_run"])
        vq_state = {"state_dict": load_file(str(Path(mc["vq_run"]) / MODEL_VQVAE))}
        vq_described = f"VQ-VAE of {source.name} {source.version}"
    else:
        vq_state = torch.load(Path(mc["vq_run"]) / mc["vq_checkpoint"], map_location="cpu", weights_only=False)
        vq_described = None
    if vq_checkpoint and vq_checkpoint != mc["vq_checkpoint"]:
        other = torch.load(Path(mc["vq_run"]) / vq_checkpoint, map_location="cpu", weights_only=False)
        coding = ("ae.encoder.", "ae.quant_conv_mu.", "pre.", "quantizer.codebook")
        same = all(torch.equal(v, other["state_dict"][k]) for k, v in vq_state["state_dict"].items() if k.startswith(coding))
        if not same:
            raise ValueError(f"{vq_checkpoint} encodes differently from {mc['vq_checkpoint']} (encoder or codebook "
                             "changed): the transformer was not trained on its codes")
        vq_state = other
        mc = dict(mc, vq_checkpoint=vq_checkpoint)
    cfg = VQModelConfig(
        name=name,
        version=version,
        vqvae=mc["vqvae"],
        transformer=mc["transformer"],
        covariates=mc["covariates"],
        covariate_ranges=mc["covariate_ranges"],
        sampling={"guidance_scale": guidance_scale, "temperature": temperature, "top_k": top_k},
        grid={"shape": list(grid.shape), "spacing": grid.spacing, "origin": list(grid.origin)},
        normative=mc["normative"],
        reference=(f"SynthBrain 2 mm VQ-VAE + transformer trained on IXI; "
                   + (vq_described or f"VQ-VAE {vq_state['step']} steps ({mc['vq_checkpoint']})")
                   + f", transformer {tf_state['step']} steps ({tf_state.get('engine', '?')})"
                   + (f", started from {Path(mc['init_from']).name}'s" if mc.get("init_from") else "")),
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if fp16 else torch.float32
    vq = vq_state["state_dict"]
    keep32 = {k: v for k, v in vq.items() if k.startswith("quantizer.")}
    if from_model:  # the codes the run saw: no re-rounding
        half = {k: v for k, v in vq.items() if k not in keep32}
    else:
        half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in vq.items() if k not in keep32}
    tf = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tf_state["state_dict"].items()}
    _save({**half, **keep32}, out / "vqvae.safetensors")
    _save(tf, out / "transformer.safetensors")
    cfg.weights_sha256 = {f: sha256_file(out / f) for f in ("vqvae.safetensors", "transformer.safetensors")}
    cfg.save(out)
    return out


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
