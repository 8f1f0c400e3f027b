"""The result of a generation: a volume that carries its affine, condition and provenance."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .condition import Condition
from .io import SYNTHETIC_NOTICE, nifti_suffix, save_nifti, write_json

__all__ = ["SyntheticBrain", "sidecar_path"]


def sidecar_path(nifti_path: str | Path) -> Path:
    """``brain.nii.gz`` -> ``brain.json``."""
    p = Path(nifti_path)
    return p.with_name(p.name[: -len(nifti_suffix(p))] + ".json")


@dataclass
class SyntheticBrain:
    """A generated T1 brain.

    Attributes:
        image: (X, Y, Z) float32 intensities in [0, 1], RAS voxel order, skull-stripped.
        affine: 4x4 voxel -> MNI152 RAS mm.
        condition: The condition it was generated for.
        seed: Seed of the sampler's noise.
        targets: Volumes (fractions of ICV) the model was conditioned on.
        provenance: Model, version, sampler settings, device, time and the synthetic notice.
    """

    image: np.ndarray
    affine: np.ndarray
    condition: Condition
    seed: int
    targets: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def descrip(self) -> str:
        """Short NIfTI header description (the format keeps 79 characters)."""
        c = self.condition
        return f"SYNTHETIC not for clinical use; {self.provenance.get('model', '?')} age {c.age:g} {c.sex} {c.diagnosis} seed {self.seed}"

    def metadata(self) -> dict[str, Any]:
        """Everything the JSON sidecar holds."""
        return {
            "notice": SYNTHETIC_NOTICE,
            "synthetic": True,
            "condition": self.condition.to_dict(),
            "seed": self.seed,
            "target_volumes_fraction_of_icv": self.targets,
            **self.provenance,
        }

    def save(self, path: str | Path) -> Path:
        """Write the NIfTI (float32, MNI affine, synthetic ``descrip``) and its JSON sidecar."""
        path = Path(path)
        nifti_suffix(path)
        save_nifti(path, self.image.astype(np.float32), self.affine, descrip=self.descrip)
        write_json(sidecar_path(path), self.metadata())
        return path
