"""Realism measures that a blotchy texture cannot fool: distribution-level tests of generated brains.

Texture statistics (gradient sharpness, band-mean correlation) can be matched by the wrong texture
(issue 11). These measures compare the *distribution* of generated brains with held-out real scans:

* :class:`FeatureNet`, a small 3D CNN trained here on the IXI training split to predict age
  (regression) and sex (classification); its penultimate layer (global average of the last
  convolution, 64 values) is the feature space of the Fréchet and kernel distances
  (:func:`frechet_distance`, :func:`kernel_distance`; Heusel et al. 2017, Bińkowski et al. 2018),
  and its age head is the brain-age regressor (:func:`brain_age`). Pretrained medical feature
  networks (MedicalNet, MAISI, RadImageNet) cannot be fetched here; a network trained on brains of
  this grid sees what differs between brains (anatomy that changes with age and sex).
* :func:`c2st`, a classifier two-sample test (Lopez-Paz & Oquab 2017): a tiny 3D CNN trained to
  tell real scans from samples, k-fold cross-validated; its out-of-fold accuracy (50 % =
  indistinguishable) with a Clopper-Pearson interval. :func:`c2st_logistic` gives second opinions
  from a logistic regression on fixed features (the feature network's, or a random-convolution
  bank's: :func:`random_conv_features`).
* :func:`ms_ssim_pairs` (diversity: MS-SSIM between pairs, Wang et al. 2003, MONAI's 3D metric at
  4 scales) and :func:`nearest_training` (privacy: each image's most correlated training subject).

Everything takes (X, Y, Z) float arrays in [0, 1] on one grid and runs on CPU in seconds to minutes.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .io import SYNTHETIC_NOTICE, atomic_path, read_json, sha256_file, verify_weights, write_json

__all__ = [
    "FEATURES_MODEL",
    "FeatureNet",
    "FeatureModel",
    "FeatureTrainConfig",
    "train_features",
    "export_features",
    "load_features",
    "frechet_distance",
    "kernel_distance",
    "C2STResult",
    "c2st",
    "c2st_logistic",
    "random_conv_features",
    "speckle_fraction",
    "pose_spread",
    "brain_age",
    "ms_ssim_pairs",
    "nearest_training",
    "privacy_summary",
    "exceedance_p",
]

FEATURES_MODEL = "synthbrain-features-2mm"
AGE_CENTRE, AGE_SCALE = 50.0, 20.0  # the age head predicts (age - 50) / 20
Log = Callable[[str], None]


def _as_batch(images: Sequence[np.ndarray]) -> torch.Tensor:
    """A list of (X, Y, Z) volumes -> a (N, 1, X, Y, Z) float32 tensor (all shapes must agree)."""
    shapes = {np.shape(x) for x in images}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"expected (X, Y, Z) volumes of one shape, got shapes {sorted(shapes)}")
    return torch.from_numpy(np.stack([np.asarray(x, np.float32) for x in images]))[:, None]


def _conv(cin: int, cout: int, stride: int, norm: str = "batch") -> nn.Sequential:
    """3^3 convolution, BatchNorm (``batch``) or GroupNorm with 4 groups (``group``), LeakyReLU.

    The feature network uses BatchNorm: registered brains are so alike that a per-image norm
    leaves features that barely differ between subjects (measured: a GroupNorm net's age
    predictions stayed constant, std 0.002 of the target's, while the BatchNorm one learns); in
    eval mode the running statistics of the real training scans are used, so features are
    deterministic. The two-sample classifier uses GroupNorm: trained on balanced batches, a
    BatchNorm net learns to compare within the batch and falls to chance in eval mode (measured).
    """
    nrm = nn.BatchNorm3d(cout) if norm == "batch" else nn.GroupNorm(4, cout)
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nrm, nn.LeakyReLU(0.1))


class FeatureNet(nn.Module):
    """A small 3D CNN with an age head and a sex head on a shared feature vector.

    The input is first average-pooled by ``pool`` (2: 80x96x80 -> 40x48x40, 4 mm voxels, what a
    2-core CPU trains in minutes). Level 0 is one stride-2 convolution; each later level halves
    the grid and adds a second convolution. Global average pooling of the last level gives the
    feature vector (``channels[-1]`` values).

    Args:
        channels: Channels per level, e.g. (16, 32, 64, 64): 40x48x40 -> 3x3x3 before pooling.
        in_channels: Input channels (1: a T1 volume in [0, 1]).
        pool: Average-pooling factor of the input (1 = full resolution).

    Example:
        >>> net = FeatureNet((8, 8))
        >>> age, sex_logit, feats = net(torch.zeros(2, 1, 16, 16, 16))
        >>> feats.shape
        torch.Size([2, 8])
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 64), in_channels: int = 1, pool: int = 2):
        super().__init__()
        if int(pool) < 1:
            raise ValueError(f"`pool` must be a positive integer, got {pool}")
        self.pool = int(pool)
        if not channels or any(int(c) < 1 for c in channels):
            raise ValueError(f"`channels` must be positive, got {list(channels)}")
        layers, prev = [_conv(in_channels, channels[0], 2)], channels[0]
        for c in channels[1:]:
            layers += [_conv(prev, c, 2), _conv(c, c, 1)]
            prev = c
        self.body = nn.Sequential(*layers)
        self.age = nn.Linear(prev, 1)
        self.sex = nn.Linear(prev, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, X, Y, Z) -> (N, channels[-1]) penultimate-layer features."""
        if self.pool > 1:
            x = nn.functional.avg_pool3d(x, self.pool, ceil_mode=True)
        return self.body(x).mean(dim=(2, 3, 4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.age(f)[:, 0], self.sex(f)[:, 0], f


@dataclass
class FeatureModel:
    """A trained :class:`FeatureNet` with what it was trained on (``config``)."""

    net: FeatureNet
    config: dict[str, Any]
    source: str = ""

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.config["input_shape"])

    def check_shape(self, shape: Sequence[int], what: str = "images") -> None:
        if tuple(shape) != self.input_shape:
            raise ValueError(f"the feature network {self.config.get('name', '?')} was trained on {self.input_shape} volumes; "
                             f"{what} are {tuple(shape)}: train one for this grid (scripts/train_features.py)")

    @torch.no_grad()
    def predict(self, images: Sequence[np.ndarray], batch_size: int = 4) -> dict[str, np.ndarray]:
        """Features (N, D), predicted age in years (N,) and probability of male sex (N,)."""
        self.net.eval()
        feats, ages, males = [], [], []
        for i in range(0, len(images), batch_size):
            x = _as_batch(images[i:i + batch_size])
            self.check_shape(x.shape[2:])
            a, s, f = self.net(x)
            feats.append(f.numpy())
            ages.append(a.numpy() * AGE_SCALE + AGE_CENTRE)
            males.append(torch.sigmoid(s).numpy())
        if not feats:
            raise ValueError("no images given")
        return {"features": np.concatenate(feats).astype(np.float64), "age": np.concatenate(ages).astype(np.float64),
                "p_male": np.concatenate(males).astype(np.float64)}


# ----------------------------------------------------------------------------- training


@dataclass
class FeatureTrainConfig:
    """Training of the feature network on a prepared split (resumable from ``run_dir/last.pt``).

    Args:
        data_dir: Prepared data folder (``synthbrain prepare``).
        run_dir: Checkpoints (``last.pt``), ``losses.csv`` and ``metrics.json``.
        steps: Optimiser steps (batches of ``batch_size`` training subjects).
        lr: AdamW learning rate (cosine to ``lr / 20``).
        sex_weight: Weight of the sex cross-entropy beside the age regression (squared error of
            (age - 50) / 20).
        max_minutes: Stop with a checkpoint after this long (resume later).
        stop_at: Stop with a checkpoint at this step, as an interruption would (resume later).
    """

    data_dir: str
    run_dir: str
    steps: int = 1200
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    sex_weight: float = 0.5
    channels: tuple[int, ...] = (16, 32, 64, 64)
    pool: int = 2
    seed: int = 0
    checkpoint_every: int = 100
    max_minutes: float | None = None
    stop_at: int | None = None
    threads: int | None = None
    split: str = "train"
    extra: dict[str, Any] = field(default_factory=dict)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Left-right flip (p 0.5), gamma exp(U(-0.25, 0.25)), gain U(0.9, 1.1), shift of up to 3 voxels."""
    out = []
    for v in x:
        if torch.rand((), generator=g) < 0.5:
            v = v.flip(1)  # RAS axis 0 is left-right
        gamma = math.exp(float(torch.empty(()).uniform_(-0.25, 0.25, generator=g)))
        gain = float(torch.empty(()).uniform_(0.9, 1.1, generator=g))
        v = (v.clamp(0, 1) ** gamma * gain).clamp(0, 1)
        shifts = [int(s) for s in torch.randint(-3, 4, (3,), generator=g)]
        out.append(torch.roll(v, shifts, dims=(1, 2, 3)))  # background is zero: a roll is a shift
    return torch.stack(out)


