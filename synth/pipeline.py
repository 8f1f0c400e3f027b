"""Latent diffusion brain generator: noise -> sampler in latent space -> decoder -> T1 volume.

The networks are MONAI's ``DiffusionModelUNet`` and ``AutoencoderKL`` (Pinaya et al. 2022). Samplers:
DPM-Solver++(2M) (Lu et al. 2022; :mod:`synth.sampling`) or MONAI's ``DDIMScheduler`` (Song et al.
2021), chosen by the model config. Classifier-free guidance (Ho & Salimans 2022):
``eps = eps_u + w (eps_c - eps_u)``, optionally only on an interval of noise levels.

The numeric path (float32 or bfloat16) follows the hardware (:mod:`synth.runtime`): bf16 only where it
is native. Inference runs an exact, cheaper form of the decoder's upsampling
(:mod:`synth.models.fast`) and PyTorch's fused attention in the UNet.

A model may ship a small refiner (:mod:`synth.models.refiner`, ``refiner.safetensors``) that adds 2 mm
texture to the decoded image; it is applied unless switched off (``refine=False``) and named in the
provenance either way.

This is the ``ldm`` backend of :class:`synth.generators.Generator`; loading by name or folder
(:func:`load_generator`, re-exported here) dispatches on the model's config in :mod:`synth.generators`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .brain import BACKGROUND_NOTE, SyntheticBrain, zero_background
from .condition import Condition
from .generators import DEFAULT_MODEL, available_models, encode_covariates, load_generator, models_dir, pick_device
from .grid import Grid
from . import provenance as _provenance
from .io import SYNTHETIC_NOTICE
from .models.config import ModelConfig
from .models.fast import use_onednn_convs
from .models.networks import autocast, build_autoencoder, build_unet, latent_mean
from .models.refiner import RefinerMixin, load_refiner
from .normative import NormativeModel, target_volumes
from .runtime import AdaptiveThreads, keep_freed_memory, resolve_precision
from .sampling import SAMPLERS, dpm_solver_pp_2m, dpm_timesteps
from .version import __version__

__all__ = ["BrainGenerator", "DEFAULT_MODEL", "available_models", "load_generator", "pick_device", "models_dir"]

ProgressFn = Callable[[int, int], None]


def _load_weights(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path))
    module.load_state_dict({k: v.float() for k, v in state.items()})


class BrainGenerator(RefinerMixin):
    """A conditional latent diffusion generator of 3D T1 brains.

    Args:
        config: The model's configuration.
        autoencoder: MONAI ``AutoencoderKL`` with trained weights.
        unet: MONAI ``DiffusionModelUNet`` with trained weights.
        device: Where to run (``auto``: CUDA, MPS, then CPU).
        source: Where the weights came from (for provenance).
        refiner: The trained :class:`synth.models.refiner.Refiner` of ``config.refiner``, if it has one.

    Example:
        >>> gen = load_generator()                                  # doctest: +SKIP
        >>> brain = gen.generate(Condition(age=72, sex="F", diagnosis="AD"), seed=3)  # doctest: +SKIP
        >>> brain.save("brain.nii.gz")                               # doctest: +SKIP
    """

    backend = "ldm"  # synth.generators.BACKENDS

    def __init__(self, config: ModelConfig, autoencoder, unet, *, device="auto", source: str = "", refiner=None):
        self.config = config
        self.device = pick_device(device)
        keep_freed_memory()  # activations reused, not refaulted (synth.runtime)
        self.autoencoder = autoencoder.to(self.device).eval().requires_grad_(False)
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        _use_fused_attention(self.unet)
        use_onednn_convs(self.unet)  # batch-1 (unguided) steps otherwise take PyTorch's slow conv3d path
        self._decoder = None  # the fast inference form of the decoder, built on first use
        self._attach_refiner(refiner)
        self.source = source
        self.normative = NormativeModel.from_dict(config.normative) if config.normative else None
        g = config.grid
        self.grid = Grid(tuple(g["shape"]), float(g["spacing"]), tuple(g["origin"])) if g else None

    @classmethod
    def from_folder(cls, folder: str | Path, device: str = "auto") -> "BrainGenerator":
        """Load ``config.json``, ``autoencoder.safetensors``, ``unet.safetensors`` (and ``refiner.safetensors``
        when the config names a refiner) from ``folder``."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no model in {folder}: expected config.json, autoencoder.safetensors, unet.safetensors")
        config = ModelConfig.load(folder)
        ae, unet = build_autoencoder(config.autoencoder), build_unet(config.unet)
        _load_weights(ae, folder / "autoencoder.safetensors")
        _load_weights(unet, folder / "unet.safetensors")
        refiner = load_refiner(folder, config.refiner, config.name)
        return cls(config, ae, unet, device=device, source=str(folder), refiner=refiner)

    # -- conditioning -------------------------------------------------------------------------
    def targets(self, condition: Condition) -> dict[str, float]:
        """Volumes (fractions of ICV) the model is asked for under ``condition``."""
        if self.normative is None:
            return dict(condition.volumes)
        return target_volumes(condition, self.normative)

    def encode_condition(self, condition: Condition) -> torch.Tensor:
        """The (1, n_conditioning) vector of :attr:`ModelConfig.covariates`, each scaled to [0, 1]."""
        return encode_covariates(condition, self.config.covariates, self.config.covariate_ranges,
                                 self.targets(condition), self.config.null_condition)

    def _unet_inputs(self, z: torch.Tensor, cond: torch.Tensor):
        mode = self.config.conditioning
        x = z
        if "concat" in mode:
            x = torch.cat([z, cond[:, :, None, None, None].expand(-1, -1, *z.shape[2:]).to(z.dtype)], dim=1)
        context = cond[:, None, :].to(z.dtype) if "crossattn" in mode else None
        return x, context

    # -- sampling -----------------------------------------------------------------------------
    def latent_shape(self) -> tuple[int, ...]:
        shape = self.grid.shape if self.grid else (80, 96, 80)
        f = 2 ** (len(self.config.autoencoder["channels"]) - 1)
        return (1, int(self.config.autoencoder["latent_channels"]), *(s // f for s in shape))

    def make_scheduler(self):
        from monai.networks.schedulers import DDIMScheduler

        s = self.config.scheduler
        return DDIMScheduler(
            num_train_timesteps=s["num_train_timesteps"],
            schedule=s["schedule"],
            beta_start=s["beta_start"],
            beta_end=s["beta_end"],
            prediction_type=s.get("prediction_type", "epsilon"),
            clip_sample=False,
        )

    def sampling_options(self, steps: int | None = None, guidance_scale: float | None = None,
                         sampler: str | None = None, fast: bool = False) -> dict:
        """The sampler, steps, guidance scale and guidance interval to use, checked.

        Defaults come from the model config's ``sampling`` (``sampler``, ``steps``, ``guidance_scale``,
        ``guidance_interval`` as ``[t_lo, t_hi]`` training timesteps where guidance applies, ``spacing``);
        with ``fast``, from its ``fast`` preset over those (fewer network evaluations, measured
        trade-offs in the model card).

        Raises:
            ValueError: a value out of range, or ``fast`` for a model without a fast preset.
        """
        cfg = {k: v for k, v in self.config.sampling.items() if k != "fast"}
        if fast:
            if not isinstance(self.config.sampling.get("fast"), dict):
                raise ValueError(f"model {self.config.name!r} has no fast sampling preset; give --sampler and --steps")
            cfg.update(self.config.sampling["fast"])
        sampler = str(cfg.get("sampler", "ddim") if sampler is None else sampler)
        if sampler not in SAMPLERS:
            raise ValueError(f"`sampler` must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        n_train = int(self.config.scheduler["num_train_timesteps"])
        steps = int(cfg.get("steps", 20) if steps is None else steps)
        if not 1 <= steps <= n_train:
            raise ValueError(f"`steps` must be within 1-{n_train}, got {steps}")
        guidance_scale = float(cfg.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale)
        if not 0.0 <= guidance_scale <= 20.0:
            raise ValueError(f"`guidance_scale` must be within 0-20, got {guidance_scale:g}")
        lo, hi = (int(v) for v in cfg.get("guidance_interval", (0, n_train - 1)))
        eps_scale = float(cfg.get("eps_scale", 1.0))
        if not 0.5 <= eps_scale <= 2.0:
            raise ValueError(f"`eps_scale` must be within 0.5-2, got {eps_scale:g}")
        return {"sampler": sampler, "steps": steps, "guidance_scale": guidance_scale, "guidance_interval": [lo, hi],
                "spacing": str(cfg.get("spacing", "logsnr")), "eps_scale": eps_scale}

    @torch.no_grad()
    def sample_latent(
        self, condition: Condition, seed: int, steps: int, guidance_scale: float, bf16: bool, progress: ProgressFn | None,
        *, sampler: str | None = None, guidance_interval: tuple[int, int] | None = None, spacing: str | None = None,
        eps_scale: float | None = None,
    ) -> torch.Tensor:
        """Sample from seeded noise and return the (1, C, x, y, z) latent (unscaled).

        ``sampler`` (``ddim`` or ``dpm++2m``), ``guidance_interval`` and ``eps_scale`` default to the model
        config. ``eps_scale`` divides every (guided) noise prediction: epsilon scaling against exposure bias
        (Ning et al., ICLR 2024); 1 leaves the sampler as trained.
        """
        opts = self.sampling_options(steps, guidance_scale, sampler)
        lo, hi = opts["guidance_interval"] if guidance_interval is None else guidance_interval
        eps_scale = opts["eps_scale"] if eps_scale is None else float(eps_scale)
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        z = torch.randn(self.latent_shape(), generator=gen).to(self.device)
        cond = self.encode_condition(condition).to(self.device)
        use_cfg = guidance_scale != 1.0 and self.config.null_condition
        amp = autocast(self.device, bf16)

        def eps(x: torch.Tensor, t: int, guided: bool) -> torch.Tensor:
            guided = guided and use_cfg
            x_in = torch.cat([x, x]) if guided else x
            c_in = torch.cat([torch.zeros_like(cond), cond]) if guided else cond
            net_in, context = self._unet_inputs(x_in, c_in)
            with amp:
                out = self.unet(net_in, timesteps=torch.full((x_in.shape[0],), t, device=self.device), context=context)
            out = out.float()
            if guided:
                out_u, out_c = out.chunk(2)
                out = out_u + guidance_scale * (out_c - out_u)
            return out / eps_scale if eps_scale != 1.0 else out

        if opts["sampler"] == "dpm++2m":
            scheduler = self.make_scheduler()
            timesteps = dpm_timesteps(scheduler.alphas_cumprod, steps, spacing or opts["spacing"])
            guided = [lo <= t <= hi for t in timesteps]
            z = dpm_solver_pp_2m(eps, z, scheduler.alphas_cumprod, timesteps, guided, progress)
        else:
            scheduler = self.make_scheduler()
            scheduler.set_timesteps(steps)
            total = len(scheduler.timesteps)
            for i, t in enumerate(scheduler.timesteps):
                z, _ = scheduler.step(eps(z, int(t), lo <= int(t) <= hi), t, z)
                if progress:
                    progress(i + 1, total)
        return z / self.config.latent_scale

    @torch.no_grad()
    def encode(self, image: np.ndarray, bf16: bool = False) -> torch.Tensor:
        """The (unscaled) latent mean of an (X, Y, Z) volume in [0, 1] on the model grid."""
        x = torch.from_numpy(np.asarray(image, np.float32)[None, None]).to(self.device)
        with autocast(self.device, bf16):
            return latent_mean(self.autoencoder, x).float()

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, bf16: bool = False) -> np.ndarray:
        """Decode a latent to an (X, Y, Z) float32 volume in [0, 1].

        Runs the inference form of the decoder (upsampling convolutions at low resolution,
        :func:`synth.models.fast.fuse_upsample_convs`): the same image to float rounding, a third
        less work.
        """
        if self._decoder is None:
            self._decoder = _fast_decoder(self.autoencoder)
        with autocast(self.device, bf16):
            img = self._decoder(latent)
        return img.float().clamp_(0, 1)[0, 0].cpu().numpy()

    def generate(
        self,
        condition: Condition,
        seed: int = 0,
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        precision: str | None = None,
        threads: int | None = None,
        sampler: str | None = None,
        fast: bool = False,
        bf16: bool | None = None,
        refine: bool | None = None,
        progress: ProgressFn | bool | None = None,
    ) -> SyntheticBrain:
        """Generate one brain.

        Args:
            condition: Age, sex, diagnosis and optional volume targets.
            seed: Seed of the initial noise; same model, condition, seed, device and precision ->
                same brain.
            steps: Sampling steps (default from the model config).
            guidance_scale: Classifier-free guidance weight (1 = plain conditional).
            precision: ``auto`` (bf16 only where it is faster than float32, a GPU with bf16 or a CPU
                with AMX, and the model config allows it), ``fp32`` or ``bf16``; default
                ``$SYNTHBRAIN_PRECISION`` or ``auto``.
            threads: CPU threads (default ``$SYNTHBRAIN_THREADS`` or the idle cores,
                :func:`synth.runtime.pick_threads`), re-checked between steps
                (:class:`synth.runtime.AdaptiveThreads`) unless given.
            sampler: ``dpm++2m`` or ``ddim`` (default from the model config).
            fast: Use the model config's ``fast`` sampling preset (for the shipped model DPM-Solver++
                in 8 steps, guidance on the 4 noisiest: about 2.8x faster on a 2-core CPU without native bf16;
                with ``refine=True`` about 1.8x faster and about as realistic by its report; trade-offs in its card);
                ``steps``, ``sampler`` and ``guidance_scale`` given explicitly still win.
            bf16: Older spelling of ``precision`` (``True`` = ``"bf16"``, ``False`` = ``"fp32"``).
            refine: Apply the model's refiner after decoding (default: as its config says, for the shipped
                model on with the standard sampling and off with ``fast``; ``True`` for a model without one
                is an error). Always float32.
            progress: ``True`` for a progress bar, or a callback ``f(step, total)``.
        """
        if not isinstance(condition, Condition):
            raise TypeError(f"`condition` must be a synth.Condition, got {type(condition).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**63:
            raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}")
        opts = self.sampling_options(steps, guidance_scale, sampler, fast=fast)
        refine = self._resolve_refine(refine, fast)
        if bf16 is not None and precision is None:
            precision = "bf16" if bf16 else "fp32"
        precision = resolve_precision(precision, self.device, model_allows=bool(self.config.sampling.get("bf16", False)))
        use_bf16 = precision == "bf16"
        callback = progress if callable(progress) else None
        bar = None
        if progress is True:
            from tqdm.auto import tqdm

            bar = tqdm(total=opts["steps"], desc="sampling", leave=False)
            callback = lambda i, n: bar.update(1)  # noqa: E731
        governor = AdaptiveThreads(threads) if self.device.type == "cpu" else None
        with governor or contextlib.nullcontext():
            if governor is not None:  # re-pick threads between steps: another process may have started or stopped
                callback = _checking_threads(governor, callback)
            latent = self.sample_latent(condition, int(seed), opts["steps"], opts["guidance_scale"], use_bf16, callback,
                                        sampler=opts["sampler"], guidance_interval=opts["guidance_interval"],
                                        spacing=opts["spacing"], eps_scale=opts["eps_scale"])
            if bar:
                bar.close()
            if governor is not None:
                governor.check("decode")
            image = zero_background(self.decode(latent, bf16=use_bf16))
            if refine:
                if governor is not None:
                    governor.check("refine")
                image = self.refine(image)
        affine = self.grid.affine if self.grid else np.eye(4)
        provenance = {
            "generator": "SynthBrain",
            "synth_version": __version__,
            "backend": self.backend,
            "model": self.config.name,
            "model_version": self.config.version,
            "model_source": _provenance.model_reference(self.source),  # a name or relative path, never absolute
            "sampling_preset": "fast" if fast else "standard",
            "sampler": "DPM-Solver++(2M)" if opts["sampler"] == "dpm++2m" else "DDIM",
            "steps": opts["steps"],
            "guidance_scale": opts["guidance_scale"],
            "guidance_interval": opts["guidance_interval"],
            **({"eps_scale": opts["eps_scale"]} if opts["eps_scale"] != 1.0 else {}),
            "refiner": self.refiner_provenance(refine),
            "precision": precision,
            "bf16": use_bf16,
            "threads": governor.used[0] if governor is not None else None,
            # [after sampling step, threads] (or "decode"): the schedule, to reproduce the brain to the bit
            **({"threads_adapted": governor.changes} if governor is not None and governor.changes else {}),
            "device": str(self.device),
            "space": "MNI152 (RAS), affine in the NIfTI header",
            "intensity": "T1-weighted, scaled to [0, 1], skull-stripped",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "background": BACKGROUND_NOTE,
            "notice": SYNTHETIC_NOTICE,
            "history": [_provenance.step("generate", model=self.config.name, seed=int(seed))],
        }
        return SyntheticBrain(image, affine, condition, int(seed), self.targets(condition), provenance)


def _checking_threads(governor: AdaptiveThreads, callback: ProgressFn | None) -> ProgressFn:
    """``callback`` preceded by a re-check of the thread count (``governor.check``) at every step."""

    def step(i: int, n: int) -> None:
        governor.check(i)
        if callback is not None:
            callback(i, n)

    return step


def _use_fused_attention(unet: torch.nn.Module) -> None:
    """Let MONAI's attention blocks call ``torch.nn.functional.scaled_dot_product_attention`` (one fused
    kernel instead of matmul, softmax, matmul): same parameters, same result to float rounding."""
    for m in unet.modules():
        if hasattr(m, "use_flash_attention") and not getattr(m, "save_attn", False) \
                and getattr(m, "rel_positional_embedding", None) is None:
            m.use_flash_attention = True


def _fast_decoder(autoencoder: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``latent -> image`` through a copy of the decoder with its upsampling convolutions fused."""
    import copy

    from .models.fast import fuse_upsample_convs

    post_quant_conv, decoder = copy.deepcopy(autoencoder.post_quant_conv), copy.deepcopy(autoencoder.decoder)
    fuse_upsample_convs(decoder)
    # oneDNN's convolutions run faster on channels-last 3D tensors (benchmarks/bench_convs.py, 2 AVX2 cores:
    # 0.742 -> 0.635 s per decode); the image is the same to float rounding.
    channels_last = next(decoder.parameters()).device.type == "cpu"
    if channels_last:
        post_quant_conv.to(memory_format=torch.channels_last_3d)
        decoder.to(memory_format=torch.channels_last_3d)

    def run(z: torch.Tensor) -> torch.Tensor:
        if channels_last:
            z = z.contiguous(memory_format=torch.channels_last_3d)
        return decoder(post_quant_conv(z)).contiguous()

    return run
