#!/usr/bin/env python
"""The neural codec against classic image codecs at the same size, on the IXI test split.

    python benchmarks/bench_codec.py [--model synthbrain-vq-2mm] [--data ~/.cache/synthbrain/ixi-2mm]
                                     [--split test] [--limit N] [--no-segment] [--out codec.json]

For every subject of the split (prepared: affine to MNI, 2 mm, 80 x 96 x 80, intensities in [0, 1]):
  ours       synthbrain compress / decompress (VQ-VAE codes range-coded with the transformer)
  AVIF, JPEG XL, JPEG 2000 (imagecodecs) on the volume's axial slices tiled into one 2D mosaic,
             each at the largest quality whose file is no bigger than ours for that subject
             (AVIF as three equal channels, speed 6: this imagecodecs ignores the level for one channel);
             where even a codec's lowest quality is larger than ours, that larger file is reported
  gzip -9 and JPEG-LS: lossless references
Reported per codec (means over subjects): bytes, % of the uint8 voxel data of the grid (614,400 B),
% of the subject's prepared .nii.gz (float32, gzip), PSNR (peak 1) and SSIM inside the brain
(label > 0) against the 8-bit volume, differences of segmented volumes (brain, lateral ventricles,
hippocampus, % of the original's) and seconds to compress / decompress. The CPU and whether it has
native bf16 are printed first.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TILE = (8, 10)  # 80 axial slices -> 8 x 10 mosaic
SEG_KEYS = ("brain", "lateral_ventricles", "hippocampus")


def mosaic(v: np.ndarray) -> np.ndarray:
    x, y, z = v.shape
    s = v.transpose(2, 1, 0)  # (z, y, x) axial slices
    return s.reshape(TILE[0], TILE[1], y, x).transpose(0, 2, 1, 3).reshape(TILE[0] * y, TILE[1] * x)


def unmosaic(m: np.ndarray, shape) -> np.ndarray:
    x, y, z = shape
    return m.reshape(TILE[0], y, TILE[1], x).transpose(0, 2, 1, 3).reshape(z, y, x).transpose(2, 1, 0)


def _avif(img, q):
    import imagecodecs

    return imagecodecs.avif_encode(np.repeat(img[..., None], 3, -1), level=int(q), speed=6)


def _avif_dec(b):
    import imagecodecs

    return imagecodecs.avif_decode(b)[..., 0]


def _jxl(img, d):
    import imagecodecs

    return imagecodecs.jpegxl_encode(img, distance=float(d))


def _j2k(img, level):
    import imagecodecs

    return imagecodecs.jpeg2k_encode(img, level=float(level))


CODECS = {  # name: (encode(img, p), decode(bytes), low, high, bigger files with higher p)
    "AVIF": (_avif, _avif_dec, 0, 100, True),
    "JPEG XL": (_jxl, lambda b: __import__("imagecodecs").jpegxl_decode(b), 0.05, 25.0, False),
    "JPEG 2000": (_j2k, lambda b: __import__("imagecodecs").jpeg2k_decode(b), 10.0, 60.0, True),
}


def at_most(name: str, img: np.ndarray, budget: int, iters: int = 14):
    """(bytes, parameter) of the best quality of ``name`` whose output is at most ``budget`` bytes
    (bisection on its monotone quality parameter); the smallest file if even that is larger."""
    enc, _, lo, hi, up = CODECS[name]
    integer = name == "AVIF"
    worst = lo if up else hi
    best = (enc(img, worst), worst)
    if len(best[0]) > budget:
        return best
    a, b = lo, hi
    for _ in range(iters):
        mid = round((a + b) / 2) if integer else (a + b) / 2 if up else float(np.sqrt(a * b))
        data = enc(img, mid)
        fits = len(data) <= budget
        if fits and (len(data) > len(best[0])):
            best = (data, mid)
        if fits == up:
            a = mid
        else:
            b = mid
        if integer and b - a <= 1:
            break
    return best


def cpu_info() -> dict:
    from bench_vq_generate import cpu_info as info

    return info()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="synthbrain-vq-2mm")
    ap.add_argument("--data", default=None, help="prepared data folder (default ~/.cache/synthbrain/ixi-2mm)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--no-segment", action="store_true", help="skip the segmented-volume comparison")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from synth.codec import compress, decompress
    from synth.data.prepare import PreparedData, default_cache_dir
    from synth.metrics import psnr, ssim
    from synth.runtime import machine_line
    from synth.vq.cli import _model_folder
    from synth.vq.generator import VQBrainGenerator

    info = cpu_info()
    print(machine_line())
    gen = VQBrainGenerator.from_folder(_model_folder(args.model), device="cpu")
    print(f"model {gen.config.name} {gen.config.version}, engine {gen.engine}, schedule {gen.transformer.schedule}")
    data = PreparedData.load(args.data or default_cache_dir() / "ixi-2mm")
    rows = data.subset(args.split)[: args.limit]
    seg = None
    if not args.no_segment:
        from synth.anatomy import load_segmenter
        from synth.anatomy.volumes import measure_volumes

        seg = load_segmenter(device="cpu")
    results: dict[str, list[dict]] = {}

    def record(name, ref8, mask, recon, nbytes, t_c, t_d, nii_bytes, ref_vol):
        r = {"bytes": nbytes, "pct_uint8": 100 * nbytes / ref8.size, "pct_niigz": 100 * nbytes / nii_bytes,
             "t_compress": t_c, "t_decompress": t_d}
        if recon is not None:
            x = ref8.astype(np.float32) / 255
            r["psnr"] = psnr(x, np.clip(recon, 0, 1), mask)
            r["ssim"] = ssim(x, np.clip(recon, 0, 1), mask)
            if seg is not None:
                vol = measure_volumes(seg.segment(np.clip(recon, 0, 1).astype(np.float32)))
                for k in SEG_KEYS:
                    r[f"dvol_{k}"] = 100 * abs(vol[k] - ref_vol[k]) / ref_vol[k]
        results.setdefault(name, []).append(r)

    for i, row in enumerate(rows):
        v = np.clip(data.t1(row), 0, 1)
        v8 = np.round(v * 255).astype(np.uint8)
        mask = data.labels(row) > 0
        nii_bytes = (data.root / "volumes" / f"{row['mrid']}_t1.nii.gz").stat().st_size
        ref_vol = measure_volumes(seg.segment(v8.astype(np.float32) / 255)) if seg is not None else None
        t0 = time.perf_counter()
        blob = compress(v8.astype(np.float32) / 255, gen.grid.affine, gen)
        t1 = time.perf_counter()
        recon, _, _ = decompress(blob, gen)
        t2 = time.perf_counter()
        record("ours (VQ + transformer)", v8, mask, recon, len(blob), t1 - t0, t2 - t1, nii_bytes, ref_vol)
        mos = mosaic(v8)
        for name in CODECS:
            t0 = time.perf_counter()
            b, p = at_most(name, mos, len(blob))
            t_search = time.perf_counter() - t0
            t0 = time.perf_counter()
            CODECS[name][0](mos, p)
            t1 = time.perf_counter()
            dec = np.asarray(CODECS[name][1](b))
            t2 = time.perf_counter()
            rec = unmosaic(dec.astype(np.float32) / 255, v8.shape)
            record(name, v8, mask, rec, len(b), t1 - t0, t2 - t1, nii_bytes, ref_vol)
            results[name][-1]["param"] = p
            results[name][-1]["search_s"] = t_search
            results[name][-1]["over_budget"] = int(len(b) > len(blob))
        import imagecodecs

        t0 = time.perf_counter()
        gz = gzip.compress(v8.tobytes(), 9)
        t1 = time.perf_counter()
        record("gzip -9 (lossless)", v8, mask, None, len(gz), t1 - t0, 0.0, nii_bytes, ref_vol)
        t0 = time.perf_counter()
        ls = imagecodecs.jpegls_encode(mos)
        t1 = time.perf_counter()
        record("JPEG-LS (lossless)", v8, mask, None, len(ls), t1 - t0, 0.0, nii_bytes, ref_vol)
        print(f"[{i + 1}/{len(rows)}] {row['mrid']}: ours {len(blob):,} B, {results['ours (VQ + transformer)'][-1]['psnr']:.2f} dB; "
              f"AVIF {results['AVIF'][-1]['bytes']:,} B, {results['AVIF'][-1]['psnr']:.2f} dB", flush=True)

    print(f"\n{len(rows)} {args.split} subjects; grid 80x96x80 uint8 = {80 * 96 * 80:,} B; means:")
    head = f"{'codec':26s} {'bytes':>8s} {'% uint8':>8s} {'% nii.gz':>9s} {'PSNR':>7s} {'SSIM':>6s} " \
           f"{'dV brain/vent/hipp %':>21s} {'comp s':>7s} {'dec s':>6s}"
    print(head)
    summary = {}
    for name, rs in results.items():
        m = {k: float(np.mean([r[k] for r in rs])) for k in rs[0] if isinstance(rs[0][k], (int, float))}
        summary[name] = m
        dv = "/".join(f"{m[f'dvol_{k}']:.1f}" for k in SEG_KEYS) if "dvol_brain" in m else "-"
        ps = f"{m['psnr']:7.2f} {m['ssim']:6.3f}" if "psnr" in m else f"{'-':>7s} {'-':>6s}"
        if m.get("over_budget"):
            name = f"{name} ({100 * m['over_budget']:.0f}% larger)"
        print(f"{name:26s} {m['bytes']:8.0f} {m['pct_uint8']:8.2f} {m['pct_niigz']:9.2f} {ps} {dv:>21s} "
              f"{m['t_compress']:7.2f} {m['t_decompress']:6.2f}")
    if args.out:
        from synth.io import write_json

        write_json(args.out, {**info, "model": gen.config.name, "engine": gen.engine,
                              "schedule": gen.transformer.schedule, "split": args.split,
                              "subjects": [r["mrid"] for r in rows], "summary": summary, "per_subject": results})


if __name__ == "__main__":
    main()
