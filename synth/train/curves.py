"""Training curves of a run folder as one PNG: ``synthbrain plot-run RUN``.

Any trainer's ``losses.csv`` (autoencoder, diffusion, refiner, VQ-VAE, transformer, feature network): each
numeric column in its own panel, the noisy per-step values faint and their moving average on top; the
learning rate on a log scale. With a diffusion run's ``gap.csv`` (``train-diffusion --gap-every``), one more
panel: the UNet's denoising error on held-out against training subjects, the ratio that shows it learning
its training brains by heart. Reads only CSV files, so it runs beside a training job without disturbing it
(the files are flushed every line).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

__all__ = ["read_curves", "plot_run"]

_SKIP = {"step", "time_s"}


def read_curves(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{column: [(step, value), ...]}`` of a trainer's CSV, blank and non-numeric cells left out."""
    curves: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:  # nothing written yet (a trainer flushes its header with the first row)
            return curves
        if "step" not in reader.fieldnames:
            raise ValueError(f"{path} is not a training log (expected a CSV with a 'step' column)")
        for row in reader:
            try:
                step = int(row["step"])
            except (TypeError, ValueError):
                continue
            for key, cell in row.items():
                if key in _SKIP or key is None or cell in (None, ""):
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    continue
                if math.isfinite(value):
                    curves.setdefault(key, []).append((step, value))
    return curves


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over at most ``window`` values (the first points average what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None, smooth: int = 100) -> Path:
    """Write the run's training curves to ``out`` (default ``RUN/curves.png``) atomically; returns its path.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``losses.csv``.
        ValueError: the log holds no numeric column yet, or ``smooth`` is below 1.
    """
    run = Path(run_dir)
    if smooth < 1:
        raise ValueError(f"smooth must be at least 1 step, got {smooth}")
    losses = run / "losses.csv"
    if not losses.is_file():
        raise FileNotFoundError(f"{run} holds no losses.csv (expected a training run folder)")
    curves = read_curves(losses)
    if not curves:
        raise ValueError(f"{losses} holds no logged values yet")
    gap = read_curves(run / "gap.csv") if (run / "gap.csv").is_file() else {}
    gap_ts = sorted({int(k.split("_t")[1]) for k in gap if k.startswith("ratio_t")})

    from ..report import _plt, _save

    plt = _plt()
    panels = list(curves) + (["gap"] if gap_ts else [])
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    for ax, name in zip(axes.flat, panels):
        if name == "gap":
            for i, t in enumerate(gap_ts):
                steps, ratio = zip(*gap[f"ratio_t{t}"])
                ax.plot(steps, ratio, "o-", color=f"C{i}", label=f"t = {t}")
            ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
            ax.set_title("denoising error, held-out / training", fontsize=9)
            ax.set_ylabel("ratio (1 = generalises)")
            ax.legend(fontsize=7)
        else:
            steps, values = zip(*curves[name])
            if name == "lr":
                ax.plot(steps, values, color="C2")
                ax.set_yscale("log")
            else:
                window = min(smooth, max(1, len(values) // 5))
                ax.plot(steps, values, color="C0", alpha=0.25, lw=0.6)
                ax.plot(steps, moving_average(values, window), color="C0", lw=1.4,
                        label=f"mean of {window} steps" if window > 1 else None)
                if window > 1:
                    ax.legend(fontsize=7)
                if min(values) > 0 and max(values) / min(values) > 50:
                    ax.set_yscale("log")
            ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    last = max(s for c in curves.values() for s, _ in c)
    fig.suptitle(f"{run.resolve()}: step {last}", fontsize=9)
    fig.tight_layout()
    path = Path(out) if out is not None else run / "curves.png"
    _save(fig, path)
    return path


def add_parser(sub) -> None:
    """Register ``plot-run`` on the CLI's sub-parsers (light: no torch, matplotlib only when it runs)."""
    from ..cli import _positive_int

    p = sub.add_parser("plot-run", help="plot a training run's losses (and its held-out gap) as a PNG")
    p.add_argument("run", help="a training run folder (holding losses.csv)")
    p.add_argument("--out", default=None, help="the PNG to write (default RUN/curves.png)")
    p.add_argument("--smooth", type=_positive_int, default=100, help="steps in the moving average (default 100)")
    p.set_defaults(func=_cmd_plot_run)


def _cmd_plot_run(args) -> int:
    if args.out is not None and not str(args.out).lower().endswith(".png"):
        raise ValueError(f"--out expects a .png path, got {args.out}")
    path = plot_run(args.run, args.out, args.smooth)
    print(f"wrote {path}")
    return 0
