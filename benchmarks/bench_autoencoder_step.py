#!/usr/bin/env python
"""One training step of candidate first stages against the shipped architecture, in the same run.

    python benchmarks/bench_autoencoder_step.py [--threads 2] [--repeats 2]

A step is what ``synthbrain train-autoencoder`` does per volume without the discriminator: forward
and backward of one whole 80 x 96 x 80 volume (L1 loss) and an Adam update, in the precision training
takes (``training_bf16``: bf16 on CUDA with bf16 and CPUs with AMX, float32 elsewhere; until 2026-11-30
bf16 on every CPU with native bf16, which is how the LDM card's figures were measured). Baseline: the shipped ``synthbrain-ldm-2mm``
architecture (channels 16 32 64, 1 residual block, 4 latent channels). Prints the CPU and whether
bf16 is native; the median of ``--repeats`` steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CANDIDATES = {
    "shipped: 16 32 64, 1 block, 4 latent (baseline)": {},
    "8 latent channels": {"latent_channels": 8},
    "24 48 96, 1 block, 4 latent": {"channels": [24, 48, 96], "norm_num_groups": 8},
    "32 64 128, 2 blocks, 8 latent (the GPU recipe)": {"channels": [32, 64, 128], "num_res_blocks": 2, "latent_channels": 8},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from synth.models.networks import build_autoencoder, count_parameters
    from synth.runtime import machine_line
    from synth.train.autoencoder import DEFAULT_AE
    from synth.train.common import autocast, training_bf16

    torch.set_num_threads(args.threads)
    bf16 = training_bf16(True, torch.device("cpu"))
    print(machine_line(args.threads, training_precision="bf16" if bf16 else "fp32"))
    torch.manual_seed(0)
    x = torch.rand(1, 1, 80, 96, 80)
    base = None
    for name, change in CANDIDATES.items():
        model = build_autoencoder({**DEFAULT_AE, **change})
        opt = torch.optim.Adam(model.parameters(), 1e-4)

        def step():
            with autocast(torch.device("cpu"), bf16):
                recon = model(x)[0]
            loss = (recon.float() - x).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step()  # warm-up
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        s = statistics.median(times)
        base = base or s
        print(f"{name:50s} {count_parameters(model) / 1e6:5.2f} M parameters  {s:6.2f} s per step  ({s / base:.1f}x the baseline)",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
