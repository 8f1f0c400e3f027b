#!/usr/bin/env python
"""Training steps of the shipped architectures in float32 against bf16 autocast, in the same run.

    python benchmarks/bench_training_precision.py [--threads 2] [--repeats 3]

Which numeric path should training take on a CPU that computes bf16 natively? ``auto`` picked bf16 on
every such CPU until 2026-11-30 (the baseline here); it now picks float32 unless the CPU has AMX tiles
(:func:`synth.runtime.bf16_faster`). Steps, each forward, backward and an optimiser update as the trainers
do them, with random data of the shipped shapes:

  autoencoder   the shipped ``AutoencoderKL`` on one whole 80 x 96 x 80 volume (L1), Adam
  decoder-only  the same with the encoder frozen (``train-autoencoder --decoder-only``)
  unet          the shipped ``DiffusionModelUNet``, a batch of 8 latents 20 x 24 x 20 with the condition
                as context (epsilon MSE), AdamW

Memory: the trainers keep freed memory in the process (:func:`synth.runtime.keep_freed_memory`, from
2026-12-01). The float32 steps are also timed in a child process with ``SYNTHBRAIN_KEEP_MEMORY=0``
(glibc's default, which unmaps every freed block over 32 MB: the baseline for that setting), in the
same run.

bf16 runs only where it is native (emulated bf16 is about a hundred times slower and is skipped, said
so). Prints the CPU, its kernels, native bf16 and AMX, then the median of ``--repeats`` steps after one
warm-up step for each path, and float32's speed-up over bf16.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default=str(ROOT / "assets" / "models" / "synthbrain-ldm-2mm"))
    p.add_argument("--fp32-only", action="store_true", help=argparse.SUPPRESS)  # the child: float32 times as JSON
    args = p.parse_args(argv)

    import json
    import os
    import subprocess

    import torch

    from synth.models.config import ModelConfig
    from synth.models.networks import build_autoencoder, build_unet, latent_mean
    from synth.runtime import cpu_description, keep_freed_memory, native_bf16, resolve_precision

    torch.set_num_threads(args.threads)
    kept = keep_freed_memory()  # as the trainers do (setup_distributed); a no-op with SYNTHBRAIN_KEEP_MEMORY=0
    returned = None
    if not args.fp32_only:
        child = [sys.executable, __file__, "--fp32-only", "--threads", str(args.threads), "--repeats", str(args.repeats),
                 "--model", args.model]
        out = subprocess.run(child, capture_output=True, text=True, check=True,
                             env={**os.environ, "SYNTHBRAIN_KEEP_MEMORY": "0"}).stdout.strip().splitlines()[-1]
        returned = json.loads(out)
    cpu = cpu_description()
    if not args.fp32_only:
        print(f"machine: {cpu['cpu']}, {cpu['cores']} cores; PyTorch {cpu['torch']} kernels {cpu['capability']}; "
          f"native bf16 {'yes' if cpu['native_bf16'] else 'no'}; AMX {'yes' if cpu['amx'] else 'no'}; "
          f"auto now trains in {resolve_precision('auto', 'cpu')}; {args.threads} threads; date {time.strftime('%Y-%m-%d')}")
    cfg = ModelConfig.load(args.model)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 80, 96, 80, generator=g)
    z = torch.randn(8, int(cfg.unet["out_channels"]), 20, 24, 20, generator=g)
    n_cond = int(cfg.unet["cross_attention_dim"])
    cond = torch.rand(8, 1, n_cond, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)

    def autoencoder_step(decoder_only: bool):
        torch.manual_seed(0)
        ae = build_autoencoder(cfg.autoencoder)
        if decoder_only:
            for m in (ae.encoder, ae.quant_conv_mu, ae.quant_conv_log_sigma):
                m.requires_grad_(False)
        opt = torch.optim.Adam([q for q in ae.parameters() if q.requires_grad], 1e-4)

        def step(bf16: bool):
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                if decoder_only:
                    with torch.no_grad():
                        mu = latent_mean(ae, x)
                    recon = ae.decode(mu)
                else:
                    recon = ae(x)[0]
            loss = (recon.float() - x).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    def unet_step():
        torch.manual_seed(0)
        unet = build_unet(cfg.unet)
        opt = torch.optim.AdamW(unet.parameters(), 1e-4)
        inp = torch.cat([z, cond[:, 0, :, None, None, None].expand(-1, -1, *z.shape[2:])], 1)

        def step(bf16: bool):
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                out = unet(inp, timesteps=t, context=cond)
            loss = (out.float() - z).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    def timed(step, bf16: bool) -> float:
        step(bf16)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step(bf16)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    steps = (("autoencoder", lambda: autoencoder_step(False)), ("decoder-only", lambda: autoencoder_step(True)),
             ("unet", unet_step))
    if args.fp32_only:
        print(json.dumps({name: timed(make(), False) for name, make in steps}))
        return 0
    paths = [False, True] if native_bf16("cpu") else [False]
    if not native_bf16("cpu"):
        print("bf16 is emulated on this CPU (about a hundred times slower): float32 only")
    print(f"freed memory kept in the process: {'yes' if kept else 'no (SYNTHBRAIN_KEEP_MEMORY=0 or not glibc)'}")
    print(f"{'step':14s} {'float32':>9s} {'bf16 (baseline)':>16s} {'float32 speed-up':>17s} "
          f"{'float32, memory returned':>25s} {'keeping it':>11s}")
    for name, make in steps:
        s = {bf16: timed(make(), bf16) for bf16 in paths}
        bf = f"{s[True]:15.2f}s {s[True] / s[False]:16.2f}x" if True in s else f"{'skipped':>16s} {'':>17s}"
        print(f"{name:14s} {s[False]:8.2f}s {bf} {returned[name]:24.2f}s {returned[name] / s[False]:10.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