def _labelled(data, split: str):
    rows = data.subset(split, labelled=True)
    if not rows:
        raise ValueError(f"no subjects with age and sex in split {split!r} of {data.root}")
    return rows


def _evaluate_split(model: FeatureModel, data, split: str) -> dict[str, Any]:
    rows = data.subset(split, labelled=True)
    if not rows:
        return {"split": split, "n": 0}
    pred = model.predict([data.t1(r) for r in rows])
    ages = np.array([r["age"] for r in rows])
    male = np.array([r["sex"] == "M" for r in rows])
    return {"split": split, "n": len(rows), "age_mae": float(np.mean(np.abs(pred["age"] - ages))),
            "age_r": float(np.corrcoef(pred["age"], ages)[0, 1]) if len(rows) > 1 else float("nan"),
            "sex_accuracy": float(np.mean((pred["p_male"] > 0.5) == male))}


def train_features(cfg: FeatureTrainConfig, log: Log = print) -> dict[str, Any]:
    """Train (or resume) :class:`FeatureNet` on ``cfg.split`` of the prepared data.

    Returns the final state summary: ``step``, ``minutes`` (all sessions), and held-out ``metrics``
    (age MAE, r and sex accuracy on ``val`` and ``test``), also written to ``run_dir/metrics.json``.
    """
    from .data.prepare import PreparedData
    from .runtime import pick_threads

    if cfg.steps < 1 or cfg.batch_size < 1 or not cfg.lr > 0:
        raise ValueError(f"steps, batch_size and lr must be positive, got {cfg.steps}, {cfg.batch_size}, {cfg.lr}")
    data = PreparedData.load(cfg.data_dir)
    rows = _labelled(data, cfg.split)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(pick_threads(cfg.threads))
    vols = torch.from_numpy(np.stack([data.t1(r) for r in rows]).astype(np.float16))[:, None]  # half the memory
    age_t = torch.tensor([(r["age"] - AGE_CENTRE) / AGE_SCALE for r in rows], dtype=torch.float32)
    sex_t = torch.tensor([float(r["sex"] == "M") for r in rows])
    torch.manual_seed(cfg.seed)  # the initial weights only; batches and augmentation use `g`
    net = FeatureNet(cfg.channels, pool=cfg.pool)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.lr / 20)
    g = torch.Generator().manual_seed(cfg.seed)
    step, minutes = 0, 0.0
    ckpt = run / "last.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        g.set_state(state["rng"])
        step, minutes = int(state["step"]), float(state["minutes"])
        log(f"resumed {ckpt} at step {step}")
    losses_path = run / "losses.csv"
    if step == 0 or not losses_path.is_file():
        losses_path.write_text("step,loss,age_loss,sex_loss,lr,seconds\n")
    else:  # drop rows logged after the checkpoint (a run killed between checkpoints)
        lines = losses_path.read_text().splitlines()
        keep = [lines[0]] + [ln for ln in lines[1:] if ln and int(ln.split(",")[0]) <= step]
        losses_path.write_text("\n".join(keep) + "\n")

    def save() -> None:
        with atomic_path(ckpt) as tmp:
            torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "rng": g.get_state(),
                        "step": step, "minutes": minutes + (time.time() - t0) / 60, "config": asdict(cfg),
                        "input_shape": list(vols.shape[2:]), "n_train": len(rows)}, tmp)

    t0 = time.time()
    net.train()
    with open(losses_path, "a") as flog:
        while step < cfg.steps:
            if cfg.max_minutes is not None and (time.time() - t0) / 60 > cfg.max_minutes:
                log(f"stopping at step {step}: --max-minutes {cfg.max_minutes} reached")
                break
            if cfg.stop_at is not None and step >= cfg.stop_at:
                break
            ts = time.time()
            idx = torch.randint(0, len(rows), (cfg.batch_size,), generator=g)
            x = _augment(vols[idx].float(), g)
            age, sex, _ = net(x)
            l_age = nn.functional.mse_loss(age, age_t[idx])
            l_sex = nn.functional.binary_cross_entropy_with_logits(sex, sex_t[idx])
            loss = l_age + cfg.sex_weight * l_sex
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            flog.write(f"{step},{loss.item():.5f},{l_age.item():.5f},{l_sex.item():.5f},{sched.get_last_lr()[0]:.3g},{time.time() - ts:.2f}\n")
            if step % 20 == 0:
                flog.flush()
                log(f"step {step}/{cfg.steps} loss {loss.item():.4f} (age {l_age.item():.4f}, sex {l_sex.item():.4f})")
            if step % cfg.checkpoint_every == 0:
                save()
    save()
    minutes += (time.time() - t0) / 60
    model = FeatureModel(net.eval(), {"input_shape": list(vols.shape[2:]), "channels": list(cfg.channels), "pool": cfg.pool})
    metrics = {"step": step, "minutes": round(minutes, 1), "n_train": len(rows),
               "held_out": [_evaluate_split(model, data, s) for s in ("val", "test")],
               "train": _evaluate_split(model, data, cfg.split)}
    write_json(run / "metrics.json", metrics)
    return metrics


