"""Compare first stages (``AutoencoderKL``s, any latent space) on the held-out real scans.

A new first stage has a new latent space, so its samples need a new prior; before training one,
this measures what the first stage itself allows, the ceiling ``synthbrain evaluate`` reports for a
shipped model. For each candidate, on the labelled val + test subjects (each scan encoded to its
latent mean and decoded, in the precision the generator would use, background zeroed):

- reconstruction inside the brain (PSNR, SSIM);
- the classifier two-sample tests of ``synthbrain evaluate`` on the reconstructions against the scans
  (3D CNN per fold, with its confidence, which still ranks candidates when every accuracy is 100 %;
  logistic regression on the fixed random-convolution texture bank);
- the segmenter's volumes on the reconstructions against the prepared table (r, median bias), beside
  the same on the scans themselves;
- the latents' shape, standard deviation and high-pass energy (what a prior must model);

written to ``first_stages.json``, with a PNG of the same slices of a few scans and of each
candidate's reconstructions. Candidates: a packaged model folder, a training run folder (its
``last.pt`` EMA weights) or a snapshot (``RUN/snaps/step_NNNNNN.pt``).

Usage::

    python scripts/compare_first_stages.py --out /root/runs/eval/first-stages \\
        --first-stage shipped=assets/models/synthbrain-ldm-2mm --first-stage l8=/root/runs/ae-l8/snaps/step_001750.pt
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


class FirstStage:
    """``encode`` (numpy volume -> latent mean) and ``decode`` (latent -> numpy volume) of one ``AutoencoderKL``."""

    def __init__(self, parts: tuple[dict, dict], bf16: bool):
        """``parts``: ``(config, weights)`` from :func:`synth.train.common.load_autoencoder_parts`."""
        from synth.models.networks import build_autoencoder

        self.config, weights = parts
        self.model = build_autoencoder(self.config)
        self.model.load_state_dict(weights)
        self.model.eval()
        self.bf16 = bf16

    @torch.no_grad()
    def encode(self, x: np.ndarray) -> torch.Tensor:
        from synth.models.networks import latent_mean
        from synth.train.common import autocast

        with autocast(torch.device("cpu"), self.bf16):
            return latent_mean(self.model, torch.from_numpy(np.asarray(x, np.float32))[None, None]).float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> np.ndarray:
        from synth.train.common import autocast

        with autocast(torch.device("cpu"), self.bf16):
            return self.model.decode(z).float().clamp_(0, 1)[0, 0].numpy()  # as the generator decodes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(Path.home() / ".cache/synthbrain/ixi-2mm"))
    p.add_argument("--first-stage", action="append", required=True, help="NAME=model folder, run folder or .pt snapshot")
    p.add_argument("--out", required=True)
    p.add_argument("--segmenter", default="synthbrain-seg-2mm", help="segmenter name or folder, or 'none'")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--c2st-steps", type=int, default=150)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    specs = [s.split("=", 1) for s in args.first_stage]
    if any(len(s) != 2 or not s[0] for s in specs):
        p.error("--first-stage expects NAME=PATH")
    from synth.train.common import load_autoencoder_parts

    parts = {}
    for name, path in specs:  # every candidate read (once) before minutes of measuring
        try:
            parts[name] = load_autoencoder_parts(path)
        except FileNotFoundError as exc:
            p.error(f"--first-stage {name}: {exc}")

    from synth.data.prepare import PreparedData
    from synth.evaluate import highpass_energy, volume_agreement
    from synth.io import atomic_path
    from synth.metrics import psnr, ssim
    from synth.realism import random_conv_features
    from synth.report import VOLUME_KEYS, c2st_confidence, first_stage_ceiling, heldout_scans, measured_against_table, reconstruct
    from synth.runtime import resolve_precision

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = PreparedData.load(args.data)
    held, real, masks = heldout_scans(data)
    bank_real = random_conv_features(real)
    bf16 = resolve_precision(None, torch.device("cpu")) == "bf16"  # the generator's numeric path here
    seg = None
    results: dict = {"data": {"subjects": len(held), "splits": "val+test"}, "precision": "bf16" if bf16 else "fp32",
                     "first_stages": {}}
    if args.segmenter != "none":
        from synth.anatomy import load_segmenter

        seg = load_segmenter(args.segmenter, device="cpu")
        table, meas = measured_against_table(seg, held, real)
        results["segmenter_on_scans"] = {k: volume_agreement(table[k], meas[k]) for k in VOLUME_KEYS}
    shown = {}
    for name, path in specs:
        t0 = time.time()
        fs = FirstStage(parts.pop(name), bf16)
        latents = [fs.encode(x) for x in real[:8]]
        recon = reconstruct(fs, real)
        ceiling = first_stage_ceiling(fs, real, masks, bank_real, folds=args.folds, steps=args.c2st_steps, recon=recon)
        row = {
            "path": str(path), "latent_shape": list(latents[0].shape[1:]),
            "latent_std": float(torch.cat([z.flatten() for z in latents]).std()),
            "latent_highpass_energy": float(np.mean([highpass_energy(z) for z in latents])),
            "psnr": float(np.mean([psnr(x, y, m) for x, y, m in zip(real, recon, masks)])),
            "ssim": float(np.mean([ssim(x, y, m) for x, y, m in zip(real, recon, masks)])),
            "c2st_cnn": ceiling["cnn"]["accuracy"], "c2st_cnn_confidence": c2st_confidence(ceiling["cnn"]),
            "c2st_texture_bank": ceiling["logistic_random_conv"]["accuracy"],
        }
        if seg is not None:
            table, meas = measured_against_table(seg, held, recon)
            row["volumes"] = {k: volume_agreement(table[k], meas[k]) for k in VOLUME_KEYS}
        row["seconds"] = round(time.time() - t0, 1)
        results["first_stages"][name] = row
        shown[name] = recon
        print(name, json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "volumes"}),
              "hippocampus r", round(row["volumes"]["hippocampus"]["pearson_r"], 3) if "volumes" in row else "-", flush=True)
        with atomic_path(out / "first_stages.json") as tmp:
            Path(tmp).write_text(json.dumps(results, indent=1))
    _figure(real, shown, held, out / "first_stages.png")
    print(f"wrote {out / 'first_stages.json'} and {out / 'first_stages.png'} (reconstructions of real scans; IXI dataset, CC BY-SA 3.0)")
    return 0


def _figure(real, images: dict, rows, path: Path, n: int = 3) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from synth.io import atomic_path

    cols = 1 + len(images)
    fig, axes = plt.subplots(n, cols, figsize=(2.4 * cols, 2.6 * n), squeeze=False)
    for i in range(min(n, len(real))):
        z = real[i].shape[2] // 2
        for j, (title, img) in enumerate([("real (IXI, CC BY-SA 3.0)", real[i]), *((k, v[i]) for k, v in images.items())]):
            ax = axes[i, j]
            ax.imshow(np.rot90(img[:, :, z]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title, fontsize=8)
        axes[i, 0].text(2, 4, f"{rows[i]['age']:.0f} y {rows[i]['sex']}", fontsize=7, color="w", va="top")
    fig.suptitle("First stages: reconstructions of held-out scans (not for clinical use)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
