"""One interface for SynthBrain's generators, whatever the backend.

A generator takes a :class:`~synth.condition.Condition` and a seed and returns a
:class:`~synth.brain.SyntheticBrain` (same provenance keys, same determinism: same model, condition,
seed and device give the same brain). Two backends implement it:

* ``ldm``: latent diffusion (:class:`synth.pipeline.BrainGenerator`);
* ``vq``: VQ-VAE + autoregressive transformer (:class:`synth.vq.generator.VQBrainGenerator`).

A model folder's ``config.json`` says which backend it is (``"backend"``; folders without it are
``ldm``), so :func:`load_generator` dispatches on the config and the CLI, viewer, cohorts and
evaluation work with either. Backends are imported lazily by name: this module imports neither.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch

from .brain import SyntheticBrain
from .condition import Condition

__all__ = [
    "BACKENDS",
    "DEFAULT_MODEL",
    "Generator",
    "ModelInfo",
    "available_models",
    "backend_class",
    "encode_covariates",
    "load_generator",
    "model_backend",
    "models_dir",
    "pick_device",
]

DEFAULT_MODEL = "synthbrain-ldm-2mm"
# backend name -> "module:class" (imported only when a model of that backend is loaded)
BACKENDS: dict[str, str] = {
    "ldm": "synth.pipeline:BrainGenerator",
    "vq": "synth.vq.generator:VQBrainGenerator",
}
ProgressFn = Callable[[int, int], None]


@runtime_checkable
class Generator(Protocol):
    """What every SynthBrain generator offers.

    Attributes:
        backend: ``ldm`` or ``vq``.
        config: The model's configuration (``name``, ``version``, ``covariates``, ...).
        device: Where it runs.
        source: Where its weights came from.
    """

    backend: str
    config: Any
    device: torch.device
    source: str

    def targets(self, condition: Condition) -> dict[str, float]:
        """Volumes (fractions of ICV) the model is asked for under ``condition``."""

    def encode_condition(self, condition: Condition) -> torch.Tensor:
        """The (1, n_conditioning) vector the network is conditioned on."""

    def generate(self, condition: Condition, seed: int = 0, *, progress: ProgressFn | bool | None = None,
                 **options: Any) -> SyntheticBrain:
        """One brain for ``condition``; same seed -> same brain on the same device."""


def encode_covariates(condition: Condition, covariates: Sequence[str], ranges: Mapping[str, Sequence[float]],
                      volumes: Mapping[str, float], null_condition: bool = True) -> torch.Tensor:
    """The (1, K [+1]) conditioning vector: each covariate scaled to [0, 1] by ``ranges``.

    Args:
        condition: Age, sex and diagnosis.
        covariates: Ordered names: ``age``, ``sex``, ``diagnosis_<CN|MCI|AD>`` or a volume name.
        ranges: ``name -> (lo, hi)`` mapped linearly to [0, 1] (missing: (0, 1)).
        volumes: Target volumes (fractions of ICV) for the volume covariates.
        null_condition: Append the presence flag 1 (all zeros is the unconditional input).
    """
    values = []
    for name in covariates:
        if name == "age":
            v = condition.age
        elif name == "sex":
            v = 1.0 if condition.sex == "M" else 0.0
        elif name.startswith("diagnosis_"):
            v = 1.0 if condition.diagnosis == name.split("_", 1)[1] else 0.0
        elif name in volumes:
            v = volumes[name]
        else:
            raise ValueError(f"model covariate {name!r} has no value: give it in `volumes`")
        lo, hi = ranges.get(name, (0.0, 1.0))
        values.append((v - lo) / (hi - lo))
    if null_condition:
        values.append(1.0)
    return torch.tensor([values], dtype=torch.float32)


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA, then MPS, then CPU; otherwise the named device (checked to exist)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise ValueError(f"`device` must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("`device` is cuda but no CUDA GPU is available; use --device cpu or auto")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("`device` is mps but MPS is not available; use --device cpu or auto")
    return torch.device(device)


def models_dir() -> Path:
    """``$SYNTHBRAIN_MODELS`` or the repository's ``assets/models``."""
    env = os.environ.get("SYNTHBRAIN_MODELS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "assets" / "models"


def _read_config(folder: Path) -> dict | None:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def model_backend(folder: str | Path) -> str | None:
    """The backend of the generator in ``folder`` (``ldm``, ``vq``), or ``None`` if it holds none."""
    cfg = _read_config(Path(folder))
    if cfg is None:
        return None
    backend = cfg.get("backend")
    if backend is None and "unet" in cfg and "autoencoder" in cfg:
        return "ldm"
    return backend if backend in BACKENDS else None


@dataclass(frozen=True)
class ModelInfo:
    """A generator model folder: name, backend (``ldm``/``vq``), version and path."""

    name: str
    backend: str
    version: str
    path: Path


def available_models(details: bool = False) -> list[str] | list[ModelInfo]:
    """Generator models in :func:`models_dir` (segmenters and other folders excluded).

    Args:
        details: Return :class:`ModelInfo` (name, backend, version, path) instead of names.
    """
    root = models_dir()
    out: list[ModelInfo] = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        backend = model_backend(p)
        if backend is not None:
            out.append(ModelInfo(p.name, backend, str((_read_config(p) or {}).get("version", "")), p))
    return out if details else [m.name for m in out]


def backend_class(backend: str) -> type:
    """The generator class of a backend name."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown generator backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    module, name = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(module), name)


def _is_zoo_bundle(p: Path) -> bool:
    return (p / "models" / "diffusion_model.pth").is_file() or (p / "diffusion_model.pth").is_file()


def load_generator(name_or_path: str | Path = DEFAULT_MODEL, device: str = "auto") -> Generator:
    """Load a generator by name (a folder of :func:`models_dir`) or from a folder, whatever its backend.

    Raises:
        FileNotFoundError: no such model; the message lists the shipped ones.
    """
    p = Path(name_or_path)
    if _is_zoo_bundle(p) and not (p / "config.json").is_file():
        from .models.zoo import load_zoo_generator

        return load_zoo_generator(p, device)
    for folder in (p, models_dir() / str(name_or_path)):
        if (folder / "config.json").is_file():
            backend = model_backend(folder)
            if backend is None:
                raise ValueError(f"{folder} holds no generator (config.json names no backend of {', '.join(BACKENDS)})")
            return backend_class(backend).from_folder(folder, device)
    raise FileNotFoundError(
        f"no model named or found at {str(name_or_path)!r}; shipped models: {', '.join(available_models()) or 'none'}"
    )
