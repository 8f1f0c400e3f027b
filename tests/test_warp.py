"""Volume matching (synth.anatomy.warp) on a phantom whose 'segmenter' is a fixed intensity rule."""

from __future__ import annotations

import json

import numpy as np
import pytest

from synth.anatomy.labels import TOTALS
from synth.anatomy.warp import match_brain_volumes, match_volumes

SHAPE = (40, 44, 40)


def _phantom() -> np.ndarray:
    """A bright head (0.8) with two dark 'ventricles' (0.1) and two mid-grey 'hippocampi' (0.5), smooth edges."""
    from scipy import ndimage

    x, y, z = np.indices(SHAPE, dtype=np.float32)
    img = np.where(((x - 20) / 17) ** 2 + ((y - 22) / 19) ** 2 + ((z - 20) / 17) ** 2 < 1, 0.8, 0.0)
    for cx, hx in ((15.3, 11.6), (24.8, 28.3)):  # off the voxel grid, so a boundary does not cross whole shells at once
        img = np.where(((x - cx) / 3) ** 2 + ((y - 24.4) / 7) ** 2 + ((z - 22.2) / 4) ** 2 < 1, 0.1, img)
        img = np.where(((x - hx) / 3.4) ** 2 + ((y - 12.7) / 5.5) ** 2 + ((z - 13.6) / 3.3) ** 2 < 1, 0.5, img)
    return ndimage.gaussian_filter(img, 0.7).astype(np.float32)


def _segment(image: np.ndarray) -> np.ndarray:
    """Compact labels by intensity and place: head (label 3), ventricles (< 0.3, back), hippocampi (0.35-0.65, front)."""
    x, y = np.indices(image.shape)[:2]
    left = x < image.shape[0] // 2
    front = y < 19  # the phantom's hippocampi lie in front of its ventricles
    head = image > 0.05
    labels = np.where(head, 3, 0).astype(np.uint8)
    from scipy import ndimage

    inner = ndimage.binary_erosion(head, iterations=3)
    vent = inner & (image < 0.3) & ~front
    hip = inner & (image > 0.35) & (image < 0.65) & front
    labels[vent & ~left], labels[vent & left] = TOTALS["lateral_ventricles"]  # 6 right half, 7 left (either way round)
    labels[hip & ~left], labels[hip & left] = TOTALS["hippocampus"]
    return labels


def _fractions(labels):
    icv = np.isin(labels, TOTALS["icv"]).sum()
    return {k: np.isin(labels, TOTALS[k]).sum() / icv for k in ("lateral_ventricles", "hippocampus")}


def test_structures_reach_their_volumes_without_folding():
    img = _phantom()
    have = _fractions(_segment(img))
    targets = {"lateral_ventricles": have["lateral_ventricles"] * 1.3, "hippocampus": have["hippocampus"] * 0.85, "brain": 0.9}
    out = match_volumes(img, targets, _segment, iterations=3)
    got = _fractions(out.labels)
    for k in ("lateral_ventricles", "hippocampus"):
        assert got[k] == pytest.approx(targets[k], rel=0.06), (k, have[k], got[k], targets[k])
        assert out.record["before"][k] == pytest.approx(have[k]) and out.record["after"][k] == pytest.approx(got[k])
    np.testing.assert_array_equal(out.labels, _segment(out.image))  # the labels are the segmenter's on the result
    assert out.record["structures"] == ["lateral_ventricles", "hippocampus"]  # "brain" is not warped
    assert out.record["min_jacobian_per_round"] >= 0.5 - 1e-6 and 0 < out.record["max_displacement_voxels"] < 3
    assert out.image.dtype == np.float32 and out.image.min() >= 0 and out.image.max() <= img.max() + 1e-6
    from scipy import ndimage

    labels0 = _segment(img)
    far = ndimage.distance_transform_edt(~np.isin(labels0, (6, 7, 10, 11))) > 8  # 4 sigma of the warp's reach
    np.testing.assert_allclose(out.image[far], img[far], atol=1e-4)  # nothing moves far from the structures


def test_a_brain_at_its_targets_is_left_alone_and_bad_input_is_refused():
    img = _phantom()
    out = match_volumes(img, _fractions(_segment(img)), _segment)
    assert np.abs(out.image - img).max() < 0.05
    with pytest.raises(ValueError, match=r"`image` must be a 3D"):
        match_volumes(img[0], {"hippocampus": 0.01}, _segment)
    with pytest.raises(ValueError, match="`iterations` must be >= 1"):
        match_volumes(img, {"hippocampus": 0.01}, _segment, iterations=0)
    with pytest.raises(ValueError, match="`keys` must be among"):
        match_volumes(img, {"gm": 0.4}, _segment, keys=("gm",))


def test_matched_brain_says_so_in_its_provenance(tmp_path):
    from synth import Condition
    from synth.brain import SyntheticBrain, sidecar_path

    img = _phantom()
    have = _fractions(_segment(img))
    brain = SyntheticBrain(img, np.eye(4), Condition(70, "F", "AD"), 3,
                           {"lateral_ventricles": have["lateral_ventricles"] * 1.2, "hippocampus": have["hippocampus"] * 0.9},
                           {"model": "phantom", "notice": "SYNTHETIC", "history": [{"command": "generate"}]})

    class Seg:
        name = "intensity-rule"

        def segment(self, image):
            return _segment(image)

    matched, labels = match_brain_volumes(brain, Seg())
    vm = matched.provenance["volume_matching"]
    assert vm["segmenter"] == "intensity-rule" and set(vm) >= {"before", "after", "requested", "min_jacobian_per_round", "method"}
    assert [h["command"] for h in matched.provenance["history"]] == ["generate", "match_volumes"]
    assert "volume_matching" not in brain.provenance and matched.seed == 3 and matched.targets == brain.targets
    path = tmp_path / "m.nii.gz"
    matched.save(path)
    assert json.loads(sidecar_path(path).read_text())["volume_matching"]["segmenter"] == "intensity-rule"
    with pytest.raises(ValueError, match="matched already"):
        match_brain_volumes(matched, Seg())
