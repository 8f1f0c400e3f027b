"""Train the refiner (:mod:`synth.models.refiner`) of a packaged model (latent diffusion or VQ-VAE).

Two kinds of cube, each step (``crop`` voxels a side, left-right flipped at random):

* **reconstructions**: the model's decoding of a training scan's latent, beside the scan. The refined
  cube must match the scan (L1 + gradient L1) and fool a MONAI ``PatchDiscriminator`` (least squares,
  Isola et al. 2017).
* **samples**: brains the model generated (its own prior and decoder, both sampling presets, at the
  ages and sexes of the training subjects, seeds from 500000 on, never the evaluation's). They have no
  target: they must fool the discriminator, and keep their coarse content (L1 between 4-voxel means
  of the refined and the unrefined cube), so the refiner adds texture and does not move anatomy.

A young adversarial refiner draws isolated bright and dark voxels no scan has (in the held-out IXI
scans 0.16 % of brain voxels stand more than 0.2 from the median of their 3x3x3 neighbourhood; in
samples refined by the first prototype 1.2 %). ``speckle_weight`` penalises, on every refined cube,
the part of each voxel's distance to its neighbourhood median beyond ``speckle_margin``.

Losses are taken on the inner cube, ``layers`` voxels in from each face, where the refiner sees no
padding; the discriminator sees the same inner cubes of real scans. A refiner with a context branch
(``refiner={"context": N}``) is given, beside each cube, the larger cube around it that its branch
sees (:func:`synth.models.refiner.context_pad` voxels more on each side, zeros beyond the volume).
Started from a refiner without the branch (``init_from``), it starts as that refiner: the branch's
output layer is zero. The weights shipped are an
exponential moving average. Runs resume from ``RUN/last.pt``; the reconstructions and samples are
computed once into the run folder (``pairs.npy``, ``samples.npy``: derived from the scans, so keep the
run folder out of any repository). ``snap_every`` keeps the average every so many steps
(``snaps/step_NNNNNN.pt``) so checkpoints can be chosen by measuring samples.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..io import atomic_path
from ..models.refiner import DEFAULT_REFINER, build_refiner, context_pad
from .autoencoder import gradient_l1
from .defaults import DEFAULT_DISCRIMINATOR, smallest_disc_crop
from .common import EMA, Checkpointer, LossLog, resume_state, rng_state

__all__ = ["RefinerTrainConfig", "train_refiner", "load_refiner_snapshot", "package_refiner", "SAMPLE_SEED0"]

SAMPLE_SEED0 = 500_000  # seeds of the training samples: far from the evaluation's (0-35, 100000+)


@dataclass
class RefinerTrainConfig:
    """What :func:`train_refiner` trains on and how.

    Args:
        data_dir: Prepared data (``synthbrain prepare``); its ``train`` split is used.
        model: The packaged model (latent diffusion or VQ-VAE + transformer) whose decoder output is
            refined (name or folder).
        run_dir: Run folder: ``last.pt``, ``losses.csv``, ``snaps/``, cached volumes.
        steps: Total steps (a resumed run continues to this).
        batch_size: Cubes of each kind per step.
        crop: Cube edge in voxels.
        lr: Adam learning rate (refiner and discriminator).
        adv_weight: Weight of the adversarial loss.
        grad_weight: Weight of the gradient L1 on reconstructions.
        samples: Generated brains to train on (0: reconstructions only).
        lowpass_weight: Weight of the samples' coarse-content L1 (4-voxel means).
        speckle_weight: Weight of :func:`speckle_excess` on every refined cube (0: off).
        speckle_margin: Distance from the neighbourhood median that is not penalised.
        refiner: ``width``, ``layers`` and ``context`` of the network.
        init_from: Start from this refiner (a run folder, a snapshot ``.pt`` or a model folder with a
            refiner), when ``run_dir`` has no checkpoint; a refiner without a context branch may start
            one with it.
        init_discriminator_from: Start the discriminator (and its optimiser) from this train-refiner run
            folder's ``last.pt``, when ``run_dir`` has no checkpoint. A trained refiner facing a fresh
            discriminator first slides back towards the blurred decoder (the L1 on reconstructions wins
            until the discriminator has learnt; seen: 500 steps undid most of 0.4.0's sharpening); one that
            has already learnt the task keeps it where it was.
        snap_every: Keep the averaged weights every N steps in ``snaps/``.
        max_minutes: Stop (with a checkpoint) after this long.
    """

    data_dir: str
    model: str
    run_dir: str
    steps: int = 20000
    batch_size: int = 4
    crop: int = 40
    lr: float = 2e-4
    adv_weight: float = 0.05
    grad_weight: float = 1.0
    samples: int = 64
    lowpass_weight: float = 1.0
    speckle_weight: float = 20.0
    speckle_margin: float = 0.2
    refiner: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_REFINER))
    discriminator: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_DISCRIMINATOR))
    ema_decay: float = 0.999
    seed: int = 0
    ckpt_every: int = 100
    snap_every: int | None = None
    max_minutes: float | None = None
    init_from: str | None = None
    init_discriminator_from: str | None = None

    def __post_init__(self) -> None:
        inner = self.crop - 2 * int(self.refiner.get("layers", DEFAULT_REFINER["layers"]))
        smallest = smallest_disc_crop(self.discriminator)
        if inner < smallest:
            raise ValueError(f"`crop` must leave an inner cube of at least {smallest} voxels for the discriminator "
                             f"(crop - 2 x layers), got crop {self.crop}")
        for name in ("adv_weight", "grad_weight", "lowpass_weight", "speckle_weight", "speckle_margin"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}")
        if self.samples < 0 or self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"`samples` must be >= 0 and `steps`, `batch_size` >= 1, got {self.samples}, "
                             f"{self.steps}, {self.batch_size}")
        if self.snap_every is not None and self.snap_every < 1:
            raise ValueError(f"`snap_every` must be at least 1, got {self.snap_every}")


def median3(x: torch.Tensor) -> torch.Tensor:
    """The median of each voxel's 3x3x3 neighbourhood, for the voxels one in from each face of (B, C, X, Y, Z) ``x``."""
    return x.unfold(2, 3, 1).unfold(3, 3, 1).unfold(4, 3, 1).flatten(-3).median(-1).values


def median_distance(x: torch.Tensor) -> torch.Tensor:
    """How far each voxel one in from the faces of ``x`` stands from its 3x3x3 median."""
    return (x[..., 1:-1, 1:-1, 1:-1] - median3(x)).abs()


def speckle_excess(x: torch.Tensor, margin: float, distance: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over voxels of how far each stands from its 3x3x3 median beyond ``margin`` (0 for smooth images);
    ``distance``: :func:`median_distance` of ``x`` when the caller has it."""
    return F.relu((median_distance(x) if distance is None else distance) - margin).mean()


def _cached_array(path: Path, make: Callable[[], np.ndarray]) -> np.ndarray:
    """``path`` (``.npy``) if it exists, else ``make()`` written there atomically; memory-mapped."""
    if not path.is_file():
        arr = make()
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arr)
    return np.load(path, mmap_mode="r")


def _training_rows(data) -> list[dict]:
    rows = data.subset("train", labelled=False)
    if not rows:
        raise ValueError(f"{data.root} has no prepared subjects in the train split")
    return rows


def _reconstructions(gen, scans: np.ndarray, progress: bool) -> np.ndarray:
    """Each scan as the generator renders it (:func:`synth.report.reconstruct`), with a progress bar."""
    from tqdm.auto import tqdm

    from ..report import reconstruct

    out = np.empty_like(scans)
    for i in tqdm(range(len(scans)), desc="reconstructions", disable=not progress, leave=False):
        out[i] = reconstruct(gen, [scans[i]])[0]
    return out


def _samples(gen, rows: list[dict], n: int, progress: bool) -> np.ndarray:
    """``n`` generated brains (unrefined) at the training subjects' ages and sexes; even seeds with the
    model's standard sampling, odd with its fast preset (when it has one)."""
    from tqdm.auto import tqdm

    from ..condition import Condition

    has_fast = isinstance(gen.config.sampling.get("fast"), dict)
    out = []
    for i in tqdm(range(n), desc="samples", disable=not progress, leave=False):
        r = rows[i % len(rows)]
        c = Condition(age=float(r["age"]), sex=str(r["sex"]))
        b = gen.generate(c, SAMPLE_SEED0 + i, fast=has_fast and i % 2 == 1, refine=False)
        out.append(b.image.astype(np.float32))
    return np.stack(out)


def _box(volume: np.ndarray, corner: tuple[int, ...], size: int) -> np.ndarray:
    """The ``size``-voxel cube of (X, Y, Z) ``volume`` from ``corner`` (which may lie outside it), zeros
    beyond the volume, as float32."""
    out = np.zeros((size,) * 3, np.float32)
    src = tuple(slice(max(a, 0), min(a + size, n)) for a, n in zip(corner, volume.shape))
    dst = tuple(slice(q.start - a, q.stop - a) for q, a in zip(src, corner))
    if all(q.stop > q.start for q in src):
        out[dst] = volume[src]
    return out


def _load_init(net: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """``weights`` into ``net``; a refiner without a context branch may start one (its weights stay as
    built: the branch's output is zero, so ``net`` starts as the refiner it came from)."""
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith("ctx") for k in missing):
        raise ValueError(f"--init-from {source}: its refiner does not fit this one (width, layers or context differ; "
                         f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")


def load_refiner_snapshot(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """``(averaged weights, refiner config, step)`` of a run folder (``last.pt``) or a snapshot ``.pt``."""
    state = _read_checkpoint(path)
    return {k: v.float() for k, v in state["ema_state_dict"].items()}, dict(state["config"]["refiner"]), int(state["step"])


def _read_checkpoint(path: str | Path) -> dict:
    p = Path(path)
    f = p / "last.pt" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"no refiner checkpoint at {path}: expected a train-refiner run folder (last.pt) "
                                "or a snapshot .pt from its snaps/")
    state = torch.load(f, map_location="cpu", weights_only=False)
    if "ema_state_dict" not in state or "refiner" not in state.get("config", {}):
        raise ValueError(f"{f} is not a refiner checkpoint written by train-refiner")
    return state


def _short(path: str | Path) -> str:
    """A run or snapshot path as a packaged model's provenance may carry it: its last two parts, never an
    absolute path of the machine it was trained on."""
    return "/".join(Path(path).parts[-2:])


def _without_absolute_paths(note: str) -> str:
    """``note`` with each absolute path cut to its last two parts (notes of runs made before
    :func:`_short`)."""
    import re

    return re.sub(r"(?<![\w.])/(?:[^\s/()]+/)*[^\s/()]+", lambda m: _short(m.group(0)), note)


def _init_weights(path: str) -> tuple[dict[str, torch.Tensor], str]:
    p = Path(path)
    if (p / "refiner.safetensors").is_file():
        from safetensors.torch import load_file

        from ..io import read_json

        cfg = read_json(p / "config.json")  # either backend's model folder
        weights = {k: v.float() for k, v in load_file(str(p / "refiner.safetensors")).items()}
        return weights, f"refiner of {cfg.get('name')} {cfg.get('version')}"
    weights, _, step = load_refiner_snapshot(p)
    return weights, f"{_short(path)} (step {step})"


def train_refiner(cfg: RefinerTrainConfig, *, progress: bool = True, device: str = "cpu") -> dict:
    """Train (or resume) a refiner; returns the final state (``ema_state_dict``, ``step``, ``config``...).

    The reconstructions and samples are computed on first use and cached in ``cfg.run_dir``.
    """
    from monai.losses import PatchAdversarialLoss
    from monai.networks.nets import PatchDiscriminator
    from tqdm.auto import tqdm

    from ..data.prepare import PreparedData
    from ..generators import load_generator

    run = Path(cfg.run_dir)
    disc_source = None  # the run whose discriminator starts this one: checked before any volume is computed
    if cfg.init_discriminator_from and not (run / "last.pt").is_file():
        disc_source = _read_checkpoint(cfg.init_discriminator_from)
        if "discriminator" not in disc_source:
            raise ValueError(f"{cfg.init_discriminator_from} holds no discriminator: expected a train-refiner run folder (last.pt)")
    run.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    data = PreparedData.load(cfg.data_dir)
    rows = _training_rows(data)
    scans = np.stack([data.t1(r) for r in rows]).astype(np.float32)
    gen = None

    def generator():
        nonlocal gen
        if gen is None:
            gen = load_generator(cfg.model, device=device)
            if getattr(gen, "backend", "") not in ("ldm", "vq"):
                raise ValueError(f"train-refiner refines a latent diffusion or VQ-VAE model's decoder; {cfg.model} "
                                 f"is a {getattr(gen, 'backend', '?')} model")
        return gen

    recon = _cached_array(run / "pairs.npy", lambda: _reconstructions(generator(), scans, progress))
    if recon.shape != scans.shape:
        raise ValueError(f"{run / 'pairs.npy'} holds {recon.shape} volumes but the data has {scans.shape}: "
                         "use a new run folder for other data")
    samples = (_cached_array(run / "samples.npy", lambda: _samples(generator(), rows, cfg.samples, progress))
               if cfg.samples else None)
    inside = (scans > 0).any(0)
    idx = np.argwhere(inside)
    lo, hi = idx.min(0), idx.max(0)

    net = build_refiner(cfg.refiner).to(dev)
    m, pad = net.layers, context_pad(net)
    disc = PatchDiscriminator(**cfg.discriminator).to(dev)
    opt = torch.optim.Adam(net.parameters(), cfg.lr, betas=(0.5, 0.9))
    d_opt = torch.optim.Adam(disc.parameters(), cfg.lr, betas=(0.5, 0.9))
    adv = PatchAdversarialLoss(criterion="least_squares")
    init_note = None
    if cfg.init_from and not (run / "last.pt").is_file():
        weights, init_note = _init_weights(cfg.init_from)
        _load_init(net, weights, cfg.init_from)
    if disc_source is not None:
        disc.load_state_dict(disc_source["discriminator"])
        d_opt.load_state_dict(disc_source["disc_optimizer"])
        init_note = (f"{init_note or 'a new refiner'}; discriminator from {_short(cfg.init_discriminator_from)} "
                     f"(step {int(disc_source['step'])})")
    ema = EMA(net, decay=cfg.ema_decay)
    ckpt = Checkpointer(run)
    start = 0
    state = ckpt.resume()
    if state is not None:
        start, rng = resume_state(state, {"state_dict": net, "ema_state_dict": ema.model, "discriminator": disc,
                                          "optimizer": opt, "disc_optimizer": d_opt}, rng, cfg.seed)
        init_note = state.get("init_from")
    c = cfg.crop

    def corner() -> tuple[int, ...]:
        # cubes that overlap the brain: corners from 8 voxels before its box to 8 before its far side
        return tuple(int(rng.integers(max(int(lo[k]) - 8, 0), max(min(int(hi[k]) - c + 8, inside.shape[k] - c), 0) + 1))
                     for k in range(3))

    def cubes(*volumes: np.ndarray, context: tuple[int, ...] = ()) -> list[torch.Tensor]:
        """``batch_size`` cubes at the same random places of each (N, X, Y, Z) array in ``volumes``; when the
        refiner has a context branch, the cubes of the arrays numbered in ``context`` are each followed by
        their context cubes (``pad`` voxels more on each side)."""
        parts = [q for k in range(len(volumes)) for q in ([(k, 0), (k, pad)] if pad and k in context else [(k, 0)])]
        out: list[list[np.ndarray]] = [[] for _ in parts]
        for _ in range(cfg.batch_size):
            i = int(rng.integers(len(volumes[0])))
            a, b, d = corner()
            flip = rng.random() < 0.5
            for j, (k, g) in enumerate(parts):
                cube = _box(volumes[k][i], (a - g, b - g, d - g), c + 2 * g)
                out[j].append(cube[::-1] if flip else cube)
        return [torch.from_numpy(np.ascontiguousarray(np.stack(o))[:, None]).to(dev) for o in out]

    def inner(x: torch.Tensor) -> torch.Tensor:
        return x[..., m:-m, m:-m, m:-m]

    log = LossLog(run / "losses.csv", ["l1", "grad", "lowpass", "speckle", "speckled", "adv", "disc"], resume_step=start)
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="refiner", disable=not progress)
    step = start
    for step in bar:
        x, *r = cubes(scans, recon, context=(1,))
        y = inner(net(*r))
        xi = inner(x)
        l1 = F.l1_loss(y, xi)
        gl = gradient_l1(y, xi)
        fakes = [y]
        lp = torch.zeros((), device=dev)
        if samples is not None:
            s, *sc = cubes(samples, context=(0,))
            ys = inner(net(s, *sc))
            lp = F.l1_loss(F.avg_pool3d(ys, 4), F.avg_pool3d(inner(s), 4))
            fakes.append(ys)
        fakes_t = torch.cat(fakes)
        dist = median_distance(fakes_t)  # once: the penalty and the logged share of dots
        sp = speckle_excess(fakes_t, cfg.speckle_margin, dist) if cfg.speckle_weight > 0 else torch.zeros((), device=dev)
        g_adv = adv(disc(fakes_t)[-1], target_is_real=True, for_discriminator=False)
        loss = l1 + cfg.grad_weight * gl + cfg.lowpass_weight * lp + cfg.speckle_weight * sp + cfg.adv_weight * g_adv
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(net, step)
        reals = [xi] + [inner(cubes(scans)[0]) for _ in fakes[1:]]  # as many real cubes as fake ones
        logits = disc(torch.cat([fakes_t.detach(), *reals]))[-1]
        fake_l, real_l = logits.split(len(fakes_t))
        d_loss = 0.5 * (adv(fake_l, target_is_real=False, for_discriminator=True)
                        + adv(real_l, target_is_real=True, for_discriminator=True))
        d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        d_opt.step()
        speckled = (dist.detach() > cfg.speckle_margin).float().mean()  # the share of refined voxels beyond it
        log.log(step + 1, l1=l1.item(), grad=gl.item(), lowpass=lp.item(), speckle=sp.item(), speckled=speckled.item(),
                adv=g_adv.item(), disc=d_loss.item())
        bar.set_postfix(l1=f"{l1.item():.4f}", adv=f"{g_adv.item():.3f}", disc=f"{d_loss.item():.3f}")
        done = step + 1
        out_of_time = cfg.max_minutes is not None and time.time() - t0 > cfg.max_minutes * 60
        if done % cfg.ckpt_every == 0 or done == cfg.steps or out_of_time:
            ckpt.save({**_state(net, ema, disc, opt, d_opt, done, cfg, init_note), "rng": rng_state(rng)})
        if cfg.snap_every and done % cfg.snap_every == 0:
            with atomic_path(run / "snaps" / f"step_{done:06d}.pt") as tmp:
                torch.save({"ema_state_dict": ema.model.state_dict(), "step": done, "config": asdict(cfg),
                            "init_from": init_note}, tmp)
        if out_of_time:
            break
    log.close()
    return _state(net, ema, disc, opt, d_opt, step + 1 if cfg.steps > start else start, cfg, init_note)


def _state(net, ema, disc, opt, d_opt, step: int, cfg: RefinerTrainConfig, init_note) -> dict:
    return {"state_dict": net.state_dict(), "ema_state_dict": ema.model.state_dict(),
            "discriminator": disc.state_dict(), "optimizer": opt.state_dict(), "disc_optimizer": d_opt.state_dict(),
            "step": step, "config": asdict(cfg), "init_from": init_note}


def package_refiner(run: str | Path, model: str | Path, out: str | Path, *, version: str | None = None,
                    default: bool = True, fast_default: bool = False) -> Path:
    """Write a model folder that is ``model`` plus the refiner of ``run`` (a run folder or a snapshot).

    ``out`` gets copies of ``model``'s files (unless it *is* that folder), ``refiner.safetensors`` (fp16)
    and a ``config.json`` whose ``refiner`` section names the network, its training steps and whether
    :meth:`~synth.pipeline.BrainGenerator.generate` applies it by default (``default``: standard sampling;
    ``fast_default``: the fast preset, off unless asked, as it costs about as much as the fast sampling); every weights file is
    hashed into ``weights_sha256``. ``version`` defaults to the model's.
    """
    import shutil

    from ..generators import models_dir
    from ..io import read_json, sha256_file
    from ..models.config import ModelConfig
    from ..vq.config import VQModelConfig
    from .package import save_weights

    src = Path(model)
    if not (src / "config.json").is_file():
        src = models_dir() / str(model)
    vq = read_json(src / "config.json").get("backend", "ldm") == "vq"
    config = (VQModelConfig if vq else ModelConfig).load(src)  # checks its weights
    state = _read_checkpoint(run)
    weights, arch, step = state["ema_state_dict"], state["config"]["refiner"], int(state["step"])
    init = _without_absolute_paths(state["init_from"]) if state.get("init_from") else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != src.resolve():
        for f in src.iterdir():
            if f.is_file() and f.name != "refiner.safetensors":
                shutil.copy2(f, out / f.name)
    save_weights(weights, out / "refiner.safetensors")
    cfg = state["config"]
    trained = (f"{step} steps of train-refiner on {cfg['crop']}-voxel cubes of the IXI training split: "
               f"reconstructions (L1 + {cfg['grad_weight']:g} x gradient L1) and {cfg['samples']} of the model's "
               f"samples ({cfg['lowpass_weight']:g} x coarse-content L1)"
               + (f", {cfg['speckle_weight']:g} x speckle penalty (margin {cfg['speckle_margin']:g})" if cfg.get("speckle_weight") else "")
               + f", {cfg['adv_weight']:g} x least-squares "
               f"PatchGAN loss; EMA weights" + (f"; started from {init}" if init else ""))
    config.refiner = {"width": int(arch["width"]), "layers": int(arch["layers"]), "context": int(arch.get("context") or 0),
                      "default": bool(default),
                      "fast_default": bool(fast_default),
                      "steps": step, "trained": trained}
    if version:
        config.version = version
    files = ["vqvae.safetensors", "transformer.safetensors"] if vq else ["autoencoder.safetensors", "unet.safetensors"]
    files.append("refiner.safetensors")
    config.weights_sha256 = {f: sha256_file(out / f) for f in files}
    config.save(out)
    return out
