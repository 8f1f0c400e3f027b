"""synth.realism and `synthbrain evaluate`: behaviour on tiny real parts (phantoms, tiny networks).

The distances and two-sample tests must separate clearly different sets and not separate one
distribution from itself; the CLI must write the report, every figure and finite numbers.
"""

import csv
import json
import math
from pathlib import Path

import numpy as np
import torch
import pytest

from synth import realism as R

SIZE = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks gain nothing from threads, and on a shared 2-core machine two threads that
    wait on each other run several times slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _phantom(rng, age: float, sex: str, size: int = SIZE, blur: float = 0.0) -> np.ndarray:
    """A 'brain': an ellipsoid with a folded texture and dark ventricles that grow with age."""
    from scipy.ndimage import gaussian_filter

    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij"))
    scale = 1.0 if sex == "F" else 1.08
    brain = (g[0] ** 2 / 0.7 + g[1] ** 2 / 0.8 + g[2] ** 2 / 0.6) < 0.9 * scale
    texture = 0.6 + 0.25 * np.sin(9 * g[0] + rng.uniform(0, 6)) * np.cos(7 * g[1] + rng.uniform(0, 6))
    vent = (g[0] ** 2 + (g[1] / 1.5) ** 2 + g[2] ** 2) < (0.02 + 0.002 * age) * 0.5
    img = brain * (texture + rng.normal(0, 0.05, brain.shape))
    img[vent] = 0.15
    if blur:
        img = gaussian_filter(img, blur) * brain
    return np.clip(img, 0, 1).astype(np.float32)


def write_split_prepared(root: Path, n_train: int = 24, n_val: int = 5, n_test: int = 5, seed: int = 0):
    """A prepared-data folder with train/val/test phantoms in the layout of ``synthbrain prepare``."""
    from synth.data.prepare import TABLE_FIELDS, PreparedData
    from synth.io import save_nifti

    rng = np.random.default_rng(seed)
    rows = []
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(n):
            age, sex = float(rng.uniform(20, 85)), "FM"[i % 2]
            t1 = _phantom(rng, age, sex)
            mrid = f"{split[:2].upper()}{i:03d}-XX-0000"
            save_nifti(root / "volumes" / f"{mrid}_t1.nii.gz", t1, np.eye(4))
            save_nifti(root / "volumes" / f"{mrid}_labels.nii.gz", (t1 > 0).astype(np.uint8), np.eye(4))
            rows.append({"mrid": mrid, "subject_id": mrid[:5], "split": split, "age": round(age, 1), "sex": sex,
                         "icv": 1.5e6, "brain": 1.3e6 - 2e3 * age, "gm": 7e5, "wm": 5e5,
                         "lateral_ventricles": 1e4 + 300 * age, "hippocampus": 8e3, "reg_ncc": 0.95})
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "subjects.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TABLE_FIELDS)
        w.writeheader()
        w.writerows(rows)
    return PreparedData.load(root)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return write_split_prepared(tmp_path_factory.mktemp("prep"))


@pytest.fixture(scope="module")
def features_dir(prepared, tmp_path_factory):
    run = tmp_path_factory.mktemp("features-run")
    cfg = R.FeatureTrainConfig(data_dir=str(prepared.root), run_dir=str(run), steps=30, batch_size=4, channels=(8, 8, 16),
                               pool=1, checkpoint_every=10, threads=1)
    metrics = R.train_features(cfg, log=lambda m: None)
    assert metrics["step"] == 30
    return R.export_features(run, tmp_path_factory.mktemp("models") / "features-tiny", name="features-tiny")


# ----------------------------------------------------------------------------- distances


def test_frechet_distance_zero_for_same_set_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 8))
    assert R.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    b = rng.normal(size=(200, 8))
    near, far = R.frechet_distance(a, b), R.frechet_distance(a, b + 1.0)
    assert near < 0.5  # sampling noise only
    assert far == pytest.approx(8.0, rel=0.25)  # ||mu||^2 = 8


def test_kernel_distance_near_zero_for_one_distribution_and_large_for_two():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(60, 16)), rng.normal(size=(60, 16))
    same = R.kernel_distance(a, b, subsets=50, subset_size=30)
    diff = R.kernel_distance(a + 1.5, b, subsets=50, subset_size=30)
    assert abs(same["mean"]) < 3 * same["std"] + 0.05
    assert diff["mean"] > 10 * max(same["std"], 1e-3)
    assert diff["sem"] == pytest.approx(diff["std"] / math.sqrt(50))


