"""PyVista scenes for the 3D tab: per-structure surfaces and a volume rendering (no Streamlit).

The app hands the plotter to ``stpyvista`` (trame backend), which exports it as a self-contained
vtk.js page: it works offline, nothing is loaded from a CDN.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Mapping, Sequence

import numpy as np

__all__ = ["image_grid", "isosurface_plotter", "no_wasm_download", "render_volume", "surface_plotter", "volume_plotter"]

WINDOW = (640, 480)
_RENDER_LOCK = threading.Lock()  # one off-screen VTK render at a time in this process


def no_wasm_download() -> str:
    """Stop ``trame_vtklocal`` from fetching VTK's WebAssembly build from gitlab.kitware.com.

    stpyvista's export registers trame's ``vtklocal`` module, which downloads the wasm archive of
    the installed VTK whenever it is missing (a DNS failure and a traceback per 3D render here,
    and an outbound request anywhere). The exported vtk.js scene never uses it. Pointing
    ``VTK_WASM_DIR_OVERRIDE`` at an empty folder makes the module serve that folder instead.

    Returns:
        The folder in use (an existing override is kept).
    """
    current = os.environ.get("VTK_WASM_DIR_OVERRIDE")
    if current and os.path.isdir(current):
        return current
    import tempfile

    os.environ["VTK_WASM_DIR_OVERRIDE"] = tempfile.mkdtemp(prefix="synthbrain-no-vtk-wasm-")
    return os.environ["VTK_WASM_DIR_OVERRIDE"]


def _pyvista():
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # skip the X attempt
    no_wasm_download()
    try:
        import pyvista as pv
    except ImportError as exc:  # pragma: no cover - pyvista is a requirement
        raise RuntimeError("the 3D view needs pyvista: pip install pyvista 'stpyvista[trame]' trame-pyvista") from exc
    pv.OFF_SCREEN = True
    # stpyvista 0.2.1 still calls Plotter.export_html (deprecated in pyvista 0.49); nothing to act on.
    warnings.filterwarnings("ignore", message="Plotter.export_html is deprecated")
    return pv


def _rgb01(rgb: Sequence[float]) -> tuple[float, float, float]:
    c = np.asarray(rgb, float)[:3]
    return tuple((c / 255.0 if c.max(initial=0) > 1.0 else c).tolist())


def image_grid(image: np.ndarray, affine: np.ndarray):
    """``image`` (X, Y, Z) as ``pyvista.ImageData`` in world mm (axis-aligned affines only).

    Raises:
        ValueError: the affine rotates or shears (the SynthBrain grid never does).
    """
    pv = _pyvista()
    affine = np.asarray(affine, float)
    lin = affine[:3, :3]
    if not np.allclose(lin, np.diag(np.diag(lin))) or np.any(np.diag(lin) <= 0):
        raise ValueError("volume rendering needs an axis-aligned RAS+ affine (positive diagonal, no rotation)")
    grid = pv.ImageData(dimensions=image.shape, spacing=tuple(np.diag(lin)), origin=tuple(affine[:3, 3]))
    grid.point_data["T1"] = np.asarray(image, np.float32).ravel(order="F")
    return grid


def _finish(pl, title: str):
    pl.add_text(title, font_size=8, color="white", position="lower_left")
    pl.add_axes()
    pl.camera_position = "yz"  # from the right
    pl.camera.azimuth = 30
    pl.camera.elevation = 20
    pl.reset_camera()
    return pl


def surface_plotter(
    meshes: Mapping[str, object],
    colors: Mapping[str, Sequence[float]],
    visible: Sequence[str] | None = None,
    *,
    outer=None,
    outer_opacity: float = 0.15,
    window_size: tuple[int, int] = WINDOW,
    title: str = "SYNTHETIC - not for clinical use",
):
    """A plotter with one coloured surface per visible structure and an optional translucent outer surface."""
    pv = _pyvista()
    pl = pv.Plotter(window_size=list(window_size), off_screen=True)
    pl.background_color = "#111111"
    names = list(meshes) if visible is None else [n for n in visible if n in meshes]
    for name in names:
        mesh = meshes[name]
        if getattr(mesh, "n_points", 0) == 0:
            continue
        pl.add_mesh(mesh, color=_rgb01(colors.get(name, (0.8, 0.8, 0.8))), smooth_shading=True, name=name)
    if outer is not None and getattr(outer, "n_points", 0) > 0:
        pl.add_mesh(outer, color="white", opacity=float(outer_opacity), name="outer surface")
    return _finish(pl, title)


def isosurface_plotter(
    image: np.ndarray,
    affine: np.ndarray,
    level: float = 0.3,
    *,
    color: Sequence[float] = (0.93, 0.80, 0.75),
    window_size: tuple[int, int] = WINDOW,
    title: str = "SYNTHETIC - not for clinical use",
):
    """A plotter with the intensity isosurface of ``image`` at ``level`` (no segmentation needed).

    Raises:
        ValueError: ``level`` is outside the image's intensities (the surface would be empty).
    """
    pv = _pyvista()
    lo, hi = float(np.min(image)), float(np.max(image))
    if not lo < level < hi:
        raise ValueError(f"isosurface level must lie within the image's intensities {lo:.2f}-{hi:.2f}, got {level:.2f}")
    surface = image_grid(image, affine).contour([float(level)], scalars="T1")
    pl = pv.Plotter(window_size=list(window_size), off_screen=True)
    pl.background_color = "#111111"
    pl.add_mesh(surface, color=tuple(color), smooth_shading=True, name="isosurface")
    return _finish(pl, title)


def render_volume(
    image: np.ndarray,
    affine: np.ndarray,
    *,
    window: tuple[float, float] = (0.15, 1.0),
    azimuth: float = 0.0,
    elevation: float = 20.0,
    cmap: str = "bone",
    opacity: str | Sequence[float] = "sigmoid",
    window_size: tuple[int, int] = WINDOW,
) -> np.ndarray:
    """A volume rendering of ``image`` drawn off-screen by VTK, as an ``(H, W, 3)`` uint8 picture.

    Rendered on the server because vtk.js (the browser side of stpyvista) draws an exported volume
    only after the first mouse interaction. ``azimuth``/``elevation`` (degrees) turn the camera
    from the subject's right.
    """
    _pyvista()
    with _RENDER_LOCK:
        pl = volume_plotter(image, affine, window=window, cmap=cmap, opacity=opacity, window_size=window_size)
        try:
            pl.camera_position = "yz"
            pl.reset_camera()
            pl.camera.azimuth = float(azimuth)
            pl.camera.elevation = float(elevation)
            pl.camera.zoom(1.5)
            pl.reset_camera_clipping_range()
            return np.asarray(pl.screenshot(return_img=True))[..., :3].copy()
        finally:
            pl.close()


def volume_plotter(
    image: np.ndarray,
    affine: np.ndarray,
    *,
    window: tuple[float, float] = (0.05, 1.0),
    cmap: str = "bone",
    opacity: str | Sequence[float] = "sigmoid",
    window_size: tuple[int, int] = WINDOW,
    title: str = "SYNTHETIC - not for clinical use",
):
    """A plotter with a volume rendering of ``image`` (intensities ``window`` mapped to the colour map)."""
    pv = _pyvista()
    pl = pv.Plotter(window_size=list(window_size), off_screen=True)
    pl.background_color = "#111111"
    pl.add_volume(image_grid(image, affine), scalars="T1", cmap=cmap, clim=list(window), opacity=opacity, show_scalar_bar=False)
    return _finish(pl, title)
