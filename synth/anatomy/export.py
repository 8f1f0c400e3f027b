"""Write labels and meshes: NIfTI + JSON label table, OpenUSD (.usda/.usdc/.usdz), STL, PLY, OBJ, GLB.

Every file says that it is synthetic / not for clinical use where the format has room for it: the
NIfTI ``descrip``, USD layer documentation and ``customData``, PLY and OBJ comments, the binary STL
header, glTF ``asset.copyright`` and ``extras``. All writes are atomic (:func:`synth.io.atomic_path`).

Units and axes: NIfTI, USD, STL, PLY and OBJ are in RAS millimetres (USD says so with
``metersPerUnit = 0.001`` and ``upAxis = Z``); GLB follows glTF (metres, +Y up, +Z anterior).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from .. import provenance
from ..brain import sidecar_path
from ..io import SYNTHETIC_NOTICE, atomic_path, save_nifti, write_json
from .labels import STRUCTURES, label_table, structure_by_name

if TYPE_CHECKING:
    import pyvista

__all__ = [
    "MESH_FORMATS",
    "USD_FORMATS",
    "NOTICE",
    "export_meshes",
    "export_usd",
    "save_labels",
    "validate_usd",
]

NOTICE = "synthetic, not for clinical use"
USD_FORMATS = (".usda", ".usdc", ".usdz")
MESH_FORMATS = (".stl", ".ply", ".obj", ".glb")


def _suffix(path: str | os.PathLike, allowed: tuple[str, ...], what: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in allowed:
        raise ValueError(f"unknown {what} format {suffix or '(none)'!r} for {str(path)!r}; supported: {', '.join(allowed)}")
    return suffix


def _check_meshes(meshes: Mapping[str, "pyvista.PolyData"]) -> None:
    if not isinstance(meshes, Mapping) or not meshes:
        raise ValueError("`meshes` must be a non-empty mapping of structure name -> PolyData")
    for name, mesh in meshes.items():
        if mesh.n_points == 0 or mesh.n_cells == 0:
            raise ValueError(f"mesh {name!r} is empty")
        if not mesh.is_all_triangles:
            raise ValueError(f"mesh {name!r} must be triangles only (call .triangulate())")


def _faces(mesh) -> np.ndarray:
    """(F, 3) triangle vertex indices of a triangulated PolyData."""
    return np.asarray(mesh.faces).reshape(-1, 4)[:, 1:]


def _rgb(name: str, mesh) -> tuple[int, int, int]:
    if "rgb" in mesh.field_data.keys():
        return tuple(int(v) for v in np.asarray(mesh.field_data["rgb"])[:3])
    try:
        return structure_by_name(name).rgb
    except ValueError:
        return (200, 200, 200)


def _label(name: str, mesh) -> int:
    if "label" in mesh.field_data.keys():
        return int(np.asarray(mesh.field_data["label"])[0])
    try:
        return structure_by_name(name).label
    except ValueError:
        return 0


def _plain(value: Any) -> Any:
    """A value USD ``customData`` and JSON both accept: scalars, strings and nested dicts."""
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    return json.dumps(value, default=str)


def _prim_name(name: str) -> str:
    """A valid USD prim name: letters, digits, underscores, not starting with a digit."""
    ident = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return ident if ident and not ident[0].isdigit() else "_" + ident


def _metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    meta = dict(metadata or {})
    meta.setdefault("notice", NOTICE)
    meta["synthetic_notice"] = SYNTHETIC_NOTICE
    return meta


# -- OpenUSD ------------------------------------------------------------------------------------
def _usd_stage(stage, meshes: Mapping[str, "pyvista.PolyData"], meta: dict[str, Any]) -> None:
    from pxr import Gf, Sdf, UsdGeom, UsdShade, Vt

    UsdGeom.SetStageMetersPerUnit(stage, 0.001)  # millimetres
    UsdGeom.SetStageUpAxis(stage, UsdGeom.Tokens.z)  # RAS: +Z is superior
    stage.GetRootLayer().documentation = f"SynthBrain anatomy: {SYNTHETIC_NOTICE}"
    world = UsdGeom.Xform.Define(stage, "/World")
    stage.SetDefaultPrim(world.GetPrim())
    world.GetPrim().SetCustomData(_plain({k: v for k, v in meta.items() if k != "volumes_mm3"}))
    UsdGeom.Scope.Define(stage, "/World/Looks")
    UsdGeom.Xform.Define(stage, "/World/Anatomy")
    volumes = meta.get("volumes_mm3", {})
    for name, mesh in meshes.items():
        prim_name = _prim_name(name)
        rgb = Gf.Vec3f(*[c / 255.0 for c in _rgb(name, mesh)])
        geom = UsdGeom.Mesh.Define(stage, f"/World/Anatomy/{prim_name}")
        points = np.asarray(mesh.points, dtype=np.float32)
        faces = _faces(mesh)
        geom.CreatePointsAttr(Vt.Vec3fArray.FromNumpy(points))
        geom.CreateFaceVertexCountsAttr(Vt.IntArray.FromNumpy(np.full(len(faces), 3, dtype=np.int32)))
        geom.CreateFaceVertexIndicesAttr(Vt.IntArray.FromNumpy(faces.astype(np.int32).ravel()))
        if "Normals" in mesh.point_data.keys():
            geom.CreateNormalsAttr(Vt.Vec3fArray.FromNumpy(np.asarray(mesh.point_data["Normals"], dtype=np.float32)))
            geom.SetNormalsInterpolation(UsdGeom.Tokens.vertex)
        geom.CreateSubdivisionSchemeAttr(UsdGeom.Tokens.none)
        geom.CreateOrientationAttr(UsdGeom.Tokens.rightHanded)
        geom.CreateDoubleSidedAttr(False)
        lo, hi = points.min(0), points.max(0)
        geom.CreateExtentAttr(Vt.Vec3fArray([Gf.Vec3f(*map(float, lo)), Gf.Vec3f(*map(float, hi))]))
        geom.CreateDisplayColorPrimvar(UsdGeom.Tokens.constant).Set(Vt.Vec3fArray([rgb]))
        prim = geom.GetPrim()
        prim.SetDisplayName(name)
        prim.SetCustomData(
            _plain(
                {
                    "structure": name,
                    "label": _label(name, mesh),
                    "volume_mm3": float(volumes.get(name, float("nan"))) if name in volumes else None,
                    "model": meta.get("model"),
                    "segmenter": meta.get("segmenter"),
                    "seed": meta.get("seed"),
                    "condition": meta.get("condition"),
                    "notice": NOTICE,
                }
            )
        )
        material = UsdShade.Material.Define(stage, f"/World/Looks/{prim_name}_Material")
        shader = UsdShade.Shader.Define(stage, f"/World/Looks/{prim_name}_Material/PreviewSurface")
        shader.CreateIdAttr("UsdPreviewSurface")
        shader.CreateInput("diffuseColor", Sdf.ValueTypeNames.Color3f).Set(rgb)
        shader.CreateInput("roughness", Sdf.ValueTypeNames.Float).Set(0.6)
        shader.CreateInput("metallic", Sdf.ValueTypeNames.Float).Set(0.0)
        material.CreateSurfaceOutput().ConnectToSource(shader.ConnectableAPI(), "surface")
        UsdShade.MaterialBindingAPI.Apply(prim).Bind(material)


def export_usd(path: str | os.PathLike, meshes: Mapping[str, "pyvista.PolyData"], metadata: Mapping[str, Any] | None = None) -> Path:
    """Write meshes as an OpenUSD stage (``.usda`` text, ``.usdc`` binary or ``.usdz`` package).

    Layout: ``/World`` (default prim, ``customData`` = ``metadata``), ``/World/Anatomy/<Name>``
    one ``Mesh`` per structure (points in mm, vertex normals, constant ``displayColor``,
    ``customData`` with structure, label id, volume, model, seed, condition and the synthetic
    notice), ``/World/Looks/<Name>_Material`` a ``UsdPreviewSurface`` bound to it. Stage
    ``metersPerUnit`` 0.001, ``upAxis`` Z.

    Args:
        path: Output file; the suffix picks the format.
        meshes: ``{structure name: triangulated PolyData}`` in world mm.
        metadata: Provenance: ``model``, ``seed``, ``condition``, ``volumes_mm3`` ({name: mm^3}), ...

    Raises:
        ValueError: unknown suffix or empty meshes.
        ImportError: usd-core is not installed.
    """
    suffix = _suffix(path, USD_FORMATS, "USD")
    _check_meshes(meshes)
    try:
        from pxr import Usd, UsdUtils
    except ImportError:  # pragma: no cover
        raise ImportError("USD export needs usd-core: pip install usd-core") from None
    meta = _metadata(metadata)
    path = Path(path)
    with atomic_path(path) as tmp:
        if suffix == ".usdz":
            with tempfile.TemporaryDirectory() as d:
                inner = Path(d) / (path.stem + ".usdc")
                stage = Usd.Stage.CreateNew(str(inner))
                _usd_stage(stage, meshes, meta)
                stage.GetRootLayer().Save()
                del stage
                if not UsdUtils.CreateNewUsdzPackage(str(inner), str(tmp)):
                    raise RuntimeError(f"could not package {path}")
        else:
            tmp.unlink()  # Sdf refuses to create a layer over an existing file
            stage = Usd.Stage.CreateNew(str(tmp))
            _usd_stage(stage, meshes, meta)
            stage.GetRootLayer().Save()
            del stage
    return path


def validate_usd(path: str | os.PathLike) -> list[str]:
    """Run every registered ``pxr.UsdValidation`` validator on a USD file; return the error messages.

    Warnings are not returned; an empty list means the file passed.
    """
    from pxr import Usd, UsdValidation

    stage = Usd.Stage.Open(str(path))
    if stage is None:
        raise ValueError(f"could not open {path} as USD")
    registry = UsdValidation.ValidationRegistry()
    context = UsdValidation.ValidationContext(registry.GetOrLoadAllValidators())
    errors = context.Validate(stage)
    return [e.GetMessage() for e in errors if e.GetType() == UsdValidation.ValidationErrorType.Error]


# -- STL / PLY / OBJ / GLB ------------------------------------------------------------------------
def _trimesh(name: str, mesh, scale: float = 1.0, rotation: np.ndarray | None = None):
    import trimesh

    v = np.asarray(mesh.points, dtype=np.float64) * scale
    n = np.asarray(mesh.point_data["Normals"], dtype=np.float64) if "Normals" in mesh.point_data.keys() else None
    if rotation is not None:
        v = v @ rotation.T
        n = n @ rotation.T if n is not None else None
    colors = np.tile(np.array([*_rgb(name, mesh), 255], dtype=np.uint8), (len(v), 1))
    return trimesh.Trimesh(vertices=v, faces=_faces(mesh), vertex_normals=n, vertex_colors=colors, process=False)


def stl_header(meta: Mapping[str, Any]) -> bytes:
    """The 80-byte binary STL header: notice, seed and condition first, then model and version.

    e.g. ``SYNTHETIC not for clinical use; seed 3; 72y F AD; synthbrain-ldm-2mm 0.3.1; RAS mm``
    (cut at 80 bytes; never starting with ``solid``, which would mark an ASCII STL).
    """
    parts = ["SYNTHETIC not for clinical use"]
    if meta.get("seed") is not None:
        parts.append(f"seed {meta['seed']}")
    cond = meta.get("condition")
    if isinstance(cond, Mapping):
        age = cond.get("age")
        parts.append(f"{float(age):g}y {cond.get('sex', '?')} {cond.get('diagnosis', '?')}" if isinstance(age, (int, float))
                     else f"? {cond.get('sex', '?')} {cond.get('diagnosis', '?')}")
    model = " ".join(str(meta[k]) for k in ("model", "model_version") if meta.get(k))
    if model:
        parts.append(model)
    parts.append("RAS mm")
    return "; ".join(parts).encode("ascii", "replace")[:80].ljust(80, b" ")


def _provenance_lines(meta: Mapping[str, Any]) -> list[str]:
    """Comment lines (ASCII, one line each) for PLY and OBJ: notice, model, seed, condition, history."""
    lines = [f"SynthBrain: {SYNTHETIC_NOTICE}", "units: RAS millimetres"]
    for key in ("model", "model_version", "seed", "condition", "target_volumes_fraction_of_icv", "segmenter", "source", "history"):
        if meta.get(key) is not None:
            value = meta[key] if isinstance(meta[key], str) else json.dumps(_plain(meta[key]) if key != "history" else meta[key], default=str)
            lines.append(f"{key}: {value}")
    return [" ".join(line.split()).encode("ascii", "replace").decode() for line in lines]


def _write_stl(tmp: Path, tri, meta: Mapping[str, Any]) -> None:
    """Binary STL (mm) with the notice, seed and condition in its 80-byte header."""
    header = stl_header(meta)
    normals = np.asarray(tri.face_normals, dtype="<f4")
    tris = np.asarray(tri.vertices, dtype="<f4")[tri.faces]
    record = np.zeros(len(tri.faces), dtype=[("n", "<f4", 3), ("v", "<f4", (3, 3)), ("attr", "<u2")])
    record["n"], record["v"] = normals, tris
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(np.uint32(len(tri.faces)).tobytes())
        f.write(record.tobytes())


def _ply_with_comments(data: bytes, names: list[str], meta: Mapping[str, Any]) -> bytes:
    head, sep, body = data.partition(b"end_header\n")
    lines = head.split(b"\n")
    comments = [f"comment {line}" for line in _provenance_lines(meta)] + [f"comment structures: {', '.join(names)}"]
    lines[2:2] = [c.encode("ascii", "replace") for c in comments]  # after 'ply' and 'format ...'
    return b"\n".join(lines) + sep + body


def export_meshes(path: str | os.PathLike, meshes: Mapping[str, "pyvista.PolyData"], metadata: Mapping[str, Any] | None = None) -> Path:
    """Write meshes to one ``.stl``, ``.ply``, ``.obj`` or ``.glb`` file.

    STL, PLY and OBJ hold one combined mesh in RAS millimetres (PLY and OBJ with per-vertex
    colours); GLB keeps one named node per structure with its colour, in glTF's metres and axes,
    and the metadata in ``asset.extras``.

    Raises:
        ValueError: unknown suffix or empty meshes.
    """
    suffix = _suffix(path, MESH_FORMATS, "mesh")
    _check_meshes(meshes)
    import trimesh

    meta = _metadata(metadata)
    path = Path(path)
    names = list(meshes)
    with atomic_path(path) as tmp:
        if suffix == ".glb":
            tmp.write_bytes(_glb(meshes, meta))
            return path
        combined = trimesh.util.concatenate([_trimesh(n, m) for n, m in meshes.items()])
        if suffix == ".stl":
            _write_stl(tmp, combined, meta)
        elif suffix == ".ply":
            tmp.write_bytes(_ply_with_comments(trimesh.exchange.ply.export_ply(combined, encoding="binary"), names, meta))
        else:  # .obj
            text = trimesh.exchange.obj.export_obj(combined, include_color=True, include_normals=True, header=None)
            head = "".join(f"# {line}\n" for line in _provenance_lines(meta)) + f"# structures: {', '.join(names)}\n"
            tmp.write_text(head + text)
    return path


# glTF: +Y up, +Z forward, metres. RAS (x right, y anterior, z superior) -> glTF (-x, z, y).
_RAS_TO_GLTF = np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])


def _glb(meshes: Mapping[str, "pyvista.PolyData"], meta: dict[str, Any]) -> bytes:
    import trimesh
    from trimesh.exchange.gltf import export_glb
    from trimesh.visual.material import PBRMaterial

    scene = trimesh.Scene()
    for name, mesh in meshes.items():
        tri = _trimesh(name, mesh, scale=0.001, rotation=_RAS_TO_GLTF)
        rgba = [*(c / 255.0 for c in _rgb(name, mesh)), 1.0]
        tri.visual = trimesh.visual.TextureVisuals(material=PBRMaterial(name=f"{name}_Material", baseColorFactor=rgba, roughnessFactor=0.6, metallicFactor=0.0))
        tri.metadata["name"] = name
        scene.add_geometry(tri, node_name=name, geom_name=name)
    extras = _plain({**meta, "units": "metres (glTF)", "axes": "glTF +Y superior, +Z anterior, -X right"})

    def post(tree: dict) -> None:
        tree.setdefault("asset", {})["copyright"] = f"SynthBrain - {NOTICE}"
        tree["asset"]["extras"] = extras
        labels = {s.name: s.label for s in STRUCTURES}
        for node in tree.get("nodes", []):
            if node.get("name") in meshes:
                node["extras"] = {"structure": node["name"], "label": labels.get(node["name"], 0), "notice": NOTICE}

    return export_glb(scene, tree_postprocessor=post)


# -- labels ---------------------------------------------------------------------------------------
def save_labels(path: str | os.PathLike, labels: np.ndarray, affine: np.ndarray, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a compact label map as NIfTI (``uint8``, intent ``label``) plus a JSON sidecar.

    The sidecar (``labels.nii.gz`` -> ``labels.json``) holds the label table (id, name, colour,
    MUSE labels), the metadata and the synthetic notice.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"`labels` must be a 3D (X, Y, Z) label map, got shape {labels.shape}")
    if labels.dtype.kind not in "iu" or (labels.size and (labels.min() < 0 or labels.max() > len(STRUCTURES))):
        raise ValueError(f"`labels` must be integer compact labels 0-{len(STRUCTURES)}")
    meta = _metadata(metadata)
    path = Path(path)
    descrip = provenance.descrip(meta, "labels of")
    save_nifti(path, labels.astype(np.uint8), affine, descrip=descrip, intent="label")
    background = {"label": 0, "name": "Background", "rgb": [0, 0, 0], "muse": [0]}
    write_json(sidecar_path(path), {**meta, "labels": [background, *label_table()]})
    return path