def test_distances_refuse_bad_shapes():
    with pytest.raises(ValueError, match="features"):
        R.frechet_distance(np.zeros(5), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="dimensions differ"):
        R.frechet_distance(np.zeros((5, 3)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="subset_size"):
        R.kernel_distance(np.zeros((5, 2)), np.zeros((5, 2)), subset_size=9)


# ----------------------------------------------------------------------------- two-sample tests


def _sets(n: int, blur_b: float, seed: int):
    rng = np.random.default_rng(seed)
    a = [_phantom(rng, rng.uniform(20, 85), "FM"[i % 2]) for i in range(n)]
    b = [_phantom(rng, rng.uniform(20, 85), "FM"[i % 2], blur=blur_b) for i in range(n)]
    return a, b


def test_texture_distance_sees_blur_and_ignores_the_scale_of_a_filter():
    """Fréchet distance on the standardised texture bank: blurred phantoms sit far from sharp ones, a second
    draw of sharp ones does not; rescaling one statistic in every set changes nothing (standardised)."""
    from synth.report import texture_scaled

    sharp, blurred = _sets(16, 1.5, seed=3)
    other, _ = _sets(16, 1.5, seed=4)
    bank = {k: R.random_conv_features(v) for k, v in (("ref", sharp), ("blurred", blurred), ("other", other))}
    z = texture_scaled(bank, bank["ref"])
    assert np.allclose(z["ref"].mean(0), 0, atol=1e-9) and np.allclose(z["ref"].std(0), 1, atol=1e-6)
    near, far = R.frechet_distance(z["other"], z["ref"]), R.frechet_distance(z["blurred"], z["ref"])
    assert far > 5 * near
    scaled = {k: v * np.r_[1000.0, np.ones(v.shape[1] - 1)] for k, v in bank.items()}
    z2 = texture_scaled(scaled, scaled["ref"])
    assert R.frechet_distance(z2["blurred"], z2["ref"]) == pytest.approx(far, rel=1e-6)


def test_c2st_cnn_tells_blurred_from_sharp_and_not_one_distribution_from_itself():
    a, b = _sets(16, blur_b=1.2, seed=0)
    diff = R.c2st(a, b, folds=4, steps=40, batch_size=8, pool=1, seed=0)
    assert diff.accuracy >= 0.85, diff
    assert diff.p_value < 0.01
    assert diff.ci95[0] <= diff.accuracy <= diff.ci95[1]
    a2, b2 = _sets(16, blur_b=0.0, seed=1)
    same = R.c2st(a2, b2, folds=4, steps=40, batch_size=8, pool=1, seed=0)
    assert same.accuracy <= 0.75, same
    assert same.ci95[0] < 0.5 < same.ci95[1] or same.accuracy < 0.5


def test_c2st_trains_a_collapsed_fold_again_instead_of_reading_it_as_chance():
    a, b = _sets(16, blur_b=1.2, seed=0)
    # Far too high a learning rate: every fold's net collapses to one output, which scores 50 % held out.
    broken = R.c2st(a, b, folds=4, steps=40, batch_size=8, pool=1, seed=0, lr=1.0, retries=0)
    assert broken.accuracy == 0.5 and [r["fold"] for r in broken.retrained_folds] == [0, 1, 2, 3]
    assert all(r["collapsed"] and r["trainings"] == 1 for r in broken.retrained_folds)
    # With retries (each at half the learning rate) the collapsed folds are trained again and tell the sets apart.
    fixed = R.c2st(a, b, folds=4, steps=40, batch_size=8, pool=1, seed=0, lr=1.0, retries=3)
    assert fixed.accuracy >= 0.8, fixed
    assert fixed.retrained_folds and all(r["trainings"] > 1 and not r["collapsed"] for r in fixed.retrained_folds)
    assert R._degenerate(np.array([0.2, 0.5, 0.1])) and R._degenerate(np.array([-1.0, -2.0]))
    assert R._degenerate(np.array([0.0, 1e-5, -1e-5])) and not R._degenerate(np.array([-1.0, 2.0, 0.5]))


def test_c2st_repeats_average_out_of_fold_scores():
    a, b = _sets(12, blur_b=0.5, seed=4)
    one = R.c2st(a, b, folds=3, steps=20, batch_size=8, pool=1, seed=7)
    rep = R.c2st(a, b, folds=3, steps=20, batch_size=8, pool=1, seed=7, repeats=2)
    second = R.c2st(a, b, folds=3, steps=20, batch_size=8, pool=1, seed=8)
    # the first repeat is the single run, the second a run with the next seed; the scores are their mean
    assert rep.repeat_accuracy == [one.accuracy, second.accuracy] and one.repeat_accuracy == [one.accuracy]
    np.testing.assert_allclose(rep.scores, (np.array(one.scores) + np.array(second.scores)) / 2)
    y = np.r_[np.zeros(12), np.ones(12)].astype(bool)
    assert rep.accuracy == pytest.approx((one.accuracy + second.accuracy) / 2)  # the figure of one run, steadier
    assert rep.committee_accuracy == np.mean((np.array(rep.scores) > 0.5) == y) and one.committee_accuracy is None
    assert rep.ci95[0] <= rep.accuracy <= rep.ci95[1]
    assert len(rep.fold_accuracy) == 6 and "mean of 2 repeats" in rep.method
    with pytest.raises(ValueError, match="repeats"):
        R.c2st(a, b, folds=3, repeats=0)


def test_c2st_logistic_on_random_conv_bank():
    a, b = _sets(16, blur_b=1.2, seed=2)
    fa, fb = R.random_conv_features(a), R.random_conv_features(b)
    assert fa.shape == (16, 64) and np.isfinite(fa).all()
    assert R.c2st_logistic(fa, fb, folds=4).accuracy >= 0.9
    a2, b2 = _sets(16, blur_b=0.0, seed=3)
    assert R.c2st_logistic(R.random_conv_features(a2), R.random_conv_features(b2), folds=4).accuracy <= 0.75


def test_c2st_folds_checked():
    a, b = _sets(3, 0.0, 0)
    with pytest.raises(ValueError, match="folds"):
        R.c2st(a, b, folds=5)


# ----------------------------------------------------------------------------- diversity, privacy, brain age


def test_ms_ssim_identical_is_one_and_different_is_lower():
    rng = np.random.default_rng(0)
    x, y = _phantom(rng, 40, "F"), _phantom(rng, 70, "M")
    same, other = R.ms_ssim_pairs([(x, x), (x, y)])
    assert same == pytest.approx(1.0, abs=1e-4)
    assert other < 0.95


def test_nearest_training_finds_a_copied_subject():
    rng = np.random.default_rng(0)
    train = [_phantom(rng, 30 + 5 * i, "FM"[i % 2]) for i in range(6)]
    copy = train[3] + rng.normal(0, 0.01, train[3].shape).astype(np.float32)
    new = _phantom(rng, 50, "F")
    nn = R.nearest_training([copy, new], train, R.brain_region(train))
    assert nn["index"][0] == 3 and nn["r"][0] > 0.99
    assert nn["r"][1] < nn["r"][0]


def test_exceedance_p_is_exact():
    assert R.exceedance_p(36, 36, 0) == 1.0 and R.exceedance_p(36, 36, 1) == pytest.approx(0.5)
    assert R.exceedance_p(36, 36, 2) == pytest.approx(36 * 35 / (72 * 71))
    assert R.exceedance_p(3, 5, 4) == 0.0
    # by simulation: exchangeable draws put k samples above the held-out maximum that often
    rng = np.random.default_rng(0)
    draws = rng.normal(size=(20000, 12))
    k = (draws[:, :6] > draws[:, 6:].max(1, keepdims=True)).sum(1)
    for j in (1, 2, 3):
        assert np.mean(k >= j) == pytest.approx(R.exceedance_p(6, 6, j), abs=0.015)


def _privacy_set(rng, n=36, t=40, shift=0.0, copy_rows=()):
    """(nearest r, all r) of n images against t training subjects: correlations like the reports' (~0.75)."""
    r = 0.75 + 0.02 * rng.normal(size=(n, t)) + shift
    for i in copy_rows:
        r[i, rng.integers(t)] = 0.99
    return r.max(1), r


def test_privacy_rule_rarely_fails_new_people_and_catches_copies_and_shifts():
    rng = np.random.default_rng(0)
    fails = old_rule_fails = 0
    for _ in range(200):  # samples drawn exactly like new people
        (s, sa), (h, ha) = _privacy_set(rng), _privacy_set(rng)
        out = R.privacy_summary(s, h, sa, ha)
        fails += not out["pass"]
        old_rule_fails += out["samples_margin_above_heldout_max"] > 0
    assert fails / 200 <= 0.10  # at most alpha (0.05) plus noise
    assert 0.35 <= old_rule_fails / 200 <= 0.65  # the former rule: a coin toss
    # one copied training subject among 36 samples fails it, and is named
    (s, sa), (h, ha) = _privacy_set(rng, copy_rows=(7,)), _privacy_set(rng)
    out = R.privacy_summary(s, h, sa, ha)
    assert not out["pass"] and out["rule"]["near_copies"] == [7]
    # so does a sample set that sits closer to training as a whole, without any single copy
    (s, sa), (h, ha) = _privacy_set(rng), _privacy_set(rng)
    sa = sa.copy()
    sa[np.arange(len(sa)), sa.argmax(1)] += 0.03
    out = R.privacy_summary(sa.max(1), h, sa, ha)
    assert not out["pass"] and out["rule"]["shift_p"] < 0.025 and not out["rule"]["near_copies"]
    # a smooth sample correlates more with every training subject: not a leak (the margin is judged)
    (s, sa), (h, ha) = _privacy_set(rng, shift=0.05), _privacy_set(rng)
    smooth = R.privacy_summary(s, h, sa, ha)
    assert smooth["samples_above_heldout_max"] > 20 and smooth["pass"]
    assert not R.privacy_summary(s, h)["pass"]  # raw r without the matrices cannot tell the two apart
    with pytest.raises(ValueError, match="at least 2"):
        R.privacy_summary([0.5], [0.6, 0.7])


def test_brain_age_summary():
    out = R.brain_age([30, 50, 72], [30, 50, 70])
    assert out["mae"] == pytest.approx(2 / 3) and out["bias"] == pytest.approx(2 / 3) and out["r"] > 0.99
    with pytest.raises(ValueError):
        R.brain_age([1, 2], [1])


# ----------------------------------------------------------------------------- feature network


def test_feature_training_resumes_and_export_loads(prepared, features_dir, tmp_path):
    model = R.load_features(features_dir)
    cfg = json.loads((features_dir / "config.json").read_text())
    assert cfg["input_shape"] == [SIZE] * 3 and cfg["training_steps"] == 30
    assert (features_dir / "features.safetensors").stat().st_size < 2_000_000
    pred = model.predict([prepared.t1(r) for r in prepared.subset("val")])
    assert pred["features"].shape == (5, 16) and np.isfinite(pred["age"]).all()
    with pytest.raises(ValueError, match="trained on"):
        model.predict([np.zeros((16, 16, 16), np.float32)])
    # stopped after 10 steps and resumed to 20 == straight to 20
    import torch

    a, b = tmp_path / "a", tmp_path / "b"
    base = dict(data_dir=str(prepared.root), steps=20, batch_size=2, channels=(4, 4), pool=2, checkpoint_every=5, threads=1)
    R.train_features(R.FeatureTrainConfig(run_dir=str(a), **base), log=lambda m: None)
    R.train_features(R.FeatureTrainConfig(run_dir=str(b), stop_at=10, **base), log=lambda m: None)
    assert torch.load(b / "last.pt", weights_only=False)["step"] == 10
    R.train_features(R.FeatureTrainConfig(run_dir=str(b), **base), log=lambda m: None)
    wa, wb = (torch.load(p / "last.pt", weights_only=False)["net"] for p in (a, b))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert [r["step"] for r in R.read_losses(b)] == list(range(1, 21))


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def tiny_segmenter_dir(tmp_path_factory) -> Path:
    from synth.anatomy.testing import make_tiny_segmenter
    from synth.grid import Grid

    return make_tiny_segmenter(tmp_path_factory.mktemp("seg") / "tiny-seg", Grid((SIZE,) * 3, 2.0, (-31.0,) * 3), steps=2)


def test_evaluate_cli_end_to_end(prepared, features_dir, tiny_model_dir, tiny_segmenter_dir, tmp_path):
    from synth.cli import main
    from synth.report import FIGURES

    out, cache = tmp_path / "report", tmp_path / "cache"
    argv = ["evaluate", "--model", str(tiny_model_dir), "--data", str(prepared.root), "--features", str(features_dir),
            "--segmenter", str(tiny_segmenter_dir), "--diversity-conditions", "2", "--diversity-seeds", "2", "--folds", "2",
            "--c2st-steps", "20", "--c2st-repeats", "2", "--cache", str(cache), "--quiet"]
    assert main([*argv, "--out-dir", str(out)]) == 0
    res = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    for cnn in (res["c2st"]["cnn"], res["first_stage"]["cnn"]):  # repeated cross-validation, each repeat kept
        assert len(cnn["repeat_accuracy"]) == 2 and "mean of 2 repeats" in cnn["method"]
        assert cnn["accuracy"] == pytest.approx(sum(cnn["repeat_accuracy"]) / 2)
    assert "3D CNN (2-fold x 2 repeats)" in md and "mean of 2 repeats of the cross-validation" in md
    from synth.compare import verdicts  # the report marks its figures against the targets, as compare-reports does

    v = verdicts(res).values()
    assert "## Against the targets" in md and "| measure | target | this model |" in md
    assert f"| targets met | | {sum(x is True for x in v)} of {sum(x is not None for x in v)} |" in md
    assert sum(x is not None for x in v) == 9  # every targeted figure measured (first stage included)
    cnn_row = next(line for line in md.splitlines() if line.startswith("| classifier two-sample accuracy, 3D CNN | ≤ 70 %"))
    assert cnn_row.endswith("(met) |" if res["c2st"]["cnn"]["accuracy"] <= 0.7 else "(**not met**) |")
    assert set(res["figures"]) == set(FIGURES)
    for name, fig in res["figures"].items():
        png = out / fig["png"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
        assert f"({fig['png']})" in md
    assert res["synthetic"] is True and "NOT FOR CLINICAL USE" in res["notice"] and "NOT FOR CLINICAL USE" in md
    assert res["provenance"]["model"] == "tiny-test-model" and res["provenance"]["history"][-1]["command"] == "evaluate"
    assert res["generator"]["refiner"] is None and "refiner applied" not in md and "refiner left out" not in md  # it has none
    assert res["distances"]["n_samples"] == 10  # one per held-out subject (val + test)
    nums = [res["distances"]["samples"]["fid"], res["distances"]["yardstick"]["fid"], res["distances"]["samples"]["kid"]["mean"],
            res["c2st"]["cnn"]["accuracy"], res["brain_age"]["samples"]["mae"], res["diversity"]["samples_mean"],
            res["diversity"]["real_mean"], res["privacy"]["samples_median"], res["texture"]["sharpness_ratio"]]
    assert all(math.isfinite(x) for x in nums), nums
    # random-weight samples against phantoms: clearly apart on the texture bank and the distances
    assert res["c2st"]["logistic_random_conv"]["accuracy"] >= 0.8
    # the first stage's ceiling: its reconstructions of the held-out scans against the scans (a random-weight
    # autoencoder reconstructs nothing like a phantom, so even its reconstructions are told apart)
    fs = res["first_stage"]
    assert fs["cnn"]["n_per_class"] == 10 and fs["logistic_random_conv"]["accuracy"] >= 0.8
    assert math.isfinite(fs["psnr_mean"]) and fs["psnr_mean"] < 20
    assert "**First-stage ceiling.**" in md and "first-stage ceiling: two-sample accuracy on its reconstructions" in md
    assert res["distances"]["samples"]["fid"] > res["distances"]["yardstick"]["fid"]
    # the texture distances: random-weight samples are far from phantoms on the bank, and so are the reconstructions
    tex = res["distances_texture"]
    assert tex["samples"]["fid"] > tex["yardstick"]["fid_range"][1] and tex["yardstick"]["draws"] >= 1
    assert math.isfinite(fs["texture_fd"]) and fs["texture_fd"] > tex["yardstick"]["fid"]
    assert "texture FD (Fréchet distance on the random-conv bank" in md and "**Texture distances.**" in md
    # the artefact check: phantoms with 5 % noise have isolated dots, the random-weight model's smooth samples fewer
    assert res["texture"]["speckle_real"] > 0 and 0 <= res["texture"]["speckle_samples"] <= 1
    assert "| isolated dots: share of brain voxels more than 0.2 from their 3x3x3 median |" in md
    # the pose check: phantoms and samples placed, each against the held-out majority mask
    for who in ("samples", "heldout_real"):
        pose = res["pose"][who]
        assert len(pose["centre_sd_mm"]) == 3 and 0 < pose["dice_min"] <= pose["dice_mean"] <= 1 and pose["n"] == 10
    assert "| pose: SD of the brains' centres x / y / z (mm)" in md
    assert res["figures"]["realism"]["data"]["texture_fd"]["samples"] == pytest.approx(tex["samples"]["fid"])
    assert set(res["volumes"]["samples"]) == {"lateral_ventricles", "hippocampus", "brain"}
    # the segmenter on the reconstructions of the held-out scans: the volumes' first-stage ceiling
    fsv = res["volumes"]["segmenter_on_first_stage"]
    assert set(fsv) == {"lateral_ventricles", "hippocampus", "brain"}
    assert len(res["volumes"]["data"]["first_stage_measured"]["brain"]) == 10
    assert fsv["brain"] != res["volumes"]["segmenter_on_heldout_real"]["brain"]  # measured on other images
    assert "on first-stage reconstructions:" in md
    # the privacy verdict is the calibrated rule, with its three findings and the margins it judged
    rule = res["privacy"]["rule"]
    assert res["privacy"]["pass"] == (not rule["near_copies"] and min(rule["exceedance_p"], rule["shift_p"]) >= 0.025)
    assert len(res["privacy"]["data"]["samples_margin"]) == 10 and "near-copies" in md and "shift p =" in md
    assert len(res["figures"]["volumes"]["data"]["requested"]["brain"]) == 10
    assert not list(out.glob("*.nii*"))  # no volumes written
    # a second run reuses the cached brains (10 samples + 2 x 2 for diversity) and measures the same
    assert len(list(cache.glob("*.nii.gz"))) == 14
    assert main([*argv, "--out-dir", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["distances"]["samples"]["fid"] == pytest.approx(res["distances"]["samples"]["fid"], rel=1e-6)
    assert again["privacy"]["data"]["samples"] == pytest.approx(res["privacy"]["data"]["samples"], abs=1e-6)
    # an existing report is not overwritten without --force
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(prepared.root), "--out-dir", str(out),
                 "--features", str(features_dir)]) == 2
    # --match-volumes warps the same cached brains before measuring, and the report says so
    assert main([*argv, "--match-volumes", "--out-dir", str(tmp_path / "matched")]) == 0
    matched = json.loads((tmp_path / "matched" / "report.json").read_text())
    assert matched["generator"]["volume_matching"] is True and res["generator"]["volume_matching"] is False
    assert "first_stage" in matched
    assert main([*argv, "--no-first-stage", "--out-dir", str(tmp_path / "nofs")]) == 0
    nofs = json.loads((tmp_path / "nofs" / "report.json").read_text())
    assert "first_stage" not in nofs and nofs["options"]["first_stage"] is False
    assert "segmenter_on_first_stage" not in nofs["volumes"]
    assert "First-stage ceiling" not in (tmp_path / "nofs" / "report.md").read_text()
    assert "warped to the requested ventricle and hippocampus volumes" in (tmp_path / "matched" / "report.md").read_text()
    assert main([*argv, "--match-volumes", "--segmenter", "none", "--out-dir", str(tmp_path / "no")]) == 2
    assert not (tmp_path / "no").exists()


def test_evaluate_with_and_without_the_refiner_shares_the_cached_brains(prepared, features_dir, tiny_model_dir, tmp_path):
    """evaluate --no-refiner measures the model's brains before its refiner, the report says which, and a
    refined run on the same cache reuses those brains (the cache keeps brains before the refiner)."""
    from synth.cli import main
    from synth.train.refiner import RefinerTrainConfig, package_refiner, train_refiner

    train_refiner(RefinerTrainConfig(data_dir=str(prepared.root), model=str(tiny_model_dir), run_dir=str(tmp_path / "ref"),
                                     steps=1, batch_size=2, crop=16, samples=2, refiner={"width": 4, "layers": 2},
                                     discriminator={"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": 4,
                                                    "num_layers_d": 2, "norm": "INSTANCE"}), progress=False)
    model = package_refiner(tmp_path / "ref", tiny_model_dir, tmp_path / "with-refiner", version="0.0.1-test")
    cache = tmp_path / "cache"
    argv = ["evaluate", "--model", str(model), "--data", str(prepared.root), "--features", str(features_dir),
            "--segmenter", "none", "--diversity-conditions", "1", "--diversity-seeds", "2", "--folds", "2",
            "--c2st-steps", "5", "--c2st-repeats", "1", "--no-first-stage", "--cache", str(cache), "--quiet"]
    assert main([*argv, "--no-refiner", "--out-dir", str(tmp_path / "plain")]) == 0
    plain = json.loads((tmp_path / "plain" / "report.json").read_text())
    assert plain["generator"]["refiner"] is False and plain["options"]["generate_options"] == {"refine": False}
    assert "refiner left out" in (tmp_path / "plain" / "report.md").read_text()
    brains = sorted(cache.glob("*.nii.gz"))
    assert len(brains) == 12 and all("refine-False" in b.name for b in brains)  # 10 samples + 2 for diversity
    assert main([*argv, "--out-dir", str(tmp_path / "refined")]) == 0  # as the model ships: refined
    refined = json.loads((tmp_path / "refined" / "report.json").read_text())
    assert refined["generator"]["refiner"] is True and "refiner applied" in (tmp_path / "refined" / "report.md").read_text()
    assert sorted(cache.glob("*.nii.gz")) == brains  # the same brains, refined as they were loaded
    assert refined["texture"]["sharpness_samples"] != plain["texture"]["sharpness_samples"]


def test_the_brain_cache_is_keyed_by_the_models_sampling_settings(tiny_generator, tmp_path, monkeypatch):
    """A config edited under the same name and version (another default sampler, say) must not reuse
    the old brains (it did: a report measured fast-preset brains cached by an earlier run)."""
    from synth import Condition
    from synth.report import _cached

    c = Condition(age=50, sex="F")
    first = _cached(tiny_generator, c, 1, {}, tmp_path)
    again = _cached(tiny_generator, c, 1, {}, tmp_path)
    assert len(list(tmp_path.glob("*.nii.gz"))) == 1 and np.allclose(first.image, again.image, atol=1e-6)
    monkeypatch.setitem(tiny_generator.config.sampling, "guidance_scale", 7.0)
    other = _cached(tiny_generator, c, 1, {}, tmp_path)
    assert len(list(tmp_path.glob("*.nii.gz"))) == 2 and other.provenance["guidance_scale"] == 7.0
    # evaluate --fast: the fast preset's brains are kept apart from the default's
    monkeypatch.setitem(tiny_generator.config.sampling, "fast", {"sampler": "dpm++2m", "steps": 2})
    fast = _cached(tiny_generator, c, 1, {"fast": True}, tmp_path)
    assert len(list(tmp_path.glob("*fast-True*.nii.gz"))) == 1 and fast.provenance["steps"] == 2
    assert _cached(tiny_generator, c, 1, {"fast": True}, tmp_path).provenance["steps"] == 2
    # the numeric path is part of the key: brains made in bf16 are not reused for a float32 run
    from synth.report import _cache_key

    monkeypatch.setenv("SYNTHBRAIN_PRECISION", "fp32")
    fp32 = _cache_key(tiny_generator, {})
    monkeypatch.setenv("SYNTHBRAIN_PRECISION", "bf16")
    assert _cache_key(tiny_generator, {}) != fp32 and _cache_key(tiny_generator, {"precision": "fp32"}) == fp32


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent"], "subjects.csv"),
    (["--features", "/nonexistent"], "feature network"),
    (["--n-samples", "2"], "expected an integer >= 4"),
    (["--folds", "1"], "expected an integer >= 2"),
    (["--segmenter", "/nonexistent"], "segmenter"),
    (["--fast"], "fast sampling preset"),
    (["--refiner"], "--refiner expects a model with a refiner; tiny-test-model has none"),
])
def test_evaluate_cli_bad_input(prepared, features_dir, tiny_model_dir, tmp_path, capsys, args, message):
    from synth.cli import main

    base = {"--model": str(tiny_model_dir), "--data": str(prepared.root), "--out-dir": str(tmp_path / "r"),
            "--features": str(features_dir)}
    flags = [a for a in args if a in ("--fast", "--refiner")]  # flags without a value
    args = [a for a in args if a not in flags]
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    argv = ["evaluate", *[x for kv in base.items() for x in kv], *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_compare_first_stages_script(prepared, tiny_model_dir, tiny_segmenter_dir, tmp_path, capsys):
    """scripts/compare_first_stages.py measures a packaged first stage, a run and a snapshot of another
    latent space on the held-out scans: reconstruction, the two-sample tests and the volumes' ceiling."""
    import importlib.util

    from synth.train.autoencoder import AETrainConfig, train_autoencoder

    spec = importlib.util.spec_from_file_location("compare_first_stages", Path(__file__).resolve().parents[1] / "scripts" / "compare_first_stages.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    run = tmp_path / "ae"
    ae = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": 3, "channels": [8, 8],
          "num_res_blocks": 1, "norm_num_groups": 4, "attention_levels": [False, False],
          "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False}
    train_autoencoder(AETrainConfig(data_dir=str(prepared.root), run_dir=str(run), steps=4, lr=3e-3, bf16=False, snap_every=2,
                                    autoencoder=ae), progress=False)
    out = tmp_path / "cmp"
    argv = ["--data", str(prepared.root), "--out", str(out), "--segmenter", str(tiny_segmenter_dir), "--folds", "2",
            "--c2st-steps", "5", "--threads", "1", "--first-stage", f"model={tiny_model_dir}", "--first-stage", f"run={run}",
            "--first-stage", f"snap={run / 'snaps' / 'step_000002.pt'}"]
    assert script.main(argv) == 0
    res = json.loads((out / "first_stages.json").read_text())
    fs = res["first_stages"]
    assert list(fs) == ["model", "run", "snap"] and res["data"]["subjects"] == 10
    assert fs["run"]["latent_shape"][0] == 3 and fs["model"]["latent_shape"][0] != 3  # each with its own architecture
    assert fs["run"]["psnr"] != fs["snap"]["psnr"]  # step 4's EMA weights against step 2's
    for row in fs.values():
        assert 0.0 <= row["c2st_cnn"] <= 1.0 and 0.0 <= row["c2st_cnn_confidence"] <= 1.0
        assert math.isfinite(row["psnr"]) and set(row["volumes"]) == {"lateral_ventricles", "hippocampus", "brain"}
    assert set(res["segmenter_on_scans"]) == {"lateral_ventricles", "hippocampus", "brain"}
    assert (out / "first_stages.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as bad:
        script.main([*argv[:4], "--first-stage", "no-name"])
    assert bad.value.code == 2 and "NAME=PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad:
        script.main([*argv[:4], "--first-stage", f"model={tiny_model_dir}", "--first-stage", f"gone={tmp_path / 'nope'}"])
    assert bad.value.code == 2 and "--first-stage gone: no autoencoder config" in capsys.readouterr().err


def test_sample_latents_script_writes_a_bank_the_decoder_fine_tune_reads(prepared, tiny_model_dir, tmp_path, capsys):
    """scripts/sample_latents.py: latents of the model for *training* subjects' conditions (never the held-out
    ones the evaluation uses), seeded, in the shape ``train-autoencoder --adv-latents`` accepts."""
    import importlib.util

    import torch

    import synth
    from synth.train.autoencoder import load_latent_bank

    spec = importlib.util.spec_from_file_location("sample_latents", Path(__file__).resolve().parents[1] / "scripts" / "sample_latents.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--model", str(tiny_model_dir), "--data", str(prepared.root), "--n", "3", "--threads", "1", "--seed0", "7"]
    assert script.main([*argv, "--out", str(tmp_path / "a.pt")]) == 0
    assert script.main([*argv, "--out", str(tmp_path / "b.pt")]) == 0
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=False) for n in "ab")
    gen = synth.load_generator(tiny_model_dir, device="cpu")
    shape = tuple(gen.sample_latent(synth.Condition(age=50, sex="F"), 0, 2, 1.0, False, None).shape[1:])
    assert tuple(a["latents"].shape) == (3, *shape) and torch.equal(a["latents"], b["latents"])  # seeded
    assert a["seeds"] == [7, 8, 9] and a["model"] == gen.config.name and "latent 3/3" in capsys.readouterr().out
    assert len({tuple(x.flatten()[:8].tolist()) for x in a["latents"]}) == 3  # a different brain per seed
    train = prepared.subset("train", labelled=True)  # the training subjects' ages and sexes, in order
    assert [c["age"] for c in a["conditions"]] == pytest.approx([float(train[i % len(train)]["age"]) for i in range(3)])
    assert [c["sex"] for c in a["conditions"]] == [synth.Condition(age=50, sex=train[i % len(train)]["sex"]).sex for i in range(3)]
    assert torch.equal(load_latent_bank(tmp_path / "a.pt", shape), a["latents"])
    with pytest.raises(SystemExit) as bad:
        script.main([*argv[:-2], "--n", "0", "--out", str(tmp_path / "c.pt")])
    assert bad.value.code == 2 and not (tmp_path / "c.pt").exists()


def test_speckle_fraction_counts_isolated_dots_not_edges():
    from synth.realism import speckle_fraction

    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, 24)] * 3, indexing="ij"))
    brain = ((g ** 2).sum(0) < 0.8).astype(np.float32)
    img = brain * np.where(g[0] > 0, 0.7, 0.4)  # two tissues with a sharp boundary: no dots
    assert speckle_fraction(img) == 0
    dotted = img.copy()
    inside = np.argwhere(brain > 0)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(inside), 20, replace=False):
        x, y, z = inside[i]
        dotted[x, y, z] = 1.0 if dotted[x, y, z] < 0.5 else 0.3  # a bright dot in dark tissue or a dark one in bright
    frac = speckle_fraction(dotted)
    assert 0 < frac <= 20 / (brain > 0).sum() * 1.5
    assert speckle_fraction(np.zeros((8, 8, 8), np.float32)) == 0


