"""The Streamlit viewer, run headlessly with ``streamlit.testing.v1.AppTest`` on the tiny model."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from synth import Grid  # noqa: E402
from synth.testing import add_fast_preset, make_tiny_model  # noqa: E402

APP = str(ROOT / "viewer" / "app.py")
TIMEOUT = 180


TINY_GRID = Grid((32, 32, 32), 2.0, (-31.0, -31.0, -31.0))  # synth.testing.tiny_config's grid


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from synth.vq.testing import make_tiny_vq_model

    root = tmp_path_factory.mktemp("models")
    add_fast_preset(make_tiny_model(root / "tiny-test-model"))  # the default model: DDIM 3 steps, fast DPM 2
    make_tiny_vq_model(root / "tiny-vq-model", shape=tuple(TINY_GRID.shape))  # the second backend, on the segmenter's grid
    anatomy = pytest.importorskip("synth.anatomy.testing")
    anatomy.make_tiny_segmenter(root / "tiny-test-segmenter", TINY_GRID, steps=5)
    return root


@pytest.fixture
def app(models_dir, monkeypatch):
    monkeypatch.setenv("SYNTHBRAIN_MODELS", str(models_dir))
    monkeypatch.setenv("SYNTHBRAIN_SEGMENTER", "tiny-test-segmenter")
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, at.exception
    return at


def _generate(at, **values):
    for key, value in values.items():
        _widget(at, key).set_value(value)
    at.sidebar.button(key="generate").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _widget(at, key):
    for kind in ("slider", "radio", "number_input", "toggle", "selectbox"):
        for w in at.get(kind):
            if getattr(w, "key", None) == key:
                return w
    raise KeyError(key)


def _errors(at) -> list[str]:
    return [e.value for e in at.error]


def _open_tab(at, label: str):
    at.session_state["tab"] = label
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_page_shows_notice_controls_and_no_brain_yet(app):
    assert any("not for clinical use" in w.value for w in app.warning)
    assert any("morphometry" in c.value for c in app.caption)
    for key in ("age", "sex", "diagnosis", "seed", "model", "use_targets", "steps", "guidance"):
        _widget(app, key)
    assert app.sidebar.button(key="generate")
    assert app.sidebar.button(key="new_seed")
    assert app.session_state["model"] == "tiny-test-model"
    assert any("Generate" in i.value for i in app.info)
    assert not app.get("image")


def _niivue(at):
    return [e for e in at.get("component_instance") if getattr(e, "key", None) == "niivue" or "niivue" in str(e.proto)[:400]]


def test_generate_shows_the_brain_in_niivue(app):
    import gzip

    import nibabel as nib

    _generate(app, age=70.0, sex="M", diagnosis="AD", seed=5)
    assert not _errors(app)
    assert _niivue(app), "the NiiVue viewer is not on the page"
    brain = app.session_state["result"].brain
    assert (brain.condition.age, brain.condition.sex, brain.condition.diagnosis, brain.seed) == (70.0, "M", "AD", 5)
    assert brain.image.shape == (32, 32, 32)
    labels = app.session_state["result"].labels
    assert labels is not None and labels.shape == brain.image.shape  # segmented by the tiny segmenter
    assert _widget(app, "overlay").value is True
    assert any("age 70, M, AD, seed 5" in m.value for m in app.markdown)
    sent = app.session_state["nv_data"]  # what the browser gets: the T1 and the painted labels
    t1 = nib.Nifti1Image.from_bytes(gzip.decompress(sent["t1"]))
    np.testing.assert_allclose(np.asarray(t1.dataobj, np.float32) * 0 + t1.get_fdata(), brain.image, atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(t1.affine, brain.affine)
    overlay = nib.Nifti1Image.from_bytes(gzip.decompress(sent["labels"]))
    assert overlay.shape == brain.image.shape and overlay.get_data_dtype().names == ("R", "G", "B", "A")
    assert any("Crosshair: voxel (16, 16, 16)" in m.value for m in app.markdown)


def test_a_click_in_niivue_moves_the_cursor_and_names_the_structure(app):
    from synth.anatomy import STRUCTURES

    _generate(app, seed=1)
    labels = app.session_state["result"].labels
    x, y, z = (int(v[0]) for v in np.nonzero(labels))  # a labelled voxel
    app.session_state["niivue"] = {"type": "voxel_click", "voxel": [x, y, z], "mm": [0, 0, 0], "value": 0.5}
    app.run()
    assert not app.exception
    assert app.session_state["cursor"] == [x, y, z]
    name = {s.label: s.name for s in STRUCTURES}[int(labels[x, y, z])]
    assert any(f"Crosshair: voxel ({x}, {y}, {z})" in m.value and name in m.value for m in app.markdown)


def test_the_legend_lists_the_structures_present(app):
    _generate(app, seed=1)
    legend = [h.proto.body for h in app.get("html") if "label-legend" in h.proto.body]
    assert legend
    present = set(np.unique(app.session_state["result"].labels)) - {0}
    assert legend[0].count("background:#") == len(present)


def test_changed_controls_mark_the_brain_out_of_date(app):
    _generate(app, seed=3)
    assert not any("Out of date" in w.value for w in app.warning)
    _widget(app, "age").set_value(71.0)
    app.run()
    assert any("Out of date" in w.value for w in app.warning)
    app.sidebar.button(key="generate").click()
    app.run()
    assert not any("Out of date" in w.value for w in app.warning)


def test_same_request_hits_the_cache(app):
    _generate(app, seed=11)
    first = app.session_state["result"]
    again = AppTest.from_file(APP, default_timeout=TIMEOUT)  # a second session
    again.run()
    _generate(again, seed=11)
    second = again.session_state["result"]
    # A cache hit: same pixels and the same creation time (a recomputation would stamp a new one).
    np.testing.assert_array_equal(first.brain.image, second.brain.image)
    assert first.brain.provenance["created"] == second.brain.provenance["created"]
    _generate(again, seed=12)
    assert not np.array_equal(again.session_state["result"].brain.image, first.brain.image)


def test_new_seed_button_draws_a_seed(app):
    before = app.session_state["seed"]
    app.sidebar.button(key="new_seed").click()
    app.run()
    assert app.session_state["seed"] != before


def test_bad_volume_target_shows_an_error_not_a_traceback(app):
    _widget(app, "use_targets").set_value(True)
    app.run()
    _widget(app, "vol_hippocampus").set_value(0.5)
    _generate(app)
    errors = _errors(app)
    assert errors and "hippocampus" in errors[0] and "0.001-0.012" in errors[0]
    assert "result" not in app.session_state


def test_explicit_targets_reach_the_brain(app):
    _widget(app, "use_targets").set_value(True)
    app.run()
    assert app.session_state["vol_hippocampus"] > 0  # filled from the condition
    _widget(app, "vol_hippocampus").set_value(0.004)
    _generate(app)
    assert not _errors(app)
    assert app.session_state["result"].brain.targets["hippocampus"] == pytest.approx(0.004)


def test_age_outside_training_range_warns(app):
    _generate(app, age=90.0)
    assert any("outside the training ages" in w.value for w in app.warning)
    assert _niivue(app)


def test_no_model_shows_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHBRAIN_MODELS", str(tmp_path))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    assert not at.exception
    assert any("No model found" in e for e in _errors(at))


@pytest.mark.parametrize("tab", ["3D", "Morphometry", "Downloads"])
def test_tabs_draw_without_errors(app, tab):
    _generate(app, seed=2)
    _open_tab(app, tab)
    assert not _errors(app)
    opened = [t for t in app.tabs if t.label == tab][0]
    assert opened.children


def test_downloads_offer_every_format(app):
    _generate(app, seed=2)
    _open_tab(app, "Downloads")
    buttons = {b.key: b for b in app.get("download_button")}
    assert {"dl_nifti", "dl_json", "dl_png", "dl_labels", "dl_dseg", "dl_lut", "dl_ctbl", "dl_usd", "dl_usdz", "dl_stl", "dl_glb"} <= set(buttons)
    assert not any(b.disabled for b in buttons.values())


def test_3d_shows_structures_when_labelled(app):
    _generate(app, seed=2)
    _open_tab(app, "3D")
    assert _widget(app, "view3d_mode").options == ["Structures", "Isosurface", "Volume rendering"]
    shown = app.multiselect(key="visible_structures_Deep grey + ventricles").value  # the default preset
    assert shown and "CSF" not in shown and not any("Cortex" in n for n in shown)
    _widget(app, "view3d_mode").set_value("Volume rendering")
    app.run()
    assert not app.exception and not _errors(app)
    assert len(app.get("image")) == 1  # the server-side volume rendering


def test_morphometry_measures_the_labels(app):
    _generate(app, seed=2)
    _open_tab(app, "Morphometry")
    assert not _errors(app)
    table = app.dataframe[0].value
    assert list(table["volume"]) == [k.replace("_", " ") for k in ("brain", "gm", "wm", "lateral_ventricles", "hippocampus")]
    assert table["measured %ICV"].notna().any()


def test_compare_shows_both_brains_and_the_difference(app):
    _generate(app, seed=4)
    _open_tab(app, "Compare")
    app.button(key="compare_go").click()
    app.run()
    assert not app.exception and not _errors(app)
    ra, rb, ga, gb = app.session_state["compare"]
    assert (ra.condition.age, rb.condition.age) == (50.0, 80.0)
    assert ra.seed == rb.seed == 4
    assert len(app.get("image")) == 4  # A, B, the difference map and its colour bar


def test_age_sweep_makes_a_gif(app):
    _generate(app, seed=6)
    _open_tab(app, "Age sweep")
    _widget(app, "sweep_frames").set_value(3)
    app.button(key="sweep_go").click()
    app.run()
    assert not app.exception and not _errors(app)
    gif, name = app.session_state["sweep"]
    assert gif[:6] == b"GIF89a" and name.endswith(".gif")
    assert [b.key for b in app.get("download_button")] == ["dl_gif"]


def test_a_failing_panel_shows_an_error_not_a_traceback(app, monkeypatch):
    from viewer import niivue

    _generate(app, seed=7)

    def broken(*args, **kwargs):
        raise KeyError("simulated bug")

    monkeypatch.setattr(niivue, "readout", broken)
    app.session_state["niivue"] = {"type": "voxel_click", "voxel": [2, 2, 2], "mm": [0, 0, 0], "value": 0.1}
    app.run()
    assert not app.exception
    assert any("Something went wrong" in e and "simulated bug" in e for e in _errors(app))


def _deferred_downloads(app, monkeypatch) -> dict:
    """Run the Downloads tab and capture each deferred download's callable by file name."""
    from streamlit.runtime.media_file_manager import MediaFileManager

    captured = {}
    original = MediaFileManager.add_deferred

    def spy(self, data_callable, mimetype, coordinates, file_name=None, **kwargs):
        captured[file_name] = data_callable
        return original(self, data_callable, mimetype, coordinates, file_name, **kwargs)

    monkeypatch.setattr(MediaFileManager, "add_deferred", spy)
    _open_tab(app, "Downloads")
    return captured


