"""Compare first-stage decoders of one LDM on the same sampled latents, against held-out real scans.

A decoder fine-tune (say, with an adversarial patch loss) keeps the latent space, so the UNet's samples
can be drawn once and decoded by every candidate. For each decoder this prints and writes (JSON):

- the classifier two-sample tests of ``synthbrain evaluate`` (3D CNN trained per fold; logistic
  regression on a fixed random-convolution texture bank; 50 % = indistinguishable), on the decoded
  samples and on the decoder's reconstructions of the held-out scans (``recon_c2st_*``: its ceiling),
  with the classifier's confidence (``*_confidence``), which still ranks decoders when every accuracy is 100 %;
- FID on the feature network's features (samples vs held-out; beside real train vs held-out);
- sharpness and tissue contrast (not evidence of realism on their own);
- reconstruction inside the brain of the validation subjects (PSNR, SSIM);

and a PNG of the same slices: held-out real subjects beside each decoder's brain of the same age and sex.

Usage::

    python scripts/compare_decoders.py --out /root/runs/eval/decoders \
        --decoder shipped=assets/models/synthbrain-ldm-2mm --decoder gan800=/root/runs/ae-gan/snaps/snap_0012.pt
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="assets/models/synthbrain-ldm-2mm")
    p.add_argument("--data", default=str(Path.home() / ".cache/synthbrain/ixi-2mm"))
    p.add_argument("--decoder", action="append", required=True, help="NAME=model folder, run folder or checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    p.add_argument("--fast", action="store_true", help="sample latents with the model's fast preset")
    p.add_argument("--c2st-steps", type=int, default=150)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import synth
    from synth import realism as R
    from synth.data.prepare import PreparedData
    from synth.metrics import psnr, sharpness, ssim
    from synth.brain import zero_background
    from synth.report import _condition, c2st_confidence, first_stage_ceiling, heldout_scans
    from synth.train.common import autoencoder_weights

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = PreparedData.load(args.data)
    held, real, masks = heldout_scans(data)
    train = [data.t1(r) for r in data.subset("train", labelled=True)]
    gen = synth.load_generator(args.model, device="cpu")
    opts = gen.sampling_options(args.steps, None, None)
    preset = gen.config.sampling.get("fast", {}) if args.fast else {}
    tag = "fast" if args.fast else f"{opts['sampler']}{args.steps or gen.config.sampling['steps']}"
    cache = out / f"latents_{tag}.pt"
    if cache.is_file():
        latents = torch.load(cache)
    else:
        t0, latents = time.time(), []
        for i, r in enumerate(held):
            latents.append(gen.sample_latent(_condition(r), seed=i, steps=preset.get("steps", args.steps or gen.config.sampling["steps"]),
                                             guidance_scale=gen.config.sampling["guidance_scale"], bf16=False, progress=None,
                                             sampler=preset.get("sampler"),
                                             guidance_interval=tuple(preset["guidance_interval"]) if preset else None))
            print(f"latent {i + 1}/{len(held)} ({time.time() - t0:.0f} s)", flush=True)
        torch.save(latents, cache)
    features = R.load_features()
    f_real, f_train = features.predict(real)["features"], features.predict(train)["features"]
    rng = np.random.default_rng(0)
    yard = float(np.mean([R.frechet_distance(f_train[rng.choice(len(train), len(real), replace=False)], f_real)
                          for _ in range(10)]))
    rc_real = R.random_conv_features(real)
    results, images = {}, {}
    for spec in args.decoder:
        name, path = spec.split("=", 1)
        gen.autoencoder.load_state_dict(autoencoder_weights(path))
        gen._decoder = None  # rebuild the fused inference decoder from the new weights
        t0 = time.time()
        with torch.no_grad():
            imgs = [gen.decode(z) for z in latents]
        imgs = [zero_background(im) for im in imgs]  # as generate() does
        recon = []
        for r in data.subset("val"):
            x = data.t1(r)
            y = gen.decode(gen.encode(x))
            m = data.labels(r) > 0
            recon.append((psnr(x, y, m), ssim(x, y, m)))
        c = R.c2st(real, imgs, steps=args.c2st_steps)
        c_rc = R.c2st_logistic(rc_real, R.random_conv_features(imgs), what="random-conv bank")
        # the first stage's ceiling: its reconstructions of the held-out scans against the scans
        fs = first_stage_ceiling(gen, real, masks, rc_real, steps=args.c2st_steps)
        res = {
            "c2st_cnn": c.accuracy, "c2st_randconv": c_rc.accuracy,
            "recon_c2st_cnn": fs["cnn"]["accuracy"], "recon_c2st_randconv": fs["logistic_random_conv"]["accuracy"],
            # graded when every accuracy is 100 %: the out-of-fold probability given to the right answer
            "c2st_cnn_confidence": c2st_confidence(c.to_dict()), "recon_c2st_cnn_confidence": c2st_confidence(fs["cnn"]),
            "fid": R.frechet_distance(features.predict(imgs)["features"], f_real), "fid_yardstick": yard,
            "sharpness_ratio": float(np.mean([sharpness(i, m) for i, m in zip(imgs, masks)])
                                     / np.mean([sharpness(x, m) for x, m in zip(real, masks)])),
            "recon_psnr": float(np.mean([a for a, _ in recon])), "recon_ssim": float(np.mean([b for _, b in recon])),
            "seconds": round(time.time() - t0, 1),
        }
        results[name] = res
        images[name] = imgs
        print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}), flush=True)
        (out / f"compare_{tag}.json").write_text(json.dumps(results, indent=1))
    _figure(real, images, held, out / f"compare_{tag}.png")
    return 0


def _figure(real, images, rows, path, n=4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pick = np.linspace(0, len(real) - 1, n).round().astype(int)
    cols = ["real", *images]
    fig, axes = plt.subplots(2 * n, len(cols), figsize=(2.2 * len(cols), 2.4 * 2 * n))
    for i, k in enumerate(pick):
        for j, name in enumerate(cols):
            vol = real[k] if name == "real" else images[name][k]
            axes[2 * i, j].imshow(np.rot90(vol[:, :, 44]), cmap="gray", vmin=0, vmax=1)
            axes[2 * i + 1, j].imshow(np.rot90(vol[:, 50, :]), cmap="gray", vmin=0, vmax=1)
            axes[2 * i, j].set_title(f"{name}\n{rows[k]['age']:.0f} y {rows[k]['sex']}" if name == "real" else name, fontsize=8)
    for a in axes.flat:
        a.axis("off")
    fig.suptitle("Held-out real (IXI dataset, CC BY-SA 3.0) beside SYNTHETIC brains of the same age and sex - not for clinical use",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    raise SystemExit(main())
