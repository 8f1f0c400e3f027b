"""Train the second stage: a conditional ``DiffusionModelUNet`` on autoencoder latents.

DDPM training (Ho et al. 2020): ``x_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps`` and the UNet predicts
``eps`` (MSE). Conditioning as in the reference 1 mm model (Pinaya et al. 2022): the covariate
vector is both the cross-attention context and constant input channels. With probability
``p_uncond`` the vector is replaced by zeros (its presence flag too), which trains the
unconditional model that classifier-free guidance needs (Ho & Salimans 2022).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..condition import VOLUME_KEYS
from ..data.prepare import PreparedData
from ..models.networks import build_autoencoder, build_unet, count_parameters, latent_mean
from ..normative import NormativeModel
from .common import (EMA, Checkpointer, LossLog, StepClock, autocast, is_model_folder, model_folder_weights,
                     resume_state, rng_state, setup_distributed, training_bf16)

__all__ = ["LDMTrainConfig", "train_diffusion", "augmented_cache_name", "DEFAULT_UNET", "DEFAULT_COVARIATES", "encode_dataset", "covariate_matrix"]

DEFAULT_COVARIATES = ["age", "sex", "brain", "lateral_ventricles", "hippocampus"]
DEFAULT_UNET: dict[str, Any] = {
    "spatial_dims": 3,
    "out_channels": 4,
    "channels": [32, 64, 128],
    "attention_levels": [False, True, True],
    "num_res_blocks": 1,
    "num_head_channels": [0, 32, 32],
    "norm_num_groups": 16,
    "with_conditioning": True,
    "transformer_num_layers": 1,
}
DEFAULT_SCHEDULER = {
    "num_train_timesteps": 1000,
    "schedule": "scaled_linear_beta",
    "beta_start": 0.0015,
    "beta_end": 0.0205,
    "prediction_type": "epsilon",
}


@dataclass
class LDMTrainConfig:
    data_dir: str
    ae_run: str
    run_dir: str
    steps: int = 2000
    batch_size: int = 8
    lr: float = 2e-4
    lr_min: float = 2e-5
    p_uncond: float = 0.15
    bf16: bool = True
    seed: int = 0
    ckpt_every: int = 100
    max_minutes: float | None = None
    # keep the EMA weights every N steps in snaps/step_NNNNNN.pt (choose checkpoints by measuring samples)
    snap_every: int | None = None
    # every N steps, the EMA UNet's denoising error on held-out (val) subjects against training subjects, with
    # fixed noise, into gap.csv: the over-fitting alarm (scripts/denoising_gap.py's measure, on fewer subjects,
    # timesteps and draws; about 40 s on 2 CPU cores). None: off
    gap_every: int | None = None
    # Multiplies the latent scale 1/std (Rombach et al. 2022's scale factor): 1 trains on unit-variance
    # latents; other values change the signal-to-noise ratio of every noise level (a tuning knob).
    latent_scale_factor: float = 1.0
    # Augmented copies of each training scan (synth.train.augment: a small similarity transform, a smooth
    # warp of up to 1.5 voxels, a gamma change), each also mirrored, encoded once and cached in the run
    # folder; 0 trains on the scans and their mirrors only. Against the UNet learning its few subjects'
    # latents by heart (scripts/denoising_gap.py measures that).
    augment: int = 0
    # processes that make the augmented copies (synth.train.augment.augment_copies; the same copies for any number)
    augment_workers: int = 1
    # AugmentConfig fields that differ from its defaults (which warp only), e.g. {"max_log_gamma": 0.1} for a gamma change
    augment_options: dict[str, float] = field(default_factory=dict)
    # A packaged model folder (or a diffusion run folder) whose UNet (EMA weights) starts a fresh run; its
    # UNet layout, covariates, their ranges and its latent scale are kept, so the model trains on as it was.
    init_from: str | None = None
    covariates: list[str] = field(default_factory=lambda: list(DEFAULT_COVARIATES))
    unet: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_UNET))
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SCHEDULER))

    def __post_init__(self):
        for name in ("snap_every", "gap_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}")


def covariate_matrix(rows: list[dict], covariates: list[str], ranges: dict[str, list[float]]) -> np.ndarray:
    """(N, K + 1) conditioning vectors: covariates scaled to [0, 1] by ``ranges``, then a 1 flag."""
    out = []
    for r in rows:
        vals = []
        for name in covariates:
            if name == "age":
                v = r["age"]
            elif name == "sex":
                v = 1.0 if r["sex"] == "M" else 0.0
            elif name in VOLUME_KEYS:
                v = r[name] / r["icv"]
            elif name.startswith("diagnosis_"):  # one-hot, for cohorts whose rows carry a diagnosis
                v = 1.0 if r.get("diagnosis", "CN") == name.split("_", 1)[1] else 0.0
            else:
                raise ValueError(f"unknown covariate {name!r}; expected age, sex, diagnosis_<CN|MCI|AD> or one of {VOLUME_KEYS}")
            lo, hi = ranges.get(name, (0.0, 1.0))
            vals.append((v - lo) / (hi - lo))
        out.append(vals + [1.0])
    return np.asarray(out, np.float32)


def covariate_ranges(rows: list[dict], covariates: list[str]) -> dict[str, list[float]]:
    """Ranges mapping each covariate of the training rows to about [0, 1]."""
    ranges: dict[str, list[float]] = {}
    for name in covariates:
        if name == "age":
            ranges[name] = [20.0, 82.0]
        elif name == "sex" or name.startswith("diagnosis_"):
            ranges[name] = [0.0, 1.0]
        else:
            v = np.array([r[name] / r["icv"] for r in rows])
            lo, hi = float(v.min()), float(v.max())
            pad = max(0.05 * (hi - lo), 1e-4 * max(abs(hi), 1e-6))  # never a zero-width range
            ranges[name] = [lo - pad, hi + pad]
    return ranges


@torch.no_grad()
def encode_dataset(ae: torch.nn.Module, volumes: np.ndarray, device: torch.device, bf16: bool,
                   mirrors: bool = True) -> np.ndarray:
    """Latent means of (N, 1, X, Y, Z) volumes and of their left-right mirrors: (2N, C, x, y, z)
    (``mirrors=False``: the volumes' alone, (N, C, x, y, z))."""
    out = []
    for flip in (False, True) if mirrors else (False,):
        for v in volumes:
            x = torch.from_numpy(v[None]).to(device)
            if flip:
                x = torch.flip(x, dims=[2])
            with autocast(device, bf16):
                mu = latent_mean(ae, x)
            out.append(mu.float().cpu().numpy()[0])
    return np.stack(out)


def load_autoencoder_run(ae_run: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The (EMA) autoencoder of a training run folder (``last.pt``) or of a packaged model folder."""
    if is_model_folder(ae_run):
        weights, config = model_folder_weights(ae_run, "autoencoder")
        ae_kwargs = config.autoencoder
    else:
        state = torch.load(Path(ae_run) / "last.pt", map_location="cpu", weights_only=False)
        ae_kwargs, weights = state["config"]["autoencoder"], state["ema_state_dict"]
    ae = build_autoencoder(ae_kwargs)
    ae.load_state_dict(weights)
    return ae.to(device).eval().requires_grad_(False), ae_kwargs


def _diffusion_init(init_from: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """UNet weights and the settings a continued run must keep, from a model folder or a diffusion run."""
    if is_model_folder(init_from):
        weights, config = model_folder_weights(init_from, "unet")
        keep = {"unet": config.unet, "covariates": config.covariates, "covariate_ranges": config.covariate_ranges,
                "latent_scale": config.latent_scale, "from": f"{config.name} {config.version}",
                "sampling": dict(config.sampling)}  # its sampler, steps, guidance and presets, for `package`
        return weights, keep
    path = Path(init_from) / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no model folder or diffusion run at {init_from}: expected config.json with "
                                "unet.safetensors, or last.pt")
    state = torch.load(path, map_location="cpu", weights_only=False)
    mc = state["model_config"]
    keep = {k: mc[k] for k in ("unet", "covariates", "covariate_ranges", "latent_scale")}
    if mc.get("sampling"):
        keep["sampling"] = mc["sampling"]
    return {k: v.float() for k, v in state["ema_state_dict"].items()}, {**keep, "from": f"{init_from} step {state['step']}"}


def train_diffusion(cfg: LDMTrainConfig, *, progress: bool = True, rows: list[dict] | None = None,
                    volumes: np.ndarray | None = None, augmented: np.ndarray | None = None,
                    heldout_rows: list[dict] | None = None, heldout_volumes: np.ndarray | None = None) -> dict:
    """Train (or resume) the latent diffusion UNet; returns its final state (with model config).

    Args:
        cfg: Training configuration. ``ae_run`` is the autoencoder's run folder (its EMA weights
            encode the data); ``run_dir`` holds ``last.pt``, ``losses.csv`` and the latent cache.
        rows, volumes: Optional subject rows and (N, 1, X, Y, Z) volumes instead of ``data_dir``.
        augmented: Optional ``cfg.augment`` augmented copies of the volumes made beforehand, as
            :func:`synth.train.augment.augment_copies` makes them for ``cfg.seed`` and
            ``cfg.augment_options``, stacked:
            (augment N, 1, X, Y, Z). Used when the run folder has not cached their latents yet.
        heldout_rows, heldout_volumes: With ``cfg.gap_every`` and ``rows``, the held-out subjects the gap is
            measured on (by default the prepared data's val split).
    """
    from monai.networks.schedulers import DDPMScheduler
    from tqdm.auto import tqdm

    from .augment import AugmentConfig

    AugmentConfig(**cfg.augment_options)  # an unknown field fails here (TypeError), not after minutes of encoding
    ctx = setup_distributed()
    torch.manual_seed(cfg.seed + ctx.rank)
    cfg.bf16 = training_bf16(cfg.bf16, ctx.device)  # never emulated bf16
    rng = np.random.default_rng(cfg.seed + ctx.rank)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(run)
    state = ckpt.resume()
    if state is not None:  # before minutes of encoding: a resumed run must train on the copies it started on
        _check_same_augmentation(state, cfg, run)
    ae, ae_kwargs = load_autoencoder_run(cfg.ae_run, ctx.device)

    data = None
    if rows is None:
        data = PreparedData.load(cfg.data_dir)
        rows = data.subset("train", labelled=True)
        volumes = None
        if cfg.gap_every:
            heldout_rows = data.subset("val", labelled=True)
            heldout_volumes = np.stack([data.t1(r)[None] for r in heldout_rows]).astype(np.float32) if heldout_rows else None
    if cfg.gap_every and (not heldout_rows or heldout_volumes is None or len(heldout_volumes) != len(heldout_rows)):
        raise ValueError("`gap_every` needs held-out subjects: the prepared data's val split, or heldout_rows with "
                         "one volume each in heldout_volumes")
    cache = run / "latents.npz"
    if cache.is_file():
        latents = np.load(cache)["latents"]
    else:
        if volumes is None:
            volumes = np.stack([data.t1(r)[None] for r in rows]).astype(np.float32)
        latents = encode_dataset(ae, volumes, ctx.device, cfg.bf16)
        if ctx.is_main:
            from ..io import atomic_path

            with atomic_path(cache) as tmp:
                np.savez(tmp, latents=latents)
    aug = _augmented_latents(cfg, run, ae, rows, volumes, augmented, data, ctx, progress) if cfg.augment else None
    heldout_latents = encode_dataset(ae, heldout_volumes, ctx.device, cfg.bf16, mirrors=False) if cfg.gap_every else None
    del ae
    init_weights, init = _diffusion_init(cfg.init_from) if cfg.init_from else (None, {})
    if init:
        cfg.covariates = list(init["covariates"])
    latent_scale = float(init["latent_scale"]) if init else float(cfg.latent_scale_factor / latents.std())
    ranges = init["covariate_ranges"] if init else covariate_ranges(rows, cfg.covariates)
    cond = covariate_matrix(rows, cfg.covariates, ranges)
    cond = np.concatenate([cond, cond])  # mirrored copies share their subject's condition
    if aug is not None:  # after the latent scale: augmentation must not change it
        latents = np.concatenate([latents, aug])
        cond = np.concatenate([cond] * (1 + cfg.augment))
    n_cond = cond.shape[1]
    latent_ch = latents.shape[1]
    unet_kwargs = (dict(init["unet"]) if init else
                   dict(cfg.unet, in_channels=latent_ch + n_cond, out_channels=latent_ch, cross_attention_dim=n_cond))
    if unet_kwargs["in_channels"] != latent_ch + n_cond:
        raise ValueError(f"--init-from {cfg.init_from}: its UNet takes {unet_kwargs['in_channels']} input channels, but "
                         f"the autoencoder's {latent_ch} latent channels + {n_cond} conditioning values make {latent_ch + n_cond}")
    unet = build_unet(unet_kwargs).to(ctx.device)
    if init_weights is not None:
        unet.load_state_dict(init_weights)
    ema = EMA(unet, decay=0.999)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = DDPMScheduler(**{k: v for k, v in cfg.scheduler.items()})
    alphas = sched.alphas_cumprod.to(ctx.device)
    start = 0
    if state is not None:
        start, rng = resume_state(state, {"state_dict": unet, "ema_state_dict": ema.model, "optimizer": opt}, rng,
                                  cfg.seed + ctx.rank, ctx.world_size)
    net = torch.nn.parallel.DistributedDataParallel(unet) if ctx.world_size > 1 else unet
    model_config = {
        "autoencoder": ae_kwargs,
        "unet": unet_kwargs,
        "scheduler": cfg.scheduler,
        "covariates": cfg.covariates,
        "covariate_ranges": ranges,
        "latent_scale": latent_scale,
        "normative": NormativeModel.fit(rows).to_dict(),
        "init_from": init.get("from"),
        **({"sampling": init["sampling"]} if init.get("sampling") else {}),
    }
    if cfg.augment:  # the settings as resolved: the defaults changed once (2026-12-01), the record should not
        model_config["augmentation"] = _resolved_augmentation(cfg)
    log = LossLog(run / "losses.csv", ["loss", "lr"], resume_step=start) if ctx.is_main else None
    z_all = torch.from_numpy(latents * latent_scale)
    c_all = torch.from_numpy(cond)
    probe = None
    if cfg.gap_every and ctx.is_main:
        probe = GapProbe(z_all[:len(rows)], c_all[:len(rows)], torch.from_numpy(heldout_latents * latent_scale),
                         torch.from_numpy(covariate_matrix(heldout_rows, cfg.covariates, ranges)), sched.alphas_cumprod,
                         LossLog(run / "gap.csv", GapProbe.fields(), resume_step=start))
    clock = StepClock(cfg.steps, cfg.lr, cfg.lr_min, cfg.ckpt_every, cfg.max_minutes)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="diffusion", disable=not (progress and ctx.is_main))
    step = start
    for step in bar:
        lr = clock.set_lr(opt, step)
        idx = torch.from_numpy(rng.integers(0, len(z_all), size=cfg.batch_size))
        z0 = z_all[idx].to(ctx.device)
        c = c_all[idx].clone()
        c[torch.from_numpy(rng.random(cfg.batch_size) < cfg.p_uncond)] = 0.0
        c = c.to(ctx.device)
        t = torch.from_numpy(rng.integers(0, sched.num_train_timesteps, size=cfg.batch_size)).to(ctx.device)
        noise = torch.from_numpy(rng.standard_normal(z0.shape).astype(np.float32)).to(ctx.device)
        a = alphas[t].view(-1, 1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        x = unet_input(zt, c)
        with autocast(ctx.device, cfg.bf16):
            pred = net(x, timesteps=t, context=c[:, None, :])
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.update(unet, step)
        if ctx.is_main:
            log.log(step + 1, loss=loss.item(), lr=lr)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        save, out_of_time = clock.after(step)
        if ctx.is_main and save:
            ckpt.save({**_state(unet, ema, opt, step + 1, cfg, model_config), "rng": rng_state(rng)})
        if ctx.is_main and cfg.snap_every and (step + 1) % cfg.snap_every == 0:
            from ..io import atomic_path

            with atomic_path(run / "snaps" / f"step_{step + 1:06d}.pt") as tmp:
                torch.save({"ema_state_dict": ema.model.state_dict(), "step": step + 1, "config": asdict(cfg),
                            "model_config": model_config}, tmp)
        if probe is not None and (step + 1) % cfg.gap_every == 0:
            gap = probe.measure(ema.model, step + 1, ctx.device, cfg.bf16)
            if progress:
                bar.write(f"step {step + 1}: denoising error held-out / training " +
                          ", ".join(f"t {t}: {gap[f'ratio_t{t}']:.2f}" for t in GapProbe.timesteps))
        if out_of_time:
            break
    if log:
        log.close()
    if probe is not None:
        probe.log.close()
    final = _state(unet, ema, opt, step + 1 if cfg.steps > start else start, cfg, model_config)
    final["params"] = count_parameters(unet)
    return final


def unet_input(zt: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The UNet's input as trained: noisy latents (N, C, ...) with the conditions (N, K) as K constant channels."""
    return torch.cat([zt, c[:, :, None, None, None].expand(-1, -1, *zt.shape[2:])], dim=1)


class GapProbe:
    """The EMA UNet's noise-prediction error on training and held-out latents (originals, no mirrors or copies),
    with fixed noise (:func:`synth.evaluate.denoising_error`), logged to ``gap.csv`` every ``gap_every`` steps.

    The training subjects are an evenly spaced subset, at most ``max_train`` of them; the held-out / training
    ratio rising above 1 where the noise is moderate (t 50-200) is the UNet learning its training latents.
    """

    timesteps = (50, 200)
    draws = 2
    max_train = 48

    def __init__(self, z_train, c_train, z_heldout, c_heldout, alphas_cumprod, log: LossLog):
        keep = torch.from_numpy(np.unique(np.linspace(0, len(z_train) - 1, min(len(z_train), self.max_train)).round().astype(int)))
        self.sets = {"train": (z_train[keep], c_train[keep]), "heldout": (z_heldout, c_heldout)}
        self.alphas = torch.as_tensor(alphas_cumprod).cpu()
        self.log = log

    @classmethod
    def fields(cls) -> list[str]:
        return [f"{k}_t{t}" for t in cls.timesteps for k in ("train", "heldout", "ratio")]

    def measure(self, unet: torch.nn.Module, step: int, device: torch.device, bf16: bool) -> dict[str, float]:
        from ..evaluate import denoising_error

        def predict(zt, t, c):
            x = unet_input(zt, c).to(device)
            with torch.no_grad(), autocast(device, bf16):
                return unet(x, timesteps=t.to(device), context=c[:, None, :].to(device)).float().cpu()

        err = {name: denoising_error(predict, z, c, self.alphas, self.timesteps, self.draws)
               for name, (z, c) in self.sets.items()}
        out = {}
        for t in self.timesteps:
            out |= {f"train_t{t}": err["train"][t], f"heldout_t{t}": err["heldout"][t],
                    f"ratio_t{t}": err["heldout"][t] / err["train"][t]}
        self.log.log(step, **out)
        return out


def _resolved_augmentation(cfg: LDMTrainConfig) -> dict[str, Any] | None:
    """The augmentation ``cfg`` trains with, every setting as resolved (defaults included); ``None`` without."""
    from .augment import AugmentConfig

    return {"copies": cfg.augment, **asdict(AugmentConfig(**cfg.augment_options))} if cfg.augment else None


def _check_same_augmentation(state: dict, cfg: LDMTrainConfig, run: Path) -> None:
    """Refuse to resume ``state`` under other augmentation than it was trained with (its weights would go
    on learning from different copies, silently). Checkpoints from before the resolved settings were
    recorded (2026-12-01) carry only what was asked; their copies are not checked, with a warning."""
    import warnings

    recorded = (state.get("model_config") or {}).get("augmentation")
    asked = _resolved_augmentation(cfg)
    saved = state.get("config") or {}
    if recorded is None and saved.get("augment", 0):
        warnings.warn(f"{run / 'last.pt'} predates the record of its augmentation settings (augment="
                      f"{saved['augment']}, options {saved.get('augment_options') or 'the defaults of its time'}); "
                      "resuming it with the settings given now, unchecked", stacklevel=3)
        return
    if recorded != asked:
        def words(a):
            return "no augmentation" if not a else f"augment={a['copies']} with {dict((k, v) for k, v in a.items() if k != 'copies')}"

        raise ValueError(f"{run} was trained with {words(recorded)}; resuming it with {words(asked)} would change its "
                         "data midway: give the run's own settings, or a new --run-dir")


def augmented_cache_name(cfg: LDMTrainConfig) -> str:
    """The file in the run folder that caches ``cfg``'s encoded augmented copies: named by the number of
    copies, the seed and a hash of every augmentation setting as resolved (defaults included), so copies made
    under other settings, or under other defaults, are never taken for these."""
    import hashlib
    import json

    settings = json.dumps({k: v for k, v in _resolved_augmentation(cfg).items() if k != "copies"}, sort_keys=True)
    return f"latents_aug{cfg.augment}_seed{cfg.seed}_{hashlib.sha256(settings.encode()).hexdigest()[:10]}.npz"


def _augmented_latents(cfg: LDMTrainConfig, run: Path, ae, rows: list[dict], volumes: np.ndarray | None,
                       augmented: np.ndarray | None, data, ctx, progress: bool) -> np.ndarray:
    """``cfg.augment`` augmented copies of every scan and their mirrors, encoded: (2 N augment, C, ...), in
    the order [copy 1, its mirrors, copy 2, ...]; cached in the run folder (the same seed gives the same copies)."""
    from ..io import atomic_path
    from .augment import AugmentConfig, augment_copies

    cache = run / augmented_cache_name(cfg)
    if cache.is_file():
        aug = np.load(cache)["latents"]
        if len(aug) == 2 * len(rows) * cfg.augment:
            return aug
    if augmented is not None:
        if len(augmented) != cfg.augment * len(rows):
            raise ValueError(f"augmented holds {len(augmented)} volumes; augment={cfg.augment} copies of "
                             f"{len(rows)} scans make {cfg.augment * len(rows)}")
        copies = (augmented[k * len(rows):(k + 1) * len(rows)] for k in range(cfg.augment))
    else:
        if volumes is None:
            volumes = np.stack([data.t1(r)[None] for r in rows]).astype(np.float32)
        copies = augment_copies(volumes, cfg.augment, cfg.seed, workers=cfg.augment_workers,
                                cfg=AugmentConfig(**cfg.augment_options))
    parts, t0 = [], time.time()
    for k, copy in enumerate(copies):
        parts.append(encode_dataset(ae, np.array(copy, np.float32), ctx.device, cfg.bf16))  # writable: copies may be memory-mapped
        if progress and ctx.is_main:
            print(f"augmented copy {k + 1}/{cfg.augment} of {len(rows)} scans encoded ({time.time() - t0:.0f} s)", flush=True)
    aug = np.concatenate(parts)
    if ctx.is_main:
        with atomic_path(cache) as tmp:
            np.savez(tmp, latents=aug)
    return aug


def _state(unet, ema, opt, step, cfg, model_config) -> dict:
    return {
        "state_dict": unet.state_dict(),
        "ema_state_dict": ema.model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": step,
        "config": asdict(cfg),
        "model_config": model_config,
    }
