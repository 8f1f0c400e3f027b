"""What a user asks for: age, sex, diagnosis and optional volume targets, validated at the boundary.

The training data (IXI) has healthy volunteers only, so a diagnosis is expressed through
morphometry: the normative volumes for the age and sex are shifted by effect sizes from the
literature (:data:`DISEASE_EFFECTS`), and the model is conditioned on those volumes.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

__all__ = [
    "AGE_RANGE",
    "DIAGNOSES",
    "DISEASE_EFFECTS",
    "SEXES",
    "VOLUME_KEYS",
    "Condition",
]

AGE_RANGE = (18.0, 95.0)
TRAINING_AGE_RANGE = (20.0, 82.0)  # IXI ages; outside it the model extrapolates
SEXES = ("F", "M")
DIAGNOSES = ("CN", "MCI", "AD")
# Volumes a condition can set, as fractions of intracranial volume (ICV).
VOLUME_KEYS = ("brain", "gm", "wm", "lateral_ventricles", "hippocampus")
_VOLUME_LIMITS = {  # plausible fraction-of-ICV ranges, generous on both sides
    "brain": (0.55, 1.0),
    "gm": (0.25, 0.65),
    "wm": (0.2, 0.55),
    "lateral_ventricles": (0.001, 0.15),
    "hippocampus": (0.001, 0.012),
}

# Multiplicative change of each volume relative to age- and sex-matched healthy controls.
DISEASE_EFFECTS: dict[str, dict[str, float]] = {
    "CN": {},
    "MCI": {
        # Shi F, Liu B, Zhou Y, Yu C, Jiang T. Hippocampal volume and asymmetry in mild cognitive
        # impairment and Alzheimer's disease: meta-analyses of MRI studies. Hippocampus
        # 2009;19(11):1055-64. MCI: -12.9 % left, -11.1 % right -> mean -12 %.
        "hippocampus": 0.88,
        # Approximate, not checked against the paper's tables here: ADNI baseline ventricles are
        # larger in MCI than in controls (Nestor SM et al. Brain 2008;131(9):2443-54).
        "lateral_ventricles": 1.15,
        # Approximate: whole-brain volume a little lower in MCI (Fox NC, Schott JM. Imaging
        # cerebral atrophy: normal ageing to Alzheimer's disease. Lancet 2004;363:392-4).
        "brain": 0.985,
        "gm": 0.975,
    },
    "AD": {
        # Shi et al. 2009 (above): AD -24.2 % left, -23.1 % right -> mean -24 %.
        "hippocampus": 0.76,
        # Approximate (Nestor et al. 2008, above): ventricles clearly enlarged in AD.
        "lateral_ventricles": 1.35,
        # Approximate (Fox & Schott 2004, above): whole brain several % lower, mostly grey matter.
        "brain": 0.96,
        "gm": 0.94,
    },
}


def _parse_number(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be a number, got {value!r}")
    if not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"`{name}` must be a number, got {value!r}") from None
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value}")
    return value


def _parse_age(age: Any) -> float:
    age = _parse_number("age", age)
    lo, hi = AGE_RANGE
    if not lo <= age <= hi:
        raise ValueError(f"`age` must be within {lo:g}-{hi:g} years, got {age:g}")
    return age


def _parse_choice(name: str, value: Any, choices: tuple[str, ...], aliases: Mapping[str, str] = {}) -> str:
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be one of {', '.join(choices)}, got {value!r}")
    key = aliases.get(value.strip().lower(), value.strip().upper())
    if key not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(choices)}, got {value!r}")
    return key


def _parse_volumes(volumes: Mapping[str, Any] | None) -> dict[str, float]:
    if volumes is None:
        return {}
    if not isinstance(volumes, Mapping):
        raise TypeError(f"`volumes` must be a mapping of structure -> fraction of ICV, got {volumes!r}")
    parsed = {}
    for key, value in volumes.items():
        if key not in VOLUME_KEYS:
            raise ValueError(f"`volumes` key must be one of {', '.join(VOLUME_KEYS)}, got {key!r}")
        v = _parse_number(f"volumes[{key!r}]", value)
        lo, hi = _VOLUME_LIMITS[key]
        if not lo <= v <= hi:
            raise ValueError(
                f"`volumes[{key!r}]` is a fraction of intracranial volume and must be within "
                f"{lo:g}-{hi:g}, got {v:g}"
            )
        parsed[key] = v
    return parsed


@dataclass(frozen=True)
class Condition:
    """The condition of a synthetic brain.

    Args:
        age: Age in years, within :data:`AGE_RANGE` (the shipped model saw 20-82).
        sex: ``"F"`` or ``"M"`` (``"female"``/``"male"`` accepted).
        diagnosis: ``"CN"`` (cognitively normal), ``"MCI"`` or ``"AD"``.
        volumes: Optional explicit targets as fractions of intracranial volume, keys from
            :data:`VOLUME_KEYS`; they override what age, sex and diagnosis imply.

    Example:
        >>> Condition(age=72, sex="F", diagnosis="AD")
        Condition(age=72.0, sex='F', diagnosis='AD', volumes={})
    """

    age: float
    sex: str
    diagnosis: str = "CN"
    volumes: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "age", _parse_age(self.age))
        object.__setattr__(self, "sex", _parse_choice("sex", self.sex, SEXES, {"female": "F", "male": "M"}))
        object.__setattr__(self, "diagnosis", _parse_choice("diagnosis", self.diagnosis, DIAGNOSES))
        object.__setattr__(self, "volumes", _parse_volumes(self.volumes))
        lo, hi = TRAINING_AGE_RANGE
        if not lo <= self.age <= hi:
            warnings.warn(
                f"age {self.age:g} is outside the training ages {lo:g}-{hi:g}: the model extrapolates",
                stacklevel=3,
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["volumes"] = dict(self.volumes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Condition":
        unknown = set(d) - {"age", "sex", "diagnosis", "volumes"}
        if unknown:
            raise ValueError(f"unknown condition fields {sorted(unknown)}; expected age, sex, diagnosis, volumes")
        return cls(**d)

    def cache_key(self) -> tuple:
        return (self.age, self.sex, self.diagnosis, tuple(sorted(self.volumes.items())))
