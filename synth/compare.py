"""Headline figures of several ``synthbrain evaluate`` reports side by side, against the realism targets.

Choosing a checkpoint, a sampler or a model means reading the same dozen figures across reports; this puts
them in one Markdown table (and one PNG), each figure marked against the target the project steers by::

    synthbrain compare-reports docs/evaluation/synthbrain-ldm-2mm runs/eval/step-8000 --names shipped 8k \\
        --out compare.md --plot compare.png

The reports are read, never changed; a report that lacks a section (an older one, or ``--no-first-stage``)
shows ``-`` there.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .io import SYNTHETIC_NOTICE, read_json

REPORT = "report.json"


def _get(r: dict, *keys: str) -> Any:
    for k in keys:
        if not isinstance(r, dict) or k not in r:
            return None
        r = r[k]
    return r


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _kid_met(r: dict) -> bool | None:
    kid, yard = _get(r, "distances", "samples", "kid"), _get(r, "distances", "yardstick", "kid")
    if kid is None or yard is None:
        return None
    if yard > 0:
        return kid["mean"] <= 2 * yard
    # KID is unbiased, so two real sets can read below 0; then "2x the yardstick" means "indistinguishable from 0"
    return kid["mean"] - 2 * kid.get("sem", 0.0) <= 0


@dataclass(frozen=True)
class Measure:
    """One row: how to read it from a report, print it, and (where the project has one) judge it."""

    label: str
    value: Callable[[dict], float | None]  # the plotted number (None: not in this report)
    text: Callable[[dict], str]  # the table cell (called only when ``value`` is not None)
    target: str = ""  # "" : reported, not a target
    met: Callable[[dict], bool | None] | None = None
    line: Callable[[dict], float | None] | None = None  # the target as a value, for the plot
    symmetric: bool = False  # the target is a band, -line to +line
    chance: float | None = None  # drawn dotted: the value of brains no one can tell from scans
    plot_note: str = ""  # added to the plot's title, where the bar is not the cell's first number
    volume: bool = False  # measured by the segmenter (the warp's own precision on volume-matched brains)
    plotted: bool = True


def _vol(structure: str, key: str) -> Callable[[dict], float | None]:
    return lambda r: _get(r, "volumes", "samples", structure, key)


MEASURES: tuple[Measure, ...] = (
    Measure("classifier two-sample accuracy, 3D CNN", lambda r: _get(r, "c2st", "cnn", "accuracy"),
            lambda r: f"{_pct(r['c2st']['cnn']['accuracy'])} ({100 * r['c2st']['cnn']['ci95'][0]:.1f}-"
                      f"{_pct(r['c2st']['cnn']['ci95'][1])})",
            "≤ 70 % (50 % = indistinguishable)", lambda r: r["c2st"]["cnn"]["accuracy"] <= 0.70, lambda r: 0.70, chance=0.5),
    Measure("the same on the first stage's reconstructions (its ceiling)",
            lambda r: _get(r, "first_stage", "cnn", "accuracy"), lambda r: _pct(r["first_stage"]["cnn"]["accuracy"]),
            plotted=False),
    Measure("random-conv texture classifier", lambda r: _get(r, "c2st", "logistic_random_conv", "accuracy"),
            lambda r: _pct(r["c2st"]["logistic_random_conv"]["accuracy"]), plotted=False),
    Measure("FID on the feature network / yardstick", lambda r: _get(r, "distances", "fid_ratio"),
            lambda r: f"{r['distances']['samples']['fid']:.2f} / {r['distances']['yardstick']['fid']:.2f}",
            "≤ 2x the yardstick", lambda r: r["distances"]["fid_ratio"] <= 2, lambda r: 2.0, plot_note=" (bars: the ratio)"),
    Measure("KID (mean ± s.e.; yardstick)", lambda r: _get(r, "distances", "samples", "kid", "mean"),
            lambda r: f"{r['distances']['samples']['kid']['mean']:.2f} ± {r['distances']['samples']['kid'].get('sem', 0):.2f}"
                      f"; {r['distances']['yardstick']['kid']:.2f}",
            "≤ 2x the yardstick (≤ 0: within 2 s.e. of 0)", _kid_met),
    Measure("texture FD on the random-conv bank / yardstick", lambda r: _get(r, "distances_texture", "samples", "fid"),
            lambda r: f"{r['distances_texture']['samples']['fid']:.1f} / {r['distances_texture']['yardstick']['fid']:.2f}",
            line=lambda r: _get(r, "distances_texture", "yardstick", "fid")),
    Measure("first stage in the brain: PSNR / SSIM", lambda r: _get(r, "first_stage", "psnr_mean"),
            lambda r: f"{r['first_stage']['psnr_mean']:.1f} dB / {r['first_stage']['ssim_mean']:.3f}",
            "≥ 28 dB and ≥ 0.92",
            lambda r: r["first_stage"]["psnr_mean"] >= 28 and r["first_stage"]["ssim_mean"] >= 0.92, lambda r: 28.0),
    Measure("brain age of samples: r / mean error", lambda r: _get(r, "brain_age", "samples", "r"),
            lambda r: f"{r['brain_age']['samples']['r']:.2f} / {r['brain_age']['samples']['mae']:.1f} y",
            "r ≥ 0.8", lambda r: r["brain_age"]["samples"]["r"] >= 0.8, lambda r: 0.8),
    Measure("lateral ventricles: median signed error (r)", _vol("lateral_ventricles", "median_bias"),
            lambda r: f"{100 * _vol('lateral_ventricles', 'median_bias')(r):+.1f} % "
                      f"({_vol('lateral_ventricles', 'pearson_r')(r):.2f})",
            "within ±10 %", lambda r: abs(_vol("lateral_ventricles", "median_bias")(r)) <= 0.10, lambda r: 0.10,
            symmetric=True, volume=True),
    Measure("hippocampus: r", _vol("hippocampus", "pearson_r"), lambda r: f"{_vol('hippocampus', 'pearson_r')(r):.2f}",
            "r ≥ 0.8", lambda r: _vol("hippocampus", "pearson_r")(r) >= 0.8, lambda r: 0.8, volume=True),
    Measure("brain volume: r", _vol("brain", "pearson_r"), lambda r: f"{_vol('brain', 'pearson_r')(r):.2f}", volume=True,
            plotted=False),
    Measure("diversity: MS-SSIM within a condition - real", lambda r: _get(r, "diversity", "difference"),
            lambda r: f"{r['diversity']['samples_mean']:.3f} - {r['diversity']['real_mean']:.3f} = "
                      f"{r['diversity']['difference']:+.3f}",
            "within ±0.05", lambda r: abs(r["diversity"]["difference"]) <= 0.05, lambda r: 0.05, symmetric=True),
    Measure("privacy rule (samples above every new person)", lambda r: (None if _get(r, "privacy", "pass") is None
                                                                       else float(r["privacy"]["pass"])),
            lambda r: f"{'pass' if r['privacy']['pass'] else 'FAIL'} ({r['privacy']['samples_above_heldout_max']})",
            "pass", lambda r: bool(r["privacy"]["pass"]), plotted=False),
    Measure("generation, seconds a brain", lambda r: (None if _get(r, "seconds", "generation") is None
                                                      or not _get(r, "distances", "n_samples")
                                                      else r["seconds"]["generation"] / r["distances"]["n_samples"]),
            lambda r: f"{r['seconds']['generation'] / r['distances']['n_samples']:.1f} s"
                      + (" (--cache: some may be loaded, not made)" if _get(r, "options", "cache_dir") else ""), plotted=False),
)


def load_report(path: str | Path) -> dict:
    """A ``report.json`` written by ``synthbrain evaluate``, or the folder holding one.

    Raises:
        FileNotFoundError: no such file, or a folder without ``report.json``.
        ValueError: the file is not an evaluation report.
    """
    p = Path(path)
    if p.is_dir():
        p = p / REPORT
    if not p.is_file():
        raise FileNotFoundError(f"expected a {REPORT} written by `synthbrain evaluate` (or its folder), got {path}")
    try:
        r = read_json(p)
    except ValueError as exc:
        raise ValueError(f"{p} is not JSON ({exc})") from None
    if not isinstance(r, dict) or not isinstance(r.get("generator"), dict) or not isinstance(r.get("c2st"), dict):
        raise ValueError(f"{p} is not a `synthbrain evaluate` report (no generator and c2st sections)")
    return r


def describe(r: dict) -> str:
    """A short column name: model, version and how its brains were made."""
    g = r["generator"]
    how = [str(g.get("sampler", "")).split(",")[0].split(" (")[0]]  # "autoregressive, x-slab ...": the first word
    how += ["fast"] if (_get(r, "options", "generate_options") or {}).get("fast") else []
    how += ["refiner"] if g.get("refiner") else ["no refiner"] if g.get("refiner") is False else []
    how += ["matched"] if g.get("volume_matching") else []
    return f"{g.get('name', '?')} {g.get('version', '?')} ({', '.join(h for h in how if h)})"


def verdicts(r: dict) -> dict[str, bool | None]:
    """Each targeted measure's label -> met (True / False), or None where the report lacks it."""
    out = {}
    for m in MEASURES:
        if m.met is not None:
            out[m.label] = None if m.value(r) is None else bool(m.met(r))
    return out


