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
from .pipeline import DEFAULT_MODEL, BrainGenerator, available_models, load_generator, pick_device
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
    "Grid",
    "NormativeModel",
    "SyntheticBrain",
    "__version__",
    "available_models",
    "load_generator",
    "pick_device",
    "target_volumes",
]
