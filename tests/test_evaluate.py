"""The evaluation functions on a tiny model and a prepared-data folder made here."""

import numpy as np
import pytest
import torch

from synth import evaluate as ev

from .conftest import write_prepared


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("prep"))


def test_reconstruction_reports_per_subject(tiny_generator, tiny_data):
    r = ev.reconstruction(tiny_generator, tiny_data)
    assert r["n"] == 6 and len(r["per_subject"]) == 6
    assert all(np.isfinite(s["psnr"]) and -1 <= s["ssim"] <= 1 for s in r["per_subject"])
    assert r["psnr_mean"] == pytest.approx(np.mean([s["psnr"] for s in r["per_subject"]]))
    x2, x4 = (ref["psnr_mean"] for ref in r["reference"])
    assert [ref["factor"] for ref in r["reference"]] == [2, 4] and x2 > x4  # coarser grid, more lost


def test_resampled_keeps_smooth_images_and_blurs_detail():
    ramp = np.broadcast_to(np.linspace(0, 1, 16, dtype=np.float32)[:, None, None], (16, 12, 8)).copy()
    out = ev.resampled(ramp, 2)
    assert out.shape == ramp.shape and np.abs(out - ramp)[2:-2].max() < 1e-5  # linear: kept inside
    checker = (np.indices((16, 12, 8)).sum(0) % 2).astype(np.float32)
    assert np.allclose(ev.resampled(checker, 2), 0.5)  # one-voxel detail: gone


def test_sharpness_and_condition_following(tiny_generator, tiny_data):
    s, pairs = ev.sample_sharpness(tiny_generator, tiny_data, log=lambda m: None)
    assert s["n"] == 6 and len(pairs) == 6 and s["ratio"] == pytest.approx(s["generated_mean"] / s["real_mean"])
    assert s["intensity_distance_real_pairs"] > 0 and s["intensity_distance_generated"] > 0
    c = ev.condition_following(tiny_generator, tiny_data, splits=("test",), per_band=2)
    assert np.array(c["correlation_matrix_generated_x_real"]).shape == (3, 3)
    assert c["n_real"] == [2, 2, 2]


def test_latent_detail_tells_fine_structure_from_smooth():
    smooth = torch.linspace(0, 1, 16).repeat(1, 2, 16, 16, 1)  # (1, 2, 16, 16, 16) ramp
    rough = smooth + 0.5 * torch.randn(smooth.shape, generator=torch.Generator().manual_seed(0))
    assert ev.highpass_energy(smooth) < 0.01 < 0.1 < ev.highpass_energy(rough)


def test_latent_detail_of_real_and_sampled(tiny_generator, tiny_data):
    d = ev.latent_detail(tiny_generator, tiny_data, n=2)
    assert d["n"] == 2 and all(np.isfinite(d[k]) and d[k] > 0 for k in ("real_highpass", "sampled_highpass", "real_std", "sampled_std"))


def test_volume_agreement_tells_overshoot_from_scatter():
    req = [0.01, 0.02, 0.03, 0.04, 0.05]
    over = ev.volume_agreement(req, [1.3 * v for v in req])  # every brain 30 % too large: perfect rank
    assert over["pearson_r"] == pytest.approx(1.0)
    assert over["median_rel_error"] == pytest.approx(0.3) and over["median_bias"] == pytest.approx(0.3)
    scatter = ev.volume_agreement(req, [0.013, 0.014, 0.033, 0.028, 0.055])  # +30, -30, +10, -30, +10 %
    assert scatter["median_rel_error"] == pytest.approx(0.3) and scatter["median_bias"] == pytest.approx(0.1)


def test_age_sweep_without_segmenter(tiny_generator):
    sw = ev.age_sweep(tiny_generator, None, ages=(25, 50, 80))
    assert len(sw["ventricles_ml"]) == 3 and len(sw["images"]) == 3
    assert isinstance(sw["ventricles_increase"], bool)


def test_evaluate_script_makes_its_figure_folder_and_saves_json(tiny_model_dir, tiny_data, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "evaluate.py"
    figs, out = tmp_path / "not" / "yet" / "there", tmp_path / "eval.json"
    run = subprocess.run([sys.executable, str(script), "--model", str(tiny_model_dir), "--data", str(tiny_data.root),
                          "--out", str(out), "--figures", str(figs), "--skip", "latent", "condition", "sweep", "fidelity"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (figs / "real_vs_generated.png").stat().st_size > 0
    res = json.loads(out.read_text())
    assert res["reconstruction"]["n"] == 6 and res["sharpness"]["n"] == 6 and "1. autoencoder" in run.stdout