def export_features(run_dir: str | Path, out: str | Path, *, name: str = FEATURES_MODEL, version: str = "1.0.0",
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``out/features.safetensors`` (fp16) and ``out/config.json`` (with its SHA-256) from a run."""
    from safetensors.torch import save_file

    state = torch.load(Path(run_dir) / "last.pt", map_location="cpu", weights_only=False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "features.safetensors") as tmp:
        save_file({k: v.half().contiguous() for k, v in state["net"].items()}, str(tmp))
    cfg = {"name": name, "version": version, "kind": "feature network (age + sex heads)",
           "channels": list(state["config"]["channels"]), "pool": int(state["config"].get("pool", 1)), "input_shape": list(state["input_shape"]),
           "input": "(1, X, Y, Z) T1 in [0, 1] on the MNI152 2 mm grid, skull-stripped",
           "outputs": {"features": f"{state['config']['channels'][-1]} values (global average of the last convolution)",
                       "age": "years", "sex": "logit of male"},
           "age_centre": AGE_CENTRE, "age_scale": AGE_SCALE, "training_steps": int(state["step"]),
           "training_minutes": round(float(state["minutes"]), 1), "n_train": int(state["n_train"]),
           "training_data": "IXI training split (CC BY-SA 3.0), prepared by `synthbrain prepare`",
           "weights_sha256": {"features.safetensors": sha256_file(out / "features.safetensors")},
           "notice": "an evaluation tool; not for clinical use", **(extra or {})}
    write_json(out / "config.json", cfg)
    return out


def load_features(name_or_path: str | Path = FEATURES_MODEL) -> FeatureModel:
    """Load a feature network by name (a folder of the models folder) or path, weights checked by hash."""
    from safetensors.torch import load_file

    from .generators import models_dir

    p = Path(name_or_path)
    if not (p / "config.json").is_file():
        p = models_dir() / str(name_or_path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"no feature network at {name_or_path} (expected a folder with config.json and features.safetensors)")
    cfg = read_json(p / "config.json")
    verify_weights(p, cfg.get("weights_sha256"))
    net = FeatureNet(cfg["channels"], pool=int(cfg.get("pool", 1)))
    net.load_state_dict({k: v.float() for k, v in load_file(str(p / "features.safetensors")).items()})
    return FeatureModel(net.eval(), cfg, source=p.name)


# ----------------------------------------------------------------------------- distances


def _features_2d(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"`{what}` must be (N >= 2, D) features, got shape {a.shape}")
    return a


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fit to two feature sets (N, D) and (M, D) (FID's formula).

    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Heusel et al. 2017, eq. 6). It is biased
    upwards for small N: compare only figures computed with the same numbers of images.
    """
    from scipy import linalg

    a, b = _features_2d(a, "a"), _features_2d(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} and {b.shape[1]}")
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(sa @ sb)
    if not np.isfinite(covmean).all():  # singular product: regularise (as pytorch-fid does)
        eps = np.eye(sa.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sa + eps) @ (sb + eps))
    return float(max(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * np.trace(np.real(covmean)), 0.0))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx, kyy, kxy = ((p @ q.T / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))  # cubic polynomial kernel
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean())


