#!/usr/bin/env python
"""One brain from a model on CPU: SynthBrain's numeric paths against MONAI's stock LatentDiffusionInferer.

    python benchmarks/bench_generate.py [--model synthbrain-ldm-2mm] [--threads 2] [--repeats 3] [--busy]

Variants, each in a fresh process (so peak memory is its own), same weights, same initial noise, the
model's classifier-free guidance scale:
  baseline  monai.inferers.LatentDiffusionInferer.sample, DDIMScheduler 50 steps, float32 (MONAI ``cfg``)
  fp32      synth ``BrainGenerator.generate`` in float32: the model's default sampler and steps
  fast      the same with the model's fast preset (``--fast``: DPM-Solver++ 8 steps for the shipped model)
  bf16      the default under bfloat16 autocast: only where the CPU computes bf16 natively (emulated
            bf16 is ~100x slower, so it is skipped and said so)
For a model that ships a refiner (a small network after the decoder), fp32 and fast run as the model ships
them (the shipped model: fp32 with the refiner, fast without) and again the other way (``fp32 unrefined``,
``fast + refiner``), so its cost is measured in the same run.
``fp32 + volume matching`` adds the optional warp to the requested ventricle and hippocampus volumes
(``synthbrain generate --match-volumes``: the shipped segmenter, ``synth.anatomy.match_brain_volumes``)
inside the timed loop, so its cost is measured in the same run (skipped without the segmenter).
``fast, memory returned`` is the fast path with ``SYNTHBRAIN_KEEP_MEMORY=0``: glibc's default, which
hands every freed block over 32 MB back to the system (``synth.runtime.keep_freed_memory``, which the
generators otherwise switch on); the stock baseline runs that way too, as MONAI would.
With ``--busy``, the fast path also runs while another process spins on one core: with the automatic
thread count (``synth.runtime.AdaptiveThreads``: re-checked between steps) and with two threads forced.

Times are the median of ``--repeats`` runs after one warm-up run (until 2026-12-01 the script printed
the fastest run, though the README called it the median).

Quality: each brain is compared with the baseline's brain of the same seed (PSNR and correlation
inside the brain) and its sharpness reported. The machine is named first: CPU model, the kernels
PyTorch dispatches to (``ATEN_CPU_CAPABILITY=avx2`` reproduces an AVX2-only CPU on a newer one) and
whether bf16 is native.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _stock(gen, cond, seed):
    import torch
    from monai.inferers import LatentDiffusionInferer
    from monai.networks.schedulers import DDIMScheduler

    s = gen.config.scheduler
    sched = DDIMScheduler(num_train_timesteps=s["num_train_timesteps"], schedule=s["schedule"],
                          beta_start=s["beta_start"], beta_end=s["beta_end"], clip_sample=False)
    sched.set_timesteps(50)
    inferer = LatentDiffusionInferer(sched, scale_factor=gen.config.latent_scale)
    noise = torch.randn(gen.latent_shape(), generator=torch.Generator().manual_seed(seed))
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
    return out.clamp(0, 1)[0, 0].numpy()


def _run_variant(args) -> None:
    import numpy as np
    import torch

    import synth

    gen = synth.load_generator(args.model, device="cpu")
    if args.variant == "baseline":  # stock MONAI: plain attention modules, as MONAI builds them
        for m in gen.unet.modules():
            if hasattr(m, "use_flash_attention"):
                m.use_flash_attention = False
    cond = synth.Condition(age=72, sex="F", diagnosis="AD")
    threads = None if args.threads == 0 else args.threads
    segmenter = None
    if args.match:
        from synth.anatomy import load_segmenter, match_brain_volumes

        segmenter = load_segmenter("synthbrain-seg-2mm", device="cpu")
    times, sample_t = [], []
    for rep in range(args.repeats + 1):  # the first run warms up
        stamps = []
        t0 = time.perf_counter()
        if args.variant == "baseline":
            torch.set_num_threads(threads or 2)
            img = _stock(gen, cond, args.seed)
        else:
            kw = dict(precision="bf16" if args.variant == "bf16" else "fp32", fast=args.variant == "fast")
            if args.refine != "default":
                kw["refine"] = args.refine == "on"
            brain = gen.generate(cond, seed=args.seed, threads=threads,
                                 progress=lambda i, n: stamps.append(time.perf_counter()) if i == n else None, **kw)
            if segmenter is not None:
                brain, _ = match_brain_volumes(brain, segmenter)
            img = brain.image
        t1 = time.perf_counter()
        if rep > 0:
            times.append(t1 - t0)
            sample_t.append((stamps[0] if stamps else t1) - t0)
    np.save(args.save, img)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    extra = {} if args.variant == "baseline" else {k: brain.provenance.get(k) for k in ("sampler", "steps", "precision", "refiner")}
    used = torch.get_num_threads() if args.variant == "baseline" else brain.provenance["threads"]
    total, sampling = statistics.median(times), statistics.median(sample_t)  # the README's "median of 3"
    print(json.dumps({"variant": args.variant, "total_s": total, "sample_s": sampling,
                      "decode_s": total - sampling, "peak_rss_mb": peak_mb,
                      "torch_threads": used, **extra}))


def _spin():
    return subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 600: pass"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="synthbrain-ldm-2mm")
    p.add_argument("--threads", type=int, default=2, help="torch threads (0: automatic, synth.runtime.pick_threads)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--busy", action="store_true", help="also time the fp32 path with another process on one core")
    p.add_argument("--variant", choices=["baseline", "fp32", "fast", "bf16"], help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    p.add_argument("--refine", choices=["default", "on", "off"], default="default", help=argparse.SUPPRESS)
    p.add_argument("--match", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        _run_variant(args)
        return 0

    import tempfile

    import numpy as np

    from synth.metrics import masked_correlation, psnr, sharpness
    from synth.runtime import cpu_description, machine_line

    cpu = cpu_description()
    print(machine_line())
    variants = ["baseline", "fp32", "fast"] + (["bf16"] if cpu["native_bf16"] else [])
    if not cpu["native_bf16"]:
        print("bf16: skipped (not native on this CPU: emulated bf16 is about 100x slower, and `auto` never picks it)")
    runs: list[tuple[str, str, int, bool, str]] = [(v, v, args.threads, False, "default") for v in variants]
    runs.insert(3, ("fast, memory returned", "fast", args.threads, False, "default"))
    returned = {"baseline", "fast, memory returned"}  # run with glibc's default malloc settings
    from synth.generators import models_dir
    from synth.models.config import ModelConfig

    if (models_dir() / "synthbrain-seg-2mm" / "config.json").is_file():
        runs.append(("fp32 + volume matching", "fp32", args.threads, False, "default"))
    else:
        print("fp32 + volume matching: skipped (no segmenter synthbrain-seg-2mm in the models folder)")

    if ModelConfig.load(Path(args.model) if Path(args.model).is_dir() else models_dir() / args.model).refiner:
        runs += [("fp32 unrefined", "fp32", args.threads, False, "off"), ("fast + refiner", "fast", args.threads, False, "on")]
    if args.busy:
        runs += [("fast busy, auto threads", "fast", 0, True, "default"), ("fast busy, 2 threads", "fast", 2, True, "default")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, variant, threads, busy, refine in runs:
            save = os.path.join(tmp, f"{len(results)}.npy")
            cmd = [sys.executable, __file__, "--variant", variant, "--save", save, "--model", args.model,
                   "--threads", str(threads), "--repeats", str(args.repeats), "--seed", str(args.seed)] + ["--refine", refine]
            cmd += ["--match"] if label.endswith("volume matching") else []
            spinner = _spin() if busy else None
            try:
                if busy:
                    time.sleep(0.5)
                env = {**os.environ, "SYNTHBRAIN_KEEP_MEMORY": "0" if label in returned else "1"}
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
            finally:
                if spinner:
                    spinner.kill()
                    spinner.wait()
            results[label] = json.loads(out)
            results[label]["image"] = np.load(save)
    base = results["baseline"]
    mask = base["image"] > 0.05
    print(f"{'variant':<26}{'path':<30}{'threads':>8}{'total s':>9}{'sample s':>10}{'decode s':>10}{'peak MB':>9}"
          f"{'PSNR dB':>9}{'r':>8}{'sharp':>8}")
    for label, r in results.items():
        refined = isinstance(r.get("refiner"), dict) and r["refiner"].get("applied")
        path = ("MONAI DDIM 50, fp32" if label == "baseline"
                else f"{r['sampler']} {r['steps']}, {r['precision']}{' + refiner' if refined else ''}")
        q = "" if label == "baseline" else (f"{psnr(base['image'], r['image'], mask):>9.1f}"
                                             f"{masked_correlation(base['image'], r['image'], mask):>8.4f}")
        q = q or f"{'-':>9}{'-':>8}"
        print(f"{label:<26}{path:<30}{r['torch_threads']:>8}{r['total_s']:>9.2f}{r['sample_s']:>10.2f}"
              f"{r['decode_s']:>10.2f}{r['peak_rss_mb']:>9.0f}{q}{sharpness(r['image'], mask):>8.4f}")
    target = "target <= 1 s where bf16 is native" if "bf16" in results else "target <= 2 s without native bf16"
    for name in ("fp32", "fast"):
        r = results[name]
        print(f"{name}: {r['total_s']:.2f} s per brain, {base['total_s'] / r['total_s']:.1f}x the stock sampler ({target})")
        pair = {"fp32": ("fp32", "fp32 unrefined"), "fast": ("fast + refiner", "fast")}[name]
        if all(k in results for k in pair):
            on, off = (results[k]["total_s"] for k in pair)
            print(f"  {name} with the refiner {on:.2f} s, without {off:.2f} s: the refiner costs {on - off:.2f} s")
    kept, back = results["fast"]["total_s"], results["fast, memory returned"]["total_s"]
    print(f"fast: {kept:.2f} s keeping freed memory, {back:.2f} s returning it (glibc's default): {back / kept:.2f}x")
    if "fp32 + volume matching" in results:
        on, off = results["fp32 + volume matching"]["total_s"], results["fp32"]["total_s"]
        print(f"fp32 + volume matching: {on:.2f} s per brain: the warp costs {on - off:.2f} s")
    if "bf16" in results:
        print(f"bf16: {results['bf16']['total_s']:.2f} s per brain, {base['total_s'] / results['bf16']['total_s']:.1f}x "
              f"the stock sampler (target <= 1 s where bf16 is native)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
