"""Every bad input is refused with one line naming what was expected, exit code 2 and nothing written.

Covers the CLI's argument checks (before any heavy import), broken NIfTI files, weights that do not
match their config, existing outputs, odd path characters, unwritable or full output folders and a
closed stdout; property-based tests (hypothesis) over ``Condition``, the NIfTI reader and the codec's
header reader.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synth.anatomy.testing import make_tiny_segmenter, phantom
from synth.cli import main
from synth.condition import AGE_RANGE, DIAGNOSES, VOLUME_KEYS, Condition
from synth.grid import Grid
from synth.io import MAX_VOXELS, load_nifti, save_nifti

ROOT = Path(__file__).resolve().parents[1]
TINY_GEN_GRID = Grid((32, 32, 32), 2.0, (-31.0, -31.0, -31.0))  # synth.testing.tiny_config's grid
SHIPPED_SEG = ROOT / "assets" / "models" / "synthbrain-seg-2mm"


@pytest.fixture(scope="module")
def tiny_segmenter_dir(tmp_path_factory) -> Path:
    return make_tiny_segmenter(tmp_path_factory.mktemp("seg") / "tiny-seg", TINY_GEN_GRID, steps=2)


@pytest.fixture(scope="module")
def t1(tmp_path_factory) -> Path:
    """A phantom T1 on the tiny generator's grid (what the tiny segmenter labels)."""
    image, _ = phantom(TINY_GEN_GRID.shape)
    return save_nifti(tmp_path_factory.mktemp("in") / "t1.nii.gz", image, TINY_GEN_GRID.affine)


