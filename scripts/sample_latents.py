"""Sample a bank of latents from a latent diffusion model, for a decoder's adversarial fine-tune.

A decoder fine-tuned only on the latents of real scans learns to render *those*; the prior's own
latents hold fine structure in other places (see the LDM card, "Why the samples are limited").
``synthbrain train-autoencoder --decoder-only --adv-latents BANK.pt`` also shows the discriminator
the decoder's rendering of these latents, so the decoder learns to render sampled latents as a real
scan would look. The conditions are the ages and sexes of the *training* subjects (never the held-out
ones the evaluation uses), and the seeds start far from the evaluation's (0-35, 100000+).

Usage::

    python scripts/sample_latents.py --out /root/runs/latent-bank.pt --n 96
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="assets/models/synthbrain-ldm-2mm")
    p.add_argument("--data", default=str(Path.home() / ".cache/synthbrain/ixi-2mm"))
    p.add_argument("--out", required=True, help="the bank (.pt): latents, conditions, seeds, model")
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--seed0", type=int, default=500_000)
    p.add_argument("--fast", action="store_true", help="the model's fast preset instead of its default sampler")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be at least 1, got {args.n}")

    import synth
    from synth.data.prepare import PreparedData
    from synth.io import atomic_path
    from synth.report import _condition
    from synth.runtime import resolve_precision

    torch.set_num_threads(args.threads)
    rows = PreparedData.load(args.data).subset("train", labelled=True)
    gen = synth.load_generator(args.model, device="cpu")
    preset = gen.config.sampling.get("fast", {}) if args.fast else {}
    opts = gen.sampling_options(preset.get("steps"), None, preset.get("sampler"))
    interval = tuple(preset["guidance_interval"]) if preset else tuple(opts["guidance_interval"])
    bf16 = resolve_precision(None, gen.device, model_allows=bool(gen.config.sampling.get("bf16", False))) == "bf16"
    latents, conditions, seeds, t0 = [], [], [], time.time()
    for i in range(args.n):
        c = _condition(rows[i % len(rows)])
        seed = args.seed0 + i
        latents.append(gen.sample_latent(c, seed, opts["steps"], opts["guidance_scale"], bf16, None,
                                         sampler=opts["sampler"], guidance_interval=interval, spacing=opts["spacing"]))
        conditions.append(c.to_dict())
        seeds.append(seed)
        if (i + 1) % 8 == 0 or i + 1 == args.n:
            print(f"latent {i + 1}/{args.n} ({time.time() - t0:.0f} s)", flush=True)
    bank = {"latents": torch.cat(latents).float(), "conditions": conditions, "seeds": seeds,
            "model": gen.config.name, "model_version": gen.config.version, "sampling": {**opts, "guidance_interval": list(interval)},
            "precision": "bf16" if bf16 else "fp32"}
    with atomic_path(args.out) as tmp:
        torch.save(bank, tmp)
    print(f"wrote {args.out}: {args.n} latents {tuple(bank['latents'].shape[1:])}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
