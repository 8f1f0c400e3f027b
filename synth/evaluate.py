"""Measure a shipped generator against held-out real scans (issue targets 1-3, and fidelity).

1. Autoencoder reconstruction of the test split, decoded exactly as the generator decodes
   (same dtype): PSNR and SSIM inside the brain, per subject and mean.
2. Sharpness: mean gradient magnitude inside the brain of generated brains (the test subjects'
   ages and sexes) against that of the real test scans.
3. Condition following: the mean generated brain of an age band against the mean real brain of
   each band (correlation inside the brain), and one seed swept over ages 25 -> 80 with its
   ventricle and brain volumes measured.
Latent detail (a diagnostic): the high-pass energy of the latents of real test scans against that
of sampled latents, which shows whether the diffusion model or the decoder limits the samples.
4. Fidelity: brains across ages, sexes and diagnoses segmented, measured volumes against the
   requested ones (Pearson r, median relative error), beside the segmenter's error on real
   test subjects.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from .condition import Condition
from .data.prepare import PreparedData
from .metrics import intensity_distance, masked_correlation, median_relative_error, pearson_r, psnr, sharpness, ssim
from .pipeline import BrainGenerator
from .runtime import resolve_precision

__all__ = ["reconstruction", "resampled", "sample_sharpness", "latent_detail", "highpass_energy", "condition_following", "age_sweep", "fidelity", "volume_agreement", "denoising_error", "denoising_gap", "AGE_BANDS"]

AGE_BANDS = ((20.0, 40.0), (40.0, 60.0), (60.0, 83.0))
Log = Callable[[str], None]


def _brain_mask(image: np.ndarray, threshold: float = 0.05) -> np.ndarray:
    return image > threshold


def resampled(image: np.ndarray, factor: int) -> np.ndarray:
    """``image`` average-pooled by ``factor`` and linearly upsampled back: a reference point that
    shows how much of a scan's detail lives below a ``factor`` x coarser grid."""
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    low = torch.nn.functional.avg_pool3d(t, factor, ceil_mode=True)
    return torch.nn.functional.interpolate(low, size=t.shape[2:], mode="trilinear", align_corners=False)[0, 0].numpy()


@torch.no_grad()
def reconstruction(gen: BrainGenerator, data: PreparedData, split: str = "test", bf16: bool | None = None,
                   reference_factors: tuple[int, ...] = (2, 4)) -> dict[str, Any]:
    """Encode and decode each real scan of ``split``; PSNR / SSIM inside its brain mask.

    ``reference`` gives the same figures for the scans average-pooled by each of
    ``reference_factors`` and linearly upsampled back (:func:`resampled`): the autoencoder
    compresses by 4 along each axis, so these bracket what its decoder adds over interpolation.
    """
    if bf16 is None:  # the generator's own numeric path on this hardware (never emulated bf16)
        bf16 = resolve_precision(None, gen.device, model_allows=bool(gen.config.sampling.get("bf16", False))) == "bf16"
    rows, per = data.subset(split), []
    ref: dict[int, list[tuple[float, float]]] = {f: [] for f in reference_factors}
    for r in rows:
        x = data.t1(r)
        mask = data.labels(r) > 0
        # The latent mean: what the diffusion model was trained to produce (no sampling).
        recon = gen.decode(gen.encode(x, bf16=bf16), bf16=bf16)
        per.append({"mrid": r["mrid"], "psnr": psnr(x, recon, mask), "ssim": ssim(x, recon, mask)})
        for f in reference_factors:
            y = resampled(x, f)
            ref[f].append((psnr(x, y, mask), ssim(x, y, mask)))
    return {
        "split": split,
        "n": len(per),
        "psnr_mean": float(np.mean([p["psnr"] for p in per])),
        "ssim_mean": float(np.mean([p["ssim"] for p in per])),
        "per_subject": per,
        "reference": [{"method": f"average-pool x{f}, trilinear back", "factor": f,
                       "psnr_mean": float(np.mean([v[0] for v in vals])), "ssim_mean": float(np.mean([v[1] for v in vals]))}
                      for f, vals in ref.items()],
    }


