"""``synthbrain segment`` and ``synthbrain export``: the anatomy verbs of the command line.

The main CLI calls :func:`add_parsers`; each verb's ``func(args) -> int`` raises ``ValueError`` or
``FileNotFoundError`` with a one-line message for bad input, which the main CLI turns into exit
code 2.

Examples::

    synthbrain segment t1.nii.gz --out labels.nii.gz
    synthbrain export t1.nii.gz --out-dir out/ --formats nii.gz usdz glb
    synthbrain export --age 72 --sex F --diagnosis AD --seed 3 --out-dir out/

Every check (arguments, the input NIfTI's header, existing outputs, a writable output folder) runs
before the segmenter or a generator loads. A generated brain's JSON sidecar travels into what
these verbs write (see :mod:`synth.provenance`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parsers", "run_segment", "run_export"]


def _formats() -> tuple[str, ...]:
    from .workflow import EXPORT_FORMATS

    return EXPORT_FORMATS


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``segment`` and ``export`` verbs to the main parser's ``subparsers``."""
    from ..cli import _age, _device, _diagnosis, _seed, _sex

    p = subparsers.add_parser(
        "segment",
        help="label the anatomy of a T1 NIfTI (skull-stripped, MNI-like space)",
        description="Label a 3D T1 NIfTI with SynthBrain's compact anatomy and print its volumes. "
        "Not for clinical use.",
    )
    p.add_argument("input", help="3D T1 NIfTI (.nii or .nii.gz), skull-stripped, roughly in MNI152 space")
    p.add_argument("--out", required=True, help="output label NIfTI (.nii.gz); a .json label table is written beside it")
    p.add_argument("--segmenter", default="synthbrain-seg-2mm", help="segmenter name or folder")
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--quiet", action="store_true", help="do not print the volume table")
    p.set_defaults(func=run_segment)

    e = subparsers.add_parser(
        "export",
        help="labels, volumes and 3D meshes (USD, STL, PLY, OBJ, GLB) of an image or a generated brain",
        description="Export the anatomy of a T1 NIfTI, or of a brain generated from --age/--sex/--diagnosis/--seed. "
        "Not for clinical use.",
    )
    e.add_argument("input", nargs="?", help="3D T1 NIfTI; omit to generate a brain from --age/--sex")
    e.add_argument("--out-dir", required=True, help="output folder")
    e.add_argument("--formats", nargs="+", default=None, metavar="FMT", help=f"any of: {', '.join(_formats())} (default all)")
    e.add_argument("--age", type=_age, help="age in years (generate)")
    e.add_argument("--sex", type=_sex, help="F or M (generate)")
    e.add_argument("--diagnosis", type=_diagnosis, default=None, help="CN, MCI or AD (generate; default CN)")
    e.add_argument("--seed", type=_seed, default=None, help="sampler seed (generate; default 0)")
    e.add_argument("--model", default=None, help="generator name or folder (generate)")
    e.add_argument("--segmenter", default="synthbrain-seg-2mm", help="segmenter name or folder")
    e.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda, cuda:N or mps")
    e.add_argument("--name", default=None, help="file stem of the outputs (default: the output folder's name)")
    e.add_argument("--force", action="store_true", help="overwrite existing output files")
    e.set_defaults(func=run_export)


def _print_volumes(labels, voxel_mm3: float) -> None:
    from .volumes import morphometry

    rows = morphometry(labels, voxel_volume_mm3=voxel_mm3)
    print(f"{'structure':32s} {'mL':>9s} {'% ICV':>7s}")
    for r in rows:
        print(f"{r['name']:32s} {r['mm3'] / 1000:9.2f} {r['pct_icv']:7.2f}")


def _refuse_existing(paths, force: bool) -> None:
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not force:
        raise ValueError(f"refusing to overwrite {existing[0]} (use --force)")


def _check_input(path: str):
    """Read and check the input NIfTI (3D, sane size, invertible affine, readable data)."""
    from ..io import load_nifti

    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"no such file: {src}")
    return load_nifti(src, canonical=False)


def run_segment(args: argparse.Namespace) -> int:
    import numpy as np

    from .. import provenance
    from ..brain import sidecar_path
    from ..io import check_writable, nifti_suffix

    out = Path(args.out)
    nifti_suffix(out)
    if Path(args.input).resolve() == out.resolve():
        raise ValueError(f"--out must differ from the input, got {args.out}")
    _refuse_existing([out, sidecar_path(out)], args.force)
    check_writable(out)
    data, affine = _check_input(args.input)
    src = Path(args.input)
    prov = provenance.read_sidecar(src)

    from .export import save_labels
    from .segmenter import load_segmenter  # heavy (torch): only after every check

    seg = load_segmenter(args.segmenter, device=args.device)
    labels, affine = seg.segment_volume(data, affine, source=src.name)
    meta = provenance.extend(prov, "segment", input=src, segmenter=seg.name)
    meta.update(segmenter=seg.name, source=src.name)
    save_labels(out, labels, affine, meta)
    if not args.quiet:
        _print_volumes(labels, float(abs(np.linalg.det(affine[:3, :3]))))
    print(f"wrote {out}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from .. import provenance
    from ..io import check_writable
    from .workflow import EXPORT_FORMATS, _parse_formats, export_paths, parse_name

    formats = _parse_formats(args.formats or EXPORT_FORMATS)  # fail before any slow step
    generate = any(v is not None for v in (args.age, args.sex, args.diagnosis, args.seed, args.model))
    if args.input and generate:
        raise ValueError("give either an input NIfTI or --age/--sex/--diagnosis/--seed/--model, not both")
    if not args.input and (args.age is None or args.sex is None):
        raise ValueError("give an input NIfTI, or --age and --sex to generate a brain")
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir must be a folder, got the file {out_dir}")
    name = parse_name(args.name if args.name is not None else out_dir.resolve().name)
    _refuse_existing(export_paths(out_dir, name, formats, generated=not args.input).values(), args.force)
    check_writable(out_dir)
    if args.input:
        image, affine = _check_input(args.input)
        prov = provenance.read_sidecar(args.input)
        prov["source"] = Path(args.input).name
    else:
        from .. import Condition

        condition = Condition(age=args.age, sex=args.sex, diagnosis=args.diagnosis or "CN")

    from .segmenter import load_segmenter  # heavy (torch): only after every check
    from .workflow import export_brain

    seg = load_segmenter(args.segmenter, device=args.device)
    if args.input:
        files = export_brain(out_dir, image=image, affine=affine, formats=formats, segmenter=seg, name=name,
                             metadata=prov)
    else:
        import synth

        gen = synth.load_generator(args.model or synth.DEFAULT_MODEL, device=args.device)
        brain = gen.generate(condition, seed=args.seed or 0, progress=True)
        t1 = export_paths(out_dir, name, formats, generated=True)["t1"]
        brain.save(t1)
        files = {"t1": t1, **export_brain(out_dir, brain, formats=formats, segmenter=seg, name=name)}
    for fmt, path in files.items():
        print(f"{fmt:7s} {path}")
    return 0
