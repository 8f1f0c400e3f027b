"""Measure refiner snapshots against the held-out subjects, to choose one by its samples, not its loss.

For each snapshot (a ``train-refiner`` run folder or a ``snaps/step_NNNNNN.pt``), the 36 held-out scans'
reconstructions and the model's unrefined samples at their ages and sexes (seeds 0-35, as
``synthbrain evaluate`` draws them) are refined and compared with the scans:

* two-sample tests: the evaluation's 3D CNN (accuracy and mean confidence) and the random-conv texture
  bank, for reconstructions and samples;
* Fréchet distances: texture (standardised random-conv bank) and the feature network's (FID);
* PSNR / SSIM inside the brain of the refined reconstructions;
* the speckle fraction (:func:`synth.realism.speckle_fraction`): isolated dots no scan has.

``--base`` measures the unrefined decoder too. Writes a JSON of every figure and a PNG of two axial
slices (real, unrefined, each snapshot; the real slices are IXI data, CC BY-SA 3.0: keep the PNG out of
the repository unless it is a deliberate, credited figure).

Usage::

    python scripts/measure_refiner.py --base /root/runs/refiner-lib/run/snaps/step_001000.pt \\
        --cache /root/runs/eval/cache-ldm-default --out /root/runs/refiner-lib/measure.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("snapshots", nargs="*", help="train-refiner run folders or snapshot .pt files")
    p.add_argument("--model", default="synthbrain-ldm-2mm", help="the model the refiner refines")
    p.add_argument("--data", default=str(Path.home() / ".cache/synthbrain/ixi-2mm"))
    p.add_argument("--cache", default=None, help="folder of cached unrefined samples (as synthbrain evaluate --cache)")
    p.add_argument("--base", action="store_true", help="measure the unrefined decoder as well")
    p.add_argument("--out", required=True, help="JSON of the figures (a PNG of slices is written beside it)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--c2st-repeats", type=int, default=3, help="repeats of the CNN test's cross-validation (accuracy: their mean)")
    p.add_argument("--no-recon-tests", action="store_true",
                   help="skip the two-sample tests on the reconstructions (PSNR, SSIM and texture FD are kept): half the time")
    args = p.parse_args(argv)
    for s in args.snapshots:
        if not Path(s).exists():
            p.error(f"no snapshot at {s}: expected a train-refiner run folder or a snaps/step_NNNNNN.pt")

    import torch

    import synth
    from synth import realism as R
    from synth import report
    from synth.data import PreparedData
    from synth.io import write_json
    from synth.metrics import psnr, ssim
    from synth.models.refiner import build_refiner, refine_volume
    from synth.train.refiner import load_refiner_snapshot

    torch.set_num_threads(args.threads)
    data = PreparedData.load(args.data)
    rows, real, masks = report.heldout_scans(data)
    gen = synth.load_generator(args.model, device="cpu")
    opts = {"refine": False} if getattr(gen, "refiner", None) is not None else {}
    cache = Path(args.cache) if args.cache else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    samples = [report._cached(gen, report._condition(r), i, opts, cache).image for i, r in enumerate(rows)]
    recon = report.reconstruct(gen, real)
    train = [data.t1(r) for r in data.subset("train", labelled=True)]
    feats = R.load_features()
    bank_real = R.random_conv_features(real)
    f_real = feats.predict(real)["features"]
    z_real = report.texture_scaled({"r": bank_real}, bank_real)["r"]
    out: dict = {"model": f"{gen.config.name} {gen.config.version}", "n_heldout": len(real),
                 "speckle_real": float(np.mean([R.speckle_fraction(x) for x in real])),
                 "texture_fd_train_vs_heldout": R.frechet_distance(
                     *report.texture_scaled({"t": R.random_conv_features(train), "r": bank_real}, bank_real).values())}
    print(f"held-out real: speckle {out['speckle_real']:.4f}, texture FD train vs held-out "
          f"{out['texture_fd_train_vs_heldout']:.2f}", flush=True)

    def measure(name: str, rec: list, smp: list) -> dict:
        z = report.texture_scaled({"rec": R.random_conv_features(rec), "smp": R.random_conv_features(smp)}, bank_real)
        res = {"psnr": float(np.mean([psnr(x, y, m) for x, y, m in zip(real, rec, masks)])),
               "ssim": float(np.mean([ssim(x, y, m) for x, y, m in zip(real, rec, masks)])),
               "texture_fd_recon": R.frechet_distance(z["rec"], z_real),
               "texture_fd_samples": R.frechet_distance(z["smp"], z_real),
               "fid_samples": R.frechet_distance(feats.predict(smp)["features"], f_real),
               "speckle_recon": float(np.mean([R.speckle_fraction(x) for x in rec])),
               "speckle_samples": float(np.mean([R.speckle_fraction(x) for x in smp]))}
        for k, imgs in ((("recon", rec),) if not args.no_recon_tests else ()) + (("samples", smp),):
            c = R.c2st(real, imgs, repeats=args.c2st_repeats).to_dict()
            res[f"c2st_{k}"], res[f"confidence_{k}"] = c["accuracy"], report.c2st_confidence(c)
            res[f"c2st_{k}_repeats"] = c["repeat_accuracy"]
            res[f"bank_{k}"] = R.c2st_logistic(bank_real, R.random_conv_features(imgs), 5, 0, "bank").accuracy
        print(name, " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()), flush=True)
        return res

    shown = {}
    if args.base:
        out["unrefined"] = measure("unrefined", recon, samples)
    shown["unrefined"] = (recon, samples)
    for s in args.snapshots:
        weights, arch, step = load_refiner_snapshot(s)
        net = build_refiner(arch)
        net.load_state_dict(weights)
        net.eval()
        rr, ss = [refine_volume(net, x) for x in recon], [refine_volume(net, x) for x in samples]
        name = f"{Path(s).parent.parent.name}/{Path(s).stem}" if Path(s).suffix == ".pt" else f"{Path(s).name}/last"
        out[name] = {"step": step, **measure(name, rr, ss)}
        shown[name] = (rr, ss)
        write_json(args.out, out)  # after each snapshot: nothing lost if a later one fails
    write_json(args.out, out)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = [0, 18]
    fig, ax = plt.subplots(2 * len(idx), 1 + len(shown), figsize=(2.6 * (1 + len(shown)), 5.6 * len(idx)))
    ax = np.atleast_2d(ax)
    for j, i in enumerate(idx):
        ax[2 * j, 0].imshow(np.rot90(real[i][:, :, 40]), cmap="gray", vmin=0, vmax=1)
        ax[2 * j, 0].set_title(f"real (IXI), age {rows[i]['age']:.0f}", fontsize=8)
        for k, (n, (rr, ss)) in enumerate(shown.items()):
            ax[2 * j, k + 1].imshow(np.rot90(rr[i][:, :, 40]), cmap="gray", vmin=0, vmax=1)
            ax[2 * j, k + 1].set_title(f"reconstruction, {n}", fontsize=7)
            ax[2 * j + 1, k + 1].imshow(np.rot90(ss[i][:, :, 40]), cmap="gray", vmin=0, vmax=1)
            ax[2 * j + 1, k + 1].set_title(f"sample, {n}", fontsize=7)
    for a in ax.ravel():
        a.axis("off")
    fig.tight_layout()
    fig.savefig(Path(args.out).with_suffix(".png"), dpi=70)
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
