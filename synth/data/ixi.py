"""The IXI T1 + MUSE data set as shipped beside the project (``../shared/data/ixi``)."""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["IXISubject", "MEASURES", "default_ixi_root", "find_subjects", "split_of", "muse_groups"]

# Volumes measured on every subject, as MUSE label groups. Derived regions (ICV, TotalBrain, GM,
# WM) come from list_MUSE_mapping_derived.csv; the others are single MUSE labels.
MEASURES: dict[str, str | tuple[int, ...]] = {
    "icv": "702",
    "brain": "701",
    "gm": "601",
    "wm": "604",
    "lateral_ventricles": (51, 52),
    "hippocampus": (47, 48),
}

# Split rule: a salted hash of the subject id. Fixed for ever: changing it would leak test
# subjects into training. About 10 % test, 10 % validation.
_SPLIT_SALT = "synthbrain-ixi-split-v1"


def split_of(subject_id: str) -> str:
    """Return ``"train"``, ``"val"`` or ``"test"`` for an IXI subject id (e.g. ``IXI012``)."""
    bucket = int(hashlib.sha256(f"{_SPLIT_SALT}:{subject_id}".encode()).hexdigest(), 16) % 100
    if bucket < 10:
        return "test"
    if bucket < 20:
        return "val"
    return "train"


def default_ixi_root() -> Path:
    """``$SYNTHBRAIN_IXI`` or ``../shared/data/ixi`` beside the repository."""
    env = os.environ.get("SYNTHBRAIN_IXI")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "ixi"


@dataclass(frozen=True)
class IXISubject:
    """One IXI subject: the paths of its raw files and its demographics (``None`` if unknown)."""

    subject_id: str  # e.g. IXI012
    mrid: str  # e.g. IXI012-HH-1211
    t1_path: Path
    label_path: Path
    age: float | None
    sex: str | None  # "F" or "M"

    @property
    def split(self) -> str:
        return split_of(self.subject_id)


def muse_groups(root: Path) -> dict[str, tuple[int, ...]]:
    """Resolve :data:`MEASURES` to tuples of single MUSE labels using the derived-region table."""
    derived: dict[str, tuple[int, ...]] = {}
    with open(root / "list_MUSE_mapping_derived.csv") as f:
        for row in csv.reader(f):
            if row:
                derived[row[0]] = tuple(int(v) for v in row[2:] if v.strip())
    return {name: derived[spec] if isinstance(spec, str) else spec for name, spec in MEASURES.items()}


def find_subjects(root: str | os.PathLike | None = None) -> list[IXISubject]:
    """List the subjects of an IXI folder, sorted by id.

    Raises:
        FileNotFoundError: ``root`` is not an IXI folder (no ``t1/`` and ``labels_muse/``).
    """
    root = Path(root) if root is not None else default_ixi_root()
    t1_dir, lab_dir = root / "t1", root / "labels_muse"
    if not t1_dir.is_dir() or not lab_dir.is_dir():
        raise FileNotFoundError(f"expected an IXI folder with t1/ and labels_muse/, got {root}")
    demo: dict[str, tuple[float, str]] = {}
    demo_path = root / "demographics.csv"
    if demo_path.is_file():
        with open(demo_path) as f:
            for row in csv.DictReader(f):
                demo[row["MRID"]] = (float(row["Age"]), row["Sex"].strip().upper())
    subjects = []
    for t1 in sorted(t1_dir.glob("IXI*_T1.nii.gz")):
        mrid = t1.name[: -len("_T1.nii.gz")]
        label = lab_dir / f"{mrid}_T1_DLMUSE.nii.gz"
        if not label.is_file():
            continue
        age, sex = demo.get(mrid, (None, None))
        subjects.append(IXISubject(mrid.split("-")[0], mrid, t1, label, age, sex))
    return subjects
