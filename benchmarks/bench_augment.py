#!/usr/bin/env python
"""Augmented copies of 2 mm scans (``train-diffusion --augment``, ``train_gpu.py run --augment``): serial
against spawned worker processes, in the same run.

    python benchmarks/bench_augment.py [--scans 16] [--copies 4] [--workers 2] [--repeats 3]

Scans: a smooth synthetic head on the 80 x 96 x 80 grid (the cost of ``augment_scan`` depends on the grid,
not the content; no IXI data needed). Prints the CPU line, the median seconds of one ``augment_scan``,
then ``--copies`` copies of ``--scans`` scans made serially (the baseline) and with ``--workers`` spawned
processes (which pay for starting Python and sending the scans). Both give the same copies (tested).

Measured 2026-12-01 on the 2-core Intel Xeon (avx512_bf16, no AMX), nothing else running, defaults: one scan
0.325 s; 4 copies of 16 scans 20.8 s serially, 13.0 s with 2 workers (1.60x). With PyTorch held to its AVX2
kernels (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``, as on a CPU without native bf16): 0.319 s,
20.7 s and 13.0 s (1.59x); the work is SciPy's spline interpolation, which does not use those kernels.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scans", type=int, default=16)
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    for name in ("scans", "copies", "workers", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")

    from synth.runtime import machine_line, median_seconds
    from synth.train.augment import augment_copies, augment_scan

    print(machine_line(), flush=True)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in (80, 96, 80)), indexing="ij")
    head = np.clip(1.2 - np.sqrt(x**2 + y**2 + z**2), 0, 1).astype(np.float32)
    scans = np.stack([head[None]] * args.scans)
    rng = np.random.default_rng(0)
    one = median_seconds(lambda: augment_scan(head, rng), args.repeats)
    print(f"augment_scan, one scan: {one:.3f} s", flush=True)
    base = None
    for workers in (1, args.workers):
        t = time.perf_counter()
        n = sum(1 for _ in augment_copies(scans, args.copies, seed=0, workers=workers))
        s = time.perf_counter() - t
        base = base or s
        label = "serial (baseline)" if workers == 1 else f"{workers} spawned workers"
        print(f"{n} copies of {args.scans} scans, {label:20s} {s:6.1f} s  {s / (n * args.scans):.3f} s a scan  "
              f"({base / s:.2f}x the baseline's speed)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