def _call_outside_the_script(fn):
    """Call ``fn`` in a fresh thread, as Streamlit's server does when the user clicks a download."""
    import threading

    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(120)
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_slices_png_download_returns_a_png_outside_the_script_run(app, monkeypatch):
    import io

    from PIL import Image

    _generate(app, seed=2)
    made = _deferred_downloads(app, monkeypatch)
    name = next(n for n in made if n.endswith("_slices.png"))
    app.session_state["result"] = None  # what the callable must not read: the server has no session there
    data = _call_outside_the_script(made[name])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    picture = Image.open(io.BytesIO(data))
    assert picture.width > picture.height > 32 and "NOT FOR CLINICAL USE" in picture.text["Description"].upper()
    assert len(np.unique(np.asarray(picture.convert("L")))) > 10  # a brain, not a blank picture


def _phantom_bytes() -> bytes:
    """A small T1-like head: the MNI152 template brain in a bright skull shell, shifted by 4 mm."""
    import gzip

    import nibabel as nib
    from scipy import ndimage

    from synth.data.register import template_images

    tpl, mask = template_images(TINY_GRID)
    head = tpl.copy()
    head[ndimage.binary_dilation(mask, iterations=3) & ~ndimage.binary_dilation(mask, iterations=1)] = 0.9
    affine = TINY_GRID.affine.copy()
    affine[:3, 3] += (4.0, 0.0, -2.0)
    return gzip.compress(nib.Nifti1Image((head * 300).astype(np.int16), affine).to_bytes())


