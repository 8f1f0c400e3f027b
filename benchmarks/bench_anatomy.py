#!/usr/bin/env python
"""Time the anatomy pipeline for one brain on CPU: segment -> all meshes -> USD export.

    python benchmarks/bench_anatomy.py [--threads 2] [--repeats 3] [--image t1.nii.gz]

Uses the first IXI test subject when the prepared data exists, else a generated brain from the
shipped generator, else a phantom. Target: segmentation + meshes + one USD file <= 2 s.
Prints the median of ``--repeats`` runs per stage. Baseline, in the same run: the meshes through
quadric decimation (``vtkQuadricDecimation``, 0.1's method) instead of ``vtkDecimatePro``, with the
same threads, so the difference is the decimation alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synth import MNI_2MM  # noqa: E402
from synth.anatomy import export_meshes, export_usd, load_segmenter, measure_volumes, structure_meshes  # noqa: E402


def pick_image(path: str | None) -> tuple[np.ndarray, str]:
    if path:
        from synth.io import load_nifti

        return load_nifti(path)[0].astype(np.float32), path
    prepared = Path.home() / ".cache" / "synthbrain" / "ixi-2mm"
    if (prepared / "subjects.csv").is_file():
        from synth.data.prepare import PreparedData

        data = PreparedData.load(prepared)
        row = data.subset("test")[0]
        return data.t1(row), f"IXI test subject {row['mrid']}"
    from synth.anatomy.testing import phantom

    return phantom(MNI_2MM.shape)[0], "phantom"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image", default=None, help="a model-grid T1 NIfTI (default: see above)")
    ap.add_argument("--no-flip", action="store_true", help="segment without mirror averaging")
    ap.add_argument("--bf16", action="store_true", help="segment under bfloat16 autocast")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    t = time.perf_counter()
    seg = load_segmenter(device="cpu", flip_tta=not args.no_flip, bf16=args.bf16)
    load_s = time.perf_counter() - t
    image, source = pick_image(args.image)
    seg.segment(image)  # warm-up (allocators, first-call overheads)

    stages: dict[str, list[float]] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        stages.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(args.repeats):
            labels = timed("segment", lambda: seg.segment(image))
            vols = timed("volumes", lambda: measure_volumes(labels))
            base = timed("baseline: meshes, quadric", lambda: structure_meshes(labels, MNI_2MM.affine, decimation="quadric"))
            meshes = timed("meshes (all structures)", lambda: structure_meshes(labels, MNI_2MM.affine))
            meta = {"model": "benchmark", "segmenter": seg.name, "volumes_mm3": vols}
            for fmt in ("usdc", "usda", "usdz"):
                timed(f"export .{fmt}", lambda: export_usd(Path(d) / f"b.{fmt}", meshes, meta))
            for fmt in ("glb", "stl"):
                timed(f"export .{fmt}", lambda: export_meshes(Path(d) / f"b.{fmt}", meshes, meta))
        sizes = {p.suffix: p.stat().st_size / 1e6 for p in Path(d).iterdir()}

    med = {k: statistics.median(v) for k, v in stages.items()}
    n_tri = sum(m.n_cells for m in meshes.values())
    print(f"image: {source}; threads {args.threads}; mirror averaging {'off' if args.no_flip else 'on'}; "
          f"bf16 {'on' if args.bf16 else 'off'}; load average {os.getloadavg()[0]:.1f}; "
          f"median of {args.repeats}; torch {torch.__version__}")
    print(f"{'load segmenter (once)':28s} {load_s:7.3f} s")
    for k, v in med.items():
        print(f"{k:28s} {v:7.3f} s")
    core = med["segment"] + med["meshes (all structures)"] + med["export .usdc"]
    base_core = med["segment"] + med["baseline: meshes, quadric"] + med["export .usdc"]
    print(f"{'segment + meshes + .usdc':28s} {core:7.3f} s   (target <= 2 s; with quadric decimation "
          f"{base_core:.3f} s, meshes {med['baseline: meshes, quadric'] / med['meshes (all structures)']:.1f}x slower)")
    print(f"{len(meshes)} meshes, {n_tri:,} triangles (quadric: {sum(m.n_cells for m in base.values()):,}); sizes: "
          + ", ".join(f"{k} {v:.1f} MB" for k, v in sorted(sizes.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