def test_pose_spread_sees_moved_brains():
    """Brains on the template have no centre spread and overlap the reference fully; shifted copies spread by
    their shifts (in mm) and overlap less; a shape mismatch or an empty image is refused."""
    from synth.realism import pose_spread

    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, 32)] * 3, indexing="ij"))
    brain = ((g ** 2).sum(0) < 0.5).astype(np.float32) * 0.8
    still = pose_spread([brain] * 4, brain > 0)
    assert still["centre_sd_mm"] == pytest.approx([0, 0, 0]) and still["dice_mean"] == pytest.approx(1.0)
    moved = [np.roll(brain, s, axis=1) for s in (-2, 0, 0, 2)]  # +-2 voxels along y
    res = pose_spread(moved, brain > 0, voxel_mm=2.0)
    assert res["centre_sd_mm"][0] == pytest.approx(0) and res["centre_sd_mm"][2] == pytest.approx(0)
    assert res["centre_sd_mm"][1] == pytest.approx(np.std([-4, 0, 0, 4]))  # mm
    assert res["centre_max_offset_mm"] == pytest.approx(4.0)
    assert res["dice_min"] < res["dice_mean"] < 1.0
    with pytest.raises(ValueError, match="reference mask's shape"):
        pose_spread([brain, brain[:-1]], brain > 0)
    with pytest.raises(ValueError, match="no voxel above"):
        pose_spread([brain, np.zeros_like(brain)], brain > 0)
    with pytest.raises(ValueError, match="at least 2 images"):
        pose_spread([brain], brain > 0)


