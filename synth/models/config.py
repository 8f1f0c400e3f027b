"""A model folder's ``config.json``: what wires the networks, the scheduler and the conditioning."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..io import read_json, verify_weights, write_json

__all__ = ["ModelConfig"]


@dataclass
class ModelConfig:
    """Configuration of a latent diffusion brain generator.

    Args:
        name: Model name, e.g. ``synthbrain-ldm-2mm``.
        version: Version of the weights.
        autoencoder: Keyword arguments of MONAI ``AutoencoderKL``.
        unet: Keyword arguments of MONAI ``DiffusionModelUNet``.
        scheduler: ``num_train_timesteps``, ``schedule``, ``beta_start``, ``beta_end``,
            ``prediction_type``.
        sampling: Defaults for generation: ``steps``, ``guidance_scale``.
        latent_scale: Factor applied to autoencoder latents before diffusion (latents * scale).
        covariates: Ordered names of the conditioning values: ``age``, ``sex``, volume names
            (fractions of ICV) and/or ``diagnosis_CN``/``diagnosis_MCI``/``diagnosis_AD``.
        covariate_ranges: ``name -> [lo, hi]`` mapped linearly to [0, 1].
        conditioning: ``"crossattn+concat"`` (context tokens and tiled input channels),
            ``"crossattn"`` or ``"concat"``.
        null_condition: Whether the last conditioning value is a presence flag, so that an
            all-zero vector is the unconditional input for classifier-free guidance.
        grid: ``shape``, ``spacing`` and ``origin`` of the image grid (RAS mm).
        normative: A :class:`synth.normative.NormativeModel` as a dict (or ``None``).
        reference: Free text on the model's origin (e.g. the MONAI zoo model it mirrors).
        weights_sha256: ``{weights file name: hex SHA-256}``, written at package time and checked
            by :meth:`load` before any weights are read (empty: not checked).
        refiner: The image refiner applied after decoding (:mod:`synth.models.refiner`), or ``None``:
            ``width``, ``layers``, ``default`` (applied unless switched off), ``steps``, ``trained``
            (how it was trained); its weights are ``refiner.safetensors``.
    """

    name: str
    version: str
    autoencoder: dict[str, Any]
    unet: dict[str, Any]
    scheduler: dict[str, Any]
    covariates: list[str]
    covariate_ranges: dict[str, list[float]] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=lambda: {"steps": 20, "guidance_scale": 1.0})
    latent_scale: float = 1.0
    conditioning: str = "crossattn+concat"
    null_condition: bool = True
    grid: dict[str, Any] = field(default_factory=dict)
    normative: dict[str, Any] | None = None
    reference: str = ""
    weights_sha256: dict[str, str] = field(default_factory=dict)
    refiner: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.conditioning not in ("crossattn+concat", "crossattn", "concat"):
            raise ValueError(f"`conditioning` must be crossattn+concat, crossattn or concat, got {self.conditioning!r}")
        n_cond = len(self.covariates) + int(self.null_condition)
        latent = int(self.autoencoder.get("latent_channels", 3))
        expect_in = latent + (n_cond if "concat" in self.conditioning else 0)
        if int(self.unet.get("in_channels", -1)) != expect_in:
            raise ValueError(
                f"unet in_channels must be {expect_in} (latent {latent} + {n_cond} conditioning channels), "
                f"got {self.unet.get('in_channels')}"
            )
        if "crossattn" in self.conditioning and int(self.unet.get("cross_attention_dim") or 0) != n_cond:
            raise ValueError(f"unet cross_attention_dim must be {n_cond}, got {self.unet.get('cross_attention_dim')}")

    @property
    def n_conditioning(self) -> int:
        return len(self.covariates) + int(self.null_condition)

    @classmethod
    def load(cls, folder: str | Path) -> "ModelConfig":
        """Read ``folder/config.json`` and check the weights files against ``weights_sha256``."""
        config = cls(**read_json(Path(folder) / "config.json"))
        verify_weights(folder, config.weights_sha256)
        return config

    def save(self, folder: str | Path) -> Path:
        return write_json(Path(folder) / "config.json", asdict(self))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
