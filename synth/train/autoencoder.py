"""Train the first stage: a 3D ``AutoencoderKL`` on whole registered volumes.

Loss (per volume): L1 reconstruction + ``grad_weight`` x L1 of the finite-difference gradients
(keeps edges sharp; a cheap stand-in for a perceptual loss, which cannot be fetched here) +
``kl_weight`` x KL(q(z|x) || N(0, I)) (Kingma & Welling 2014) and, with ``adv_weight`` > 0, a
least-squares adversarial loss from a MONAI ``PatchDiscriminator`` (Isola et al. 2017, as in the
MONAI brain LDM tutorials) that switches on at step ``adv_start``, once the reconstruction is
roughly right. Whole volumes, not patches: GroupNorm statistics of patches differ from those of
the whole volume the decoder sees at generation time. A ``decoder_only`` run encodes every volume
(and its mirror) once with the frozen encoder and trains on those latents (``cache_latents``);
``latent_noise`` adds Gaussian noise (that fraction of the latents' std) to them, so the decoder
learns to render imperfect, sampled latents smoothly rather than as texture.

Two options make the adversarial fine-tune of a decoder cheaper and aimed at samples:
``disc_crop`` shows the discriminator a random cube of that edge (the same place in the fake and
the real volume) instead of the whole volume; the decoder still decodes whole volumes, so its
GroupNorm statistics are those of generation. ``adv_latents`` (decoder-only) is a bank of latents
sampled from the diffusion model (``scripts/sample_latents.py``): each step the decoder also renders
one of them, and only the adversarial loss judges that rendering (a sampled latent has no target
image), so the decoder learns to draw the prior's latents the way real scans look, while the L1
and gradient terms on real latents keep it faithful. ``snap_every`` keeps the EMA weights every so
many steps (``snaps/step_NNNNNN.pt``), so checkpoints can be chosen by measuring samples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.prepare import PreparedData
from ..io import atomic_path
from ..models.networks import build_autoencoder, count_parameters, latent_mean
from .common import (EMA, Checkpointer, LossLog, StepClock, autocast, is_model_folder, model_folder_weights,
                     resume_state, rng_state, setup_distributed, training_bf16)
from .defaults import DEFAULT_AE, DEFAULT_DISCRIMINATOR, smallest_disc_crop  # noqa: F401 (re-exported)

__all__ = ["AETrainConfig", "train_autoencoder", "DEFAULT_AE", "DEFAULT_DISCRIMINATOR", "gradient_l1", "kl_loss",
           "smallest_disc_crop", "load_latent_bank",
           "load_volumes"]


@dataclass
class AETrainConfig:
    data_dir: str
    run_dir: str
    steps: int = 1000
    batch_size: int = 1
    lr: float = 1e-3
    lr_min: float = 1e-4
    kl_weight: float = 1e-6
    grad_weight: float = 1.0
    bf16: bool = True
    seed: int = 0
    ckpt_every: int = 50
    max_minutes: float | None = None
    splits: tuple[str, ...] = ("train",)
    autoencoder: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_AE))
    init_from: str | None = None
    decoder_only: bool = False
    cache_latents: bool = True
    latent_noise: float = 0.0
    adv_weight: float = 0.0
    adv_start: int = 0
    disc_lr: float | None = None
    discriminator: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_DISCRIMINATOR))
    disc_crop: int | None = None
    adv_latents: str | None = None
    snap_every: int | None = None

    def __post_init__(self):
        if self.adv_weight < 0 or self.adv_start < 0:
            raise ValueError(f"`adv_weight` and `adv_start` must be >= 0, got {self.adv_weight} and {self.adv_start}")
        if self.latent_noise < 0 or (self.latent_noise > 0 and not self.decoder_only):
            raise ValueError(f"`latent_noise` must be >= 0 and needs `decoder_only`, got {self.latent_noise}")
        smallest = smallest_disc_crop(self.discriminator)
        if self.disc_crop is not None and self.disc_crop < smallest:
            raise ValueError(f"`disc_crop` must be at least {smallest} voxels for a {self.discriminator.get('num_layers_d', 3)}-layer "
                             f"discriminator, got {self.disc_crop}")
        if self.adv_latents and not (self.decoder_only and self.adv_weight > 0):
            raise ValueError("`adv_latents` needs `decoder_only` and `adv_weight` > 0 (the sampled latents are judged "
                             "only by the discriminator, in the frozen encoder's latent space)")
        if self.snap_every is not None and self.snap_every < 1:
            raise ValueError(f"`snap_every` must be at least 1, got {self.snap_every}")


class _DecoderOnly(torch.nn.Module):
    """Frozen encoder, trainable decoder: ``x -> decode(mu(x))``.

    Fine-tunes the decoder on the latent means the diffusion model learned to produce, so the
    latent space (and any diffusion model trained on it) stays valid.
    """

    def __init__(self, ae: torch.nn.Module):
        super().__init__()
        self.ae = ae
        for m in (ae.encoder, ae.quant_conv_mu, ae.quant_conv_log_sigma):
            m.requires_grad_(False)

    def forward(self, x, mu=None):
        if mu is None:
            with torch.no_grad():
                mu = latent_mean(self.ae, x)
        return self.ae.decode(mu), mu, torch.ones_like(mu)

    @torch.no_grad()
    def encode_all(self, volumes: np.ndarray, device, bf16: bool) -> torch.Tensor:
        """Latent means of every volume and of its left-right mirror: (2, N, C, x, y, z) on ``device``.

        The encoder is frozen, so a decoder-only run encodes each volume once instead of every step;
        each latent is computed exactly as the uncached step would (same autocast, one volume at a time).
        """
        out = []
        for flip in (False, True):
            mus = []
            for v in volumes:
                x = torch.from_numpy(v[None]).to(device)
                if flip:
                    x = torch.flip(x, dims=[2])
                with autocast(device, bf16):
                    mus.append(latent_mean(self.ae, x))
            out.append(torch.cat(mus))
        return torch.stack(out)


def gradient_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between the forward differences of ``a`` and ``b`` (B, C, X, Y, Z)."""
    loss = a.new_zeros(())
    for dim in (2, 3, 4):
        loss = loss + F.l1_loss(torch.diff(a, dim=dim), torch.diff(b, dim=dim))
    return loss / 3


