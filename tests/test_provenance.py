"""Provenance travels: a generated brain's model, version, seed and condition reach every file made from it."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import nibabel as nib
import pytest

from synth import provenance
from synth.anatomy.testing import make_tiny_segmenter
from synth.cli import main
from synth.grid import Grid

TINY_GEN_GRID = Grid((32, 32, 32), 2.0, (-31.0, -31.0, -31.0))  # synth.testing.tiny_config's grid


@pytest.fixture(scope="module")
def tiny_segmenter_dir(tmp_path_factory) -> Path:
    return make_tiny_segmenter(tmp_path_factory.mktemp("seg") / "tiny-seg", TINY_GEN_GRID, steps=2)


@pytest.fixture(scope="module")
def generated(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "brain.nii.gz"
    assert main(["generate", "--age", "72", "--sex", "F", "--diagnosis", "AD", "--seed", "3", "--out", str(out),
                 "--model", str(tiny_model_dir), "--device", "cpu", "--quiet"]) == 0
    return out


def _no_absolute_paths(value, where="") -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _no_absolute_paths(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _no_absolute_paths(v, f"{where}[{i}]")
    elif isinstance(value, str):
        assert not os.path.isabs(value) and "/tmp/" not in value, f"absolute path recorded at {where}: {value}"


def test_generate_sidecar_records_model_by_name_and_its_step(generated):
    side = json.loads(generated.with_name("brain.json").read_text())
    assert side["model"] == "tiny-test-model" and side["model_version"] == "0.0.0-test"
    assert side["model_source"] == "tiny-test-model"  # the folder's name, not /tmp/pytest-.../tiny-test-model
    _no_absolute_paths(side)
    assert [s["command"] for s in side["history"]] == ["generate"]
    assert side["history"][0]["synth_version"] and side["history"][0]["time"]
    assert "zero" in side["background"]


def test_export_of_a_generated_nifti_carries_its_provenance_into_every_format(generated, tiny_segmenter_dir, tmp_path):
    from pxr import Usd

    out = tmp_path / "scene"
    assert main(["export", str(generated), "--out-dir", str(out), "--segmenter", str(tiny_segmenter_dir),
                 "--device", "cpu"]) == 0
    # The USD names the brain's model, version, seed and condition (the "done when").
    stage = Usd.Stage.Open(str(out / "scene.usda"))
    world = dict(stage.GetPrimAtPath("/World").GetCustomData())
    assert world["model"] == "tiny-test-model" and world["model_version"] == "0.0.0-test"
    assert world["seed"] == 3
    assert dict(world["condition"]) == {"age": 72.0, "sex": "F", "diagnosis": "AD", "volumes": {}}
    assert world["source"] == "brain.nii.gz" and world["segmenter"] == "tiny-test-segmenter"
    history = json.loads(world["history"])
    assert [s["command"] for s in history] == ["generate", "export"]
    # A mesh prim says it too.
    mesh = next(p for p in stage.Traverse() if p.GetTypeName() == "Mesh")
    assert mesh.GetCustomData()["seed"] == 3 and mesh.GetCustomData()["model"] == "tiny-test-model"
    # The label table sidecar and the label NIfTI's header.
    side = json.loads((out / "scene_labels.json").read_text())
    assert side["model"] == "tiny-test-model" and side["seed"] == 3 and side["condition"]["diagnosis"] == "AD"
    assert [s["command"] for s in side["history"]] == ["generate", "export"]
    _no_absolute_paths({k: v for k, v in side.items() if k != "labels"})
    descrip = nib.load(str(out / "scene_labels.nii.gz")).header["descrip"].tobytes().decode()
    assert descrip.startswith("SYNTHETIC not for clinical use") and "tiny-test-model" in descrip and "seed 3" in descrip
    # STL: the 80-byte header has the seed and condition.
    header = (out / "scene.stl").read_bytes()[:80]
    assert b"seed 3" in header and b"72y F AD" in header and not header.startswith(b"solid")
    # PLY and OBJ comments.
    ply_head = (out / "scene.ply").read_bytes().split(b"end_header")[0].decode("ascii")
    assert "comment model: tiny-test-model" in ply_head and "comment seed: 3" in ply_head and '"AD"' in ply_head
    obj_head = (out / "scene.obj").read_text().split("\nv ")[0]
    assert "# model_version: 0.0.0-test" in obj_head and "# seed: 3" in obj_head
    # GLB: asset extras.
    import trimesh

    scene = trimesh.load(out / "scene.glb")
    extras = scene.metadata.get("extras") or {}
    if not extras:  # trimesh versions differ in where they put asset.extras: read the JSON chunk
        raw = (out / "scene.glb").read_bytes()
        n = int.from_bytes(raw[12:16], "little")
        extras = json.loads(raw[20:20 + n])["asset"]["extras"]
    assert extras["model"] == "tiny-test-model" and extras["seed"] == 3


def test_segment_of_a_generated_nifti_carries_its_provenance(generated, tiny_segmenter_dir, tmp_path):
    out = tmp_path / "labels.nii.gz"
    assert main(["segment", str(generated), "--out", str(out), "--segmenter", str(tiny_segmenter_dir),
                 "--device", "cpu", "--quiet"]) == 0
    side = json.loads((tmp_path / "labels.json").read_text())
    assert side["model"] == "tiny-test-model" and side["model_version"] == "0.0.0-test" and side["seed"] == 3
    assert [s["command"] for s in side["history"]] == ["generate", "segment"]
    assert side["history"][-1]["input"] == "brain.nii.gz"  # relative: a name, not the absolute path
    assert "tiny-test-model" in nib.load(str(out)).header["descrip"].tobytes().decode()


def test_a_users_image_is_recorded_as_such(generated, tiny_segmenter_dir, tmp_path):
    import shutil

    user = tmp_path / "user.nii.gz"
    shutil.copy(generated, user)  # no sidecar: a user's own image
    out = tmp_path / "l.nii.gz"
    assert main(["segment", str(user), "--out", str(out), "--segmenter", str(tiny_segmenter_dir), "--device", "cpu",
                 "--quiet"]) == 0
    side = json.loads((tmp_path / "l.json").read_text())
    assert side["model"] == "user image" and "seed" not in side and side["source"] == "user.nii.gz"
    assert [s["command"] for s in side["history"]] == ["segment"]


# -- the helper itself ------------------------------------------------------------------------------
def test_relative_path_is_never_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert provenance.relative_path(tmp_path / "a" / "b.nii.gz") == "a/b.nii.gz"
    assert provenance.relative_path("/somewhere/else/c.nii.gz") == "c.nii.gz"
    assert provenance.relative_path("rel/d.nii.gz") == "rel/d.nii.gz"
    assert provenance.model_reference(tmp_path / "models" / "m1", models_root=tmp_path / "models") == "m1"
    assert provenance.model_reference("/opt/elsewhere/m2", models_root=tmp_path / "models") == "m2"


def test_read_sidecar_of_an_older_record_and_of_broken_ones(tmp_path):
    img = tmp_path / "old.nii.gz"
    img.write_bytes(b"")
    (tmp_path / "old.json").write_text(json.dumps({
        "notice": "x", "synthetic": True, "model": "m", "model_version": "0.1", "seed": 5,
        "condition": {"age": 30.0, "sex": "M", "diagnosis": "CN", "volumes": {}},
        "model_source": "/home/someone/models/m", "created": "2026-01-01T00:00:00+00:00", "labels": [1, 2]}))
    prov = provenance.read_sidecar(img)
    assert prov["model_source"] == "m" and prov["seed"] == 5 and "labels" not in prov
    assert [s["command"] for s in prov["history"]] == ["generate"]  # implied by an older sidecar
    out = provenance.extend(prov, "evaluate", input=img, note="x")
    assert [s["command"] for s in out["history"]] == ["generate", "evaluate"] and len(prov["history"]) == 1
    assert out["history"][-1]["note"] == "x" and not os.path.isabs(out["history"][-1]["input"])
    (tmp_path / "old.json").write_text("{not json")
    with pytest.warns(UserWarning, match="not readable JSON"):
        assert provenance.read_sidecar(img) == {}
    (tmp_path / "old.json").write_text(json.dumps({"something": "else"}))
    with pytest.warns(UserWarning, match="not a SynthBrain provenance record"):
        assert provenance.read_sidecar(img) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert provenance.read_sidecar(tmp_path / "none.nii.gz") == {}


def test_descrip_fits_the_nifti_field():
    prov = {"model": "a-very-long-model-name-" * 4, "model_version": "1.2.3", "seed": 2**62,
            "condition": {"age": 72.0, "sex": "F", "diagnosis": "AD"}}
    text = provenance.descrip(prov, "labels of")
    assert len(text) <= 79 and text.startswith("SYNTHETIC not for clinical use") and text.isascii()
