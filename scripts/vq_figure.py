"""docs/vq_generated.png: three SYNTHETIC brains from the VQ backend (no real data in the figure).

    python scripts/vq_figure.py [--model synthbrain-vq-2mm] [--out docs/vq_generated.png]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="synthbrain-vq-2mm")
    p.add_argument("--out", default=str(ROOT / "docs" / "vq_generated.png"))
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import synth
    from synth.io import atomic_path

    gen = synth.load_generator(args.model, device="cpu")
    conds = [synth.Condition(age=a, sex=s) for a, s in ((30, "F"), (55, "M"), (80, "F"))]
    fig, axes = plt.subplots(len(conds), 3, figsize=(7, 2.4 * len(conds)))
    for row, c in zip(axes, conds):
        t = time.perf_counter()
        b = gen.generate(c, seed=0)
        print(f"{c.age:g} y {c.sex}: {time.perf_counter() - t:.1f} s", flush=True)
        img = b.image
        x, y, z = img.shape[0] // 2, img.shape[1] // 2, round(0.5625 * img.shape[2])
        for ax, v in zip(row, (img[:, :, z].T, img[:, y, :].T, img[x, :, :].T)):
            ax.imshow(v, cmap="gray", origin="lower", vmin=0, vmax=1)
            ax.set_axis_off()
        row[0].set_title(f"{c.age:g} y {c.sex}, seed 0", fontsize=8, loc="left")
    fig.suptitle(f"SYNTHETIC brains from {gen.config.name} {gen.config.version} - not for clinical use", fontsize=9)
    fig.tight_layout()
    with atomic_path(Path(args.out)) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
