"""Prepare IXI for training: RAS, skull-strip, affine to MNI152 2 mm, resample onto the model grid.

Each subject goes through:

1. skull-stripping with its own MUSE label map (every labelled voxel is inside the skull);
2. affine registration (similarity, then 12-parameter affine; Mattes mutual information,
   three resolutions) of the stripped T1 to the nilearn MNI152 2009 template's brain, with
   SimpleITK;
3. resampling of the T1 (linear) and the labels (nearest neighbour) onto :data:`synth.grid.MNI_2MM`
   in RAS voxel order;
4. intensity scaling: the 99.5th percentile inside the brain maps to 1, clipped to [0, 1];
5. volumes (mm^3) of :data:`synth.data.ixi.MEASURES` from the native-space label map, so that
   registration scaling does not change them.

Outputs go to a cache folder outside the repository. The step is resumable: a subject whose files
exist is skipped, and every file is written atomically.
"""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..grid import MNI_2MM, Grid
from ..io import atomic_path, load_nifti, read_json, save_nifti, write_json
from .ixi import MEASURES, IXISubject, find_subjects, muse_groups, split_of

__all__ = ["PreparedData", "prepare_ixi", "default_cache_dir"]

PREP_VERSION = 1
TABLE_FIELDS = ["mrid", "subject_id", "split", "age", "sex", *MEASURES, "reg_ncc"]


def default_cache_dir() -> Path:
    """``$SYNTHBRAIN_CACHE`` or ``~/.cache/synthbrain``."""
    return Path(os.environ.get("SYNTHBRAIN_CACHE", Path.home() / ".cache" / "synthbrain"))


def _template_files(work: Path) -> tuple[Path, Path]:
    """Write the nilearn MNI152 2 mm template (brain only) once and return its path and its mask's."""
    from nilearn import datasets

    brain_path, mask_path = work / "mni152_brain_2mm.nii.gz", work / "mni152_mask_2mm.nii.gz"
    if not brain_path.is_file() or not mask_path.is_file():
        tpl = datasets.load_mni152_template(resolution=2)
        mask = datasets.load_mni152_brain_mask(resolution=2)
        m = np.asarray(mask.get_fdata()) > 0
        save_nifti(brain_path, (np.asarray(tpl.get_fdata()) * m).astype(np.float32), tpl.affine)
        save_nifti(mask_path, m.astype(np.uint8), mask.affine)
    return brain_path, mask_path


def _reference_image(grid: Grid):
    """A SimpleITK image whose voxel (i, j, k) is the grid's RAS voxel (i, j, k).

    ITK works in LPS: RAS (x, y, z) is LPS (-x, -y, z), so the direction is diag(-1, -1, 1).
    """
    import SimpleITK as sitk

    ref = sitk.Image([int(s) for s in grid.shape], sitk.sitkFloat32)
    ref.SetSpacing([grid.spacing] * 3)
    x0, y0, z0 = grid.origin
    ref.SetOrigin((-x0, -y0, z0))
    ref.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    return ref


def _to_ras_array(img) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # ITK arrays are (k, j, i)


def _register(fixed, moving, fixed_mask):
    """Similarity then affine registration of ``moving`` onto ``fixed``; returns the transform."""
    import SimpleITK as sitk

    def method(initial):
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.25, seed=1234)
        reg.SetMetricFixedMask(fixed_mask)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=1.0, minStep=1e-4, numberOfIterations=150, relaxationFactor=0.6
        )
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([4, 2, 1])
        reg.SetSmoothingSigmasPerLevel([4.0, 2.0, 0.0])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        reg.SetInitialTransform(initial, inPlace=False)
        return reg

    init = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Similarity3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    # Execute returns a composite wrapping the optimised similarity; unwrap it to seed the affine.
    sim = method(init).Execute(fixed, moving)
    s = sitk.Similarity3DTransform(sitk.CompositeTransform(sim).GetNthTransform(0))
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(s.GetMatrix())
    affine.SetTranslation(s.GetTranslation())
    affine.SetCenter(s.GetCenter())
    return method(affine).Execute(fixed, moving)


