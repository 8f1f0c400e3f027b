"""The VQ backend of :class:`synth.generators.Generator`: condition -> transformer codes -> VQ-VAE decoder."""

from __future__ import annotations

import datetime as _dt
import hashlib
from pathlib import Path

import numpy as np
import torch

from ..brain import BACKGROUND_NOTE, SyntheticBrain, zero_background
from ..condition import Condition
from ..generators import ProgressFn, encode_covariates, pick_device
from ..grid import Grid
from ..io import SYNTHETIC_NOTICE
from ..normative import NormativeModel, target_volumes
from ..runtime import keep_freed_memory
from ..version import __version__
from ..models.refiner import Refiner, RefinerMixin, load_refiner
from .config import VQModelConfig
from .sampler import sample_codes
from .transformer import CodeTransformer, fast_transformers_available
from .vqvae import VQVAE, build_vqvae

__all__ = ["VQBrainGenerator", "state_hash"]

_ORDER = {"sequential": "raster order", "wavefront": "x-slab wavefront (slabs side by side, each one code behind)"}


def state_hash(*modules: torch.nn.Module) -> str:
    """SHA-256 (hex) of the modules' weights as float32: identifies the exact weights a file was made with."""
    h = hashlib.sha256()
    for m in modules:
        for k, v in sorted(m.state_dict().items()):
            t = v.detach().cpu()
            t = t.float() if t.is_floating_point() else t
            h.update(k.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _model_reference(source: str) -> str:
    from ..provenance import model_reference

    return model_reference(source)


def _step(command: str, **details) -> dict:
    from ..provenance import step

    return step(command, **details)


def _load_weights(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"missing weights {path}")
    state = load_file(str(path))
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})


