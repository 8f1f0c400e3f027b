"""``synthbrain evaluate``: measure any generator against held-out real scans; Markdown + figures + JSON.

:func:`run_evaluation` generates one brain per held-out subject (its age and sex, the model's
default sampling settings), a few seeds per condition for diversity, and measures them with
:mod:`synth.realism` (FID/KID on a trained feature network beside the real-train yardstick, a
classifier two-sample test, brain age, MS-SSIM diversity, nearest-training privacy), the volume
study (:func:`synth.evaluate.volume_agreement` on the segmented samples) and the texture
statistics of :mod:`synth.metrics` (sharpness, tissue contrast; not evidence of realism on their
own). :func:`write_report` writes ``report.md``, one PNG per figure and ``report.json`` holding
every number and the data behind every figure, with the generator's provenance and the
synthetic notice. Generated volumes are never written.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import provenance as _prov
from . import realism as R
from .runtime import resolve_precision
from .brain import brain_mask, zero_background
from .compare import _pct, markdown_table
from .condition import TRAINING_AGE_RANGE, Condition
from .io import SYNTHETIC_NOTICE, write_json
from .metrics import intensity_distance, sharpness
from .version import __version__

__all__ = ["EvalOptions", "run_evaluation", "write_report", "FIGURES"]

Log = Callable[[str], None]
IXI_CREDIT = "real scans: IXI dataset, CC BY-SA 3.0"
# figure name -> what it shows (every one is written, with its data in report.json)
FIGURES = {
    "side_by_side": "held-out real subjects beside generated brains of the same age and sex, same slices",
    "realism": "FID, KID, classifier two-sample accuracy and the texture Fréchet distance, samples against the real-train yardstick",
    "brain_age": "predicted against requested age (samples) and true age (held-out real)",
    "volumes": "requested against measured volumes (samples) and table against segmenter (held-out real)",
    "diversity": "MS-SSIM between samples of one condition and between age-matched real subjects",
    "privacy": "each image's highest correlation with a training subject, samples and held-out real",
    "closest_pair": "the sample closest to a training subject, beside that subject",
}


@dataclass
class EvalOptions:
    """What :func:`run_evaluation` measures and how much.

    Args:
        splits: Held-out splits of the prepared data (real reference set).
        n_samples: Generated brains for the distribution tests (default: one per held-out subject,
            their ages and sexes; more cycle through the subjects).
        seed: Seed of the first sample (then seed + 1, ...).
        diversity_conditions: Conditions (held-out subjects' ages and sexes, spread over ages) for MS-SSIM.
        diversity_seeds: Brains per diversity condition.
        c2st_folds: Cross-validation folds of the classifier two-sample tests.
        c2st_steps: Training steps of the CNN classifier per fold.
        c2st_repeats: Repeats of the CNN classifier's cross-validation, accuracy their mean (one run swings
            by about 10 points on 36 + 36 brains; :func:`synth.realism.c2st`).
        kid_subsets: Random subsets for KID's mean and spread.
        yardstick_draws: Random draws of real-train subjects (as many as samples) for the yardstick.
        segmenter: Segmenter name or folder for the volume study; ``None`` skips it.
        generate_options: Passed to ``gen.generate`` (default: the model's own settings).
        max_real_pairs_gap: Largest age gap (years) of a same-sex real pair for diversity.
        cache_dir: Keep the generated brains here (NIfTI + sidecar, outside the repository) and reuse
            them in a later run with the same model, options, conditions and seeds.
        match_volumes: Warp every generated brain to its requested ventricle and hippocampus volumes
            (:func:`synth.anatomy.match_brain_volumes`, with ``segmenter``) before measuring it. The
            volume study then measures the warp with the segmenter it steered by.
        first_stage: Also run the two-sample tests on the first stage's reconstructions of the held-out
            scans (encoded, decoded and background-zeroed as a generated brain is): the realism the
            generator could reach at best with this decoder, however good its prior.
    """

    splits: tuple[str, ...] = ("val", "test")
    n_samples: int | None = None
    seed: int = 0
    diversity_conditions: int = 4
    diversity_seeds: int = 4
    c2st_folds: int = 5
    c2st_steps: int = 150
    c2st_repeats: int = 3
    kid_subsets: int = 100
    yardstick_draws: int = 10
    segmenter: str | None = "synthbrain-seg-2mm"
    generate_options: dict[str, Any] = field(default_factory=dict)
    max_real_pairs_gap: float = 5.0
    cache_dir: str | None = None
    match_volumes: bool = False
    first_stage: bool = True


def _condition(row: dict) -> Condition:
    lo, hi = TRAINING_AGE_RANGE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Condition(age=float(min(max(row["age"], lo), hi)), sex=row["sex"])


def _cache_key(gen, opts: dict) -> str:
    """What besides name, version, options, condition and seed decides a cached brain: the model's own
    sampling settings and weights (a config edited under the same name and version, another default
    sampler say, must not pick up the old brains) and the numeric path generation takes here. Cached brains
    are unrefined (:func:`_cached` refines them on loading), so the refiner's weights and settings are not
    part of it: a new refiner reuses the samples of the model it refines."""
    cfg = getattr(gen, "config", None)
    sampling = getattr(cfg, "sampling", None)
    weights = getattr(cfg, "weights_sha256", None)
    if isinstance(weights, dict):
        weights = {k: v for k, v in weights.items() if k != "refiner.safetensors"}
    what = {"sampling": sampling, "weights": weights,
            "precision": resolve_precision(opts.get("precision"), getattr(gen, "device", "cpu"),
                                           model_allows=bool((sampling or {}).get("bf16", False)))}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _refines(gen, opts: dict) -> bool:
    """Whether ``gen.generate(**opts)`` applies the model's refiner."""
    if getattr(gen, "refiner", None) is None:
        return False
    return bool(opts["refine"]) if opts.get("refine") is not None else gen.refines_by_default_for(bool(opts.get("fast")))


def _cached(gen, c: Condition, seed: int, opts: dict, cache: Path | None):
    """``gen.generate(c, seed, **opts)``, or the brain a previous run saved in ``cache`` (NIfTI + sidecar;
    outside the repository). The file name holds the model, version, options, condition and seed.

    The cache holds brains before the refiner: a refined brain is its cached unrefined brain through
    ``gen.refine_brain`` (the generator's last step, on the float32 image the NIfTI keeps exactly), so a model
    whose refiner changed needs no new samples."""
    from .brain import SyntheticBrain, sidecar_path

    if cache is None:
        return gen.generate(c, seed=int(seed), progress=None, **opts)
    if _refines(gen, opts):
        return gen.refine_brain(_cached(gen, c, seed, {**opts, "refine": False}, cache))
    cfg = getattr(gen, "config", None)
    tag = "_".join(f"{k}-{v}" for k, v in sorted(opts.items()))
    key = _cache_key(gen, opts)
    path = cache / (f"{getattr(cfg, 'name', 'model')}-{getattr(cfg, 'version', '')}-{key}{'_' + tag if tag else ''}"
                    f"_{c.age:g}_{c.sex}_{c.diagnosis}_{seed}.nii.gz")
    if path.is_file() and sidecar_path(path).is_file():
        from .io import load_nifti, read_json

        img, aff = load_nifti(path)
        meta = read_json(sidecar_path(path))
        prov = {k: v for k, v in meta.items() if k not in ("condition", "seed", "target_volumes_fraction_of_icv")}
        return SyntheticBrain(img.astype(np.float32), aff, c, int(seed), dict(meta["target_volumes_fraction_of_icv"]), prov)
    b = gen.generate(c, seed=int(seed), progress=None, **opts)
    b.save(path)
    return b


def _generate(gen, conditions: Sequence[Condition], seeds: Sequence[int], opts: dict, log: Log, what: str,
              cache: Path | None = None):
    out, t0 = [], time.time()
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    for i, (c, s) in enumerate(zip(conditions, seeds)):
        out.append(_cached(gen, c, int(s), opts, cache))
        if (i + 1) % 5 == 0 or i + 1 == len(seeds):
            log(f"  {what}: {i + 1}/{len(seeds)} brains ({time.time() - t0:.0f} s)")
    return out


def _real_pairs(rows: Sequence[dict], gap: float) -> list[tuple[int, int]]:
    pairs = [(i, j) for i in range(len(rows)) for j in range(i + 1, len(rows))
             if rows[i]["sex"] == rows[j]["sex"] and abs(rows[i]["age"] - rows[j]["age"]) <= gap]
    return pairs


def _distances(feats: dict[str, np.ndarray], n: int, opts: EvalOptions) -> dict[str, Any]:
    """FID / KID of samples vs held-out, beside real-train subsets of the same size vs held-out."""
    ref, smp, trn = feats["heldout"], feats["samples"], feats["train"]
    rng = np.random.default_rng(opts.seed)
    out: dict[str, Any] = {"n_samples": len(smp), "n_heldout": len(ref), "n_train": len(trn),
                           "samples": {"fid": R.frechet_distance(smp, ref),
                                       "kid": R.kernel_distance(smp, ref, opts.kid_subsets, seed=opts.seed)}}
    fids, kids = [], []
    for d in range(opts.yardstick_draws if len(trn) > n else 1):
        pick = rng.choice(len(trn), min(n, len(trn)), replace=False)
        fids.append(R.frechet_distance(trn[pick], ref))
        kids.append(R.kernel_distance(trn[pick], ref, opts.kid_subsets, seed=opts.seed + d)["mean"])
    out["yardstick"] = {"what": f"{min(n, len(trn))} real training subjects (random draws) vs held-out real",
                        "draws": len(fids), "fid": float(np.mean(fids)), "fid_range": [float(min(fids)), float(max(fids))],
                        "kid": float(np.mean(kids)), "kid_range": [float(min(kids)), float(max(kids))],
                        "fid_all_train": R.frechet_distance(trn, ref)}
    y = out["yardstick"]
    out["fid_ratio"] = out["samples"]["fid"] / y["fid"] if y["fid"] > 0 else float("inf")
    out["kid_ratio"] = out["samples"]["kid"]["mean"] / y["kid"] if y["kid"] > 0 else float("nan")
    return out


VOLUME_KEYS = ("lateral_ventricles", "hippocampus", "brain")


def measured_against_table(seg, rows: Sequence[dict], images: Sequence[np.ndarray],
                           keys: Sequence[str] = VOLUME_KEYS) -> tuple[dict[str, list], dict[str, list]]:
    """``(table, measured)``: each structure's volume (fraction of ICV) from the prepared table and as
    ``seg`` measures it on ``images`` (one per row), over the rows whose table has every structure and ICV."""
    from .anatomy import measure_volumes

    table, meas = {k: [] for k in keys}, {k: [] for k in keys}
    for r, x in zip(rows, images):
        if any(r.get(k) is None for k in (*keys, "icv")):
            continue
        v = measure_volumes(seg.segment(x))
        for k in keys:
            table[k].append(r[k] / r["icv"])
            meas[k].append(v[k] / v["icv"])
    return table, meas


def _volumes(samples, real_imgs, held_rows, segmenter_name: str, device: str, log: Log,
             recon: list[np.ndarray] | None = None) -> dict[str, Any]:
    from .anatomy import load_segmenter, measure_volumes
    from .evaluate import volume_agreement

    seg = load_segmenter(segmenter_name, device=device)
    keys = VOLUME_KEYS
    req, got = {k: [] for k in keys}, {k: [] for k in keys}
    for b in samples:
        v = measure_volumes(seg.segment(b.image))
        for k in keys:
            req[k].append(b.targets[k])
            got[k].append(v[k] / v["icv"])
    table, meas = measured_against_table(seg, held_rows, real_imgs, keys)
    meas_rec = measured_against_table(seg, held_rows, recon, keys)[1] if recon is not None else None
    log(f"  volumes: {len(samples)} samples and {len(table['brain'])} real subjects segmented"
        + (" (and their reconstructions)" if recon is not None else ""))
    out = {"segmenter": segmenter_name, "structures": list(keys), "samples": {}, "segmenter_on_heldout_real": {},
           "data": {"requested": req, "measured": got, "real_table": table, "real_measured": meas}}
    if recon is not None:  # the first stage's ceiling for the volumes: the segmenter on its renderings of real scans
        out["segmenter_on_first_stage"] = {}
        out["data"]["first_stage_measured"] = meas_rec
    for k in keys:
        out["samples"][k] = volume_agreement(req[k], got[k])
        if len(table[k]) > 1:
            out["segmenter_on_heldout_real"][k] = volume_agreement(table[k], meas[k])
            if recon is not None:
                out["segmenter_on_first_stage"][k] = volume_agreement(table[k], meas_rec[k])
    return out


def heldout_scans(data, splits: Sequence[str] = ("val", "test")) -> tuple[list[dict], list[np.ndarray], list[np.ndarray]]:
    """``(rows, scans, brain masks)`` of the labelled subjects of ``splits`` of a prepared data folder."""
    rows = [r for s in splits for r in data.subset(s, labelled=True)]
    return rows, [data.t1(r) for r in rows], [data.labels(r) > 0 for r in rows]


def texture_scaled(bank: dict[str, np.ndarray], reference: np.ndarray) -> dict[str, np.ndarray]:
    """Random-conv bank features (:func:`synth.realism.random_conv_features`) standardised by the mean and SD of
    ``reference`` (the held-out real scans'), so no one filter's scale dominates a Fréchet or kernel distance."""
    mu, sd = reference.mean(0), reference.std(0) + 1e-12
    return {k: (v - mu) / sd for k, v in bank.items()}


def c2st_confidence(result: dict) -> float:
    """Mean out-of-fold probability a two-sample classifier (:meth:`C2STResult.to_dict`) gave to the right
    answer: 0.5 = a coin, 1 = certain. Still ranks candidates when every accuracy is 100 %."""
    scores = np.asarray(result["scores"], float)
    n = result["n_per_class"]
    return float(np.mean(np.r_[1 - scores[:n], scores[n:]]))


def reconstruct(gen, real, refine: bool = False) -> list[np.ndarray]:
    """The first stage's renderings of ``real``: each scan encoded, decoded and background-zeroed as a generated brain
    is, and with ``refine`` passed through the model's refiner (:meth:`synth.pipeline.BrainGenerator.refine`)."""
    out = [zero_background(np.asarray(gen.decode(gen.encode(x)), np.float32)) for x in real]
    return [gen.refine(x) for x in out] if refine else out


def first_stage_ceiling(gen, real, masks, bank_real: np.ndarray | None = None, *, folds: int = 5, steps: int = 150,
                        seed: int = 0, log: Log | None = None, recon: list[np.ndarray] | None = None,
                        repeats: int = 1) -> dict[str, Any]:
    """Two-sample tests of the first stage's reconstructions against the real scans they encode.

    Each scan is encoded, decoded and background-zeroed as a generated brain is (:func:`reconstruct`,
    or ``recon`` when the caller has them); ``masks`` are the scans' brain masks (PSNR, SSIM);
    ``bank_real`` is :func:`synth.realism.random_conv_features` of ``real`` when the caller has it already.
    """
    from .metrics import psnr, ssim

    t0 = time.time()
    recon = reconstruct(gen, real) if recon is None else recon
    cnn = R.c2st(real, recon, folds=folds, steps=steps, seed=seed, repeats=repeats, log=log)
    bank_real = R.random_conv_features(real) if bank_real is None else bank_real
    bank_recon = R.random_conv_features(recon)
    tex = R.c2st_logistic(bank_real, bank_recon, folds, seed, "a fixed random-convolution bank")
    scaled = texture_scaled({"real": bank_real, "recon": bank_recon}, bank_real)
    out = {"cnn": cnn.to_dict(), "logistic_random_conv": tex.to_dict(),
           "texture_fd": R.frechet_distance(scaled["recon"], scaled["real"]),
           "psnr_mean": float(np.mean([psnr(x, y, m) for x, y, m in zip(real, recon, masks)])),
           "ssim_mean": float(np.mean([ssim(x, y, m) for x, y, m in zip(real, recon, masks)])),
           "seconds": round(time.time() - t0, 1)}
    if log:
        log(f"  first stage: C2ST CNN {cnn.accuracy:.3f}, texture bank {tex.accuracy:.3f}, PSNR {out['psnr_mean']:.2f} dB")
    return out


def run_evaluation(gen, data, features: R.FeatureModel, options: EvalOptions | None = None,
                   log: Log = print) -> tuple[dict[str, Any], dict[str, Any]]:
    """Measure ``gen`` (any object with the generator API) against the held-out subjects of ``data``.

    Returns:
        ``(results, arrays)``: the JSON-able results (every number, the data behind every figure)
        and the images the figures need (``real``, ``samples``, ``train`` lists of volumes).
    """
    o = options or EvalOptions()
    t0 = time.time()
    held_rows = [r for s in o.splits for r in data.subset(s, labelled=True)]
    train_rows = data.subset("train", labelled=True)
    if len(held_rows) < 4 or len(train_rows) < 4:
        raise ValueError(f"need at least 4 labelled held-out ({'+'.join(o.splits)}) and 4 training subjects, "
                         f"got {len(held_rows)} and {len(train_rows)} in {data.root}")
    n = int(o.n_samples or len(held_rows))
    if n < 4:
        raise ValueError(f"`n_samples` must be at least 4, got {n}")
    real = [data.t1(r) for r in held_rows]
    features.check_shape(real[0].shape, "the prepared volumes")
    log(f"held-out real: {len(real)} subjects ({'+'.join(o.splits)}); loading {len(train_rows)} training subjects")
    train = [data.t1(r) for r in train_rows]

    # 1. samples: one per held-out subject (age, sex), the model's default sampling settings
    match_rows = [held_rows[i % len(held_rows)] for i in range(n)]
    cache = Path(o.cache_dir) if o.cache_dir else None
    samples = _generate(gen, [_condition(r) for r in match_rows], [o.seed + i for i in range(n)],
                        o.generate_options, log, "samples", cache)
    features.check_shape(samples[0].image.shape, "the generated brains")
    order = np.argsort([r["age"] for r in held_rows])
    div_rows = [held_rows[order[i]] for i in np.linspace(0, len(order) - 1, o.diversity_conditions).round().astype(int)]
    div = [_generate(gen, [_condition(r)] * o.diversity_seeds, [o.seed + 100_000 + 1000 * c + j for j in range(o.diversity_seeds)],
                     o.generate_options, log, f"diversity condition {c + 1}", cache) for c, r in enumerate(div_rows)]
    if o.match_volumes:
        from .anatomy import load_segmenter, match_brain_volumes

        if not o.segmenter:
            raise ValueError("`match_volumes` needs a `segmenter`")
        seg = load_segmenter(o.segmenter, device=str(getattr(gen, "device", "cpu")))
        samples = [match_brain_volumes(b, seg)[0] for b in samples]
        div = [[match_brain_volumes(b, seg)[0] for b in group] for group in div]
        log(f"  volumes matched by warping ({len(samples) + sum(map(len, div))} brains)")
    t_gen = time.time() - t0
    s_imgs = [b.image for b in samples]

    # 2. features, distances, brain age and sex
    pred = {k: features.predict(v) for k, v in (("heldout", real), ("samples", s_imgs), ("train", train))}
    feats = {k: v["features"] for k, v in pred.items()}
    res: dict[str, Any] = {"distances": _distances(feats, n, o)}
    log(f"  FID samples {res['distances']['samples']['fid']:.3g} vs yardstick {res['distances']['yardstick']['fid']:.3g}")
    req_age = [c.age for c in (b.condition for b in samples)]
    res["brain_age"] = {"samples": R.brain_age(pred["samples"]["age"], req_age),
                        "heldout_real": R.brain_age(pred["heldout"]["age"], [r["age"] for r in held_rows]),
                        "data": {"requested": req_age, "predicted_samples": pred["samples"]["age"].tolist(),
                                 "true_heldout": [r["age"] for r in held_rows], "predicted_heldout": pred["heldout"]["age"].tolist()}}
    res["sex"] = {"samples_accuracy": float(np.mean((pred["samples"]["p_male"] > 0.5) == np.array([b.condition.sex == "M" for b in samples]))),
                  "heldout_accuracy": float(np.mean((pred["heldout"]["p_male"] > 0.5) == np.array([r["sex"] == "M" for r in held_rows])))}

    # 3. classifier two-sample tests
    log("  classifier two-sample test (3D CNN, cross-validated)")
    cnn = R.c2st(real, s_imgs, folds=o.c2st_folds, steps=o.c2st_steps, seed=o.seed, repeats=o.c2st_repeats, log=log)
    bank = {k: R.random_conv_features(v) for k, v in (("heldout", real), ("samples", s_imgs), ("train", train))}
    # Fréchet and kernel distances on the texture bank as well: the feature network sees 4 mm voxels
    # and is nearly blind to the 2 mm detail the classifiers see; the bank is not.
    res["distances_texture"] = _distances(texture_scaled(bank, bank["heldout"]), n, o)
    log(f"  texture FD samples {res['distances_texture']['samples']['fid']:.3g} vs yardstick "
        f"{res['distances_texture']['yardstick']['fid']:.3g}")
    rng = np.random.default_rng(o.seed)
    pick = rng.choice(len(train), min(len(train), len(real)), replace=False)
    res["c2st"] = {
        "cnn": cnn.to_dict(),
        "logistic_features": R.c2st_logistic(feats["heldout"], feats["samples"], o.c2st_folds, o.seed, "the feature network's features").to_dict(),
        "logistic_random_conv": R.c2st_logistic(bank["heldout"], bank["samples"], o.c2st_folds, o.seed, "a fixed random-convolution bank").to_dict(),
        "yardstick_logistic_features": R.c2st_logistic(feats["heldout"], feats["train"][pick], o.c2st_folds, o.seed,
                                                       "features, real training subjects vs held-out real").to_dict(),
        "yardstick_logistic_random_conv": R.c2st_logistic(bank["heldout"], bank["train"][pick], o.c2st_folds, o.seed,
                                                          "random-conv bank, real training subjects vs held-out real").to_dict(),
    }
    log(f"  C2ST accuracy: CNN {cnn.accuracy:.3f}, logistic on features {res['c2st']['logistic_features']['accuracy']:.3f}, "
        f"on random-conv bank {res['c2st']['logistic_random_conv']['accuracy']:.3f}")

    # 3b. the first stage's ceiling: its reconstructions of the held-out scans against the scans
    recon = None
    if o.first_stage and hasattr(gen, "encode") and hasattr(gen, "decode"):
        log("  first-stage ceiling: two-sample tests on reconstructions of the held-out scans")
        # the image path the samples take: through the refiner when generation applies it
        fast = bool(o.generate_options.get("fast", False))
        refined = bool(o.generate_options.get("refine", gen.refines_by_default_for(fast)
                                              if hasattr(gen, "refines_by_default_for") else False))
        recon = reconstruct(gen, real, refine=refined)
        res["first_stage"] = first_stage_ceiling(gen, real, [data.labels(r) > 0 for r in held_rows], bank["heldout"],
                                                 folds=o.c2st_folds, steps=o.c2st_steps, seed=o.seed, log=log, recon=recon,
                                                 repeats=o.c2st_repeats)
        res["first_stage"]["refiner"] = refined

    # 4. diversity
    s_pairs = [(g[i].image, g[j].image) for g in div for i in range(len(g)) for j in range(i + 1, len(g))]
    gap = o.max_real_pairs_gap
    rp = _real_pairs(held_rows, gap)
    while len(rp) < 3 and gap < 80:
        gap *= 2
        rp = _real_pairs(held_rows, gap)
    ms_s, ms_r = R.ms_ssim_pairs(s_pairs), R.ms_ssim_pairs([(real[i], real[j]) for i, j in rp])
    res["diversity"] = {"samples_mean": float(np.mean(ms_s)) if ms_s else float("nan"), "real_mean": float(np.mean(ms_r)) if ms_r else float("nan"),
                        "n_sample_pairs": len(ms_s), "n_real_pairs": len(rp), "real_pairs_max_age_gap": gap,
                        "conditions": [_condition(r).to_dict() for r in div_rows], "seeds_per_condition": o.diversity_seeds,
                        "data": {"samples": ms_s, "real": ms_r}}
    res["diversity"]["difference"] = res["diversity"]["samples_mean"] - res["diversity"]["real_mean"]

    # 5. privacy: nearest training subject by correlation in the brain, and in feature space
    region = R.brain_region(train)
    nn_s, nn_h = R.nearest_training(s_imgs, train, region), R.nearest_training(real, train, region)
    mu, sd = feats["train"].mean(0), feats["train"].std(0) + 1e-8

    def fdist(q):
        d = np.linalg.norm(((q - mu) / sd)[:, None] - ((feats["train"] - mu) / sd)[None], axis=2)
        return d.min(1)

    top = np.argsort(-nn_s["r"])[:3]
    res["privacy"] = {**R.privacy_summary(nn_s["r"], nn_h["r"], nn_s["all"], nn_h["all"]),
                      "feature_nn_distance": {"samples_median": float(np.median(fdist(feats["samples"]))),
                                              "heldout_median": float(np.median(fdist(feats["heldout"])))},
                      "closest_pairs": [{"sample": int(i), "sample_condition": samples[i].condition.to_dict(), "sample_seed": samples[i].seed,
                                         "train_mrid": train_rows[int(nn_s["index"][i])]["mrid"], "r": float(nn_s["r"][i])} for i in top],
                      "region_voxels": int(region.sum()),
                      "data": {"samples": nn_s["r"].tolist(), "heldout": nn_h["r"].tolist(),
                               "samples_margin": (nn_s["r"] - nn_s["all"].mean(1)).tolist(),
                               "heldout_margin": (nn_h["r"] - nn_h["all"].mean(1)).tolist()}}

    # 6. volumes (the existing study's measure, on these samples)
    if o.segmenter:
        res["volumes"] = _volumes(samples, real, held_rows, o.segmenter, str(getattr(gen, "device", "cpu")), log, recon=recon)

    # 7. texture statistics: not evidence of realism on their own
    sh_s = [sharpness(b.image, brain_mask(b.image)) for b in samples]
    sh_r = [sharpness(x, x > 0) for x in real]
    d_s = [intensity_distance(b.image, brain_mask(b.image), real[i % len(real)], real[i % len(real)] > 0) for i, b in enumerate(samples)]
    d_r = [intensity_distance(x, x > 0, y, y > 0) for x, y in zip(real, real[1:] + real[:1])]
    res["texture"] = {"sharpness_samples": float(np.mean(sh_s)), "sharpness_real": float(np.mean(sh_r)),
                      "sharpness_ratio": float(np.mean(sh_s) / np.mean(sh_r)),
                      "intensity_distance_samples_to_matched_real": float(np.mean(d_s)),
                      "intensity_distance_real_to_real": float(np.mean(d_r)),
                      # isolated bright/dark dots (an adversarial network's artefact): a check, not a realism score
                      "speckle_samples": float(np.mean([R.speckle_fraction(b.image) for b in samples])),
                      "speckle_real": float(np.mean([R.speckle_fraction(x) for x in real])),
                      "note": "texture statistics: a blotchy texture can match them; not evidence of realism on their own"}

    # 8. pose: generated brains should sit on the template as the registered scans do
    ref_mask = np.mean([x > 0 for x in real], 0) > 0.5
    res["pose"] = {"samples": R.pose_spread(s_imgs, ref_mask), "heldout_real": R.pose_spread(real, ref_mask),
                   "reference": "majority brain mask of the held-out real scans"}

    first = samples[0].provenance
    carried = {k: first[k] for k in _prov.CARRIED_FIELDS if k in first and k not in ("seed", "condition", "created", "source")}
    prov = _prov.extend({**carried, "notice": SYNTHETIC_NOTICE, "synthetic": True, "history": list(first.get("history", []))},
                        "evaluate", n_samples=n, first_seed=o.seed, splits="+".join(o.splits), features=features.source)
    try:
        from .runtime import cpu_description

        hw = cpu_description()
    except Exception:  # pragma: no cover - description only
        hw = {}
    results = {
        "notice": SYNTHETIC_NOTICE, "synthetic": True, "synth_version": __version__,
        "date": time.strftime("%Y-%m-%d"), "provenance": prov,
        "generator": {"name": first.get("model"), "version": first.get("model_version"), "backend": getattr(gen, "backend", "?"),
                      "sampler": first.get("sampler"), "steps": first.get("steps"), "guidance_scale": first.get("guidance_scale"),
                      "precision": first.get("precision"), "device": first.get("device"),
                      "refiner": first["refiner"].get("applied") if isinstance(first.get("refiner"), dict) else None,
                      "volume_matching": bool(o.match_volumes)},
        "features": {k: features.config.get(k) for k in ("name", "version", "channels", "pool", "input_shape", "training_steps",
                                                          "held_out", "weights_sha256")} | {"source": features.source},
        "data": {"root": Path(data.root).name, "heldout_splits": list(o.splits), "n_heldout": len(held_rows), "n_train": len(train_rows),
                 "heldout_ages": [r["age"] for r in held_rows], "heldout_sexes": [r["sex"] for r in held_rows]},
        "options": asdict(o), "hardware": hw,
        "seconds": {"generation": round(t_gen, 1), "total": round(time.time() - t0, 1)},
        **res,
    }
    matched = [int(i) for i in order if i < n]  # held-out subjects that have their own sample
    side = [matched[k] for k in np.linspace(0, len(matched) - 1, min(4, len(matched))).round().astype(int)]
    arrays = {"real": real, "samples": samples, "train": train, "train_rows": train_rows, "held_rows": held_rows,
              "side_by_side": side, "closest": int(top[0]), "closest_train": int(nn_s["index"][top[0]])}
    return results, arrays


# ----------------------------------------------------------------------------- figures and Markdown


def _slices(img: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices (mid-brain; axial just above the ventricles' centre)."""
    x, y, z = img.shape[0] // 2, img.shape[1] // 2, round(0.5625 * img.shape[2])
    return [img[:, :, z].T, img[:, y, :].T, img[x, :, :].T]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    from .io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    _plt().close(fig)


def _fig_side_by_side(res, arr, path: Path) -> dict:
    plt = _plt()
    idx = arr["side_by_side"]
    fig, axes = plt.subplots(len(idx), 6, figsize=(12, 2.3 * len(idx)), squeeze=False)
    rows = []
    for row, i in zip(axes, idx):
        r, b = arr["held_rows"][i], arr["samples"][i]
        for j, (img, who) in enumerate(((arr["real"][i], f"REAL held-out {r['age']:.0f} y {r['sex']}"),
                                        (b.image, f"GENERATED {b.condition.age:.0f} y {b.condition.sex}, seed {b.seed}"))):
            for k, (v, plane) in enumerate(zip(_slices(img), ("axial", "coronal", "sagittal"))):
                ax = row[j * 3 + k]
                ax.imshow(v, cmap="gray", origin="lower", vmin=0, vmax=1, interpolation="nearest")
                ax.set_axis_off()
                ax.set_title(f"{who}\n{plane}" if k == 0 else plane, fontsize=7)
        rows.append({"heldout_mrid": r["mrid"], "age": r["age"], "sex": r["sex"], "sample_seed": b.seed,
                     "sample_condition": b.condition.to_dict()})
    fig.suptitle(f"Left: held-out real scans (IXI dataset, CC BY-SA 3.0). Right: SYNTHETIC ({res['generator']['name']} {res['generator']['version']}), "
                 "not for clinical use", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return {"rows": rows, "slices": "axial z=0.5625*Z, coronal y=Y/2, sagittal x=X/2 (voxel indices)"}


def _fig_realism(res, path: Path) -> dict:
    plt = _plt()
    d, c = res["distances"], res["c2st"]
    t = res.get("distances_texture")
    fig, axes = plt.subplots(1, 4 if t else 3, figsize=(17 if t else 13, 3.8))
    a1, a2, a3 = axes[:3]
    labels = ["samples vs\nheld-out", "real train vs\nheld-out (yardstick)"]
    y = d["yardstick"]
    a1.bar(labels, [d["samples"]["fid"], y["fid"]], color=["C3", "C0"],
           yerr=[[0, y["fid"] - y["fid_range"][0]], [0, y["fid_range"][1] - y["fid"]]], capsize=4)
    a1.set_ylabel("Fréchet distance (lower = closer)")
    a1.set_title("FID on the feature network")
    a2.bar(labels, [d["samples"]["kid"]["mean"], y["kid"]], color=["C3", "C0"],
           yerr=[[d["samples"]["kid"]["std"], y["kid"] - y["kid_range"][0]], [d["samples"]["kid"]["std"], y["kid_range"][1] - y["kid"]]], capsize=4)
    a2.set_title("KID (bars: std over subsets / range over draws)")
    a2.set_ylabel("kernel distance (lower = closer)")
    names = [("cnn", "3D CNN\nsamples"), ("logistic_features", "features\nsamples"),
             ("logistic_random_conv", "rand. conv\nsamples"), ("yardstick_logistic_features", "features\nreal train"),
             ("yardstick_logistic_random_conv", "rand. conv\nreal train")]
    acc = [c[k]["accuracy"] for k, _ in names]
    lo = [c[k]["accuracy"] - c[k]["ci95"][0] for k, _ in names]
    hi = [c[k]["ci95"][1] - c[k]["accuracy"] for k, _ in names]
    a3.bar([t for _, t in names], acc, yerr=[lo, hi], capsize=4, color=["C3", "C3", "C3", "C0", "C0"])
    a3.axhline(0.5, ls="--", color="k", lw=1)
    a3.text(4.4, 0.51, "chance", ha="right", fontsize=8)
    a3.set_ylim(0, 1.05)
    a3.set_ylabel("out-of-fold accuracy (95 % CI)")
    a3.set_title("Classifier two-sample tests")
    a3.set_xlabel("held-out real against ...", fontsize=8)
    a3.tick_params(axis="x", labelsize=7)
    for ax, vals in ((a1, [d["samples"]["fid"], y["fid"]]), (a2, [d["samples"]["kid"]["mean"], y["kid"]]), (a3, acc)):
        for i, v in enumerate(vals):
            ax.annotate(f"{v:.3g}", (i, v), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    out_t = {}
    if t:
        a4, yt = axes[3], t["yardstick"]
        fs = (res.get("first_stage") or {}).get("texture_fd")
        bars = [("samples vs\nheld-out", t["samples"]["fid"], "C3"), ("real train vs\nheld-out (yardstick)", yt["fid"], "C0")]
        if fs is not None:
            bars.insert(1, ("reconstructions\nvs held-out", fs, "C1"))
        a4.bar([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
        a4.errorbar(len(bars) - 1, yt["fid"], yerr=[[yt["fid"] - yt["fid_range"][0]], [yt["fid_range"][1] - yt["fid"]]],
                    color="k", capsize=4)
        for i, (_, v, _) in enumerate(bars):
            a4.annotate(f"{v:.3g}", (i, v), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
        a4.set_title("Texture Fréchet distance (2-4 mm)")
        a4.set_ylabel("Fréchet distance (lower = closer)")
        a4.tick_params(axis="x", labelsize=7)
        out_t = {"texture_fd": {"samples": t["samples"]["fid"], "first_stage": fs, "yardstick": yt["fid"],
                                "yardstick_range": yt["fid_range"]}}
    fig.suptitle("Realism of SYNTHETIC brains against held-out real scans (not for clinical use)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return {**out_t, "fid": {"samples": d["samples"]["fid"], "yardstick": y["fid"], "yardstick_range": y["fid_range"]},
            "kid": {"samples": d["samples"]["kid"], "yardstick": y["kid"], "yardstick_range": y["kid_range"]},
            "c2st": {k: {"accuracy": c[k]["accuracy"], "ci95": c[k]["ci95"]} for k, _ in names}}


def _fig_brain_age(res, path: Path) -> dict:
    plt = _plt()
    d = res["brain_age"]["data"]
    fig, ax = plt.subplots(figsize=(5, 4.6))
    ax.scatter(d["true_heldout"], d["predicted_heldout"], s=18, label=f"held-out real (MAE {res['brain_age']['heldout_real']['mae']:.1f} y)")
    ax.scatter(d["requested"], d["predicted_samples"], s=18, marker="x", color="C3",
               label=f"SYNTHETIC (MAE {res['brain_age']['samples']['mae']:.1f} y, r {res['brain_age']['samples']['r']:.2f})")
    lim = [15, 90]
    ax.plot(lim, lim, "k--", lw=1)
    ax.set_xlabel("requested / true age (years)")
    ax.set_ylabel("brain age predicted by the feature network (years)")
    ax.legend(fontsize=8)
    ax.set_title("Brain age", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return d


def _fig_volumes(res, path: Path) -> dict:
    plt = _plt()
    v = res.get("volumes")
    keys = v["structures"] if v else []
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4.2 * max(len(keys), 1), 4), squeeze=False)
    if not v:
        axes[0, 0].text(0.5, 0.5, "volume study skipped (no segmenter)", ha="center")
        axes[0, 0].set_axis_off()
    for ax, k in zip(axes[0], keys):
        d = v["data"]
        ax.scatter(np.array(d["real_table"][k]) * 100, np.array(d["real_measured"][k]) * 100, s=14, label="held-out real: table vs segmenter")
        ax.scatter(np.array(d["requested"][k]) * 100, np.array(d["measured"][k]) * 100, s=14, marker="x", color="C3",
                   label="SYNTHETIC: requested vs measured")
        allv = np.array(d["requested"][k] + d["measured"][k] + d["real_table"][k] + d["real_measured"][k]) * 100
        lim = [allv.min() * 0.95, allv.max() * 1.05]
        ax.plot(lim, lim, "k--", lw=1)
        s = v["samples"][k]
        ax.set_title(f"{k}: r {s['pearson_r']:.2f}, median bias {100 * s['median_bias']:+.0f} %", fontsize=9)
        ax.set_xlabel("requested / table (% of ICV)")
        ax.set_ylabel("measured by the segmenter (% of ICV)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return v["data"] if v else {}


def _fig_diversity(res, path: Path) -> dict:
    plt = _plt()
    d = res["diversity"]
    fig, ax = plt.subplots(figsize=(5, 4))
    data = [d["data"]["samples"], d["data"]["real"]]
    ax.boxplot([x if x else [np.nan] for x in data], showmeans=True)
    for i, x in enumerate(data):
        ax.scatter(np.full(len(x), i + 1) + np.random.default_rng(i).uniform(-0.08, 0.08, len(x)), x, s=10, alpha=0.6)
    ax.set_xticks([1, 2], [f"SYNTHETIC, one condition\n({d['n_sample_pairs']} pairs)",
                           f"real, same sex, age within {d['real_pairs_max_age_gap']:g} y\n({d['n_real_pairs']} pairs)"], fontsize=8)
    ax.set_ylabel("MS-SSIM (higher = more alike)")
    ax.set_title("Diversity", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return d["data"]


def _fig_privacy(res, path: Path) -> dict:
    plt = _plt()
    d = res["privacy"]["data"]
    margin = "samples_margin" in d  # the statistic the rule judges
    s, h = (d["samples_margin"], d["heldout_margin"]) if margin else (d["samples"], d["heldout"])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    bins = np.linspace(min(s + h) - 0.01, max(s + h) + 0.01, 20)
    ax.hist(h, bins=bins, alpha=0.6, label="held-out real (new people)")
    ax.hist(s, bins=bins, alpha=0.6, color="C3", label="SYNTHETIC samples")
    rule = res["privacy"].get("rule")
    if rule:
        ax.axvline(rule["near_copy_threshold"], color="k", ls="--", lw=1, label="near-copy threshold")
    ax.set_xlabel("margin: highest minus mean correlation with the training subjects" if margin
                  else "highest correlation with any training subject (in the brain)")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    ax.set_title("Privacy: samples must not sit closer to training than new people", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return d


def _fig_closest(res, arr, path: Path) -> dict:
    plt = _plt()
    b, t = arr["samples"][arr["closest"]], arr["train"][arr["closest_train"]]
    row = arr["train_rows"][arr["closest_train"]]
    fig, axes = plt.subplots(2, 3, figsize=(7.5, 5.2))
    for r, (img, who) in enumerate(((b.image, f"SYNTHETIC {b.condition.age:.0f} y {b.condition.sex}, seed {b.seed}"),
                                    (t, f"closest training subject {row['age']:.0f} y {row['sex']} ({IXI_CREDIT})"))):
        for k, v in enumerate(_slices(img)):
            axes[r, k].imshow(v, cmap="gray", origin="lower", vmin=0, vmax=1, interpolation="nearest")
            axes[r, k].set_axis_off()
        axes[r, 0].set_title(who, fontsize=8, loc="left")
    fig.suptitle(f"Closest pair: r = {res['privacy']['closest_pairs'][0]['r']:.3f} in the brain - not for clinical use", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return res["privacy"]["closest_pairs"][0]


def _first_stage_volume(vol: dict, key: str) -> str:
    r = vol.get("segmenter_on_first_stage", {}).get(key)
    return f"; on first-stage reconstructions: {r['pearson_r']:.2f} / {_pct(r['median_rel_error'])}" if r else ""


def _privacy_verdict(pv: dict) -> str:
    """'pass' or 'FAIL' with the rule's three findings (reports before the calibrated rule: the old count)."""
    rule = pv.get("rule")
    if rule is None:
        return f"{'pass' if pv['pass'] else 'FAIL'}: {pv['samples_margin_above_heldout_max']} samples stand out more than any new person"
    copies = ", ".join(str(i) for i in rule["near_copies"]) or "none"
    return (f"{'pass' if pv['pass'] else 'FAIL'}: near-copies {copies}; {rule['above_heldout_max']} above every new person "
            f"(chance p = {rule['exceedance_p']:.2g}); shift p = {rule['shift_p']:.2g}")


def _texture_note(c: dict) -> str:
    """A sentence when the texture bank tells samples apart but the feature network does not."""
    tex, feat = c["logistic_random_conv"]["accuracy"], c["logistic_features"]["accuracy"]
    if tex >= 0.9 and feat < 0.7:
        return (f" Here the random-convolution bank tells the samples apart ({_pct(tex)}) while the feature network's "
                f"features barely do ({_pct(feat)}): the difference lies in detail below the feature network's 4 mm "
                "input, which FID and KID on its features cannot see. Read FID/KID together with the two-sample tests.")
    return ""


def _repeats(cnn: dict) -> str:
    n = len(cnn.get("repeat_accuracy") or [])
    return f" x {n} repeats" if n > 1 else ""


def _c2st_spread(cnn: dict) -> str:
    """The CNN test's folds, or with repeated cross-validation each repeat's accuracy (how far one run swings)."""
    reps = cnn.get("repeat_accuracy") or []
    if len(reps) > 1:
        committee = cnn.get("committee_accuracy")
        return (f"the mean of {len(reps)} repeats of the cross-validation (new folds, initialisations and batches), "
                f"which scored {', '.join(_pct(a) for a in reps)}: one run of the test swings this much; the interval is "
                f"one run's" + (f"; a committee of the repeats' classifiers (scores averaged) scores {_pct(committee)}"
                                if committee is not None else ""))
    return f"folds {', '.join(_pct(f) for f in cnn['fold_accuracy'])}"


def _collapse_note(cnn: dict) -> str:
    """What the CNN test did about folds whose classifier collapsed in training."""
    folds = cnn.get("retrained_folds") or []
    if not folds:
        return ""
    def name(r: dict) -> str:
        return f"{r['fold'] + 1}" + (f" (repeat {r['repeat'] + 1})" if "repeat" in r else "")

    again = [name(r) for r in folds if r["trainings"] > 1 and not r["collapsed"]]
    stuck = [name(r) for r in folds if r["collapsed"]]
    text = ""
    if again:
        text += (f" The classifier of fold{'s' if len(again) > 1 else ''} {', '.join(map(str, again))} collapsed in training "
                 "(one output for every image, which scores 50 % held out) and was trained again at a lower learning rate.")
    if stuck:
        text += (f" **Fold{'s' if len(stuck) > 1 else ''} {', '.join(map(str, stuck))} still collapsed after every retry: "
                 "the accuracy above is a lower bound.**")
    return text


def _first_stage_rows(res: dict) -> list[str]:
    fs = res.get("first_stage")
    if not fs:
        return []
    return [f"| first-stage ceiling: two-sample accuracy on its reconstructions of the held-out scans, CNN / texture bank | "
            f"{_pct(fs['cnn']['accuracy'])} / {_pct(fs['logistic_random_conv']['accuracy'])} | 50 % | "
            f"the best a sample can do with this decoder{' and its refiner' if fs.get('refiner') else ''} "
            f"(PSNR {fs['psnr_mean']:.1f} dB, SSIM {fs['ssim_mean']:.3f}) |"]


def _texture_distance_rows(res: dict) -> list[str]:
    t = res.get("distances_texture")
    if not t:  # reports written before the texture distances
        return []
    y, fs = t["yardstick"], res.get("first_stage") or {}
    ceiling = f"; the first stage's reconstructions: {fs['texture_fd']:.3g}" if "texture_fd" in fs else ""
    return [f"| texture FD (Fréchet distance on the random-conv bank, standardised) | **{t['samples']['fid']:.3g}** | "
            f"{y['fid']:.3g} (range {y['fid_range'][0]:.3g}-{y['fid_range'][1]:.3g}) | {t['fid_ratio']:.1f}x the yardstick{ceiling} |",
            f"| texture KID | {t['samples']['kid']['mean']:.3g} ± {t['samples']['kid']['std']:.2g} | {y['kid']:.3g} | |"]


def _texture_distance_text(res: dict) -> list[str]:
    if not res.get("distances_texture"):
        return []
    return ["**Texture distances.** The feature network's input is pooled to 4 mm, so FID and KID on its features are "
            "nearly blind to the 2 mm detail that tells a scan from a rendering (its logistic two-sample test is close to "
            "chance where the classifiers are not). The same Fréchet and kernel distances, with the same yardstick draws, "
            "are therefore also computed on the fixed random-convolution bank (64 texture statistics at 2 and 4 mm, each "
            "standardised by the held-out real scans' mean and SD; nothing trained). Read this pair with the classifier tests; "
            "FID on the feature network alone would call a blurred brain real.", ""]


def _first_stage_text(res: dict) -> list[str]:
    fs = res.get("first_stage")
    if not fs:
        return []
    cnn, tex = fs["cnn"]["accuracy"], fs["logistic_random_conv"]["accuracy"]
    text = (f"**First-stage ceiling.** The same tests on the first stage's reconstructions of the {fs['cnn']['n_per_class']} "
            "held-out scans (each scan encoded, decoded and background-zeroed as a generated brain is) against the scans "
            f"themselves: CNN {_pct(cnn)}, texture bank {_pct(tex)}; reconstruction inside the brain {fs['psnr_mean']:.2f} dB, "
            f"SSIM {fs['ssim_mean']:.3f}. A sample is this decoder's rendering of a sampled latent; the reconstructions are its "
            "rendering of the best latents there are (the real scans' own), so they mark what the samples can be expected "
            "to reach at best, however good the prior.")
    if cnn >= 0.9:
        text += (" Here even the reconstructions are told apart: the realism of the samples is capped by the first stage "
                 "(the decoder's texture), not only by the prior.")
    return [text, ""]


def _pose_rows(res: dict) -> list[str]:
    if "pose" not in res:  # reports written before the twelfth session of 2026-12-01
        return []
    s, r = res["pose"]["samples"], res["pose"]["heldout_real"]
    sd = lambda p: " / ".join(f"{v:.2f}" for v in p["centre_sd_mm"])  # noqa: E731
    return [f"| pose: SD of the brains' centres x / y / z (mm); Dice with the held-out majority mask, mean (min) | "
            f"{sd(s)} mm; {s['dice_mean']:.3f} ({s['dice_min']:.3f}) | {sd(r)} mm; {r['dice_mean']:.3f} ({r['dice_min']:.3f}) "
            "(held-out real) | a check: registered scans barely move; larger = brains drawn off the template |"]


def _target_rows(res: dict) -> list[str]:
    return ["## Against the targets", "",
            "The project's realism targets (`synthbrain compare-reports` puts several reports side by side the same way):",
            "", *markdown_table([res], ["this model"], notes=False).splitlines(),
            *(["", "(*) brains warped to their requested volumes: the segmenter the warp steers by measures them, so "
                   "these figures are the warp's precision, not the model's."] if res["generator"].get("volume_matching") else []),
            ""]


def _markdown(res: dict) -> str:
    g, d, c, a, dv, pv, tx = (res["generator"], res["distances"], res["c2st"], res["brain_age"], res["diversity"],
                              res["privacy"], res["texture"])
    y = d["yardstick"]
    cnn = c["cnn"]
    steps = f" {g['steps']} steps" if g.get("steps") else ""  # an autoregressive model has no sampling steps
    L = [f"# Evaluation of {g['name']} {g['version']} against held-out real scans", "",
         f"> {SYNTHETIC_NOTICE}. Real scans: IXI dataset, CC BY-SA 3.0.", "",
         f"`synthbrain evaluate`, {res['date']}, SynthBrain {res['synth_version']}: {d['n_samples']} generated brains "
         f"(the ages and sexes of the {res['data']['n_heldout']} held-out subjects, {'+'.join(res['data']['heldout_splits'])}; "
         f"{g['sampler']}{steps}, guidance {g['guidance_scale']}, {g['precision']}, {g['device']}"
         f"{'; refiner applied' if g.get('refiner') else '; refiner left out' if g.get('refiner') is False else ''}"
         f"{'; then warped to the requested ventricle and hippocampus volumes (synth.anatomy.match_volumes)' if g.get('volume_matching') else ''}) against those "
         f"subjects; {res['data']['n_train']} training subjects for the yardsticks and privacy. "
         f"{res['seconds']['total'] / 60:.1f} minutes on {res['hardware'].get('cpu', '?')} ({res['hardware'].get('cores', '?')} cores).", "",
         "## Headline", "",
         "| measure | generated | real yardstick | reads |", "| --- | --- | --- | --- |",
         f"| classifier two-sample accuracy, 3D CNN ({cnn['folds']}-fold{_repeats(cnn)}) | **{_pct(cnn['accuracy'])}** "
         f"(95 % CI {_pct(cnn['ci95'][0])}-{_pct(cnn['ci95'][1])}) | 50 % | 50 % = indistinguishable, 100 % = always told apart |",
         *_first_stage_rows(res),
         f"| classifier two-sample accuracy, logistic on features | {_pct(c['logistic_features']['accuracy'])} | "
         f"{_pct(c['yardstick_logistic_features']['accuracy'])} (train vs held-out) | second opinion |",
         f"| classifier two-sample accuracy, logistic on random-conv bank | {_pct(c['logistic_random_conv']['accuracy'])} | "
         f"{_pct(c['yardstick_logistic_random_conv']['accuracy'])} (train vs held-out) | second opinion (texture) |",
         f"| FID (feature network) | **{d['samples']['fid']:.3g}** | {y['fid']:.3g} (range {y['fid_range'][0]:.3g}-{y['fid_range'][1]:.3g}) | "
         f"{d['fid_ratio']:.1f}x the yardstick |",
         f"| KID (mean ± std over {d['samples']['kid']['subsets']} subsets of {d['samples']['kid']['subset_size']}) | "
         f"**{d['samples']['kid']['mean']:.3g} ± {d['samples']['kid']['std']:.2g}** | {y['kid']:.3g} | unbiased: ~0 for one distribution |",
         *_texture_distance_rows(res),
         f"| brain age of samples vs requested: r / MAE | **{a['samples']['r']:.2f} / {a['samples']['mae']:.1f} y** | "
         f"{a['heldout_real']['r']:.2f} / {a['heldout_real']['mae']:.1f} y (regressor on held-out real) | |",
         f"| sex of samples as requested (feature network) | {_pct(res['sex']['samples_accuracy'])} | {_pct(res['sex']['heldout_accuracy'])} | |",
         f"| diversity: MS-SSIM between samples of one condition | **{dv['samples_mean']:.3f}** | {dv['real_mean']:.3f} (age-matched real pairs) | "
         f"difference {dv['difference']:+.3f}; higher = less diverse |",
         f"| privacy: median highest correlation with a training subject | **{pv['samples_median']:.3f}** (max {pv['samples_max']:.3f}) | "
         f"{pv['heldout_median']:.3f} (max {pv['heldout_max']:.3f}) held-out real | raw: {pv['samples_above_heldout_max']} samples closer "
         "than any new person |"]
    if "samples_margin_median" in pv:
        L.append(f"| privacy: median margin, nearest minus mean correlation with all training subjects | "
                 f"**{pv['samples_margin_median']:.3f}** (max {pv['samples_margin_max']:.3f}) | {pv['heldout_margin_median']:.3f} "
                 f"(max {pv['heldout_margin_max']:.3f}) held-out real | {_privacy_verdict(pv)} |")
    if "volumes" in res:
        for k, s in res["volumes"]["samples"].items():
            r = res["volumes"]["segmenter_on_heldout_real"].get(k, {})
            L.append(f"| volume {k}: r / median error / median bias | {s['pearson_r']:.2f} / {_pct(s['median_rel_error'])} / "
                     f"{100 * s['median_bias']:+.1f} % | segmenter on real: {r.get('pearson_r', float('nan')):.2f} / "
                     f"{_pct(r.get('median_rel_error', float('nan')))}{_first_stage_volume(res['volumes'], k)} | requested vs measured |")
    L += [f"| sharpness samples / real (texture statistic) | {tx['sharpness_ratio']:.2f} | 1 | not evidence of realism on its own |",
          f"| tissue contrast: intensity distance to the matched real subject | {tx['intensity_distance_samples_to_matched_real']:.3f} | "
          f"{tx['intensity_distance_real_to_real']:.3f} (real to real) | not evidence of realism on its own |",
          *([f"| isolated dots: share of brain voxels more than 0.2 from their 3x3x3 median | {100 * tx['speckle_samples']:.3f} % | "
             f"{100 * tx['speckle_real']:.3f} % (held-out real) | an artefact check (adversarial networks draw such dots) |"]
            if "speckle_samples" in tx else []),
          *_pose_rows(res), "",
          *_target_rows(res),
          "## Real beside generated", "", "![side by side](side_by_side.png)", "",
          "Held-out real subjects (left, IXI dataset, CC BY-SA 3.0) beside generated brains of the same age and sex "
          "(right), at the same axial, coronal and sagittal slices.", "",
          "## Realism", "", "![realism](realism.png)", "",
          f"**Feature network.** `{res['features']['name']}` {res['features']['version']}: a small 3D CNN (channels "
          f"{res['features']['channels']}, input average-pooled x{res['features']['pool']}, ~0.43 M parameters) trained here "
          "on the IXI training split to predict age and sex (flips, gamma, gain and shift augmentation). Pretrained medical "
          "networks (MedicalNet, MAISI, RadImageNet) cannot be fetched here, and an ImageNet network does not see 3D brains; "
          "a network trained to tell brains' ages and sexes apart must represent the anatomy that changes with them "
          "(ventricles, sulci, atrophy), so its features are brain-specific. Its penultimate layer (64 values) feeds FID and "
          "KID; its age head is the brain-age regressor. Its own held-out error: "
          + ", ".join(f"{h['split']} age MAE {h['age_mae']:.1f} y, sex accuracy {_pct(h['sex_accuracy'])}"
                      for h in (res['features'].get('held_out') or []) if h.get('n')) + ".", "",
          f"FID is biased upwards for small sets, so the yardstick uses as many real training subjects as samples "
          f"({y['what']}; mean of {y['draws']} draws; all {d['n_train']} training subjects give {y['fid_all_train']:.3g}). "
          "KID is unbiased.", "",
          *_texture_distance_text(res),
          f"**Classifier two-sample test.** {cnn['method']}: a fresh tiny 3D CNN (input average-pooled x2) is trained in each "
          f"fold to tell {cnn['n_per_class']} held-out real scans from {cnn['n_per_class']} samples and classifies the held-out fold. "
          f"Accuracy {_pct(cnn['accuracy'])} (95 % Clopper-Pearson {_pct(cnn['ci95'][0])}-{_pct(cnn['ci95'][1])}, "
          f"one-sided p = {cnn['p_value']:.2g}); " + _c2st_spread(cnn) + ". "
          "Second opinions: an L2 logistic regression on the feature network's features and on a fixed random-convolution "
          "bank (texture statistics at 2 and 4 mm, nothing trained), with the same folds; the same regressions on real "
          "training vs held-out real subjects show what chance looks like."
          + _texture_note(c) + _collapse_note(cnn), "",
          *_first_stage_text(res),
          "## Condition fidelity", "", "![brain age](brain_age.png)", ""]
    if "volumes" in res:
        L += ["![volumes](volumes.png)", "",
              f"Volumes measured by `{res['volumes']['segmenter']}` on the samples against the volumes the model was asked for "
              "(fractions of ICV; `synth.evaluate.volume_agreement`), beside the segmenter against the prepared table on the "
              "held-out real scans"
              + ("; and on the first stage's reconstructions of those scans, against the same table: what the segmenter can "
                 "read from this decoder's rendering of each brain's own latent, so the best a sample can be measured at" if
                 "segmenter_on_first_stage" in res["volumes"] else "") + ".", ""]
    L += ["## Diversity", "", "![diversity](diversity.png)", "",
          f"3D MS-SSIM (4 scales, MONAI) of whole volumes: {dv['n_sample_pairs']} pairs of samples that share a condition "
          f"({len(dv['conditions'])} conditions x {dv['seeds_per_condition']} seeds) against {dv['n_real_pairs']} pairs of "
          f"held-out real subjects of the same sex within {dv['real_pairs_max_age_gap']:g} years. Samples more alike than "
          "real people of the same age (higher MS-SSIM) mean too little diversity.", "",
          "## Privacy", "", "![privacy](privacy.png)", "", "![closest pair](closest_pair.png)", "",
          f"Each image's highest Pearson correlation with any of the {d['n_train']} training subjects inside the brain "
          f"({pv['region_voxels']} voxels where the mean training image exceeds 0.2), for the samples and for the held-out real "
          "subjects (new people). In the feature network's space the median nearest-training distance is "
          f"{pv['feature_nn_distance']['samples_median']:.2f} for samples and {pv['feature_nn_distance']['heldout_median']:.2f} for "
          "held-out real."
          + (f" Raw correlations favour smooth images: the samples' median correlation with *all* training subjects is "
             f"{pv['samples_mean_r_median']:.3f} against {pv['heldout_mean_r_median']:.3f} for new people, so the test is "
             "each image's margin (nearest minus its mean correlation with all training subjects): a copy of a training "
             "subject stands out above the others, a smooth brain does not." if "samples_mean_r_median" in pv else "")
          + (f" The rule ({'pass' if pv['pass'] else 'FAIL'}) fails on {pv['rule']['what']}; each part is sized so that "
             "samples drawn like new people rarely set it off (together at most about 5 % of the time). A single sample "
             "above every new person is no evidence: with as many samples as new people that happens half the time by "
             "chance." if "rule" in pv else "")
          + " Closest pairs:", ""]
    L += [f"- sample {p['sample']} (seed {p['sample_seed']}, {p['sample_condition']['age']:g} y {p['sample_condition']['sex']}) "
          f"and training subject {p['train_mrid']}: r = {p['r']:.3f}" for p in pv["closest_pairs"]]
    L += ["", "## Texture statistics (not evidence of realism on their own)", "",
          f"Sharpness (mean gradient magnitude in the brain) of samples / real: {tx['sharpness_samples']:.4f} / "
          f"{tx['sharpness_real']:.4f} = {tx['sharpness_ratio']:.2f}. Intensity (tissue-contrast) distance of each sample to the "
          f"real subject of its age and sex: {tx['intensity_distance_samples_to_matched_real']:.4f}; real to real: "
          f"{tx['intensity_distance_real_to_real']:.4f}. A blotchy texture can score well on both; the tests above cannot be "
          "matched that way.", "",
          "## Files", "", "`report.json` holds every number above, the data behind every figure (`figures`), the options, "
          "the hardware and the provenance of the generated brains. No volumes are written.", ""]
    return "\n".join(L)


def write_report(results: dict[str, Any], arrays: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``report.md``, the PNGs of :data:`FIGURES` and ``report.json`` (every figure's data) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    makers = {"side_by_side": lambda p: _fig_side_by_side(results, arrays, p), "realism": lambda p: _fig_realism(results, p),
              "brain_age": lambda p: _fig_brain_age(results, p), "volumes": lambda p: _fig_volumes(results, p),
              "diversity": lambda p: _fig_diversity(results, p), "privacy": lambda p: _fig_privacy(results, p),
              "closest_pair": lambda p: _fig_closest(results, arrays, p)}
    figs = {}
    for name, make in makers.items():
        figs[name] = {"png": f"{name}.png", "shows": FIGURES[name], "data": make(out / f"{name}.png")}
    results = {**results, "figures": figs}
    from .io import atomic_path

    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(_markdown(results))
    write_json(out / "report.json", results)
    return out / "report.md"