def test_your_scan_is_prepared_and_shown_beside_a_synthetic_brain(app):
    pytest.importorskip("SimpleITK")
    pytest.importorskip("nilearn")
    _generate(app, seed=8)
    _open_tab(app, "Your scan")
    app.get("file_uploader")[0].upload("my scan.nii.gz", _phantom_bytes())
    app.run()
    assert not app.exception and not _errors(app)
    _widget(app, "scan_age").set_value(60.0)
    app.button(key="scan_go").click()
    app.run()
    assert not app.exception and not _errors(app), _errors(app)
    digest, name, scan, ref, other = app.session_state["scan"]
    assert name == "my scan.nii.gz" and scan.image.shape == (32, 32, 32) and scan.labels is not None
    assert (ref.condition.age, ref.condition.diagnosis) == (60.0, "CN") and other.brain.condition.age == 60.0
    keys = {e.proto.id for e in app.get("component_instance")}
    assert len([e for e in app.get("component_instance")]) >= 2, keys  # your scan and the synthetic brain
    assert any("your scan %ICV" in list(d.value.columns) for d in app.dataframe)


@pytest.mark.parametrize("content, expected", [
    (b"", "empty"),
    (b"not a nifti at all" * 10, "NIfTI"),
])
def test_an_unreadable_scan_gets_a_clear_error(app, content, expected):
    _generate(app, seed=8)
    _open_tab(app, "Your scan")
    app.get("file_uploader")[0].upload("bad.nii", content)
    app.run()
    assert not app.exception
    errors = _errors(app)
    assert errors and "Cannot open bad.nii" in errors[0] and expected in errors[0], errors
    assert "scan" not in app.session_state


