"""Turn training runs into a shippable model folder: fp16 safetensors + ``config.json``."""

from __future__ import annotations

from pathlib import Path

import torch

from ..grid import MNI_2MM
from ..io import atomic_path, sha256_file
from ..models.config import ModelConfig

__all__ = ["package_model", "save_weights"]


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, dtype=torch.float16) -> None:
    """Save floating tensors as ``dtype`` (fp16 halves the size; weights are cast back on load)."""
    from safetensors.torch import save_file

    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def _autoencoder_history(state: dict) -> str:
    """'autoencoder N steps', or for a decoder-only fine-tune 'autoencoder N steps + decoder fine-tune
    M steps (encoder frozen)'. N is recorded in the checkpoint; runs from before it was recorded fall
    back to the init run's current step (right unless that run trained on afterwards), else 'unknown'."""
    cfg = state.get("config") or {}
    if not cfg.get("decoder_only"):
        return f"autoencoder {state['step']} steps"
    init = state.get("init_step")
    if init is None and cfg.get("init_from") and (Path(cfg["init_from"]) / "last.pt").exists():
        init = torch.load(Path(cfg["init_from"]) / "last.pt", map_location="cpu", weights_only=False)["step"]
    return f"autoencoder {init if init is not None else 'unknown'} steps + decoder fine-tune {state['step']} steps (encoder frozen)"


def package_model(ae_run: str | Path, ldm_run: str | Path, out: str | Path, *, name: str, version: str,
                  steps: int = 20, guidance_scale: float = 1.0, bf16: bool = True) -> Path:
    """Write ``out/{config.json, autoencoder.safetensors, unet.safetensors}`` from the EMA weights."""
    ae_state = torch.load(Path(ae_run) / "last.pt", map_location="cpu", weights_only=False)
    ldm_state = torch.load(Path(ldm_run) / "last.pt", map_location="cpu", weights_only=False)
    mc = ldm_state["model_config"]
    cfg = ModelConfig(
        name=name,
        version=version,
        autoencoder=mc["autoencoder"],
        unet=mc["unet"],
        scheduler=mc["scheduler"],
        covariates=mc["covariates"],
        covariate_ranges=mc["covariate_ranges"],
        sampling={"steps": steps, "guidance_scale": guidance_scale, "bf16": bf16},
        latent_scale=mc["latent_scale"],
        grid={"shape": list(MNI_2MM.shape), "spacing": MNI_2MM.spacing, "origin": list(MNI_2MM.origin)},
        normative=mc["normative"],
        reference=f"SynthBrain 2 mm LDM trained on IXI; {_autoencoder_history(ae_state)}, UNet {ldm_state['step']} steps",
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(ae_state["ema_state_dict"], out / "autoencoder.safetensors")
    save_weights(ldm_state["ema_state_dict"], out / "unet.safetensors")
    # Checked before loading (ModelConfig.load): a truncated or swapped weights file is refused.
    cfg.weights_sha256 = {f: sha256_file(out / f) for f in ("autoencoder.safetensors", "unet.safetensors")}
    cfg.save(out)
    return out
