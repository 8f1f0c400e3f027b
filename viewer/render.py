"""Pure image helpers of the viewer: orthogonal slices, label overlays, difference maps, PNG and GIF.

No Streamlit here, so everything is testable and fast: a slice redraw is numpy indexing, a lookup
table and one PIL resize (a few milliseconds for the 2 mm grid), never a matplotlib figure.

Volumes are ``(X, Y, Z)`` arrays in RAS+ voxel order (``synth.SyntheticBrain.image``). Slices are
drawn in neurological convention: the subject's right on the right of the image, anterior or
superior at the top.
"""

from __future__ import annotations

import io
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "PLANES",
    "SYNTHETIC_LABEL",
    "colorbar",
    "crosshair_rc",
    "diff_colors",
    "difference_map",
    "gif_bytes",
    "hover_html",
    "label_lut",
    "montage",
    "orthogonal_views",
    "parse_window",
    "png_bytes",
    "render_slice",
    "stamp",
    "take_slice",
]

# Plane name -> the volume axis it cuts (RAS+: x left->right, y posterior->anterior, z inferior->superior).
PLANES: dict[str, int] = {"axial": 2, "coronal": 1, "sagittal": 0}
SYNTHETIC_LABEL = "SYNTHETIC - not for clinical use"


def _check_volume(volume: np.ndarray, name: str = "volume") -> np.ndarray:
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"`{name}` must be a 3D (X, Y, Z) array, got shape {volume.shape}")
    return volume


def _check_plane(plane: str) -> int:
    if plane not in PLANES:
        raise ValueError(f"`plane` must be one of {', '.join(PLANES)}, got {plane!r}")
    return PLANES[plane]


