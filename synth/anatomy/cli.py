"""``synthbrain segment`` and ``synthbrain export``: the anatomy verbs of the command line.

The main CLI calls :func:`add_parsers`; each verb's ``func(args) -> int`` raises ``ValueError`` or
``FileNotFoundError`` with a one-line message for bad input, which the main CLI turns into exit
code 2.

Examples::

    synthbrain segment t1.nii.gz --out labels.nii.gz
    synthbrain export t1.nii.gz --out-dir out/ --formats nii.gz usdz glb
    synthbrain export --age 72 --sex F --diagnosis AD --seed 3 --out-dir out/
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
    p = subparsers.add_parser(
        "segment",
        help="label the anatomy of a T1 NIfTI (skull-stripped, MNI-like space)",
        description="Label a 3D T1 NIfTI with SynthBrain's compact anatomy and print its volumes. "
        "Not for clinical use.",
    )
    p.add_argument("input", help="3D T1 NIfTI (.nii or .nii.gz), skull-stripped, roughly in MNI152 space")
    p.add_argument("--out", required=True, help="output label NIfTI (.nii.gz); a .json label table is written beside it")
    p.add_argument("--segmenter", default="synthbrain-seg-2mm", help="segmenter name or folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
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
    e.add_argument("--age", type=float, help="age in years (generate)")
    e.add_argument("--sex", help="F or M (generate)")
    e.add_argument("--diagnosis", default=None, help="CN, MCI or AD (generate; default CN)")
    e.add_argument("--seed", type=int, default=None, help="sampler seed (generate; default 0)")
    e.add_argument("--model", default=None, help="generator name or folder (generate)")
    e.add_argument("--segmenter", default="synthbrain-seg-2mm", help="segmenter name or folder")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    e.add_argument("--name", default="anatomy", help="file stem of the outputs")
    e.set_defaults(func=run_export)


def _print_volumes(labels, voxel_mm3: float) -> None:
    from .volumes import morphometry

    rows = morphometry(labels, voxel_volume_mm3=voxel_mm3)
    print(f"{'structure':32s} {'mL':>9s} {'% ICV':>7s}")
    for r in rows:
        print(f"{r['name']:32s} {r['mm3'] / 1000:9.2f} {r['pct_icv']:7.2f}")


def run_segment(args: argparse.Namespace) -> int:
    import numpy as np

    from .export import save_labels
    from .segmenter import load_segmenter

    src = Path(args.input)
    if not src.is_file():
        raise FileNotFoundError(f"no such file: {src}")
    seg = load_segmenter(args.segmenter, device=args.device)
    labels, affine = seg.segment_nifti(src)
    save_labels(args.out, labels, affine, {"model": "user image", "segmenter": seg.name, "source": src.name})
    if not args.quiet:
        _print_volumes(labels, float(abs(np.linalg.det(affine[:3, :3]))))
    print(f"wrote {args.out}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from ..io import load_nifti
    from .segmenter import load_segmenter
    from .workflow import EXPORT_FORMATS, _parse_formats, export_brain

    formats = _parse_formats(args.formats or EXPORT_FORMATS)  # fail before any slow step
    generate = any(v is not None for v in (args.age, args.sex, args.diagnosis, args.seed, args.model))
    if args.input and generate:
        raise ValueError("give either an input NIfTI or --age/--sex/--diagnosis/--seed/--model, not both")
    if not args.input and (args.age is None or args.sex is None):
        raise ValueError("give an input NIfTI, or --age and --sex to generate a brain")
    seg = load_segmenter(args.segmenter, device=args.device)
    if args.input:
        image, affine = load_nifti(args.input, canonical=False)
        files = export_brain(args.out_dir, image=image, affine=affine, formats=formats, segmenter=seg, name=args.name,
                             metadata={"source": Path(args.input).name})
    else:
        import synth

        condition = synth.Condition(age=args.age, sex=args.sex, diagnosis=args.diagnosis or "CN")
        gen = synth.load_generator(args.model or synth.DEFAULT_MODEL, device=args.device)
        brain = gen.generate(condition, seed=args.seed or 0, progress=True)
        brain.save(Path(args.out_dir) / f"{args.name}_t1.nii.gz")
        files = export_brain(args.out_dir, brain, formats=formats, segmenter=seg, name=args.name)
    for fmt, path in files.items():
        print(f"{fmt:7s} {path}")
    return 0
