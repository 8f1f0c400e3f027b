"""Train the VQ backend: the VQ-VAE on whole registered volumes, then the transformer on its codes.

VQ-VAE loss (per volume): L1 + ``grad_weight`` x L1 of finite-difference gradients (as the LDM's
first stage, :mod:`synth.train.autoencoder`) + ``commitment_cost`` x ``||z_e - sg(z_q)||^2``; the
codebook follows an EMA and dead codes are restarted every ``restart_every`` steps. Training can
start from the LDM's trained first stage (``init_autoencoder``: same MONAI blocks), with the
codebook initialised by k-means on its encoder outputs. Codebook usage (perplexity, live codes)
is logged to ``losses.csv``; with ``eval_every`` the reconstruction inside the brain of the
validation subjects is logged to ``val.csv`` and the best checkpoint kept as ``best.pt``.

Transformer: cross-entropy of the next code in raster order, conditioned on the same covariates
as the diffusion model (:func:`synth.train.diffusion.covariate_matrix`), with the condition
replaced by zeros with probability ``p_uncond`` (classifier-free guidance). New transformers get
attention blocks of one x-slab and ``wavefront`` (a block's first input carries no previous token,
so sampling and the codec decode the slabs side by side: :class:`~synth.vq.transformer.WavefrontDecoder`);
``transformer={"wavefront": False}`` (``--no-wavefront``) trains the older sequential-only inputs.
Runs resume from ``RUN/last.pt`` (with the ``wavefront`` setting they started with).

A packaged VQ model folder (``synthbrain-vq-2mm``) can stand in for the VQ-VAE run (its
``vqvae.safetensors``: the codes then match the shipped generator and codec), and ``init_from`` starts
the transformer from such a folder's transformer, with its architecture and conditioning ranges.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.prepare import PreparedData
from ..io import atomic_path
from ..metrics import psnr, ssim
from ..models.networks import count_parameters
from ..normative import NormativeModel
from ..train.autoencoder import gradient_l1, load_volumes
from ..train.common import Checkpointer, LossLog, StepClock, autocast, autoencoder_weights, setup_distributed, training_bf16
from ..train.diffusion import DEFAULT_COVARIATES, covariate_matrix, covariate_ranges
from .transformer import CodeTransformer
from .vqvae import DEFAULT_VQVAE, VQVAE, build_vqvae

__all__ = ["VQTrainConfig", "TFTrainConfig", "train_vqvae", "train_transformer", "load_vqvae_run",
           "reconstruction_metrics", "encode_codes", "DEFAULT_TRANSFORMER"]

DEFAULT_TRANSFORMER: dict[str, Any] = {"d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 512,
                                       "attention": "linear", "dropout": 0.0, "window": "slab", "prior_top": 64,
                                       "wavefront": True}


@dataclass
class VQTrainConfig:
    data_dir: str
    run_dir: str
    steps: int = 2000
    batch_size: int = 1
    lr: float = 3e-4
    lr_min: float = 3e-5
    grad_weight: float = 1.0
    bf16: bool = True
    seed: int = 0
    ckpt_every: int = 50
    max_minutes: float | None = None
    restart_every: int = 25
    eval_every: int = 0
    eval_subjects: int = 8
    init_autoencoder: str | None = None
    kmeans_volumes: int = 32
    kmeans_vectors: int = 200_000
    decoder_only: bool = False
    vqvae: dict[str, Any] = field(default_factory=lambda: {**DEFAULT_VQVAE, "autoencoder": dict(DEFAULT_VQVAE["autoencoder"])})


@dataclass
class TFTrainConfig:
    data_dir: str
    vq_run: str
    run_dir: str
    steps: int = 2000
    batch_size: int = 4
    lr: float = 5e-4
    lr_min: float = 5e-5
    p_uncond: float = 0.1
    bf16: bool = True
    seed: int = 0
    ckpt_every: int = 50
    max_minutes: float | None = None
    engine: str = "auto"
    blocks_per_volume: int = 4
    covariates: list[str] = field(default_factory=lambda: list(DEFAULT_COVARIATES))
    transformer: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_TRANSFORMER))
    init_from: str | None = None  # a VQ model folder whose transformer (and conditioning) the run starts from


@torch.no_grad()
def _kmeans_init(model: VQVAE, volumes: np.ndarray, n: int, device: torch.device, seed: int, max_vectors: int) -> None:
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(volumes), size=min(n, len(volumes)), replace=False)
    z = [model.encode_continuous(torch.from_numpy(volumes[i][None]).to(device)).float() for i in pick]
    flat = torch.cat([t.movedim(1, -1).reshape(-1, t.shape[1]) for t in z]).cpu()
    if len(flat) > max_vectors:
        flat = flat[torch.from_numpy(rng.choice(len(flat), size=max_vectors, replace=False))]
    model.quantizer.init_codebook(flat, seed=seed)


def _freeze_encoder(model: VQVAE) -> None:
    """Decoder-only training: the encoder, its 1x1 convolutions and the codebook stay as they are."""
    for m in (model.ae.encoder, model.ae.quant_conv_mu, model.ae.quant_conv_log_sigma, model.pre):
        m.requires_grad_(False)
    model.quantizer.eval()  # no EMA updates


@torch.no_grad()
def reconstruction_metrics(model: VQVAE, volumes: np.ndarray, masks: np.ndarray, device: torch.device) -> dict[str, float]:
    """Mean PSNR (peak 1) and SSIM inside the brain masks of (N, 1, X, Y, Z) volumes, and live codes."""
    was = model.training
    model.eval()
    ps, ss, used = [], [], set()
    for v, m in zip(volumes, masks):
        x = torch.from_numpy(v[None]).to(device)
        idx = model.encode(x)
        y = model.decode_codes(idx).float().clamp(0, 1)[0, 0].cpu().numpy()
        ps.append(psnr(v[0], y, m))
        ss.append(ssim(v[0], y, m))
        used.update(idx.flatten().tolist())
    model.train(was)
    return {"psnr": float(np.mean(ps)), "ssim": float(np.mean(ss)), "codes_used": float(len(used))}


def train_vqvae(cfg: VQTrainConfig, *, volumes: np.ndarray | None = None, val: tuple[np.ndarray, np.ndarray] | None = None,
                progress: bool = True) -> dict:
    """Train (or resume) the VQ-VAE; returns ``{"state_dict", "step", "config", ...}``.

    Args:
        cfg: Training configuration; ``run_dir`` holds ``last.pt``, ``losses.csv`` (and ``val.csv``,
            ``best.pt`` with ``eval_every``).
        volumes: Optional (N, 1, X, Y, Z) training volumes instead of reading ``cfg.data_dir``.
        val: Optional (volumes, brain masks) for ``eval_every`` instead of the validation split.
        progress: Show a progress bar.
    """
    from tqdm.auto import tqdm

    ctx = setup_distributed()
    torch.manual_seed(cfg.seed + ctx.rank)
    cfg.bf16 = training_bf16(cfg.bf16, ctx.device)  # never emulated bf16
    rng = np.random.default_rng(cfg.seed + ctx.rank)
    gen = torch.Generator().manual_seed(cfg.seed)
    if volumes is None or (cfg.eval_every and val is None):
        data = PreparedData.load(cfg.data_dir)
        if volumes is None:
            volumes = load_volumes(data, ("train",))
        if cfg.eval_every and val is None:
            rows = data.subset("val")[: cfg.eval_subjects]
            val = (np.stack([data.t1(r)[None] for r in rows]), np.stack([data.labels(r) > 0 for r in rows]))
    model = build_vqvae(cfg.vqvae).to(ctx.device)
    if cfg.decoder_only:
        _freeze_encoder(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    ckpt = Checkpointer(cfg.run_dir)
    state = ckpt.resume()
    start, best = 0, -np.inf
    if state is not None:
        model.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["optimizer"])
        start, best = state["step"], state.get("best_psnr", -np.inf)
        rng = np.random.default_rng(cfg.seed + ctx.rank + start)
        gen.manual_seed(cfg.seed + start)
    else:
        if cfg.init_autoencoder:
            model.ae.load_state_dict(autoencoder_weights(cfg.init_autoencoder))
        _kmeans_init(model, volumes, cfg.kmeans_volumes, ctx.device, cfg.seed, cfg.kmeans_vectors)
    cached = _code_cache(model, volumes, Path(cfg.run_dir), ctx) if cfg.decoder_only else None
    net = torch.nn.parallel.DistributedDataParallel(model) if ctx.world_size > 1 else model
    fields = ["loss", "l1", "grad", "commit", "perplexity", "live_codes", "restarted", "lr"]
    log = LossLog(Path(cfg.run_dir) / "losses.csv", fields) if ctx.is_main else None
    clock = StepClock(cfg.steps, cfg.lr, cfg.lr_min, cfg.ckpt_every, cfg.max_minutes)
    if ctx.is_main and cfg.eval_every and start == 0 and not (Path(cfg.run_dir) / "val.csv").is_file():
        m = reconstruction_metrics(model, val[0], val[1], ctx.device)  # the starting point, for comparison
        _append_csv(Path(cfg.run_dir) / "val.csv", {"step": 0, **{k: f"{v:.4f}" for k, v in m.items()}})
        best = m["psnr"]
        with atomic_path(Path(cfg.run_dir) / "best.pt") as tmp:
            torch.save(_vq_state(model, opt, 0, cfg, best), tmp)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="vqvae", disable=not (progress and ctx.is_main))
    step = start
    for step in bar:
        lr = clock.set_lr(opt, step)
        idx = rng.integers(0, len(volumes), size=cfg.batch_size)
        x = torch.from_numpy(volumes[idx]).to(ctx.device)
        flip = rng.random() < 0.5
        if flip:  # left-right flip
            x = torch.flip(x, dims=[2])
        with autocast(ctx.device, cfg.bf16):
            if cached is not None:  # fixed codes: only the decoder runs
                codes = cached[int(flip)][torch.from_numpy(idx)].to(ctx.device)
                out = _decoded(net, codes)
            else:
                out = net(x)
        recon = out.reconstruction.float()
        l1 = F.l1_loss(recon, x)
        gl = gradient_l1(recon, x)
        loss = l1 + cfg.grad_weight * gl + model.commitment_cost * out.commitment
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        restarted = 0
        if cfg.restart_every and cached is None and (step + 1) % cfg.restart_every == 0:
            with torch.no_grad(), autocast(ctx.device, cfg.bf16):
                z = model.encode_continuous(x)
            restarted = model.quantizer.restart_dead(z, gen)
        live = (int((model.quantizer.ema_count >= model.quantizer.dead_threshold).sum()) if cached is None
                else int(torch.unique(cached).numel()))
        if ctx.is_main:
            log.log(step + 1, loss=loss.item(), l1=l1.item(), grad=gl.item(), commit=out.commitment.item(),
                    perplexity=out.perplexity.item(), live_codes=live, restarted=restarted, lr=lr)
            bar.set_postfix(l1=f"{l1.item():.4f}", ppl=f"{out.perplexity.item():.0f}", live=live)
        save, out_of_time = clock.after(step)
        if ctx.is_main and cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            m = reconstruction_metrics(model, val[0], val[1], ctx.device)
            _append_csv(Path(cfg.run_dir) / "val.csv", {"step": step + 1, **{k: f"{v:.4f}" for k, v in m.items()}})
            if m["psnr"] > best:
                best = m["psnr"]
                with atomic_path(Path(cfg.run_dir) / "best.pt") as tmp:
                    torch.save(_vq_state(model, opt, step + 1, cfg, best), tmp)
        if ctx.is_main and save:
            ckpt.save(_vq_state(model, opt, step + 1, cfg, best))
        if out_of_time:
            break
    if log:
        log.close()
    final = _vq_state(model, opt, step + 1 if cfg.steps > start else start, cfg, best)
    final["params"] = count_parameters(model)
    return final


def _decoded(net, codes: torch.Tensor):
    from .vqvae import VQVAEOutput

    model = net.module if hasattr(net, "module") else net
    counts = torch.bincount(codes.flatten(), minlength=model.num_embeddings).float()
    p = counts / counts.sum()
    ppl = torch.exp(-(p * torch.log(p + 1e-10)).sum())
    return VQVAEOutput(model.decode_codes(codes), codes, torch.zeros(()), ppl)


def _code_cache(model: VQVAE, volumes: np.ndarray, run: Path, ctx) -> torch.Tensor:
    """Codes of every training volume and of its mirror, (2, N, x, y, z), computed once (frozen encoder
    and codebook) and kept in ``run/train_codes.pt`` (with the codebook it belongs to)."""
    path = run / "train_codes.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["codes"].shape[1] == len(volumes) and torch.equal(saved["codebook"], model.quantizer.codebook.cpu()):
            return saved["codes"].long()
    out = []
    for flip in (False, True):
        codes = []
        for v in volumes:
            x = torch.from_numpy(v[None]).to(ctx.device)
            codes.append(model.encode(torch.flip(x, dims=[2]) if flip else x).cpu())
        out.append(torch.cat(codes))
    codes = torch.stack(out)
    if ctx.is_main:
        with atomic_path(path) as tmp:
            torch.save({"codes": codes.to(torch.int16), "codebook": model.quantizer.codebook.cpu()}, tmp)
    return codes


def _append_csv(path: Path, row: dict) -> None:
    new = not path.is_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def _vq_state(model, opt, step, cfg, best) -> dict:
    return {"state_dict": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "config": asdict(cfg),
            "best_psnr": best}


MODEL_VQVAE = "vqvae.safetensors"  # a packaged VQ model folder's VQ-VAE weights


def is_vq_model_folder(path: str | Path) -> bool:
    """Whether ``path`` is a packaged VQ model folder (``config.json`` and ``vqvae.safetensors``)."""
    return (Path(path) / "config.json").is_file() and (Path(path) / MODEL_VQVAE).is_file()


def load_vqvae_run(run: str | Path, device: torch.device | str = "cpu", checkpoint: str = "last.pt") -> tuple[VQVAE, dict]:
    """The VQ-VAE of a training run (``last.pt`` or ``best.pt``), or of a packaged VQ model folder (its
    ``vqvae.safetensors``, loaded as the generator loads it), and its config dict."""
    if is_vq_model_folder(run):
        from .config import VQModelConfig
        from .generator import _load_weights

        config = VQModelConfig.load(run).vqvae
        model = build_vqvae(config)
        _load_weights(model, Path(run) / MODEL_VQVAE)
        return model.to(device).eval().requires_grad_(False), config
    path = Path(run) / checkpoint
    if not path.is_file():
        raise FileNotFoundError(f"no VQ-VAE checkpoint {path}: train one with `synthbrain train-vqvae`")
    state = torch.load(path, map_location="cpu", weights_only=False)
    config = state["config"]["vqvae"]
    model = build_vqvae(config)
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval().requires_grad_(False), config


@torch.no_grad()
def encode_codes(model: VQVAE, volumes: np.ndarray, device: torch.device, mirror: bool = True) -> np.ndarray:
    """Code indices of (N, 1, X, Y, Z) volumes (and of their left-right mirrors): (N or 2N, L) int16, raster order."""
    out = []
    for flip in (False, True) if mirror else (False,):
        for v in volumes:
            x = torch.from_numpy(v[None]).to(device)
            if flip:
                x = torch.flip(x, dims=[2])
            out.append(model.encode(x).flatten().cpu().numpy().astype(np.int16))
    return np.stack(out)


def _reuse_vq_codes(vq_run: str | Path, vqvae: VQVAE, data: PreparedData, rows: list[dict]) -> np.ndarray | None:
    """The codes a decoder-only VQ-VAE run cached for the training split (same codebook), in the
    order of ``rows`` (originals, then mirrors), or ``None``."""
    path = Path(vq_run) / "train_codes.pt"
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    all_rows = data.subset("train")
    if saved["codes"].shape[1] != len(all_rows) or not torch.equal(saved["codebook"], vqvae.quantizer.codebook.cpu()):
        return None
    where = {r["mrid"]: i for i, r in enumerate(all_rows)}
    keep = [where[r["mrid"]] for r in rows]
    codes = saved["codes"][:, keep].flatten(2)  # (2, N, L)
    return torch.cat([codes[0], codes[1]]).numpy().astype(np.int16)


def train_transformer(cfg: TFTrainConfig, *, rows: list[dict] | None = None, volumes: np.ndarray | None = None,
                      progress: bool = True) -> dict:
    """Train (or resume) the code transformer on the VQ-VAE's codes of the training split.

    Args:
        cfg: Training configuration; ``vq_run`` is the VQ-VAE's run folder (its ``best.pt`` if there
            is one, else ``last.pt``); ``run_dir`` holds ``last.pt``, ``losses.csv`` and ``codes.npz``.
        rows, volumes: Optional subject rows and (N, 1, X, Y, Z) volumes instead of ``data_dir``.
    """
    from tqdm.auto import tqdm

    ctx = setup_distributed()
    torch.manual_seed(cfg.seed + ctx.rank)
    cfg.bf16 = training_bf16(cfg.bf16, ctx.device)  # never emulated bf16
    rng = np.random.default_rng(cfg.seed + ctx.rank)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    if is_vq_model_folder(cfg.vq_run):
        vq_ckpt = MODEL_VQVAE
    else:
        vq_ckpt = "best.pt" if (Path(cfg.vq_run) / "best.pt").is_file() else "last.pt"
    vqvae, vq_config = load_vqvae_run(cfg.vq_run, ctx.device, vq_ckpt)
    init = _init_transformer_source(cfg.init_from, vqvae) if cfg.init_from else None
    if rows is None:
        data = PreparedData.load(cfg.data_dir)
        rows = data.subset("train", labelled=True)
    cache = run / "codes.npz"
    if cache.is_file():
        codes = np.load(cache)["codes"]
    elif volumes is None and (reused := _reuse_vq_codes(cfg.vq_run, vqvae, data, rows)) is not None:
        codes = reused
        if ctx.is_main:
            with atomic_path(cache) as tmp:
                np.savez(tmp, codes=codes)
    else:
        if volumes is None:
            volumes = np.stack([data.t1(r)[None] for r in rows]).astype(np.float32)
        codes = encode_codes(vqvae, volumes, ctx.device)
        if ctx.is_main:
            with atomic_path(cache) as tmp:
                np.savez(tmp, codes=codes)
    image_shape = list(volumes.shape[2:]) if volumes is not None else list(data.t1(rows[0]).shape)
    code_shape = list(vqvae.code_shape(tuple(image_shape)))
    del vqvae
    covariates = list(init.covariates) if init else cfg.covariates
    ranges = dict(init.covariate_ranges) if init else covariate_ranges(rows, covariates)
    cond = covariate_matrix(rows, covariates, ranges)
    cond = np.concatenate([cond, cond])  # mirrored copies share their subject's condition
    window = cfg.transformer.get("window")
    if window == "slab":  # one x-slab of the code grid per attention block
        window = code_shape[1] * code_shape[2]
    tf_kwargs = dict(cfg.transformer, num_tokens=int(vq_config["num_embeddings"]), seq_len=int(codes.shape[1]),
                     n_conditioning=int(cond.shape[1]), code_shape=code_shape, window=window)
    if init:  # the starting model's architecture, inputs and attention blocks; its codes must be these
        tf_kwargs, window = dict(init.transformer), init.transformer.get("window")
        if [int(v) for v in tf_kwargs.get("code_shape", [])] != [int(v) for v in code_shape] or int(tf_kwargs["seq_len"]) != codes.shape[1]:
            raise ValueError(f"--init-from {cfg.init_from}: its transformer codes a {tf_kwargs.get('code_shape')} grid, "
                             f"these volumes give {code_shape}")
    tf_kwargs["wavefront"] = bool(tf_kwargs.get("wavefront", False)) and window is not None  # no blocks: no wavefront
    if tf_kwargs.get("prior_top"):  # at most all codes but one (the rest share the floor)
        tf_kwargs["prior_top"] = min(int(tf_kwargs["prior_top"]), int(vq_config["num_embeddings"]) - 1)
    try:
        model = CodeTransformer(**tf_kwargs, engine=cfg.engine).to(ctx.device)
    except ValueError as exc:
        if "`wavefront`" in str(exc):
            raise ValueError(f"{exc}: train with --window slab, or with --no-wavefront") from None
        raise
    if tf_kwargs.get("prior_top"):
        model.set_prior(torch.from_numpy(codes.astype(np.int64)))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    ckpt = Checkpointer(run)
    start = 0
    state = ckpt.resume()
    if state is None and init:
        from .generator import _load_weights

        _load_weights(model, Path(cfg.init_from) / "transformer.safetensors")
    if state is not None:
        was = bool(state.get("model_config", {}).get("transformer", {}).get("wavefront", False))
        if was != tf_kwargs["wavefront"]:  # same weights' shapes, other inputs: refuse rather than change the function
            raise ValueError(f"{run / 'last.pt'} was trained with wavefront={was}; resume it with the same setting "
                             f"({'the default' if was else '--no-wavefront'}) or start a fresh --run-dir")
        model.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        rng = np.random.default_rng(cfg.seed + ctx.rank + start)
    net = model  # gradients are averaged by hand under torchrun (block training bypasses forward())
    model_config = {"vqvae": vq_config, "vq_run": str(cfg.vq_run), "vq_checkpoint": vq_ckpt, "transformer": tf_kwargs,
                    "covariates": covariates, "covariate_ranges": ranges, "code_shape": code_shape,
                    "init_from": str(cfg.init_from) if cfg.init_from else None,
                    "image_shape": image_shape,
                    "normative": NormativeModel.fit(rows).to_dict() if len(rows) >= 8 else None}
    log = LossLog(run / "losses.csv", ["loss", "bits_per_code", "lr"]) if ctx.is_main else None
    codes_t, cond_t = torch.from_numpy(codes.astype(np.int64)), torch.from_numpy(cond)
    clock = StepClock(cfg.steps, cfg.lr, cfg.lr_min, cfg.ckpt_every, cfg.max_minutes)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"transformer ({model.engine})",
               disable=not (progress and ctx.is_main))
    step = start
    for step in bar:
        lr = clock.set_lr(opt, step)
        idx = torch.from_numpy(rng.integers(0, len(codes_t), size=cfg.batch_size))
        tok = codes_t[idx].to(ctx.device)
        c = cond_t[idx].clone()
        c[torch.from_numpy(rng.random(cfg.batch_size) < cfg.p_uncond)] = 0.0
        with autocast(ctx.device, cfg.bf16):
            if window and codes_t.shape[1] % window == 0:  # a few random attention blocks of each volume
                x = model.inputs(tok, c.to(ctx.device))
                nb = tok.shape[1] // window
                pick = torch.from_numpy(rng.integers(0, nb, size=(cfg.batch_size, min(cfg.blocks_per_volume, nb))))
                rows_ = torch.arange(cfg.batch_size)[:, None].expand_as(pick)
                xb = x.view(cfg.batch_size, nb, window, -1)[rows_, pick].flatten(0, 1)
                target = tok.view(cfg.batch_size, nb, window)[rows_, pick]
                h = model.encode_inputs(xb).view(cfg.batch_size, -1, window, xb.shape[-1])
                logits = torch.stack([torch.stack([model.logits(h[b, j], int(pick[b, j]) * window)
                                                   for j in range(pick.shape[1])]) for b in range(cfg.batch_size)])
            else:
                logits, target = net(tok, c.to(ctx.device)), tok
        loss = F.cross_entropy(logits.float().flatten(0, -2), target.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if ctx.world_size > 1:
            for p in model.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= ctx.world_size
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if ctx.is_main:
            log.log(step + 1, loss=loss.item(), bits_per_code=loss.item() / np.log(2), lr=lr)
            bar.set_postfix(bits=f"{loss.item() / np.log(2):.3f}")
        save, out_of_time = clock.after(step)
        if ctx.is_main and save:
            ckpt.save(_tf_state(model, opt, step + 1, cfg, model_config))
        if out_of_time:
            break
    if log:
        log.close()
    final = _tf_state(model, opt, step + 1 if cfg.steps > start else start, cfg, model_config)
    final["params"] = count_parameters(model)
    return final


def _init_transformer_source(folder: str | Path, vqvae: VQVAE):
    """The :class:`~synth.vq.config.VQModelConfig` of ``folder`` (a packaged VQ model), checked: its
    transformer must have been trained on the codes of this VQ-VAE's codebook."""
    from safetensors.torch import load_file

    from .config import VQModelConfig

    if not is_vq_model_folder(folder) or not (Path(folder) / "transformer.safetensors").is_file():
        raise FileNotFoundError(f"--init-from expects a VQ model folder (config.json, vqvae.safetensors, "
                                f"transformer.safetensors), got {folder}")
    book = load_file(str(Path(folder) / MODEL_VQVAE)).get("quantizer.codebook")
    if book is None or tuple(book.shape) != tuple(vqvae.quantizer.codebook.shape) or not torch.allclose(
            book.float().cpu(), vqvae.quantizer.codebook.float().cpu()):
        raise ValueError(f"--init-from {folder}: its transformer was trained on another codebook than the VQ-VAE's "
                         f"(give that model folder as --vq-run too)")
    return VQModelConfig.load(folder)


def _tf_state(model, opt, step, cfg, model_config) -> dict:
    return {"state_dict": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "config": asdict(cfg),
            "model_config": model_config, "engine": model.engine}
