"""The viewer's Streamlit-free helpers: slice rendering, difference maps, PNG/GIF, requests, queue, exports."""

from __future__ import annotations

import io
import os
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import synth  # noqa: E402
from synth.testing import add_fast_preset, make_tiny_model  # noqa: E402
from viewer import render, service  # noqa: E402


def _volume():
    x, y, z = np.meshgrid(np.arange(8), np.arange(10), np.arange(6), indexing="ij")
    return (x * 100 + y * 10 + z).astype(np.float32)  # value encodes the voxel


# -- slices -----------------------------------------------------------------------------------
def test_axial_slice_is_anterior_up_right_on_the_right():
    v = _volume()
    s = render.take_slice(v, "axial", 2)
    assert s.shape == (10, 8)  # rows: y (anterior first), cols: x
    assert s[0, 0] == v[0, 9, 2] and s[-1, -1] == v[7, 0, 2]


def test_coronal_and_sagittal_are_superior_up():
    v = _volume()
    c = render.take_slice(v, "coronal", 4)
    assert c.shape == (6, 8) and c[0, 0] == v[0, 4, 5]
    s = render.take_slice(v, "sagittal", 3)
    assert s.shape == (6, 10) and s[0, -1] == v[3, 9, 5]


@pytest.mark.parametrize("plane", list(render.PLANES))
def test_crosshair_marks_the_cursor_voxel(plane):
    v = _volume()
    pos = (5, 7, 1)
    r, c = render.crosshair_rc(v.shape, plane, pos)
    assert render.take_slice(v, plane, pos[render.PLANES[plane]])[r, c] == v[pos]


def test_render_slice_shape_window_and_crosshair():
    v = np.zeros((8, 10, 6), np.float32)
    v[2, 3, 4] = 0.5
    rgb = render.render_slice(v, "axial", (2, 3, 4), window=(0, 0.5), zoom=2, crosshair=False)
    assert rgb.shape == (20, 16, 3) and rgb.dtype == np.uint8
    r, c = render.crosshair_rc(v.shape, "axial", (2, 3, 4))
    assert (rgb[2 * r, 2 * c] == 255).all() and rgb.sum() == 255 * 3 * 4
    with_cross = render.render_slice(v, "axial", (2, 3, 4), zoom=2, crosshair_rgb=(1, 2, 3))
    assert (with_cross[2 * r + 1, 0] == (1, 2, 3)).all()


def test_label_overlay_blends_the_label_colour():
    v = np.zeros((4, 4, 4), np.float32)
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[1, 1, 1] = 3
    lut = render.label_lut({3: (1.0, 0.0, 0.0)})
    rgb = render.render_slice(v, "axial", (1, 1, 1), labels=lab, lut=lut, opacity=1.0, zoom=1, crosshair=False)
    r, c = render.crosshair_rc(v.shape, "axial", (1, 1, 1))
    assert tuple(rgb[r, c]) == (255, 0, 0) and rgb.sum() == 255


def test_label_lut_accepts_structures():
    anat = pytest.importorskip("synth.anatomy")
    lut = render.label_lut(anat.STRUCTURES)
    s = anat.STRUCTURES[0]
    assert tuple(lut[s.label]) == tuple(s.rgb) and tuple(lut[0]) == (0, 0, 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"window": (1, 0)}, "low < high"),
        ({"window": "ab"}, "two numbers"),
        ({"opacity": 2}, "opacity"),
        ({"zoom": 0}, "zoom"),
        ({"labels": np.zeros((2, 2, 2), np.uint8), "lut": np.zeros((256, 3), np.uint8)}, "shape"),
        ({"labels": np.zeros((4, 4, 4), np.uint8)}, "lut"),
    ],
)
def test_render_slice_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        render.render_slice(np.zeros((4, 4, 4)), "axial", (1, 1, 1), **kwargs)