def take_slice(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """The 2D display array of ``volume`` cut by ``plane`` at voxel ``index``.

    Args:
        volume: (X, Y, Z) array, RAS+.
        plane: ``axial`` (cuts z), ``coronal`` (cuts y) or ``sagittal`` (cuts x).
        index: Voxel index along the cut axis.

    Returns:
        (rows, cols) view: axial (Y, X) anterior up; coronal (Z, X) superior up;
        sagittal (Z, Y) superior up, anterior right.
    """
    volume = _check_volume(volume)
    axis = _check_plane(plane)
    n = volume.shape[axis]
    if not 0 <= int(index) < n:
        raise ValueError(f"{plane} slice index must be within 0-{n - 1}, got {index}")
    cut = np.take(volume, int(index), axis=axis)  # the two remaining axes, in RAS order
    return cut.T[::-1]


def crosshair_rc(shape: Sequence[int], plane: str, position: Sequence[int]) -> tuple[int, int]:
    """Row and column of the voxel ``position`` (x, y, z) in the ``plane`` view of a ``shape`` volume."""
    axis = _check_plane(plane)
    a, b = [i for i in range(3) if i != axis]
    return shape[b] - 1 - int(position[b]), int(position[a])


def parse_window(window: Sequence[float]) -> tuple[float, float]:
    """Check an intensity window ``(low, high)``; raise ``ValueError`` with what to fix."""
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"`window` must be two numbers (low, high), got {window!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        raise ValueError(f"`window` must have low < high, got ({lo:g}, {hi:g})")
    return lo, hi


def label_lut(colors: Mapping[int, Sequence[float]] | Iterable, size: int = 256) -> np.ndarray:
    """A (size, 3) uint8 colour table, label id -> RGB, label 0 black.

    Args:
        colors: ``{label: rgb}`` or structures with ``.label`` and ``.rgb`` (``synth.anatomy.STRUCTURES``);
            RGB as 0-1 floats or 0-255 integers.
    """
    items = colors.items() if isinstance(colors, Mapping) else ((s.label, s.rgb) for s in colors)
    lut = np.zeros((size, 3), np.uint8)
    for label, rgb in items:
        rgb = np.asarray(rgb, float)[:3]
        if rgb.max(initial=0) <= 1.0:
            rgb = rgb * 255.0
        if 0 < int(label) < size:
            lut[int(label)] = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    return lut


def _gray(slice2d: np.ndarray, lo: float, hi: float) -> np.ndarray:
    g = (slice2d.astype(np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(g, 0, 255).astype(np.uint8)


def _upscale(rgb: np.ndarray, zoom: int) -> np.ndarray:
    if zoom == 1:
        return rgb
    return np.repeat(np.repeat(rgb, zoom, axis=0), zoom, axis=1)


def render_slice(
    image: np.ndarray,
    plane: str,
    position: Sequence[int],
    *,
    window: Sequence[float] = (0.0, 1.0),
    labels: np.ndarray | None = None,
    lut: np.ndarray | None = None,
    opacity: float = 0.4,
    crosshair: bool = True,
    zoom: int = 3,
    crosshair_rgb: Sequence[int] = (255, 214, 0),
) -> np.ndarray:
    """One RGB slice with an optional label overlay and crosshair.

    Args:
        image: (X, Y, Z) intensities.
        plane: ``axial``, ``coronal`` or ``sagittal``.
        position: Voxel (x, y, z) of the cursor; the plane cuts through it.
        window: Intensities mapped to black and white.
        labels: Optional (X, Y, Z) integer labels, same shape as ``image``.
        lut: (256, 3) uint8 label colours (:func:`label_lut`); required with ``labels``.
        opacity: Overlay opacity, 0-1.
        crosshair: Draw the two lines through ``position``.
        zoom: Integer pixel replication (nearest neighbour), so the browser shows crisp voxels.

    Returns:
        (rows * zoom, cols * zoom, 3) uint8.
    """
    image = _check_volume(image, "image")
    lo, hi = parse_window(window)
    if len(position) != 3:
        raise ValueError(f"`position` must be a voxel (x, y, z), got {position!r}")
    if not 0.0 <= float(opacity) <= 1.0:
        raise ValueError(f"`opacity` must be within 0-1, got {opacity}")
    if int(zoom) < 1:
        raise ValueError(f"`zoom` must be a positive integer, got {zoom}")
    axis = _check_plane(plane)
    g = _gray(take_slice(image, plane, position[axis]), lo, hi)
    rgb = np.repeat(g[..., None], 3, axis=2)
    if labels is not None and opacity > 0:
        labels = _check_volume(labels, "labels")
        if labels.shape != image.shape:
            raise ValueError(f"`labels` shape {labels.shape} differs from `image` shape {image.shape}")
        if lut is None:
            raise ValueError("`lut` is required with `labels`: build one with label_lut(STRUCTURES)")
        lab = take_slice(labels, plane, position[axis]).astype(np.intp, copy=False)
        lab = np.clip(lab, 0, len(lut) - 1)
        mask = lab > 0
        if mask.any():
            col = lut[lab[mask]].astype(np.float32)
            rgb[mask] = (rgb[mask] * (1.0 - opacity) + col * opacity).astype(np.uint8)
    rgb = _upscale(rgb, int(zoom))
    if crosshair:
        r, c = crosshair_rc(image.shape, plane, position)
        z = int(zoom)
        rr, cc = r * z + z // 2, c * z + z // 2
        line = np.asarray(crosshair_rgb, np.uint8)
        rgb[rr, :] = line
        rgb[:, cc] = line
    return rgb


def orthogonal_views(image: np.ndarray, position: Sequence[int], **kwargs) -> dict[str, np.ndarray]:
    """``{plane: rgb}`` for the axial, coronal and sagittal planes through ``position``."""
    return {plane: render_slice(image, plane, position, **kwargs) for plane in PLANES}


def montage(images: Sequence[np.ndarray], gap: int = 4, background: int = 0) -> np.ndarray:
    """Place RGB images side by side, bottom-padded to the tallest, ``gap`` pixels apart."""
    if not images:
        raise ValueError("`images` is empty: nothing to place")
    h = max(im.shape[0] for im in images)
    parts = []
    for i, im in enumerate(images):
        pad = np.full((h, im.shape[1], 3), background, np.uint8)
        pad[: im.shape[0]] = im
        parts.append(pad)
        if gap and i < len(images) - 1:
            parts.append(np.full((h, gap, 3), background, np.uint8))
    return np.concatenate(parts, axis=1)


def diff_colors(n: int = 256) -> np.ndarray:
    """(n, 3) uint8 blue-white-red diverging table (matplotlib ``RdBu_r``), negative -> blue."""
    from matplotlib import colormaps

    return (colormaps["RdBu_r"](np.linspace(0.0, 1.0, n))[:, :3] * 255).round().astype(np.uint8)


_DIFF_LUT: np.ndarray | None = None


def difference_map(a: np.ndarray, b: np.ndarray, *, vmax: float | None = None) -> tuple[np.ndarray, float]:
    """Colour ``b - a`` (2D or 3D arrays of equal shape) blue (b lower) to red (b higher).

    Args:
        a, b: Arrays of the same shape, e.g. the same slice of two brains.
        vmax: Magnitude mapped to full colour; default the 99th percentile of ``|b - a|``.

    Returns:
        ``(rgb, vmax)``: uint8 ``(*shape, 3)`` and the scale used (for the colour bar's caption).
    """
    global _DIFF_LUT
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare arrays of shapes {a.shape} and {b.shape}")
    d = b - a
    if vmax is None:
        vmax = float(np.percentile(np.abs(d), 99)) if d.size else 0.0
    vmax = float(vmax) if vmax and vmax > 0 else 1e-6
    if _DIFF_LUT is None:
        _DIFF_LUT = diff_colors()
    idx = np.clip(np.round((d / vmax + 1.0) * 127.5), 0, 255).astype(np.intp)
    return _DIFF_LUT[idx], vmax


def colorbar(
    lut: np.ndarray, vmin: float, vmax: float, *, width: int = 288, height: int = 14, label: str = "", ticks: int = 5
) -> np.ndarray:
    """A horizontal colour bar of ``lut`` ((n, 3) uint8) from ``vmin`` to ``vmax`` with tick values.

    Returns:
        (height + 30, width + 20, 3) uint8 on a dark background, tick labels under the bar.
    """
    from PIL import Image, ImageDraw

    if not vmax > vmin:
        raise ValueError(f"colour bar needs vmin < vmax, got ({vmin:g}, {vmax:g})")
    lut = np.asarray(lut, np.uint8)
    idx = np.linspace(0, len(lut) - 1, width).round().astype(np.intp)
    pad = 10
    im = Image.new("RGB", (width + 2 * pad, height + 30), (17, 17, 17))
    im.paste(Image.fromarray(np.repeat(lut[idx][None], height, axis=0)), (pad, 2))
    draw = ImageDraw.Draw(im)
    for i in range(ticks):
        f = i / (ticks - 1)
        x = pad + int(round(f * (width - 1)))
        draw.line((x, height + 2, x, height + 6), fill=(220, 220, 220))
        text = f"{vmin + f * (vmax - vmin):+.2g}" if vmin < 0 < vmax else f"{vmin + f * (vmax - vmin):.2g}"
        tw = draw.textlength(text)
        draw.text((min(max(0, x - tw / 2), im.width - tw), height + 7), text, fill=(230, 230, 230))
    if label:
        draw.text((pad, height + 18), label, fill=(200, 200, 200))
    return np.asarray(im)


def stamp(rgb: np.ndarray, text: str = SYNTHETIC_LABEL) -> np.ndarray:
    """Burn ``text`` into the bottom-left corner of an RGB image (so a copied picture still says it)."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    draw = ImageDraw.Draw(im)
    x, y = 3, im.height - 13
    draw.rectangle((0, y - 2, min(im.width, 6 * len(text) + 6), im.height), fill=(0, 0, 0))
    draw.text((x, y), text, fill=(255, 214, 0))
    return np.asarray(im)


def hover_html(
    image: np.ndarray,
    position: Sequence[int],
    views: Mapping[str, np.ndarray],
    *,
    labels: np.ndarray | None = None,
    names: Mapping[int, str] | None = None,
    affine: np.ndarray | None = None,
) -> str:
    """A self-contained HTML page (no external script) of the three plane pictures with a hover readout.

    Moving the mouse over a plane shows, under the pictures, the voxel, MNI mm, T1 intensity and the
    structure's name there: the page carries each plane's intensities (8 bits) and labels, so the
    readout needs no round trip to the server.

    Args:
        image: (X, Y, Z) intensities 0-1, the volume ``views`` were drawn from.
        position: The voxel (x, y, z) the planes cut through.
        views: ``{plane: rgb}`` from :func:`orthogonal_views` (any integer zoom).
        labels: Optional (X, Y, Z) labels; ``names`` maps label -> structure name.
        affine: Voxel -> MNI mm, for the mm readout.
    """
    import base64
    import html as html_lib
    import json

    affine = np.eye(4) if affine is None else np.asarray(affine, float)
    panes, data = [], {}
    for plane in ("axial", "coronal", "sagittal"):
        axis = PLANES[plane]
        cut = take_slice(image, plane, position[axis])
        inten = np.clip(np.round(np.asarray(cut, np.float32) * 255), 0, 255).astype(np.uint8)
        lab = None if labels is None else np.clip(take_slice(labels, plane, position[axis]), 0, 255).astype(np.uint8)
        a, b = [i for i in range(3) if i != axis]
        data[plane] = {
            "rows": int(cut.shape[0]), "cols": int(cut.shape[1]), "axis": axis, "a": a, "b": b,
            "nb": int(image.shape[b]), "index": int(position[axis]),
            "t1": base64.b64encode(inten.tobytes()).decode(),
            "labels": None if lab is None else base64.b64encode(lab.tobytes()).decode(),
        }
        png = base64.b64encode(png_bytes(views[plane])).decode()
        panes.append(
            f'<figure><img id="{plane}" data-plane="{plane}" src="data:image/png;base64,{png}" alt="{plane}">'
            f"<figcaption>{plane}</figcaption></figure>"
        )
    names_js = json.dumps({int(k): str(v) for k, v in (names or {}).items()})
    return f"""<!doctype html><html><head><meta charset="utf-8"><style>
body {{ margin: 0; background: #0e1117; color: #fafafa; font: 14px sans-serif; }}
.row {{ display: flex; gap: 8px; }} figure {{ flex: 1; margin: 0; text-align: center; }}
img {{ width: 100%; image-rendering: pixelated; cursor: crosshair; }} figcaption {{ color: #aaa; font-size: 12px; }}
#readout {{ padding: 6px 2px; min-height: 20px; }}
</style></head><body>
<div class="row">{''.join(panes)}</div>
<div id="readout" data-testid="hover-readout">Hover over a slice: voxel, MNI mm, T1 intensity and structure.</div>
<script>
const D = {json.dumps(data)};
const NAMES = {names_js};
const A = {json.dumps(affine.tolist())};
function dec(s) {{ const b = atob(s); const u = new Uint8Array(b.length); for (let i = 0; i < b.length; i++) u[i] = b.charCodeAt(i); return u; }}
for (const p in D) {{ D[p].t1a = dec(D[p].t1); D[p].laba = D[p].labels ? dec(D[p].labels) : null; }}
function esc(t) {{ return String(t).replace(/[&<>]/g, c => ({{'&':'&amp;','<':'&lt;','>':'&gt;'}}[c])); }}
document.querySelectorAll('img[data-plane]').forEach(img => img.addEventListener('mousemove', ev => {{
  const d = D[img.dataset.plane], r = img.getBoundingClientRect();
  const col = Math.floor((ev.clientX - r.left) / r.width * d.cols), row = Math.floor((ev.clientY - r.top) / r.height * d.rows);
  if (col < 0 || row < 0 || col >= d.cols || row >= d.rows) return;
  const v = [0, 0, 0]; v[d.axis] = d.index; v[d.a] = col; v[d.b] = d.nb - 1 - row;
  const mm = [0, 1, 2].map(i => A[i][0] * v[0] + A[i][1] * v[1] + A[i][2] * v[2] + A[i][3]);
  const k = row * d.cols + col, t1 = d.t1a[k] / 255;
  let text = `${{img.dataset.plane}} · voxel (${{v.join(', ')}}) · MNI (${{mm.map(m => m.toFixed(0)).join(', ')}}) mm · T1 intensity ${{t1.toFixed(3)}}`;
  if (d.laba) {{ const l = d.laba[k]; text += ' · structure: ' + (l === 0 ? 'background' : esc(NAMES[l] || ('label ' + l))); }}
  document.getElementById('readout').innerHTML = text;
}}));
</script></body></html>"""


def png_bytes(rgb: np.ndarray, metadata: Mapping[str, str] | None = None) -> bytes:
    """Encode an RGB array as PNG; ``metadata`` goes into tEXt chunks (e.g. the synthetic notice)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(str(k), str(v))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def gif_bytes(frames: Sequence[np.ndarray], fps: float = 4.0, comment: str = SYNTHETIC_LABEL) -> bytes:
    """An endlessly looping animated GIF of equally sized RGB ``frames`` (imageio)."""
    import imageio.v3 as iio

    if len(frames) == 0:
        raise ValueError("`frames` is empty: render at least one frame")
    if not 0 < float(fps) <= 50:
        raise ValueError(f"`fps` must be within 0-50 frames per second, got {fps}")
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise ValueError(f"all frames must have the same shape, got {sorted(shapes)}")
    stack = np.stack([np.asarray(f, np.uint8) for f in frames])
    return iio.imwrite("<bytes>", stack, extension=".gif", duration=1000.0 / float(fps), loop=0, comment=comment)
