"""The ``synthbrain`` command line.

Bad arguments give one line on stderr and exit code 2, with nothing written. Arguments are checked
before any heavy import (torch, MONAI) or model load, so a bad one fails at once: this module and
what it imports at parse time must stay light (numpy at most).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser"]


class UsageError(Exception):
    """A problem with what the user asked for (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        raise UsageError(message)


def _number(kind, minimum: float, inclusive: bool, what: str):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < minimum or (not inclusive and v == minimum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return parse


_positive_int = _number(int, 0, False, "a positive integer")
_nonnegative_int = _number(int, 0, True, "an integer >= 0")
_nonnegative_float = _number(float, 0.0, True, "a number >= 0")
_positive_float = _number(float, 0.0, False, "a number > 0")

MAX_SEED = 2**63 - 1  # the sampler's torch.Generator takes a signed 64-bit seed
MAX_BRAINS = 10_000  # --n
MAX_STEPS = 1000  # DDIM steps cannot exceed the training timesteps (1000 for every model here)


def _bounded(kind, lo: float, hi: float, what: str):
    """An argparse type: a finite ``kind`` within [lo, hi], else 'expected <what>, got ...'."""

    def parse(text: str):
        try:
            v = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if isinstance(v, float) and not math.isfinite(v) or not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return parse


def _age(text: str) -> float:
    from .condition import AGE_RANGE, _parse_age

    try:
        return _parse_age(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an age in years within {AGE_RANGE[0]:g}-{AGE_RANGE[1]:g}, got {text!r}") from None


def _choice(name: str, choices_attr: str, aliases: dict[str, str] | None = None):
    def parse(text: str) -> str:
        from . import condition

        choices = getattr(condition, choices_attr)
        try:
            return condition._parse_choice(name, text, choices, aliases or {})
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {text!r}") from None

    return parse


_sex = _choice("sex", "SEXES", {"female": "F", "male": "M"})
_diagnosis = _choice("diagnosis", "DIAGNOSES")
_seed = _bounded(int, 0, MAX_SEED, f"a seed within 0-{MAX_SEED}")
_steps = _bounded(int, 1, MAX_STEPS, f"a number of DDIM steps within 1-{MAX_STEPS}")
_guidance = _bounded(float, 0.0, 20.0, "a guidance scale within 0-20")
_n_brains = _bounded(int, 1, MAX_BRAINS, f"a number of brains within 1-{MAX_BRAINS}")


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def _add_condition_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--age", type=_age, required=True, help="age in years (18-95; the model saw 20-82)")
    p.add_argument("--sex", type=_sex, required=True, help="F or M")
    p.add_argument("--diagnosis", type=_diagnosis, default="CN", help="CN, MCI or AD (default CN)")
    p.add_argument(
        "--volume",
        action="append",
        default=[],
        metavar="NAME=FRACTION",
        help="explicit volume target as a fraction of intracranial volume, e.g. hippocampus=0.004 (repeatable)",
    )


def condition_from_args(args: argparse.Namespace):
    from .condition import Condition

    volumes = {}
    for item in args.volume:
        if "=" not in item:
            raise UsageError(f"--volume expects NAME=FRACTION, got {item!r}")
        key, value = item.split("=", 1)
        volumes[key.strip()] = value.strip()
    return Condition(age=args.age, sex=args.sex, diagnosis=args.diagnosis, volumes=volumes)


def _cmd_generate(args: argparse.Namespace) -> int:
    from .brain import sidecar_path
    from .io import check_writable, nifti_suffix

    cond = condition_from_args(args)
    if args.n < 1:
        raise UsageError(f"--n must be at least 1, got {args.n}")
    if not 0 <= args.seed <= MAX_SEED - (args.n - 1):
        raise UsageError(f"--seed must be within 0-{MAX_SEED - (args.n - 1)} for --n {args.n}, got {args.seed}")
    out = Path(args.out)
    suffix = nifti_suffix(out)
    stem = out.name[: -len(suffix)]
    if not stem:
        raise UsageError(f"--out needs a file name before {suffix}, got {args.out!r}")
    paths = [out] if args.n == 1 else [out.with_name(f"{stem}_{i:03d}{suffix}") for i in range(args.n)]
    existing = [str(p) for p in paths + [sidecar_path(p) for p in paths] if p.exists()]
    if existing and not args.force:
        raise UsageError(f"refusing to overwrite {existing[0]} (use --force)")
    check_writable(out)
    from .pipeline import DEFAULT_MODEL, load_generator  # heavy (torch): only after every check

    gen = load_generator(args.model or DEFAULT_MODEL, device=args.device)
    has_refiner = getattr(gen, "refiner", None) is not None
    if args.refiner and not has_refiner:
        raise UsageError(f"--refiner: model {gen.config.name!r} has no refiner (see `synthbrain models`)")
    # --no-refiner for a model without one changes nothing
    refine = {"refine": args.refiner} if args.refiner is not None and has_refiner else {}
    segmenter = None
    if args.match_volumes:
        from .anatomy import load_segmenter

        segmenter = load_segmenter(args.segmenter, device=args.device)
    for i, path in enumerate(paths):
        brain = gen.generate(cond, seed=args.seed + i, steps=args.steps, guidance_scale=args.guidance_scale,
                             precision=args.precision, threads=args.threads, sampler=args.sampler, fast=args.fast,
                             progress=not args.quiet, **refine)
        if segmenter is not None:
            from .anatomy import match_brain_volumes

            brain, _ = match_brain_volumes(brain, segmenter)
            vm = brain.provenance["volume_matching"]
            print("  volumes matched: " + ", ".join(
                f"{k} {vm['before'][k]:.4f} -> {vm['after'][k]:.4f} of ICV (requested {vm['requested'][k]:.4f})"
                for k in vm["structures"]))
        brain.save(path)
        prov = brain.provenance
        how = f"{prov.get('sampler')} {prov.get('steps')} steps" if "steps" in prov else prov.get("sampler")  # vq: no steps
        refined = isinstance(prov.get("refiner"), dict) and prov["refiner"].get("applied")
        print(f"wrote {path} and {sidecar_path(path)} (seed {args.seed + i}; {how}{' + refiner' if refined else ''}, "
              f"{prov.get('precision')}; synthetic, not for clinical use)")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .data import prepare_ixi

    data = prepare_ixi(args.ixi, args.out, workers=args.workers, limit=args.limit, progress=not args.quiet)
    counts = {s: len(data.subset(s)) for s in ("train", "val", "test")}
    print(f"prepared {len(data.rows)} subjects in {data.root} (split {counts})")
    return 0


def _cmd_train_autoencoder(args: argparse.Namespace) -> int:
    from .train.defaults import DEFAULT_AE, DEFAULT_DISCRIMINATOR, is_model_folder, smallest_disc_crop  # light: no torch

    arch = dict(DEFAULT_AE)
    if args.init_from:  # the architecture of the run or packaged model it starts from
        ckpt = Path(args.init_from) / "last.pt"
        if is_model_folder(args.init_from):
            from .io import read_json

            arch = dict(read_json(Path(args.init_from) / "config.json")["autoencoder"])
        elif ckpt.is_file():
            import torch

            arch = dict(torch.load(ckpt, map_location="cpu", weights_only=False)["config"]["autoencoder"])
        else:
            raise UsageError(f"--init-from expects a training run folder holding last.pt or a model folder "
                             f"(config.json + autoencoder.safetensors), got {args.init_from}")
    if args.channels:
        if any(c % arch["norm_num_groups"] for c in args.channels):
            raise UsageError(f"--channels must be multiples of {arch['norm_num_groups']} (the GroupNorm groups), got {args.channels}")
        arch.update(channels=list(args.channels), attention_levels=[False] * len(args.channels))
    if args.latent_channels:
        arch["latent_channels"] = args.latent_channels
    if args.res_blocks:
        arch["num_res_blocks"] = args.res_blocks
    if args.latent_noise > 0 and not args.decoder_only:
        raise UsageError(f"--latent-noise needs --decoder-only (the encoder must be frozen), got --latent-noise {args.latent_noise}")
    if args.adv_latents and not (args.decoder_only and args.adv_weight > 0):
        raise UsageError(f"--adv-latents needs --decoder-only and --adv-weight > 0, got --adv-latents {args.adv_latents}")
    if args.adv_latents and not Path(args.adv_latents).is_file():
        raise UsageError(f"--adv-latents expects a latent bank (.pt) written by scripts/sample_latents.py, got {args.adv_latents}")
    smallest = smallest_disc_crop(DEFAULT_DISCRIMINATOR)
    if args.disc_crop is not None and args.disc_crop < smallest:
        raise UsageError(f"--disc-crop must be at least {smallest} voxels (the discriminator's smallest input), got {args.disc_crop}")
    from .train.autoencoder import AETrainConfig, train_autoencoder  # heavy (torch): after the checks

    cfg = AETrainConfig(data_dir=args.data, run_dir=args.run, steps=args.steps, batch_size=args.batch_size,
                        lr=args.lr, bf16=not args.no_bf16, seed=args.seed, max_minutes=args.max_minutes,
                        init_from=args.init_from, decoder_only=args.decoder_only, autoencoder=arch,
                        adv_weight=args.adv_weight, adv_start=args.adv_start, kl_weight=args.kl_weight,
                        latent_noise=args.latent_noise, disc_crop=args.disc_crop, adv_latents=args.adv_latents,
                        snap_every=args.snap_every)
    state = train_autoencoder(cfg, progress=not args.quiet)
    print(f"autoencoder at step {state['step']} in {args.run}/last.pt")
    return 0


def _cmd_train_diffusion(args: argparse.Namespace) -> int:
    from .train.defaults import is_model_folder  # light: no torch

    for flag, path, needs in (("--ae-run", args.ae_run, "autoencoder.safetensors"), ("--init-from", args.init_from, "unet.safetensors")):
        if path and not (is_model_folder(path) and (Path(path) / needs).is_file()) and not (Path(path) / "last.pt").is_file():
            raise UsageError(f"{flag} expects a training run folder holding last.pt or a model folder "
                             f"(config.json + {needs}), got {path}")
    from .train.diffusion import LDMTrainConfig, train_diffusion  # heavy (torch): after the checks

    cfg = LDMTrainConfig(data_dir=args.data, ae_run=args.ae_run, run_dir=args.run, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, bf16=not args.no_bf16, seed=args.seed,
                         max_minutes=args.max_minutes, init_from=args.init_from, augment=args.augment,
                         snap_every=args.snap_every, gap_every=args.gap_every)
    state = train_diffusion(cfg, progress=not args.quiet)
    print(f"diffusion UNet at step {state['step']} in {args.run}/last.pt")
    return 0


def _cmd_train_refiner(args: argparse.Namespace) -> int:
    from .train.defaults import DEFAULT_DISCRIMINATOR, smallest_disc_crop  # light: no torch

    smallest = smallest_disc_crop(DEFAULT_DISCRIMINATOR) + 2 * args.layers
    if args.crop < smallest:
        raise UsageError(f"--crop must be at least {smallest} voxels (the discriminator's {smallest - 2 * args.layers} "
                         f"plus {args.layers} a side the losses leave out), got {args.crop}")
    if args.init_from and not Path(args.init_from).exists():
        raise UsageError(f"--init-from expects a train-refiner run folder, a snapshot .pt or a model folder with a "
                         f"refiner, got {args.init_from}")
    if args.init_disc_from and not (Path(args.init_disc_from) / "last.pt").is_file():
        raise UsageError(f"--init-disc-from expects a train-refiner run folder (last.pt), got {args.init_disc_from}")
    if not (Path(args.data) / "subjects.csv").is_file():
        raise UsageError(f"--data expects a folder written by `synthbrain prepare` (subjects.csv), got {args.data}")
    from .train.refiner import RefinerTrainConfig, train_refiner  # heavy (torch): after the checks

    cfg = RefinerTrainConfig(data_dir=args.data, model=args.model, run_dir=args.run, steps=args.steps,
                             batch_size=args.batch_size, crop=args.crop, lr=args.lr, adv_weight=args.adv_weight,
                             grad_weight=args.grad_weight, samples=args.samples, lowpass_weight=args.lowpass_weight,
                             speckle_weight=args.speckle_weight, speckle_margin=args.speckle_margin,
                             refiner={"width": args.width, "layers": args.layers, "context": args.context},
                             seed=args.seed,
                             snap_every=args.snap_every, max_minutes=args.max_minutes, init_from=args.init_from,
                             init_discriminator_from=args.init_disc_from)
    state = train_refiner(cfg, progress=not args.quiet)
    print(f"refiner at step {state['step']} in {args.run}/last.pt")
    return 0


def _cmd_package_refiner(args: argparse.Namespace) -> int:
    run = Path(args.run)
    if not ((run / "last.pt").is_file() or (run.suffix == ".pt" and run.is_file())):
        raise UsageError(f"--run expects a train-refiner run folder (last.pt) or a snapshot .pt, got {args.run}")
    from .train.refiner import package_refiner

    folder = package_refiner(run, args.model, args.out, version=args.version, default=not args.off_by_default)
    print(f"packaged {folder} with its refiner ({'applied by default' if not args.off_by_default else 'off by default'})")
    return 0


def _cmd_package(args: argparse.Namespace) -> int:
    from .train.defaults import is_model_folder  # light: no torch

    if not (is_model_folder(args.ae_run) or (Path(args.ae_run) / "last.pt").is_file()):
        raise UsageError(f"--ae-run expects an autoencoder run folder holding last.pt or a model folder, got {args.ae_run}")
    ldm = Path(args.ldm_run)
    if not (is_model_folder(ldm) or (ldm / "last.pt").is_file() or (ldm.suffix == ".pt" and ldm.is_file())):
        raise UsageError(f"--ldm-run expects a diffusion run folder holding last.pt, one of its snapshots (.pt) or a "
                         f"model folder, got {args.ldm_run}")
    from .train.package import package_model

    folder = package_model(args.ae_run, args.ldm_run, args.out, name=args.name, version=args.version,
                           steps=args.sampling_steps, guidance_scale=args.guidance_scale)
    print(f"packaged model in {folder}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .generators import available_models, models_dir
    from .io import read_json

    for m in available_models(details=True):
        refiner = read_json(m.path / "config.json").get("refiner")
        on, fast = (refiner.get("default", True), refiner.get("fast_default", False)) if refiner else (False, False)
        with_fast = m.backend == "ldm" and on and not fast  # the VQ backend has no fast preset
        extra = (f"\trefiner ({'on' if on else 'off'} by default" + (", off with --fast" if with_fast else "") + ")"
                 if refiner else "")
        print(f"{m.name}\t{m.backend}\t{m.version}{extra}")
    if not available_models():
        print(f"no models in {models_dir()}", file=sys.stderr)
    return 0


def _default_cache_dir() -> Path:
    """``$SYNTHBRAIN_CACHE`` or ``~/.cache/synthbrain`` (:func:`synth.data.prepare.default_cache_dir`)."""
    from .data.prepare import default_cache_dir

    return default_cache_dir()


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    DEFAULT_MODEL = "synthbrain-ldm-2mm"  # synth.pipeline.DEFAULT_MODEL, named here to keep torch unimported
    default_cache_dir = _default_cache_dir

    parser = _Parser(prog="synthbrain", description="Synthetic 3D T1 brain MRI. Every output is synthetic: not for clinical use.")
    parser.add_argument("--version", action="version", version=f"synthbrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="generate brains for an age, sex and diagnosis")
    _add_condition_args(g)
    g.add_argument("--seed", type=_seed, default=0, help="seed of the first brain (then seed+1, ...)")
    g.add_argument("--n", type=_n_brains, default=1, help="number of brains (files get _000, _001, ...)")
    g.add_argument("--out", required=True, help="output NIfTI path (.nii.gz or .nii); a .json sidecar is written beside it")
    g.add_argument("--model", default=None, help=f"model name or folder (default {DEFAULT_MODEL})")
    g.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--steps", type=_steps, default=None, help="sampling steps (default: the model's)")
    g.add_argument("--sampler", choices=("dpm++2m", "ddim"), default=None, help="sampler (default: the model's)")
    g.add_argument("--fast", action="store_true",
                   help="the model's fast sampling preset (shipped model: DPM-Solver++ 8 steps, about 2.8x faster, "
                        "without the refiner; add --refiner for the viewer's picture, about as realistic as the default "
                        "in about 60%% of its time; trade-offs in the model card)")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                   help="numeric path: auto = bf16 only where it is faster (CUDA with bf16, CPUs with AMX), else fp32 (default: "
                        "$SYNTHBRAIN_PRECISION or auto)")
    g.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads (default: $SYNTHBRAIN_THREADS or the idle cores)")
    g.add_argument("--guidance-scale", type=_guidance, default=None, help="classifier-free guidance (default: the model's)")
    g.add_argument("--refiner", action=argparse.BooleanOptionalAction, default=None,
                   help="apply (--refiner) or leave out (--no-refiner) the model's refiner, the small network after the "
                        "decoder that adds 2 mm texture (default: as the model ships it; the provenance says either way)")
    g.add_argument("--match-volumes", action="store_true",
                   help="warp each brain slightly so the segmenter measures the requested ventricle and hippocampus "
                        "volumes (an edit after sampling, recorded in the provenance; about 5-8 s per brain on 2 CPU cores)")
    g.add_argument("--segmenter", default="synthbrain-seg-2mm", help="segmenter that --match-volumes steers by")
    g.add_argument("--force", action="store_true", help="overwrite existing files")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=_cmd_generate)

    p = sub.add_parser("prepare", help="register and resample IXI onto the model grid (resumable)")
    p.add_argument("--ixi", default=None, help="IXI folder (default ../shared/data/ixi or $SYNTHBRAIN_IXI)")
    p.add_argument("--out", default=str(default_cache_dir() / "ixi-2mm"), help="output folder (outside the repo)")
    p.add_argument("--workers", type=_positive_int, default=2)
    p.add_argument("--limit", type=_positive_int, default=None, help="only the first N subjects")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_prepare)

    for verb, func, steps, bs, lr in (("train-autoencoder", _cmd_train_autoencoder, 2000, 1, 1e-3),
                                      ("train-diffusion", _cmd_train_diffusion, 2000, 8, 2e-4)):
        t = sub.add_parser(verb, help=f"train the {'first' if 'auto' in verb else 'second'} stage (resumes from RUN/last.pt); use torchrun for several GPUs")
        t.add_argument("--data", default=str(default_cache_dir() / "ixi-2mm"), help="prepared data folder")
        t.add_argument("--run-dir", "--run", dest="run", required=True, help="run folder for checkpoints and losses.csv")
        if "diffusion" in verb:
            t.add_argument("--ae-run", required=True, help="the autoencoder's run folder, or a model folder (its autoencoder)")
            t.add_argument("--init-from", default=None,
                           help="start from this model folder's (or diffusion run's) UNet, keeping its conditioning "
                                "(when RUN has no checkpoint)")
            t.add_argument("--augment", type=_nonnegative_int, default=0,
                           help="also train on this many augmented copies of each scan (a smooth warp of up to 1.5 voxels; no "
                                "rotation, scale, shift or gamma, which drew brains off the template; each mirrored), "
                                "encoded once and cached in RUN: against over-fitting few subjects")
            t.add_argument("--snap-every", type=_positive_int, default=None,
                           help="keep the EMA weights every N steps in RUN/snaps/ (choose checkpoints by measuring "
                                "samples; `synthbrain package --ldm-run RUN/snaps/step_N.pt` packages one)")
            t.add_argument("--gap-every", type=_positive_int, default=None,
                           help="every N steps, measure the averaged UNet's denoising error on the val subjects against "
                                "training subjects (fixed noise; about 40 s on 2 CPU cores) into RUN/gap.csv: "
                                "a held-out / training ratio well above 1 means it is learning its training brains by heart")
        else:
            t.add_argument("--init-from", default=None,
                           help="start from this run's EMA weights or a model folder's autoencoder (when RUN has no checkpoint)")
            t.add_argument("--decoder-only", action="store_true",
                           help="freeze the encoder and fine-tune the decoder (keeps the latent space of a trained diffusion model)")
            t.add_argument("--channels", type=_positive_int, nargs="+", default=None,
                           help="channels per level (default 16 32 64, or --init-from's); each level after the first halves the grid")
            t.add_argument("--latent-channels", type=_positive_int, default=None, help="latent channels (default 4)")
            t.add_argument("--res-blocks", type=_positive_int, default=None, help="residual blocks per level (default 1)")
            t.add_argument("--adv-weight", type=_nonnegative_float, default=0.0,
                           help="weight of the PatchDiscriminator's adversarial loss (0 = off; the MONAI tutorials use 0.01)")
            t.add_argument("--adv-start", type=_nonnegative_int, default=0, help="step at which the adversarial loss starts")
            t.add_argument("--latent-noise", type=_nonnegative_float, default=0.0,
                           help="with --decoder-only: Gaussian noise added to the latents, as a fraction of their std "
                                "(a decoder robust to imperfect sampled latents)")
            t.add_argument("--disc-crop", type=_positive_int, default=None,
                           help="show the discriminator a random cube of this edge (voxels, at least 24) instead of the whole volume (faster)")
            t.add_argument("--adv-latents", default=None,
                           help="with --decoder-only and --adv-weight: a bank of sampled latents (scripts/sample_latents.py) "
                                "the decoder also renders each step, judged only by the discriminator")
            t.add_argument("--snap-every", type=_positive_int, default=None,
                           help="keep the EMA weights every N steps in RUN/snaps/ (choose checkpoints by measuring samples)")
            t.add_argument("--kl-weight", type=_nonnegative_float, default=1e-6,
                           help="weight of the KL term (default 1e-6; larger makes a smoother latent, easier to model)")
        t.add_argument("--steps", type=_positive_int, default=steps)
        t.add_argument("--batch-size", type=_positive_int, default=bs)
        t.add_argument("--lr", type=_bounded(float, 1e-12, 10.0, "a learning rate within 1e-12-10"), default=lr)
        t.add_argument("--seed", type=_seed, default=0)
        t.add_argument("--max-minutes", type=_positive_float, default=None, help="stop (with a checkpoint) after this many minutes")
        t.add_argument("--no-bf16", action="store_true", help="train in float32")
        t.add_argument("--quiet", action="store_true")
        t.set_defaults(func=func)

    k = sub.add_parser("package", help="write a model folder (safetensors fp16 + config.json) from training runs")
    k.add_argument("--ae-run", required=True)
    k.add_argument("--ldm-run", required=True,
                   help="diffusion run folder (its last.pt), one of its snapshots (RUN/snaps/step_N.pt) or a model folder")
    k.add_argument("--out", required=True)
    k.add_argument("--name", default=DEFAULT_MODEL)
    k.add_argument("--version", default="0.1.0")
    k.add_argument("--sampling-steps", type=_steps, default=None,
                   help="default sampling steps (default: a packaged --ldm-run's, else 20)")
    k.add_argument("--guidance-scale", type=_guidance, default=None,
                   help="default guidance scale (default: a packaged --ldm-run's, else 1.0)")
    k.set_defaults(func=_cmd_package)

    r = sub.add_parser("train-refiner", help="train a small refiner after a model's decoder, latent diffusion or VQ-VAE "
                                             "(adds 2 mm texture; resumes from RUN/last.pt)")
    r.add_argument("--data", default=str(default_cache_dir() / "ixi-2mm"), help="prepared data folder")
    r.add_argument("--model", default=DEFAULT_MODEL, help=f"the model to refine, latent diffusion or VQ-VAE (default {DEFAULT_MODEL})")
    r.add_argument("--run-dir", "--run", dest="run", required=True, help="run folder (outside any repository: it caches "
                                                                          "volumes derived from the scans)")
    r.add_argument("--steps", type=_positive_int, default=20000)
    r.add_argument("--batch-size", type=_positive_int, default=4, help="cubes of each kind per step")
    r.add_argument("--crop", type=_positive_int, default=40, help="cube edge in voxels")
    r.add_argument("--lr", type=_bounded(float, 1e-12, 10.0, "a learning rate within 1e-12-10"), default=2e-4)
    r.add_argument("--adv-weight", type=_nonnegative_float, default=0.05, help="weight of the adversarial loss")
    r.add_argument("--grad-weight", type=_nonnegative_float, default=1.0, help="weight of the gradient L1 on reconstructions")
    r.add_argument("--samples", type=_nonnegative_int, default=64,
                   help="generated brains to train on as well (judged by the discriminator; 0: reconstructions only)")
    r.add_argument("--lowpass-weight", type=_nonnegative_float, default=1.0,
                   help="weight of the samples' coarse-content L1 (keeps their anatomy where it is)")
    r.add_argument("--speckle-weight", type=_nonnegative_float, default=20.0,
                   help="weight of the penalty on voxels standing out from their 3x3x3 median (isolated bright/dark dots)")
    r.add_argument("--speckle-margin", type=_nonnegative_float, default=0.2,
                   help="distance from the 3x3x3 median that is not penalised (real 2 mm scans: 0.16 %% of voxels beyond 0.2)")
    r.add_argument("--width", type=_positive_int, default=32, help="channels of the refiner's hidden layers")
    r.add_argument("--layers", type=_bounded(int, 2, 16, "a layer count within 2-16"), default=5, help="convolutions")
    r.add_argument("--context", type=_bounded(int, 0, 8, "a layer count within 0-8"), default=0,
                   help="convolutions of a context branch at 8 mm (3: a field of up to 59 voxels instead of 11; 0: none)")
    r.add_argument("--init-from", default=None, help="start from this refiner (run folder, snapshot .pt or model folder; "
                                                     "one without a context branch can start one)")
    r.add_argument("--init-disc-from", default=None,
                   help="start the discriminator from this train-refiner run folder (keeps a trained refiner from sliding "
                        "back to blur while a fresh discriminator learns)")
    r.add_argument("--snap-every", type=_positive_int, default=None, help="keep the averaged weights every N steps in RUN/snaps/")
    r.add_argument("--seed", type=_seed, default=0)
    r.add_argument("--max-minutes", type=_positive_float, default=None, help="stop (with a checkpoint) after this many minutes")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=_cmd_train_refiner)

    q = sub.add_parser("package-refiner", help="write a model folder: a model (latent diffusion or VQ-VAE) plus a trained refiner")
    q.add_argument("--run", required=True, help="train-refiner run folder or snapshot .pt")
    q.add_argument("--model", default=DEFAULT_MODEL, help="the model it refines (name or folder)")
    q.add_argument("--out", required=True, help="model folder to write (may be --model's own folder)")
    q.add_argument("--version", default=None, help="version of the packaged model (default: --model's)")
    q.add_argument("--off-by-default", action="store_true", help="ship the refiner switched off (generate --refiner opts in)")
    q.set_defaults(func=_cmd_package_refiner)

    m = sub.add_parser("models", help="list the shipped models")
    m.set_defaults(func=_cmd_models)

    try:
        from .anatomy.cli import add_parsers
    except ImportError:
        pass
    else:
        add_parsers(sub)
    from .vq.cli import add_parsers as add_vq_parsers  # compress, decompress, train-vqvae, ...; light at parse time

    add_vq_parsers(sub)
    from .cohort import add_parser as add_cohort_parser  # light at parse time, like the verbs above

    add_cohort_parser(sub)
    from .tune import add_parser as add_tune_parser

    add_tune_parser(sub)
    from .evaluate_cli import add_parser as add_evaluate_parser  # realism report; light at parse time

    add_evaluate_parser(sub)
    from .compare import add_parser as add_compare_parser  # reports side by side; matplotlib only with --plot

    add_compare_parser(sub)
    from .train.curves import add_parser as add_plot_run_parser  # training curves; matplotlib only when it runs

    add_plot_run_parser(sub)
    return parser


def _quiet_broken_pipe() -> int:
    """The reader of our stdout went away (``synthbrain segment ... | head``): stop quietly.

    stdout is pointed at /dev/null so that the interpreter's final flush does not print a second
    traceback; the exit status is the shell's for a process ended by SIGPIPE.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141


def main(argv: Sequence[str] | None = None) -> int:
    warnings.simplefilter("default")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, inside the handlers below
        return code
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except (UsageError, ValueError, TypeError, OSError) as exc:  # OSError: missing input, unwritable or full disk
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"synthbrain: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("synthbrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
