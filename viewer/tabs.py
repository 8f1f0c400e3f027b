"""The viewer's tabs: slices, 3D, morphometry, compare, age sweep and downloads.

Each panel reads the current brain from ``st.session_state`` and draws with the Streamlit-free
helpers of ``render``, ``scene`` and ``service``. Panels with sliders are fragments, so moving a
slider reruns only that panel.
"""

from __future__ import annotations

import html
import logging
import os
import time

import numpy as np
import streamlit as st

import synth
from viewer import browser, niivue, render, scene, service
from viewer.resources import (
    USER_ERRORS,
    describe,
    generate,
    get_generator,
    guarded,
    models_root,
    prepare_scan_cached,
    segmenter_name,
    settle_once,
)

log = logging.getLogger(__name__)

TABS = ["Slices", "3D", "Morphometry", "Compare", "Your scan", "Age sweep", "Downloads"]


def _cursor(shape) -> list[int]:
    cur = st.session_state.cursor
    if cur is None or len(cur) != 3 or any(not 0 <= c < s for c, s in zip(cur, shape)):
        cur = [s // 2 for s in shape]
    return list(cur)


def _lut(result):
    anat = service.anatomy()
    if anat is None or result.labels is None:
        return None
    return render.label_lut(service.label_colors(anat.STRUCTURES))


LAYOUTS = {"Multiplanar + 3D": "multiplanar", "Axial": "axial", "Coronal": "coronal", "Sagittal": "sagittal", "3D render": "3d",
           "Server PNG": None}
LAYOUT_HELP = (
    "NiiVue draws in your browser with WebGL2: instant with a graphics card. 'Server PNG' draws the three planes "
    "on the server instead (sliders, no WebGL): quicker in a browser without a GPU, where WebGL runs in software."
)
def default_layout() -> str:
    """The layout a new session starts on: ``SYNTHBRAIN_VIEWER_LAYOUT`` (a name of ``LAYOUTS``) if set; else
    "Server PNG" in a browser whose WebGL runs in software (NiiVue takes seconds to draw there), else the first."""
    wanted = os.environ.get("SYNTHBRAIN_VIEWER_LAYOUT")
    if wanted in LAYOUTS:
        return wanted
    if wanted:
        log.warning("SYNTHBRAIN_VIEWER_LAYOUT=%r is not a layout (one of %s); ignored", wanted, ", ".join(LAYOUTS))
    if browser.is_software_renderer(st.session_state.get("webgl")):
        return "Server PNG"
    return next(iter(LAYOUTS))


def _follow_default_layout() -> None:
    """Start the layout radio on :func:`default_layout`, and keep it there until the user picks one.

    The WebGL probe answers a rerun or two after the page opens; a user who clicks Generate before that
    would otherwise keep NiiVue (seconds per redraw in a software-WebGL browser) for the whole session.
    """
    if "nv_layout" not in st.session_state or not st.session_state.get("nv_layout_chosen"):
        st.session_state.nv_layout = default_layout()


def _layout_chosen() -> None:
    st.session_state.nv_layout_chosen = True


def software_note() -> None:
    """Say why the slices are server-drawn when the browser's WebGL runs in software."""
    info = st.session_state.get("webgl")
    if browser.is_software_renderer(info) and not os.environ.get("SYNTHBRAIN_VIEWER_LAYOUT"):
        st.caption(f"Your browser draws WebGL in software ({(info or {}).get('renderer') or 'no WebGL2'}), so the slices "
                   "start server-drawn: they show at once and redraw in about 10 ms. NiiVue's layouts (3D render, "
                   "window/level) work here too, but take a few seconds per brain.")


NAVIGATION = (
    "Click or drag: move the crosshair (the readout below names the structure there) · scroll: next slice · "
    "right-drag: window/level · middle-drag or the Zoom menu: pan and zoom · orientation letters on every pane"
)


def _names() -> dict[int, str]:
    anat = service.anatomy()
    return {} if anat is None else {int(s.label): s.name for s in anat.STRUCTURES}


def _niivue():
    try:
        from niivue_component import niivue_viewer
    except ImportError:
        return None
    return niivue_viewer


def _nv_data(result: service.Generated, lut) -> dict:
    """The NIfTI bytes NiiVue gets, made once per brain (kept in session state)."""
    import hashlib

    brain = result.brain
    # The pixels, not id() (ids are reused), and whether the labels have arrived (they follow the brain).
    ident = hashlib.sha1(brain.image.tobytes()).hexdigest() + ("+labels" if lut is not None else "")
    cached = st.session_state.get("nv_data")
    if cached is None or cached["id"] != ident:
        cached = {
            "id": ident,
            "t1": niivue.t1_bytes(brain.image, brain.affine),
            "labels": None if lut is None else niivue.label_overlay_bytes(result.labels, brain.affine, lut),
        }
        st.session_state.nv_data = cached
    return cached


@st.fragment
@guarded
def slices_ui() -> None:
    """NiiVue slices (WebGL, drawn in the browser); a click reruns only this fragment for the readout."""
    result: service.Generated = st.session_state.result
    viewer = _niivue()
    if viewer is None:
        st.info("NiiVue is not installed (`pip install niivue-streamlit`): showing server-drawn slices.")
        return png_slices_ui()
    brain = result.brain
    lut = _lut(result)
    _follow_default_layout()
    layout = st.radio("Layout", list(LAYOUTS), horizontal=True, key="nv_layout", help=LAYOUT_HELP,
                      on_change=_layout_chosen)
    if LAYOUTS[layout] is None:
        software_note()
        return png_slices_ui()
    o2, o3, o4, o5 = st.columns([1, 1, 1, 1], vertical_alignment="bottom")
    overlay = o2.toggle("Labels", value=lut is not None, key="overlay", disabled=lut is None,
                        help=None if lut is not None else service.anatomy_error() or result.note or "no segmentation")
    opacity = o3.slider("Label opacity", 0.0, 1.0, 0.3, 0.05, key="opacity", disabled=not overlay)
    crosshair = o4.toggle("Crosshair", value=True, key="crosshair")
    radiological = o5.toggle("Radiological view", value=False, key="radiological",
                             help="Off: neurological (the subject's right on the right). On: right on the left, as radiologists read.")
    data = _nv_data(result, lut)
    overlays = []
    if overlay and data["labels"] is not None:
        overlays = [{"data": data["labels"], "name": "labels.nii.gz", "colormap": "gray", "opacity": float(opacity)}]
    event = viewer(
        nifti_data=data["t1"], filename="synthetic_T1w.nii.gz", overlays=overlays, height=560,
        view_mode=LAYOUTS[layout], styled=True, update_interval_ms=100, key="niivue",
        settings={"crosshair": crosshair, "radiological": radiological, "colorbar": True, "interpolation": False},
    )
    voxel = niivue.voxel_from_event(event, brain.image.shape)
    if voxel is not None:
        st.session_state.cursor = voxel
    cur = _cursor(brain.image.shape)
    st.session_state.slice_view = {"window": (0.0, 1.0), "overlay": overlay, "opacity": opacity, "crosshair": crosshair}
    r = niivue.readout(brain.image, brain.affine, cur, result.labels, _names())
    st.markdown("Crosshair: " + niivue.readout_text(r), help=NAVIGATION)
    st.caption(NAVIGATION + ". Colour bars: the left one is the T1 intensity, 0-1 (arbitrary units, scaled per brain); "
               "with labels on, NiiVue adds one for the label overlay's channels, which carries no meaning: the legend "
               "below gives each label's colour.")
    if lut is not None:
        with st.expander("Legend: label colours", expanded=False):
            _legend(result.labels)


def _legend(labels) -> None:
    anat = service.anatomy()
    rows = niivue.legend_rows(anat.STRUCTURES, labels)
    cells = "".join(
        f'<div style="display:flex;align-items:center;gap:6px;font-size:0.9rem">'
        f'<span style="display:inline-block;width:14px;height:14px;border-radius:3px;background:{r["color"]};'
        f'border:1px solid #888"></span>{r["label"]} {html.escape(r["name"])}</div>'
        for r in rows
    )
    st.html(f'<div data-testid="label-legend" style="display:grid;grid-template-columns:repeat(3,1fr);gap:4px">{cells}</div>')
    st.caption("FreeSurfer colours; left and right share a colour. The same colours are used in 3D and in the exported colour tables.")


@guarded
def png_slices_ui() -> None:
    """Orthogonal slices drawn on the server as PNG (used when NiiVue is not installed)."""
    result: service.Generated = st.session_state.result
    image = result.brain.image
    shape = image.shape
    cur = _cursor(shape)
    cols = st.columns(3)
    names = {"axial": ("z", 2), "coronal": ("y", 1), "sagittal": ("x", 0)}
    for col, (plane, (axis_name, i)) in zip(cols, names.items()):
        key = f"slice_{axis_name}"
        if key not in st.session_state or not 0 <= st.session_state[key] < shape[i]:
            st.session_state[key] = cur[i]
        cur[i] = col.slider(f"{plane.capitalize()} ({axis_name})", 0, shape[i] - 1, key=key)
    st.session_state.cursor = cur
    o1, o2, o3, o4 = st.columns([1, 1, 2, 1], vertical_alignment="bottom")
    lut = _lut(result)
    overlay = o1.toggle("Labels", value=lut is not None, key="overlay", disabled=lut is None,
                        help=None if lut is not None else service.anatomy_error() or result.note or "no segmentation")
    opacity = o2.slider("Opacity", 0.0, 1.0, 0.4, 0.05, key="opacity", disabled=not overlay)
    window = o3.slider("Intensity window", 0.0, 1.0, (0.0, 1.0), 0.01, key="window")
    crosshair = o4.toggle("Crosshair", value=True, key="crosshair")
    t = time.perf_counter()
    try:
        views = render.orthogonal_views(
            image, cur, window=window, labels=result.labels if overlay else None, lut=lut,
            opacity=opacity, crosshair=crosshair,
        )
    except ValueError as exc:
        st.error(f"Cannot draw the slices: {exc}")
        return
    st.session_state.slice_view = {"window": window, "overlay": overlay, "opacity": opacity, "crosshair": crosshair}
    page = render.hover_html(image, cur, views, labels=result.labels, names=_names(), affine=result.brain.affine)
    ms = (time.perf_counter() - t) * 1000  # slicing, colouring and PNG encoding of the three planes
    tall = max(v.shape[0] / v.shape[1] for v in views.values())
    st.iframe(page, height=int(310 * tall) + 60)  # our own page: the three planes with a hover readout
    mm = result.brain.affine @ np.array([*cur, 1.0])
    st.caption(
        f"Voxel ({cur[0]}, {cur[1]}, {cur[2]}) = MNI ({mm[0]:.0f}, {mm[1]:.0f}, {mm[2]:.0f}) mm · "
        f"neurological view (right is right) · slices drawn in {ms:.1f} ms"
    )


PRESETS = {
    "Deep grey + ventricles": ("Ventricle", "Vent", "Hippocampus", "Amygdala", "Thalamus", "Caudate", "Putamen", "Pallidum", "Brain-Stem"),
    "Ventricles": ("Ventricle", "Vent"),
    "Hippocampus": ("Hippocampus", "Amygdala"),
    "Deep grey": ("Thalamus", "Caudate", "Putamen", "Pallidum", "Hippocampus", "Amygdala"),
    "All but CSF": None,
}


def preset_structures(preset: str, names) -> list[str]:
    """The structures a 3D preset shows, among ``names`` (the cortex hides everything deep, so only
    "All but CSF" shows it)."""
    parts = PRESETS[preset]
    if parts is None:
        return [n for n in names if n != "CSF"] or list(names)
    return [n for n in names if any(p in n for p in parts)] or [n for n in names if n != "CSF"] or list(names)


def _meshes(result: service.Generated):
    """Per-structure surfaces of the current brain, computed once per brain (session state)."""
    anat = service.anatomy()
    if anat is None or result.labels is None:
        return None
    if st.session_state.get("meshes") is None:
        with st.spinner("Extracting surfaces…"):
            st.session_state.meshes = service.brain_meshes(result.labels, result.brain.affine)
    return st.session_state.meshes


@st.fragment
@guarded
def view3d_ui() -> None:
    result: service.Generated = st.session_state.result
    brain = result.brain
    anat = service.anatomy()
    why_not = service.anatomy_missing("structure_meshes")
    if not why_not and result.labels is None:
        why_not = result.note or "No segmentation for this brain."
    can_surface = not why_not
    modes = (["Structures"] if can_surface else []) + ["Isosurface", "Volume rendering"]
    if not can_surface:
        st.info(
            why_not
            + " Structure surfaces are unavailable; the isosurface and volume rendering work without labels."
        )
    mode = st.radio("View", modes, horizontal=True, key="view3d_mode")
    try:
        if mode == "Volume rendering":
            c1, c2, c3 = st.columns(3)
            window = c1.slider("Rendered intensities", 0.0, 1.0, (0.15, 1.0), 0.05, key="volume_window")
            azimuth = c2.slider("Turn (degrees)", -180, 180, 0, 15, key="volume_azimuth")
            elevation = c3.slider("Tilt (degrees)", -90, 90, 20, 10, key="volume_elevation")
            with st.spinner("Rendering…"):
                picture = scene.render_volume(brain.image, brain.affine, window=window, azimuth=azimuth, elevation=elevation)
            st.image(picture, caption="volume rendering (VTK, drawn on the server)", width="stretch")
            settle_once("3d")
            return
        if mode == "Structures":
            meshes = _meshes(result)
            colors = {s.name: s.rgb for s in anat.STRUCTURES}
            names = [n for n in meshes if getattr(meshes[n], "n_points", 0) > 0]
            preset = st.radio("Show", list(PRESETS), horizontal=True, key="view3d_preset",
                              help="Deep structures with the cortex as a translucent shell, or one group alone. "
                                   "Colours match the slice legend.")
            shown = preset_structures(preset, names)
            visible = st.multiselect("Visible structures", names, default=shown, key=f"visible_structures_{preset}")
            outer = None
            if hasattr(anat, "outer_surface") and st.toggle("Outer brain surface (translucent)", value=preset == "Deep grey + ventricles", key="show_outer"):
                outer = anat.outer_surface(brain.image, brain.affine)
            plotter = scene.surface_plotter(meshes, colors, visible, outer=outer)
        else:
            level = st.slider("Intensity level", 0.05, 0.95, 0.3, 0.05, key="iso_level",
                              help="The surface where the T1 intensity crosses this value")
            plotter = scene.isosurface_plotter(brain.image, brain.affine, level)
    except USER_ERRORS as exc:
        st.error(f"Cannot build the 3D view: {exc}")
        return
    try:
        from stpyvista import stpyvista
    except Exception as exc:  # stpyvista registers a component and needs a running server
        st.warning(f"3D view unavailable here: {exc}")
        return
    stpyvista(plotter, key="view3d")
    settle_once("3d")  # pyvista, VTK and trame are imported by now
    st.caption("Drag to rotate, scroll to zoom. Drawn in your browser by vtk.js; nothing loads from the internet.")


def morphometry_ui() -> None:
    result: service.Generated = st.session_state.result
    brain = result.brain
    gen = get_generator(models_root(), st.session_state.request.model)
    if gen.normative is None:
        st.info("This model has no normative model: only the requested volumes are shown.")
    try:
        rows = service.morphometry_rows(brain, gen.normative, result.labels)
    except USER_ERRORS as exc:
        st.error(f"Cannot measure this brain: {exc}")
        return
    if result.labels is None:
        st.info(service.anatomy_error() or result.note or "No segmentation: measured volumes unavailable.")
    table = [
        {
            "volume": r["volume"].replace("_", " "),
            "requested %ICV": _pct(r["requested"]), "measured %ICV": _pct(r["measured"]),
            "healthy expected %ICV": _pct(r["expected"]),
            "healthy 95 % range": "" if r["low"] is None else f"{r['low'] * 100:.3g}–{r['high'] * 100:.3g}",
            "z (measured)": None if r["z"] is None else round(r["z"], 2),
        }
        for r in rows
    ]
    st.dataframe(table, hide_index=True, width="stretch")
    target_ui(rows, brain, gen)
    with st.expander("What CN, MCI, AD, GM, WM, z and % ICV mean here"):
        st.markdown(service.GLOSSARY)
    if gen.normative is not None:
        curves = service.normative_curves(gen.normative, brain.condition.sex)
        fig = service.morphometry_figure(rows, curves, brain.condition.age, brain.condition.sex)
        st.pyplot(fig, width="stretch")
    if result.labels is not None:
        with st.expander("Every structure"):
            voxel = float(abs(np.linalg.det(brain.affine[:3, :3])))
            st.dataframe(service.structure_rows(result.labels, voxel), hide_index=True, width="stretch")


def _checks(result: service.Generated, gen) -> list[dict]:
    rows = service.morphometry_rows(result.brain, gen.normative, result.labels)
    return service.target_check(rows, result.brain.condition, gen.normative, service.conditioned_keys(gen) or None)


def target_ui(rows, brain, gen) -> None:
    """Measured against requested volumes of the conditioned structures, with a flag when a brain missed."""
    checks = service.target_check(rows, brain.condition, gen.normative, service.conditioned_keys(gen) or None)
    measured = [c for c in checks if c["gap_pct"] is not None]
    if not measured:
        return
    missed = [c for c in measured if c["missed"]]
    lines = []
    for c in measured:
        z = "" if c["z_gap"] is None else f", z {c['z_measured']:+.1f} measured vs {c['z_requested']:+.1f} requested"
        mark = "**missed**" if c["missed"] else "on target"
        lines.append(f"- {c['volume'].replace('_', ' ')}: requested {c['requested'] * 100:.3g} % ICV, measured "
                     f"{c['measured'] * 100:.3g} % ({c['gap_pct']:+.0f} %{z}): {mark}")
    text = "\n".join(lines)
    if missed:
        st.warning(
            f"**This brain missed its target** for {', '.join(c['volume'].replace('_', ' ') for c in missed)}: the "
            "measured volume lies a normative standard deviation or more from the one requested. Treat its "
            "morphometry with care; another seed may land closer.\n\n" + text, icon="🎯")
    else:
        st.success("Measured volumes match the request (within one normative standard deviation).\n\n" + text)


def _pct(v):
    return None if v is None else round(float(v) * 100, 4)


def compare_ui() -> None:
    request: service.Request = st.session_state.request
    c = request.condition
    preset = st.radio("Compare", ["Age 50 vs 80", "CN vs AD", "Custom"], horizontal=True, key="compare_preset")
    if preset == "Age 50 vs 80":
        a, b = {"age": 50.0, "diagnosis": c.diagnosis}, {"age": 80.0, "diagnosis": c.diagnosis}
    elif preset == "CN vs AD":
        a, b = {"age": c.age, "diagnosis": "CN"}, {"age": c.age, "diagnosis": "AD"}
    else:
        k1, k2, k3, k4 = st.columns(4)
        a = {"age": k1.number_input("A: age", 18.0, 95.0, 50.0, 1.0, key="cmp_age_a"),
             "diagnosis": k2.selectbox("A: diagnosis", synth.DIAGNOSES, key="cmp_dx_a")}
        b = {"age": k3.number_input("B: age", 18.0, 95.0, 80.0, 1.0, key="cmp_age_b"),
             "diagnosis": k4.selectbox("B: diagnosis", synth.DIAGNOSES, index=2, key="cmp_dx_b")}
    st.caption(
        f"Same seed ({request.seed}), sex and model; explicit volume targets are dropped so that "
        "age and diagnosis act. The difference map shows B − A (red: B brighter)."
    )
    if st.button("Compare", type="primary", key="compare_go"):
        try:
            ra = request.with_condition(volumes={}, **a)
            rb = request.with_condition(volumes={}, **b)
            bar = st.progress(0.0)
            try:
                ga, gb = generate(ra, bar, "A"), generate(rb, bar, "B")
            finally:
                bar.empty()
        except USER_ERRORS as exc:
            st.error(f"Cannot compare: {exc}")
            return
        st.session_state.compare = (ra, rb, ga, gb)
    if "compare" not in st.session_state:
        return
    ra, rb, ga, gb = st.session_state.compare
    _compare_view(ra, rb, ga, gb)


@st.fragment
@guarded
def _compare_view(ra, rb, ga, gb) -> None:
    img_a, img_b = ga.brain.image, gb.brain.image
    p1, p2 = st.columns([1, 2])
    plane = p1.radio("Plane", list(render.PLANES), horizontal=True, key="cmp_plane")
    axis = render.PLANES[plane]
    n = img_a.shape[axis]
    idx = p2.slider("Slice", 0, n - 1, n // 2, key=f"cmp_slice_{plane}")
    pos = [s // 2 for s in img_a.shape]
    pos[axis] = idx
    sa = render.render_slice(img_a, plane, pos, crosshair=False)
    sb = render.render_slice(img_b, plane, pos, crosshair=False)
    diff, vmax = render.difference_map(render.take_slice(img_a, plane, idx), render.take_slice(img_b, plane, idx))
    diff = np.repeat(np.repeat(diff, 3, axis=0), 3, axis=1)
    cols = st.columns(3)
    cols[0].image(sa, caption=f"A: {describe(ra)}", width="stretch")
    cols[1].image(sb, caption=f"B: {describe(rb)}", width="stretch")
    cols[2].image(diff, caption=f"B − A (±{vmax:.3g} intensity)", width="stretch")
    cols[2].image(render.colorbar(render.diff_colors(), -vmax, vmax, label="B - A, T1 intensity (blue: B darker, red: B brighter)"),
                  width="stretch")
    rows = [
        {"volume": k.replace("_", " "), "A requested %ICV": _pct(ga.brain.targets.get(k)),
         "B requested %ICV": _pct(gb.brain.targets.get(k)),
         "B/A": None if not ga.brain.targets.get(k) else round(gb.brain.targets[k] / ga.brain.targets[k], 3)}
        for k in synth.VOLUME_KEYS
    ]
    st.dataframe(rows, hide_index=True)


def scan_ui() -> None:
    """Your own T1 scan, prepared onto the model grid and shown beside a synthetic brain of the same age and sex."""
    import hashlib

    request: service.Request = st.session_state.request
    st.markdown(
        "Open a T1-weighted NIfTI (`.nii` or `.nii.gz`, at most "
        f"{service.MAX_UPLOAD_MB} MB). It is read by nibabel only, in a temporary folder deleted straight after; "
        "nothing is kept on disk or sent anywhere. It is registered to MNI152 (affine), its brain masked with the "
        "template's mask (refined by the segmenter), segmented and measured, then shown beside a healthy (CN) "
        "synthetic brain of the age and sex you set. **Not for clinical use**: this is a teaching comparison."
    )
    up = st.file_uploader("T1 scan (NIfTI)", type=["nii", "gz"], key="scan_upload")
    c1, c2 = st.columns(2)
    age = c1.number_input("Age for the synthetic brain and the norms (years)", float(synth.AGE_RANGE[0]),
                          float(synth.AGE_RANGE[1]), float(request.condition.age), 1.0, key="scan_age")
    sex = c2.radio("Sex", synth.SEXES, index=synth.SEXES.index(request.condition.sex), horizontal=True,
                   format_func={"F": "Female", "M": "Male"}.get, key="scan_sex")
    if up is None:
        return
    data = up.getvalue()
    try:
        img = service.read_upload(data)
    except ValueError as exc:
        st.error(f"Cannot open {up.name}: {exc}")
        return
    digest = hashlib.sha256(data).hexdigest()
    st.caption(f"{up.name}: {' x '.join(str(s) for s in img.shape)} voxels, read.")
    if st.button("Prepare and compare", type="primary", key="scan_go"):
        try:
            with st.spinner("Registering to MNI152, masking and segmenting your scan…"):
                scan = prepare_scan_cached(digest, models_root(), segmenter_name(), _img=img)
            ref = request.with_condition(age=float(age), sex=sex, diagnosis="CN", volumes={})
            bar = st.progress(0.0)
            try:
                other = generate(ref, bar, "Synthetic brain")
            finally:
                bar.empty()
        except USER_ERRORS as exc:
            st.error(f"Cannot prepare {up.name}: {exc}")
            return
        st.session_state.scan = (digest, up.name, scan, ref, other)
    if st.session_state.get("scan", (None,))[0] != digest:
        return
    _, name, scan, ref, other = st.session_state.scan
    _scan_view(name, scan, ref, other)


@st.fragment
@guarded
def _scan_view(name: str, scan: service.PreparedScan, ref: service.Request, other: service.Generated) -> None:
    viewer = _niivue()
    lut = _lut(other) if scan.labels is not None else None
    cols = st.columns(2)
    for col, title, image, affine, labels, key in (
        (cols[0], f"**Your scan** ({name}), registered, brain only", scan.image, scan.affine, scan.labels, "niivue_scan"),
        (cols[1], f"**Synthetic brain**: {describe(ref)} (SYNTHETIC)", other.brain.image, other.brain.affine, other.labels, "niivue_synth"),
    ):
        with col:
            st.markdown(title)
            if viewer is None:
                pos = [s // 2 for s in image.shape]
                st.image(render.montage([render.render_slice(image, p, pos) for p in render.PLANES]), width="stretch")
                continue
            overlays = []
            if lut is not None and labels is not None:
                overlays = [{"data": niivue.label_overlay_bytes(labels, affine, lut), "name": "labels.nii.gz", "colormap": "gray", "opacity": 0.3}]
            viewer(nifti_data=niivue.t1_bytes(image, affine), filename=f"{key}.nii.gz", overlays=overlays, height=420,
                   view_mode="multiplanar", styled=False, update_interval_ms=None, key=key,
                   settings={"crosshair": True, "radiological": False, "colorbar": True, "interpolation": False})
    st.caption(
        f"Registration: correlation with the MNI152 template {scan.ncc:.2f} (IXI scans: about 0.45-0.55); "
        f"{'; '.join(scan.notes)}; {scan.seconds:.1f} s."
    )
    gen = get_generator(models_root(), ref.model)
    cond = ref.condition
    voxel = float(abs(np.linalg.det(scan.affine[:3, :3])))
    mine = service.scan_rows(scan.labels, cond, gen.normative, voxel_volume_mm3=voxel)
    theirs = service.morphometry_rows(other.brain, gen.normative, other.labels)
    st.dataframe(
        [{"volume": a["volume"].replace("_", " "), "your scan %ICV": _pct(a["measured"]),
          "your scan z": None if a["z"] is None else round(a["z"], 2), "synthetic %ICV": _pct(b["measured"]),
          "healthy expected %ICV": _pct(a["expected"])} for a, b in zip(mine, theirs)],
        hide_index=True, width="stretch",
    )
    if gen.normative is not None and scan.labels is not None:
        curves = service.normative_curves(gen.normative, cond.sex)
        fig = service.morphometry_figure([{**r, "requested": None} for r in mine], curves, cond.age, cond.sex)
        fig.suptitle(f"Your scan's volumes on the healthy normative curves ({'female' if cond.sex == 'F' else 'male'}, age {cond.age:g})", fontsize=13)
        st.pyplot(fig, width="stretch")


def sweep_ui() -> None:
    request: service.Request = st.session_state.request
    c1, c2, c3, c4 = st.columns([3, 1, 2, 1])
    ages = c1.slider("Ages", float(synth.AGE_RANGE[0]), float(synth.AGE_RANGE[1]), (30.0, 80.0), 1.0, format="%.0f", key="sweep_ages")
    frames = c2.number_input("Frames", 2, 24, 6, key="sweep_frames")
    plane = c3.radio("Plane", list(render.PLANES), horizontal=True, key="sweep_plane")
    fps = c4.number_input("Frames/s", 0.5, 20.0, 2.0, 0.5, key="sweep_fps")
    st.caption(f"Seed {request.seed}, {request.condition.sex}, {request.condition.diagnosis}; explicit volume targets are dropped.")
    if st.button("Render the sweep", type="primary", key="sweep_go"):
        try:
            if ages[1] <= ages[0]:
                raise ValueError("the age range is empty: pick two different ages")
            todo = np.linspace(ages[0], ages[1], int(frames)).round(1)
            bar = st.progress(0.0)
            images = []
            try:
                for i, age in enumerate(todo):
                    g = generate(request.with_condition(age=float(age), volumes={}), bar, f"Frame {i + 1}/{len(todo)} (age {age:g})")
                    img = g.brain.image
                    pos = [s // 2 for s in img.shape]
                    frame = render.render_slice(img, plane, pos, crosshair=False)
                    images.append(render.stamp(frame, f"age {age:g} - SYNTHETIC"))
            finally:
                bar.empty()
            st.session_state.sweep = (render.gif_bytes(images, fps=fps), f"{service._stem(st.session_state.result.brain)}_agesweep_{plane}.gif")
        except USER_ERRORS as exc:
            st.error(f"Cannot render the sweep: {exc}")
            return
    if "sweep" in st.session_state:
        gif, name = st.session_state.sweep
        st.image(gif, caption="age sweep (synthetic)", width=360)
        st.download_button("Download GIF", gif, file_name=name, mime="image/gif", key="dl_gif", on_click="ignore")


def slices_png_maker(result: service.Generated, view: dict, cursor, lut):
    """A callable that draws the three slices of ``result`` as a stamped PNG.

    Everything it needs is captured here, while the script runs: Streamlit calls a deferred
    download callable later, outside the script run, where ``st.session_state`` is unavailable.
    """
    view = dict(view or {})
    cursor = list(cursor)

    def make() -> bytes:
        views = render.orthogonal_views(
            result.brain.image, cursor, window=view.get("window", (0.0, 1.0)),
            labels=result.labels if view.get("overlay") else None, lut=lut,
            opacity=view.get("opacity", 0.4), crosshair=view.get("crosshair", True),
        )
        picture = render.stamp(render.montage([views["axial"], views["coronal"], views["sagittal"]]))
        return render.png_bytes(picture, {"Description": synth.SYNTHETIC_NOTICE, "Software": f"SynthBrain {synth.__version__}"})

    return make


def downloads_ui() -> None:
    if st.session_state.get("labels_pending"):
        # The brain on screen is about to be replaced by its labelled (with volume matching: warped)
        # version; a file made now would be the wrong brain, or fail when the labels land mid-download.
        st.info("The downloads appear in a moment, once the structures are labelled"
                + (" and the brain is warped to the requested volumes" if st.session_state.request.match_volumes else "")
                + ": the files then hold the brain you see.", icon="⏳")
        return
    result: service.Generated = st.session_state.result
    brain = result.brain
    stem = service._stem(brain)
    st.caption("Every file says it is synthetic: NIfTI `descrip`, JSON provenance, USD/mesh metadata, PNG text chunk.")

    ready_meshes = st.session_state.get("meshes")  # the callables below run outside the script
    try:
        checks = _checks(result, get_generator(models_root(), st.session_state.request.model))
    except Exception:  # noqa: BLE001 - no normative model or no labels: the JSON simply lacks it
        checks = None

    def lazy(fmt):
        def make():
            meshes = None
            if fmt in ("usd", "usdz", "stl", "glb"):
                meshes = ready_meshes or service.brain_meshes(result.labels, brain.affine)
            return service.export_files(brain, [fmt], labels=result.labels, meshes=meshes, target_checks=checks)[fmt][1]
        return make

    c = st.columns(4)
    c[0].download_button("T1 (NIfTI)", lazy("nifti"), file_name=f"{stem}_T1w.nii.gz", mime="application/gzip", key="dl_nifti", on_click="ignore")
    c[1].download_button("Provenance (JSON)", lazy("json"), file_name=f"{stem}_provenance.json", mime="application/json", key="dl_json", on_click="ignore")
    png = slices_png_maker(result, st.session_state.get("slice_view", {}), _cursor(brain.image.shape), _lut(result))
    c[2].download_button("Slices (PNG)", png, file_name=f"{stem}_slices.png", mime="image/png", key="dl_png", on_click="ignore")
    no_labels = "" if result.labels is not None else (result.note or "no segmentation for this brain")
    why_labels = service.anatomy_missing("save_labels") or no_labels
    why_meshes = service.anatomy_missing("structure_meshes", "export_usd", "export_meshes") or no_labels
    c[3].download_button("Labels (NIfTI)", lazy("labels"), file_name=f"{stem}_labels.nii.gz", mime="application/gzip",
                         key="dl_labels", on_click="ignore", disabled=bool(why_labels), help=why_labels or None)
    t = st.columns(4)
    for col, fmt, label, name, mime in (
        (t[0], "dseg", "Label table (BIDS dseg.tsv)", f"{stem}_dseg.tsv", "text/tab-separated-values"),
        (t[1], "lut", "Colour table (FreeSurfer LUT)", f"{stem}_labels_LUT.txt", "text/plain"),
        (t[2], "ctbl", "Colour table (3D Slicer .ctbl)", f"{stem}_labels.ctbl", "text/plain"),
    ):
        col.download_button(label, lazy(fmt), file_name=name, mime=mime, key=f"dl_{fmt}", on_click="ignore",
                            disabled=bool(why_labels), help=why_labels or "Goes with the labels NIfTI: 3D Slicer, freeview, ITK-SNAP and BIDS tools read it")
    m = st.columns(4)
    for col, fmt, label, mime in (
        (m[0], "usdz", "Surfaces (USDZ)", "model/vnd.usdz+zip"),
        (m[1], "usd", "Surfaces (USD)", "application/octet-stream"),
        (m[2], "stl", "Surfaces (STL)", "model/stl"),
        (m[3], "glb", "Surfaces (GLB)", "model/gltf-binary"),
    ):
        ext = "usdc" if fmt == "usd" else fmt
        col.download_button(label, lazy(fmt), file_name=f"{stem}.{ext}", mime=mime, key=f"dl_{fmt}", on_click="ignore",
                            disabled=bool(why_meshes), help=why_meshes or None)
    if why_labels or why_meshes:
        st.info(f"Label and surface exports unavailable: {why_labels or why_meshes}")
    with st.expander("Provenance"):
        st.json(brain.metadata())




PANELS = [slices_ui, view3d_ui, morphometry_ui, compare_ui, scan_ui, sweep_ui, downloads_ui]
