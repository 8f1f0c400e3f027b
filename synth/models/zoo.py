"""The MONAI model zoo's 1 mm brain LDM (``brain_image_synthesis_latent_diffusion_model``).

Pinaya WHL et al., "Brain imaging generation with latent diffusion models", DGM4MICCAI 2022:
trained on 31,740 UK Biobank T1 scans (160 x 224 x 160 at 1 mm, rigid to MNI, intensities in
[0, 1]). Its weights live outside the package registries and cannot be fetched here: download
the bundle yourself and point :func:`load_zoo_generator` at its folder.

Conditioning ``[gender, age, ventricular_vol, brain_vol]`` (each in [0, 1]; gender 0 female,
1 male; age = (years - 44) / (82 - 44)) is both the cross-attention context and four constant
input channels. The volume scalings are not published: SynthBrain maps fractions of ICV
linearly with the ranges in :data:`ZOO_COVARIATE_RANGES`, an assumption stated in provenance.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.config import ModelConfig
from ..models.networks import build_autoencoder, build_unet

__all__ = ["ZOO_AUTOENCODER", "ZOO_UNET", "ZOO_COVARIATE_RANGES", "zoo_config", "load_zoo_generator", "find_zoo_weights"]

ZOO_AUTOENCODER = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "latent_channels": 3,
    "channels": [64, 128, 128, 128],
    "num_res_blocks": 2,
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "attention_levels": [False, False, False, False],
    "with_encoder_nonlocal_attn": False,
    "with_decoder_nonlocal_attn": False,
}
ZOO_UNET = {
    "spatial_dims": 3,
    "in_channels": 7,
    "out_channels": 3,
    "channels": [256, 512, 768],
    "num_res_blocks": 2,
    "attention_levels": [False, True, True],
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "resblock_updown": True,
    "num_head_channels": [0, 512, 768],
    "with_conditioning": True,
    "transformer_num_layers": 1,
    "cross_attention_dim": 4,
    "upcast_attention": True,
}
ZOO_COVARIATE_RANGES = {
    "sex": [0.0, 1.0],
    "age": [44.0, 82.0],
    "lateral_ventricles": [0.0, 0.1],  # assumption: unpublished scaling
    "brain": [0.0, 1.0],  # assumption: unpublished scaling (head-size normalised volume)
}


def zoo_config() -> ModelConfig:
    """The exact architecture, scheduler and conditioning of the zoo model."""
    return ModelConfig(
        name="monai-brain-ldm-1mm",
        version="zoo",
        autoencoder=dict(ZOO_AUTOENCODER),
        unet=dict(ZOO_UNET),
        scheduler={"num_train_timesteps": 1000, "schedule": "scaled_linear_beta",
                   "beta_start": 0.0015, "beta_end": 0.0205, "prediction_type": "epsilon"},
        covariates=["sex", "age", "lateral_ventricles", "brain"],
        covariate_ranges=dict(ZOO_COVARIATE_RANGES),
        sampling={"steps": 50, "guidance_scale": 1.0, "bf16": False},
        latent_scale=1.0,
        conditioning="crossattn+concat",
        null_condition=False,
        # 160 x 224 x 160 at 1 mm, rigid to MNI; origin chosen to centre the MNI brain (approximate).
        grid={"shape": [160, 224, 160], "spacing": 1.0, "origin": [-79.5, -125.5, -71.5]},
        normative=None,
        reference="MONAI model zoo brain_image_synthesis_latent_diffusion_model (Pinaya et al. 2022)",
    )


def find_zoo_weights(folder: str | Path) -> tuple[Path, Path]:
    """Locate ``autoencoder.pth`` and ``diffusion_model.pth`` in a bundle folder (or its ``models/``)."""
    folder = Path(folder)
    for base in (folder / "models", folder):
        ae, unet = base / "autoencoder.pth", base / "diffusion_model.pth"
        if ae.is_file() and unet.is_file():
            return ae, unet
    raise FileNotFoundError(
        f"no zoo weights in {folder}: expected models/autoencoder.pth and models/diffusion_model.pth "
        "from the MONAI bundle brain_image_synthesis_latent_diffusion_model"
    )


def _load_state(net: torch.nn.Module, path: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        net.load_state_dict(state)
    except RuntimeError:
        # Checkpoints from MONAI GenerativeModels use the old module names.
        if not hasattr(net, "load_old_state_dict"):
            raise
        net.load_old_state_dict(state)


def load_zoo_generator(folder: str | Path, device: str = "auto"):
    """A :class:`synth.BrainGenerator` (the ``ldm`` backend) on the zoo model's weights in ``folder``."""
    from ..generators import backend_class

    ae_path, unet_path = find_zoo_weights(folder)
    cfg = zoo_config()
    try:  # borrow the shipped model's normative volumes so age/sex/diagnosis imply volume targets
        from ..generators import DEFAULT_MODEL, models_dir

        cfg.normative = ModelConfig.load(models_dir() / DEFAULT_MODEL).normative
    except FileNotFoundError:
        pass
    ae, unet = build_autoencoder(cfg.autoencoder), build_unet(cfg.unet)
    _load_state(ae, ae_path)
    _load_state(unet, unet_path)
    return backend_class("ldm")(cfg, ae, unet, device=device, source=str(folder))
