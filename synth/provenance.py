"""Provenance that travels: what made a file, carried from a SynthBrain NIfTI into what is made from it.

A generated brain is written as ``brain.nii.gz`` plus its JSON sidecar ``brain.json`` (model,
version, seed, condition, the synthetic notice, ...). Every command that reads such a NIfTI
(``segment``, ``export``, ``compress``, ``cohort``, ``evaluate``, ...) should carry that record
into what it writes and add its own step, so that a USD scene, a mesh or a label map still says
which model, version, seed and condition made the brain it shows. The helpers here do the
reading, extending and path handling; writers put the resulting dict where their format has
room (JSON sidecar, USD ``customData``, mesh comments, NIfTI ``descrip``).

Paths are recorded relative (to the models folder, or to the working folder) or as a bare file
or model name, never as a machine's absolute path.

Example (a new command that reads a NIfTI and writes ``out.json``)::

    from synth import provenance

    prov = provenance.read_sidecar(args.input)            # {} for a user's own image
    prov = provenance.extend(prov, "compress", input=args.input, quality=3)
    write_json("out.json", prov)                          # or: save_nifti(..., descrip=provenance.descrip(prov))

The record is a flat dict: the carried fields of :data:`CARRIED_FIELDS` (``model``,
``model_version``, ``seed``, ``condition``, ...), ``notice``/``synthetic``, ``source`` (the input's
file name) and ``history``, a list of steps ``{"command", "synth_version", "time", ...}``, oldest
first (``steps`` stays what a generated brain's sidecar means by it: the number of DDIM steps).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

from .io import SYNTHETIC_NOTICE, nifti_suffix
from .version import __version__

__all__ = [
    "CARRIED_FIELDS",
    "USER_IMAGE",
    "descrip",
    "extend",
    "read_sidecar",
    "relative_path",
    "short_label",
    "step",
]

USER_IMAGE = "user image"
# Fields of a generated brain's sidecar that every file made from it keeps.
CARRIED_FIELDS = (
    "generator",
    "model",
    "model_version",
    "model_source",
    "synth_version",
    "seed",
    "condition",
    "target_volumes_fraction_of_icv",
    "background",
    "sampler",
    "steps",
    "guidance_scale",
    "created",
    "source",
)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def relative_path(path: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """``path`` as it may be recorded: relative to ``base`` (default: the working folder) when
    inside it, else only its name. Never an absolute path.

    Example:
        >>> relative_path("/home/ana/models/tiny", base="/home/ana")
        'models/tiny'
        >>> relative_path("/data/brains/a.nii.gz", base="/home/ana")
        'a.nii.gz'
    """
    p = Path(path)
    if not p.is_absolute():
        p = Path.cwd() / p
    base_p = Path(base) if base is not None else Path.cwd()
    for a, b in ((p, base_p), (p.resolve(), base_p.resolve())):
        try:
            rel = a.relative_to(b)
        except ValueError:
            continue
        text = rel.as_posix()
        return text if text not in ("", ".") else p.name
    return p.name


def model_reference(folder: str | os.PathLike, models_root: str | os.PathLike | None = None) -> str:
    """How to record where a model came from: its name when it lies in the models folder
    (``$SYNTHBRAIN_MODELS`` or ``assets/models``), else a relative path or its folder name."""
    if not str(folder):
        return ""
    if models_root is None:
        env = os.environ.get("SYNTHBRAIN_MODELS")
        models_root = Path(env) if env else Path(__file__).resolve().parents[1] / "assets" / "models"
    p = Path(folder)
    try:
        return p.resolve().relative_to(Path(models_root).resolve()).as_posix()
    except (ValueError, OSError):
        return relative_path(p)


def step(command: str, **details: Any) -> dict[str, Any]:
    """One step of a file's history: ``{"command", "synth_version", "time", **details}``.

    Path-like details (``Path`` objects, or values of keys named ``input``/``output``/``*_path``)
    are recorded with :func:`relative_path`.
    """
    out: dict[str, Any] = {"command": str(command), "synth_version": __version__, "time": _now()}
    for key, value in details.items():
        if value is None:
            continue
        if isinstance(value, Path) or (isinstance(value, str) and (key in ("input", "output") or key.endswith("_path"))):
            value = relative_path(value)
        out[key] = value
    return out


def read_sidecar(nifti_path: str | os.PathLike) -> dict[str, Any]:
    """The carried provenance of a NIfTI: its SynthBrain JSON sidecar's fields, or ``{}``.

    ``brain.nii.gz`` -> ``brain.json``. A missing sidecar (a user's own image) gives ``{}``; an
    unreadable one or one that is not a SynthBrain record warns and gives ``{}`` (the image is
    still usable, its history is not). ``source`` is set to the NIfTI's file name.

    Returns:
        ``{field: value}`` for the fields of :data:`CARRIED_FIELDS` present, plus ``notice``,
        ``synthetic`` and ``history`` (the sidecar's, or the generation step it implies).
    """
    path = Path(nifti_path)
    try:
        side = path.with_name(path.name[: -len(nifti_suffix(path))] + ".json")
    except ValueError:
        return {}
    if not side.is_file():
        return {}
    try:
        data = json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        warnings.warn(f"ignoring the sidecar {side.name}: not readable JSON ({exc})", stacklevel=2)
        return {}
    if not isinstance(data, Mapping) or not (data.get("synthetic") is True or "notice" in data):
        warnings.warn(f"ignoring the sidecar {side.name}: not a SynthBrain provenance record", stacklevel=2)
        return {}
    prov: dict[str, Any] = {k: data[k] for k in CARRIED_FIELDS if k in data}
    if isinstance(prov.get("model_source"), str) and os.path.isabs(prov["model_source"]):
        prov["model_source"] = Path(prov["model_source"]).name  # older sidecars recorded an absolute path
    prov["notice"] = SYNTHETIC_NOTICE
    prov["synthetic"] = True
    history = data.get("history")
    if isinstance(history, list) and all(isinstance(s, Mapping) for s in history):
        prov["history"] = [dict(s) for s in history]
    elif "model" in data:  # an older sidecar: its one step was the generation
        prov["history"] = [{"command": "generate", "synth_version": data.get("synth_version", "?"),
                            "time": data.get("created", "?")}]
    else:
        prov["history"] = []
    prov.setdefault("source", path.name)
    return prov


def extend(provenance: Mapping[str, Any] | None, command: str, **details: Any) -> dict[str, Any]:
    """A copy of ``provenance`` with the step ``command`` (see :func:`step`) appended to ``history``.

    An empty ``provenance`` (a user's own image) becomes ``{"model": "user image", ...}`` so the
    output still says it did not come from a SynthBrain model, and always carries the notice.
    """
    prov = dict(provenance or {})
    prov.setdefault("model", USER_IMAGE)
    prov["notice"] = SYNTHETIC_NOTICE
    prov.setdefault("synthetic", prov["model"] != USER_IMAGE)
    prov["history"] = [*list(prov.get("history") or []), step(command, **details)]
    return prov


def short_label(provenance: Mapping[str, Any]) -> str:
    """A compact one-line summary: ``synthbrain-ldm-2mm 0.3.1 seed 3 72y F AD``."""
    parts = [str(provenance.get("model", "?"))]
    if provenance.get("model_version"):
        parts.append(str(provenance["model_version"]))
    if provenance.get("seed") is not None:
        parts.append(f"seed {provenance['seed']}")
    cond = provenance.get("condition")
    if isinstance(cond, Mapping):
        age = cond.get("age")
        age_text = f"{float(age):g}y" if isinstance(age, (int, float)) else "?y"
        parts.append(f"{age_text} {cond.get('sex', '?')} {cond.get('diagnosis', '?')}")
    return " ".join(parts)


def descrip(provenance: Mapping[str, Any], what: str = "") -> str:
    """A NIfTI ``descrip`` (at most 79 ASCII characters): the notice, then :func:`short_label`."""
    text = "SYNTHETIC not for clinical use; " + (f"{what} " if what else "") + short_label(provenance)
    return text.encode("ascii", "replace").decode()[:79]