def _prepare_one(job: tuple[IXISubject, str, str, str, dict]) -> dict:
    import SimpleITK as sitk

    subject, out_dir, brain_tpl, mask_tpl, groups = job
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    out = Path(out_dir)
    t1_out, lab_out = out / f"{subject.mrid}_t1.nii.gz", out / f"{subject.mrid}_labels.nii.gz"
    row_out = out / f"{subject.mrid}.json"
    if row_out.is_file() and t1_out.is_file() and lab_out.is_file():
        return read_json(row_out)

    t1 = sitk.ReadImage(str(subject.t1_path), sitk.sitkFloat32)
    lab = sitk.ReadImage(str(subject.label_path), sitk.sitkUInt8)
    lab.CopyInformation(t1)  # same grid by construction of the data set
    brain = sitk.Mask(t1, lab > 0)

    # Volumes in native space (mm^3).
    lab_np = sitk.GetArrayFromImage(lab)
    vox = float(np.prod(t1.GetSpacing()))
    counts = np.bincount(lab_np.ravel(), minlength=256).astype(float)
    volumes = {name: float(counts[list(ids)].sum() * vox) for name, ids in groups.items()}

    fixed = sitk.ReadImage(brain_tpl, sitk.sitkFloat32)
    fixed_mask = sitk.Cast(sitk.BinaryDilate(sitk.ReadImage(mask_tpl, sitk.sitkUInt8), [3, 3, 3]), sitk.sitkUInt8)
    tx = _register(fixed, brain, fixed_mask)

    ref = _reference_image(MNI_2MM)
    t1_grid = _to_ras_array(sitk.Resample(brain, ref, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    lab_grid = _to_ras_array(sitk.Resample(lab, ref, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))

    inside = lab_grid > 0
    scale = float(np.percentile(t1_grid[inside], 99.5)) if inside.any() else 1.0
    t1_grid = np.clip(t1_grid / max(scale, 1e-6), 0.0, 1.0).astype(np.float32)
    t1_grid[~inside] = 0.0

    # Registration quality: normalised cross-correlation with the template on the same grid.
    tpl_grid = _to_ras_array(sitk.Resample(fixed, ref, sitk.Transform(), sitk.sitkLinear, 0.0))
    a, b = t1_grid.ravel() - t1_grid.mean(), tpl_grid.ravel() - tpl_grid.mean()
    ncc = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))

    save_nifti(t1_out, t1_grid, MNI_2MM.affine, descrip="IXI T1, registered to MNI152 2mm")
    save_nifti(lab_out, lab_grid.astype(np.uint8), MNI_2MM.affine, descrip="IXI MUSE labels, MNI152 2mm")
    row = {
        "mrid": subject.mrid,
        "subject_id": subject.subject_id,
        "split": split_of(subject.subject_id),
        "age": subject.age,
        "sex": subject.sex,
        **volumes,
        "reg_ncc": round(ncc, 4),
    }
    write_json(row_out, row)
    return row


@dataclass
class PreparedData:
    """A prepared data folder: the subject table and per-subject volumes on the model grid."""

    root: Path
    rows: list[dict]

    @classmethod
    def load(cls, root: str | os.PathLike) -> "PreparedData":
        root = Path(root)
        table = root / "subjects.csv"
        if not table.is_file():
            raise FileNotFoundError(f"no prepared data in {root}: run `synthbrain prepare` first")
        rows = []
        with open(table) as f:
            for r in csv.DictReader(f):
                for k in ("age", *MEASURES, "reg_ncc"):
                    r[k] = float(r[k]) if r.get(k) not in (None, "") else None
                r["sex"] = r["sex"] or None
                rows.append(r)
        return cls(root, rows)

    def subset(self, split: str | None = None, *, labelled: bool = False) -> list[dict]:
        """Rows of one split (``train``/``val``/``test``), only those with age and sex if ``labelled``."""
        return [
            r
            for r in self.rows
            if (split is None or r["split"] == split) and (not labelled or (r["age"] is not None and r["sex"]))
        ]

    def t1(self, row: dict) -> np.ndarray:
        return load_nifti(self.root / "volumes" / f"{row['mrid']}_t1.nii.gz")[0].astype(np.float32)

    def labels(self, row: dict) -> np.ndarray:
        return load_nifti(self.root / "volumes" / f"{row['mrid']}_labels.nii.gz")[0].astype(np.int64)


def prepare_ixi(
    ixi_root: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    workers: int = 2,
    limit: int | None = None,
    progress: bool = True,
) -> PreparedData:
    """Run the preparation over an IXI folder (resumable) and return the prepared data.

    Args:
        ixi_root: IXI folder; defaults to :func:`synth.data.default_ixi_root`.
        out_dir: Output folder; defaults to ``<cache>/ixi-2mm``.
        workers: Parallel processes (one registration each).
        limit: Only the first ``limit`` subjects (for quick checks).
        progress: Show a progress bar.
    """
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    subjects = find_subjects(ixi_root)
    if limit is not None:
        subjects = subjects[:limit]
    root = Path(ixi_root) if ixi_root is not None else subjects[0].t1_path.parents[1]
    out = Path(out_dir) if out_dir is not None else default_cache_dir() / "ixi-2mm"
    vol_dir = out / "volumes"
    vol_dir.mkdir(parents=True, exist_ok=True)
    brain_tpl, mask_tpl = _template_files(out)
    groups = muse_groups(root)
    jobs = [(s, str(vol_dir), str(brain_tpl), str(mask_tpl), groups) for s in subjects]
    rows: list[dict] = []
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for row in tqdm(pool.map(_prepare_one, jobs), total=len(jobs), desc="prepare", disable=not progress):
            rows.append(row)
    bad = [r["mrid"] for r in rows if r["reg_ncc"] < 0.8]
    if bad:
        warnings.warn(f"registration looks poor (NCC < 0.8) for {bad}", stacklevel=2)
    with atomic_path(out / "subjects.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=TABLE_FIELDS)
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k) for k in TABLE_FIELDS})
    write_json(
        out / "manifest.json",
        {
            "prep_version": PREP_VERSION,
            "source": str(root),
            "grid": {"shape": MNI_2MM.shape, "spacing": MNI_2MM.spacing, "origin": MNI_2MM.origin},
            "split_rule": "sha256('synthbrain-ixi-split-v1:' + subject_id) % 100: <10 test, <20 val, else train",
            "counts": {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")},
        },
    )
    return PreparedData.load(out)
