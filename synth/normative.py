"""Normative volumes of a healthy brain for an age and sex, fit on the training split.

For each volume ``v`` (fraction of intracranial volume) the model is log-quadratic in age with a
sex offset::

    log v = b0 + b1 t + b2 t^2 + b3 [male] + e,   t = (age - 50) / 20,   e ~ N(0, s^2)

so the expected volume is ``exp(b . x)`` and the 95 % normative range ``exp(b . x +- 1.96 s)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from .condition import DISEASE_EFFECTS, VOLUME_KEYS, Condition

__all__ = ["NormativeModel", "target_volumes"]

_AGE_CENTER, _AGE_SCALE = 50.0, 20.0


def _design(age: float | np.ndarray, male: float | np.ndarray) -> np.ndarray:
    t = (np.asarray(age, float) - _AGE_CENTER) / _AGE_SCALE
    return np.stack([np.ones_like(t), t, t**2, np.asarray(male, float) * np.ones_like(t)], axis=-1)


@dataclass
class NormativeModel:
    """Per-volume coefficients ``b`` (4 numbers) and residual SD ``s`` of the log-quadratic model."""

    coefs: dict[str, list[float]]
    resid_sd: dict[str, float]
    n_subjects: int = 0

    @classmethod
    def fit(cls, rows: Iterable[Mapping]) -> "NormativeModel":
        """Fit on rows with ``age``, ``sex``, ``icv`` and the volumes of :data:`VOLUME_KEYS` (mm^3)."""
        rows = [r for r in rows if r.get("age") is not None and r.get("sex")]
        if len(rows) < 8:
            raise ValueError(f"need at least 8 subjects with age and sex to fit the normative model, got {len(rows)}")
        x = _design(np.array([r["age"] for r in rows]), np.array([r["sex"] == "M" for r in rows]))
        coefs, sds = {}, {}
        for key in VOLUME_KEYS:
            y = np.log(np.array([r[key] / r["icv"] for r in rows]))
            b, *_ = np.linalg.lstsq(x, y, rcond=None)
            resid = y - x @ b
            coefs[key] = [float(v) for v in b]
            sds[key] = float(np.sqrt(resid @ resid / max(len(y) - x.shape[1], 1)))
        return cls(coefs, sds, len(rows))

    def expected(self, age: float, sex: str) -> dict[str, float]:
        """Expected (median) fraction of ICV of each volume for a healthy ``age`` and ``sex``."""
        x = _design(age, sex == "M")
        return {k: float(np.exp(x @ np.asarray(b))) for k, b in self.coefs.items()}

    def interval(self, age: float, sex: str, z: float = 1.96) -> dict[str, tuple[float, float]]:
        """Normative range (default 95 %) of each volume as fractions of ICV."""
        x = _design(age, sex == "M")
        out = {}
        for k, b in self.coefs.items():
            mu = float(x @ np.asarray(b))
            out[k] = (float(np.exp(mu - z * self.resid_sd[k])), float(np.exp(mu + z * self.resid_sd[k])))
        return out

    def zscore(self, key: str, fraction: float, age: float, sex: str) -> float:
        """How many residual SDs ``fraction`` lies from the healthy expectation (log scale)."""
        mu = float(_design(age, sex == "M") @ np.asarray(self.coefs[key]))
        return (float(np.log(fraction)) - mu) / self.resid_sd[key]

    def to_dict(self) -> dict:
        return {
            "model": "log(v/ICV) = b0 + b1 t + b2 t^2 + b3 male, t = (age - 50) / 20",
            "coefs": self.coefs,
            "resid_sd": self.resid_sd,
            "n_subjects": self.n_subjects,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "NormativeModel":
        return cls({k: list(v) for k, v in d["coefs"].items()}, dict(d["resid_sd"]), int(d.get("n_subjects", 0)))


def target_volumes(condition: Condition, normative: NormativeModel) -> dict[str, float]:
    """Volumes (fractions of ICV) a brain of ``condition`` should have.

    Healthy expectation for age and sex, times the diagnosis effect of :data:`DISEASE_EFFECTS`,
    then overridden by any explicit ``condition.volumes``.
    """
    vols = normative.expected(condition.age, condition.sex)
    for key, factor in DISEASE_EFFECTS[condition.diagnosis].items():
        vols[key] *= factor
    vols.update(condition.volumes)
    return vols