def test_server_png_layout_draws_three_planes_and_its_slider_moves_the_cursor(app):
    _generate(app, seed=1)
    _widget(app, "nv_layout").set_value("Server PNG")
    app.run()
    assert not app.exception and not _errors(app)
    assert not _niivue(app)
    frames = [e for e in app.get("iframe") if "hover-readout" in str(e.proto)]
    assert len(frames) == 1 and str(frames[0].proto).count("data:image/png;base64,") == 3  # the three planes
    app.slider(key="slice_z").set_value(3)
    app.run()
    assert app.session_state["cursor"][2] == 3
    assert any("Voxel (16, 16, 3)" in c.value for c in app.caption)


def test_precision_reaches_the_generator(app):
    from viewer import service

    _widget(app, "precision").set_value("fp32")
    _generate(app, seed=9)
    assert not _errors(app)
    assert app.session_state["request"].precision == "fp32"
    brain = app.session_state["result"].brain
    if service.takes_precision(_tiny_generator()):
        assert brain.provenance["precision"] == "fp32"
    _widget(app, "precision").set_value("auto")
    app.run()
    assert any("Out of date" in w.value for w in app.warning)  # auto is another request


def _tiny_generator():
    import os

    import synth

    return synth.load_generator(Path(os.environ["SYNTHBRAIN_MODELS"]) / "tiny-test-model", device="cpu")


