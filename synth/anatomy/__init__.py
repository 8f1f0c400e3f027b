"""Anatomy of every brain: labels, volumes, surface meshes and 3D export.

Every output of this package describes a SYNTHETIC brain (or a user's own image) and is NOT FOR
CLINICAL USE.

Example:
    >>> import synth, synth.anatomy as anat                                  # doctest: +SKIP
    >>> brain = synth.load_generator().generate(synth.Condition(72, "F", "AD"), seed=3)  # doctest: +SKIP
    >>> labels = anat.load_segmenter().segment(brain.image)                  # doctest: +SKIP
    >>> anat.export_brain("out/", brain)          # NIfTI labels, USD, STL, PLY, OBJ, GLB  # doctest: +SKIP
"""

from .export import export_meshes, export_usd, save_labels, validate_usd
from .labels import MUSE_NAMES, STRUCTURES, TOTALS, Structure, label_table, muse_to_compact, structure_by_name
from .meshes import outer_surface, structure_meshes
from .volumes import dice_scores, measure_volumes, morphometry

__all__ = [
    "DEFAULT_SEGMENTER",
    "EXPORT_FORMATS",
    "MUSE_NAMES",
    "STRUCTURES",
    "TOTALS",
    "Segmenter",
    "Structure",
    "dice_scores",
    "export_brain",
    "export_meshes",
    "export_usd",
    "label_table",
    "load_segmenter",
    "match_brain_volumes",
    "match_volumes",
    "measure_volumes",
    "morphometry",
    "muse_to_compact",
    "outer_surface",
    "save_labels",
    "structure_by_name",
    "structure_meshes",
    "validate_usd",
]

# The segmenter (torch, MONAI) loads only when first asked for, so that the command line can check
# its arguments before any heavy import.
_LAZY = {"DEFAULT_SEGMENTER": "segmenter", "Segmenter": "segmenter", "load_segmenter": "segmenter",
         "EXPORT_FORMATS": "workflow", "export_brain": "workflow",
         "match_volumes": "warp", "match_brain_volumes": "warp"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
