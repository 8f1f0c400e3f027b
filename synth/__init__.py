"""SynthBrain: conditional generators of synthetic 3D T1 brain MRI.

Every image this library produces is synthetic and NOT FOR CLINICAL USE.

Example:
    >>> import synth
    >>> gen = synth.load_generator()                     # the shipped default model  # doctest: +SKIP
    >>> brain = gen.generate(synth.Condition(age=72, sex="F", diagnosis="AD"), seed=3)  # doctest: +SKIP
    >>> brain.save("brain.nii.gz")                        # NIfTI + JSON provenance sidecar  # doctest: +SKIP
"""

from .brain import SyntheticBrain
from .condition import AGE_RANGE, DIAGNOSES, DISEASE_EFFECTS, SEXES, VOLUME_KEYS, Condition
from .grid import MNI_2MM, Grid
from .io import SYNTHETIC_NOTICE
from .normative import NormativeModel, target_volumes
from .version import __version__

__all__ = [
    "AGE_RANGE",
    "DEFAULT_MODEL",
    "DIAGNOSES",
    "DISEASE_EFFECTS",
    "MNI_2MM",
    "SEXES",
    "SYNTHETIC_NOTICE",
    "VOLUME_KEYS",
    "BrainGenerator",
    "Condition",
    "Generator",
    "Grid",
    "ModelInfo",
    "NormativeModel",
    "SyntheticBrain",
    "__version__",
    "available_models",
    "load_generator",
    "pick_device",
    "target_volumes",
]

# torch and MONAI load only when a generator is first asked for, so that light users (the command
# line checking its arguments, the readers) start in a fraction of a second.
_LAZY = {name: "pipeline" for name in ("DEFAULT_MODEL", "BrainGenerator", "available_models", "load_generator", "pick_device")}
_LAZY.update(Generator="generators", ModelInfo="generators")  # the interface both backends implement


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
