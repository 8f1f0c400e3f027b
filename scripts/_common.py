"""What the model-diagnosis scripts (``denoising_gap.py``, ``latent_bands.py``) share: their common arguments,
and loading the model and the prepared data with a one-line error (exit 2) when either is missing."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def diagnosis_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with ``--model``, ``--data``, ``--out`` (JSON of the figures) and ``--threads``; the first line
    of ``doc`` describes it."""
    from synth.data.prepare import default_cache_dir

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", default="synthbrain-ldm-2mm", help="a latent diffusion model (name or folder)")
    p.add_argument("--data", default=str(default_cache_dir() / "ixi-2mm"), help="prepared data (synthbrain prepare)")
    p.add_argument("--out", required=True, help="JSON of the figures")
    p.add_argument("--threads", type=int, default=2)
    return p


def load_model_and_data(p: argparse.ArgumentParser, args: argparse.Namespace):
    """``(generator, PreparedData)`` on the CPU with ``args.threads`` threads; ``p.error`` (exit 2) if the
    data folder is not prepared or the model is not a latent diffusion model."""
    import torch

    import synth
    from synth.data import PreparedData

    torch.set_num_threads(args.threads)
    try:
        data = PreparedData.load(args.data)
    except FileNotFoundError as exc:
        p.error(str(exc))
    gen = synth.load_generator(args.model, device="cpu")
    if not hasattr(gen, "sample_latent"):
        p.error(f"{args.model} is not a latent diffusion model (expected one with latents, e.g. synthbrain-ldm-2mm)")
    return gen, data