def test_bad_plane_and_index_raise():
    with pytest.raises(ValueError, match="plane"):
        render.take_slice(np.zeros((4, 4, 4)), "oblique", 1)
    with pytest.raises(ValueError, match="0-3"):
        render.take_slice(np.zeros((4, 4, 4)), "axial", 4)


def test_redraw_of_three_planes_is_fast():
    rng = np.random.default_rng(0)
    image = rng.random((80, 96, 80), dtype=np.float32)
    labels = rng.integers(0, 31, (80, 96, 80)).astype(np.uint8)
    lut = render.label_lut({i: (i * 8, 255 - i * 8, 128) for i in range(1, 31)})
    render.orthogonal_views(image, (40, 48, 40), labels=labels, lut=lut)
    t = time.perf_counter()
    for _ in range(5):
        render.orthogonal_views(image, (40, 48, 40), labels=labels, lut=lut, window=(0.1, 0.9))
    assert (time.perf_counter() - t) / 5 < 0.1  # the issue asks <= 100 ms; ~2 ms here


def test_difference_map_sign_and_scale():
    a = np.zeros((2, 3), np.float32)
    b = a.copy()
    b[0, 0], b[1, 2] = 1.0, -1.0
    rgb, vmax = render.difference_map(a, b, vmax=1.0)
    assert vmax == 1.0 and rgb.shape == (2, 3, 3)
    assert rgb[0, 0, 0] > rgb[0, 0, 2]  # b higher: red
    assert rgb[1, 2, 2] > rgb[1, 2, 0]  # b lower: blue
    assert abs(int(rgb[0, 1, 0]) - int(rgb[0, 1, 2])) < 10  # equal: near white
    with pytest.raises(ValueError, match="shapes"):
        render.difference_map(a, np.zeros((3, 3)))


def test_png_carries_the_notice():
    from PIL import Image

    data = render.png_bytes(render.stamp(np.zeros((40, 260, 3), np.uint8)), {"Description": synth.SYNTHETIC_NOTICE})
    im = Image.open(io.BytesIO(data))
    assert im.text["Description"] == synth.SYNTHETIC_NOTICE
    assert np.asarray(im).any()  # the burnt-in label


def test_gif_has_every_frame_and_loops():
    import imageio.v3 as iio

    frames = [np.full((8, 8, 3), v, np.uint8) for v in (0, 120, 240)]
    data = render.gif_bytes(frames, fps=5)
    assert data[:6] == b"GIF89a"
    assert iio.imread(data, index=None).shape[0] == 3
    with pytest.raises(ValueError, match="same shape"):
        render.gif_bytes([frames[0], np.zeros((4, 4, 3), np.uint8)])
    with pytest.raises(ValueError, match="empty"):
        render.gif_bytes([])


def test_montage_pads_to_the_tallest():
    m = render.montage([np.ones((4, 3, 3), np.uint8), np.ones((2, 5, 3), np.uint8)], gap=1)
    assert m.shape == (4, 9, 3)


# -- requests, models, queue ------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_tiny_model(root / "tiny-test-model")
    return root


def _parse(**kw):
    args = dict(model="m", age=60, sex="F", diagnosis="CN", seed=1, models=["m"])
    args.update(kw)
    return service.parse_request(**args)