def _summary(at) -> str:
    return next(m.value for m in at.markdown if "model `" in m.value)


def test_speed_defaults_to_fast_and_standard_is_one_click_away(app):
    speed = _widget(app, "speed")
    assert speed.value == "fast" and not speed.disabled
    assert "PSNR 33.7" in speed.help and "0.84 vs 0.88" in speed.help  # what each trades
    assert any(c.value == "Sampling: DPM-Solver++(2M), 2 steps" for c in app.sidebar.caption)
    _generate(app, seed=4)
    assert not _errors(app)
    first = app.session_state["request"]
    prov = app.session_state["result"].brain.provenance
    assert first.speed == "fast" and (prov["sampler"], prov["steps"], prov["sampling_preset"]) == ("DPM-Solver++(2M)", 2, "fast")
    assert "Fast preview · DPM-Solver++(2M), 2 steps · fp32 precision" in _summary(app)

    _widget(app, "speed").set_value("standard")
    app.run()
    assert any("Out of date" in w.value for w in app.warning)  # another request
    assert any(c.value == "Sampling: DDIM, 3 steps" for c in app.sidebar.caption)
    app.sidebar.button(key="generate").click()
    app.run()
    assert not any("Out of date" in w.value for w in app.warning)
    second = app.session_state["request"]
    prov = app.session_state["result"].brain.provenance
    assert second.key() != first.key() and second.speed == "standard"
    assert (prov["sampler"], prov["steps"], prov["sampling_preset"]) == ("DDIM", 3, "standard")
    assert "Standard · DDIM, 3 steps" in _summary(app)


def test_sampling_steps_replace_the_speeds_count_and_say_so(app):
    _widget(app, "steps").set_value(4)
    app.run()
    assert any(c.value == "Sampling: DPM-Solver++(2M), 4 steps (from Sampling steps; this Speed alone runs 2)"
               for c in app.sidebar.caption)
    _generate(app, seed=4)
    prov = app.session_state["result"].brain.provenance
    assert (prov["sampler"], prov["steps"], prov["sampling_preset"]) == ("DPM-Solver++(2M)", 4, "fast")


def test_the_vq_model_can_be_chosen_and_generates(app):
    model = _widget(app, "model")
    assert model.options == ["tiny-test-model · latent diffusion", "tiny-vq-model · VQ-VAE + transformer"]
    _widget(app, "speed").set_value("standard")  # a choice the LDM should get back
    _widget(app, "precision").set_value("fp32")
    model.set_value("tiny-vq-model")
    app.run()
    assert not app.exception
    # what the VQ backend does not use is greyed out, not silently ignored
    assert _widget(app, "speed_unavailable").disabled and _widget(app, "speed_unavailable").value == "standard"
    assert _widget(app, "steps").disabled and _widget(app, "precision").disabled
    assert not _widget(app, "guidance").disabled
    assert any(c.value == "Sampling: autoregressive over the code grid" for c in app.sidebar.caption)
    _generate(app, seed=2, guidance=1.5)
    assert not _errors(app)
    request, brain = app.session_state["request"], app.session_state["result"].brain
    assert (request.model, request.steps, request.precision, request.speed) == ("tiny-vq-model", None, None, "standard")
    assert brain.provenance["backend"] == "vq" and brain.provenance["guidance_scale"] == 1.5
    assert brain.image.shape == (32, 32, 32) and _niivue(app)
    assert app.session_state["result"].labels is not None and not app.session_state["result"].note  # segmented too
    assert "model `tiny-vq-model`" in _summary(app) and "autoregressive" in _summary(app)
    _widget(app, "model").set_value("tiny-test-model")
    app.run()
    assert _widget(app, "speed").value == "standard" and not _widget(app, "steps").disabled
    assert any("Out of date" in w.value for w in app.warning)