def kernel_distance(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int | None = None,
                    seed: int = 0) -> dict[str, float]:
    """Kernel distance (KID: unbiased MMD^2 with the kernel (x.y / D + 1)^3, Bińkowski et al. 2018).

    Averaged over ``subsets`` random subsets of ``subset_size`` of each set (default: half the
    smaller set's size, at most 100, so that the subsets differ and their spread means something). Features are standardised by ``b``'s mean and std first (the
    reference set), so no feature dominates by scale; apply the same reference to every
    comparison. Unbiased: near 0 (and possibly negative) for one distribution.

    Returns:
        ``{"mean", "std" (over subsets), "sem" (std / sqrt(subsets)), "subsets", "subset_size"}``.
    """
    a, b = _features_2d(a, "a"), _features_2d(b, "b")
    mu, sd = b.mean(0), b.std(0) + 1e-8
    a, b = (a - mu) / sd, (b - mu) / sd
    m = int(subset_size or max(2, min(len(a), len(b), 200) // 2))
    if not 2 <= m <= min(len(a), len(b)):
        raise ValueError(f"`subset_size` must be within 2-{min(len(a), len(b))}, got {m}")
    rng = np.random.default_rng(seed)
    vals = np.array([_mmd2_unbiased(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
                     for _ in range(subsets)])
    return {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if subsets > 1 else 0.0,
            "sem": float(vals.std(ddof=1) / math.sqrt(subsets)) if subsets > 1 else 0.0,
            "subsets": int(subsets), "subset_size": m}


# ----------------------------------------------------------------------------- classifier two-sample test


@dataclass
class C2STResult:
    """Out-of-fold accuracy of telling set A (label 0, real) from set B (label 1, samples).

    Attributes:
        accuracy: Fraction of the 2n images classified right when held out (0.5 = indistinguishable).
        ci95: Clopper-Pearson 95 % interval of the accuracy.
        p_value: One-sided binomial test of accuracy > 0.5.
        n_per_class: Images per class (the sets are balanced to the smaller one).
        fold_accuracy: Accuracy of each fold.
        scores: Out-of-fold probability of "sample" per image, in the order A then B.
        method: What classified.
        retrained_folds: Folds whose classifier collapsed in training and was trained again
            (``fold``, ``trainings``, and whether the last one still ``collapsed``; ``repeat`` when repeated).
        repeat_accuracy: With repeated cross-validation, each repeat's accuracy (their spread is how much
            one run of the test swings); ``accuracy`` is their mean.
        committee_accuracy: With repeats, the accuracy of the averaged scores: a committee of the repeats'
            classifiers, a stronger classifier than any one (so a stricter, not a steadier, figure).
    """

    accuracy: float
    ci95: tuple[float, float]
    p_value: float
    n_per_class: int
    folds: int
    fold_accuracy: list[float]
    scores: list[float]
    method: str
    retrained_folds: list[dict[str, Any]] = field(default_factory=list)
    repeat_accuracy: list[float] = field(default_factory=list)
    committee_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    """Balanced folds: indices into the 2n images (A is 0..n-1, B is n..2n-1), each fold holding
    about n/k of each class."""
    if not 2 <= k <= n:
        raise ValueError(f"`folds` must be within 2-{n} for {n} images per class, got {k}")
    rng = np.random.default_rng(seed)
    pa, pb = rng.permutation(n), rng.permutation(n) + n
    return [np.concatenate([pa[i::k], pb[i::k]]) for i in range(k)]


def _binomial(k: int, total: int) -> tuple[float, float, float]:
    """95 % Clopper-Pearson interval and one-sided p (against 50 %) of ``k`` right out of ``total``."""
    from scipy import stats

    lo = stats.beta.ppf(0.025, k, total - k + 1) if k > 0 else 0.0
    hi = stats.beta.ppf(0.975, k + 1, total - k) if k < total else 1.0
    return float(lo), float(hi), float(stats.binomtest(k, total, 0.5, alternative="greater").pvalue)


def _summary(correct: np.ndarray, scores: np.ndarray, folds: list[np.ndarray], n: int, method: str) -> C2STResult:
    k, total = int(correct.sum()), len(correct)
    lo, hi, p = _binomial(k, total)
    return C2STResult(float(k / total), (lo, hi), p, n, len(folds),
                      [float(correct[f].mean()) for f in folds], [float(s) for s in scores], method)


class _C2STNet(nn.Module):
    """A tiny 3D CNN for the two-sample test: GroupNorm, stride-2 convolutions, global average, one logit.

    Its input is the volume and its local high-pass energy |x - up(pool2(x))| (the detail below
    4 mm: cortical ribbon, sulci, texture), both average-pooled by ``pool``; without the second
    channel a classifier of pooled volumes cannot see the texture that tells a blurred or blotchy
    brain from a real one (measured on the shipped model: 57 % with the volume alone).
    """

    def __init__(self, channels: Sequence[int] = (8, 16, 32), pool: int = 2, highpass: bool = True):
        super().__init__()
        self.pool, self.highpass = int(pool), bool(highpass)
        layers, prev = [], 2 if highpass else 1
        for c in channels:
            layers.append(_conv(prev, c, 2, norm="group"))
            prev = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(prev, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.highpass:
            low = nn.functional.avg_pool3d(x, 2, ceil_mode=True)
            up = nn.functional.interpolate(low, size=x.shape[2:], mode="trilinear", align_corners=False)
            x = torch.cat([x, (x - up).abs() * 4], 1)  # x4: the residual's scale near the volume's
        if self.pool > 1:
            x = nn.functional.avg_pool3d(x, self.pool, ceil_mode=True)
        return self.head(self.body(x).mean(dim=(2, 3, 4)))[:, 0]


def _degenerate(logits: np.ndarray) -> bool:
    """A classifier whose training collapsed: one class for every image, or (nearly) the same output for all.

    Such a net says nothing about the two sets; scored on a held-out fold it reads as chance (50 %) and
    would make any two sets look alike.
    """
    logits = np.asarray(logits, float)
    return bool(np.all(logits > 0) or np.all(logits <= 0) or logits.std() < 1e-3)


def c2st(real: Sequence[np.ndarray], samples: Sequence[np.ndarray], folds: int = 5, steps: int = 150,
         batch_size: int = 8, lr: float = 1e-3, pool: int = 2, highpass: bool = True, seed: int = 0,
         retries: int = 2, repeats: int = 1, log: Log | None = None) -> C2STResult:
    """Classifier two-sample test with a tiny 3D CNN trained from scratch in each fold.

    The sets are balanced to the smaller size n (the first n of each). In each of ``folds``
    folds a fresh :class:`_C2STNet` (full-resolution input, first convolution stride 2) is trained
    for ``steps`` balanced batches with left-right flips and shifts of up to 2 voxels, then
    classifies the held-out fold. Accuracy is over all 2n out-of-fold predictions.

    A fold whose classifier collapsed in training (:func:`_degenerate` on its own training images:
    one class for all, or a constant output) is trained again from a new initialisation at half the
    learning rate, up to ``retries`` times; the result lists such folds (``retrained_folds``). A
    collapsed net scores 50 % on its held-out fold, so without this check a failed training reads as
    "indistinguishable" (seen at lr 3e-3: two of five folds on the VQ model's samples, 79 % instead of 100 %).

    Args:
        real: Real volumes (X, Y, Z) in [0, 1] (label 0).
        samples: Generated volumes of the same shape (label 1).
        folds: Cross-validation folds (2 to n).
        steps: Optimiser steps per fold (Adam).
        lr: Adam's learning rate (halved on each retry of a collapsed fold).
        pool: Average-pooling factor of the classifier's input (2: 4 mm voxels on the 2 mm grid).
        highpass: Give the classifier the local high-pass energy as a second channel (see :class:`_C2STNet`).
        seed: Seeds the folds, the initial weights and the batches (a local ``torch.Generator``).
        retries: Further trainings of a fold whose classifier collapsed.
        repeats: Repeated cross-validation: the whole test again with seeds ``seed + 1`` ... (new folds,
            initialisations and batches). The accuracy is the mean of the repeats' accuracies: the same
            figure as one run (the expected accuracy of one such classifier), with less of the run-to-run
            swing (on 36 + 36 brains about 10 points between seeds). Its interval and p-value are the
            binomial ones of one run at that accuracy (the repeats share the images, so pooling them
            would overstate the evidence). ``scores`` are each image's out-of-fold scores averaged over
            the repeats; ``committee_accuracy`` is the accuracy of that average (a stricter figure).
    """
    if repeats < 1:
        raise ValueError(f"`repeats` must be at least 1, got {repeats}")
    n = min(len(real), len(samples))
    x = _as_batch(list(real[:n]) + list(samples[:n]))
    y = torch.cat([torch.zeros(n), torch.ones(n)])
    runs = []
    for r in range(repeats):
        if log and repeats > 1:
            log(f"  C2ST repeat {r + 1}/{repeats}")
        runs.append(_c2st_once(x, y, n, folds, steps, batch_size, lr, pool, highpass, seed + r, retries, log))
    scores = np.mean([sc for sc, _, _ in runs], axis=0)
    truth = y.numpy().astype(bool)
    what = "volume + high-pass energy" if highpass else "volume"
    result = _summary((runs[0][0] > 0.5) == truth, scores, runs[0][1], n,
                      f"3D CNN [8, 16, 32] on {what} pooled x{pool}, trained per fold ({steps} steps of {batch_size}, "
                      f"Adam {lr:g}), {folds}-fold cross-validation" + (f", mean of {repeats} repeats" if repeats > 1 else ""))
    result.fold_accuracy = [float(((sc[f] > 0.5) == truth[f]).mean()) for sc, idx, _ in runs for f in idx]
    result.retrained_folds = [{**d, "repeat": r} if repeats > 1 else d for r, (_, _, ret) in enumerate(runs) for d in ret]
    result.repeat_accuracy = [float(((sc > 0.5) == truth).mean()) for sc, _, _ in runs]
    if repeats > 1:
        result.accuracy = float(np.mean(result.repeat_accuracy))
        lo, hi, p = _binomial(int(round(result.accuracy * 2 * n)), 2 * n)
        result.ci95, result.p_value = (lo, hi), p
        result.committee_accuracy = float(((scores > 0.5) == truth).mean())
    return result


def _c2st_once(x: torch.Tensor, y: torch.Tensor, n: int, folds: int, steps: int, batch_size: int, lr: float, pool: int,
               highpass: bool, seed: int, retries: int, log: Log | None) -> tuple[np.ndarray, list[np.ndarray], list[dict]]:
    """One cross-validated run of :func:`c2st`: (out-of-fold scores, folds, retrained folds)."""
    fold_idx = _folds(n, folds, seed)
    scores = np.zeros(2 * n)
    g = torch.Generator().manual_seed(seed)
    retrained: list[dict[str, Any]] = []
    for f, test in enumerate(fold_idx):
        train = np.setdiff1d(np.arange(2 * n), test)
        tr_a, tr_b = train[train < n], train[train >= n]
        for attempt in range(retries + 1):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1000 + f + 100_003 * attempt)
                net = _C2STNet(pool=pool, highpass=highpass)
            opt = torch.optim.Adam(net.parameters(), lr=lr / 2 ** attempt)
            net.train()
            for _ in range(steps):
                half = max(batch_size // 2, 1)
                idx = torch.cat([torch.from_numpy(tr_a)[torch.randint(0, len(tr_a), (half,), generator=g)],
                                 torch.from_numpy(tr_b)[torch.randint(0, len(tr_b), (half,), generator=g)]])
                xb = x[idx]
                flip = torch.rand(len(idx), generator=g) < 0.5
                xb = torch.where(flip[:, None, None, None, None], xb.flip(2), xb)
                shifts = [int(s) for s in torch.randint(-2, 3, (3,), generator=g)]
                xb = torch.roll(xb, shifts, dims=(2, 3, 4))
                loss = nn.functional.binary_cross_entropy_with_logits(net(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                fit = torch.cat([net(x[torch.from_numpy(c)]) for c in np.array_split(train, max(len(train) // 16, 1))]).numpy()
            collapsed = _degenerate(fit)
            if not collapsed:
                break
            if log:
                log(f"  C2ST fold {f + 1}/{folds}: the classifier collapsed (one output for every training image); "
                    f"{'training again' if attempt < retries else 'no retries left'}")
        if attempt or collapsed:
            retrained.append({"fold": f, "trainings": attempt + 1, "collapsed": collapsed})
        with torch.no_grad():
            scores[test] = torch.sigmoid(net(x[torch.from_numpy(test)])).numpy()
        if log:
            log(f"  C2ST fold {f + 1}/{folds}: accuracy {((scores[test] > 0.5) == y.numpy()[test]).mean():.2f}")
    return scores, fold_idx, retrained


def c2st_logistic(real_features: np.ndarray, sample_features: np.ndarray, folds: int = 5, seed: int = 0,
                  what: str = "features") -> C2STResult:
    """The classifier two-sample test with an L2 logistic regression on fixed features (N, D)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n = min(len(real_features), len(sample_features))
    fold_idx = _folds(n, folds, seed)
    x = np.concatenate([np.asarray(real_features[:n], float), np.asarray(sample_features[:n], float)])
    y = np.r_[np.zeros(n), np.ones(n)]
    scores = np.zeros(2 * n)
    for test in fold_idx:
        train = np.setdiff1d(np.arange(2 * n), test)
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        clf.fit(x[train], y[train])
        scores[test] = clf.predict_proba(x[test])[:, 1]
    return _summary((scores > 0.5) == y.astype(bool), scores, fold_idx, n,
                    f"logistic regression (C 0.1) on {what}, {folds}-fold cross-validation")


@torch.no_grad()
def random_conv_features(images: Sequence[np.ndarray], filters: int = 16, seed: int = 0) -> np.ndarray:
    """A fixed random-convolution feature bank: (N, 4 * filters) texture statistics.

    ``filters`` zero-mean random 5^3 filters (seeded) applied at full resolution and after
    average pooling x2; for each response the mean of its absolute value and its standard
    deviation inside the brain (voxels > 0.05). Nothing is trained, so it cannot overfit the
    real scans; it sees local texture that a trained network may ignore.
    """
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(filters, 1, 5, 5, 5, generator=g)
    w = (w - w.mean(dim=(2, 3, 4), keepdim=True)) / 5 ** 1.5
    rows = []
    for img in images:
        x = _as_batch([img])
        feats = []
        for level in range(2):
            r = nn.functional.conv3d(x, w, padding=2)[0]
            m = (x[0, 0] > 0.05)
            if not m.any():
                m = torch.ones_like(m)
            v = r[:, m]
            feats += [v.abs().mean(1), v.std(1)]
            x = nn.functional.avg_pool3d(x, 2, ceil_mode=True)
        rows.append(torch.cat(feats).numpy())
    return np.stack(rows).astype(np.float64)


def speckle_fraction(image: np.ndarray, threshold: float = 0.2) -> float:
    """The share of brain voxels that stand more than ``threshold`` from the median of their 3x3x3
    neighbourhood: isolated bright or dark dots, the artefact a young adversarial network draws.

    The brain is the voxels above 0.05, eroded twice so its outline does not count. Held-out IXI 2 mm
    scans: 0.16 % at 0.2 (first 12 subjects of val + test); the decoder's images have almost none.
    """
    from scipy import ndimage

    x = np.asarray(image, np.float32)
    inside = ndimage.binary_erosion(x > 0.05, iterations=2)
    if not inside.any():
        return 0.0
    return float((np.abs(x - ndimage.median_filter(x, size=3))[inside] > threshold).mean())


def pose_spread(images: Sequence[np.ndarray], reference_mask: np.ndarray, voxel_mm: float = 2.0,
                threshold: float = 0.05) -> dict[str, Any]:
    """How much the brains' position varies: a check that generated brains sit on the template as registered
    scans do (a prior trained on moved or rotated copies draws moved brains).

    Each image's brain is the voxels above ``threshold``. Returns the SD of the brains' centres of mass along
    each axis (mm, ``voxel_mm`` per voxel), the largest distance of a centre from their mean (mm), and each
    brain's Dice overlap with ``reference_mask`` (e.g. the majority mask of held-out real scans): mean and
    minimum. Held-out IXI scans registered to MNI at 2 mm: centre SD 0.17, 0.37, 0.41 mm, Dice 0.972.
    """
    from scipy import ndimage

    ref = np.asarray(reference_mask, bool)
    if len(images) < 2:
        raise ValueError(f"pose_spread needs at least 2 images, got {len(images)}")
    centres, dice = [], []
    for x in images:
        x = np.asarray(x)
        if x.shape != ref.shape:
            raise ValueError(f"every image must have the reference mask's shape {ref.shape}, got {x.shape}")
        m = x > threshold
        if not m.any():
            raise ValueError(f"an image has no voxel above {threshold}: no brain to place")
        centres.append(np.array(ndimage.center_of_mass(m)) * voxel_mm)
        dice.append(2.0 * (m & ref).sum() / (m.sum() + ref.sum()))
    c = np.array(centres)
    return {"centre_sd_mm": c.std(0).tolist(), "centre_max_offset_mm": float(np.linalg.norm(c - c.mean(0), axis=1).max()),
            "dice_mean": float(np.mean(dice)), "dice_min": float(np.min(dice)), "n": len(images)}


# ----------------------------------------------------------------------------- condition, diversity, privacy


def brain_age(predicted: Sequence[float], reference: Sequence[float]) -> dict[str, Any]:
    """Pearson r, mean absolute error and mean signed error (predicted - reference) in years."""
    p, r = np.asarray(predicted, float), np.asarray(reference, float)
    if p.shape != r.shape or p.size == 0:
        raise ValueError(f"`predicted` and `reference` must be equal-length, non-empty, got {p.shape} and {r.shape}")
    corr = float(np.corrcoef(p, r)[0, 1]) if p.size > 1 and p.std() > 0 and r.std() > 0 else float("nan")
    return {"n": int(p.size), "r": corr, "mae": float(np.mean(np.abs(p - r))), "bias": float(np.mean(p - r))}


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363)  # Wang et al. 2003's first four scales (renormalised below)


def ms_ssim_pairs(pairs: Iterable[tuple[np.ndarray, np.ndarray]], kernel_size: int | None = None) -> list[float]:
    """3D multi-scale SSIM of each pair of (X, Y, Z) volumes in [0, 1] (whole volumes, background included).

    MONAI's ``MultiScaleSSIMMetric`` at 4 scales with a Gaussian window (sigma 1.5) of
    ``kernel_size`` (default 7, or the largest odd size MONAI accepts for smaller volumes): the 5
    scales of the original need volumes above 160 voxels a side. The weights are Wang et al.'s
    first four, scaled to sum to one. Higher = more alike (1 = identical).
    """
    from monai.metrics import MultiScaleSSIMMetric

    w = np.array(MS_SSIM_WEIGHTS)
    pairs = list(pairs)
    if not pairs:
        return []
    if kernel_size is None:  # MONAI needs min(shape) // (len(weights) - 1) ** 2 > kernel_size - 1
        kernel_size = max(1, min(7, min(np.shape(pairs[0][0])) // (len(w) - 1) ** 2))
        kernel_size -= 1 - kernel_size % 2
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=kernel_size, weights=tuple(w / w.sum()))
    out = []
    for a, b in pairs:
        x, y = _as_batch([a, b]).split(1)
        out.append(float(metric(x, y).item()))
    return out


def brain_region(train_images: Sequence[np.ndarray], threshold: float = 0.2) -> np.ndarray:
    """Voxels where the mean training image exceeds ``threshold``: the region privacy compares."""
    mean = np.mean([np.asarray(x, np.float32) for x in train_images], axis=0)
    return mean > threshold


def _standardised(images: Sequence[np.ndarray], mask: np.ndarray) -> np.ndarray:
    v = np.stack([np.asarray(x, np.float32)[mask] for x in images]).astype(np.float64)
    v -= v.mean(1, keepdims=True)
    v /= np.linalg.norm(v, axis=1, keepdims=True) + 1e-12
    return v


def nearest_training(queries: Sequence[np.ndarray], train: Sequence[np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    """Each query's most correlated training image (Pearson r over the voxels of ``mask``).

    Returns:
        ``{"r": (N,) highest correlation, "index": (N,) its training index, "all": (N, T) every r}``.
    """
    if not np.asarray(mask).any():
        raise ValueError("`mask` is empty")
    q, t = _standardised(queries, mask), _standardised(train, mask)
    r = q @ t.T
    return {"r": r.max(1), "index": r.argmax(1), "all": r}


PRIVACY_ALPHA = 0.05
COPY_ROBUST_SDS = 6.0


def exceedance_p(n_samples: int, n_heldout: int, k: int) -> float:
    """P(at least ``k`` of ``n_samples`` lie above the maximum of ``n_heldout``) when all are exchangeable.

    That happens when the top ``k`` of the pooled values are all samples:
    ``n (n - 1) ... (n - k + 1) / ((n + m) (n + m - 1) ... (n + m - k + 1))``. With 36 against 36,
    one sample above the held-out maximum has p = 0.5: as likely as not for a perfect generator.
    """
    if k <= 0:
        return 1.0
    if k > n_samples:
        return 0.0
    return float(np.prod([(n_samples - i) / (n_samples + n_heldout - i) for i in range(k)]))


def privacy_summary(sample_r: Sequence[float], heldout_r: Sequence[float], sample_all: np.ndarray | None = None,
                    heldout_all: np.ndarray | None = None, alpha: float = PRIVACY_ALPHA) -> dict[str, Any]:
    """Compare the samples' nearest-training correlations with new real people's.

    Raw nearest correlations are confounded by smoothness: a blurred brain correlates more with
    *every* training subject. With the full correlation matrices (``*_all``, (N, T)), each image's
    ``margin`` (nearest minus its mean correlation with all training subjects) is judged instead:
    a copy of a training subject stands out above the others, a smooth brain does not.

    The rule fails on any of three findings, each sized so that samples drawn like new people
    (exchangeable with the held-out subjects) set it off rarely:

    - **near-copies:** a sample more than ``COPY_ROBUST_SDS`` robust standard deviations (1.4826 x
      the median absolute deviation) of the held-out margins above their median; a copy of a
      training scan sits far beyond that, and a new person almost never does (about 1e-9 per image
      for normal margins);
    - **too many above every new person:** more samples above the held-out maximum than chance
      allows (:func:`exceedance_p` < ``alpha / 2``); one such sample in 36 is a coin toss, not a leak;
    - **a shift:** the samples' margins larger than the held-out ones as a whole (one-sided
      Mann-Whitney U, p < ``alpha / 2``).

    The two tests share ``alpha`` (Bonferroni), so the rule's false alarm rate is at most ``alpha``
    plus the near-copy term's. (Until 2026-11-30 a single sample above the held-out maximum, or a
    median above the held-out median, failed it: a rule that fails a perfect generator about half the time.)
    """
    from scipy import stats

    s, h = np.asarray(sample_r, float), np.asarray(heldout_r, float)
    if len(s) < 2 or len(h) < 2:
        raise ValueError(f"privacy needs at least 2 samples and 2 held-out subjects, got {len(s)} and {len(h)}")
    out: dict[str, Any] = {"samples_median": float(np.median(s)), "samples_max": float(s.max()),
                           "heldout_median": float(np.median(h)), "heldout_max": float(h.max()),
                           "samples_above_heldout_max": int((s > h.max()).sum())}
    ks, kh = s, h
    if sample_all is not None and heldout_all is not None:
        ms, mh = np.asarray(sample_all).mean(1), np.asarray(heldout_all).mean(1)
        ks, kh = s - ms, h - mh
        out.update({"samples_mean_r_median": float(np.median(ms)), "heldout_mean_r_median": float(np.median(mh)),
                    "samples_margin_median": float(np.median(ks)), "samples_margin_max": float(ks.max()),
                    "heldout_margin_median": float(np.median(kh)), "heldout_margin_max": float(kh.max()),
                    "samples_margin_above_heldout_max": int((ks > kh.max()).sum())})
    out["criterion"] = "margin (nearest - mean r with all training subjects)" if ks is not s else "nearest r"
    above = int((ks > kh.max()).sum())
    robust_sd = 1.4826 * float(np.median(np.abs(kh - np.median(kh))))
    robust_sd = robust_sd if robust_sd > 0 else float(kh.std()) + 1e-12
    copy_threshold = float(np.median(kh) + COPY_ROBUST_SDS * robust_sd)
    copies = [int(i) for i in np.flatnonzero(ks > copy_threshold)]
    p_exceed = exceedance_p(len(ks), len(kh), above)
    p_shift = float(stats.mannwhitneyu(ks, kh, alternative="greater").pvalue)
    out["rule"] = {"alpha": alpha, "near_copy_threshold": copy_threshold, "near_copies": copies,
                   "above_heldout_max": above, "exceedance_p": p_exceed, "shift_p": p_shift,
                   "what": (f"fail on a near-copy (above the held-out median + {COPY_ROBUST_SDS:g} robust SD), on more samples "
                            f"above the held-out maximum than chance allows (p < {alpha / 2:g}), or on a shift of the samples "
                            f"towards the training set (one-sided Mann-Whitney U, p < {alpha / 2:g})")}
    out["pass"] = bool(not copies and p_exceed >= alpha / 2 and p_shift >= alpha / 2)
    out["notice"] = SYNTHETIC_NOTICE
    return out


def read_losses(run_dir: str | Path) -> list[dict[str, float]]:
    """The rows of a feature run's ``losses.csv``."""
    with open(Path(run_dir) / "losses.csv") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
