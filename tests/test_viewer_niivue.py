"""The NiiVue data, legend, readout, missed-target check, colour bar and label tables of the viewer."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import synth  # noqa: E402
from viewer import niivue, render, service  # noqa: E402

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = (-10.0, -12.0, -8.0)


def _load(data: bytes):
    import nibabel as nib

    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


def test_t1_bytes_keep_intensities_to_8_bits_and_the_affine():
    rng = np.random.default_rng(0)
    image = rng.random((10, 12, 8)).astype(np.float32)
    img = _load(niivue.t1_bytes(image, AFFINE))
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.get_fdata(), image, atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(img.affine, AFFINE)
    assert b"SYNTHETIC" in img.header["descrip"].tobytes()


def test_t1_bytes_refuse_a_2d_image():
    with pytest.raises(ValueError, match="3D"):
        niivue.t1_bytes(np.zeros((4, 4)), AFFINE)


def test_label_overlay_is_painted_with_the_lut_and_transparent_background():
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[1, 2, 3] = 10
    lut = render.label_lut({10: (220, 216, 20)})
    img = _load(niivue.label_overlay_bytes(labels, AFFINE, lut))
    rgba = np.asarray(img.dataobj)
    assert tuple(rgba[1, 2, 3]) == (220, 216, 20, 255)
    assert rgba["A"].sum() == 255  # only the labelled voxel is opaque
    assert int(img.header["intent_code"]) == 1002  # NIFTI_INTENT_LABEL


def test_voxel_from_event_accepts_clicks_inside_the_volume_only():
    shape = (10, 12, 8)
    assert niivue.voxel_from_event({"type": "voxel_click", "voxel": [1.2, 3, 7]}, shape) == [1, 3, 7]
    assert niivue.voxel_from_event({"type": "voxel_click", "voxel": [10, 0, 0]}, shape) is None
    assert niivue.voxel_from_event({"type": "voxel_click", "voxel": ["a", 0, 0]}, shape) is None
    assert niivue.voxel_from_event({"type": "other"}, shape) is None
    assert niivue.voxel_from_event(None, shape) is None


def test_readout_names_the_structure_under_the_voxel():
    image = np.zeros((6, 6, 6), np.float32)
    image[1, 2, 3] = 0.75
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[1, 2, 3] = 10
    r = niivue.readout(image, AFFINE, (1, 2, 3), labels, {10: "Left-Hippocampus"})
    assert r["structure"] == "Left-Hippocampus" and r["intensity"] == pytest.approx(0.75)
    assert r["mm"] == [-8.0, -8.0, -2.0]
    assert "Left-Hippocampus" in niivue.readout_text(r)
    assert niivue.readout(image, AFFINE, (0, 0, 0), labels, {})["structure"] == "background"


def test_legend_rows_list_present_structures_with_their_colours():
    anat = pytest.importorskip("synth.anatomy")
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[0, 0, 0], labels[1, 1, 1] = 10, 6
    rows = niivue.legend_rows(anat.STRUCTURES, labels)
    assert [r["label"] for r in rows] == [6, 10]
    assert rows[1]["color"] == "#dcd814" and rows[1]["name"] == "Left-Hippocampus"


class _Norm:
    """A normative model with log-normal volumes: mean 1 % ICV, sd 0.1 in log space."""

    def zscore(self, key, fraction, age, sex):
        return (np.log(fraction) - np.log(0.01)) / 0.1


def test_target_check_flags_a_brain_that_missed_its_request():
    cond = synth.Condition(70, "F", "CN")
    rows = [
        {"volume": "hippocampus", "requested": 0.01, "measured": 0.0101},
        {"volume": "lateral_ventricles", "requested": 0.01, "measured": 0.0135},
        {"volume": "gm", "requested": 0.45, "measured": 0.40},
    ]
    checks = service.target_check(rows, cond, _Norm(), ["hippocampus", "lateral_ventricles"])
    assert [c["volume"] for c in checks] == ["hippocampus", "lateral_ventricles"]  # conditioned ones only
    hip, ven = checks
    assert not hip["missed"] and ven["missed"]
    assert ven["gap_pct"] == pytest.approx(35.0)
    assert ven["z_gap"] == pytest.approx(np.log(1.35) / 0.1)
    no_norm = service.target_check(rows, cond, None)
    assert [c["missed"] for c in no_norm] == [False, True, False]  # 15 % rule without a normative model


def test_colorbar_has_the_map_and_is_refused_when_empty():
    bar = render.colorbar(render.diff_colors(), -0.2, 0.2, label="B - A")
    assert bar.shape[2] == 3 and bar.shape[1] > 200
    row = bar[5, 10:-10]
    assert row[0, 2] > row[0, 0] and row[-1, 0] > row[-1, 2]  # blue on the left, red on the right
    with pytest.raises(ValueError, match="vmin < vmax"):
        render.colorbar(render.diff_colors(), 0.0, 0.0)


def test_morphometry_figure_has_a_legend_on_every_panel_and_readable_fonts():
    rows = [{"volume": k, "requested": 0.01, "measured": 0.011} for k in synth.VOLUME_KEYS]
    ages = np.linspace(20, 90, 5)
    curves = {k: {"age": ages, "expected": np.full(5, 0.01), "low": np.full(5, 0.008), "high": np.full(5, 0.012)}
              for k in synth.VOLUME_KEYS}
    fig = service.morphometry_figure(rows, curves, 70, "F")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == len(synth.VOLUME_KEYS)
    for ax in panels:
        legend = ax.get_legend()
        assert legend is not None and {"requested", "measured", "healthy expected"} <= {t.get_text() for t in legend.get_texts()}
        assert ax.xaxis.label.get_fontsize() >= 10 and ax.title.get_fontsize() >= 12


def test_label_tables_other_tools_read():
    anat = pytest.importorskip("synth.anatomy")
    tsv = service.dseg_tsv(anat.STRUCTURES).splitlines()
    assert tsv[0].split("\t") == ["index", "name", "abbreviation", "color"]
    assert len(tsv) == len(anat.STRUCTURES) + 2
    assert "10\tLeft-Hippocampus\tLH\t#dcd814" in tsv
    lut = [line.split() for line in service.freesurfer_lut(anat.STRUCTURES).splitlines() if not line.startswith("#")]
    assert lut[0] == ["0", "Unknown", "0", "0", "0", "0"]
    assert ["10", "Left-Hippocampus", "220", "216", "20", "0"] in lut  # FreeSurfer: No. Name R G B A(0)
    ctbl = [line.split() for line in service.slicer_ctbl(anat.STRUCTURES).splitlines() if not line.startswith("#")]
    assert ["10", "Left-Hippocampus", "220", "216", "20", "255"] in ctbl
    assert "NOT FOR CLINICAL USE" in service.freesurfer_lut(anat.STRUCTURES).upper()


def _nifti(array, affine=AFFINE) -> bytes:
    import nibabel as nib

    return gzip.compress(nib.Nifti1Image(np.asarray(array), affine).to_bytes())


def _singular_affine() -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), AFFINE)
    img.header.set_qform(None, code=0)
    img.header["srow_x"] = [0.0, 0.0, 0.0, 0.0]
    img.header["sform_code"] = 1
    return gzip.compress(img.header.binaryblock + b"\x00" * 4 + np.ones((4, 4, 4), "<f4").tobytes(order="F"))


def test_read_upload_returns_a_ras_image_in_memory():
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    flipped = AFFINE.copy()
    flipped[0, 0] = -2.0  # LAS on disk: read back as RAS
    img = service.read_upload(_nifti(data, flipped))
    assert img.shape == (4, 5, 6) and img.affine[0, 0] > 0
    np.testing.assert_array_equal(np.asarray(img.dataobj), data[::-1])


@pytest.mark.parametrize("make, expected", [
    (lambda: b"", "empty"),
    (lambda: b"\x1f\x8b" + b"\x00" * 50, "NIfTI"),
    (lambda: _nifti(np.zeros((4, 4), np.float32)), "3D"),
    (lambda: _nifti(np.zeros((4, 4, 4, 3), np.float32)), "3D"),
    (lambda: _nifti(np.full((4, 4, 4), np.nan, np.float32)), "NaN"),
    (lambda: _nifti(np.zeros((4, 4, 4), np.float32), np.diag([20.0, 20.0, 20.0, 1.0])), "0.2-6 mm"),
    (lambda: _singular_affine(), "invertible"),
    (lambda: _nifti(np.zeros((4, 4, 4), np.float32))[:-20], "NIfTI"),
])
def test_read_upload_refuses_what_it_cannot_read(make, expected):
    with pytest.raises(ValueError, match=expected):
        service.read_upload(make())


def test_read_upload_refuses_a_file_over_the_limit():
    with pytest.raises(ValueError, match="at most 0.001 MB"):
        service.read_upload(b"\x00" * 2000, max_mb=0.001)


def test_parse_request_checks_precision():
    req = service.parse_request(model="m", age=60, sex="F", diagnosis="CN", seed=1, models=["m"], precision="FP32")
    assert req.precision == "fp32" and req.key()[-1] == "fp32"
    assert service.parse_request(model="m", age=60, sex="F", diagnosis="CN", seed=1, models=["m"], precision="auto").precision is None
    with pytest.raises(ValueError, match="precision"):
        service.parse_request(model="m", age=60, sex="F", diagnosis="CN", seed=1, models=["m"], precision="fp8")


def test_hover_html_carries_the_planes_and_names_and_loads_nothing_from_outside():
    image = np.random.default_rng(1).random((8, 10, 6)).astype(np.float32)
    labels = np.zeros((8, 10, 6), np.uint8)
    labels[2:4, 3:5, 2:4] = 10
    views = render.orthogonal_views(image, (3, 4, 3), labels=labels, lut=render.label_lut({10: (220, 216, 20)}))
    page = render.hover_html(image, (3, 4, 3), views, labels=labels, names={10: "Left-<Hippocampus>"}, affine=AFFINE)
    assert page.count("data:image/png;base64,") == 3
    assert '"10": "Left-<Hippocampus>"' in page and "esc(" in page  # names are escaped when shown
    assert "http" not in page and "<script src" not in page
