#!/usr/bin/env python
"""Train the evaluation's feature network (age + sex) on the IXI training split; resumable.

    python scripts/train_features.py --run-dir /root/runs/features [--data ~/.cache/synthbrain/ixi-2mm]
        [--steps 1200] [--max-minutes 30] [--out assets/models/synthbrain-features-2mm]

Checkpoints go to RUN/last.pt every 100 steps (a rerun with the same --run-dir resumes), the losses
to RUN/losses.csv and held-out figures (age MAE, sex accuracy on val and test) to RUN/metrics.json.
With --out, the fp16 weights and config.json are written there for `synthbrain evaluate`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from synth.data.prepare import default_cache_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(default_cache_dir() / "ixi-2mm"))
    p.add_argument("--run-dir", required=True, help="run folder (outside the repository)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 64])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--out", default=None, help="write the model folder here (features.safetensors + config.json)")
    p.add_argument("--version", default="1.0.0")
    args = p.parse_args(argv)
    if not (Path(args.data) / "subjects.csv").is_file():
        p.error(f"--data expects a prepared data folder with subjects.csv, got {args.data}")

    from synth.realism import FeatureTrainConfig, export_features, train_features
    from synth.runtime import cpu_description

    cfg = FeatureTrainConfig(data_dir=args.data, run_dir=args.run_dir, steps=args.steps, batch_size=args.batch_size,
                             lr=args.lr, channels=tuple(args.channels), seed=args.seed, threads=args.threads,
                             max_minutes=args.max_minutes)
    t0 = time.time()
    metrics = train_features(cfg)
    print(f"step {metrics['step']} ({metrics['minutes']} min in all, {(time.time() - t0) / 60:.1f} this run)")
    for m in metrics["held_out"]:
        if m["n"]:
            print(f"  {m['split']}: n {m['n']}, age MAE {m['age_mae']:.2f} y (r {m['age_r']:.3f}), sex accuracy {m['sex_accuracy']:.3f}")
    if args.out:
        cpu = cpu_description()
        extra = {"held_out": metrics["held_out"], "train_fit": metrics["train"],
                 "command": "python scripts/train_features.py " + " ".join(sys.argv[1:] if argv is None else argv),
                 "hardware": cpu, "torch_threads": args.threads}
        folder = export_features(args.run_dir, args.out, version=args.version, extra=extra)
        print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
