#!/usr/bin/env python
"""The viewer's server-side work on CPU: time to a first brain, and one slice redraw.

    python benchmarks/bench_viewer.py [--model synthbrain-ldm-2mm] [--repeats 5] [--speed fast standard]

Times the functions the app itself calls (`viewer.service.run_generation`, `viewer.render`):
  first brain  generate + segment + what the browser is sent: the NiiVue T1 and label-overlay NIfTI
               bytes (model loads excluded: the app loads them once, while the user sets the
               condition), for each Speed of the sidebar (fast: the model's fast preset, the
               viewer's default; standard: the model's default sampling)    target <= 5 s
  redraw       three slice views with label overlay and crosshair as PNG (what a slider move costs)
               target <= 100 ms, against the baseline: the same three slices drawn as a matplotlib
               figure and saved as PNG
The browser adds transfer and drawing on top: tests/test_e2e_browser.py prints the first brain shown
after Generate and NiiVue's redraw (click to second animation frame) measured in headless chromium.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="synthbrain-ldm-2mm")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--speed", nargs="+", choices=("fast", "standard"), default=["fast", "standard"])
    args = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    import synth
    from synth.anatomy import STRUCTURES, load_segmenter
    from viewer import niivue, render, service

    t = time.perf_counter()
    gen = synth.load_generator(args.model, device="cpu")
    seg = load_segmenter(device="cpu")
    load_s = time.perf_counter() - t
    lut = render.label_lut(service.label_colors(STRUCTURES))

    def views(image, labels, pos):
        return [render.png_bytes(v) for v in render.orthogonal_views(image, pos, labels=labels, lut=lut).values()]

    firsts = {}
    for speed in args.speed:
        request = service.parse_request(model=args.model, age=70, sex="F", diagnosis="AD", seed=0, speed=speed)
        firsts[speed] = []
        for _ in range(max(1, args.repeats // 2)):
            t = time.perf_counter()
            out = service.run_generation(gen, request, segmenter=seg)
            niivue.t1_bytes(out.brain.image, out.brain.affine)
            niivue.label_overlay_bytes(out.labels, out.brain.affine, lut)
            firsts[speed].append(time.perf_counter() - t)
        firsts[speed + " sampling"] = f"{out.brain.provenance.get('sampler')} {out.brain.provenance.get('steps')} steps"
    image, labels = out.brain.image, out.labels

    ours, base = [], []
    for i in range(args.repeats):
        pos = (30 + i, 40 + i, 35 + i)
        t = time.perf_counter()
        views(image, labels, pos)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        fig, axes = plt.subplots(1, 3, figsize=(9, 3))
        for ax, sl in zip(axes, (image[pos[0]].T, image[:, pos[1]].T, image[:, :, pos[2]].T)):
            ax.imshow(sl, cmap="gray", origin="lower", vmin=0, vmax=1)
        fig.savefig(io.BytesIO(), format="png")
        plt.close(fig)
        base.append(time.perf_counter() - t)

    from synth.runtime import cpu_description

    cpu = cpu_description()
    print(f"machine: {cpu['cpu']}, {cpu['cores']} cores; PyTorch {cpu['torch']} kernels {cpu['capability']}; "
          f"native bf16 {'yes' if cpu['native_bf16'] else 'no'}; date {time.strftime('%Y-%m-%d')}; "
          f"model loads (once) {load_s:.2f} s")
    for speed in args.speed:
        print(f"first brain, {speed} ({firsts[speed + ' sampling']}; generate + segment + NiiVue bytes): "
              f"median {statistics.median(firsts[speed]):.2f} s (target <= 5 s)")
    print(f"slice redraw, 3 views + overlay as PNG:     median {1000 * statistics.median(ours):.1f} ms (target <= 100 ms)")
    print(f"baseline, matplotlib figure as PNG:         median {1000 * statistics.median(base):.1f} ms "
          f"({statistics.median(base) / statistics.median(ours):.1f}x slower)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