def sample_sharpness(gen: BrainGenerator, data: PreparedData, split: str = "test", seed0: int = 0,
                     log: Log = print) -> tuple[dict[str, Any], list]:
    """Generated brains for the ages and sexes of ``split``'s subjects against the real scans.

    Besides the sharpness ratio (target 2), the tissue contrast: the intensity distance
    (:func:`~synth.metrics.intensity_distance`) of each generated brain to the real subject of its
    age and sex, beside the same distance between consecutive real subjects (how far two real
    brains are apart). Sharpness alone rewards a blotchy texture; this does not.
    """
    rows = data.subset(split, labelled=True)
    real_s, gen_s, gen_d, pairs, masks = [], [], [], [], []
    for i, r in enumerate(rows):
        x, m = data.t1(r), data.labels(r) > 0
        masks.append(m)
        real_s.append(sharpness(x, m))
        b = gen.generate(Condition(age=min(max(r["age"], 20), 82), sex=r["sex"]), seed=seed0 + i)
        gm = _brain_mask(b.image)
        gen_s.append(sharpness(b.image, gm))
        gen_d.append(intensity_distance(b.image, gm, x, m))
        pairs.append((r, x, b))
        log(f"  sharpness {r['mrid']}: real {real_s[-1]:.4f} generated {gen_s[-1]:.4f}")
    real = [(x, m) for (_, x, _), m in zip(pairs, masks)]
    real_d = [intensity_distance(x, m, y, n) for (x, m), (y, n) in zip(real, real[1:] + real[:1])] if len(real) > 1 else [float("nan")]
    return {
        "n": len(rows),
        "real_mean": float(np.mean(real_s)),
        "generated_mean": float(np.mean(gen_s)),
        "ratio": float(np.mean(gen_s) / np.mean(real_s)),
        "intensity_distance_generated": float(np.mean(gen_d)),
        "intensity_distance_real_pairs": float(np.mean(real_d)),
    }, pairs


def highpass_energy(latent: torch.Tensor, sigma: float = 1.0) -> float:
    """Mean |z - Gaussian(z, sigma)| over the channels of a (1, C, x, y, z) latent: its fine structure."""
    from scipy.ndimage import gaussian_filter

    z = latent[0].float().cpu().numpy()
    return float(np.mean([np.abs(c - gaussian_filter(c, sigma)).mean() for c in z]))


def latent_detail(gen: BrainGenerator, data: PreparedData, split: str = "test", n: int = 6, seed0: int = 0) -> dict[str, Any]:
    """High-pass energy and std of the latents of ``n`` real scans and of ``n`` sampled latents for
    the same ages and sexes (the generator's default steps and guidance).

    When they are alike, sampled latents carry as much fine structure as real ones; if the samples
    still look wrong, the structure is misplaced, and a better decoder renders it more strongly.
    """
    rows = data.subset(split)[:n]
    real = [gen.encode(data.t1(r)) for r in rows]
    sampled = [gen.sample_latent(Condition(age=min(max(r["age"], 20), 82), sex=r["sex"]), seed=seed0 + i,
                                 steps=gen.config.sampling["steps"], guidance_scale=gen.config.sampling["guidance_scale"],
                                 bf16=resolve_precision(None, gen.device, model_allows=bool(gen.config.sampling["bf16"])) == "bf16",
                                 progress=None) for i, r in enumerate(rows)]
    out = {"n": len(rows)}
    for name, zs in (("real", real), ("sampled", sampled)):
        out[f"{name}_highpass"] = float(np.mean([highpass_energy(z) for z in zs]))
        out[f"{name}_std"] = float(np.mean([z.float().std().item() for z in zs]))
    return out


def condition_following(gen: BrainGenerator, data: PreparedData, splits=("test", "val"), per_band: int = 6,
                        seed0: int = 100) -> dict[str, Any]:
    """Correlation of band-mean generated brains with band-mean held-out real brains."""
    rows = [r for s in splits for r in data.subset(s, labelled=True)]
    real_means, gen_means = [], []
    rng = np.random.default_rng(0)
    for lo, hi in AGE_BANDS:
        band = [r for r in rows if lo <= r["age"] < hi]
        real_means.append(np.mean([data.t1(r) for r in band], axis=0))
        imgs = []
        for k in range(per_band):
            age = float(rng.uniform(max(lo, 20), min(hi, 82)))
            imgs.append(gen.generate(Condition(age=age, sex="FM"[k % 2]), seed=seed0 + k).image)
        gen_means.append(np.mean(imgs, axis=0))
    mask = np.mean(real_means, axis=0) > 0.05
    matrix = [[masked_correlation(g, r, mask) for r in real_means] for g in gen_means]
    diag = [matrix[i][i] for i in range(len(AGE_BANDS))]
    off = [matrix[i][j] for i in range(len(AGE_BANDS)) for j in range(len(AGE_BANDS)) if i != j]
    return {
        "bands": [list(b) for b in AGE_BANDS],
        "n_real": [int(sum(lo <= r["age"] < hi for r in rows)) for lo, hi in AGE_BANDS],
        "per_band_generated": per_band,
        "correlation_matrix_generated_x_real": matrix,
        "matched_mean": float(np.mean(diag)),
        "mismatched_mean": float(np.mean(off)),
        "best_match_is_own_band": [int(np.argmax(row)) == i for i, row in enumerate(matrix)],
    }


