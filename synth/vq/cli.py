"""``compress``, ``decompress``, ``train-vqvae``, ``train-transformer`` and ``package-vq``: the VQ verbs.

The main CLI calls :func:`add_parsers`. Every argument and path check runs before torch or a model
loads; bad input raises ``ValueError``/``FileNotFoundError`` with one line (exit code 2), and
nothing is written. Each verb says which transformer engine runs (``fast-transformers`` or the
plain-torch fallback).

Examples::

    synthbrain compress t1_on_grid.nii.gz t1.sbz
    synthbrain decompress t1.sbz t1_back.nii.gz
    synthbrain train-vqvae --run-dir /root/runs/vqvae --init-autoencoder assets/models/synthbrain-ldm-2mm
    synthbrain train-transformer --vq-run /root/runs/vqvae --run-dir /root/runs/vqtf
    synthbrain package-vq --tf-run /root/runs/vqtf --out assets/models/synthbrain-vq-2mm
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_parsers", "DEFAULT_VQ_MODEL"]

DEFAULT_VQ_MODEL = "synthbrain-vq-2mm"
ENGINE_CHOICES = ("auto", "fast-transformers", "torch")


def _usage(msg: str):
    from ..cli import UsageError

    return UsageError(msg)


def _engine(text: str) -> str:
    if text not in ENGINE_CHOICES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(ENGINE_CHOICES)}, got {text!r}")
    return text


def _model_folder(name_or_path: str) -> Path:
    """The folder of a VQ model (name in the models folder, or a path), checked to be ``backend: vq``."""
    from ..generators import available_models, model_backend, models_dir

    for folder in (Path(name_or_path), models_dir() / name_or_path):
        if (folder / "config.json").is_file():
            backend = model_backend(folder)
            if backend != "vq":
                raise _usage(f"--model {name_or_path} is a {backend or 'non-generator'} model; the codec needs a vq model")
            return folder
    vq = [m.name for m in available_models(details=True) if m.backend == "vq"]
    raise FileNotFoundError(f"no VQ model named or found at {name_or_path!r}; shipped VQ models: {', '.join(vq) or 'none'}")


def _load(folder: Path, engine: str, device: str = "cpu"):
    from .generator import VQBrainGenerator

    return VQBrainGenerator.from_folder(folder, device=device, engine=engine)


def _cmd_compress(args: argparse.Namespace) -> int:
    from ..codec import compress_file
    from ..io import nifti_suffix

    src, dst = Path(args.input), Path(args.output)
    if not src.is_file():
        raise FileNotFoundError(f"no such file: {src}")
    nifti_suffix(src)
    if dst.suffix != ".sbz":
        raise _usage(f"the output must end in .sbz, got {args.output!r}")
    if dst.exists() and not args.force:
        raise _usage(f"refusing to overwrite {dst} (use --force)")
    folder = _model_folder(args.model)
    gen = _load(folder, args.engine, args.device)
    r = compress_file(src, dst, gen, force=args.force, register=args.register)
    print(f"wrote {dst}: {r['bytes']:,} bytes ({r['percent_of_uint8_voxels']:.2f} % of the uint8 voxels, "
          f"{100 * r['bytes'] / r['input_bytes']:.2f} % of {src.name}) in {r['seconds']:.1f} s; "
          f"model {gen.config.name}, engine {gen.engine}"
          + ("; registered to the model grid (affine to MNI152, brain mask)" if r["registered"] else ""))
    return 0


def _cmd_decompress(args: argparse.Namespace) -> int:
    from ..brain import sidecar_path
    from ..codec import decompress_file, read_header
    from ..io import nifti_suffix

    src, dst = Path(args.input), Path(args.output)
    if not src.is_file():
        raise FileNotFoundError(f"no such file: {src}")
    nifti_suffix(dst)
    for p in (dst, sidecar_path(dst)):
        if p.exists() and not args.force:
            raise _usage(f"refusing to overwrite {p} (use --force)")
    header = read_header(src.read_bytes(), src.name)
    folder = _model_folder(args.model or header.model)
    engine = args.engine
    if engine == "auto":
        from .transformer import fast_transformers_available

        engine = header.engine if header.engine == "torch" or fast_transformers_available() else "torch"
        if engine != header.engine:
            print(f"note: {src.name} was encoded with {header.engine}, which is not installed; trying {engine}", file=sys.stderr)
    gen = _load(folder, engine, args.device)
    r = decompress_file(src, dst, gen, force=args.force)
    print(f"wrote {dst} and {r['sidecar']} in {r['seconds']:.1f} s (lossy reconstruction; not for clinical use); "
          f"model {gen.config.name}, engine {gen.engine}")
    return 0


def _cmd_train_vqvae(args: argparse.Namespace) -> int:
    from .train import VQTrainConfig, train_vqvae
    from .vqvae import DEFAULT_VQVAE

    if args.init_autoencoder and not Path(args.init_autoencoder).exists():
        raise FileNotFoundError(f"--init-autoencoder: no such model folder, run folder or file: {args.init_autoencoder}")
    vq = {**DEFAULT_VQVAE, "autoencoder": dict(DEFAULT_VQVAE["autoencoder"])}
    vq.update(num_embeddings=args.codebook_size, embedding_dim=args.code_dim)
    cfg = VQTrainConfig(data_dir=args.data, run_dir=args.run, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        bf16=not args.no_bf16, seed=args.seed, max_minutes=args.max_minutes, eval_every=args.eval_every,
                        init_autoencoder=args.init_autoencoder, vqvae=vq, decoder_only=args.decoder_only,
                        kmeans_volumes=args.kmeans_volumes)
    state = train_vqvae(cfg, progress=not args.quiet)
    print(f"VQ-VAE at step {state['step']} in {args.run}/last.pt (best validation PSNR {state['best_psnr']:.2f} dB)")
    return 0


def _cmd_train_transformer(args: argparse.Namespace) -> int:
    from .train import DEFAULT_TRANSFORMER, TFTrainConfig, train_transformer
    from .transformer import resolve_engine

    if not (Path(args.vq_run) / "last.pt").is_file():  # else a VQ model, by name or folder
        try:
            args.vq_run = str(_model_folder(args.vq_run))
        except FileNotFoundError:
            raise FileNotFoundError(f"--vq-run expects a VQ-VAE run folder holding last.pt or a VQ model (name or "
                                    f"folder), got {args.vq_run}") from None
    if args.init_from:
        args.init_from = str(_model_folder(args.init_from))
    if args.d_model % args.heads:
        raise _usage(f"--d-model ({args.d_model}) must divide by --heads ({args.heads})")
    engine = resolve_engine(args.engine)
    window = {"slab": "slab", "none": None}.get(args.window, args.window)
    if window not in ("slab", None):
        try:
            window = int(window)
        except ValueError:
            raise _usage(f"--window expects slab, none or a number of tokens, got {args.window!r}") from None
    tf = dict(DEFAULT_TRANSFORMER, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
              d_ff=4 * args.d_model, attention=args.attention, window=window,
              wavefront=not args.no_wavefront and window is not None)
    cfg = TFTrainConfig(data_dir=args.data, vq_run=args.vq_run, run_dir=args.run, steps=args.steps,
                        batch_size=args.batch_size, lr=args.lr, p_uncond=args.p_uncond, bf16=not args.no_bf16,
                        seed=args.seed, max_minutes=args.max_minutes, engine=engine, transformer=tf,
                        init_from=args.init_from)
    print(f"transformer engine: {engine}; decoding schedule of the trained model: "
          f"{'wavefront' if tf['wavefront'] else 'sequential'}")
    state = train_transformer(cfg, progress=not args.quiet)
    print(f"transformer at step {state['step']} in {args.run}/last.pt (engine {state['engine']})")
    return 0


def _cmd_package_vq(args: argparse.Namespace) -> int:
    from .package import package_vq_model

    if not (Path(args.tf_run) / "last.pt").is_file():
        raise FileNotFoundError(f"--tf-run expects a transformer run folder holding last.pt, got {args.tf_run}")
    folder = package_vq_model(args.tf_run, args.out, name=args.name, version=args.version,
                              guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k,
                              vq_checkpoint=args.vq_checkpoint)
    print(f"packaged VQ model in {folder}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the VQ verbs to the main parser's ``sub``-parsers."""
    from ..cli import _nonnegative_float, _positive_int

    def default_data() -> str:
        import os

        root = os.environ.get("SYNTHBRAIN_CACHE", str(Path.home() / ".cache" / "synthbrain"))
        return str(Path(root) / "ixi-2mm")

    c = sub.add_parser("compress", help="compress a T1 NIfTI on the model grid to a few kB (.sbz, neural codec)")
    c.add_argument("input", help="T1 NIfTI on the model grid (80x96x80, 2 mm MNI152, RAS)")
    c.add_argument("output", help="output .sbz file")
    c.add_argument("--model", default=DEFAULT_VQ_MODEL, help=f"VQ model name or folder (default {DEFAULT_VQ_MODEL})")
    c.add_argument("--engine", type=_engine, default="auto", help="transformer engine: auto, fast-transformers or torch")
    c.add_argument("--device", default="cpu", help="cpu (default; bit-exact decoding needs the same device)")
    c.add_argument("--register", action="store_true",
                   help="register an input that is not on the model grid (affine to MNI152, brain mask) instead of refusing it")
    c.add_argument("--force", action="store_true", help="overwrite the output")
    c.set_defaults(func=_cmd_compress)

    d = sub.add_parser("decompress", help="decompress a .sbz file to a NIfTI (+ JSON sidecar)")
    d.add_argument("input", help=".sbz file")
    d.add_argument("output", help="output NIfTI (.nii.gz or .nii)")
    d.add_argument("--model", default=None, help="VQ model name or folder (default: the one named in the file)")
    d.add_argument("--engine", type=_engine, default="auto", help="transformer engine (default: the file's, if installed)")
    d.add_argument("--device", default="cpu", help="cpu (default)")
    d.add_argument("--force", action="store_true", help="overwrite the outputs")
    d.set_defaults(func=_cmd_decompress)

    for verb in ("train-vqvae", "train-transformer"):
        t = sub.add_parser(verb, help=("train the VQ-VAE (resumes from RUN/last.pt)" if verb == "train-vqvae"
                                       else "train the code transformer on a VQ-VAE run's codes (resumes from RUN/last.pt)"))
        t.add_argument("--data", default=default_data(), help="prepared data folder")
        t.add_argument("--run-dir", "--run", dest="run", required=True, help="run folder for checkpoints and losses.csv")
        t.add_argument("--steps", type=_positive_int, default=2000)
        t.add_argument("--seed", type=int, default=0)
        t.add_argument("--max-minutes", type=_nonnegative_float, default=None, help="stop (with a checkpoint) after this many minutes")
        t.add_argument("--no-bf16", action="store_true", help="train in float32")
        t.add_argument("--quiet", action="store_true")
        if verb == "train-vqvae":
            t.add_argument("--batch-size", type=_positive_int, default=1)
            t.add_argument("--lr", type=float, default=3e-4)
            t.add_argument("--init-autoencoder", default=None,
                           help="start from an AutoencoderKL: a model folder (e.g. assets/models/synthbrain-ldm-2mm) or a run folder")
            t.add_argument("--codebook-size", type=_positive_int, default=512)
            t.add_argument("--code-dim", type=_positive_int, default=4)
            t.add_argument("--decoder-only", action="store_true",
                           help="freeze the encoder and the (k-means) codebook, train the decoder on cached codes")
            t.add_argument("--kmeans-volumes", type=_positive_int, default=32,
                           help="training volumes whose encoder outputs initialise the codebook (k-means)")
            t.add_argument("--eval-every", type=int, default=0,
                           help="every N steps, measure reconstruction in the brain on validation subjects (val.csv, best.pt)")
            t.set_defaults(func=_cmd_train_vqvae)
        else:
            t.add_argument("--vq-run", required=True,
                           help="the VQ-VAE's run folder (its best.pt if present, else last.pt), or a VQ model folder "
                                "(e.g. assets/models/synthbrain-vq-2mm: the shipped VQ-VAE, so the codes match its codec)")
            t.add_argument("--init-from", default=None,
                           help="start from this VQ model folder's transformer, with its architecture and conditioning "
                                "ranges (the architecture flags are then ignored); its codebook must be --vq-run's. "
                                "The packaged result has no refiner until package-refiner adds one")
            t.add_argument("--batch-size", type=_positive_int, default=4)
            t.add_argument("--lr", type=float, default=5e-4)
            t.add_argument("--engine", type=_engine, default="auto", help="auto, fast-transformers or torch")
            t.add_argument("--attention", choices=("linear", "softmax"), default="linear")
            t.add_argument("--d-model", type=_positive_int, default=128)
            t.add_argument("--layers", type=_positive_int, default=4)
            t.add_argument("--heads", type=_positive_int, default=4)
            t.add_argument("--p-uncond", type=_nonnegative_float, default=0.1, help="condition dropout (classifier-free guidance)")
            t.add_argument("--window", default="slab",
                           help="attention restarts every N tokens: slab (one x-slab of the code grid, default), none, or N")
            t.add_argument("--no-wavefront", action="store_true",
                           help="keep the previous token at every block start (older models' inputs): sampling and the "
                                "codec then decode token by token instead of all slabs side by side (default: wavefront "
                                "with a window)")
            t.set_defaults(func=_cmd_train_transformer)

    k = sub.add_parser("package-vq", help="write a VQ model folder (safetensors + config.json) from training runs")
    k.add_argument("--tf-run", required=True, help="the transformer's run folder (it records its VQ-VAE run)")
    k.add_argument("--out", required=True)
    k.add_argument("--name", default=DEFAULT_VQ_MODEL)
    k.add_argument("--version", default="0.1.0")
    k.add_argument("--guidance-scale", type=_nonnegative_float, default=1.0)
    k.add_argument("--temperature", type=_nonnegative_float, default=1.0)
    k.add_argument("--top-k", type=_positive_int, default=None)
    k.add_argument("--vq-checkpoint", default=None,
                   help="another checkpoint of the VQ-VAE run (e.g. last.pt), allowed if it gives the same codes")
    k.set_defaults(func=_cmd_package_vq)
