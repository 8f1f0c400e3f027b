"""Hyper-parameter tuning of the latent diffusion model: an Optuna study of short training runs.

Each trial trains the diffusion UNet (:func:`synth.train.diffusion.train_diffusion`, on the fixed
autoencoder of ``ae_run``) with one setting of the main hyper-parameters::

    lr             learning rate (log-uniform)
    width          channels of the UNet's first level (the others scale with it)
    latent_scale   multiplies the latent scale 1/std (LDMTrainConfig.latent_scale_factor)
    guidance       classifier-free guidance scale at sampling
    steps          DDIM sampling steps

in ``rungs`` stages; after each stage it generates brains for the validation subjects (their ages
and sexes) and scores them with ``score_fn`` (lower is better). The stage scores are reported to
Optuna as intermediate values, so a pruner (median by default) stops poor trials early. Each stage
resumes the run from its checkpoint with a longer cosine schedule (a warm restart of the rate).

The default score, :func:`tissue_contrast_score`, is the evaluation's tissue-contrast measure: the
Wasserstein distance of in-brain intensities, generated vs real (:func:`synth.metrics.intensity_distance`),
averaged over the validation subjects. Any ``score_fn(generator, data, split) -> float`` plugs in
(``--score module:function`` on the command line), e.g. a distribution-level realism measure.

The study lives in a database: SQLite in the study folder by default, any SQLAlchemy URL
(``postgresql://...``) to share one study between machines. Running the command again resumes it
(``load_if_exists``); a trial killed with its process is marked failed after a missed heartbeat and
retried once, from its run's checkpoint. The best setting is written to ``best.json`` and as a
model card section to ``tuning.md``.

Example::

    synthbrain tune --ae-run runs/ae --study-dir runs/tune --trials 30 --train-steps 600 --rungs 3
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .io import SYNTHETIC_NOTICE, atomic_path, write_json

__all__ = ["SearchSpace", "TuneConfig", "run_study", "tissue_contrast_score", "scale_unet", "add_parser"]

ScoreFn = Callable[[Any, Any, str], float]


@dataclass
class SearchSpace:
    """Ranges of the tuned hyper-parameters (a one-value range or choice fixes that parameter).

    Args:
        lr: ``(lo, hi)`` learning rate, sampled log-uniformly.
        widths: Choices of the UNet's first-level channels.
        latent_scale: ``(lo, hi)`` factor on the latent scale 1/std.
        guidance: ``(lo, hi)`` classifier-free guidance scale.
        steps: Choices of DDIM sampling steps.
    """

    lr: tuple[float, float] = (3e-5, 1e-3)
    widths: tuple[int, ...] = (32, 48, 64)
    latent_scale: tuple[float, float] = (0.5, 1.5)
    guidance: tuple[float, float] = (1.0, 4.0)
    steps: tuple[int, ...] = (10, 20, 30, 50)

    def __post_init__(self) -> None:
        self.lr = _range("lr", self.lr, 1e-8, 1.0)
        self.latent_scale = _range("latent_scale", self.latent_scale, 1e-3, 100.0)
        self.guidance = _range("guidance", self.guidance, 0.0, 20.0)
        self.widths = _choices("widths", self.widths, 1, 4096)
        self.steps = _choices("steps", self.steps, 1, 1000)

    def suggest(self, trial) -> dict[str, Any]:
        """One setting from an Optuna ``trial``."""
        return {
            "lr": trial.suggest_float("lr", *self.lr, log=True),
            "width": trial.suggest_categorical("width", list(self.widths)),
            "latent_scale": trial.suggest_float("latent_scale", *self.latent_scale),
            "guidance": trial.suggest_float("guidance", *self.guidance),
            "steps": trial.suggest_categorical("steps", list(self.steps)),
        }


def _range(name: str, value: Sequence[float], lo: float, hi: float) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a range (low, high) within {lo:g}-{hi:g}, got {value!r}") from None
    if not (math.isfinite(a) and math.isfinite(b) and lo <= a <= b <= hi):
        raise ValueError(f"`{name}` must be a range (low, high) within {lo:g}-{hi:g}, got {value!r}")
    return a, b


def _choices(name: str, value: Sequence[int], lo: int, hi: int) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be integers within {lo}-{hi}, got {value!r}") from None
    if not out or any(not lo <= v <= hi for v in out) or any(float(v) != int(v) for v in value):
        raise ValueError(f"`{name}` must be integers within {lo}-{hi}, got {value!r}")
    return tuple(dict.fromkeys(out))


def scale_unet(unet: dict[str, Any], width: int) -> dict[str, Any]:
    """``unet`` keywords with the first level's channels set to ``width`` and the others scaled
    alike (``[32, 64, 128]`` at width 64 -> ``[64, 128, 256]``); attention head sizes stay.

    Raises:
        ValueError: a level's channels would not divide by the GroupNorm groups or the head size.
    """
    base = list(unet["channels"])
    channels = [int(round(c * width / base[0])) for c in base]
    groups = int(unet.get("norm_num_groups", 32))
    heads = unet.get("num_head_channels", 8)
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(channels)
    attention = list(unet.get("attention_levels", [False] * len(channels)))
    for c, h, att in zip(channels, heads, attention):
        if c % groups or (att and h and c % h):
            raise ValueError(f"width {width} gives UNet channels {channels}, which must divide by the {groups} "
                             f"GroupNorm groups and the attention head size {h}; choose other --widths")
    return {**unet, "channels": channels}


@dataclass
class TuneConfig:
    """A tuning study.

    Args:
        data_dir: Prepared data (``synthbrain prepare``): trains on ``train``, scores on ``val``.
        ae_run: The autoencoder's run folder (fixed for the whole study).
        study_dir: Trial runs, the latent cache, ``study.db`` (default storage), ``best.json``.
        trials: Finished trials (complete or pruned) the study should reach; a resumed study runs
            only what is missing.
        train_steps: Diffusion training steps of a trial that is not pruned.
        rungs: Stages of a trial; its score is reported after each (for pruning).
        batch_size: Training batch size.
        storage: SQLAlchemy URL of the study database (default SQLite in ``study_dir``).
        study_name: Name of the study in the database.
        seed: Seed of the sampler (TPE), the training runs and the scored brains.
        val_subjects: Score on at most this many validation subjects (``None``: all).
        bf16: bfloat16 autocast for training and sampling (on CPUs without native bf16 it is slow).
        unet: UNet keywords whose channels :func:`scale_unet` scales (default: the trainer's).
        space: The search space.
        pruner_startup: Trials that finish before the median pruner starts pruning.
    """

    data_dir: str
    ae_run: str
    study_dir: str
    trials: int = 20
    train_steps: int = 600
    rungs: int = 3
    batch_size: int = 8
    storage: str | None = None
    study_name: str = "synthbrain-ldm"
    seed: int = 0
    val_subjects: int | None = None
    bf16: bool = True
    unet: dict[str, Any] | None = None
    space: SearchSpace = field(default_factory=SearchSpace)
    pruner_startup: int = 3

    def __post_init__(self) -> None:
        for name, lo in (("trials", 1), ("train_steps", 1), ("rungs", 1), ("batch_size", 1), ("pruner_startup", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"`{name}` must be an integer >= {lo}, got {v!r}")
        if self.rungs > self.train_steps:
            raise ValueError(f"`rungs` ({self.rungs}) cannot exceed `train_steps` ({self.train_steps})")
        if self.val_subjects is not None and (not isinstance(self.val_subjects, int) or self.val_subjects < 1):
            raise ValueError(f"`val_subjects` must be a positive integer, got {self.val_subjects!r}")
        if not (Path(self.data_dir) / "subjects.csv").is_file():
            raise FileNotFoundError(f"no prepared data in {self.data_dir}: run `synthbrain prepare` first")
        if not (Path(self.ae_run) / "last.pt").is_file():
            raise FileNotFoundError(f"no autoencoder run in {self.ae_run}: expected {Path(self.ae_run) / 'last.pt'}")
        if self.unet is not None:
            for w in self.space.widths:
                scale_unet(self.unet, w)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.study_dir).resolve() / 'study.db'}"

    def rung_steps(self) -> list[int]:
        return [round(self.train_steps * (r + 1) / self.rungs) for r in range(self.rungs)]


# -- scoring ------------------------------------------------------------------------------------
def tissue_contrast_score(generator, data, split: str = "val", *, limit: int | None = None, seed0: int = 0) -> float:
    """Mean tissue-contrast distance of generated brains to the real subjects of ``split``.

    One brain per subject, for its age (clipped to 20-82) and sex, with seed ``seed0 + i``;
    :func:`synth.metrics.intensity_distance` between it (voxels > 0.05) and the real scan (its
    label mask). Lower is closer. It measures the grey/white/CSF histogram, not anatomy or
    texture; a realism measure of the evaluation can replace it (``score_fn``).
    """
    from .condition import Condition
    from .metrics import intensity_distance

    rows = data.subset(split, labelled=True)[:limit]
    if not rows:
        raise ValueError(f"no labelled {split} subjects in {data.root} to score on")
    dists = []
    for i, r in enumerate(rows):
        brain = generator.generate(Condition(age=min(max(r["age"], 20.0), 82.0), sex=r["sex"]), seed=seed0 + i)
        mask = brain.image > 0.05
        if not mask.any():  # an empty brain is as far as it gets
            dists.append(1.0)
            continue
        dists.append(intensity_distance(brain.image, mask, data.t1(r), data.labels(r) > 0))
    return float(np.mean(dists))


def resolve_score(name: str) -> ScoreFn:
    """``tissue-contrast`` or ``module:function`` -> a score function."""
    if name in ("tissue-contrast", "tissue_contrast"):
        return tissue_contrast_score
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"--score must be tissue-contrast or module:function, got {name!r}")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--score {name!r} cannot be imported: {exc}") from None
    if not callable(fn):
        raise ValueError(f"--score {name!r} is not a function")
    return fn


# -- one trial ----------------------------------------------------------------------------------
def _grid_of(data) -> Any:
    from .grid import Grid
    from .io import load_nifti

    row = data.subset("train")[0]
    image, affine = load_nifti(Path(data.root) / "volumes" / f"{row['mrid']}_t1.nii.gz")
    return Grid(tuple(int(s) for s in image.shape), float(abs(affine[0, 0])), tuple(float(v) for v in affine[:3, 3]))


def generator_from_state(state: dict, autoencoder, grid, params: dict[str, Any], bf16: bool, device, name: str):
    """A :class:`synth.BrainGenerator` of a training run's EMA weights with a trial's sampling setting."""
    from .models.config import ModelConfig
    from .models.networks import build_unet
    from .pipeline import BrainGenerator

    mc = state["model_config"]
    unet = build_unet(mc["unet"])
    unet.load_state_dict(state["ema_state_dict"])
    config = ModelConfig(
        name=name, version="0.0.0-trial", autoencoder=mc["autoencoder"], unet=mc["unet"], scheduler=mc["scheduler"],
        covariates=mc["covariates"], covariate_ranges=mc["covariate_ranges"],
        sampling={"steps": int(params["steps"]), "guidance_scale": float(params["guidance"]), "bf16": bool(bf16)},
        latent_scale=mc["latent_scale"], grid={"shape": list(grid.shape), "spacing": grid.spacing, "origin": list(grid.origin)},
        normative=mc["normative"], reference=f"tuning trial ({name}); {SYNTHETIC_NOTICE}",
    )
    return BrainGenerator(config, autoencoder, unet, device=device, source=name)


def _latent_cache(cfg: TuneConfig, autoencoder, device) -> Path:
    """Encode the training volumes once for the whole study (each trial starts from a copy)."""
    from .data.prepare import PreparedData
    from .train.diffusion import encode_dataset

    path = Path(cfg.study_dir) / "latents.npz"
    if not path.is_file():
        data = PreparedData.load(cfg.data_dir)
        rows = data.subset("train", labelled=True)
        volumes = np.stack([data.t1(r)[None] for r in rows]).astype(np.float32)
        latents = encode_dataset(autoencoder, volumes, device, cfg.bf16)
        with atomic_path(path) as tmp:
            np.savez(tmp, latents=latents)
    return path


def _objective(cfg: TuneConfig, score_fn: ScoreFn, data, grid, autoencoder, device, cache: Path, log) -> Callable:
    import optuna

    from .train.diffusion import DEFAULT_UNET, LDMTrainConfig, train_diffusion

    template = cfg.unet or DEFAULT_UNET

    def objective(trial) -> float:
        params = cfg.space.suggest(trial)
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        number = trial.number if retried is None else retried  # a retried trial resumes its run
        run = Path(cfg.study_dir) / f"trial-{number:04d}"
        run.mkdir(parents=True, exist_ok=True)
        if not (run / "latents.npz").is_file():
            shutil.copyfile(cache, run / "latents.npz")
        trial.set_user_attr("run_dir", run.name)
        score = float("nan")
        for steps in cfg.rung_steps():
            train_cfg = LDMTrainConfig(
                data_dir=cfg.data_dir, ae_run=cfg.ae_run, run_dir=str(run), steps=steps, batch_size=cfg.batch_size,
                lr=params["lr"], lr_min=params["lr"] / 10, bf16=cfg.bf16, seed=cfg.seed, ckpt_every=steps,
                latent_scale_factor=params["latent_scale"], unet=scale_unet(template, params["width"]),
            )
            state = train_diffusion(train_cfg, progress=False)
            gen = generator_from_state(state, autoencoder, grid, params, cfg.bf16, device, f"trial-{number:04d}")
            score = float(score_fn(gen, data, "val"))
            if not math.isfinite(score):
                raise optuna.TrialPruned(f"score {score} at step {steps}")
            trial.report(score, steps)
            log(f"trial {trial.number} step {steps}: score {score:.5f} ({_fmt(params)})")
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {steps} (score {score:.5f})")
        return score

    return objective


def _fmt(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


# -- the study ----------------------------------------------------------------------------------
def _storage(cfg: TuneConfig):
    import optuna
    import sqlalchemy

    try:
        sqlalchemy.engine.make_url(cfg.storage_url)
    except sqlalchemy.exc.ArgumentError:
        raise ValueError(f"--storage must be an SQLAlchemy URL (sqlite:///study.db, postgresql://...), got {cfg.storage!r}") from None
    Path(cfg.study_dir).mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():  # heartbeats and their retry are marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                cfg.storage_url, heartbeat_interval=60, grace_period=180,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
    except (ImportError, ModuleNotFoundError) as exc:  # e.g. no psycopg2 for postgresql://
        raise ValueError(f"the storage {_redact(cfg.storage_url)} needs a database driver: {exc}") from None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise ValueError(f"cannot open the study storage {_redact(cfg.storage_url)}: {str(exc).splitlines()[0]}") from None


def _redact(url: str) -> str:
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


def run_study(cfg: TuneConfig, *, score_fn: ScoreFn | None = None, pruner=None, device: str = "auto",
              log: Callable[[str], None] = print):
    """Run (or resume) the study until it has ``cfg.trials`` finished trials; returns the Optuna study.

    Args:
        cfg: The study.
        score_fn: ``score_fn(generator, data, split) -> float``, lower is better (default
            :func:`tissue_contrast_score` over ``cfg.val_subjects``).
        pruner: An Optuna pruner (default ``MedianPruner(n_startup_trials=cfg.pruner_startup)``).
        device: Where trials train and sample.
        log: Where progress lines go.
    """
    import optuna

    from .data.prepare import PreparedData
    from .pipeline import pick_device
    from .train.diffusion import load_autoencoder_run

    data = PreparedData.load(cfg.data_dir)
    if not data.subset("val", labelled=True):
        raise ValueError(f"no labelled validation subjects in {cfg.data_dir} to score trials on")
    if not data.subset("train", labelled=True):
        raise ValueError(f"no labelled training subjects in {cfg.data_dir} to train trials on")
    if score_fn is None:
        def score_fn(gen, data, split):
            return tissue_contrast_score(gen, data, split, limit=cfg.val_subjects, seed0=cfg.seed)
    storage = _storage(cfg)
    dev = pick_device(device)
    autoencoder, _ = load_autoencoder_run(cfg.ae_run, dev)
    cache = _latent_cache(cfg, autoencoder, dev)
    study = optuna.create_study(
        study_name=cfg.study_name, storage=storage, direction="minimize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=cfg.seed),
        pruner=pruner if pruner is not None else optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup),
    )
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = cfg.trials - len(study.get_trials(deepcopy=False, states=finished))
    if remaining > 0:
        objective = _objective(cfg, score_fn, data, _grid_of(data), autoencoder, dev, cache, log)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study.optimize(objective, n_trials=remaining, callbacks=[optuna.study.MaxTrialsCallback(cfg.trials, states=finished)],
                       catch=())
    write_summary(study, cfg)
    return study


def write_summary(study, cfg: TuneConfig) -> dict[str, Any] | None:
    """``best.json`` and ``tuning.md`` (a model card section) in the study folder; ``None`` when
    no trial completed."""
    import optuna

    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == states.COMPLETE]
    if not complete:
        return None
    best = min(complete, key=lambda t: t.value)
    summary = {
        "study_name": study.study_name,
        "storage": _redact(cfg.storage_url),
        "direction": "minimize",
        "score": "tissue-contrast distance, generated vs real validation subjects (lower is closer)",
        "trials": {"complete": len(complete), "pruned": sum(t.state == states.PRUNED for t in trials),
                   "failed": sum(t.state == states.FAIL for t in trials)},
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": best.params,
        "best_run_dir": best.user_attrs.get("run_dir"),
        "intermediate": {str(k): v for k, v in sorted(best.intermediate_values.items())},
        "train_steps": cfg.train_steps,
        "rungs": cfg.rungs,
        "search_space": asdict(cfg.space),
        "data": Path(cfg.data_dir).name,
        "ae_run": Path(cfg.ae_run).name,
        "notice": SYNTHETIC_NOTICE,
    }
    write_json(Path(cfg.study_dir) / "best.json", summary)
    with atomic_path(Path(cfg.study_dir) / "tuning.md") as tmp:
        tmp.write_text(card_section(summary))
    return summary


def card_section(summary: dict[str, Any]) -> str:
    """The chosen setting as a model card section (Markdown)."""
    p, space, n = summary["best_params"], summary["search_space"], summary["trials"]
    rows = [
        ("learning rate", f"{p['lr']:.3g}", f"{space['lr'][0]:g}-{space['lr'][1]:g} (log)"),
        ("UNet width (first level)", str(p["width"]), ", ".join(map(str, space["widths"]))),
        ("latent scale factor (x 1/std)", f"{p['latent_scale']:.3g}", f"{space['latent_scale'][0]:g}-{space['latent_scale'][1]:g}"),
        ("guidance scale", f"{p['guidance']:.3g}", f"{space['guidance'][0]:g}-{space['guidance'][1]:g}"),
        ("DDIM sampling steps", str(p["steps"]), ", ".join(map(str, space["steps"]))),
    ]
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    return (
        "## Hyper-parameter tuning\n\n"
        f"Optuna study `{summary['study_name']}` (TPE sampler, median pruner): {n['complete']} trials complete, "
        f"{n['pruned']} pruned, {n['failed']} failed. Each trial trained the diffusion UNet for "
        f"{summary['train_steps']} steps in {summary['rungs']} stages on the autoencoder `{summary['ae_run']}`, "
        f"scored after each stage by the {summary['score']}. Best: trial {summary['best_trial']} "
        f"(run `{summary['best_run_dir']}`), score {summary['best_value']:.5f}.\n\n"
        "| hyper-parameter | chosen | searched |\n| --- | --- | --- |\n"
        f"{table}\n\n"
        "A short run ranks settings; the shipped model trains the chosen one for longer. "
        f"Models made this way produce synthetic images only: {SYNTHETIC_NOTICE}.\n"
    )


# -- command line -------------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    """Add ``synthbrain tune`` to the main parser's ``subparsers`` (argument checks stay light)."""
    t = subparsers.add_parser(
        "tune",
        help="Optuna study of the diffusion model's hyper-parameters (short runs, pruned, resumable)",
        description="Tune learning rate, UNet width, latent scale, guidance and sampling steps: each trial is a "
        "short training run scored on the validation subjects. Run again to resume the study.",
    )
    t.add_argument("--data", default=None, help="prepared data folder (default ~/.cache/synthbrain/ixi-2mm)")
    t.add_argument("--ae-run", required=True, help="the autoencoder's run folder (fixed for the study)")
    t.add_argument("--study-dir", required=True, help="folder for trial runs, the latent cache, study.db and best.json")
    t.add_argument("--storage", default=None, help="SQLAlchemy URL of the study database (default sqlite:///STUDY_DIR/study.db; "
                                                   "postgresql://... to share a study between machines)")
    t.add_argument("--study-name", default="synthbrain-ldm")
    t.add_argument("--trials", type=int, default=20, help="finished trials the study should reach (default 20)")
    t.add_argument("--train-steps", type=int, default=600, help="training steps of a full trial (default 600)")
    t.add_argument("--rungs", type=int, default=3, help="stages of a trial, each scored for pruning (default 3)")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--val-subjects", type=int, default=None, help="score on at most N validation subjects (default all)")
    t.add_argument("--lr", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"), help="learning rate range (log)")
    t.add_argument("--widths", type=int, nargs="+", default=None, help="UNet first-level widths to try (default 32 48 64)")
    t.add_argument("--latent-scale", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"))
    t.add_argument("--guidance", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"))
    t.add_argument("--sampling-steps", type=int, nargs="+", default=None, help="DDIM steps to try (default 10 20 30 50)")
    t.add_argument("--unet", default=None, help="JSON file of UNet keywords to scale (default: the trainer's UNet)")
    t.add_argument("--score", default="tissue-contrast", help="tissue-contrast, or module:function(generator, data, split)")
    t.add_argument("--pruner-startup", type=int, default=3, help="trials finished before pruning starts (default 3)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    t.add_argument("--no-bf16", action="store_true", help="train and sample in float32 (CPUs without native bf16)")
    t.set_defaults(func=run_tune)


def config_from_args(args) -> TuneConfig:
    space_kw = {k: v for k, v in (("lr", args.lr), ("widths", args.widths), ("latent_scale", args.latent_scale),
                                  ("guidance", args.guidance), ("steps", args.sampling_steps)) if v is not None}
    unet = None
    if args.unet:
        if not Path(args.unet).is_file():
            raise FileNotFoundError(f"no such UNet JSON file: {args.unet}")
        try:
            unet = json.loads(Path(args.unet).read_text())
        except ValueError as exc:
            raise ValueError(f"--unet {args.unet} is not JSON: {exc}") from None
        if not isinstance(unet, dict) or not isinstance(unet.get("channels"), list):
            raise ValueError(f"--unet {args.unet} must hold DiffusionModelUNet keywords with `channels`")
    if args.data is None:
        from .data.prepare import default_cache_dir

        args.data = str(default_cache_dir() / "ixi-2mm")
    return TuneConfig(
        data_dir=args.data, ae_run=args.ae_run, study_dir=args.study_dir, trials=args.trials, train_steps=args.train_steps,
        rungs=args.rungs, batch_size=args.batch_size, storage=args.storage, study_name=args.study_name, seed=args.seed,
        val_subjects=args.val_subjects, bf16=not args.no_bf16, unet=unet, space=SearchSpace(**space_kw),
        pruner_startup=args.pruner_startup,
    )


def run_tune(args) -> int:
    """``synthbrain tune``: every check runs before the autoencoder loads or the study opens."""
    cfg = config_from_args(args)
    score_fn = None if args.score in ("tissue-contrast", "tissue_contrast") else resolve_score(args.score)
    study = run_study(cfg, score_fn=score_fn, device=args.device)
    summary = write_summary(study, cfg)
    if summary is None:
        print(f"study {cfg.study_name}: no trial completed (all pruned or failed); see {_redact(cfg.storage_url)}")
        return 0
    print(f"study {cfg.study_name}: best trial {summary['best_trial']} score {summary['best_value']:.5f} "
          f"({_fmt(summary['best_params'])}); wrote {Path(cfg.study_dir) / 'best.json'} and tuning.md")
    run = Path(cfg.study_dir) / str(summary["best_run_dir"])
    print(f"package it: synthbrain package --ae-run {cfg.ae_run} --ldm-run {run} --sampling-steps "
          f"{summary['best_params']['steps']} --guidance-scale {summary['best_params']['guidance']:.3g} --out MODEL_DIR")
    return 0