def _one_line_exit_2(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("synthbrain: error:") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


# -- broken NIfTI files ---------------------------------------------------------------------------
def _write_bad_nifti(kind: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    eye = np.eye(4) * 2.0
    eye[3, 3] = 1.0
    if kind == "2d":
        path = folder / "x.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((32, 32), np.float32), eye), str(path))
    elif kind == "4d":
        path = folder / "x.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), eye), str(path))
    elif kind == "empty":
        path = folder / "x.nii"
        hdr = nib.Nifti1Header()
        hdr.set_data_shape((32, 0, 32))
        hdr.set_data_dtype(np.float32)
        path.write_bytes(hdr.binaryblock + b"\0" * 4)  # header + extension flag, no data
    elif kind == "zero-bytes":
        path = folder / "x.nii.gz"
        path.write_bytes(b"")
    elif kind == "truncated":
        path = folder / "x.nii"
        nib.save(nib.Nifti1Image(np.ones((32, 32, 32), np.float32), eye), str(path))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "gzip-corrupt":
        path = folder / "x.nii.gz"
        nib.save(nib.Nifti1Image(np.random.default_rng(0).random((32, 32, 32), np.float32), eye), str(path))
        data = bytearray(path.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 64):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "singular-affine":
        path = folder / "x.nii.gz"
        img = nib.Nifti1Image(np.ones((32, 32, 32), np.float32), np.eye(4))
        img.header.set_qform(None, code=0)
        img.set_sform(np.diag([2.0, 0.0, 2.0, 1.0]), code=1)
        nib.save(img, str(path))
        img = nib.load(str(path))
        assert abs(np.linalg.det(img.affine[:3, :3])) < 1e-9  # what a reader sees
    elif kind == "huge":
        path = folder / "x.nii"
        hdr = nib.Nifti1Header()
        hdr.set_data_shape((4096, 4096, 4096))
        hdr.set_data_dtype(np.float32)
        path.write_bytes(hdr.binaryblock + b"\0" * 4 + b"\0" * 1024)  # claims 256 GiB, holds 1 KiB
    elif kind == "not-nifti":
        path = folder / "x.nii.gz"
        path.write_bytes(gzip.compress(b"this is not a NIfTI file at all" * 20))
    else:  # pragma: no cover
        raise ValueError(kind)
    return path


BAD_NIFTI = {
    "2d": "expected a 3D volume",
    "4d": "expected a 3D volume",
    "empty": "expected a non-empty 3D volume",
    "zero-bytes": "could not read",
    "truncated": "could not read",
    "gzip-corrupt": "could not read",
    "singular-affine": "expected an invertible voxel -> world affine",
    "huge": f"expected a volume of at most {MAX_VOXELS:,} voxels",
    "not-nifti": "could not read",
}


@pytest.mark.parametrize("kind", list(BAD_NIFTI))
def test_bad_nifti_is_refused_before_the_segmenter_loads(kind, tmp_path, capsys):
    src = _write_bad_nifti(kind, tmp_path / "in")
    out = tmp_path / "out"
    # A segmenter that does not exist: the input's error must come first, before any model loads.
    code = main(["segment", str(src), "--out", str(out / "labels.nii.gz"), "--segmenter", "no-such-segmenter"])
    _one_line_exit_2(capsys, code, BAD_NIFTI[kind])
    code = main(["export", str(src), "--out-dir", str(out), "--segmenter", "no-such-segmenter"])
    _one_line_exit_2(capsys, code, BAD_NIFTI[kind])
    assert not out.exists()


def test_reader_errors_directly(tmp_path):
    for kind, message in BAD_NIFTI.items():
        with pytest.raises(ValueError, match=message.split(" -> ")[0]):
            load_nifti(_write_bad_nifti(kind, tmp_path / kind))


# -- weights that do not match their config ---------------------------------------------------------
def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _gen(model: Path, out: Path, *extra: str) -> int:
    return main(["generate", "--age", "60", "--sex", "M", "--seed", "1", "--out", str(out), "--model", str(model),
                 "--device", "cpu", "--quiet", *extra])


def test_weights_missing_truncated_or_foreign_are_refused(tiny_model_dir, tmp_path, capsys):
    from synth.testing import make_tiny_model

    out = tmp_path / "out"
    missing = _copy_model(tiny_model_dir, tmp_path / "missing")
    (missing / "unet.safetensors").unlink()
    _one_line_exit_2(capsys, _gen(missing, out / "a.nii.gz"), "unet.safetensors is missing")

    truncated = _copy_model(tiny_model_dir, tmp_path / "truncated")
    data = (truncated / "autoencoder.safetensors").read_bytes()
    (truncated / "autoencoder.safetensors").write_bytes(data[: len(data) - 100])
    _one_line_exit_2(capsys, _gen(truncated, out / "a.nii.gz"), "autoencoder.safetensors does not match its config")

    foreign = _copy_model(tiny_model_dir, tmp_path / "foreign")
    other = make_tiny_model(tmp_path / "other", seed=1)  # same architecture, other weights
    shutil.copy(other / "unet.safetensors", foreign / "unet.safetensors")
    _one_line_exit_2(capsys, _gen(foreign, out / "a.nii.gz"), "from another model")
    assert not out.exists()

    # A config without hashes (older or hand-made models) still loads.
    plain = _copy_model(tiny_model_dir, tmp_path / "plain")
    cfg = json.loads((plain / "config.json").read_text())
    assert set(cfg.pop("weights_sha256")) == {"autoencoder.safetensors", "unet.safetensors"}
    (plain / "config.json").write_text(json.dumps(cfg))
    assert _gen(plain, out / "b.nii.gz") == 0


@pytest.mark.skipif(not (SHIPPED_SEG / "model.safetensors").is_file(), reason="shipped segmenter not built")
def test_shipped_models_carry_weight_hashes_that_match(tmp_path, capsys, t1):
    from synth.io import verify_weights

    for folder in sorted((ROOT / "assets" / "models").iterdir()):
        if not (folder / "config.json").is_file():
            continue
        cfg = json.loads((folder / "config.json").read_text())
        weights = sorted(p.name for p in folder.glob("*.safetensors"))
        if not weights:
            continue
        assert sorted(cfg.get("weights_sha256", {})) == weights, folder.name
        verify_weights(folder, cfg["weights_sha256"])
    seg = _copy_model(SHIPPED_SEG, tmp_path / "seg")
    with open(seg / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    code = main(["segment", str(t1), "--out", str(tmp_path / "l.nii.gz"), "--segmenter", str(seg), "--device", "cpu"])
    _one_line_exit_2(capsys, code, "model.safetensors does not match its config")
    assert not (tmp_path / "l.nii.gz").exists()


# -- existing outputs, names and odd paths ------------------------------------------------------------
def test_segment_and_export_refuse_to_overwrite_without_force(t1, tiny_segmenter_dir, tmp_path, capsys):
    seg = ["--segmenter", str(tiny_segmenter_dir), "--device", "cpu"]
    existing = tmp_path / "existing.nii.gz"
    shutil.copy(t1, existing)
    before = existing.read_bytes()
    _one_line_exit_2(capsys, main(["segment", str(t1), "--out", str(existing), *seg, "--quiet"]),
                     f"refusing to overwrite {existing} (use --force)")
    assert existing.read_bytes() == before  # the T1 is not replaced by a label map
    assert main(["segment", str(t1), "--out", str(existing), *seg, "--quiet", "--force"]) == 0
    assert nib.load(str(existing)).get_data_dtype() == np.uint8
    capsys.readouterr()

    # export names its files after the output folder (or --name) and refuses to overwrite them.
    out = tmp_path / "left hemisphere"
    assert main(["export", str(t1), "--out-dir", str(out), "--formats", "nii.gz", "stl", *seg]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["left hemisphere.stl", "left hemisphere_labels.json",
                                                     "left hemisphere_labels.nii.gz"]
    stl = (out / "left hemisphere.stl").read_bytes()
    _one_line_exit_2(capsys, main(["export", str(t1), "--out-dir", str(out), "--formats", "stl", *seg]), "refusing to overwrite")
    assert (out / "left hemisphere.stl").read_bytes() == stl
    assert main(["export", str(t1), "--out-dir", str(out), "--formats", "stl", "--name", "second", *seg]) == 0
    assert (out / "second.stl").is_file()
    assert main(["export", str(t1), "--out-dir", str(out), "--formats", "stl", "--force", *seg]) == 0
    capsys.readouterr()
    for bad in ("../escape", "", ".hidden", "a/b"):
        _one_line_exit_2(capsys, main(["export", str(t1), "--out-dir", str(out), "--name", bad, *seg]), "`name` must be")
    _one_line_exit_2(capsys, main(["export", str(t1), "--out-dir", str(t1), *seg]), "--out-dir must be a folder")
    _one_line_exit_2(capsys, main(["segment", str(t1), "--out", str(t1), *seg]), "--out must differ from the input")


def test_paths_with_spaces_and_unicode(tiny_model_dir, tiny_segmenter_dir, tmp_path):
    folder = tmp_path / "dossier à espaces" / "脑 scans"
    brain = folder / "cerveau é 1.nii.gz"
    assert _gen(tiny_model_dir, brain) == 0
    assert brain.is_file() and (folder / "cerveau é 1.json").is_file()
    labels = folder / "étiquettes 1.nii.gz"
    assert main(["segment", str(brain), "--out", str(labels), "--segmenter", str(tiny_segmenter_dir), "--device", "cpu",
                 "--quiet"]) == 0
    assert json.loads((folder / "étiquettes 1.json").read_text())["seed"] == 1
    out = folder / "scène"
    assert main(["export", str(brain), "--out-dir", str(out), "--formats", "usda", "glb", "--segmenter",
                 str(tiny_segmenter_dir), "--device", "cpu"]) == 0
    assert (out / "scène.usda").is_file() and (out / "scène.glb").is_file()


# -- unwritable and full output folders -------------------------------------------------------------
@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    """Mount a tmpfs at ``path`` (root only); skip the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def _read_only_folder(path: Path):
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:  # root writes through permission bits: use a read-only mount instead
        with _tmpfs(path, "ro,size=64k"):
            yield path
    else:
        path.chmod(0o500)
        try:
            yield path
        finally:
            path.chmod(0o700)


def test_unwritable_output_folder_is_refused_before_any_work(tiny_model_dir, t1, tiny_segmenter_dir, tmp_path, capsys):
    with _read_only_folder(tmp_path / "ro") as ro:
        _one_line_exit_2(capsys, _gen(tiny_model_dir, ro / "a.nii.gz"), "cannot write", "not writable")
        _one_line_exit_2(capsys, main(["segment", str(t1), "--out", str(ro / "sub" / "l.nii.gz"), "--segmenter",
                                       "no-such-segmenter"]), "cannot write", "not writable")
        _one_line_exit_2(capsys, main(["export", str(t1), "--out-dir", str(ro / "x"), "--segmenter", "no-such-segmenter"]),
                         "cannot write", "not writable")
        assert os.listdir(ro) == []


def test_full_disk_leaves_nothing_behind(tiny_model_dir, tmp_path, capsys):
    """A real full file system: a 16 KiB tmpfs (root only). The brain's NIfTI does not fit."""
    with _tmpfs(tmp_path / "full", "size=16k") as full:
        _one_line_exit_2(capsys, _gen(tiny_model_dir, full / "a.nii.gz"), "cannot write", "No space left on device")
        assert os.listdir(full) == []  # neither the NIfTI nor its temporary nor a lone sidecar


def test_write_failure_at_the_os_boundary_leaves_nothing_behind(tiny_model_dir, tmp_path):
    """Without root: the kernel refuses writes past 8 KiB (RLIMIT_FSIZE, EFBIG) in a real CLI process."""
    out = tmp_path / "out"
    out.mkdir()
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))\n"
        "from synth.cli import main\n"
        f"sys.exit(main({['generate', '--age', '60', '--sex', 'M', '--out', str(out / 'a.nii.gz'), '--model', str(tiny_model_dir), '--device', 'cpu', '--quiet']!r}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("synthbrain: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "cannot write" in r.stderr and "File too large" in r.stderr
    assert os.listdir(out) == []


# -- fail fast, before heavy imports -----------------------------------------------------------------
def test_bad_arguments_fail_before_torch_is_imported(tmp_path, t1):
    bad = _write_bad_nifti("truncated", tmp_path / "bad")
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "exists_labels.nii.gz").write_bytes(b"x")
    calls = [
        ["generate", "--age", "200", "--sex", "F", "--out", str(tmp_path / "a.nii.gz")],
        ["generate", "--age", "nan", "--sex", "F", "--out", str(tmp_path / "a.nii.gz")],
        ["generate", "--age", "70", "--sex", "F", "--steps", "0", "--out", str(tmp_path / "a.nii.gz")],
        ["generate", "--age", "70", "--sex", "X", "--out", str(tmp_path / "a.nii.gz")],
        ["generate", "--age", "70", "--sex", "F", "--volume", "brain=-1", "--out", str(tmp_path / "a.nii.gz")],
        ["generate", "--age", "70", "--sex", "F", "--seed", "-3", "--out", str(tmp_path / "a.nii.gz")],
        ["segment", str(bad), "--out", str(tmp_path / "l.nii.gz")],
        ["segment", str(t1), "--out", str(t1)],
        ["export", str(t1), "--out-dir", str(existing), "--formats", "nii.gz"],
        ["export", "--age", "70", "--sex", "F", "--out-dir", str(tmp_path / "e"), "--formats", "fbx"],
        ["train-autoencoder", "--run-dir", str(tmp_path / "r"), "--steps", "0"],
    ]
    code = (
        "import json, sys\n"
        "from synth.cli import main\n"
        f"codes = [main(argv) for argv in {calls!r}]\n"
        "print(json.dumps({'codes': codes, 'torch': 'torch' in sys.modules, 'monai': 'monai' in sys.modules}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["codes"] == [2] * len(calls), r.stderr
    assert not result["torch"] and not result["monai"], "a heavy import happened before the arguments were checked"
    assert len(r.stderr.strip().splitlines()) == len(calls) and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "exists", "in"] or not (tmp_path / "a.nii.gz").exists()


def test_broken_pipe_ends_quietly(t1, tiny_segmenter_dir, tmp_path):
    """``synthbrain segment ... | head``: no BrokenPipeError traceback."""
    out = tmp_path / "labels.nii.gz"
    cmd = (f"{sys.executable} -m synth segment '{t1}' --out '{out}' --segmenter '{tiny_segmenter_dir}' --device cpu "
           f"2> '{tmp_path / 'err.txt'}' | head -n 0")
    subprocess.run(["bash", "-c", cmd], cwd=ROOT, timeout=300, check=True)
    err = (tmp_path / "err.txt").read_text()
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err
    assert out.is_file()  # the labels were written before the table went to the closed pipe


# -- property-based tests ---------------------------------------------------------------------------
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(age=st.floats(allow_nan=False, allow_infinity=False, min_value=AGE_RANGE[0], max_value=AGE_RANGE[1]),
       sex=st.sampled_from(["F", "M", "f", "m", "female", "Male", " F "]),
       diagnosis=st.sampled_from([*DIAGNOSES, "mci", "ad", " cn"]))
def test_condition_accepts_every_valid_input_and_round_trips(age, sex, diagnosis):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ages outside the training range warn
        c = Condition(age=age, sex=sex, diagnosis=diagnosis)
        assert c.sex in ("F", "M") and c.diagnosis in DIAGNOSES and c.age == age
        assert Condition.from_dict(c.to_dict()) == c


@FAST
@given(age=st.one_of(st.floats(), st.integers(-10**30, 10**30), st.text(max_size=12), st.none(), st.booleans()),
       sex=st.one_of(st.text(max_size=8), st.integers(), st.none()),
       diagnosis=st.one_of(st.text(max_size=8), st.none()),
       volumes=st.one_of(st.none(), st.dictionaries(st.one_of(st.sampled_from(VOLUME_KEYS), st.text(max_size=6)),
                                                     st.one_of(st.floats(), st.text(max_size=6)), max_size=3)))
def test_condition_either_validates_or_raises_a_named_error(age, sex, diagnosis, volumes):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            c = Condition(age=age, sex=sex, diagnosis=diagnosis, volumes=volumes)
        except (TypeError, ValueError) as exc:
            assert "`" in str(exc) and "\n" not in str(exc)  # names the argument, one line
            return
    assert math.isfinite(c.age) and AGE_RANGE[0] <= c.age <= AGE_RANGE[1]
    assert c.sex in ("F", "M") and c.diagnosis in DIAGNOSES
    assert all(k in VOLUME_KEYS and math.isfinite(v) and 0 < v <= 1 for k, v in c.volumes.items())


def _valid_nifti_bytes(gz: bool) -> bytes:
    image = np.random.default_rng(0).random((6, 7, 5), np.float32)
    with tempfile.TemporaryDirectory() as d:
        path = save_nifti(Path(d) / ("v.nii.gz" if gz else "v.nii"), image, TINY_GEN_GRID.affine)
        return path.read_bytes()


_NII = {gz: _valid_nifti_bytes(gz) for gz in (False, True)}


def _read_nifti_bytes(data: bytes, gz: bool):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("x.nii.gz" if gz else "x.nii")
        path.write_bytes(data)
        return load_nifti(path)


@FAST
@given(gz=st.booleans(), cut=st.integers(0, 10_000), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=4))
def test_nifti_reader_returns_a_3d_volume_or_raises_value_error(gz, cut, flips):
    data = bytearray(_NII[gz])
    for i, x in flips:
        data[i % len(data)] ^= x
    data = bytes(data[: len(data) - (cut % (len(data) + 1))]) if cut % 3 else bytes(data)
    try:
        array, affine = _read_nifti_bytes(data, gz)
    except ValueError as exc:
        assert "\n" not in str(exc)
        return
    assert array.ndim == 3 and 0 < array.size <= MAX_VOXELS
    assert np.isfinite(affine).all() and abs(np.linalg.det(affine[:3, :3])) > 1e-9