def markdown_table(reports: Sequence[dict], names: Sequence[str] | None = None,
                   paths: Sequence[str] | None = None, notes: bool = True) -> str:
    """The reports' headline figures as one Markdown table, each targeted figure marked met or not.

    ``notes``: with the synthetic-image notice above and where each report came from below (off inside a
    report, which has both already)."""
    names = list(names) if names else [describe(r) for r in reports]
    if len(names) != len(reports):
        raise ValueError(f"expected one name a report ({len(reports)}), got {len(names)}")
    L = ([f"> {SYNTHETIC_NOTICE}. Figures of generated brains from `synthbrain evaluate` reports.", ""] if notes else []) + [
         "| measure | target | " + " | ".join(n.replace("|", "/") for n in names) + " |",
         "| --- " * (len(reports) + 2) + "|"]
    for m in MEASURES:
        cells = []
        for r in reports:
            if m.value(r) is None:
                cells.append("-")
                continue
            try:
                text = m.text(r)
            except (KeyError, TypeError, IndexError):  # an older report with the figure but not all its parts
                text = "(incomplete)"
            ok = m.met(r) if m.met else None
            warp = " (*)" if m.volume and _get(r, "generator", "volume_matching") else ""
            cells.append(text + warp + ("" if ok is None else " (met)" if ok else " (**not met**)"))
        L.append(f"| {m.label} | {m.target or '-'} | " + " | ".join(cells) + " |")
    met = [sum(v is True for v in verdicts(r).values()) for r in reports]
    judged = [sum(v is not None for v in verdicts(r).values()) for r in reports]
    L.append("| targets met | | " + " | ".join(f"{a} of {b}" for a, b in zip(met, judged)) + " |")
    if notes and any(_get(r, "generator", "volume_matching") for r in reports):
        L += ["", "(*) brains warped to their requested volumes (`--match-volumes`), measured by the segmenter the warp "
                  "steers by: the warp's precision, not the model's."]
    if not notes:
        return "\n".join(L) + "\n"
    L += ["", "Reports:"]
    for i, r in enumerate(reports):
        g, hw = r["generator"], r.get("hardware", {})
        where = f" `{paths[i]}`" if paths else ""
        L.append(f"- {names[i]}:{where} {g.get('name')} {g.get('version')}, {r.get('date', '?')}, "
                 f"{r.get('data', {}).get('n_heldout', '?')} held-out subjects, {g.get('precision', '?')} on "
                 f"{hw.get('cpu', '?')} ({hw.get('cores', '?')} cores)")
    return "\n".join(L) + "\n"


