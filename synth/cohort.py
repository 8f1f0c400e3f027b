"""Synthetic cohorts as a BIDS derivative data set: one command, resumable, on one machine or many.

A :class:`CohortSpec` (number of subjects, age range, fraction of women, diagnosis mix, model,
segmenter, seed) fixes every subject in advance: its condition and its sampler seed are derived
from the spec alone (:func:`plan`), so the same spec gives the same cohort on the same device
whatever the order in which subjects are made, the number of worker processes or ranks, or how
often the run was interrupted. :func:`make_cohort` writes::

    DIR/
      dataset_description.json   DatasetType "derivative", GeneratedBy (SynthBrain, model, segmenter)
      README                     what this is; synthetic, not for clinical use
      participants.tsv / .json   condition, seed, requested and measured volumes; every column described
      dseg.tsv                   the label table of every sub-*_dseg.nii.gz
      code/cohort_spec.json      the spec (give it back with --spec to remake or resume the cohort)
      code/models/<name>/MODEL_CARD.md   the generator's and the segmenter's cards, when they have one
      sub-0001/anat/sub-0001_T1w.nii.gz + .json    the brain and its provenance
      sub-0001/anat/sub-0001_dseg.nii.gz + .json   its labels, with provenance and measured volumes

A subject is made in ``DIR/.partial/sub-XXXX`` and moved into place by one ``rename`` once all its
files are written, so ``DIR/sub-XXXX`` exists only complete; a killed run leaves at most partial
folders, which the next run deletes and remakes. The tables are rebuilt from the finished subjects.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) each rank makes every ``WORLD_SIZE``-th of the
subjects still to do; rank 0 writes the tables after a barrier (gloo, so it works on CPU and GPU).

The generator is used only through its public API (``synth.load_generator``, ``generate``,
``SyntheticBrain.save``/``metadata``), so any backend with that API makes cohorts unchanged.

Example::

    synthbrain cohort --n 1000 --age 40:90 --sex-ratio 0.5 --diagnosis CN:0.6,MCI:0.2,AD:0.2 --out cohort/
    torchrun --nproc_per_node 4 -m synth.cli cohort --spec spec.yaml --out cohort/
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import io as _io
import json
import math
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .condition import AGE_RANGE, DIAGNOSES, TRAINING_AGE_RANGE, VOLUME_KEYS, Condition
from .io import SYNTHETIC_NOTICE, atomic_path, read_json, write_json

__all__ = [
    "CohortSpec",
    "CohortResult",
    "Subject",
    "load_spec",
    "plan",
    "make_cohort",
    "write_tables",
    "done_subjects",
    "add_parser",
]

DEFAULT_MODEL = "synthbrain-ldm-2mm"  # synth.pipeline.DEFAULT_MODEL, named here to keep torch unimported
DEFAULT_SEGMENTER = "synthbrain-seg-2mm"  # synth.anatomy.DEFAULT_SEGMENTER
MAX_SUBJECTS = 1_000_000
MAX_SEED = 2**63 - 1
SPEC_FILE = Path("code") / "cohort_spec.json"
PARTIAL = ".partial"
BIDS_VERSION = "1.10.0"
SPEC_SUFFIXES = (".json", ".yaml", ".yml")


# -- the spec -----------------------------------------------------------------------------------
def _parse_int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, str)):
        raise ValueError(f"`{name}` must be an integer within {lo}-{hi}, got {value!r}")
    try:
        v = int(value)
    except ValueError:
        raise ValueError(f"`{name}` must be an integer within {lo}-{hi}, got {value!r}") from None
    if not lo <= v <= hi:
        raise ValueError(f"`{name}` must be an integer within {lo}-{hi}, got {v}")
    return v


def _parse_float(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be a number within {lo:g}-{hi:g}, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a number within {lo:g}-{hi:g}, got {value!r}") from None
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ValueError(f"`{name}` must be a number within {lo:g}-{hi:g}, got {value!r}")
    return v


def _parse_age_range(value: Any) -> tuple[float, float]:
    """``"40:90"``, ``[40, 90]`` or ``55`` (one age) -> ``(40.0, 90.0)``, within :data:`AGE_RANGE`."""
    lo_ok, hi_ok = AGE_RANGE
    expect = f"`age` must be LO:HI years within {lo_ok:g}-{hi_ok:g} (e.g. 40:90)"
    if isinstance(value, str):
        parts = value.split(":")
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value, value]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ValueError(f"{expect}, got {value!r}")
    try:
        lo, hi = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"{expect}, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo_ok <= lo <= hi <= hi_ok):
        raise ValueError(f"{expect}, got {value!r}")
    return lo, hi


def _parse_diagnosis_mix(value: Any) -> dict[str, float]:
    """``"CN:0.6,MCI:0.2,AD:0.2"``, ``{"CN": 0.6, ...}`` or ``"AD"`` -> fractions summing to 1."""
    expect = f"`diagnosis` must be a mix like CN:0.6,MCI:0.2,AD:0.2 over {', '.join(DIAGNOSES)} summing to 1"
    if isinstance(value, str):
        items = []
        for part in value.split(","):
            key, sep, frac = part.partition(":")
            items.append((key, frac if sep else "1"))
    elif isinstance(value, Mapping):
        items = list(value.items())
    else:
        raise ValueError(f"{expect}, got {value!r}")
    mix: dict[str, float] = {}
    for key, frac in items:
        name = str(key).strip().upper()
        if name not in DIAGNOSES or name in mix:
            raise ValueError(f"{expect}, got {value!r}")
        try:
            f = float(frac)
        except (TypeError, ValueError):
            raise ValueError(f"{expect}, got {value!r}") from None
        if not (math.isfinite(f) and 0.0 <= f <= 1.0):
            raise ValueError(f"{expect}, got {value!r}")
        mix[name] = f
    if not mix or abs(sum(mix.values()) - 1.0) > 1e-6:
        raise ValueError(f"{expect}, got {value!r}")
    return {d: mix[d] for d in DIAGNOSES if mix.get(d, 0.0) > 0}


def _parse_name(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"`{name}` must be a model name or folder, got {value!r}")
    return value.strip()


@dataclass(frozen=True)
class CohortSpec:
    """What a cohort is made of; every subject follows from it (see :func:`plan`).

    Args:
        n: Number of subjects (1-1,000,000).
        age: ``(lo, hi)`` years; ages are drawn uniformly in it, to 0.1 year (the shipped model
            saw 20-82 and extrapolates outside).
        sex_ratio: Fraction of women (``F``); the cohort holds ``round(n * sex_ratio)`` of them.
        diagnosis: Fractions of ``CN``, ``MCI`` and ``AD``, summing to 1; the counts follow them
            exactly (largest remainder), in an order shuffled by the seed.
        model: Generator name or folder (:func:`synth.load_generator`).
        segmenter: Segmenter name or folder (:func:`synth.anatomy.load_segmenter`).
        seed: Seed of the whole cohort; each subject's sampler seed is derived from it.
        steps: DDIM steps (``None``: the model's default).
        guidance_scale: Classifier-free guidance (``None``: the model's default).
        match_volumes: Warp each brain to its requested ventricle and hippocampus volumes with the
            cohort's segmenter (:func:`synth.anatomy.match_brain_volumes`) before it is written;
            recorded in every subject's sidecar.

    Example:
        >>> spec = CohortSpec(n=4, age=(40, 90), diagnosis={"CN": 0.5, "AD": 0.5}, seed=1)
        >>> [s.participant_id for s in plan(spec)]
        ['sub-0001', 'sub-0002', 'sub-0003', 'sub-0004']
    """

    n: int
    age: tuple[float, float] = (40.0, 90.0)
    sex_ratio: float = 0.5
    diagnosis: Mapping[str, float] = field(default_factory=lambda: {"CN": 1.0})
    model: str = DEFAULT_MODEL
    segmenter: str = DEFAULT_SEGMENTER
    seed: int = 0
    steps: int | None = None
    guidance_scale: float | None = None
    match_volumes: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", _parse_int("n", self.n, 1, MAX_SUBJECTS))
        object.__setattr__(self, "age", _parse_age_range(self.age))
        object.__setattr__(self, "sex_ratio", _parse_float("sex_ratio", self.sex_ratio, 0.0, 1.0))
        object.__setattr__(self, "diagnosis", _parse_diagnosis_mix(self.diagnosis))
        object.__setattr__(self, "model", _parse_name("model", self.model))
        object.__setattr__(self, "segmenter", _parse_name("segmenter", self.segmenter))
        object.__setattr__(self, "seed", _parse_int("seed", self.seed, 0, MAX_SEED))
        if self.steps is not None:
            object.__setattr__(self, "steps", _parse_int("steps", self.steps, 1, 1000))
        if self.guidance_scale is not None:
            object.__setattr__(self, "guidance_scale", _parse_float("guidance_scale", self.guidance_scale, 0.0, 20.0))
        if not isinstance(self.match_volumes, bool):
            raise ValueError(f"`match_volumes` must be true or false, got {self.match_volumes!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CohortSpec":
        """Build from a mapping (a spec file's content); unknown keys are an error."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a cohort spec must be a mapping of {', '.join(cls.fields())}, got {type(d).__name__}")
        d = {str(k).replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(d) - set(cls.fields()))
        if unknown:
            raise ValueError(f"unknown cohort spec keys {unknown}; expected {', '.join(cls.fields())}")
        if "n" not in d:
            raise ValueError("a cohort spec needs `n`, the number of subjects")
        return cls(**d)

    @staticmethod
    def fields() -> tuple[str, ...]:
        return ("n", "age", "sex_ratio", "diagnosis", "model", "segmenter", "seed", "steps", "guidance_scale",
                "match_volumes")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["age"] = list(self.age)
        d["diagnosis"] = dict(self.diagnosis)
        if not self.match_volumes:  # absent when off: cohorts made before the option keep their digest
            d.pop("match_volumes")
        return d

    def digest(self) -> str:
        """Short SHA-256 of the canonical spec: names the cohort in its files."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_spec(path: str | os.PathLike) -> dict[str, Any]:
    """Read a spec file (``.json``, ``.yaml`` or ``.yml``) as a mapping (not yet validated)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SPEC_SUFFIXES:
        raise ValueError(f"unknown spec format {suffix or '(none)'!r} for {str(path)!r}; supported: {', '.join(SPEC_SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"no such spec file: {path}")
    text = path.read_text()
    try:
        if suffix == ".json":
            data = json.loads(text)
        else:
            try:
                import yaml
            except ImportError:  # pragma: no cover - pyyaml is in requirements.txt
                raise ValueError("reading a YAML spec needs PyYAML: pip install pyyaml") from None
            data = yaml.load(text, Loader=_spec_loader(yaml))
    except ValueError as exc:  # json.JSONDecodeError and yaml.YAMLError both end up here
        raise ValueError(f"could not read the spec {path}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # yaml.YAMLError is not a ValueError
        raise ValueError(f"could not read the spec {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"the spec {path} must hold a mapping of {', '.join(CohortSpec.fields())}")
    return dict(data)


def _spec_loader(yaml):
    """A safe YAML loader that reads ``40:90`` as text: YAML 1.1 would read it as the base-60
    integer 2490, which is not what a spec means by an age range."""

    class SpecLoader(yaml.SafeLoader):
        pass

    def number_or_text(loader, node):
        value = loader.construct_scalar(node)
        if ":" in value:
            return value
        return (yaml.SafeLoader.construct_yaml_int if node.tag.endswith(":int") else yaml.SafeLoader.construct_yaml_float)(loader, node)

    for tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
        SpecLoader.add_constructor(tag, number_or_text)
    return SpecLoader


# -- the subjects -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Subject:
    """One planned subject: its BIDS label, condition and sampler seed."""

    index: int
    label: str
    condition: Condition
    seed: int

    @property
    def participant_id(self) -> str:
        return f"sub-{self.label}"


def _counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Integer counts summing to ``n`` closest to ``n * fractions`` (largest remainder; ties to the first)."""
    raw = [n * f for f in fractions]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _stream(seed: int, purpose: int, *index: int) -> np.random.Generator:
    """An independent random stream for one purpose (and subject) of a cohort seed."""
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, purpose, *index]))


def plan(spec: CohortSpec) -> list[Subject]:
    """Every subject of ``spec``, in order: a pure function of the spec.

    Diagnoses and sexes follow the spec's fractions exactly and are shuffled by the seed; each
    age is drawn uniformly from the range by a stream of its own, and each sampler seed is a
    32-bit number of another stream, so a subject does not depend on any other being made.
    """
    width = max(4, len(str(spec.n)))
    diagnoses = [d for d, c in zip(spec.diagnosis, _counts(spec.n, list(spec.diagnosis.values()))) for _ in range(c)]
    diagnoses = [diagnoses[i] for i in _stream(spec.seed, 1).permutation(spec.n)]
    n_f = _counts(spec.n, [spec.sex_ratio, 1.0 - spec.sex_ratio])[0]
    sexes = ["F" if i < n_f else "M" for i in _stream(spec.seed, 2).permutation(spec.n)]
    lo, hi = spec.age
    subjects = []
    with warnings.catch_warnings():  # one warning for the range (make_cohort), not one per subject
        warnings.simplefilter("ignore")
        for i in range(spec.n):
            age = round(float(_stream(spec.seed, 3, i).uniform(lo, hi)), 1) if hi > lo else lo
            seed = int(_stream(spec.seed, 4, i).integers(0, 2**32))
            cond = Condition(age=min(max(age, lo), hi), sex=sexes[i], diagnosis=diagnoses[i])
            subjects.append(Subject(i, f"{i + 1:0{width}d}", cond, seed))
    return subjects


def _anat(root: Path, label: str) -> Path:
    return root / f"sub-{label}" / "anat"


def _files(label: str) -> tuple[str, ...]:
    stem = f"sub-{label}"
    return (f"{stem}_T1w.nii.gz", f"{stem}_T1w.json", f"{stem}_dseg.nii.gz", f"{stem}_dseg.json")


def is_done(root: str | os.PathLike, subject: Subject) -> bool:
    """Whether ``subject`` is complete in ``root`` (its folder appears only whole, see module doc)."""
    anat = _anat(Path(root), subject.label)
    return all((anat / f).is_file() for f in _files(subject.label))


def done_subjects(root: str | os.PathLike, spec: CohortSpec) -> list[Subject]:
    """The subjects of ``spec`` already complete in ``root``, in order."""
    return [s for s in plan(spec) if is_done(root, s)]


# -- the data set folder ------------------------------------------------------------------------
def check_out_dir(root: str | os.PathLike, spec: CohortSpec) -> bool:
    """Raise ``ValueError`` unless ``root`` is new, empty, or a cohort of this very spec.

    Returns whether ``root`` already holds this spec (a resumed run).
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"--out must be a folder, got the file {root}")
    if not root.exists() or not any(root.iterdir()):
        return False
    stored = root / SPEC_FILE
    if not stored.is_file():
        raise ValueError(f"{root} is not empty and holds no {SPEC_FILE.as_posix()}: choose a new or empty --out folder")
    try:
        old = CohortSpec.from_dict(read_json(stored))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{stored} is not a valid cohort spec ({exc}); choose a new --out folder") from None
    if old != spec:
        diff = [k for k in CohortSpec.fields() if getattr(old, k) != getattr(spec, k)]
        raise ValueError(
            f"{root} holds a cohort of another spec (differs in {', '.join(diff)}); "
            f"resume it with --spec {stored} or choose a new --out folder"
        )
    for sub in root.glob("sub-*"):
        label = sub.name[4:]
        if sub.is_dir() and not all((sub / "anat" / f).is_file() for f in _files(label)):
            raise ValueError(f"{sub} is incomplete but not in {PARTIAL}/: it was not made by this command; remove it")
    return True


def _write_spec(root: Path, spec: CohortSpec) -> None:
    path = root / SPEC_FILE
    if not path.is_file():
        write_json(path, spec.to_dict())


# -- making subjects ----------------------------------------------------------------------------
def _generate_kwargs(spec: CohortSpec) -> dict[str, Any]:
    """Only what the spec sets goes to ``generate``: the public API stays ``generate(condition, seed)``."""
    kw: dict[str, Any] = {}
    if spec.steps is not None:
        kw["steps"] = spec.steps
    if spec.guidance_scale is not None:
        kw["guidance_scale"] = spec.guidance_scale
    return kw


def _voxel_volume(affine: np.ndarray) -> float:
    return round(float(abs(np.linalg.det(np.asarray(affine, float)[:3, :3]))), 6)  # 2 mm voxels: 8.0, not 7.9999...


def make_subject(root: Path, subject: Subject, spec: CohortSpec, generator, segmenter,
                 made_by: Mapping[str, int] | None = None) -> Path:
    """Generate, segment, measure and write one subject; its folder appears only when complete.

    ``made_by`` (e.g. ``{"rank": 1, "world_size": 4}``) is recorded in the sidecars.
    """
    from .anatomy import measure_volumes, save_labels

    partial = root / PARTIAL / f"sub-{subject.label}"
    shutil.rmtree(partial, ignore_errors=True)  # what a killed run left of this subject
    anat = partial / "anat"
    anat.mkdir(parents=True)
    names = _files(subject.label)
    try:
        kw = _generate_kwargs(spec)
        if "threads" in inspect.signature(generator.generate).parameters:
            # The thread count the cohort set (one per worker), fixed: the generator would otherwise pick
            # and re-pick its own from the load, and the files would depend on what else ran.
            import torch

            kw["threads"] = torch.get_num_threads()
        brain = generator.generate(subject.condition, seed=subject.seed, progress=False, **kw)
        if spec.match_volumes:
            from .anatomy import match_brain_volumes

            brain, _ = match_brain_volumes(brain, segmenter)
        t1 = anat / names[0]
        brain.save(t1)
        meta = read_json(anat / names[1])
        cohort = {"participant_id": subject.participant_id, "index": subject.index, "spec": SPEC_FILE.as_posix(),
                  "spec_digest": spec.digest(), **(made_by or {})}
        write_json(anat / names[1], {**meta, "SkullStripped": True, "cohort": cohort})
        labels = segmenter.segment(brain.image)
        volumes = measure_volumes(labels, _voxel_volume(brain.affine))
        seg_meta = {
            **_carried(meta, t1),
            "segmenter": getattr(segmenter, "name", "?"),
            "segmenter_version": getattr(getattr(segmenter, "config", None), "version", "?"),
            "volumes_mm3": volumes,
            "cohort": cohort,
        }
        save_labels(anat / names[2], labels, brain.affine, seg_meta)
        os.replace(partial, root / f"sub-{subject.label}")  # one rename: the subject appears whole
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return root / f"sub-{subject.label}"


def _carried(meta: Mapping[str, Any], t1: Path) -> dict[str, Any]:
    """The generated brain's provenance, carried into its label map's sidecar."""
    try:
        from . import provenance
    except ImportError:  # pragma: no cover - before synth.provenance existed
        return {k: v for k, v in meta.items() if k in ("model", "model_version", "seed", "condition", "notice")}
    prov = provenance.read_sidecar(t1)
    prov["source"] = t1.name
    return provenance.extend(prov, "cohort-segment", input=t1.name)


# -- the tables ---------------------------------------------------------------------------------
def _structures() -> list[str]:
    from .anatomy.labels import STRUCTURES

    return [s.name for s in STRUCTURES]


def _participant_columns(target_keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """participants.json: every column of participants.tsv with its description (and units)."""
    from .anatomy.labels import TOTALS

    cols: dict[str, dict[str, Any]] = {
        "participant_id": {"Description": "synthetic subject label (sub-<index>); no real person"},
        "age": {"Description": "requested age at scan", "Units": "year"},
        "sex": {"Description": "requested sex", "Levels": {"F": "female", "M": "male"}},
        "diagnosis": {"Description": "requested diagnosis, expressed through volume targets (see README)",
                      "Levels": {"CN": "cognitively normal", "MCI": "mild cognitive impairment", "AD": "Alzheimer's disease"}},
        "seed": {"Description": "seed of the generator's sampler noise for this subject (derived from the cohort spec)"},
    }
    for k in target_keys:
        cols[f"requested_{k}"] = {"Description": f"{k.replace('_', ' ')} volume the generator was conditioned on, "
                                                f"as a fraction of intracranial volume (normative model + diagnosis effect)"}
    for name in TOTALS:
        cols[f"{name}_mm3"] = {"Description": f"measured {name.replace('_', ' ')} volume (segmenter labels, see dseg.tsv)",
                               "Units": "mm^3"}
    for k in target_keys:
        cols[f"measured_{k}"] = {"Description": f"measured {k.replace('_', ' ')} volume as a fraction of measured "
                                               f"intracranial volume (compare requested_{k})"}
    for name in _structures():
        cols[f"{name}_mm3"] = {"Description": f"measured volume of {name} (segmenter labels)", "Units": "mm^3"}
    return cols


def _tsv(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), delimiter="\t", lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: _cell(r.get(c)) for c in columns})
    return buf.getvalue()


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:.6g}"  # mm^3 are whole numbers
    return str(v)


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _find_card(name_or_folder: str) -> Path | None:
    from .pipeline import models_dir

    for folder in (Path(name_or_folder), models_dir() / name_or_folder):
        if (folder / "MODEL_CARD.md").is_file():
            return folder / "MODEL_CARD.md"
    return None


def write_tables(root: str | os.PathLike, spec: CohortSpec) -> list[Subject]:
    """(Re)write participants.tsv/.json, dseg.tsv, dataset_description.json, README and the model
    cards from the subjects complete in ``root``. Returns those subjects."""
    from .anatomy.labels import STRUCTURES, TOTALS
    from .version import __version__

    root = Path(root)
    done = done_subjects(root, spec)
    rows, target_keys, models = [], [], {}
    for s in done:
        anat = _anat(root, s.label)
        t1 = read_json(anat / f"sub-{s.label}_T1w.json")
        seg = read_json(anat / f"sub-{s.label}_dseg.json")
        targets = t1.get("target_volumes_fraction_of_icv") or {}
        target_keys += [k for k in VOLUME_KEYS if k in targets and k not in target_keys]
        vols = seg.get("volumes_mm3", {})
        row = {"participant_id": s.participant_id, "age": s.condition.age, "sex": s.condition.sex,
               "diagnosis": s.condition.diagnosis, "seed": s.seed}
        row.update({f"requested_{k}": v for k, v in targets.items()})
        row.update({f"{k}_mm3": v for k, v in vols.items()})
        icv = vols.get("icv") or float("nan")
        row.update({f"measured_{k}": vols[k] / icv for k in VOLUME_KEYS if k in vols})
        rows.append(row)
        models[("generator", t1.get("model", "?"), t1.get("model_version", "?"))] = None
        models[("segmenter", seg.get("segmenter", "?"), seg.get("segmenter_version", "?"))] = None
    target_keys = [k for k in VOLUME_KEYS if k in target_keys]
    columns = _participant_columns(target_keys)
    _write_text(root / "participants.tsv", _tsv(rows, list(columns)))
    write_json(root / "participants.json", columns)
    dseg = [{"index": s.label, "name": s.name, "color": "#{:02x}{:02x}{:02x}".format(*s.rgb)} for s in STRUCTURES]
    _write_text(root / "dseg.tsv", _tsv(dseg, ["index", "name", "color"]))

    cards = {}
    for kind, name in (("generator", spec.model), ("segmenter", spec.segmenter)):
        card = _find_card(name)
        if card is not None:
            dest = root / "code" / "models" / Path(name).name / "MODEL_CARD.md"
            with atomic_path(dest) as tmp:
                shutil.copyfile(card, tmp)
            cards[kind] = dest.relative_to(root).as_posix()
    generated_by = [{
        "Name": "SynthBrain",
        "Version": __version__,
        "Description": f"synthbrain cohort from {SPEC_FILE.as_posix()} (spec {spec.digest()}). {SYNTHETIC_NOTICE}.",
    }]
    for kind, name, version in models:
        card = cards.get(kind, "no model card shipped with this model")
        generated_by.append({"Name": name, "Version": version,
                             "Description": f"{kind} model; card: {card}. {SYNTHETIC_NOTICE}."})
    description = {
        "Name": f"SynthBrain synthetic cohort {spec.digest()} (SYNTHETIC, NOT FOR CLINICAL USE)",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": generated_by,
        "License": "Synthetic images from models trained on IXI (CC BY-SA 3.0); research and education only, not for clinical use",
        "HowToAcknowledge": "Say that the images are synthetic, made by SynthBrain; cite the model cards in code/models.",
        "Synthetic": True,
        "SyntheticNotice": SYNTHETIC_NOTICE,
        "CohortSpec": spec.to_dict(),
        "SubjectsComplete": f"{len(done)} of {spec.n}",
    }
    write_json(root / "dataset_description.json", description)
    _write_text(root / "README", _readme(spec, len(done)))
    return done


def _readme(spec: CohortSpec, n_done: int) -> str:
    mix = ", ".join(f"{d} {f:.0%}" for d, f in spec.diagnosis.items())
    return (
        f"SynthBrain synthetic cohort\n===========================\n\n{SYNTHETIC_NOTICE}.\n\n"
        f"Every image here was generated by a model: no subject is a real person. Made by `synthbrain cohort` "
        f"from code/cohort_spec.json (spec {spec.digest()}): {spec.n} subjects ({n_done} complete), ages "
        f"{spec.age[0]:g}-{spec.age[1]:g}, {spec.sex_ratio:.0%} women, {mix}; generator {spec.model}, "
        f"segmenter {spec.segmenter}, seed {spec.seed}.\n\n"
        "Each sub-*/anat holds the T1w image (MNI152 2 mm, RAS, skull-stripped, intensities in [0, 1]) with its "
        "provenance sidecar, and its label map (dseg, labels in dseg.tsv) with the measured volumes. "
        "participants.tsv lists the requested condition and volumes beside the measured ones; participants.json "
        "describes every column. A diagnosis is expressed through volume targets (the training data holds "
        "healthy volunteers only).\n"
    )


# -- running ------------------------------------------------------------------------------------
@dataclass
class CohortResult:
    """What :func:`make_cohort` did: the data set folder, subjects made now and complete in all."""

    root: Path
    made: int
    complete: int
    total: int
    seconds: float

    @property
    def brains_per_minute(self) -> float:
        return 60.0 * self.made / self.seconds if self.seconds > 0 and self.made else 0.0


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))


def _device_for(device: str, local_rank: int, world: int) -> str:
    if world > 1 and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            return f"cuda:{local_rank % torch.cuda.device_count()}"
    return device


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _load_models(spec: CohortSpec, device: str):
    import synth
    from .anatomy import load_segmenter

    return synth.load_generator(spec.model, device=device), load_segmenter(spec.segmenter, device=device)


def _run_shard(root: Path, spec: CohortSpec, subjects: Sequence[Subject], generator, segmenter,
               made_by: Mapping[str, int], on_done: Callable[[Subject], None] | None = None) -> int:
    for s in subjects:
        make_subject(root, s, spec, generator, segmenter, made_by)
        if on_done:
            on_done(s)
    return len(subjects)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies, so a killed run leaves no worker behind."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the worker still stops at its next subject
        pass


def _worker(root: str, spec_dict: dict, indices: list[int], device: str, made_by: dict, parent: int) -> None:
    """One ``--workers`` process: make the subjects ``indices`` on one thread (spawned, so it imports afresh)."""
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the line above took effect
        return
    import torch

    torch.set_num_threads(1)
    spec = CohortSpec.from_dict(spec_dict)
    subjects = plan(spec)
    gen, seg = _load_models(spec, device)
    _run_shard(Path(root), spec, [subjects[i] for i in indices], gen, seg, made_by)


@contextmanager
def _one_cpu_thread(device: str):
    """Generate on one torch thread when on CPU (restored afterwards).

    The files then do not depend on how many workers or ranks share the machine: convolutions on
    two threads round differently from one (seen on the shipped model), and one thread per
    process also costs less CPU per brain (bench_cohort: 5.1 against 6.6 CPU s).
    """
    import synth

    if synth.pick_device(device).type != "cpu":
        yield
        return
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _warn_ages(spec: CohortSpec) -> None:
    lo, hi = TRAINING_AGE_RANGE
    if spec.age[0] < lo or spec.age[1] > hi:
        warnings.warn(f"ages {spec.age[0]:g}-{spec.age[1]:g} reach outside the training ages {lo:g}-{hi:g}: "
                      "the model extrapolates there", stacklevel=3)


def default_workers() -> int:
    """``--workers auto``: one process per available core, at most 4 (each holds both models)."""
    from .runtime import usable_cpus

    return max(1, min(usable_cpus(), 4))


def make_cohort(spec: CohortSpec, out: str | os.PathLike, *, device: str = "auto", workers: int = 1,
                progress: bool = True) -> CohortResult:
    """Make (or resume) the cohort of ``spec`` in the folder ``out``.

    Args:
        spec: The cohort.
        out: Data set folder: new, empty, or one this spec already began (it resumes).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``. Under ``torchrun`` on CUDA each
            rank takes the GPU of its ``LOCAL_RANK``.
        workers: CPU processes on one machine (:func:`default_workers` is one per core); not with
            ``torchrun``, where the ranks are the workers. On CPU every process generates on one
            torch thread, so the files do not depend on the number of workers or ranks.
        progress: A progress bar with ETA (rank 0 only).

    Raises:
        ValueError: ``out`` holds something else (another spec, a foreign folder), bad ``workers``.
    """
    if not isinstance(spec, CohortSpec):
        raise TypeError(f"`spec` must be a CohortSpec, got {type(spec).__name__}")
    rank, world, local = _dist_env()
    workers = _parse_int("workers", workers, 1, 256)
    if workers > 1 and world > 1:
        raise ValueError("--workers must be 1 under torchrun (each rank is a worker)")
    if workers > 1 and device not in ("cpu", "auto"):
        raise ValueError(f"--workers is for CPU runs; with --device {device} use torchrun (one rank per GPU)")
    if workers > 1 and device == "auto":
        import synth

        if synth.pick_device("auto").type != "cpu":
            workers = 1  # a GPU: one process (torchrun for several GPUs)
    root = Path(out)
    check_out_dir(root, spec)
    _warn_ages(spec)
    t0 = time.time()
    subjects = plan(spec)
    if world > 1:
        import datetime

        import torch.distributed as dist

        if not dist.is_initialized():  # gloo: the barriers need no GPU; a shard may take days
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=30))
    device = _device_for(device, local, world)
    gen = seg = None
    if workers == 1:
        gen, seg = _load_models(spec, device)  # a wrong model fails here, before anything is written
    elif rank == 0:
        _load_models(spec, "cpu")  # check that they load before starting processes
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _write_spec(root, spec)
    _barrier(world)
    todo = [s for s in subjects if not is_done(root, s)]
    _barrier(world)  # every rank has listed what is left before any rank makes more
    mine = todo[rank::world]
    workers = min(workers, max(1, len(todo)))
    if workers == 1 and gen is None:  # fewer subjects left than workers asked for
        gen, seg = _load_models(spec, device)
    from tqdm.auto import tqdm

    desc = "cohort" if world == 1 else f"cohort rank 0/{world}"
    bar = tqdm(total=len(todo) if workers > 1 else len(mine), desc=desc, unit="brain",
               disable=not progress or rank != 0, dynamic_ncols=True)
    if workers == 1:
        with _one_cpu_thread(device):
            _run_shard(root, spec, mine, gen, seg, {"rank": rank, "world_size": world}, on_done=lambda s: bar.update(1))
    else:
        _run_workers(root, spec, todo, workers, bar)
    bar.close()
    made = len(mine) if workers == 1 else len(todo)
    _barrier(world)
    complete = 0
    if rank == 0:
        complete = len(write_tables(root, spec))
        shutil.rmtree(root / PARTIAL, ignore_errors=True)
    if world > 1:
        import torch.distributed as dist

        _barrier(world)
        dist.destroy_process_group()
    return CohortResult(root, made, complete, spec.n, time.time() - t0)


