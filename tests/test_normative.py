import numpy as np
import pytest

from synth import NormativeModel
from synth.condition import VOLUME_KEYS


def _rows(n=200, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        age, male = rng.uniform(20, 85), rng.random() < 0.5
        t = (age - 50) / 20
        icv = 1.5e6
        row = {"age": age, "sex": "M" if male else "F", "icv": icv}
        for k in VOLUME_KEYS:
            log_frac = np.log(0.01) + (0.3 if k == "lateral_ventricles" else -0.05) * t + 0.02 * male
            row[k] = icv * np.exp(log_frac + rng.normal(0, 0.01))
        rows.append(row)
    return rows


def test_fit_recovers_known_trends_and_round_trips():
    model = NormativeModel.fit(_rows())
    b = model.coefs["lateral_ventricles"]
    assert b[1] == pytest.approx(0.3, abs=0.01)
    assert model.coefs["hippocampus"][1] == pytest.approx(-0.05, abs=0.01)
    assert model.resid_sd["brain"] == pytest.approx(0.01, abs=0.003)
    young, old = model.expected(25, "F"), model.expected(80, "F")
    assert old["lateral_ventricles"] > young["lateral_ventricles"]
    lo, hi = model.interval(60, "M")["hippocampus"]
    assert lo < model.expected(60, "M")["hippocampus"] < hi
    assert abs(model.zscore("brain", model.expected(60, "M")["brain"], 60, "M")) < 1e-6
    again = NormativeModel.from_dict(model.to_dict())
    assert again.expected(40, "M") == model.expected(40, "M")


def test_fit_needs_enough_subjects():
    with pytest.raises(ValueError, match="at least 8 subjects"):
        NormativeModel.fit(_rows(5))