SWIFTSHADER = {"webgl2": True, "vendor": "Google Inc. (Google)",
               "renderer": "ANGLE (Google, Vulkan 1.3.0 (SwiftShader Device (Subzero) (0x0000C0DE)), SwiftShader driver)"}


def test_a_browser_with_software_webgl_starts_on_server_drawn_slices(app):
    app.session_state["webgl"] = SWIFTSHADER  # what viewer/webgl_probe reports from headless chromium
    _generate(app, seed=2)
    assert not _errors(app)
    assert _widget(app, "nv_layout").value == "Server PNG" and not _niivue(app)
    assert any("draws WebGL in software (ANGLE (Google, Vulkan" in c.value for c in app.caption)
    _widget(app, "nv_layout").set_value("Multiplanar + 3D")  # NiiVue stays one click away
    app.run()
    assert _niivue(app) and not app.exception


def test_a_probe_that_answers_after_the_first_brain_still_moves_it_to_server_drawn_slices(app):
    """The probe answers a rerun or two after the page opens; a brain asked for before that starts on NiiVue
    and moves to server-drawn slices when the answer comes, unless the user picked a layout meanwhile."""
    assert "webgl" not in app.session_state  # AppTest runs no browser: the probe never answers by itself
    _generate(app, seed=2)
    assert _widget(app, "nv_layout").value == "Multiplanar + 3D" and _niivue(app)
    app.session_state["webgl"] = SWIFTSHADER
    app.run()
    assert _widget(app, "nv_layout").value == "Server PNG" and not _niivue(app) and not app.exception
    _widget(app, "nv_layout").set_value("Axial")  # the user's choice is kept from then on
    app.run()
    app.session_state["webgl"] = {"webgl2": True, "renderer": "ANGLE (NVIDIA, NVIDIA GeForce RTX 3060)"}
    app.run()
    assert _widget(app, "nv_layout").value == "Axial" and _niivue(app)


def test_a_browser_with_a_gpu_and_the_layout_setting_keep_niivue(models_dir, monkeypatch):
    monkeypatch.setenv("SYNTHBRAIN_MODELS", str(models_dir))
    monkeypatch.setenv("SYNTHBRAIN_SEGMENTER", "tiny-test-segmenter")
    for env, webgl, expected in [
        (None, {"webgl2": True, "renderer": "ANGLE (NVIDIA, NVIDIA GeForce RTX 3060 Direct3D11 vs_5_0 ps_5_0)"}, "Multiplanar + 3D"),
        ("Axial", SWIFTSHADER, "Axial"),  # SYNTHBRAIN_VIEWER_LAYOUT wins over the probe
        ("Nonsense", None, "Multiplanar + 3D"),  # an unknown name is ignored (and logged)
    ]:
        if env:
            monkeypatch.setenv("SYNTHBRAIN_VIEWER_LAYOUT", env)
        else:
            monkeypatch.delenv("SYNTHBRAIN_VIEWER_LAYOUT", raising=False)
        at = AppTest.from_file(APP, default_timeout=TIMEOUT)
        at.run()
        if webgl is not None:
            at.session_state["webgl"] = webgl
        _generate(at, seed=2)
        assert _widget(at, "nv_layout").value == expected, (env, webgl)


def test_the_brain_comes_first_and_its_labels_follow(app):
    """Generate shows the brain from the sampler alone and segments it after the page is drawn; the
    labels then arrive (cached by the pixels), the overlay starts on, and nothing was generated twice."""
    from viewer import resources

    _generate(app, age=66.0, seed=4)
    result = app.session_state["result"]
    assert result.labels is not None and app.session_state["labels_pending"] is False
    assert set(result.seconds) == {"generate", "segment"}
    assert _widget(app, "overlay").value is True
    # The two phases outside the page: the brain alone, then the same brain with labels from the cache.
    request = app.session_state["request"]
    bare = resources.generate(request, labels=False)
    assert bare.labels is None and np.array_equal(bare.brain.image, result.brain.image)
    labelled = resources.with_labels(bare)
    np.testing.assert_array_equal(labelled.labels, result.labels)
    assert labelled.seconds["segment"] == result.seconds["segment"]  # the cached segmentation, not a new one