def _run_workers(root: Path, spec: CohortSpec, todo: Sequence[Subject], workers: int, bar) -> None:
    """``workers`` spawned processes, each making every ``workers``-th subject left; the bar follows
    the finished folders."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(root), spec.to_dict(), [s.index for s in todo[r::workers]], "cpu",
                                                 {"worker": r, "workers": workers}, os.getpid()))
             for r in range(workers)]
    for p in procs:
        p.start()
    wanted = {f"sub-{s.label}" for s in todo}

    def finished() -> int:  # one listing: a subject's folder appears only complete
        with os.scandir(root) as it:
            return sum(e.name in wanted for e in it)

    try:
        seen = 0
        while any(p.is_alive() for p in procs):
            time.sleep(0.5)
            now = finished()
            bar.update(now - seen)
            seen = now
        bar.update(finished() - seen)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"cohort worker(s) {failed} failed (exit codes {[procs[r].exitcode for r in failed]}); "
                           "run again to resume")


# -- command line -------------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    """Add ``synthbrain cohort`` to the main parser's ``subparsers`` (argument checks stay light)."""
    c = subparsers.add_parser(
        "cohort",
        help="make a synthetic cohort as a BIDS derivative data set (resumable; torchrun shards it)",
        description="Make a BIDS-style data set of synthetic brains with labels, a participants table and "
        "provenance, from flags or a spec file. Run it again to resume. Every image is synthetic: not for clinical use.",
    )
    c.add_argument("--spec", default=None, help="spec file (.json, .yaml); flags given as well override its values")
    c.add_argument("--n", default=None, help="number of subjects")
    c.add_argument("--age", default=None, help="age range LO:HI in years (default 40:90)")
    c.add_argument("--sex-ratio", default=None, help="fraction of women, 0-1 (default 0.5)")
    c.add_argument("--diagnosis", default=None, help="diagnosis mix, e.g. CN:0.6,MCI:0.2,AD:0.2 (default CN:1)")
    c.add_argument("--model", default=None, help=f"generator name or folder (default {DEFAULT_MODEL})")
    c.add_argument("--segmenter", default=None, help=f"segmenter name or folder (default {DEFAULT_SEGMENTER})")
    c.add_argument("--seed", default=None, help="seed of the cohort (default 0)")
    c.add_argument("--steps", default=None, help="DDIM steps (default: the model's)")
    c.add_argument("--guidance-scale", default=None, help="classifier-free guidance (default: the model's)")
    c.add_argument("--match-volumes", action="store_true", default=None,
                   help="warp each brain to its requested ventricle and hippocampus volumes (recorded in its sidecar)")
    c.add_argument("--out", required=True, help="data set folder (new, empty, or this spec's to resume)")
    c.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    c.add_argument("--workers", default="auto", help="CPU processes on this machine, each on one thread (default auto: "
                                                   "one per core, at most 4)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=run_cohort)


def spec_from_args(args) -> CohortSpec:
    """The spec of the command line: the ``--spec`` file's values, overridden by the flags given."""
    values: dict[str, Any] = load_spec(args.spec) if args.spec else {}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    for key in CohortSpec.fields():
        flag = getattr(args, key, None)
        if flag is not None:
            values[key] = flag
    if "n" not in values:
        raise ValueError("give --n (the number of subjects) or a --spec file with `n`")
    return CohortSpec.from_dict(values)


def run_cohort(args) -> int:
    """``synthbrain cohort``: every check runs before a model loads or a file is written."""
    import re

    spec = spec_from_args(args)
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", args.device):
        raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {args.device!r}")
    if args.workers == "auto":
        workers = 1 if _dist_env()[1] > 1 else default_workers()  # under torchrun the ranks are the workers
    else:
        workers = _parse_int("workers", args.workers, 1, 256)
    result = make_cohort(spec, args.out, device=args.device, workers=workers, progress=not args.quiet)
    if _dist_env()[0] == 0:
        print(f"cohort {result.root}: {result.complete} of {result.total} subjects complete "
              f"({result.made} made now in {result.seconds:.0f} s; synthetic, not for clinical use)")
    return 0
