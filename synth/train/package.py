"""Turn training runs into a shippable model folder: fp16 safetensors + ``config.json``."""

from __future__ import annotations

from pathlib import Path

import torch

from ..grid import MNI_2MM
from ..io import atomic_path, sha256_file
from ..models.config import ModelConfig
from .common import is_model_folder, model_folder_weights

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
    if "model_folder" in state:
        return f"autoencoder of {state['model_folder']}"
    if not cfg.get("decoder_only"):
        return f"autoencoder {state['step']} steps"
    init = state.get("init_step")
    if isinstance(init, str):  # fine-tuned from a packaged model
        return f"autoencoder of {init} + decoder fine-tune {state['step']} steps (encoder frozen)"
    if init is None and cfg.get("init_from") and (Path(cfg["init_from"]) / "last.pt").exists():
        init = torch.load(Path(cfg["init_from"]) / "last.pt", map_location="cpu", weights_only=False)["step"]
    return f"autoencoder {init if init is not None else 'unknown'} steps + decoder fine-tune {state['step']} steps (encoder frozen)"


def package_model(ae_run: str | Path, ldm_run: str | Path, out: str | Path, *, name: str, version: str,
                  steps: int | None = None, guidance_scale: float | None = None, bf16: bool = True) -> Path:
    """Write ``out/{config.json, autoencoder.safetensors, unet.safetensors}`` from the EMA weights.

    ``ae_run`` and ``ldm_run`` are training run folders or packaged model folders (a decoder fine-tune
    packaged with a shipped UNet, say); ``ldm_run`` may also be a snapshot ``.pt`` that
    ``train-diffusion --snap-every`` kept. Sampling settings: ``steps`` and ``guidance_scale`` where
    given, else those of a packaged ``ldm_run`` or of the packaged model a run was started from
    (``--init-from``; presets too), else 20 steps and guidance 1.0.
    """
    if is_model_folder(ae_run):  # the first stage of a packaged model, as it is
        weights, config = model_folder_weights(ae_run, "autoencoder")
        ae_state = {"ema_state_dict": weights, "model_folder": f"{config.name} {config.version}"}
    else:
        ae_state = torch.load(Path(ae_run) / "last.pt", map_location="cpu", weights_only=False)
    sampling = {"steps": 20, "guidance_scale": 1.0, "bf16": bf16}
    if is_model_folder(ldm_run):
        weights, config = model_folder_weights(ldm_run, "unet")
        mc = {k: getattr(config, k) for k in ("autoencoder", "unet", "scheduler", "covariates", "covariate_ranges",
                                               "latent_scale", "normative")}
        ldm_state = {"ema_state_dict": weights, "model_config": mc}
        sampling = dict(config.sampling)
        unet_history = f"UNet of {config.name} {config.version}"
    else:  # a run folder (its last.pt) or one of its snapshots (snaps/step_NNNNNN.pt)
        path = Path(ldm_run) if Path(ldm_run).suffix == ".pt" else Path(ldm_run) / "last.pt"
        ldm_state = torch.load(path, map_location="cpu", weights_only=False)
        mc = ldm_state["model_config"]
        if mc.get("sampling"):  # a run started from a packaged model keeps that model's sampling settings
            sampling = dict(mc["sampling"])
        unet_history = f"UNet {ldm_state['step']} steps" + (f" from {mc['init_from']}" if mc.get("init_from") else "")
        if mc.get("augmentation"):
            aug = mc["augmentation"]
            unet_history += (f" with {aug['copies']} augmented copies a scan ("
                             + ", ".join(f"{k} {v:g}" for k, v in aug.items() if k != "copies" and v) + ")")
    if steps is not None:
        sampling["steps"] = steps
    if guidance_scale is not None:
        sampling["guidance_scale"] = guidance_scale
    ae_state_dict = ae_state["ema_state_dict"]
    if ae_state.get("config", {}).get("autoencoder", mc["autoencoder"]) != mc["autoencoder"]:
        raise ValueError(f"the autoencoder of {ae_run} is not the one the UNet of {ldm_run} was trained on (different layout)")
    cfg = ModelConfig(
        name=name,
        version=version,
        autoencoder=mc["autoencoder"],
        unet=mc["unet"],
        scheduler=mc["scheduler"],
        covariates=mc["covariates"],
        covariate_ranges=mc["covariate_ranges"],
        sampling=sampling,
        latent_scale=mc["latent_scale"],
        grid={"shape": list(MNI_2MM.shape), "spacing": MNI_2MM.spacing, "origin": list(MNI_2MM.origin)},
        normative=mc["normative"],
        reference=f"SynthBrain 2 mm LDM trained on IXI; {_autoencoder_history(ae_state)}, {unet_history}",
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(ae_state_dict, out / "autoencoder.safetensors")
    save_weights(ldm_state["ema_state_dict"], out / "unet.safetensors")
    # Checked before loading (ModelConfig.load): a truncated or swapped weights file is refused.
    cfg.weights_sha256 = {f: sha256_file(out / f) for f in ("autoencoder.safetensors", "unet.safetensors")}
    cfg.save(out)
    return out
