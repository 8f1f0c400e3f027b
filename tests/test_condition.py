import math
import warnings

import pytest

from synth import DISEASE_EFFECTS, Condition, target_volumes
from synth.testing import toy_normative


def test_valid_condition_is_normalised():
    c = Condition(age=72, sex="female", diagnosis="ad")
    assert (c.age, c.sex, c.diagnosis, dict(c.volumes)) == (72.0, "F", "AD", {})
    assert Condition.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"age": 134, "sex": "F"}, ValueError, r"`age` must be within 18-95 years, got 134"),
        ({"age": 5, "sex": "F"}, ValueError, r"`age` must be within"),
        ({"age": float("nan"), "sex": "F"}, ValueError, r"`age` must be a finite number"),
        ({"age": "old", "sex": "F"}, TypeError, r"`age` must be a number"),
        ({"age": True, "sex": "F"}, TypeError, r"`age` must be a number"),
        ({"age": 50, "sex": "X"}, ValueError, r"`sex` must be one of F, M, got 'X'"),
        ({"age": 50, "sex": 1}, TypeError, r"`sex` must be one of F, M"),
        ({"age": 50, "sex": "M", "diagnosis": "PD"}, ValueError, r"`diagnosis` must be one of CN, MCI, AD"),
        ({"age": 50, "sex": "M", "volumes": {"amygdala": 0.002}}, ValueError, r"`volumes` key must be one of"),
        ({"age": 50, "sex": "M", "volumes": {"hippocampus": 0.5}}, ValueError, r"fraction of intracranial volume"),
        ({"age": 50, "sex": "M", "volumes": {"hippocampus": "a lot"}}, TypeError, r"must be a number"),
        ({"age": 50, "sex": "M", "volumes": [0.1]}, TypeError, r"`volumes` must be a mapping"),
    ],
)
def test_invalid_conditions_raise_named_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Condition(**kwargs)


def test_unknown_field_in_dict():
    with pytest.raises(ValueError, match="unknown condition fields"):
        Condition.from_dict({"age": 50, "sex": "F", "weight": 70})


def test_age_outside_training_range_warns():
    with pytest.warns(UserWarning, match="outside the training ages"):
        Condition(age=90, sex="M")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Condition(age=60, sex="M")


def test_disease_shifts_targets_by_literature_effects():
    norm = toy_normative()
    cn = target_volumes(Condition(age=75, sex="F"), norm)
    ad = target_volumes(Condition(age=75, sex="F", diagnosis="AD"), norm)
    mci = target_volumes(Condition(age=75, sex="F", diagnosis="MCI"), norm)
    assert math.isclose(ad["hippocampus"] / cn["hippocampus"], DISEASE_EFFECTS["AD"]["hippocampus"])
    assert ad["hippocampus"] < mci["hippocampus"] < cn["hippocampus"]
    assert ad["lateral_ventricles"] > mci["lateral_ventricles"] > cn["lateral_ventricles"]
    assert ad["brain"] < cn["brain"]
    explicit = target_volumes(Condition(age=75, sex="F", diagnosis="AD", volumes={"hippocampus": 0.006}), norm)
    assert explicit["hippocampus"] == 0.006