def age_sweep(gen: BrainGenerator, segmenter=None, seed: int = 0, sex: str = "F",
              ages=(25, 35, 45, 55, 65, 75, 80)) -> dict[str, Any]:
    """One seed across ages; ventricle and brain volumes of each brain, in mL and as fractions of ICV.

    The model is conditioned on fractions of ICV, so the fractions are the measure that counts.
    Without a segmenter, ventricles are approximated by dark (CSF-like, < 0.3) voxels in a
    central box and the brain (and ICV) by voxels above 0.05.
    """
    out = {"seed": seed, "sex": sex, "ages": list(ages), "ventricles_ml": [], "brain_ml": [], "icv_ml": [],
           "ventricles_frac": [], "brain_frac": [], "images": []}
    for a in ages:
        b = gen.generate(Condition(age=a, sex=sex), seed=seed)
        if segmenter is not None:
            from .anatomy import measure_volumes

            v = measure_volumes(segmenter.segment(b.image))
            vent, brain, icv = v["lateral_ventricles"], v["brain"], v["icv"]
        else:
            img = b.image
            box = img[25:55, 35:75, 35:65]
            vent = float(((box < 0.3) & (box > 0.0)).sum() * 8.0)
            brain = icv = float((img > 0.05).sum() * 8.0)
        out["ventricles_ml"].append(vent / 1000)
        out["brain_ml"].append(brain / 1000)
        out["icv_ml"].append(icv / 1000)
        out["ventricles_frac"].append(vent / icv)
        out["brain_frac"].append(brain / icv)
        out["images"].append(b.image)
    out["ventricles_r_age"] = pearson_r(ages, out["ventricles_frac"])
    out["brain_r_age"] = pearson_r(ages, out["brain_frac"])
    out["ventricles_increase"] = bool(out["ventricles_r_age"] > 0.8)
    out["brain_decrease"] = bool(out["brain_r_age"] < -0.8)
    return out


def volume_agreement(requested, measured) -> dict[str, float]:
    """Pearson r, median relative error, and median signed relative error (``median_bias``: > 0
    when measured volumes run larger than requested) of measured against requested volumes."""
    req, got = np.asarray(requested, float), np.asarray(measured, float)
    return {"pearson_r": pearson_r(req, got), "median_rel_error": median_relative_error(got, req),
            "median_bias": float(np.median(got / req - 1))}


def fidelity(gen: BrainGenerator, segmenter, data: PreparedData | None = None, n: int = 54, seed0: int = 1000,
             log: Log = print) -> dict[str, Any]:
    """Requested vs measured volumes (fractions of ICV) over ``n`` generated brains."""
    from .anatomy import measure_volumes

    rng = np.random.default_rng(seed0)
    keys = ("lateral_ventricles", "hippocampus", "brain")
    req = {k: [] for k in keys}
    got = {k: [] for k in keys}
    t0 = time.time()
    for i in range(n):
        cond = Condition(age=float(rng.uniform(25, 82)), sex="FM"[i % 2], diagnosis=("CN", "MCI", "AD")[i % 3])
        b = gen.generate(cond, seed=seed0 + i)
        v = measure_volumes(segmenter.segment(b.image))
        for k in keys:
            req[k].append(b.targets[k])
            got[k].append(v[k] / v["icv"])
        if (i + 1) % 10 == 0:
            log(f"  fidelity {i + 1}/{n} ({time.time() - t0:.0f} s)")
    result: dict[str, Any] = {"n": n, "generated": {}}
    for k in keys:
        result["generated"][k] = volume_agreement(req[k], got[k])
    if data is not None:
        real = {k: ([], []) for k in keys}
        for r in data.subset("test"):
            v = measure_volumes(segmenter.segment(data.t1(r)))
            for k in keys:
                real[k][0].append(r[k] / r["icv"])
                real[k][1].append(v[k] / v["icv"])
        result["segmenter_on_real_test"] = {
            k: {"pearson_r": pearson_r(*real[k]), "median_rel_error": median_relative_error(real[k][1], real[k][0])}
            for k in keys
        }
    return result


GAP_TIMESTEPS = (10, 25, 50, 100, 200, 400, 700)