def _format_readers():
    """Readers of SynthBrain's own binary formats: ``(name, read(bytes), valid example or None)``.

    The codec's ``.sbz`` header reader joins when ``synth.codec`` exists; a new format adds itself here.
    """
    readers = [("nifti", lambda b: _read_nifti_bytes(b, False), _NII[False])]
    try:
        from synth import codec
    except Exception:  # noqa: BLE001 - not written yet, or its optional dependencies are missing
        return readers
    if hasattr(codec, "read_header"):
        readers.append(("sbz", lambda b: codec.read_header(b, "fuzz"), getattr(codec, "MAGIC", b"") + bytes(60)))
    return readers


@pytest.mark.parametrize("name, read, example", _format_readers(), ids=lambda v: v if isinstance(v, str) else "")
@FAST
@given(data=st.binary(max_size=400), prefix=st.booleans())
def test_format_readers_only_raise_value_error(name, read, example, data, prefix):
    blob = (example[: len(example) // 2] + data) if prefix and example else data
    try:
        read(blob)
    except ValueError as exc:
        assert str(exc) and "\n" not in str(exc).strip()


# -- a true zero background ---------------------------------------------------------------------------
def test_zero_background_keeps_the_brain_and_its_ventricles_and_zeroes_the_haze():
    from synth.brain import brain_mask, zero_background

    rng = np.random.default_rng(0)
    shape = (48, 56, 48)
    ijk = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"), -1)
    centre = np.asarray(shape) / 2
    r = np.linalg.norm((ijk - centre) / [18, 22, 18], axis=-1)
    brain = r <= 1.0
    ventricle = np.linalg.norm((ijk - centre) / [4, 8, 4], axis=-1) <= 1.0  # dark CSF inside the brain
    blob = np.linalg.norm(ijk - [4, 4, 4], axis=-1) <= 2.5  # a bright speck outside, not connected
    image = rng.uniform(0.0, 0.06, shape).astype(np.float32)  # the decoder's faint haze: every voxel > 0
    image[brain] = rng.uniform(0.35, 0.95, int(brain.sum()))
    image[ventricle] = rng.uniform(0.02, 0.08, int(ventricle.sum()))  # darker than some of the haze
    image[blob] = 0.9
    assert (image > 0).mean() == 1.0

    mask = brain_mask(image)
    assert np.array_equal(mask, brain)  # ventricle kept (hole filled), haze and speck dropped
    out = zero_background(image)
    assert out.dtype == image.dtype and out.shape == image.shape
    assert np.array_equal(out > 0, brain) and np.array_equal(out[brain], image[brain])
    assert (out[~brain] == 0).all()
    # Nothing to find: all zero stays all zero; bad input is refused.
    assert not brain_mask(np.zeros(shape, np.float32)).any()
    with pytest.raises(ValueError, match=r"3D \(X, Y, Z\)"):
        brain_mask(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="within \\(0, 1\\)"):
        brain_mask(image, threshold=1.5)


# -- the dependency audit -----------------------------------------------------------------------------
FAKE_PIP_AUDIT = """#!/usr/bin/env python3
import json, sys
args = sys.argv[1:]
out = args[args.index("-o") + 1]
ignored = [args[i + 1] for i, a in enumerate(args) if a == "--ignore-vuln"]
mode = "{mode}"
if mode == "offline":
    sys.stderr.write("requests.exceptions.ConnectionError: Max retries exceeded (Name or service not known)\\n")
    sys.exit(1)
if mode == "unknown":
    deps = [{{"name": "numpy", "version": "2.0.0", "skip_reason": "Dependency not found on PyPI"}}]
else:
    vulns = [v for v in [{{"id": "PYSEC-0000-1", "fix_versions": ["9.9"], "aliases": [], "description": "x"}}] if v["id"] not in ignored]
    deps = [{{"name": "numpy", "version": "2.0.0", "vulns": vulns}}, {{"name": "scipy", "version": "1.0", "vulns": []}}]
json.dump({{"dependencies": deps, "fixes": []}}, open(out, "w"))
sys.exit(1 if any(d.get("vulns") for d in deps) else 0)
"""


@pytest.mark.parametrize("mode, allow, code, line", [
    ("offline", "", 0, "pip-audit: SKIPPED - no vulnerability service reachable"),
    ("unknown", "", 0, "pip-audit: SKIPPED - the vulnerability service knew none"),
    ("finding", "", 1, "pip-audit: numpy 2.0.0: PYSEC-0000-1 (fixed in 9.9)"),
    ("finding", "PYSEC-0000-1  not reachable from SynthBrain (test)\n", 0, "2 packages audited (0 could not be), 0 known"),
    ("finding", "PYSEC-0000-1\n", 1, "lists PYSEC-0000-1 without a reason"),
])
def test_dependency_audit_fails_on_findings_and_skips_clearly_offline(tmp_path, mode, allow, code, line):
    fake = tmp_path / "pip-audit"
    fake.write_text(FAKE_PIP_AUDIT.format(mode=mode))
    fake.chmod(0o755)
    allow_file = tmp_path / "allow.txt"
    allow_file.write_text("# id  reason\n" + allow)
    env = {**os.environ, "PIP_AUDIT": str(fake), "SYNTHBRAIN_AUDIT_ALLOWLIST": str(allow_file)}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "audit.sh")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == code, r.stdout + r.stderr
    assert line in r.stdout + r.stderr
