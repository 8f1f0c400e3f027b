import nibabel as nib
import numpy as np
import pytest

from synth.grid import MNI_2MM
from synth.io import atomic_path, load_nifti, read_json, save_nifti, write_json


def test_nifti_affine_and_orientation_round_trip(tmp_path):
    vol = np.zeros(MNI_2MM.shape, np.float32)
    vol[70, 10, 5] = 1.0  # right, posterior, inferior corner
    path = save_nifti(tmp_path / "v.nii.gz", vol, MNI_2MM.affine, descrip="SYNTHETIC test")
    img = nib.load(str(path))
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert np.allclose(img.affine, MNI_2MM.affine)
    assert int(img.header["sform_code"]) == 4 and int(img.header["qform_code"]) == 4
    assert img.header["descrip"].tobytes().startswith(b"SYNTHETIC")
    world = nib.affines.apply_affine(img.affine, [70, 10, 5])
    assert np.allclose(world, [-79 + 140, -112 + 20, -74 + 10])
    # A file stored in another orientation comes back in RAS with the voxel at the same place.
    lps = nib.Nifti1Image(vol[::-1, ::-1, :].copy(), MNI_2MM.affine @ np.array(
        [[-1, 0, 0, 79], [0, -1, 0, 95], [0, 0, 1, 0], [0, 0, 0, 1]], float))
    nib.save(lps, str(tmp_path / "lps.nii.gz"))
    data, aff = load_nifti(tmp_path / "lps.nii.gz")
    assert np.allclose(aff, MNI_2MM.affine)
    assert data[70, 10, 5] == 1.0


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    write_json(target, {"a": np.float32(1.5)})
    assert read_json(target) == {"a": 1.5}


@pytest.mark.parametrize("name", ["v.txt", "v.nii.zip", "v"])
def test_save_nifti_rejects_other_suffixes(tmp_path, name):
    with pytest.raises(ValueError, match="expected a NIfTI path"):
        save_nifti(tmp_path / name, np.zeros((2, 2, 2)), np.eye(4))


def test_save_nifti_rejects_non_3d(tmp_path):
    with pytest.raises(ValueError, match=r"expected a 3D \(X, Y, Z\) array"):
        save_nifti(tmp_path / "v.nii.gz", np.zeros((2, 2)), np.eye(4))


def test_load_nifti_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_nifti(tmp_path / "missing.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="could not read"):
        load_nifti(bad)
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 3), np.float32), np.eye(4)), str(tmp_path / "4d.nii.gz"))
    with pytest.raises(ValueError, match="expected a 3D volume"):
        load_nifti(tmp_path / "4d.nii.gz")


def test_atomic_write_honours_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644
