"""The evaluation functions on a tiny model and a prepared-data folder made here."""

import csv

import numpy as np
import pytest

from synth import evaluate as ev
from synth.data.prepare import TABLE_FIELDS, PreparedData
from synth.io import save_nifti


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    rng = np.random.default_rng(0)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, 32)] * 3, indexing="ij"))
    rows = []
    for i, age in enumerate([25, 30, 45, 50, 65, 75]):
        mask = (g**2).sum(0) < 0.7
        t1 = (mask * (0.5 + 0.3 * np.sin(5 * g[0] + i) + rng.normal(0, 0.02, mask.shape))).clip(0, 1)
        mrid = f"SYN{i:03d}-XX-0000"
        save_nifti(root / "volumes" / f"{mrid}_t1.nii.gz", t1.astype(np.float32), np.eye(4))
        save_nifti(root / "volumes" / f"{mrid}_labels.nii.gz", mask.astype(np.uint8), np.eye(4))
        rows.append({"mrid": mrid, "subject_id": mrid[:6], "split": "test", "age": age, "sex": "FM"[i % 2],
                     "icv": 1.5e6, "brain": 1.3e6, "gm": 7e5, "wm": 5e5, "lateral_ventricles": 2e4,
                     "hippocampus": 8e3, "reg_ncc": 0.95})
    with open(root / "subjects.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TABLE_FIELDS)
        w.writeheader()
        w.writerows(rows)
    return PreparedData.load(root)


def test_reconstruction_reports_per_subject(tiny_generator, tiny_data):
    r = ev.reconstruction(tiny_generator, tiny_data)
    assert r["n"] == 6 and len(r["per_subject"]) == 6
    assert all(np.isfinite(s["psnr"]) and -1 <= s["ssim"] <= 1 for s in r["per_subject"])
    assert r["psnr_mean"] == pytest.approx(np.mean([s["psnr"] for s in r["per_subject"]]))


def test_sharpness_and_condition_following(tiny_generator, tiny_data):
    s, pairs = ev.sample_sharpness(tiny_generator, tiny_data, log=lambda m: None)
    assert s["n"] == 6 and len(pairs) == 6 and s["ratio"] == pytest.approx(s["generated_mean"] / s["real_mean"])
    c = ev.condition_following(tiny_generator, tiny_data, splits=("test",), per_band=2)
    assert np.array(c["correlation_matrix_generated_x_real"]).shape == (3, 3)
    assert c["n_real"] == [2, 2, 2]


def test_age_sweep_without_segmenter(tiny_generator):
    sw = ev.age_sweep(tiny_generator, None, ages=(25, 50, 80))
    assert len(sw["ventricles_ml"]) == 3 and len(sw["images"]) == 3
    assert isinstance(sw["ventricles_increase"], bool)
