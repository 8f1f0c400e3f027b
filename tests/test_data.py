"""Preparation of real IXI scans (skips cleanly where ../shared/data/ixi is absent)."""

import csv

import nibabel as nib
import numpy as np
import pytest

from synth.data import find_subjects, prepare_ixi, split_of
from synth.grid import MNI_2MM

from .conftest import IXI, needs_ixi


def test_split_rule_is_fixed():
    assert [split_of(s) for s in ("IXI012", "IXI034", "IXI002")] == ["train", "val", split_of("IXI002")]
    ids = [f"IXI{i:03d}" for i in range(1000)]
    frac = np.mean([split_of(i) == "test" for i in ids])
    assert 0.07 < frac < 0.13


def test_find_subjects_needs_an_ixi_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected an IXI folder"):
        find_subjects(tmp_path)


@needs_ixi
def test_prepare_two_subjects(tmp_path):
    data = prepare_ixi(IXI, tmp_path / "prep", workers=1, limit=2, progress=False)
    assert len(data.rows) == 2
    muse = {r["MRID"]: r for r in csv.DictReader(open(IXI / "muse_volumes.csv"))}
    for row in data.rows:
        ref = muse[row["mrid"]]
        assert row["icv"] == pytest.approx(float(ref["702"]), rel=0.01)
        assert row["hippocampus"] == pytest.approx(float(ref["47"]) + float(ref["48"]), rel=0.01)
        assert row["reg_ncc"] > 0.85
        t1, labels = data.t1(row), data.labels(row)
        assert t1.shape == MNI_2MM.shape and 0 <= t1.min() and t1.max() <= 1
        assert (t1[labels == 0] == 0).all()  # skull-stripped
        img = nib.load(str(data.root / "volumes" / f"{row['mrid']}_t1.nii.gz"))
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S") and np.allclose(img.affine, MNI_2MM.affine)
        # Registered to MNI: the brain's centre of mass lies near the MNI origin's neighbourhood.
        com = nib.affines.apply_affine(img.affine, np.argwhere(labels > 0).mean(0))
        assert np.all(np.abs(com - [0, -18, 8]) < 12)
    again = prepare_ixi(IXI, tmp_path / "prep", workers=1, limit=2, progress=False)  # resumes
    assert [r["mrid"] for r in again.rows] == [r["mrid"] for r in data.rows]


def test_prepared_data_missing(tmp_path):
    from synth.data.prepare import PreparedData

    with pytest.raises(FileNotFoundError, match="run `synthbrain prepare` first"):
        PreparedData.load(tmp_path)