@torch.no_grad()
def denoising_error(predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], latents: torch.Tensor,
                    cond: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps=GAP_TIMESTEPS, draws: int = 4,
                    seed: int = 1000, batch_size: int = 16) -> dict[int, float]:
    """Mean noise-prediction MSE at each timestep, the diffusion loss with fixed noise.

    ``predict(z_t, t, cond)`` returns the predicted noise of scaled latents ``z_t`` (N, C, ...) at integer
    timesteps ``t`` (N,) under conditions ``cond`` (N, K). Noise draw ``k`` comes from ``seed + k`` for
    any set of latents, so repeated calls give the same figure and two sets meet the same noise process.
    """
    if len(latents) == 0:
        raise ValueError("denoising_error needs at least one latent")
    if len(cond) != len(latents):
        raise ValueError(f"one condition per latent expected: {len(cond)} conditions for {len(latents)} latents")
    n_train = len(alphas_cumprod)
    out: dict[int, float] = {}
    for t in timesteps:
        if not 0 <= int(t) < n_train:
            raise ValueError(f"timesteps must be within 0-{n_train - 1}, got {t}")
        a = alphas_cumprod[int(t)].float()
        errs = []
        for k in range(draws):
            g = torch.Generator().manual_seed(seed + k)
            noise = torch.randn(latents.shape, generator=g)
            for i in range(0, len(latents), batch_size):
                z0, n = latents[i:i + batch_size].float(), noise[i:i + batch_size]
                zt = a.sqrt() * z0 + (1 - a).sqrt() * n
                pred = predict(zt, torch.full((len(z0),), int(t), dtype=torch.long), cond[i:i + batch_size]).float()
                errs.append(((pred - n) ** 2).flatten(1).mean(1))
        out[int(t)] = float(torch.cat(errs).mean())
    return out


def denoising_gap(gen: BrainGenerator, data: PreparedData, timesteps=GAP_TIMESTEPS, draws: int = 4,
                  heldout_splits=("val", "test"), log: Log = print) -> dict[str, Any]:
    """Over- or under-fitting of a latent diffusion model's UNet: its denoising error on the training
    subjects' latents against held-out subjects' (each under its own measured condition, as trained).

    A held-out / training ratio well above 1 at a timestep means the UNet has learnt the training latents
    there rather than brains in general: more steps on the same subjects will not help; augmentation,
    regularisation or more data may. Latents are the encoder's means (no mirrors), scaled as in training.
    """
    from .train.diffusion import covariate_matrix

    if getattr(gen, "unet", None) is None:
        raise ValueError(f"{gen.config.name!r} is not a latent diffusion model (the denoising gap needs its UNet)")
    cfg = gen.config
    vol_keys = [c for c in cfg.covariates if c not in ("age", "sex") and not c.startswith("diagnosis_")]

    def usable(rows):
        return [r for r in rows if all(r.get(k) is not None for k in vol_keys) and (not vol_keys or r.get("icv"))]

    sets = {"train": usable(data.subset("train", labelled=True)),
            "heldout": usable([r for s in heldout_splits for r in data.subset(s, labelled=True)])}
    for name, rows in sets.items():
        if not rows:
            raise ValueError(f"no {name} subjects with age, sex and the model's covariates in {data.root}")
    alphas = torch.as_tensor(gen.make_scheduler().alphas_cumprod)

    def predict(zt, t, c):
        x, context = gen._unet_inputs(zt.to(gen.device), c.to(gen.device))
        return gen.unet(x, timesteps=t.to(gen.device), context=context).float().cpu()

    t0 = time.time()
    errors = {}
    for name, rows in sets.items():
        z = torch.cat([gen.encode(data.t1(r)) for r in rows]).cpu() * cfg.latent_scale
        c = torch.from_numpy(covariate_matrix(rows, cfg.covariates, cfg.covariate_ranges))
        errors[name] = denoising_error(predict, z, c, alphas, timesteps, draws)
        log(f"  {name}: {len(rows)} subjects, " + ", ".join(f"t {t}: {e:.4f}" for t, e in errors[name].items()))
    ratio = {t: errors["heldout"][t] / errors["train"][t] for t in errors["train"]}
    return {"model": f"{cfg.name} {cfg.version}", "timesteps": [int(t) for t in timesteps], "draws": draws,
            "n_train": len(sets["train"]), "n_heldout": len(sets["heldout"]), "heldout_splits": list(heldout_splits),
            "train": errors["train"], "heldout": errors["heldout"], "ratio": ratio,
            "worst": max(ratio.items(), key=lambda kv: kv[1]), "seconds": round(time.time() - t0, 1)}
