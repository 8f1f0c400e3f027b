"""Where a latent diffusion model's samples differ from the first stage's latents of real scans, by band.

For the 36 held-out subjects (val + test) the script encodes each scan (the latent mean the prior was
trained on) and samples the model at the subject's age and sex (seeds 0-N, the model's default sampler),
then splits each latent's deviation from the training scans' mean latent into three bands:

* ``low``: Gaussian low-pass, sigma 2 latent voxels (16 mm at 2 mm / 4x): brain-wide offsets;
* ``mid``: sigma 0.7 low-pass minus ``low``: structure at about 6-16 mm;
* ``high``: the rest: the finest the latent grid holds.

and prints the SD of each band inside the brain, per latent channel, for real latents and samples,
with their ratio (1 = as real). A prior that draws real brains has ratios near 1 in every band.

Usage::

    python scripts/latent_bands.py --out /root/runs/latdiag/bands.json [--model synthbrain-ldm-2mm] [--n 12]

Run 2026-11-30 on ``synthbrain-ldm-2mm`` 0.4.0 (LDM card, "Where the prior is off: latent bands"). The
latents are derived from IXI scans: keep the JSON (figures only) and never the latents in the repository.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from _common import diagnosis_parser, load_model_and_data  # noqa: E402

BANDS = ("low", "mid", "high")


def band_split(z: np.ndarray, mean: np.ndarray) -> dict[str, np.ndarray]:
    """``z`` (N, C, X, Y, Z) minus ``mean`` (C, X, Y, Z), split into the three bands (they sum to the deviation)."""
    from scipy import ndimage

    d = z - mean
    low = ndimage.gaussian_filter(d, (0, 0, 2, 2, 2))
    mid = ndimage.gaussian_filter(d, (0, 0, 0.7, 0.7, 0.7)) - low
    return {"low": low, "mid": mid, "high": d - low - mid}


def band_sd(z: np.ndarray, mean: np.ndarray, mask: np.ndarray) -> dict[str, list[float]]:
    """Per band and channel, the SD of the deviation inside ``mask`` (X, Y, Z on the latent grid)."""
    return {k: [float(v) for v in b[:, :, mask].std(axis=(0, 2))] for k, b in band_split(z, mean).items()}


def main(argv=None) -> int:
    p = diagnosis_parser(__doc__)
    p.add_argument("--n", type=int, default=12, help="samples (the first N held-out subjects' conditions)")
    args = p.parse_args(argv)
    if args.n < 2:
        p.error(f"--n must be at least 2 (an SD across samples), got {args.n}")

    from scipy import ndimage

    from synth import report
    from synth.io import write_json

    gen, data = load_model_and_data(p, args)
    rows, real, masks = report.heldout_scans(data)
    scale = float(gen.config.latent_scale)
    t = time.perf_counter()
    train = np.stack([(gen.encode(data.t1(r)) * scale).numpy()[0] for r in data.subset("train", labelled=True)])
    held = np.stack([(gen.encode(x) * scale).numpy()[0] for x in real])
    mean = train.mean(0)
    f = train.shape[-1] / real[0].shape[-1]
    mask = ndimage.zoom(np.mean(masks, 0) > 0.5, f, order=0)
    print(f"encoded {len(train)} training and {len(held)} held-out scans in {time.perf_counter() - t:.0f} s", flush=True)
    opts = gen.sampling_options()
    t = time.perf_counter()
    samples = np.stack([(gen.sample_latent(report._condition(r), i, opts["steps"], opts["guidance_scale"], False, None)
                         * scale).numpy()[0] for i, r in enumerate(rows[: args.n])])
    print(f"sampled {len(samples)} latents ({opts['sampler']} {opts['steps']}, guidance {opts['guidance_scale']:g}) "
          f"in {time.perf_counter() - t:.0f} s", flush=True)
    out = {"model": f"{gen.config.name} {gen.config.version}", "sampling": opts, "n_samples": len(samples),
           "n_heldout": len(held), "latent_voxels_in_brain": int(mask.sum()),
           "heldout": band_sd(held, mean, mask), "samples": band_sd(samples, mean, mask)}
    print(f"\nSD of the deviation from the training mean latent, inside the brain, per channel ({out['model']})")
    print(f"{'band':6s} {'held-out real':>32s} {'samples':>32s} {'samples / real':>32s}")
    for b in BANDS:
        r, s = np.array(out["heldout"][b]), np.array(out["samples"][b])
        fmt = lambda v: " ".join(f"{x:7.3f}" for x in v)  # noqa: E731
        print(f"{b:6s} {fmt(r):>32s} {fmt(s):>32s} {fmt(s / r):>32s}")
    out["ratio"] = {b: [s / r for s, r in zip(out["samples"][b], out["heldout"][b])] for b in BANDS}
    write_json(args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
