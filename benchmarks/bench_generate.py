#!/usr/bin/env python
"""One brain from a model on CPU: our sampler against MONAI's stock LatentDiffusionInferer.

    python benchmarks/bench_generate.py [--model synthbrain-ldm-2mm] [--threads 2] [--repeats 3]

Variants, each in a fresh process (so peak memory is its own), same weights, same initial noise:
  baseline  monai.inferers.LatentDiffusionInferer.sample, DDIMScheduler 50 steps, float32
  ours      synth BrainGenerator.generate: DDIM with the model's default steps, bf16 autocast
Both use the model's default classifier-free guidance scale (MONAI's ``cfg`` argument).
Quality is checked by comparing the two brains of the same seed: PSNR and correlation inside the
brain, and the sharpness (mean gradient magnitude) of each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _run_variant(args) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import synth

    gen = synth.load_generator(args.model, device="cpu")
    cond = synth.Condition(age=72, sex="F", diagnosis="AD")
    times, sample_t, decode_t = [], [], []
    for rep in range(args.repeats + 1):  # first run warms up
        t0 = time.perf_counter()
        if args.variant == "ours":
            z = gen.sample_latent(cond, args.seed, int(gen.config.sampling["steps"]),
                                  float(gen.config.sampling.get("guidance_scale", 1.0)), True, None)
            t1 = time.perf_counter()
            img = gen.decode(z, bf16=True)
        else:
            from monai.inferers import LatentDiffusionInferer
            from monai.networks.schedulers import DDIMScheduler

            s = gen.config.scheduler
            sched = DDIMScheduler(num_train_timesteps=s["num_train_timesteps"], schedule=s["schedule"],
                                  beta_start=s["beta_start"], beta_end=s["beta_end"], clip_sample=False)
            sched.set_timesteps(50)
            inferer = LatentDiffusionInferer(sched, scale_factor=gen.config.latent_scale)
            noise = torch.randn(gen.latent_shape(), generator=torch.Generator().manual_seed(args.seed))
            context = gen.encode_condition(cond)[:, None, :]

            class ConcatAndCrossAttend(torch.nn.Module):
                """The model's conditioning: context tokens and the same values as input channels."""

                def __init__(self, unet):
                    super().__init__()
                    self.unet = unet

                def forward(self, x, timesteps, context=None, **kw):
                    c = context[:, 0, :, None, None, None].expand(-1, -1, *x.shape[2:])
                    return self.unet(torch.cat([x, c], 1), timesteps=timesteps, context=context)

            gs = float(gen.config.sampling.get("guidance_scale", 1.0))
            cfg = {"cfg": gs, "cfg_fill_value": 0.0} if gs != 1.0 else {}  # null condition = all zeros
            with torch.no_grad():
                out = inferer.sample(noise, gen.autoencoder, ConcatAndCrossAttend(gen.unet), scheduler=sched,
                                     conditioning=context, mode="crossattn", verbose=False, **cfg)
            t1 = time.perf_counter()
            img = out.clamp(0, 1)[0, 0].numpy()
        t2 = time.perf_counter()
        if rep > 0:
            times.append(t2 - t0)
            sample_t.append(t1 - t0)
            decode_t.append(t2 - t1)
    np.save(args.save, img)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"variant": args.variant, "total_s": min(times), "sample_s": min(sample_t),
                      "decode_s": min(decode_t), "peak_rss_mb": peak_mb}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="synthbrain-ldm-2mm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--variant", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        _run_variant(args)
        return 0

    import tempfile

    import numpy as np

    from synth.metrics import masked_correlation, psnr, sharpness

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("baseline", "ours"):
            save = os.path.join(tmp, f"{variant}.npy")
            cmd = [sys.executable, __file__, "--variant", variant, "--save", save, "--model", args.model,
                   "--threads", str(args.threads), "--repeats", str(args.repeats), "--seed", str(args.seed)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[variant] = json.loads(out)
            results[variant]["image"] = np.load(save)
    base, ours = results["baseline"], results["ours"]
    mask = base["image"] > 0.05
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}; "
          f"date {time.strftime('%Y-%m-%d')}")
    print(f"{'variant':<10}{'total s':>9}{'sample s':>10}{'decode s':>10}{'peak RSS MB':>13}")
    for name, r in (("baseline", base), ("ours", ours)):
        print(f"{name:<10}{r['total_s']:>9.2f}{r['sample_s']:>10.2f}{r['decode_s']:>10.2f}{r['peak_rss_mb']:>13.0f}")
    print(f"speed-up: {base['total_s'] / ours['total_s']:.2f}x (target >= 2x); ours {ours['total_s']:.2f} s per brain (target <= 3 s)")
    print(f"quality, same seed: PSNR(ours vs baseline) {psnr(base['image'], ours['image'], mask):.1f} dB, "
          f"correlation {masked_correlation(base['image'], ours['image'], mask):.4f}, "
          f"sharpness baseline {sharpness(base['image'], mask):.4f} ours {sharpness(ours['image'], mask):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
