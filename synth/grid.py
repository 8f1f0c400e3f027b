"""The fixed 2 mm MNI grid every SynthBrain model lives on.

The grid is an 80 x 96 x 80 block of 2 mm voxels in MNI152 space, RAS+ axis order, covering the
MNI152 brain mask (x -72..72, y -106..72, z -72..82 mm) with a margin. Sizes divide by 16, so
autoencoders with up to four 2x downsamplings fit it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Grid", "MNI_2MM"]


@dataclass(frozen=True)
class Grid:
    """A regular voxel grid in RAS+ world millimetres.

    Args:
        shape: Voxel counts along (X, Y, Z) = (left->right, posterior->anterior, inferior->superior).
        spacing: Voxel size in mm.
        origin: RAS world coordinate (mm) of the centre of voxel (0, 0, 0).
    """

    shape: tuple[int, int, int]
    spacing: float
    origin: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        """4x4 voxel -> RAS mm affine, as NIfTI stores it."""
        a = np.diag([self.spacing, self.spacing, self.spacing, 1.0])
        a[:3, 3] = self.origin
        return a

    @property
    def voxel_volume(self) -> float:
        """Volume of one voxel in mm^3."""
        return float(self.spacing**3)


MNI_2MM = Grid(shape=(80, 96, 80), spacing=2.0, origin=(-79.0, -112.0, -74.0))