def test_latent_bands_script(prepared, tiny_model_dir, tmp_path, capsys):
    """scripts/latent_bands.py: the bands add up to the deviation and scale with it; on a tiny model it writes
    every band's SD for real latents and samples; missing data and a VQ model are usage errors (exit 2)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("latent_bands", Path(__file__).resolve().parents[1] / "scripts" / "latent_bands.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rng = np.random.default_rng(0)
    z, mean = rng.normal(size=(3, 2, 8, 8, 8)), rng.normal(size=(2, 8, 8, 8))
    parts = script.band_split(z, mean)
    assert np.allclose(sum(parts.values()), z - mean)
    assert parts["low"].std() < parts["high"].std()  # white noise: most of its energy is fine-grained
    mask = np.ones((8, 8, 8), bool)
    one, two = script.band_sd(z, mean, mask), script.band_sd(mean + 2 * (z - mean), mean, mask)
    assert all(np.allclose(np.array(two[b]), 2 * np.array(one[b])) for b in script.BANDS)

    out = tmp_path / "bands.json"
    assert script.main(["--model", str(tiny_model_dir), "--data", str(prepared.root), "--n", "3", "--out", str(out),
                        "--threads", "1"]) == 0
    res = json.loads(out.read_text())
    assert res["n_samples"] == 3 and res["latent_voxels_in_brain"] > 0
    for who in ("heldout", "samples", "ratio"):
        assert set(res[who]) == {"low", "mid", "high"}
        assert all(math.isfinite(v) and v > 0 for band in res[who].values() for v in band)
    assert "samples / real" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        script.main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "nowhere"), "--out", str(out)])
    assert exc.value.code == 2 and "synthbrain prepare" in capsys.readouterr().err
    from synth.vq.testing import make_tiny_vq_model

    vq = make_tiny_vq_model(tmp_path / "tiny-vq")
    with pytest.raises(SystemExit) as exc:
        script.main(["--model", str(vq), "--data", str(prepared.root), "--out", str(out)])
    assert exc.value.code == 2 and "not a latent diffusion model" in capsys.readouterr().err


def test_denoising_error_is_zero_for_a_memoriser_on_its_own_latents_and_exact_elsewhere():
    """A predictor that knows the training latents (the extreme of over-fitting) predicts their noise
    exactly; on other latents its error is a / (1 - a) x their mean squared distance, per timestep."""
    from synth.evaluate import denoising_error

    rng = np.random.default_rng(0)
    train = torch.from_numpy(rng.normal(size=(5, 2, 4, 4, 4)).astype(np.float32))
    other = train + torch.from_numpy(rng.normal(0, 0.3, size=train.shape).astype(np.float32))
    alphas = torch.linspace(0.999, 0.01, 1000)
    idx = torch.arange(5, dtype=torch.float32)[:, None]

    def memoriser(zt, t, c):
        a = alphas[t].view(-1, 1, 1, 1, 1)
        return (zt - a.sqrt() * train[c[:, 0].long()]) / (1 - a).sqrt()

    ts = (10, 200, 700)
    on_train = denoising_error(memoriser, train, idx, alphas, ts, draws=2, batch_size=2)
    elsewhere = denoising_error(memoriser, other, idx, alphas, ts, draws=2, batch_size=3)
    assert all(v < 1e-8 for v in on_train.values())
    d2 = float(((other - train) ** 2).mean())
    for t in ts:
        a = float(alphas[t])
        assert elsewhere[t] == pytest.approx(a / (1 - a) * d2, rel=1e-4)
    assert elsewhere[10] > elsewhere[200] > elsewhere[700]
    assert denoising_error(memoriser, other, idx, alphas, ts, draws=2) == elsewhere  # fixed noise: repeatable
    with pytest.raises(ValueError, match="one condition per latent expected: 4 conditions for 5 latents"):
        denoising_error(memoriser, other, idx[:4], alphas, ts)
    with pytest.raises(ValueError, match="timesteps must be within 0-999, got 1000"):
        denoising_error(memoriser, other, idx, alphas, (1000,))
    with pytest.raises(ValueError, match="at least one latent"):
        denoising_error(memoriser, other[:0], idx[:0], alphas, ts)


def test_denoising_gap_script(prepared, tiny_model_dir, tmp_path, capsys):
    """scripts/denoising_gap.py on a tiny model: training against held-out error and their ratio at every
    timestep; missing data, a VQ model and bad --draws are usage errors (exit 2)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("denoising_gap", Path(__file__).resolve().parents[1] / "scripts" / "denoising_gap.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "gap.json"
    assert script.main(["--model", str(tiny_model_dir), "--data", str(prepared.root), "--draws", "1",
                        "--timesteps", "50", "400", "--out", str(out), "--threads", "1"]) == 0
    res = json.loads(out.read_text())
    assert res["n_train"] == 24 and res["n_heldout"] == 10 and res["timesteps"] == [50, 400]
    for t in ("50", "400"):
        assert res["train"][t] > 0 and res["heldout"][t] > 0
        assert res["ratio"][t] == pytest.approx(res["heldout"][t] / res["train"][t])
    assert "held-out / training" in capsys.readouterr().out
    for bad, msg in ((["--data", str(tmp_path / "nowhere")], "synthbrain prepare"), (["--draws", "0"], "--draws must be at least 1")):
        with pytest.raises(SystemExit) as exc:
            script.main(["--model", str(tiny_model_dir), "--data", str(prepared.root), "--out", str(out), *bad])
        assert exc.value.code == 2 and msg in capsys.readouterr().err
    from synth.vq.testing import make_tiny_vq_model

    vq = make_tiny_vq_model(tmp_path / "tiny-vq")
    with pytest.raises(SystemExit) as exc:
        script.main(["--model", str(vq), "--data", str(prepared.root), "--out", str(out)])
    assert exc.value.code == 2 and "not a latent diffusion model" in capsys.readouterr().err
    import synth
    from synth.evaluate import denoising_gap

    with pytest.raises(ValueError, match="no heldout subjects with age, sex and the model's covariates"):
        denoising_gap(synth.load_generator(tiny_model_dir, device="cpu"), prepared, (50,), 1, heldout_splits=("none",))
