"""Segmenter: Dice, a tiny segmenter trained on phantoms, resampling, the shipped model, error paths."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from synth import MNI_2MM, Grid
from synth.anatomy import STRUCTURES, Segmenter, dice_scores, load_segmenter
from synth.anatomy.segmenter import (
    SegmenterConfig,
    build_network,
    default_network,
    lr_swap_table,
    resample_from_grid,
    resample_to_grid,
)
from synth.anatomy.testing import PHANTOM_CLASSES, make_tiny_segmenter, phantom
from synth.io import save_nifti

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "models" / "synthbrain-seg-2mm"
PREPARED = Path.home() / ".cache" / "synthbrain" / "ixi-2mm"
IXI = Path(__file__).resolve().parents[2] / "shared" / "data" / "ixi"
TINY_GRID = Grid((16, 16, 16), 2.0, (-15.0, -15.0, -15.0))


@pytest.fixture(scope="module")
def tiny_segmenter(tmp_path_factory) -> Path:
    return make_tiny_segmenter(tmp_path_factory.mktemp("seg") / "tiny-seg", TINY_GRID, steps=80)


@pytest.fixture(scope="module")
def mni_segmenter() -> Segmenter:
    """Random weights on the model grid: enough for shapes, resampling and error paths."""
    torch.manual_seed(0)
    return Segmenter(SegmenterConfig(), build_network(default_network()), device="cpu", flip_tta=False)


# -- Dice -----------------------------------------------------------------------------------------
def test_dice_scores_by_hand():
    truth = np.zeros((4, 4, 4), np.uint8)
    pred = np.zeros_like(truth)
    truth[:2] = 1  # 32 voxels
    pred[:1] = 1  # 16 voxels, all inside truth
    truth[3, :2] = 2  # 8 voxels
    pred[3, 2:] = 2  # 8 voxels, none overlapping
    d = dice_scores(pred, truth)
    assert d[1] == pytest.approx(2 * 16 / (32 + 16))
    assert d[2] == 0.0
    assert dice_scores(pred, truth, labels=[5])[5] == 1.0  # absent from both
    with pytest.raises(ValueError, match="same shape"):
        dice_scores(pred, truth[:3])


def test_lr_swap_table_is_an_involution_that_swaps_sides():
    table = lr_swap_table()
    assert (table[table] == np.arange(len(table))).all()
    names = {s.label: s.name for s in STRUCTURES}
    for label, twin in enumerate(table[1:], start=1):
        a, b = names[label], names[int(twin)]
        assert a == b or a.replace("Left-", "Right-") == b or a.replace("Right-", "Left-") == b


# -- a tiny segmenter trained in the test ------------------------------------------------------------
def test_tiny_segmenter_learns_the_phantom(tiny_segmenter):
    seg = load_segmenter(tiny_segmenter, device="cpu")
    image, truth = phantom(TINY_GRID.shape, np.random.default_rng(1234))  # unseen jitter
    labels = seg.segment(image)
    assert labels.shape == TINY_GRID.shape and labels.dtype == np.uint8
    d = dice_scores(labels, truth, labels=[v[0] for v in PHANTOM_CLASSES.values()])
    assert min(d.values()) > 0.7 and np.mean(list(d.values())) > 0.8, d
    untrained = Segmenter(SegmenterConfig(network=seg.config.network, grid=seg.config.grid),
                          build_network(seg.config.network), device="cpu")
    assert np.mean(list(dice_scores(untrained.segment(image), truth, list(d)).values())) < 0.5


def test_training_resumes_from_checkpoint(tmp_path):
    from synth.anatomy.testing import tiny_network
    from synth.anatomy.training import SegTrainConfig, train_segmenter

    pairs = [phantom(TINY_GRID.shape, np.random.default_rng(i)) for i in range(2)]
    data = (np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
    cfg = SegTrainConfig(run_dir=str(tmp_path), network=tiny_network(), steps=3, bf16=False, ckpt_every=2, eval_every=0,
                         warmup=1, threads=torch.get_num_threads())
    _, state = train_segmenter(cfg, data=data, progress=False)
    assert state["step"] == 3 and (tmp_path / "last.pt").is_file()
    cfg.steps = 5
    _, state = train_segmenter(cfg, data=data, progress=False)
    assert state["step"] == 5
    assert (tmp_path / "log.csv").read_text().count("\n") == 1 + 5


# -- resampling and segment_nifti -------------------------------------------------------------------
def test_resampling_roundtrip_through_a_mirrored_grid():
    # An LAS grid with the same 2 mm voxels: the model grid's voxels exactly, mirrored.
    affine = MNI_2MM.affine.copy()
    affine[0, 0], affine[0, 3] = -2.0, 79.0
    labels = np.random.default_rng(0).integers(0, 31, MNI_2MM.shape).astype(np.uint8)
    native = labels[::-1]  # what an LAS file of the same labels holds
    on_grid = resample_to_grid(native, affine, MNI_2MM, order=0)
    assert (on_grid == labels).all()
    assert (resample_from_grid(on_grid, MNI_2MM, native.shape, affine) == native).all()


def test_segment_nifti_returns_labels_on_the_input_grid(tmp_path, mni_segmenter):
    affine = np.array([[-1.5, 0, 0, 90.0], [0, 1.5, 0, -126.0], [0, 0, 1.5, -72.0], [0, 0, 0, 1]])
    shape = (120, 144, 112)
    image = np.zeros(shape, np.float32)
    image[20:100, 20:120, 20:100] = 500.0  # raw scanner units: rescaled to [0, 1] inside
    path = save_nifti(tmp_path / "t1.nii.gz", image, affine)
    labels, out_affine = mni_segmenter.segment_nifti(path)
    assert labels.shape == shape and labels.dtype == np.uint8
    assert np.allclose(out_affine, affine)
    assert labels.max() <= len(STRUCTURES)


def test_segment_nifti_warns_on_a_whole_head(tmp_path, mni_segmenter):
    affine = np.array([[-1.5, 0, 0, 90.0], [0, 1.5, 0, -126.0], [0, 0, 1.5, -72.0], [0, 0, 0, 1]])
    path = save_nifti(tmp_path / "head.nii.gz", np.full((120, 144, 112), 300.0, np.float32), affine)
    with pytest.warns(UserWarning, match="looks like a whole head"):
        labels, _ = mni_segmenter.segment_nifti(path)
    assert labels.shape == (120, 144, 112)


def test_segment_rejects_wrong_grid(mni_segmenter):
    with pytest.raises(ValueError, match=r"must be on the model grid \(80, 96, 80\)"):
        mni_segmenter.segment(np.zeros((64, 64, 64), np.float32))


def test_segment_rejects_intensities_outside_0_1(mni_segmenter):
    with pytest.raises(ValueError, match=r"within \[0, 1\], got 0..255"):
        mni_segmenter.segment(np.full(MNI_2MM.shape, 255.0, np.float32) * (np.arange(80) > 0)[:, None, None])


def test_segment_rejects_nan(mni_segmenter):
    image = np.zeros(MNI_2MM.shape, np.float32)
    image[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        mni_segmenter.segment(image)


def test_segment_nifti_not_3d(tmp_path, mni_segmenter):
    import nibabel as nib

    path = tmp_path / "4d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10, 3), np.float32), np.eye(4)), path)
    with pytest.raises(ValueError, match=r"expected a 3D volume .* got shape \(10, 10, 10, 3\)"):
        mni_segmenter.segment_nifti(path)


def test_segment_nifti_field_of_view_not_brain_sized(tmp_path, mni_segmenter):
    path = save_nifti(tmp_path / "small.nii.gz", np.ones((40, 40, 40), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="field of view 40 x 40 x 40 mm is not brain-sized"):
        mni_segmenter.segment_nifti(path)


def test_segment_nifti_outside_mni_box(tmp_path, mni_segmenter):
    affine = MNI_2MM.affine.copy()
    affine[:3, 3] += 500.0  # brain-sized, but half a metre away from MNI space
    path = save_nifti(tmp_path / "far.nii.gz", np.ones(MNI_2MM.shape, np.float32), affine)
    with pytest.raises(ValueError, match="register it to MNI152 first"):
        mni_segmenter.segment_nifti(path)


def test_segment_nifti_unreadable(tmp_path, mni_segmenter):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(gzip.compress(b"this is not a NIfTI header"))
    with pytest.raises(ValueError, match="could not read"):
        mni_segmenter.segment_nifti(path)


def test_segment_nifti_missing_file(tmp_path, mni_segmenter):
    with pytest.raises(FileNotFoundError, match="no such file"):
        mni_segmenter.segment_nifti(tmp_path / "nope.nii.gz")


def test_load_segmenter_unknown_name():
    with pytest.raises(FileNotFoundError, match="no segmenter named or found at 'no-such-model'"):
        load_segmenter("no-such-model")


def test_segmenter_config_rejects_generator_config():
    with pytest.raises(ValueError, match="not a SynthBrain segmenter"):
        SegmenterConfig.from_dict({"name": "synthbrain-ldm-2mm", "autoencoder": {}})


# -- the shipped model ------------------------------------------------------------------------------
@pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(), reason="shipped segmenter not built yet")
def test_shipped_segmenter_files_and_output():
    size = (SHIPPED / "model.safetensors").stat().st_size
    assert size < 5e6
    card = (SHIPPED / "MODEL_CARD.md").read_text()
    for phrase in ("IXI dataset", "CC BY-SA 3.0", "DLMUSE", "NOT FOR CLINICAL USE", "test split"):
        assert phrase.lower() in card.lower()
    seg = load_segmenter(device="cpu")
    assert seg.name == "synthbrain-seg-2mm" and seg.grid == MNI_2MM
    image, _ = phantom(MNI_2MM.shape)
    labels = seg.segment(image)
    assert labels.shape == MNI_2MM.shape and labels.dtype == np.uint8 and labels.max() <= len(STRUCTURES)


@pytest.mark.skipif(
    not (IXI.is_dir() and (PREPARED / "subjects.csv").is_file() and (SHIPPED / "model.safetensors").is_file()),
    reason="needs /work/shared/data/ixi, its prepared cache and the shipped segmenter",
)
def test_shipped_segmenter_on_real_test_subjects():
    from synth.anatomy.training import load_split

    images, labels, _ = load_split(PREPARED, "test", limit=2, progress=False)
    seg = load_segmenter(device="cpu")
    large = ["Left-Cerebral-Cortex", "Right-Cerebral-Cortex", "Left-Cerebral-White-Matter",
             "Right-Cerebral-White-Matter", "Left-Lateral-Ventricle", "Right-Lateral-Ventricle", "Brain-Stem"]
    ids = [s.label for s in STRUCTURES if s.name in large]
    scores = [np.mean(list(dice_scores(seg.segment(im), lab, ids).values())) for im, lab in zip(images, labels)]
    assert np.mean(scores) > 0.8, scores
