"""Label table, volumes, morphometry and meshes of synth.anatomy (CPU, seconds, no real data)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from synth import MNI_2MM, Condition
from synth.anatomy import (
    MUSE_NAMES,
    STRUCTURES,
    TOTALS,
    measure_volumes,
    morphometry,
    muse_to_compact,
    outer_surface,
    structure_by_name,
    structure_meshes,
)
from synth.anatomy.testing import phantom
from synth.testing import toy_normative


def world_coords(shape, affine) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def ball(shape, affine, centre, radius) -> np.ndarray:
    return np.linalg.norm(world_coords(shape, affine) - np.asarray(centre), axis=-1) <= radius


# -- label table ----------------------------------------------------------------------------------
def test_structures_cover_every_muse_label_once():
    assert [s.label for s in STRUCTURES] == list(range(1, len(STRUCTURES) + 1))
    seen = [m for s in STRUCTURES for m in s.muse]
    assert sorted(seen) == sorted(MUSE_NAMES)
    names = {s.name for s in STRUCTURES}
    for required in ("Left-Hippocampus", "Right-Hippocampus", "Left-Cerebral-Cortex", "Right-Cerebral-White-Matter",
                     "Left-Lateral-Ventricle", "3rd-Ventricle", "4th-Ventricle", "Left-Amygdala", "Right-Thalamus",
                     "Left-Caudate", "Right-Putamen", "Left-Pallidum", "Left-Cerebellum-Cortex",
                     "Right-Cerebellum-White-Matter", "Brain-Stem", "CSF"):
        assert required in names
    assert all(len(s.rgb) == 3 and all(0 <= c <= 255 for c in s.rgb) for s in STRUCTURES)


def test_muse_to_compact_maps_sides_and_groups():
    muse = np.array([[0, 48, 47, 52, 51], [123, 122, 82, 81, 95], [1, 46, 4, 35, 30]])
    expect = ["Left-Hippocampus", "Right-Hippocampus", "Left-Lateral-Ventricle", "Right-Lateral-Ventricle",
              "Left-Cerebral-Cortex", "Right-Cerebral-Cortex", "Left-Cerebral-White-Matter",
              "Right-Cerebral-White-Matter", "Corpus-Callosum", "CSF", "CSF", "3rd-Ventricle", "Brain-Stem", "Left-Caudate"]
    out = muse_to_compact(muse)
    assert out.shape == muse.shape and out.dtype == np.uint8
    assert out.ravel()[0] == 0
    assert [STRUCTURES[v - 1].name for v in out.ravel()[1:]] == expect


def test_muse_to_compact_rejects_unknown_labels():
    with pytest.raises(ValueError, match="not MUSE labels: \\[2, 300\\]"):
        muse_to_compact(np.array([0, 2, 300, 48]))


def test_structure_by_name_unknown():
    assert structure_by_name("left-hippocampus").label == 10
    with pytest.raises(ValueError, match="unknown structure 'Hippocampus'"):
        structure_by_name("Hippocampus")


# -- volumes --------------------------------------------------------------------------------------
def test_measure_volumes_counts_and_totals():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[:2] = 10  # 200 voxels left hippocampus
    labels[2:3] = 11  # 100 right hippocampus
    labels[3:6] = 6  # 300 left lateral ventricle
    labels[6:7] = 30  # 100 CSF
    labels[7:8] = 3  # 100 WM
    v = measure_volumes(labels, voxel_volume_mm3=8.0)
    assert v["Left-Hippocampus"] == 1600.0 and v["Right-Hippocampus"] == 800.0
    assert v["hippocampus"] == 2400.0
    assert v["lateral_ventricles"] == 2400.0
    assert v["icv"] == 800 * 8.0
    assert v["brain"] == 700 * 8.0  # CSF is inside ICV but not brain
    assert v["gm"] == 300 * 8.0 and v["wm"] == 100 * 8.0
    assert set(TOTALS) <= set(v)


def test_measure_volumes_errors():
    with pytest.raises(ValueError, match="3D"):
        measure_volumes(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="integers"):
        measure_volumes(np.zeros((4, 4, 4), np.float32))
    with pytest.raises(ValueError, match="compact labels 0-30"):
        measure_volumes(np.full((4, 4, 4), 48, np.uint8))


def test_morphometry_rows_with_targets_and_normative():
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[:10] = 1
    labels[10:18] = 3
    labels[18:19, :10] = 10
    labels[19:] = 30
    cond = Condition(age=72, sex="F", diagnosis="AD")
    rows = morphometry(labels, cond, targets={"hippocampus": 0.005}, normative=toy_normative())
    by = {r["name"]: r for r in rows}
    assert list(by)[:6] == ["icv", "brain", "gm", "wm", "lateral_ventricles", "hippocampus"]
    assert by["icv"]["pct_icv"] == pytest.approx(100.0)
    assert by["hippocampus"]["pct_icv"] == pytest.approx(100 * 200 / 7800)  # 200 voxels of 7800 in ICV
    assert by["hippocampus"]["requested"] == 0.005 and by["gm"]["requested"] is None
    lo, hi = toy_normative().interval(72, "F")["hippocampus"]
    assert (by["hippocampus"]["normative_low"], by["hippocampus"]["normative_high"]) == (lo, hi)
    assert by["Left-Hippocampus"]["normative_low"] is None


def test_morphometry_errors():
    labels = np.ones((4, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="needs a `condition`"):
        morphometry(labels, normative=toy_normative())
    with pytest.raises(ValueError, match="`targets` keys"):
        morphometry(labels, targets={"amygdala": 0.1})


# -- meshes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "affine",
    [MNI_2MM.affine, np.array([[-1.5, 0, 0, 60.0], [0, 1.5, 0, -50.0], [0, 0, 1.5, -40.0], [0, 0, 0, 1]])],
    ids=["mni-ras", "las-1.5mm"],
)
@pytest.mark.parametrize("decimation", ["pro", "quadric"])
def test_mesh_lies_at_world_position(affine, decimation):
    shape = (80, 96, 80)
    centre, radius = np.array([20.0, -10.0, 30.0]), 12.0
    labels = ball(shape, affine, centre, radius).astype(np.uint8) * 10
    full = structure_meshes(labels, affine, ["Left-Hippocampus"], decimate=0)["Left-Hippocampus"]
    meshes = structure_meshes(labels, affine, ["Left-Hippocampus"], decimation=decimation)
    mesh = meshes["Left-Hippocampus"]
    assert mesh.n_open_edges == 0  # decimation keeps the surface closed
    assert 0.4 * full.n_cells <= mesh.n_cells <= 0.6 * full.n_cells  # half the triangles removed
    d = np.linalg.norm(mesh.points - centre, axis=1)
    assert np.allclose(mesh.points.mean(0), centre, atol=0.6)
    assert abs(d.mean() - radius) < 0.6 and d.std() < 0.5
    normals = mesh.point_data["Normals"]
    assert np.mean(np.sum(normals * (mesh.points - centre), axis=1) > 0) > 0.99  # outward
    assert mesh.volume == pytest.approx(4 / 3 * np.pi * radius**3, rel=0.06)
    assert mesh.is_all_triangles
    assert int(mesh.field_data["label"][0]) == 10 and tuple(mesh.field_data["rgb"]) == (220, 216, 20)


def test_threads_do_not_change_the_meshes():
    labels = phantom((40, 48, 40))[1]
    present = [int(v) for v in np.unique(labels) if v]
    one = structure_meshes(labels, MNI_2MM.affine, present, workers=1)
    two = structure_meshes(labels, MNI_2MM.affine, present, workers=2)
    assert list(one) == list(two) and len(one) >= 3
    for name in one:
        assert np.array_equal(one[name].points, two[name].points) and np.array_equal(one[name].faces, two[name].faces)
        assert one[name].field_data["name"][0] == name == two[name].field_data["name"][0]
    with pytest.raises(ValueError, match="`workers` must be a positive integer"):
        structure_meshes(labels, MNI_2MM.affine, workers=0)


def test_empty_structure_warns_and_is_skipped():
    labels = ball((40, 40, 40), MNI_2MM.affine, MNI_2MM.affine[:3, 3] + 40, 10).astype(np.uint8)
    with pytest.warns(UserWarning, match="structure Left-Hippocampus \\(label 10\\) is empty"):
        meshes = structure_meshes(labels, MNI_2MM.affine, ["Left-Cerebral-Cortex", "Left-Hippocampus"])
    assert list(meshes) == ["Left-Cerebral-Cortex"]


def test_structure_meshes_errors():
    labels = np.zeros((8, 8, 8), np.uint8)
    with pytest.raises(ValueError, match="unknown structure"):
        structure_meshes(labels, np.eye(4), ["Hippocampus"])
    with pytest.raises(ValueError, match="within 1-30"):
        structure_meshes(labels, np.eye(4), [31])
    with pytest.raises(ValueError, match="`decimate`"):
        structure_meshes(labels, np.eye(4), decimate=1.0)
    with pytest.raises(ValueError, match="`decimation` must be one of pro, quadric"):
        structure_meshes(labels, np.eye(4), decimation="clustering")
    with pytest.raises(ValueError, match="3D"):
        structure_meshes(labels[0], np.eye(4))
    with pytest.raises(ValueError, match="`affine`"):
        structure_meshes(labels, np.zeros((4, 4)))


def test_outer_surface_of_image_and_mask():
    affine = MNI_2MM.affine
    inside = ball(MNI_2MM.shape, affine, (0, -20, 10), 50)
    image = np.where(inside, 0.7, 0.0).astype(np.float32)
    image[0, 0, 0] = 0.8  # a speck away from the brain is dropped (largest component)
    surf = outer_surface(image, affine)
    assert np.allclose(surf.points.mean(0), (0, -20, 10), atol=1.0)
    assert np.abs(np.linalg.norm(surf.points - (0, -20, 10), axis=1) - 50).max() < 2.5
    assert outer_surface(inside, affine).n_points > 0
    with pytest.warns(UserWarning, match="no brain voxels"):
        assert outer_surface(np.zeros((8, 8, 8), np.float32), affine).n_points == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="3D"):
            outer_surface(np.zeros((8, 8)), affine)
