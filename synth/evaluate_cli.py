"""The ``synthbrain evaluate`` sub-command: parser and handler (light at parse time: no torch).

    synthbrain evaluate [--model synthbrain-ldm-2mm] [--data ~/.cache/synthbrain/ixi-2mm]
                        --out-dir docs/evaluation/synthbrain-ldm-2mm [--n-samples 37] [--force]

Arguments, the prepared data and the output folder are checked before torch loads; nothing is
written on a bad argument. The report is :func:`synth.report.write_report`'s.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["add_parser"]

REPORT_FILES = ("report.md", "report.json")


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}")
        return v

    return parse


def _models_root() -> Path:
    env = os.environ.get("SYNTHBRAIN_MODELS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "assets" / "models"


def _model_folder(name: str, what: str, flag: str) -> Path:
    """``name`` as a folder holding config.json (a path, or a name in the models folder)."""
    for p in (Path(name), _models_root() / name):
        if (p / "config.json").is_file():
            return p
    raise ValueError(f"{flag} expects a {what} name or folder holding config.json, got {name!r}")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .cli import UsageError
    from .io import check_writable

    data_dir = Path(args.data).expanduser()
    if not (data_dir / "subjects.csv").is_file():
        raise UsageError(f"--data expects a prepared data folder holding subjects.csv (run `synthbrain prepare`), got {args.data}")
    out = Path(args.out_dir)
    existing = [str(out / f) for f in REPORT_FILES if (out / f).exists()]
    if existing and not args.force:
        raise UsageError(f"refusing to overwrite {existing[0]} (use --force)")
    features = _model_folder(args.features, "feature network", "--features")
    if args.model and not Path(args.model).is_dir() and not (_models_root() / args.model).is_dir():
        raise UsageError(f"--model expects a model name or folder, got {args.model!r}")
    generate_options = {"fast": True} if args.fast else {}
    if args.fast or args.refiner is not None:  # both are checked against the model's config (read once, no torch)
        from .cohort import DEFAULT_MODEL
        from .io import read_json

        model_dir = _model_folder(args.model or DEFAULT_MODEL, "generator", "--model")
        config = read_json(model_dir / "config.json")
        if args.fast and not isinstance(config.get("sampling", {}).get("fast"), dict):
            raise UsageError(f"--fast expects a model with a fast sampling preset (config sampling.fast); "
                             f"{model_dir.name} has none")
        if args.refiner is not None and isinstance(config.get("refiner"), dict):
            generate_options["refine"] = args.refiner
        elif args.refiner:
            raise UsageError(f"--refiner expects a model with a refiner; {model_dir.name} has none")
        # --no-refiner on a model without one changes nothing
    if args.segmenter != "none":
        _model_folder(args.segmenter, "segmenter", "--segmenter")
    elif args.match_volumes:
        raise UsageError("--match-volumes needs a segmenter (not --segmenter none)")
    check_writable(out / "report.md")

    import synth  # heavy (torch): only after every check

    from .data.prepare import PreparedData
    from .realism import load_features
    from .report import EvalOptions, run_evaluation, write_report

    import torch

    from .runtime import pick_threads

    torch.set_num_threads(pick_threads(args.threads))  # the measuring networks; generation picks its own
    log = (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))
    data = PreparedData.load(data_dir)
    gen = synth.load_generator(args.model or synth.DEFAULT_MODEL, device=args.device)
    opts = EvalOptions(n_samples=args.n_samples, seed=args.seed, diversity_conditions=args.diversity_conditions,
                       diversity_seeds=args.diversity_seeds, c2st_folds=args.folds, c2st_steps=args.c2st_steps,
                       c2st_repeats=args.c2st_repeats,
                       segmenter=None if args.segmenter == "none" else args.segmenter,
                       splits=tuple(args.splits), cache_dir=args.cache, match_volumes=args.match_volumes,
                       first_stage=not args.no_first_stage, generate_options=generate_options)
    results, arrays = run_evaluation(gen, data, load_features(features), opts, log=log)
    path = write_report(results, arrays, out)
    from .compare import verdicts

    c, d, v = results["c2st"]["cnn"], results["distances"], verdicts(results).values()
    print(f"wrote {path} and {out / 'report.json'}: C2ST accuracy {100 * c['accuracy']:.1f} %, FID {d['samples']['fid']:.3g} "
          f"(real yardstick {d['yardstick']['fid']:.3g}), brain age r {results['brain_age']['samples']['r']:.2f}; "
          f"targets met {sum(x is True for x in v)} of {sum(x is not None for x in v)} "
          f"(generated brains are synthetic, not for clinical use)")
    return 0


def add_parser(sub) -> None:
    """Register ``evaluate`` on the CLI's sub-parsers."""
    from .data.prepare import default_cache_dir

    e = sub.add_parser("evaluate", help="measure a generator against held-out real scans (Markdown report + figures + JSON)")
    e.add_argument("--model", default=None, help="generator name or folder (default synthbrain-ldm-2mm)")
    e.add_argument("--data", default=str(default_cache_dir() / "ixi-2mm"), help="prepared data folder (synthbrain prepare)")
    e.add_argument("--out-dir", required=True, help="folder for report.md, report.json and the figures")
    e.add_argument("--features", default="synthbrain-features-2mm", help="feature network name or folder")
    e.add_argument("--segmenter", default="synthbrain-seg-2mm", help="segmenter for the volume study, or 'none'")
    e.add_argument("--splits", nargs="+", choices=("train", "val", "test"), default=["val", "test"], help="held-out splits")
    e.add_argument("--n-samples", type=_int_at_least(4), default=None, help="generated brains (default: one per held-out subject)")
    e.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of the first brain")
    e.add_argument("--diversity-conditions", type=_int_at_least(1), default=4)
    e.add_argument("--diversity-seeds", type=_int_at_least(2), default=4)
    e.add_argument("--folds", type=_int_at_least(2), default=5, help="cross-validation folds of the two-sample tests")
    e.add_argument("--c2st-steps", type=_int_at_least(1), default=150, help="training steps of the C2ST classifier per fold")
    e.add_argument("--c2st-repeats", type=_int_at_least(1), default=3,
                   help="repeats of the CNN two-sample test's cross-validation; the accuracy is their mean (steadier; 1: one run)")
    e.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default cpu)")
    e.add_argument("--threads", type=_int_at_least(1), default=None,
                   help="CPU threads of the measuring networks (default: $SYNTHBRAIN_THREADS or the idle cores)")
    e.add_argument("--cache", default=None,
                   help="keep the generated brains in this folder (outside the repository) and reuse them in later runs")
    e.add_argument("--fast", action="store_true",
                   help="generate with the model's fast sampling preset (the viewer's 'fast' speed) instead of its default")
    e.add_argument("--refiner", action=argparse.BooleanOptionalAction, default=None,
                   help="generate with (--refiner) or without (--no-refiner) the model's refiner (default: as the model "
                        "ships it); with --cache, --no-refiner reuses the unrefined brains a refined run cached")
    e.add_argument("--match-volumes", action="store_true",
                   help="warp the generated brains to their requested ventricle and hippocampus volumes before measuring "
                        "(synth.anatomy.match_volumes; the volume study then measures the warp)")
    e.add_argument("--no-first-stage", action="store_true",
                   help="skip the first-stage ceiling (the two-sample tests on reconstructions of the held-out scans)")
    e.add_argument("--force", action="store_true", help="overwrite an existing report")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_cmd_evaluate)


if __name__ == "__main__":  # pragma: no cover
    from .cli import main

    sys.exit(main(["evaluate", *sys.argv[1:]]))
