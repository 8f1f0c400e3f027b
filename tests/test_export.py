"""Export: OpenUSD (validated), STL/PLY/OBJ/GLB read back with trimesh, label NIfTI, export_brain, CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from synth import MNI_2MM, Condition, Grid
from synth.anatomy import (
    EXPORT_FORMATS,
    STRUCTURES,
    export_brain,
    export_meshes,
    export_usd,
    measure_volumes,
    save_labels,
    structure_meshes,
    validate_usd,
)
from synth.anatomy.cli import add_parsers
from synth.anatomy.testing import make_tiny_segmenter, phantom

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "models" / "synthbrain-seg-2mm"
TINY_GEN_GRID = Grid((32, 32, 32), 2.0, (-31.0, -31.0, -31.0))  # synth.testing.tiny_config's grid
CONDITION = {"age": 72.0, "sex": "F", "diagnosis": "AD", "volumes": {}}


def two_balls(shape=MNI_2MM.shape, affine=MNI_2MM.affine) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    labels = np.zeros(shape, np.uint8)
    labels[np.linalg.norm(world - (20, -10, 30), axis=-1) <= 12] = 10  # Left-Hippocampus (a ball)
    labels[np.linalg.norm(world - (-20, -10, 30), axis=-1) <= 8] = 8  # 3rd-Ventricle
    return labels


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return two_balls()


@pytest.fixture(scope="module")
def meshes(labels):
    return structure_meshes(labels, MNI_2MM.affine, ["Left-Hippocampus", "3rd-Ventricle"])


@pytest.fixture(scope="module")
def metadata(labels):
    return {"model": "unit-test", "seed": 3, "condition": CONDITION, "volumes_mm3": measure_volumes(labels)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="synthbrain")
    add_parsers(p.add_subparsers(dest="command", required=True))
    return p


# -- OpenUSD ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".usda", ".usdc", ".usdz"])
def test_usd_reopens_with_prims_units_and_custom_data(tmp_path, meshes, metadata, suffix):
    from pxr import Usd, UsdGeom, UsdShade

    path = export_usd(tmp_path / f"brain{suffix}", meshes, metadata)
    assert validate_usd(path) == []
    stage = Usd.Stage.Open(str(path))
    assert stage.GetDefaultPrim().GetPath() == "/World"
    assert UsdGeom.GetStageMetersPerUnit(stage) == pytest.approx(0.001)
    assert UsdGeom.GetStageUpAxis(stage) == "Z" and stage.HasAuthoredMetadata("upAxis")
    assert "NOT FOR CLINICAL USE" in stage.GetRootLayer().documentation
    hippo = stage.GetPrimAtPath("/World/Anatomy/Left_Hippocampus")
    assert hippo.IsA(UsdGeom.Mesh) and hippo.GetDisplayName() == "Left-Hippocampus"
    assert stage.GetPrimAtPath("/World/Anatomy/_3rd_Ventricle").IsA(UsdGeom.Mesh)
    data = hippo.GetCustomData()
    assert data["label"] == 10 and data["structure"] == "Left-Hippocampus"
    assert data["volume_mm3"] == pytest.approx(metadata["volumes_mm3"]["Left-Hippocampus"])
    assert data["seed"] == 3 and data["model"] == "unit-test" and data["condition"]["diagnosis"] == "AD"
    assert data["notice"] == "synthetic, not for clinical use"
    mesh = UsdGeom.Mesh(hippo)
    points = np.asarray(mesh.GetPointsAttr().Get())
    assert np.allclose(points.mean(0), (20, -10, 30), atol=0.6)  # millimetres, RAS
    assert len(mesh.GetFaceVertexIndicesAttr().Get()) == 3 * meshes["Left-Hippocampus"].n_cells
    assert tuple(mesh.GetDisplayColorPrimvar().Get()[0]) == pytest.approx((220 / 255, 216 / 255, 20 / 255))
    material, _ = UsdShade.MaterialBindingAPI(hippo).ComputeBoundMaterial()
    shader = UsdShade.Shader(material.GetSurfaceOutput().GetConnectedSources()[0][0].source.GetPrim())
    assert shader.GetIdAttr().Get() == "UsdPreviewSurface"
    assert stage.GetPrimAtPath("/World").GetCustomData()["condition"]["age"] == 72.0


def test_validate_usd_reports_errors(tmp_path):
    from pxr import Usd, UsdGeom

    path = tmp_path / "bad.usda"
    stage = Usd.Stage.CreateNew(str(path))  # no defaultPrim, metersPerUnit or upAxis
    UsdGeom.Mesh.Define(stage, "/World/Mesh")
    stage.GetRootLayer().Save()
    errors = validate_usd(path)
    assert errors and any("defaultPrim" in e or "metersPerUnit" in e or "upAxis" in e for e in errors), errors


def test_usd_unknown_format(tmp_path, meshes):
    with pytest.raises(ValueError, match=r"unknown USD format '.fbx'.*supported: .usda, .usdc, .usdz"):
        export_usd(tmp_path / "brain.fbx", meshes, {})
    assert not list(tmp_path.iterdir())


def test_export_rejects_empty_meshes(tmp_path):
    with pytest.raises(ValueError, match="non-empty mapping"):
        export_usd(tmp_path / "brain.usda", {}, {})


# -- STL / PLY / OBJ / GLB ------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".stl", ".ply", ".obj"])
def test_combined_mesh_files_open_in_trimesh(tmp_path, meshes, metadata, suffix):
    import trimesh

    path = export_meshes(tmp_path / f"brain{suffix}", meshes, metadata)
    mesh = trimesh.load(path, force="mesh")
    n_faces = sum(m.n_cells for m in meshes.values())
    assert len(mesh.faces) == n_faces
    assert np.allclose(mesh.bounds, [[-28, -22, 18], [32, 2, 42]], atol=1.0)  # both balls, mm
    head = path.read_bytes()[:400]
    assert b"not for clinical use" in head.lower()
    if suffix != ".stl":  # PLY and OBJ carry vertex colours
        colours = np.asarray(mesh.visual.vertex_colors)[:, :3]
        assert {tuple(c) for c in colours} == {(220, 216, 20), (204, 182, 142)}


def test_glb_keeps_named_parts_in_metres(tmp_path, meshes, metadata):
    import trimesh

    path = export_meshes(tmp_path / "brain.glb", meshes, metadata)
    scene = trimesh.load(path)
    assert set(scene.geometry) == {"Left-Hippocampus", "3rd-Ventricle"}
    hippo = scene.geometry["Left-Hippocampus"]
    # glTF axes: (-x, z, y) of RAS, in metres.
    assert np.allclose(hippo.vertices.mean(0), (-0.020, 0.030, -0.010), atol=1e-3)
    blob = path.read_bytes()
    length = int.from_bytes(blob[12:16], "little")
    gltf = json.loads(blob[20 : 20 + length])
    assert gltf["asset"]["extras"]["seed"] == 3
    assert "not for clinical use" in gltf["asset"]["copyright"]
    assert {n["name"] for n in gltf["nodes"] if "extras" in n} == {"Left-Hippocampus", "3rd-Ventricle"}


def test_mesh_unknown_format(tmp_path, meshes):
    with pytest.raises(ValueError, match=r"unknown mesh format '.fbx'.*supported: .stl, .ply, .obj, .glb"):
        export_meshes(tmp_path / "brain.fbx", meshes, {})


# -- labels -------------------------------------------------------------------------------------------
def test_save_labels_writes_nifti_and_label_table(tmp_path, labels):
    import nibabel as nib

    path = save_labels(tmp_path / "labels.nii.gz", labels, MNI_2MM.affine, {"model": "unit-test", "seed": 3})
    img = nib.load(path)
    assert img.get_data_dtype() == np.uint8
    assert (np.asarray(img.dataobj) == labels).all() and np.allclose(img.affine, MNI_2MM.affine)
    assert b"SYNTHETIC" in img.header["descrip"].item()
    assert img.header.get_intent()[0] == "label"
    side = json.loads((tmp_path / "labels.json").read_text())
    assert len(side["labels"]) == len(STRUCTURES) + 1 and side["labels"][10]["name"] == "Left-Hippocampus"
    assert side["seed"] == 3 and "NOT FOR CLINICAL USE" in side["synthetic_notice"]


def test_save_labels_rejects_non_compact(tmp_path):
    with pytest.raises(ValueError, match="compact labels 0-30"):
        save_labels(tmp_path / "l.nii.gz", np.full((4, 4, 4), 48, np.uint8), np.eye(4))


# -- export_brain ---------------------------------------------------------------------------------------
def test_export_brain_from_labels_writes_every_format(tmp_path, labels):
    import trimesh

    files = export_brain(tmp_path, labels=labels, affine=MNI_2MM.affine)
    assert set(files) == {*EXPORT_FORMATS, "json"}
    for fmt, path in files.items():
        assert path.is_file() and path.stat().st_size > 0, fmt
    assert validate_usd(files["usdz"]) == []
    assert set(trimesh.load(files["glb"]).geometry) == {"Left-Hippocampus", "3rd-Ventricle"}


def test_export_brain_of_a_generated_brain_records_its_provenance(tmp_path, tiny_generator):
    from pxr import Usd

    brain = tiny_generator.generate(Condition(age=72, sex="F", diagnosis="AD"), seed=3)
    _, lab = phantom(brain.image.shape)
    files = export_brain(tmp_path, brain, labels=lab, formats=["usda", "nii.gz"])
    stage = Usd.Stage.Open(str(files["usda"]))
    data = stage.GetPrimAtPath("/World/Anatomy/CSF").GetCustomData()
    assert data["seed"] == 3 and data["model"] == "tiny-test-model"
    assert data["condition"]["age"] == 72.0 and data["condition"]["diagnosis"] == "AD"
    assert json.loads(files["json"].read_text())["target_volumes_fraction_of_icv"]


def test_export_brain_segments_an_image(tmp_path):
    from synth.anatomy import load_segmenter

    seg = load_segmenter(make_tiny_segmenter(tmp_path / "seg", TINY_GEN_GRID, steps=2), device="cpu")
    image, _ = phantom(TINY_GEN_GRID.shape)
    files = export_brain(tmp_path / "out", image=image, affine=TINY_GEN_GRID.affine, formats=["nii.gz"], segmenter=seg)
    side = json.loads(files["json"].read_text())
    assert side["segmenter"] == "tiny-test-segmenter" and side["model"] == "user image"


def test_export_brain_unknown_format(tmp_path, labels):
    with pytest.raises(ValueError, match="unknown export format 'fbx'; supported: nii.gz, usda"):
        export_brain(tmp_path, labels=labels, formats=["usda", "fbx"])
    assert not list(tmp_path.iterdir())


def test_export_brain_needs_an_input(tmp_path):
    with pytest.raises(ValueError, match="nothing to export"):
        export_brain(tmp_path)


def test_export_brain_image_and_labels_conflict(tmp_path, labels):
    with pytest.raises(ValueError, match="not both"):
        export_brain(tmp_path, image=labels.astype(np.float32), labels=labels)


def test_export_brain_empty_labels(tmp_path):
    with pytest.raises(ValueError, match="label map is empty"):
        export_brain(tmp_path, labels=np.zeros(MNI_2MM.shape, np.uint8), formats=["stl"])


# -- CLI ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mni_segmenter_dir(tmp_path_factory) -> Path:
    """Random weights on the model grid, saved as a model folder (for CLI plumbing, not accuracy)."""
    import torch

    from synth.anatomy.segmenter import SegmenterConfig, build_network, default_network
    from synth.anatomy.training import export_segmenter

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "random-seg"
    return export_segmenter(build_network(default_network()), folder, SegmenterConfig(name="random-seg"))


def test_cli_segment(tmp_path, mni_segmenter_dir, capsys):
    from synth.io import save_nifti

    src = save_nifti(tmp_path / "t1.nii.gz", phantom(MNI_2MM.shape)[0], MNI_2MM.affine)
    args = parser().parse_args(["segment", str(src), "--out", str(tmp_path / "labels.nii.gz"),
                                "--segmenter", str(mni_segmenter_dir), "--device", "cpu"])
    assert args.func(args) == 0
    assert (tmp_path / "labels.nii.gz").is_file() and (tmp_path / "labels.json").is_file()
    assert "icv" in capsys.readouterr().out


def test_cli_segment_missing_input(tmp_path):
    args = parser().parse_args(["segment", str(tmp_path / "nope.nii.gz"), "--out", str(tmp_path / "l.nii.gz")])
    with pytest.raises(FileNotFoundError, match="no such file"):
        args.func(args)


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(), reason="shipped segmenter not built yet")
def test_cli_export_of_an_image_with_the_shipped_segmenter(tmp_path):
    from synth.io import save_nifti

    # A crude brain: WM core, GM shell, ventricles; enough for the segmenter to find structures.
    image, _ = phantom(MNI_2MM.shape)
    src = save_nifti(tmp_path / "t1.nii.gz", image, MNI_2MM.affine)
    args = parser().parse_args(["export", str(src), "--out-dir", str(tmp_path / "out"), "--formats", "usdz", "ply",
                                "--device", "cpu"])
    assert args.func(args) == 0
    assert validate_usd(tmp_path / "out" / "out.usdz") == []  # named after the output folder
    assert (tmp_path / "out" / "out.ply").stat().st_size > 0


def test_cli_export_generates_a_brain(tmp_path, tiny_model_dir):
    seg_dir = make_tiny_segmenter(tmp_path / "seg", TINY_GEN_GRID, steps=2)
    args = parser().parse_args(["export", "--age", "72", "--sex", "F", "--diagnosis", "AD", "--seed", "3",
                                "--model", str(tiny_model_dir), "--segmenter", str(seg_dir), "--device", "cpu",
                                "--out-dir", str(tmp_path / "out"), "--formats", "nii.gz"])
    assert args.func(args) == 0
    side = json.loads((tmp_path / "out" / "out_labels.json").read_text())
    assert side["seed"] == 3 and side["condition"]["sex"] == "F"
    assert [s["command"] for s in side["history"]] == ["generate", "export"]
    assert (tmp_path / "out" / "out_t1.nii.gz").is_file()


def test_cli_export_needs_input_or_condition(tmp_path):
    args = parser().parse_args(["export", "--out-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="give an input NIfTI, or --age and --sex"):
        args.func(args)


def test_cli_export_input_and_condition_conflict(tmp_path):
    args = parser().parse_args(["export", "t1.nii.gz", "--age", "70", "--out-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="not both"):
        args.func(args)


def test_cli_export_unknown_format(tmp_path):
    args = parser().parse_args(["export", "t1.nii.gz", "--out-dir", str(tmp_path), "--formats", "fbx"])
    with pytest.raises(ValueError, match="unknown export format 'fbx'"):
        args.func(args)