def plot(reports: Sequence[dict], names: Sequence[str], path: str | Path) -> Path:
    """One bar panel a measure (the reports side by side), its target dashed; green where met. Written atomically."""
    from .report import _plt, _save

    plt = _plt()
    panels = [m for m in MEASURES if m.plotted and any(m.value(r) is not None for r in reports)]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 2.9 * rows + 0.6 + 0.25 * math.ceil(len(reports) / 2)), squeeze=False)
    x = range(len(reports))
    letters = [chr(ord("A") + i) if i < 26 else str(i + 1) for i in range(len(reports))]
    for ax, m in zip(axes.flat, panels):
        vals = [m.value(r) for r in reports]
        colours = []
        for r, v in zip(reports, vals):
            ok = None if v is None or m.met is None else m.met(r)
            colours.append("#2e8b57" if ok else "#c0504d" if ok is False else "#7f7f7f")
        bars = ax.bar(x, [float("nan") if v is None else v for v in vals], color=colours)
        if m.volume:  # volume-matched brains: the warp's precision, not the model's
            for bar, r in zip(bars, reports):
                if _get(r, "generator", "volume_matching"):
                    bar.set_hatch("//")
        for i, v in enumerate(vals):
            if v is None:
                ax.annotate("not\nmeasured", (i, 0), ha="center", va="bottom", fontsize=6, color="#7f7f7f")
        if m.chance is not None:
            ax.axhline(m.chance, ls=":", color="k", lw=1)
        lines = {y for y in (m.line(r) for r in reports) if y is not None} if m.line is not None else set()
        for y in lines | ({-y for y in lines} if m.symmetric else set()):
            ax.axhline(y, ls="--", color="k", lw=1)
        ax.set_title(m.label + m.plot_note + (f"\ntarget {m.target}" if m.target else "\ndashed: real yardstick"), fontsize=8)
        ax.set_xticks(list(x))
        ax.set_xticklabels(letters, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("synthbrain evaluate reports side by side (green: target met, red: not met; hatched: volume-matched "
                 "brains, the warp's precision). "
                 "Generated brains are synthetic, not for clinical use.", fontsize=9)
    key = [f"{a}: {textwrap.shorten(n, 60, placeholder='…')}" for a, n in zip(letters, names)]
    fig.text(0.01, 0.005, "\n".join("    ".join(key[i:i + 2]) for i in range(0, len(key), 2)), fontsize=8, va="bottom")
    fig.tight_layout(rect=(0, 0.03 + 0.025 * math.ceil(len(key) / 2), 1, 0.96))
    out = Path(path)
    _save(fig, out)
    return out


def add_parser(sub) -> None:
    """Register ``compare-reports`` on the CLI's sub-parsers (light: matplotlib only with --plot)."""
    p = sub.add_parser("compare-reports", help="headline figures of several `synthbrain evaluate` reports side by side, "
                                               "against the realism targets (Markdown table, optional PNG)")
    p.add_argument("reports", nargs="+", help="report.json files written by `synthbrain evaluate`, or their folders")
    p.add_argument("--names", nargs="+", default=None, help="column names, one a report (default: model, version, sampling)")
    p.add_argument("--out", default=None, help="also write the table to this .md file")
    p.add_argument("--plot", default=None, help="also draw the targeted figures as bars in this .png")
    p.add_argument("--force", action="store_true", help="overwrite --out / --plot")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args) -> int:
    from .cli import UsageError
    from .io import atomic_path, check_writable

    if args.names is not None and len(args.names) != len(args.reports):
        raise UsageError(f"--names expects one name a report ({len(args.reports)}), got {len(args.names)}")
    for flag, value, suffix in (("--out", args.out, ".md"), ("--plot", args.plot, ".png")):
        if value is None:
            continue
        if not str(value).lower().endswith(suffix):
            raise UsageError(f"{flag} expects a {suffix} path, got {value}")
        if Path(value).exists() and not args.force:
            raise UsageError(f"refusing to overwrite {value} (use --force)")
        check_writable(value)
    try:
        reports = [load_report(p) for p in args.reports]
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    names = args.names or [describe(r) for r in reports]
    table = markdown_table(reports, names, args.reports)
    print(table, end="")
    if args.out:
        with atomic_path(args.out) as tmp:
            Path(tmp).write_text(table, encoding="utf-8")
        print(f"wrote {args.out}")
    if args.plot:
        print(f"wrote {plot(reports, names, args.plot)}")
    return 0
