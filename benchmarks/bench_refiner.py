#!/usr/bin/env python
"""The refiner's context branch, against the plain refiner (the baseline) in the same run.

    python benchmarks/bench_refiner.py [--threads 2] [--repeats 5]

  train step  forward + backward of a batch of 4 cubes of 40 voxels (train-refiner's default), the
              context refiner also given its context cubes (40 + 2 x context_pad voxels)
  refine      refine_volume on an 80 x 96 x 80 volume with a brain-sized box, as generation runs it
Both refiners have width 32 and 5 layers; the context one has ``--context`` (default 3) convolutions
at 8 mm. Random weights (the cost does not depend on them). Prints the CPU, the kernels PyTorch uses
and whether bf16 is native; ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` reproduces a CPU
without native bf16.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--context", type=int, default=3)
    args = p.parse_args()

    import numpy as np
    import torch

    from synth.models.refiner import Refiner, context_pad, refine_volume
    from synth.runtime import machine_line, median_seconds

    torch.set_num_threads(args.threads)
    print(machine_line(args.threads))
    torch.manual_seed(0)
    nets = {"plain (baseline)": Refiner(32, 5), f"context {args.context}": Refiner(32, 5, args.context)}
    for net in nets.values():
        for q in net.parameters():
            torch.nn.init.normal_(q, std=0.02)
    x = torch.rand(4, 1, 40, 40, 40)
    rng = np.random.default_rng(0)
    vol = np.zeros((80, 96, 80), np.float32)
    vol[10:70, 8:88, 8:72] = rng.uniform(0.2, 0.9, (60, 80, 64))
    base: dict[str, float] = {}
    for name, net in nets.items():
        pad = context_pad(net)
        inputs = (x,) if not pad else (x, torch.rand(4, 1, 40 + 2 * pad, 40 + 2 * pad, 40 + 2 * pad))

        def step():
            net.zero_grad(set_to_none=True)
            net(*inputs).mean().backward()

        t_step = median_seconds(step, args.repeats)
        with torch.no_grad():
            t_ref = median_seconds(lambda: refine_volume(net, vol), args.repeats)
        base = base or {"step": t_step, "refine": t_ref}
        print(f"{name:18s} train step {t_step:6.3f} s ({t_step / base['step']:.2f}x)   "
              f"refine {t_ref:6.3f} s ({t_ref / base['refine']:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