def test_downloads_wait_until_the_brain_is_labelled(app):
    """While the labels (and a volume match) are computed, the Downloads tab offers nothing: a file
    made then would hold the unwarped brain, or break when the labelled brain replaces it."""
    import viewer.resources

    def interrupted(result, match_volumes=False):  # the page as drawn before the labels arrive
        raise RuntimeError("labelling interrupted")

    _open_tab(app, "Downloads")
    original = viewer.resources.with_labels
    viewer.resources.with_labels = interrupted  # the app imports it afresh on every run
    try:
        _widget(app, "match_volumes").set_value(True)
        _widget(app, "seed").set_value(12)
        app.sidebar.button(key="generate").click()
        app.run()
    finally:
        viewer.resources.with_labels = original
    assert app.session_state["labels_pending"] is True and "labelling interrupted" in str(app.exception[0].value)
    assert not app.get("download_button")
    assert any("downloads appear in a moment" in i.value and "warped" in i.value for i in app.info)
    app.run()  # the labels arrive: every download is offered, for the warped brain
    assert not app.exception and app.session_state["labels_pending"] is False
    assert "volume_matching" in app.session_state["result"].brain.provenance
    assert {"dl_nifti", "dl_labels", "dl_usdz"} <= {b.key for b in app.get("download_button")}


def test_match_volumes_warps_the_brain_and_says_so(app):
    _generate(app, age=75.0, diagnosis="AD", seed=6)
    plain = app.session_state["result"]
    _widget(app, "match_volumes").set_value(True)
    assert any("Out of date" in w.value for w in app.run().warning)  # a different request until Generate
    _generate(app)
    assert not _errors(app)
    result = app.session_state["result"]
    vm = result.brain.provenance["volume_matching"]
    assert vm["structures"] and set(vm["before"]) == set(vm["after"]) == set(vm["structures"])
    assert result.labels is not None and result.brain.seed == plain.brain.seed
    assert "match volumes" in result.seconds
    assert any("volumes matched by a warp" in m.value for m in app.markdown)


def test_a_failed_volume_match_keeps_the_brain_as_sampled_and_says_why(app, monkeypatch):
    import synth.anatomy

    def broken(brain, segmenter=None, **kw):
        raise ValueError("the warp folded")

    monkeypatch.setattr(synth.anatomy, "match_brain_volumes", broken)
    _widget(app, "match_volumes").set_value(True)
    _generate(app, seed=8)
    result = app.session_state["result"]
    assert not app.exception and "volume_matching" not in result.brain.provenance
    assert result.labels is not None  # labelled as sampled
    assert "volume matching failed (ValueError: the warp folded)" in result.note
    assert any("volume matching failed" in c.value for c in app.caption)


def test_a_generation_that_fails_past_its_handlers_is_not_retried_on_every_rerun(app, monkeypatch):
    """An error after the brain is made (here: asking whether to refine it) reaches Streamlit's own error
    box, and the request is dropped: the next rerun (any widget) does not generate and fail again, and it
    shows the brain that was made."""
    from viewer import service

    calls = []

    def broken(generator, request):
        calls.append(request)
        raise RuntimeError("the refiner's config vanished")

    monkeypatch.setattr(service, "refines_after_showing", broken)
    _widget(app, "seed").set_value(9)
    app.sidebar.button(key="generate").click()
    app.run()
    assert [e.value for e in app.exception] == ["the refiner's config vanished"]
    assert app.session_state["generate_pending"] is False and len(calls) == 1
    app.run()  # a rerun, as a moved slider would cause
    assert not app.exception and len(calls) == 1
    # nothing lost: the brain made before the error is the page's brain
    assert app.session_state["result"].brain.seed == 9
    assert any("seed 9" in m.value for m in app.markdown)
