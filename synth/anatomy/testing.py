"""Labelled phantoms and a tiny trained segmenter, for tests and demos (seconds on CPU, no real data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..grid import Grid
from .segmenter import NUM_CLASSES, SegmenterConfig

__all__ = ["PHANTOM_CLASSES", "phantom", "tiny_network", "make_tiny_segmenter"]

# Unsided structures (a left-right mirror keeps their labels) and their phantom intensities.
PHANTOM_CLASSES = {"CSF": (30, 0.3), "Brain-Stem": (27, 0.65), "Corpus-Callosum": (5, 0.95)}


def phantom(shape=(32, 32, 32), rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A nested-ellipsoid phantom: ``(image in [0, 1] float32, compact labels uint8)``.

    A CSF ellipsoid (intensity 0.3) holds a brain-stem ball (0.65) and a corpus-callosum ball
    (0.95); sizes and positions jitter with ``rng`` (default: centred, no jitter).
    """
    shape = tuple(int(s) for s in shape)
    c = np.asarray(shape, float) / 2 - 0.5
    ijk = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"), -1)
    jitter = (lambda n, a: rng.uniform(-a, a, n)) if rng is not None else (lambda n, a: np.zeros(n))
    s = np.asarray(shape, float)
    labels = np.zeros(shape, np.uint8)
    image = np.zeros(shape, np.float32)
    body = (((ijk - c - jitter(3, 1.0)) / (s * (0.38 + jitter(3, 0.03)))) ** 2).sum(-1) <= 1
    parts = [
        (body, *PHANTOM_CLASSES["CSF"]),
        (np.linalg.norm(ijk - (c + [0, -s[1] * 0.14, -s[2] * 0.1] + jitter(3, 1.5)), axis=-1) <= s.min() * (0.2 + jitter(1, 0.02)), *PHANTOM_CLASSES["Brain-Stem"]),
        (np.linalg.norm(ijk - (c + [0, s[1] * 0.16, s[2] * 0.12] + jitter(3, 1.5)), axis=-1) <= s.min() * (0.18 + jitter(1, 0.02)), *PHANTOM_CLASSES["Corpus-Callosum"]),
    ]
    for mask, label, value in parts:
        labels[mask & body] = label
        image[mask & body] = value
    return image, labels


def tiny_network() -> dict:
    """Keyword arguments of a 2-level UNet with about 20 k parameters."""
    return {"spatial_dims": 3, "in_channels": 1, "out_channels": NUM_CLASSES, "channels": [8, 16],
            "strides": [2], "num_res_units": 1, "norm": "instance"}


def make_tiny_segmenter(folder: str | Path, grid: Grid, steps: int = 80, seed: int = 0, run_dir: str | Path | None = None) -> Path:
    """Train a tiny segmenter on phantoms of ``grid``'s shape for ``steps`` steps and save it.

    Returns the model folder, loadable by :func:`synth.anatomy.load_segmenter`.
    """
    import tempfile

    from .training import SegTrainConfig, export_segmenter, train_segmenter

    rng = np.random.default_rng(seed)
    pairs = [phantom(grid.shape, rng) for _ in range(8)]
    data = (np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SegTrainConfig(run_dir=str(run_dir or tmp), network=tiny_network(), steps=steps, max_minutes=5.0,
                             lr=1e-2, lr_min=1e-3, warmup=5, bf16=False, seed=seed, ckpt_every=10_000, eval_every=0,
                             threads=1)
        model, _ = train_segmenter(cfg, data=data, val=None, progress=False)
    config = SegmenterConfig(
        name="tiny-test-segmenter", version="0.0.0-test", network=tiny_network(),
        grid={"shape": list(grid.shape), "spacing": grid.spacing, "origin": list(grid.origin)},
        training={"data": "phantoms", "steps": steps, "notice": "for tests only"},
    )
    return export_segmenter(model, folder, config)