def kl_loss(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent elements, averaged over the batch."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-12) - 1)
    return kl.flatten(1).sum(1).mean()


def load_latent_bank(path: str | Path, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """The (N, C, x, y, z) float32 latents of a bank written by ``scripts/sample_latents.py`` (or a bare tensor)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no latent bank at {p}: expected a .pt file written by scripts/sample_latents.py")
    bank = torch.load(p, map_location="cpu", weights_only=False)
    z = bank["latents"] if isinstance(bank, dict) else bank
    if not isinstance(z, torch.Tensor) or z.ndim != 5 or tuple(z.shape[1:]) != tuple(latent_shape):
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"the latent bank {p} must hold (N, {', '.join(map(str, latent_shape))}) latents "
                         f"of this autoencoder, got {got}")
    return z.float()


def random_crop_corner(shape: tuple[int, ...], size: int, rng: np.random.Generator) -> tuple[int, ...]:
    """A uniformly random corner of a ``size`` cube inside a volume of ``shape`` (clipped to the volume)."""
    return tuple(int(rng.integers(0, max(n - size, 0) + 1)) for n in shape)


def crop(x: torch.Tensor, corner: tuple[int, ...], size: int) -> torch.Tensor:
    """The ``size`` cube at ``corner`` of the spatial dimensions of (B, C, X, Y, Z) ``x``."""
    (a, b, c) = corner
    return x[..., a:a + size, b:b + size, c:c + size]


def load_volumes(data: PreparedData, splits: tuple[str, ...]) -> np.ndarray:
    """Stack the T1 volumes of ``splits`` into (N, 1, X, Y, Z) float32."""
    rows = [r for s in splits for r in data.subset(s)]
    if not rows:
        raise ValueError(f"no prepared subjects in splits {splits}")
    return np.stack([data.t1(r)[None] for r in rows]).astype(np.float32)


def train_autoencoder(cfg: AETrainConfig, *, volumes: np.ndarray | None = None, progress: bool = True) -> dict:
    """Train (or resume) the autoencoder; returns ``{"state_dict", "ema_state_dict", "step", ...}``.

    Args:
        cfg: Training configuration; ``run_dir`` holds ``last.pt`` and ``losses.csv``.
        volumes: Optional (N, 1, X, Y, Z) array instead of reading ``cfg.data_dir``.
        progress: Show a progress bar on the main process.
    """
    from tqdm.auto import tqdm

    ctx = setup_distributed()
    torch.manual_seed(cfg.seed + ctx.rank)
    cfg.bf16 = training_bf16(cfg.bf16, ctx.device)  # never emulated bf16
    rng = np.random.default_rng(cfg.seed + ctx.rank)
    if volumes is None:
        volumes = load_volumes(PreparedData.load(cfg.data_dir), cfg.splits)
    model = build_autoencoder(cfg.autoencoder).to(ctx.device)
    init_step = None
    if cfg.init_from and is_model_folder(cfg.init_from):  # a packaged model: its (EMA) autoencoder weights
        weights, config = model_folder_weights(cfg.init_from, "autoencoder")
        model.load_state_dict(weights)
        init_step = f"{config.name} {config.version}"
    elif cfg.init_from:
        init = torch.load(Path(cfg.init_from) / "last.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(init["ema_state_dict"])
        init_step = int(init["step"])  # recorded, so the packaged model can say how it was trained
    wrapped = _DecoderOnly(model) if cfg.decoder_only else model
    ema = EMA(model, decay=0.995)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    disc = d_opt = adv = None
    if cfg.adv_weight > 0:
        from monai.losses import PatchAdversarialLoss
        from monai.networks.nets import PatchDiscriminator

        disc = PatchDiscriminator(**cfg.discriminator).to(ctx.device)
        d_opt = torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr or cfg.lr)
        adv = PatchAdversarialLoss(criterion="least_squares")
    ckpt = Checkpointer(cfg.run_dir)
    start = 0
    state = ckpt.resume()
    if state is not None:
        start, rng = resume_state(state, {"state_dict": model, "ema_state_dict": ema.model, "optimizer": opt,
                                          "discriminator": disc, "disc_optimizer": d_opt}, rng, cfg.seed + ctx.rank,
                                  ctx.world_size, optional=("discriminator", "disc_optimizer"))
    cached = wrapped.encode_all(volumes, ctx.device, cfg.bf16) if cfg.decoder_only and cfg.cache_latents else None
    bank = None
    if cfg.adv_latents:
        if cached is not None:
            shape = tuple(cached.shape[2:])
        else:
            with torch.no_grad():
                shape = tuple(latent_mean(model, torch.from_numpy(volumes[:1]).to(ctx.device)).shape[1:])
        bank = load_latent_bank(cfg.adv_latents, shape).to(ctx.device)
    net = torch.nn.parallel.DistributedDataParallel(wrapped) if ctx.world_size > 1 else wrapped
    d_net = torch.nn.parallel.DistributedDataParallel(disc) if disc is not None and ctx.world_size > 1 else disc
    log = (LossLog(Path(cfg.run_dir) / "losses.csv", ["loss", "l1", "grad", "kl", "adv", "disc", "lr"], resume_step=start)
           if ctx.is_main else None)
    clock = StepClock(cfg.steps, cfg.lr, cfg.lr_min, cfg.ckpt_every, cfg.max_minutes)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="autoencoder", disable=not (progress and ctx.is_main))
    step = start
    for step in bar:
        lr = clock.set_lr(opt, step)
        idx = rng.integers(0, len(volumes), size=cfg.batch_size)
        x = torch.from_numpy(volumes[idx]).to(ctx.device)
        flip = rng.random() < 0.5  # left-right flip: brains are close to symmetric
        if flip:
            x = torch.flip(x, dims=[2])
        with autocast(ctx.device, cfg.bf16):
            mu_in = None
            if cached is not None:
                mu_in = cached[int(flip)][torch.from_numpy(idx)]
            elif cfg.latent_noise > 0:
                with torch.no_grad():
                    mu_in = latent_mean(model, x)
            if cfg.latent_noise > 0:  # teach the decoder to shrug off misplaced fine structure in sampled latents
                mu_in = mu_in + cfg.latent_noise * mu_in.float().std() * torch.randn(mu_in.shape, device=mu_in.device)
            recon, mu, sigma = net(x) if mu_in is None else net(x, mu=mu_in)
        recon, mu, sigma = recon.float(), mu.float(), sigma.float()
        l1 = F.l1_loss(recon, x)
        gl = gradient_l1(recon, x)
        kl = kl_loss(mu, sigma) if not cfg.decoder_only else torch.zeros(())
        loss = l1 + cfg.grad_weight * gl + cfg.kl_weight * kl
        adversarial = disc is not None and step >= cfg.adv_start
        g_adv = d_loss = torch.zeros(())
        if adversarial:
            size = cfg.disc_crop or max(x.shape[2:])  # no crop: the whole volume
            corner = random_crop_corner(tuple(x.shape[2:]), size, rng) if cfg.disc_crop else (0, 0, 0)
            fakes = [crop(recon, corner, size)]
            if bank is not None:  # one sampled latent, judged only by the discriminator
                z = bank[torch.from_numpy(rng.integers(0, len(bank), size=len(x)))]
                with autocast(ctx.device, cfg.bf16):
                    sampled = net(x, mu=z)[0].float()
                fakes.append(crop(sampled, random_crop_corner(tuple(x.shape[2:]), size, rng), size))
            fakes = torch.cat(fakes)
            # The discriminator's gradients from this pass are cleared before its own step. (Not
            # toggling requires_grad keeps DDP's reducer happy: every parameter gets a gradient.)
            with autocast(ctx.device, cfg.bf16):
                g_adv = adv(d_net(fakes)[-1].float(), target_is_real=True, for_discriminator=False)
            loss = loss + cfg.adv_weight * g_adv
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model, step)
        if adversarial:
            reals = [crop(x, corner, size)]
            for _ in range(len(fakes) // len(x) - 1):  # as many real crops as fake ones, from other places
                reals.append(crop(x, random_crop_corner(tuple(x.shape[2:]), size, rng), size))
            with autocast(ctx.device, cfg.bf16):  # one forward over fakes and reals (instance norm: no mixing)
                logits = d_net(torch.cat([fakes.detach(), *reals]))[-1].float()
            fake, real = logits.split(len(fakes))
            d_loss = 0.5 * (adv(fake, target_is_real=False, for_discriminator=True)
                            + adv(real, target_is_real=True, for_discriminator=True))
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
        if ctx.is_main:
            log.log(step + 1, loss=loss.item(), l1=l1.item(), grad=gl.item(), kl=kl.item(), adv=g_adv.item(),
                    disc=d_loss.item(), lr=lr)
            bar.set_postfix(l1=f"{l1.item():.4f}", grad=f"{gl.item():.4f}")
        save, out_of_time = clock.after(step)
        if ctx.is_main and save:
            ckpt.save({**_state(model, ema, opt, step + 1, cfg, disc, d_opt, init_step), "rng": rng_state(rng)})
        if ctx.is_main and cfg.snap_every and (step + 1) % cfg.snap_every == 0:
            with atomic_path(Path(cfg.run_dir) / "snaps" / f"step_{step + 1:06d}.pt") as tmp:
                torch.save({"ema_state_dict": ema.model.state_dict(), "step": step + 1, "config": asdict(cfg)}, tmp)
        if out_of_time:
            break
    if log:
        log.close()
    final = _state(model, ema, opt, step + 1 if cfg.steps > start else start, cfg, disc, d_opt, init_step)
    final["params"] = count_parameters(model)
    return final


def _state(model, ema, opt, step, cfg, disc=None, d_opt=None, init_step=None) -> dict:
    state = {
        "state_dict": model.state_dict(),
        "ema_state_dict": ema.model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": step,
        "config": asdict(cfg),
        "init_step": init_step,
    }
    if disc is not None:
        state["discriminator"] = disc.state_dict()
        state["disc_optimizer"] = d_opt.state_dict()
    return state
