#!/usr/bin/env python
"""Measure the shipped generator on the IXI test split and print the figures.

    python scripts/evaluate.py [--model synthbrain-ldm-2mm] [--data ~/.cache/synthbrain/ixi-2mm]
                               [--out eval.json] [--figures docs] [--skip fidelity]

Needs the prepared data (``synthbrain prepare``). Prints targets 1-3 of the quality issue and the
volume-fidelity study; writes the JSON and, with --figures, the README's comparison figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import synth  # noqa: E402
from synth import evaluate as ev  # noqa: E402
from synth.data.prepare import PreparedData, default_cache_dir  # noqa: E402
from synth.io import write_json  # noqa: E402


def _slice_at(shape) -> tuple[int, int, int]:
    """Sagittal, coronal and axial slice indices: mid-brain, and just above the ventricles' centre
    axially (slices 40, 48, 45 on the 80 x 96 x 80 MNI grid)."""
    return shape[0] // 2, shape[1] // 2, round(0.5625 * shape[2])


def _figure_real_vs_generated(pairs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pick = sorted(pairs, key=lambda p: p[0]["age"])
    pick = [pick[i] for i in np.linspace(0, len(pick) - 1, 4).astype(int)]
    fig, axes = plt.subplots(len(pick), 6, figsize=(12, 2.2 * len(pick)))
    for row, (r, real, b) in zip(axes, pick):
        for j, (img, who) in enumerate(((real, "real (IXI test)"), (b.image, "generated"))):
            x, y, z = _slice_at(img.shape)
            views = (img[:, :, z].T, img[:, y, :].T, img[x, :, :].T)
            for k, v in enumerate(views):
                ax = row[j * 3 + k]
                ax.imshow(v, cmap="gray", origin="lower", vmin=0, vmax=1)
                ax.set_axis_off()
                if k == 0:
                    ax.set_title(f"{who}\n{r['age']:.0f} y {r['sex']}", fontsize=8)
    fig.suptitle("Real IXI test subjects (CC BY-SA 3.0) beside SYNTHETIC brains of the same age and sex - not for clinical use", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _figure_age_sweep(sweep, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(sweep["ages"])
    fig = plt.figure(figsize=(2 * n, 4.6), layout="constrained")
    top, bottom = fig.subfigures(2, 1)  # a row of slices over two plots: grids that tight_layout cannot mix
    for ax, a, img in zip(top.subplots(1, n), sweep["ages"], sweep["images"]):
        ax.imshow(img[:, :, _slice_at(img.shape)[2]].T, cmap="gray", origin="lower", vmin=0, vmax=1)
        ax.set_title(f"{a} y", fontsize=9)
        ax.set_axis_off()
    ax1, ax2 = bottom.subplots(1, 2)
    ax1.plot(sweep["ages"], [100 * v for v in sweep["ventricles_frac"]], "o-")
    ax1.set_xlabel("requested age (years)")
    ax1.set_ylabel("lateral ventricles (% of ICV)")
    ax2.plot(sweep["ages"], [100 * v for v in sweep["brain_frac"]], "o-", color="C1")
    ax2.set_xlabel("requested age (years)")
    ax2.set_ylabel("brain (% of ICV)")
    fig.suptitle(f"One seed ({sweep['seed']}, {sweep['sex']}) across ages - SYNTHETIC, not for clinical use", fontsize=10)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=synth.DEFAULT_MODEL)
    p.add_argument("--data", default=str(default_cache_dir() / "ixi-2mm"))
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--figures", default=None, help="folder for real_vs_generated.png and age_sweep.png")
    p.add_argument("--skip", nargs="*", default=[], choices=["reconstruction", "sharpness", "latent", "condition", "sweep", "fidelity"])
    p.add_argument("--fidelity-n", type=int, default=54)
    args = p.parse_args()
    if args.figures:  # made before the long work, not after it
        Path(args.figures).mkdir(parents=True, exist_ok=True)

    gen = synth.load_generator(args.model, device="auto")
    data = PreparedData.load(args.data)
    seg = None
    try:
        from synth.anatomy import load_segmenter

        seg = load_segmenter(device=str(gen.device))
    except Exception as exc:  # anatomy is optional for targets 1-3
        print(f"(no segmenter: {exc}; sweep volumes use intensity thresholds, fidelity skipped)")
    res: dict = {"model": gen.config.name, "model_version": gen.config.version, "device": str(gen.device),
                 "date": time.strftime("%Y-%m-%d")}
    t0 = time.time()

    def save():  # after every section, so a failure later loses nothing measured
        res["seconds"] = round(time.time() - t0, 1)
        if args.out:
            write_json(args.out, res)

    if "reconstruction" not in args.skip:
        r = ev.reconstruction(gen, data)
        res["reconstruction"] = r
        print(f"1. autoencoder on {r['n']} test subjects: PSNR {r['psnr_mean']:.2f} dB (target >= 30), "
              f"SSIM {r['ssim_mean']:.3f} (target >= 0.92)")
        for s in r["per_subject"]:
            print(f"     {s['mrid']}: {s['psnr']:.2f} dB, SSIM {s['ssim']:.3f}")
        for ref in r["reference"]:
            print(f"   reference, {ref['method']}: PSNR {ref['psnr_mean']:.2f} dB, SSIM {ref['ssim_mean']:.3f}")
        save()
    if "sharpness" not in args.skip:
        s, pairs = ev.sample_sharpness(gen, data, log=lambda m: None)
        res["sharpness"] = s
        print(f"2. sharpness: generated {s['generated_mean']:.4f} / real {s['real_mean']:.4f} = {s['ratio']:.3f} (target >= 0.9)")
        print(f"   tissue contrast, intensity distance to real: generated {s['intensity_distance_generated']:.4f}, "
              f"real subject to real subject {s['intensity_distance_real_pairs']:.4f} (lower is closer)")
        save()
        if args.figures:
            _figure_real_vs_generated(pairs, Path(args.figures) / "real_vs_generated.png")
    if "latent" not in args.skip:
        d = ev.latent_detail(gen, data)
        res["latent_detail"] = d
        print(f"   latent high-pass energy (std): real test scans {d['real_highpass']:.3f} ({d['real_std']:.2f}), "
              f"sampled {d['sampled_highpass']:.3f} ({d['sampled_std']:.2f})")
        save()
    if "condition" not in args.skip:
        c = ev.condition_following(gen, data)
        res["condition_following"] = c
        print(f"3a. band-mean correlation generated vs real: matched {c['matched_mean']:.4f}, "
              f"mismatched {c['mismatched_mean']:.4f}; own band best: {c['best_match_is_own_band']}")
        save()
    if "sweep" not in args.skip:
        sw = ev.age_sweep(gen, seg)
        print(f"3b. one seed 25->80 y, % of ICV: ventricles {['%.2f' % (100 * v) for v in sw['ventricles_frac']]} "
              f"(r={sw['ventricles_r_age']:.2f}), brain {['%.1f' % (100 * v) for v in sw['brain_frac']]} (r={sw['brain_r_age']:.2f}); "
              f"mL: ventricles {['%.1f' % v for v in sw['ventricles_ml']]}, ICV {['%.0f' % v for v in sw['icv_ml']]}")
        if args.figures:
            _figure_age_sweep(sw, Path(args.figures) / "age_sweep.png")
        res["age_sweep"] = {k: v for k, v in sw.items() if k != "images"}
        save()
    if "fidelity" not in args.skip and seg is not None:
        f = ev.fidelity(gen, seg, data, n=args.fidelity_n)
        res["fidelity"] = f
        for k, v in f["generated"].items():
            real = f.get("segmenter_on_real_test", {}).get(k, {})
            print(f"4. {k}: generated r={v['pearson_r']:.2f}, median rel. error {v['median_rel_error']:.1%} "
                  f"(median bias {v['median_bias']:+.1%}); "
                  f"segmenter on real test r={real.get('pearson_r', float('nan')):.2f}, "
                  f"error {real.get('median_rel_error', float('nan')):.1%}")
    save()
    print(f"done in {res['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