class VQBrainGenerator(RefinerMixin):
    """A conditional VQ-VAE + transformer generator of 3D T1 brains (Tudosiu et al. 2022).

    Args:
        config: The model's configuration.
        vqvae: The VQ-VAE with trained weights.
        transformer: The code transformer with trained weights.
        device: Where to run (``auto``: CUDA, MPS, then CPU).
        source: Where the weights came from (for provenance).
        refiner: The trained :class:`synth.models.refiner.Refiner` of ``config.refiner``, if it has one
            (applied after the VQ-VAE's decoder, as the latent diffusion backend's).

    Example:
        >>> gen = load_generator("synthbrain-vq-2mm")                          # doctest: +SKIP
        >>> brain = gen.generate(Condition(age=72, sex="F"), seed=3)           # doctest: +SKIP
    """

    backend = "vq"

    def __init__(self, config: VQModelConfig, vqvae: VQVAE, transformer: CodeTransformer, *, device="auto",
                 source: str = "", refiner: Refiner | None = None):
        self.config = config
        self.device = pick_device(device)
        keep_freed_memory()  # activations reused, not refaulted (synth.runtime)
        self.vqvae = vqvae.to(self.device).eval().requires_grad_(False)
        self.transformer = transformer.to(self.device).eval().requires_grad_(False)
        self.source = source
        self._attach_refiner(refiner)
        self.normative = NormativeModel.from_dict(config.normative) if config.normative else None
        g = config.grid
        self.grid = Grid(tuple(g["shape"]), float(g["spacing"]), tuple(g["origin"])) if g else None
        self._hash: str | None = None

    @classmethod
    def from_folder(cls, folder: str | Path, device: str = "auto", engine: str = "auto") -> "VQBrainGenerator":
        """Load ``config.json``, ``vqvae.safetensors`` and ``transformer.safetensors`` (and
        ``refiner.safetensors`` when the config names a refiner) from ``folder``."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no model in {folder}: expected config.json, vqvae.safetensors, transformer.safetensors")
        config = VQModelConfig.load(folder)
        if engine == "auto" and pick_device(device).type == "cuda" and not fast_transformers_available(cuda=True):
            engine = "torch"  # fast-transformers built without its CUDA kernels (no nvcc at install)
        vqvae = build_vqvae(config.vqvae)
        transformer = CodeTransformer(**config.transformer, engine=engine)
        _load_weights(vqvae, folder / "vqvae.safetensors")
        _load_weights(transformer, folder / "transformer.safetensors")
        refiner = load_refiner(folder, config.refiner, config.name)
        return cls(config, vqvae, transformer, device=device, source=str(folder), refiner=refiner)

    @property
    def engine(self) -> str:
        """The transformer's engine: ``fast-transformers`` or ``torch``."""
        return self.transformer.engine

    @property
    def weights_hash(self) -> str:
        """SHA-256 of the VQ-VAE's and transformer's weights (cached)."""
        if self._hash is None:
            self._hash = state_hash(self.vqvae, self.transformer)
        return self._hash

    def code_shape(self) -> tuple[int, int, int]:
        return self.vqvae.code_shape(self.grid.shape if self.grid else (80, 96, 80))

    # -- conditioning -------------------------------------------------------------------------
    def targets(self, condition: Condition) -> dict[str, float]:
        """Volumes (fractions of ICV) the model is asked for under ``condition``."""
        return dict(condition.volumes) if self.normative is None else target_volumes(condition, self.normative)

    def encode_condition(self, condition: Condition) -> torch.Tensor:
        """The (1, n_conditioning) vector of the config's covariates, each scaled to [0, 1]."""
        return encode_covariates(condition, self.config.covariates, self.config.covariate_ranges,
                                 self.targets(condition), self.config.null_condition)

    def null_condition(self) -> torch.Tensor:
        """The unconditional input (all zeros, presence flag 0)."""
        return torch.zeros(1, self.config.n_conditioning)

    # -- codes <-> images -----------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        """(X, Y, Z) volume in [0, 1] on the model grid -> (x, y, z) int64 code indices."""
        x = torch.from_numpy(np.asarray(image, np.float32)[None, None]).to(self.device)
        return self.vqvae.encode(x)[0].cpu()

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> np.ndarray:
        """(x, y, z) code indices -> (X, Y, Z) float32 volume in [0, 1]."""
        img = self.vqvae.decode_codes(codes[None].to(self.device))
        return img.float().clamp_(0, 1)[0, 0].cpu().numpy()

    def encode(self, image: np.ndarray, bf16: bool = False) -> torch.Tensor:
        """The (x, y, z) codes of an (X, Y, Z) volume in [0, 1] (the image -> representation half
        every backend offers; ``bf16`` is accepted for the common signature: assignments are float32)."""
        return self.encode_image(image)

    def decode(self, codes: torch.Tensor, bf16: bool = False) -> np.ndarray:
        """(x, y, z) codes -> (X, Y, Z) float32 volume in [0, 1]."""
        return self.decode_codes(codes)

    # -- sampling -----------------------------------------------------------------------------
    def generate(
        self,
        condition: Condition,
        seed: int = 0,
        *,
        guidance_scale: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        threads: int | None = None,
        refine: bool | None = None,
        progress: ProgressFn | bool | None = None,
        **unused,
    ) -> SyntheticBrain:
        """Generate one brain: sample the code grid (raster order, or the x-slab wavefront of a model
        trained with ``wavefront``; :attr:`~synth.vq.transformer.CodeTransformer.schedule`), then decode it.

        Args:
            condition: Age, sex, diagnosis and optional volume targets.
            seed: Seed of the sampler; same model, condition, seed and device -> same brain.
            guidance_scale: Classifier-free guidance on the logits (default from the config).
            temperature: Softmax temperature (default from the config).
            top_k: Sample among the ``top_k`` most likely codes (default from the config).
            threads: Torch threads while decoding tokens (default 1: token-by-token work is too small to
                share; two threads were measured ten times slower on 2 cores).
            refine: Apply the model's refiner after decoding (default: as its config says; ``True`` for
                a model without one is an error).
            progress: ``True`` for a progress bar, or a callback ``f(done, total)``.
            unused: Options of other backends (``steps``, ``bf16``) are accepted and ignored, so
                callers can pass the same options to any generator. ``fast=True`` is refused: this
                backend has no fast preset, and ignoring it would sample at the full cost unasked.

        Raises:
            ValueError: a value out of range, or ``fast=True`` (no fast preset).
        """
        if unused.get("fast"):
            raise ValueError(f"model {self.config.name!r} (VQ-VAE + transformer) has no fast sampling preset: "
                             "its code grid is sampled token by token; generate without `fast`")
        if not isinstance(condition, Condition):
            raise TypeError(f"`condition` must be a synth.Condition, got {type(condition).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**63:
            raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}")
        refine = self._resolve_refine(refine)
        s = self.config.sampling
        guidance_scale = float(s.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale)
        if not 0.0 <= guidance_scale <= 20.0:
            raise ValueError(f"`guidance_scale` must be within 0-20, got {guidance_scale:g}")
        temperature = float(s.get("temperature", 1.0) if temperature is None else temperature)
        top_k = s.get("top_k") if top_k is None else top_k
        callback = progress if callable(progress) else None
        bar = None
        if progress is True:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.transformer.seq_len, desc=f"sampling ({self.engine})", leave=False)
            callback = lambda i, n: bar.update(i - bar.n)  # noqa: E731
        codes = sample_codes(self.transformer, self.encode_condition(condition), seed=int(seed),
                             guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                             threads=threads or 1, progress=callback)
        if bar:
            bar.close()
        image = zero_background(self.decode_codes(codes.view(self.code_shape())))
        if refine:
            image = self.refine(image)
        affine = self.grid.affine if self.grid else np.eye(4)
        provenance = {
            "generator": "SynthBrain",
            "synth_version": __version__,
            "backend": self.backend,
            "model": self.config.name,
            "model_version": self.config.version,
            "model_source": _model_reference(self.source),
            "sampler": (f"autoregressive, {_ORDER[self.transformer.schedule]}, {self.transformer.config['attention']} attention, "
                        f"engine {self.engine}"),
            "guidance_scale": guidance_scale,
            "temperature": temperature,
            "top_k": top_k,
            "engine": self.engine,
            "refiner": self.refiner_provenance(refine),
            "precision": "fp32",
            "device": str(self.device),
            "space": "MNI152 (RAS), affine in the NIfTI header",
            "intensity": "T1-weighted, scaled to [0, 1], skull-stripped",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "background": BACKGROUND_NOTE,
            "notice": SYNTHETIC_NOTICE,
            "history": [_step("generate", model=self.config.name, seed=int(seed))],
        }
        return SyntheticBrain(image, affine, condition, int(seed), self.targets(condition), provenance)
