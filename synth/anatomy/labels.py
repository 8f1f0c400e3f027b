"""The compact anatomical label table of SynthBrain, derived from the MUSE atlas labels.

MUSE (Doshi et al., NeuroImage 2016; the DLMUSE segmenter of the NiChart project) labels a T1
brain with 149 regions in Neuromorphometrics numbering: ventricles, deep grey nuclei, cerebellum,
brain stem, 100 cortical parcels and 14 white-matter parcels. SynthBrain keeps a compact table of
31 labels (0 = background) that is enough to measure and render a brain: the classes FreeSurfer's
``aseg`` uses, with FreeSurfer colours, left and right apart wherever MUSE has them.

Where MUSE has a region the compact table has no class for, it goes to the nearest sensible one;
the choices follow MUSE's own derived groups (601 GM, 604 WM, 701 TotalBrain, 702 ICV), so that
compact ``gm``/``wm``/``brain`` totals equal MUSE's:

- cortical parcels and basal forebrain -> cortical GM of their side;
- white-matter parcels, fornix, internal capsule and ventral diencephalon -> cerebral WM of their
  side (MUSE counts the ventral DC as WM);
- nucleus accumbens -> caudate of its side (ventral striatum, continuous with the caudate head);
- the unsided corpus callosum and cerebellar vermis keep classes of their own;
- the inferior lateral ventricles (temporal horns) keep classes of their own, so that
  ``lateral_ventricles`` (MUSE 51 + 52) matches SynthBrain's normative model;
- cortical CSF (1), the CSF label 46 and the optic chiasm (69, outside MUSE's ICV and a few voxels
  at 2 mm) -> rest of CSF.

Labels 46 (CSF) and 69 (optic chiasm) occur in DLMUSE label maps but not in NiChart's
``list_MUSE_single.csv``; their meaning is the Neuromorphometrics one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "MUSE_NAMES",
    "STRUCTURES",
    "Structure",
    "TOTALS",
    "muse_to_compact",
    "structure_by_name",
    "label_table",
]

# MUSE single labels (index -> name) from NiChart's list_MUSE_single.csv, plus labels 1, 46, 69.
MUSE_NAMES: dict[int, str] = {
    1: "CortCSF",
    4: "3rdVentricle",
    11: "4thVentricle",
    23: "AccumbensArea_R",
    30: "AccumbensArea_L",
    31: "Amygdala_R",
    32: "Amygdala_L",
    35: "BrainStem",
    36: "Caudate_R",
    37: "Caudate_L",
    38: "CerebellumExterior_R",
    39: "CerebellumExterior_L",
    40: "Cerebellum_WM_R",
    41: "Cerebellum_WM_L",
    47: "Hippocampus_R",
    48: "Hippocampus_L",
    49: "InfLatVentricle_R",
    50: "InfLatVentricle_L",
    51: "LateralVentricle_R",
    52: "LateralVentricle_L",
    55: "Pallidum_R",
    56: "Pallidum_L",
    57: "Putamen_R",
    58: "Putamen_L",
    59: "ThalamusProper_R",
    60: "ThalamusProper_L",
    61: "VentralDC_R",
    62: "VentralDC_L",
    71: "CerebellarVermalLobules_1to5",
    72: "CerebellarVermalLobules_6to7",
    73: "CerebellarVermalLobules_8to10",
    75: "BasalForebrain_L",
    76: "BasalForebrain_R",
    81: "Frontal_WM_R",
    82: "Frontal_WM_L",
    83: "Occipital_WM_R",
    84: "Occipital_WM_L",
    85: "Parietal_WM_R",
    86: "Parietal_WM_L",
    87: "Temporal_WM_R",
    88: "Temporal_WM_L",
    89: "Fornix_R",
    90: "Fornix_L",
    91: "AnteriorLimbInternalCapsule_R",
    92: "AnteriorLimbInternalCapsule_L",
    93: "PosteriorLimbInternalCapsule_R",
    94: "PosteriorLimbInternalCapsule_L",
    95: "CorpusCallosum",
    100: "AnteriorCingulateGyrus_R",
    101: "AnteriorCingulateGyrus_L",
    102: "AnteriorInsula_R",
    103: "AnteriorInsula_L",
    104: "AnteriorOrbitalGyrus_R",
    105: "AnteriorOrbitalGyrus_L",
    106: "AngularGyrus_R",
    107: "AngularGyrus_L",
    108: "CalcarineCortex_R",
    109: "CalcarineCortex_L",
    112: "CentralOperculum_R",
    113: "CentralOperculum_L",
    114: "Cuneus_R",
    115: "Cuneus_L",
    116: "EntorhinalArea_R",
    117: "EntorhinalArea_L",
    118: "FrontalOperculum_R",
    119: "FrontalOperculum_L",
    120: "FrontalPole_R",
    121: "FrontalPole_L",
    122: "FusiformGyrus_R",
    123: "FusiformGyrus_L",
    124: "GyrusRectus_R",
    125: "GyrusRectus_L",
    128: "InferiorOccipitalGyrus_R",
    129: "InferiorOccipitalGyrus_L",
    132: "InferiorTemporalGyrus_R",
    133: "InferiorTemporalGyrus_L",
    134: "LingualGyrus_R",
    135: "LingualGyrus_L",
    136: "LateralOrbitalGyrus_R",
    137: "LateralOrbitalGyrus_L",
    138: "MiddleCingulateGyrus_R",
    139: "MiddleCingulateGyrus_L",
    140: "MedialFrontalCortex_R",
    141: "MedialFrontalCortex_L",
    142: "MiddleFrontalGyrus_R",
    143: "MiddleFrontalGyrus_L",
    144: "MiddleOccipitalGyrus_R",
    145: "MiddleOccipitalGyrus_L",
    146: "MedialOrbitalGyrus_R",
    147: "MedialOrbitalGyrus_L",
    148: "PostcentralGyrusMedialSegment_R",
    149: "PostcentralGyrusMedialSegment_L",
    150: "PrecentralGyrusMedialSegment_R",
    151: "PrecentralGyrusMedialSegment_L",
    152: "SuperiorFrontalGyrusMedialSegment_R",
    153: "SuperiorFrontalGyrusMedialSegment_L",
    154: "MiddleTemporalGyrus_R",
    155: "MiddleTemporalGyrus_L",
    156: "OccipitalPole_R",
    157: "OccipitalPole_L",
    160: "OccipitalFusiformGyrus_R",
    161: "OccipitalFusiformGyrus_L",
    162: "OpercularPartInferiorFrontalGyrus_R",
    163: "OpercularPartInferiorFrontalGyrus_L",
    164: "OrbitalPartInferiorFrontalGyrus_R",
    165: "OrbitalPartInferiorFrontalGyrus_L",
    166: "PosteriorCingulateGyrus_R",
    167: "PosteriorCingulateGyrus_L",
    168: "Precuneus_R",
    169: "Precuneus_L",
    170: "ParahippocampalGyrus_R",
    171: "ParahippocampalGyrus_L",
    172: "PosteriorInsula_R",
    173: "PosteriorInsula_L",
    174: "ParietalOperculum_R",
    175: "ParietalOperculum_L",
    176: "PostcentralGyrus_R",
    177: "PostcentralGyrus_L",
    178: "PosteriorOrbitalGyrus_R",
    179: "PosteriorOrbitalGyrus_L",
    180: "PlanumPolare_R",
    181: "PlanumPolare_L",
    182: "PrecentralGyrus_R",
    183: "PrecentralGyrus_L",
    184: "PlanumTemporale_R",
    185: "PlanumTemporale_L",
    186: "SubcallosalArea_R",
    187: "SubcallosalArea_L",
    190: "SuperiorFrontalGyrus_R",
    191: "SuperiorFrontalGyrus_L",
    192: "SupplementaryMotorCortex_R",
    193: "SupplementaryMotorCortex_L",
    194: "SupramarginalGyrus_R",
    195: "SupramarginalGyrus_L",
    196: "SuperiorOccipitalGyrus_R",
    197: "SuperiorOccipitalGyrus_L",
    198: "SuperiorParietalLobule_R",
    199: "SuperiorParietalLobule_L",
    200: "SuperiorTemporalGyrus_R",
    201: "SuperiorTemporalGyrus_L",
    202: "TemporalPole_R",
    203: "TemporalPole_L",
    204: "TriangularPartInferiorFrontalGyrus_R",
    205: "TriangularPartInferiorFrontalGyrus_L",
    206: "TransverseTemporalGyrus_R",
    207: "TransverseTemporalGyrus_L",
    46: "CSF",
    69: "OpticChiasm",
}
MUSE_NAMES = dict(sorted(MUSE_NAMES.items()))


@dataclass(frozen=True)
class Structure:
    """One compact label.

    Attributes:
        label: Compact label id (1..30; 0 is background).
        name: FreeSurfer-style name, e.g. ``"Left-Hippocampus"``.
        muse: The MUSE label indices it gathers.
        rgb: Display colour (FreeSurferColorLUT), 0-255.
    """

    label: int
    name: str
    muse: tuple[int, ...]
    rgb: tuple[int, int, int]


def _side(side: str, low: int, high: int) -> tuple[int, ...]:
    """MUSE labels within ``low..high`` whose name ends in ``_L``/``_R``."""
    return tuple(k for k, v in MUSE_NAMES.items() if low <= k <= high and v.endswith(f"_{side}"))


STRUCTURES: list[Structure] = [
    Structure(1, "Left-Cerebral-Cortex", (75, *_side("L", 100, 207)), (205, 62, 78)),
    Structure(2, "Right-Cerebral-Cortex", (76, *_side("R", 100, 207)), (205, 62, 78)),
    Structure(3, "Left-Cerebral-White-Matter", (62, 82, 84, 86, 88, 90, 92, 94), (245, 245, 245)),
    Structure(4, "Right-Cerebral-White-Matter", (61, 81, 83, 85, 87, 89, 91, 93), (245, 245, 245)),
    Structure(5, "Corpus-Callosum", (95,), (0, 0, 160)),
    Structure(6, "Left-Lateral-Ventricle", (52,), (120, 18, 134)),
    Structure(7, "Right-Lateral-Ventricle", (51,), (120, 18, 134)),
    Structure(8, "3rd-Ventricle", (4,), (204, 182, 142)),
    Structure(9, "4th-Ventricle", (11,), (42, 204, 164)),
    Structure(10, "Left-Hippocampus", (48,), (220, 216, 20)),
    Structure(11, "Right-Hippocampus", (47,), (220, 216, 20)),
    Structure(12, "Left-Amygdala", (32,), (103, 255, 255)),
    Structure(13, "Right-Amygdala", (31,), (103, 255, 255)),
    Structure(14, "Left-Thalamus", (60,), (0, 118, 14)),
    Structure(15, "Right-Thalamus", (59,), (0, 118, 14)),
    Structure(16, "Left-Caudate", (30, 37), (122, 186, 220)),
    Structure(17, "Right-Caudate", (23, 36), (122, 186, 220)),
    Structure(18, "Left-Putamen", (58,), (236, 13, 176)),
    Structure(19, "Right-Putamen", (57,), (236, 13, 176)),
    Structure(20, "Left-Pallidum", (56,), (12, 48, 255)),
    Structure(21, "Right-Pallidum", (55,), (13, 48, 255)),
    Structure(22, "Left-Cerebellum-Cortex", (39,), (230, 148, 34)),
    Structure(23, "Right-Cerebellum-Cortex", (38,), (230, 148, 34)),
    Structure(24, "Cerebellar-Vermis", (71, 72, 73), (119, 100, 176)),
    Structure(25, "Left-Cerebellum-White-Matter", (41,), (220, 248, 164)),
    Structure(26, "Right-Cerebellum-White-Matter", (40,), (220, 248, 164)),
    Structure(27, "Brain-Stem", (35,), (119, 159, 176)),
    Structure(28, "Left-Inf-Lat-Vent", (50,), (196, 58, 250)),
    Structure(29, "Right-Inf-Lat-Vent", (49,), (196, 58, 250)),
    Structure(30, "CSF", (1, 46, 69), (60, 60, 60)),
]
"""The compact label table, ordered by label id (label ``i`` is ``STRUCTURES[i - 1]``)."""

# Totals measured on every label map, as groups of compact labels. ``gm``/``wm``/``brain``/``icv``
# equal MUSE's derived regions 601/604/701/702 (up to the optic chiasm, which MUSE leaves out).
TOTALS: dict[str, tuple[int, ...]] = {
    "icv": tuple(range(1, 31)),
    "brain": tuple(range(1, 30)),
    "gm": (1, 2, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24),
    "wm": (3, 4, 5, 25, 26),
    "lateral_ventricles": (6, 7),
    "hippocampus": (10, 11),
}

_LUT = np.zeros(256, dtype=np.uint8)
for _s in STRUCTURES:
    _LUT[list(_s.muse)] = _s.label
_KNOWN = np.zeros(256, dtype=bool)
_KNOWN[[0, *MUSE_NAMES]] = True


def muse_to_compact(muse_labels: np.ndarray) -> np.ndarray:
    """Map a MUSE label map to compact labels (same shape, ``uint8``, 0 = background).

    Raises:
        ValueError: a value is not a MUSE label (the message lists the first few).

    Example:
        >>> muse_to_compact(np.array([0, 48, 47, 123, 95])).tolist()
        [0, 10, 11, 1, 5]
    """
    arr = np.asarray(muse_labels)
    if arr.dtype.kind not in "iu":
        if not np.all(np.mod(arr, 1) == 0):
            raise ValueError("MUSE labels must be integers")
        arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr > 255) | ~_KNOWN[np.clip(arr, 0, 255)]
    if bad.any():
        values = np.unique(arr[bad])[:8].tolist()
        raise ValueError(f"not MUSE labels: {values}; expected 0 or an index of synth.anatomy.MUSE_NAMES")
    return _LUT[arr]


def structure_by_name(name: str) -> Structure:
    """The :class:`Structure` called ``name`` (case-insensitive); ``ValueError`` lists the names."""
    for s in STRUCTURES:
        if s.name.lower() == name.lower():
            return s
    raise ValueError(f"unknown structure {name!r}; known: {', '.join(s.name for s in STRUCTURES)}")


def label_table() -> list[dict]:
    """The label table as JSON-ready rows (for sidecars and viewers)."""
    return [
        {"label": s.label, "name": s.name, "rgb": list(s.rgb), "muse": list(s.muse)} for s in STRUCTURES
    ]


def _check() -> None:
    """Import-time invariants: ids are 1..N in order, and every MUSE label maps exactly once."""
    assert [s.label for s in STRUCTURES] == list(range(1, len(STRUCTURES) + 1))
    seen = [m for s in STRUCTURES for m in s.muse]
    assert sorted(seen) == sorted(MUSE_NAMES), set(MUSE_NAMES) ^ set(seen)


_check()
