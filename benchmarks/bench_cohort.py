#!/usr/bin/env python
"""Cohort throughput on CPU: brains per minute, with segmentation, volumes and BIDS files written.

    nice python benchmarks/bench_cohort.py [--n 6] [--precision fp32 bf16] [--workers 1 2]

Each variant runs ``synthbrain cohort`` in a fresh process on the shipped generator and segmenter
(same spec, seed 0), into a temporary folder:
  precision  the generator's numeric path, set through ``$SYNTHBRAIN_PRECISION`` (bf16 is run only
             where the CPU computes it natively: emulated bf16 is about 100x slower)
  workers    ``--workers`` processes (on CPU each generates on one torch thread; before that change,
             one process used all threads, as in the README's 1 x 2 rows)
Reported: the wall time of the command (model loading included) and the steady rate: for each
process, ``(k - 1) / (t_last - t_first)`` over the k subjects it finished, summed over the processes,
which is what a long cohort runs at; and the CPU seconds per brain (``cpu(n) - cpu(1)`` over ``n - 1``,
a run of one subject giving the start-up cost), which other load on the machine barely changes. Every variant's images are compared with the first's of the same precision (the
same spec must give the same files whatever the number of workers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_seconds_of_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # every finished descendant, workers included
    return r.ru_utime + r.ru_stime


def run_variant(n: int, precision: str, workers: int, model: str, segmenter: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-cohort-") as tmp:
        out = Path(tmp) / "cohort"
        cmd = [sys.executable, "-m", "synth.cli", "cohort", "--n", str(n), "--age", "40:80",
               "--diagnosis", "CN:0.5,MCI:0.25,AD:0.25", "--seed", "0", "--model", model, "--segmenter", segmenter,
               "--device", "cpu", "--workers", str(workers), "--quiet", "--out", str(out)]
        env = dict(os.environ, SYNTHBRAIN_PRECISION=precision, PYTHONWARNINGS="ignore")
        t0, c0 = time.time(), cpu_seconds_of_children()
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall, cpu = time.time() - t0, cpu_seconds_of_children() - c0
        if res.returncode != 0:
            raise SystemExit(f"{precision}/{workers} failed:\n{res.stderr[-2000:]}")
        done = sorted(out.glob("sub-*/anat"))
        by_process: dict[int, list[float]] = {}  # finish times per worker process
        for anat in done:
            made_by = json.loads(next(anat.glob("*_T1w.json")).read_text())["cohort"]
            by_process.setdefault(made_by.get("worker", made_by.get("rank", 0)), []).append(anat.stat().st_mtime)
        side = json.loads(next(out.glob("sub-*/anat/*_T1w.json")).read_text())
        ran = side.get("precision") or ("bf16" if side.get("bf16") else "fp32")
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(out.glob("sub-*/anat/*.nii.gz")))).hexdigest()
    # Each process's rate between its first and last finished subject, summed over the processes.
    rates = [(len(t) - 1) / (max(t) - min(t)) for t in by_process.values() if len(t) > 1 and max(t) > min(t)]
    steady = 60.0 * sum(rates) if rates else float("nan")
    return {"precision": precision, "ran_as": ran, "workers": workers, "n": len(done), "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1),
            "brains_per_min_wall": round(60.0 * len(done) / wall, 2), "brains_per_min_steady": round(steady, 2),
            "images_sha256": digest[:16]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--precision", nargs="+", default=None, help="fp32 and/or bf16 (default: fp32, plus bf16 where native)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1])
    ap.add_argument("--model", default="synthbrain-ldm-2mm")
    ap.add_argument("--segmenter", default="synthbrain-seg-2mm")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    from synth.runtime import cpu_description, machine_line

    cpu = cpu_description()
    native = bool(cpu["native_bf16"])
    precisions = args.precision or (["fp32", "bf16"] if native else ["fp32"])
    print(machine_line())
    results = []
    for precision in precisions:
        if precision == "bf16" and not native:
            print("bf16 skipped: this CPU emulates it (about 100x slower)")
            continue
        for workers in args.workers:
            one = run_variant(1, precision, workers, args.model, args.segmenter)  # start-up and model loading
            r = run_variant(args.n, precision, workers, args.model, args.segmenter)
            # CPU time per brain without the start-up: robust to other load on the machine, unlike wall time.
            r["cpu_s_per_brain"] = round((r["cpu_s"] - one["cpu_s"]) / max(1, r["n"] - 1), 2)
            results.append(r)
            print(f"{precision:>4} (ran {r['ran_as']}) workers {workers}: {r['n']} brains in {r['wall_s']} s "
                  f"-> {r['brains_per_min_wall']} brains/min with model loading, {r['brains_per_min_steady']} steady; "
                  f"{r['cpu_s_per_brain']} CPU s per brain (start-up {one['cpu_s']} CPU s) (images {r['images_sha256']})",
                  flush=True)
    for p in precisions:
        digests = {r["images_sha256"] for r in results if r["precision"] == p}
        if len(digests) > 1:
            print(f"WARNING: {p} images differ between worker counts: {digests}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu["cpu"], "capability": cpu["capability"],
                                               "native_bf16": native, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
