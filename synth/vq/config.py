"""A VQ model folder's ``config.json``: the VQ-VAE, the transformer, the conditioning, sampling."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..io import read_json, verify_weights, write_json

__all__ = ["VQModelConfig"]


@dataclass
class VQModelConfig:
    """Configuration of a VQ-VAE + transformer brain generator (``backend: vq``).

    Args:
        name: Model name, e.g. ``synthbrain-vq-2mm``.
        version: Version of the weights.
        vqvae: :func:`synth.vq.vqvae.build_vqvae` config (``autoencoder``, ``num_embeddings``, ...).
        transformer: :class:`synth.vq.transformer.CodeTransformer` keywords (no ``engine``).
        covariates: Ordered conditioning names (as :class:`synth.models.config.ModelConfig`).
        covariate_ranges: ``name -> [lo, hi]`` mapped linearly to [0, 1].
        null_condition: The last conditioning value is a presence flag (all zeros: unconditional).
        sampling: Defaults for generation: ``guidance_scale``, ``temperature``, ``top_k``.
        grid: ``shape``, ``spacing`` and ``origin`` of the image grid (RAS mm).
        normative: A :class:`synth.normative.NormativeModel` as a dict (or ``None``).
        reference: Free text on how the model was made.
        backend: Always ``vq`` (what :func:`synth.generators.load_generator` dispatches on).
        weights_sha256: ``{weights file name: hex SHA-256}``, written at package time and checked
            by :meth:`load` before any weights are read (empty: not checked).
        refiner: The refiner after the decoder (:mod:`synth.models.refiner`): ``width``, ``layers``,
            ``context``, ``default``, ``steps``, ``trained``; ``None`` when the model ships none.
    """

    name: str
    version: str
    vqvae: dict[str, Any]
    transformer: dict[str, Any]
    covariates: list[str]
    covariate_ranges: dict[str, list[float]] = field(default_factory=dict)
    null_condition: bool = True
    sampling: dict[str, Any] = field(default_factory=lambda: {"guidance_scale": 1.0, "temperature": 1.0, "top_k": None})
    grid: dict[str, Any] = field(default_factory=dict)
    normative: dict[str, Any] | None = None
    reference: str = ""
    backend: str = "vq"
    weights_sha256: dict[str, str] = field(default_factory=dict)
    refiner: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.backend != "vq":
            raise ValueError(f"a VQModelConfig has backend 'vq', got {self.backend!r}")
        n_cond = len(self.covariates) + int(self.null_condition)
        if int(self.transformer.get("n_conditioning", -1)) != n_cond:
            raise ValueError(f"transformer n_conditioning must be {n_cond} (covariates + flag), got {self.transformer.get('n_conditioning')}")
        if int(self.transformer.get("num_tokens", -1)) != int(self.vqvae["num_embeddings"]):
            raise ValueError(f"transformer num_tokens must equal the codebook size {self.vqvae['num_embeddings']}, "
                             f"got {self.transformer.get('num_tokens')}")

    @property
    def n_conditioning(self) -> int:
        return len(self.covariates) + int(self.null_condition)

    @classmethod
    def load(cls, folder: str | Path) -> "VQModelConfig":
        """Read ``folder/config.json`` and check the weights files against ``weights_sha256``."""
        config = cls(**read_json(Path(folder) / "config.json"))
        verify_weights(folder, config.weights_sha256)
        return config

    def save(self, folder: str | Path) -> Path:
        return write_json(Path(folder) / "config.json", asdict(self))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