def test_parse_request_is_a_hashable_cache_key():
    r = _parse(volumes={"hippocampus": 0.005}, steps=10, guidance=2)
    # standard: the model's default sampling; False: no volume matching; None: the model's refiner default
    # and precision auto
    assert r.key() == ("m", 60.0, "F", "CN", (("hippocampus", 0.005),), 1, 10, 2.0, "standard", False, None, None)
    hash(r.key())
    matched = _parse(match_volumes=True)
    assert matched.key()[-3] is True and matched.with_condition(age=70).match_volumes is True
    with pytest.raises(TypeError, match="`match_volumes` must be True or False"):
        _parse(match_volumes="yes")


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"model": "other"}, "`model` must be one of m"),
        ({"models": []}, "no model found"),
        ({"seed": -1}, "`seed`"),
        ({"seed": 1.5}, "`seed`"),
        ({"seed": True}, "`seed`"),
        ({"steps": 0}, "`steps`"),
        ({"steps": 2.5}, "`steps`"),
        ({"guidance": 30}, "guidance"),
        ({"guidance": "x"}, "guidance"),
        ({"age": 120}, "`age` must be within 18-95"),
        ({"diagnosis": "PD"}, "`diagnosis`"),
        ({"volumes": {"hippocampus": 0.5}}, "hippocampus"),
        ({"speed": "turbo"}, r"`speed` must be one of fast, standard, got 'turbo'"),
        ({"speed": True}, "`speed` must be one of fast, standard"),
        ({"speed": 8}, "`speed` must be one of fast, standard"),
    ],
)
def test_parse_request_explains_bad_values(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _parse(**kw)


def test_parse_request_reports_extrapolation():
    assert any("training ages" in w for w in _parse(age=90).warnings)
    assert _parse(age=60).warnings == ()


def test_with_condition_changes_one_field():
    r = _parse(volumes={"hippocampus": 0.005})
    r2 = r.with_condition(age=80, volumes={})
    assert (r2.condition.age, r2.condition.volumes, r2.seed, r2.model) == (80.0, {}, 1, "m")


def test_speed_is_part_of_the_request_and_its_key():
    assert _parse().speed == "standard"  # as the library: the model's default sampling
    fast = _parse(speed=" Fast ")
    assert fast.speed == "fast" and fast.key() != _parse(speed="standard").key()
    assert fast.with_condition(age=70).speed == "fast"  # compare and age-sweep brains keep the speed


def test_default_model_prefers_the_shipped_one():
    assert service.default_model(["a", synth.DEFAULT_MODEL]) == synth.DEFAULT_MODEL
    assert service.default_model(["b", "a"]) == "b"
    assert service.default_model([]) is None


def test_generator_models_skip_non_generators(models, monkeypatch, tmp_path):
    monkeypatch.setenv("SYNTHBRAIN_MODELS", str(models))
    (models / "some-segmenter").mkdir(exist_ok=True)
    (models / "some-segmenter" / "config.json").write_text("{}")
    assert service.generator_models() == ["tiny-test-model"]


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    """A models folder with an LDM that has a fast preset, an LDM without one, a VQ model and a segmenter-like folder."""
    from synth.vq.testing import make_tiny_vq_model

    root = tmp_path_factory.mktemp("backends")
    add_fast_preset(make_tiny_model(root / "tiny-fast-model"))
    make_tiny_model(root / "tiny-test-model")
    make_tiny_vq_model(root / "tiny-vq-model")
    (root / "some-segmenter").mkdir()
    (root / "some-segmenter" / "config.json").write_text("{}")
    return root


def test_model_choices_cover_every_backend_with_their_options(backends, monkeypatch):
    monkeypatch.setenv("SYNTHBRAIN_MODELS", str(backends))
    assert service.generator_models() == ["tiny-fast-model", "tiny-test-model", "tiny-vq-model"]
    choices = service.model_choices()
    fast, plain, vq = (choices[m] for m in ("tiny-fast-model", "tiny-test-model", "tiny-vq-model"))
    assert (fast.label, vq.label) == ("tiny-fast-model · latent diffusion", "tiny-vq-model · VQ-VAE + transformer")
    assert fast.options == {"steps", "guidance", "precision", "speed"} and fast.has_fast
    assert plain.options == {"steps", "guidance", "precision"} and not plain.has_fast
    assert vq.options == {"guidance"} and not vq.has_fast
    assert fast.sampling_plan("fast") == "DPM-Solver++(2M), 2 steps"
    assert fast.sampling_plan("standard") == "DDIM, 3 steps"
    assert fast.sampling_plan("fast", 5) == "DPM-Solver++(2M), 5 steps (from Sampling steps; this Speed alone runs 2)"
    assert plain.sampling_plan("fast") == "DDIM, 3 steps"  # no preset: nothing to switch to
    assert vq.sampling_plan("standard", 5) == "autoregressive over the code grid"


def _run(root: Path, model: str, **kw) -> service.Generated:
    gen = synth.load_generator(root / model, device="cpu")
    request = service.parse_request(model=model, age=70, sex="F", diagnosis="AD", seed=3, models=[model], **kw)
    return service.run_generation(gen, request)


def test_speed_reaches_the_sampler_and_the_provenance(backends):
    import json

    fast, standard = _run(backends, "tiny-fast-model", speed="fast"), _run(backends, "tiny-fast-model", speed="standard")
    pf, ps = fast.brain.provenance, standard.brain.provenance
    assert (pf["sampler"], pf["steps"], pf["sampling_preset"]) == ("DPM-Solver++(2M)", 2, "fast")
    assert (ps["sampler"], ps["steps"], ps["sampling_preset"]) == ("DDIM", 3, "standard")
    assert not np.array_equal(fast.brain.image, standard.brain.image)
    assert service.sampling_caption(pf) == "Fast preview · DPM-Solver++(2M), 2 steps · fp32 precision"
    # explicit steps replace the preset's count and keep its sampler, as the sidebar says
    more = _run(backends, "tiny-fast-model", speed="fast", steps=4).brain.provenance
    assert (more["sampler"], more["steps"]) == ("DPM-Solver++(2M)", 4)
    # the downloaded provenance names the preset
    meta = json.loads(service.export_files(fast.brain, ["json"])["json"][1])
    assert (meta["sampling_preset"], meta["sampler"], meta["steps"]) == ("fast", "DPM-Solver++(2M)", 2)


def test_options_a_model_does_not_have_are_refused_not_ignored(backends):
    with pytest.raises(ValueError, match=re.escape("'tiny-test-model' (latent diffusion) has no fast sampling preset: choose Standard")):
        _run(backends, "tiny-test-model", speed="fast")
    with pytest.raises(ValueError, match=re.escape("'tiny-vq-model' (VQ-VAE + transformer) has no sampling steps")):
        _run(backends, "tiny-vq-model", steps=10)
    with pytest.raises(ValueError, match="has no precision option: leave precision on auto"):
        _run(backends, "tiny-vq-model", precision="fp32")
    with pytest.raises(ValueError, match="has no fast sampling preset"):
        _run(backends, "tiny-vq-model", speed="fast")


def test_the_vq_model_generates_through_the_service(backends):
    result = _run(backends, "tiny-vq-model", guidance=1.5)
    brain = result.brain
    assert brain.image.shape == (16, 16, 16) and brain.seed == 3
    assert brain.provenance["backend"] == "vq" and brain.provenance["guidance_scale"] == 1.5
    assert "sampling_preset" not in brain.provenance  # no preset to name
    assert service.sampling_caption(brain.provenance).startswith("autoregressive")


def test_device_queue_runs_one_generation_at_a_time():
    q = service.DeviceQueue()
    active, peak, seen = [0], [0], []

    def work():
        with q.slot("cpu") as ahead:
            seen.append(ahead)
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            time.sleep(0.05)
            active[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 1 and q.waiting("cpu") == 0 and max(seen) >= 1


def test_device_queue_times_out():
    q = service.DeviceQueue()
    with q.slot("cuda"):
        with pytest.raises(TimeoutError, match="busy"):
            with q.slot("cuda", timeout=0.01):
                pass
    assert q.waiting("cuda") == 0


# -- generation, morphometry, exports ---------------------------------------------------------
@pytest.fixture(scope="module")
def generated(models):
    gen = synth.load_generator(models / "tiny-test-model", device="cpu")
    req = service.parse_request(model="tiny-test-model", age=70, sex="F", diagnosis="AD", seed=3, models=["tiny-test-model"])
    steps = []
    return gen, service.run_generation(gen, req, progress=lambda i, n: steps.append((i, n))), steps


def test_run_generation_reports_progress(generated):
    gen, result, steps = generated
    assert steps[-1] == (3, 3)
    assert result.brain.seed == 3 and result.labels is None and result.seconds["generate"] > 0


def test_run_generation_keeps_the_brain_when_segmentation_fails(generated):
    gen, _, _ = generated

    class Broken:
        def segment(self, image):
            raise ValueError("wrong grid")

    req = service.parse_request(model="t", age=60, sex="M", diagnosis="CN", seed=0, models=["t"])
    out = service.run_generation(gen, req, segmenter=Broken())
    assert out.labels is None and "wrong grid" in out.note and out.brain.image.shape == (32, 32, 32)


def test_morphometry_rows_and_curves(generated):
    gen, result, _ = generated
    rows = service.morphometry_rows(result.brain, gen.normative)
    assert [r["volume"] for r in rows] == list(synth.VOLUME_KEYS)
    hip = rows[synth.VOLUME_KEYS.index("hippocampus")]
    assert hip["requested"] == pytest.approx(hip["expected"] * synth.DISEASE_EFFECTS["AD"]["hippocampus"])
    assert hip["low"] < hip["expected"] < hip["high"] and hip["measured"] is None
    curves = service.normative_curves(gen.normative, "F", ages=[20, 50, 80])
    assert curves["brain"]["expected"].shape == (3,)
    fig = service.morphometry_figure(rows, curves, 70, "F")
    assert len(fig.axes) == len(synth.VOLUME_KEYS)


def test_morphometry_rows_measure_labels(generated):
    anat = pytest.importorskip("synth.anatomy")
    gen, result, _ = generated
    labels = np.zeros(result.brain.image.shape, np.uint8)
    labels[4:28, 4:28, 4:28] = 3  # white matter
    labels[10:12, 10:12, 10:12] = 10  # a left hippocampus of 8 voxels
    rows = {r["volume"]: r for r in service.morphometry_rows(result.brain, gen.normative, labels)}
    assert rows["hippocampus"]["measured"] == pytest.approx(8 / 24**3)
    assert rows["hippocampus"]["z"] is not None
    assert any(r["structure"] == "Left-Hippocampus" and r["mm3"] == 64 for r in service.structure_rows(labels, 8.0))
    del anat


def test_export_nifti_and_json_say_synthetic(generated, tmp_path):
    import json

    import nibabel as nib

    _, result, _ = generated
    files = service.export_files(result.brain, ["nifti", "json"])
    name, data, mime = files["nifti"]
    assert name.endswith("_T1w.nii.gz") and mime == "application/gzip"
    (tmp_path / name).write_bytes(data)
    img = nib.load(tmp_path / name)
    assert img.shape == (32, 32, 32) and b"SYNTHETIC" in img.header["descrip"].tobytes()
    meta = json.loads(files["json"][1])
    assert meta["synthetic"] is True and meta["seed"] == 3 and "NOT FOR CLINICAL USE" in meta["notice"]


def test_export_rejects_unknown_or_unbacked_formats(generated):
    _, result, _ = generated
    with pytest.raises(ValueError, match="supported"):
        service.export_files(result.brain, ["tiff"])
    if service.anatomy() is not None:
        with pytest.raises(ValueError, match="segmentation"):
            service.export_files(result.brain, ["labels"])


def test_export_labels_and_surfaces_say_synthetic(generated, tmp_path):
    anat = pytest.importorskip("synth.anatomy")
    from synth.anatomy.testing import phantom

    import nibabel as nib
    import trimesh

    _, result, _ = generated
    _, labels = phantom(result.brain.image.shape)
    meshes = service.brain_meshes(labels, result.brain.affine)
    assert set(meshes) == {"CSF", "Brain-Stem", "Corpus-Callosum"}
    files = service.export_files(result.brain, ["labels", "usd", "usdz", "stl", "glb"], labels=labels, meshes=meshes)
    paths = {}
    for fmt, (name, data, _) in files.items():
        paths[fmt] = tmp_path / name
        paths[fmt].write_bytes(data)
    lab = nib.load(paths["labels"])
    assert b"SYNTHETIC" in lab.header["descrip"].tobytes() and np.array_equal(np.asarray(lab.dataobj), labels)
    assert paths["usd"].suffix == ".usdc" and paths["usdz"].suffix == ".usdz"
    assert anat.validate_usd(paths["usdz"]) == []
    from pxr import Usd

    stage = Usd.Stage.Open(str(paths["usd"]))
    assert "NOT FOR CLINICAL USE" in str(stage.GetDefaultPrim().GetCustomData())
    assert len(trimesh.load(paths["stl"]).faces) > 0
    assert len(trimesh.load(paths["glb"]).geometry) == 3
    with pytest.raises(ValueError, match="mesh"):
        service.export_files(result.brain, ["stl"], labels=labels)


def test_brain_meshes_of_an_empty_map_explain():
    pytest.importorskip("synth.anatomy")
    with pytest.raises(ValueError, match="empty"):
        service.brain_meshes(np.zeros((4, 4, 4), np.uint8), np.eye(4))


def test_no_wasm_download_points_vtklocal_at_an_existing_empty_folder(monkeypatch):
    from viewer import scene

    monkeypatch.delenv("VTK_WASM_DIR_OVERRIDE", raising=False)
    folder = scene.no_wasm_download()
    assert os.path.isdir(folder) and os.environ["VTK_WASM_DIR_OVERRIDE"] == folder
    assert scene.no_wasm_download() == folder  # kept, not a new folder per render


def test_export_label_tables_and_target_check_in_the_json(generated):
    import json

    _, result, _ = generated
    checks = [{"volume": "hippocampus", "requested": 0.005, "measured": 0.004, "gap_pct": -20.0, "missed": True}]
    files = service.export_files(result.brain, ["json", "dseg", "lut", "ctbl"], target_checks=checks)
    doc = json.loads(files["json"][1])
    assert doc["target_check"] == checks
    assert files["dseg"][0].endswith("_dseg.tsv") and files["dseg"][1].startswith(b"index\tname")
    assert files["lut"][0].endswith("_LUT.txt") and b"Left-Hippocampus" in files["lut"][1]
    assert files["ctbl"][0].endswith(".ctbl") and b"NOT FOR CLINICAL USE" in files["ctbl"][1].upper()


def test_device_queue_serves_in_arrival_order_and_tells_each_its_place():
    q = service.DeviceQueue()
    order, told = [], {}
    gate = threading.Event()

    def first():
        with q.slot("cpu"):
            gate.wait(5)
            order.append(0)

    def later(i):
        with q.slot("cpu", on_wait=lambda ahead: told.setdefault(i, []).append(ahead)):
            order.append(i)
            time.sleep(0.2)  # a generation takes a while: those behind see their place move up

    threads = [threading.Thread(target=first)]
    threads[0].start()
    while q.waiting("cpu") < 1:
        time.sleep(0.001)
    for i in (1, 2, 3):
        t = threading.Thread(target=later, args=(i,))
        t.start()
        threads.append(t)
        while q.waiting("cpu") < i + 1:  # queued in this order
            time.sleep(0.001)
    time.sleep(0.1)
    gate.set()
    for t in threads:
        t.join(5)
    assert order == [0, 1, 2, 3]
    assert told[1][0] == 1 and told[2][0] == 2 and told[3][0] == 3  # places when they queued
    assert told[3] == [3, 2, 1]  # moving up to "next"
    assert q.waiting("cpu") == 0
