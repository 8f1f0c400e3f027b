#!/usr/bin/env python
"""Render mid-slices of generated brains for the README (ages 25/50/80; CN/MCI/AD at 75).

    python scripts/make_figures.py [--model synthbrain-ldm-2mm] [--seed 0] [--out docs/generated_brains.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import synth  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=synth.DEFAULT_MODEL)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sex", default="F")
    p.add_argument("--out", default="docs/generated_brains.png")
    args = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = synth.load_generator(args.model)
    conds = [synth.Condition(age=a, sex=args.sex) for a in (25, 50, 80)]
    conds += [synth.Condition(age=75, sex=args.sex, diagnosis=d) for d in ("CN", "MCI", "AD")]
    brains = [gen.generate(c, seed=args.seed) for c in conds]
    fig, axes = plt.subplots(3, len(brains), figsize=(2.1 * len(brains), 6.6))
    for j, b in enumerate(brains):
        img = b.image
        c = b.condition
        for i, v in enumerate((img[:, :, 45].T, img[:, 50, :].T, img[38, :, :].T)):
            ax = axes[i, j]
            ax.imshow(v, cmap="gray", origin="lower", vmin=0, vmax=1)
            ax.set_axis_off()
        axes[0, j].set_title(f"{c.age:g} y {c.sex} {c.diagnosis}", fontsize=9)
    fig.suptitle(f"SYNTHETIC brains ({gen.config.name} {gen.config.version}, seed {args.seed}) - not for clinical use", fontsize=10)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
