"""Train the second-generation models on one GPU within a fixed wall-clock budget.

A lent GPU comes for minutes, not hours, and without the prepared data folder (175 MB of NIfTI). So:

1. ``pack`` (here, on the CPU): the prepared IXI training split (and the validation split, with brain
   masks) as one lzma-compressed file of uint8 volumes and subject rows (about 35 MB). It holds
   scans: keep it out of the repository (``.gpu/`` is git-ignored).
2. ``run`` (on the GPU machine): unpacks, then trains three chains side by side on the one GPU,
   each a separate process using the library's own trainers:

   - ``ldm4``: AutoencoderKL (same layout as 0.3.x, so decoding costs the same on a CPU), 4 latent
     channels, adversarial patch loss; then the conditional diffusion UNet on its latents, and with
     ``--augment K`` also on those of K warped copies of every scan (default 0: on the CPU, no augmented
     fine-tune of the shipped UNet drew clearly better brains, LDM card "The prior is over-fitted"; from
     scratch it is untested, so train with and without it). The copies are made on the CPU cores while the chains calibrate, so they cost the budget
     nothing. Every 5 % of the UNet's steps its denoising error on the val subjects against training
     subjects goes to ``ldm/gap.csv`` (exported with the logs): the over-fitting curve of each arm;
   - ``ldm8``: the same with 8 latent channels (measures whether a richer latent beats a simpler prior);
   - ``vq``: the VQ-VAE (initialised from the shipped LDM first stage, codebook by k-means, trained
     whole with dead-code restarts); then the code transformer (torch engine: same weights as
     fast-transformers').

   First every chain runs a few steps of each stage (a smoke test that also times a step, so a
   failure costs seconds, not the budget); then each stage trains for its share of the budget, with
   the number of steps (and so the cosine schedule) set from the timed step. Each run's ``last.pt``
   (optimizer state dropped, the UNet's EMA weights in fp16 to fit the transfer) and the logs are
   written to ``--out``.

Usage::

    python scripts/train_gpu.py pack --data ~/.cache/synthbrain/ixi-2mm --out .gpu/ixi-pack.xz
    python scripts/train_gpu.py run --pack .gpu/ixi-pack.xz --work /tmp/gpu --out "$OUT" \
        --stage1-seconds 220 --stage2-seconds 240
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import lzma
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHAINS = ("ldm4", "ldm8", "vq")
# SYNTHBRAIN_GPU_SMOKE=1: the whole run on a CPU (8 volumes cropped to 32^3, batch 2, 3 steps a stage to
# calibrate), to check the script before a lease is spent on it; with --stage1-seconds 20 --stage2-seconds 20
# it takes a minute or two.
SMOKE = os.environ.get("SYNTHBRAIN_GPU_SMOKE") == "1"
CALIB_STEPS = 3 if SMOKE else 16


# ----------------------------------------------------------------------------------------- pack
def pack(data_dir: str, out: str) -> None:
    from synth.data.prepare import PreparedData

    data = PreparedData.load(data_dir)
    train = data.subset("train")
    val = data.subset("val")
    arrays = {
        "train_t1": np.stack([_to_u8(data.t1(r)) for r in train]),
        "val_t1": np.stack([_to_u8(data.t1(r)) for r in val]),
        "val_mask": np.stack([np.packbits(data.labels(r) > 0) for r in val]),
        "rows": np.array(json.dumps({"train": train, "val": val})),
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_suffix(".part")
    tmp.write_bytes(lzma.compress(buf.getvalue(), preset=6))
    tmp.replace(out)
    print(f"{out}: {len(train)} train + {len(val)} val subjects, {Path(out).stat().st_size / 1e6:.1f} MB")


def _to_u8(v: np.ndarray) -> np.ndarray:
    return np.round(np.clip(v, 0, 1) * 255).astype(np.uint8)


def unpack(pack_file: str, dest: Path) -> None:
    """The pack as float32 .npy files (memory-mapped by each chain) and rows.json."""
    dest.mkdir(parents=True, exist_ok=True)
    z = np.load(io.BytesIO(lzma.decompress(Path(pack_file).read_bytes())))
    shape = z["train_t1"].shape[1:]
    np.save(dest / "train_t1.npy", (z["train_t1"][:, None].astype(np.float32) / 255))
    np.save(dest / "val_t1.npy", (z["val_t1"][:, None].astype(np.float32) / 255))
    masks = np.stack([np.unpackbits(m)[: int(np.prod(shape))].reshape(shape).astype(bool) for m in z["val_mask"]])
    np.save(dest / "val_mask.npy", masks)
    (dest / "rows.json").write_text(str(z["rows"]))


# ---------------------------------------------------------------------------------------- chains
def _load(data: Path):
    rows = json.loads((data / "rows.json").read_text())
    train, val_t1, val_mask = (np.load(data / f"{n}.npy", mmap_mode="r") for n in ("train_t1", "val_t1", "val_mask"))
    if SMOKE:
        crop = (slice(24, 56), slice(32, 64), slice(24, 56))
        rows = {"train": rows["train"][:8], "val": rows["val"][:2]}
        train, val_t1, val_mask = train[:8, :, *crop], val_t1[:2, :, *crop], val_mask[:2, *crop]
    labelled = [i for i, r in enumerate(rows["train"]) if r["age"] is not None and r["sex"]]
    return rows, np.ascontiguousarray(train), labelled, (np.ascontiguousarray(val_t1), np.ascontiguousarray(val_mask))


def _step_seconds(run: Path) -> float:
    """Seconds per step from a run's losses.csv, leaving out the first steps (cuDNN autotuning)."""
    with open(run / "losses.csv") as f:
        t = [(int(r["step"]), float(r["time_s"])) for r in csv.DictReader(f)]
    (s0, t0), (s1, t1) = t[len(t) // 3], t[-1]
    return max((t1 - t0) / max(1, s1 - s0), 1e-3)


def make_copies(data: Path, copies: int) -> None:
    """``copies`` augmented copies of the labelled training scans (what the UNet trains on), as
    ``data/train_aug.npy`` (copies N, 1, X, Y, Z): the copies ``train_diffusion`` would make for seed 0."""
    from synth.train.augment import augment_copies

    rows, train, labelled, _ = _load(data)
    vols = train[labelled]
    out = data / "train_aug.npy"
    tmp = data / "train_aug.part.npy"
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(copies * len(vols), *vols.shape[1:]))
    t0 = time.time()
    for k, copy in enumerate(augment_copies(vols, copies, seed=0, workers=copies)):
        arr[k * len(vols):(k + 1) * len(vols)] = copy
    arr.flush()
    del arr
    tmp.replace(out)
    print(f"{copies} augmented copies of {len(vols)} scans in {time.time() - t0:.0f} s", flush=True)


def run_chain(name: str, data: Path, work: Path, s1: float, s2: float, calibrate: bool, augment: int = 0) -> None:
    import torch

    torch.set_num_threads(4)
    torch.backends.cudnn.benchmark = True
    from synth.train.autoencoder import DEFAULT_AE, AETrainConfig, train_autoencoder
    from synth.train.diffusion import LDMTrainConfig, train_diffusion

    rows, train, labelled, val = _load(data)
    lab_rows, lab_vols = [rows["train"][i] for i in labelled], train[labelled]
    base = work / name / ("calib" if calibrate else "run")
    calib = json.loads((work / name / "calib.json").read_text()) if not calibrate else None

    def plan(stage: str, seconds: float) -> int:
        return CALIB_STEPS if calibrate else max(CALIB_STEPS, int(0.9 * seconds / calib[stage]))

    timing = {}
    if name.startswith("ldm"):
        steps = plan("stage1", s1)
        ae = AETrainConfig(data_dir="", run_dir=str(base / "ae"), steps=steps, batch_size=2 if SMOKE else 8, lr=5e-4, lr_min=5e-5,
                           adv_weight=0.01, adv_start=0 if calibrate else steps // 4, disc_lr=5e-4,
                           ckpt_every=max(50, steps // 6), max_minutes=None if calibrate else s1 / 60,
                           autoencoder=dict(DEFAULT_AE, latent_channels=int(name[3:])))
        out = train_autoencoder(ae, volumes=train, progress=False)
        timing["stage1"] = _step_seconds(base / "ae")
        print(f"[{name}] autoencoder: {out['step']} steps, {timing['stage1']:.3f} s/step", flush=True)
        steps = plan("stage2", s2)
        copies = None if calibrate or not augment or not (data / "train_aug.npy").is_file() else np.load(data / "train_aug.npy", mmap_mode="r")
        if augment and not calibrate and copies is None:
            print(f"[{name}] no augmented copies in {data}: the UNet trains on the scans alone", flush=True)
        held = [i for i, r in enumerate(rows["val"]) if r["age"] is not None and r["sex"]]  # gap.csv: the over-fitting curve
        ldm = LDMTrainConfig(data_dir="", ae_run=str(base / "ae"), run_dir=str(base / "ldm"), steps=steps, batch_size=2 if SMOKE else 64,
                             lr=4e-4, lr_min=4e-5, ckpt_every=max(100, steps // 6), max_minutes=None if calibrate else s2 / 60,
                             augment=0 if copies is None else augment,
                             gap_every=None if calibrate or not held else max(10 if SMOKE else 50, steps // 20))
        out = train_diffusion(ldm, rows=lab_rows, volumes=lab_vols, progress=False, augmented=copies,
                              heldout_rows=[rows["val"][i] for i in held], heldout_volumes=val[0][held])
        timing["stage2"] = _step_seconds(base / "ldm")
        print(f"[{name}] diffusion: {out['step']} steps, {timing['stage2']:.3f} s/step", flush=True)
    else:
        from synth.vq.train import TFTrainConfig, VQTrainConfig, train_transformer, train_vqvae
        from synth.vq.vqvae import DEFAULT_VQVAE

        steps = plan("stage1", s1)
        vq = VQTrainConfig(data_dir="", run_dir=str(base / "vqvae"), steps=steps, batch_size=2 if SMOKE else 8, lr=3e-4, lr_min=3e-5,
                           eval_every=0 if calibrate else max(50, steps // 6), eval_subjects=len(val[0]),
                           init_autoencoder=str(ROOT / "assets/models/synthbrain-ldm-2mm"), kmeans_volumes=4 if SMOKE else 64,
                           ckpt_every=max(50, steps // 6), max_minutes=None if calibrate else s1 / 60,
                           vqvae={**DEFAULT_VQVAE, "autoencoder": dict(DEFAULT_VQVAE["autoencoder"])})
        out = train_vqvae(vq, volumes=train, val=val, progress=False)
        timing["stage1"] = _step_seconds(base / "vqvae")
        print(f"[{name}] vqvae: {out['step']} steps, {timing['stage1']:.3f} s/step", flush=True)
        steps = plan("stage2", s2)
        tf = TFTrainConfig(data_dir="", vq_run=str(base / "vqvae"), run_dir=str(base / "tf"), steps=steps, batch_size=2 if SMOKE else 32,
                           lr=1e-3, lr_min=1e-4, engine="torch", ckpt_every=max(100, steps // 6),
                           max_minutes=None if calibrate else s2 / 60,
                           transformer={"d_model": 128, "n_layers": 3, "n_heads": 4, "d_ff": 512, "attention": "linear",
                                        "dropout": 0.0, "window": "slab", "prior_top": 64})
        out = train_transformer(tf, rows=lab_rows, volumes=lab_vols, progress=False)
        timing["stage2"] = _step_seconds(base / "tf")
        print(f"[{name}] transformer: {out['step']} steps, {timing['stage2']:.3f} s/step", flush=True)
    if calibrate:
        (work / name / "calib.json").write_text(json.dumps(timing))
    third_party = sorted({m.split(".")[0] for m in sys.modules} - set(sys.stdlib_module_names) - {"synth", "__main__"})
    print(f"[{name}] imported: {' '.join(m for m in third_party if not m.startswith('_'))}", flush=True)


# ------------------------------------------------------------------------------------------ export
def export(work: Path, out: Path, part_bytes: int = 15_000_000) -> None:
    """Slim checkpoints (no optimizer; the UNet's EMA in fp16) and all logs, as one tar split into
    ``out/bundle.tar.partNN`` (a file that comes back from the GPU machine may hold at most 16 MiB).
    Put back together with ``cat bundle.tar.part* | tar x``."""
    import torch

    slim = work / "export"
    slim.mkdir(parents=True, exist_ok=True)
    for name, stages in {"ldm4": ("ae", "ldm"), "ldm8": ("ae", "ldm"), "vq": ("vqvae", "tf")}.items():
        for stage in stages:
            run = work / name / "run" / stage
            for ck in ("best.pt", "last.pt") if stage == "vqvae" else ("last.pt",):
                if not (run / ck).is_file():
                    continue
                state = torch.load(run / ck, map_location="cpu", weights_only=False)
                for key in ("optimizer", "disc_optimizer", "discriminator"):
                    state.pop(key, None)
                if stage in ("ae", "ldm"):  # sampling and packaging use the EMA weights
                    state.pop("state_dict", None)
                if stage == "ldm":
                    state["ema_state_dict"] = {k: v.half() if v.is_floating_point() else v
                                               for k, v in state["ema_state_dict"].items()}
                (slim / name / stage).mkdir(parents=True, exist_ok=True)
                torch.save(state, slim / name / stage / ck)
    bundle = work / "bundle.tar"
    with tarfile.open(bundle, "w") as tar:
        tar.add(slim, arcname="export")
        for p in sorted(work.rglob("*")):
            if p.suffix in (".csv", ".json", ".log") and not {"export", "data"} & set(p.relative_to(work).parts):
                tar.add(p, arcname=str(Path("logs") / p.relative_to(work)))
    out.mkdir(parents=True, exist_ok=True)
    with open(bundle, "rb") as f:
        for i, chunk in enumerate(iter(lambda: f.read(part_bytes), b"")):
            (out / f"bundle.tar.part{i:02d}").write_bytes(chunk)
    print(f"exported {bundle.stat().st_size / 1e6:.1f} MB in {i + 1} parts", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--data", required=True)
    a.add_argument("--out", required=True)
    r = sub.add_parser("run")
    r.add_argument("--pack", required=True)
    r.add_argument("--work", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--stage1-seconds", type=float, default=220)
    r.add_argument("--stage2-seconds", type=float, default=240)
    r.add_argument("--calibrate-seconds", type=float, default=150, help="the most the smoke-and-timing phase may take")
    r.add_argument("--total-seconds", type=float, default=560, help="everything, export included, ends by then")
    r.add_argument("--chains", default=",".join(CHAINS))
    r.add_argument("--augment", type=int, default=0, help="augmented copies of each scan for the diffusion UNets (0: none)")
    c = sub.add_parser("chain")
    c.add_argument("name", choices=CHAINS)
    c.add_argument("--work", required=True)
    c.add_argument("--stage1-seconds", type=float, required=True)
    c.add_argument("--stage2-seconds", type=float, required=True)
    c.add_argument("--calibrate", action="store_true")
    c.add_argument("--augment", type=int, default=0)
    g = sub.add_parser("augment")
    g.add_argument("--work", required=True)
    g.add_argument("--copies", type=int, required=True)
    args = p.parse_args(argv)
    if getattr(args, "augment", 0) < 0:
        p.error(f"--augment must be 0 (none) or a positive number of copies, got {args.augment}")
    if getattr(args, "copies", 1) < 1:
        p.error(f"--copies must be at least 1, got {args.copies}")
    if args.cmd == "pack":
        pack(args.data, args.out)
        return 0
    work = Path(args.work)
    if args.cmd == "chain":
        run_chain(args.name, work / "data", work, args.stage1_seconds, args.stage2_seconds, args.calibrate, args.augment)
        return 0
    if args.cmd == "augment":
        make_copies(work / "data", args.copies)
        return 0
    t0 = time.time()
    unpack(args.pack, work / "data")
    print(f"unpacked in {time.time() - t0:.0f} s", flush=True)
    chains = args.chains.split(",")
    rc = 0
    maker = None
    if args.augment > 0 and any(c.startswith("ldm") for c in chains):  # on the idle CPU cores, beside calibration
        with open(work / "augment.log", "w") as log:
            maker = subprocess.Popen([sys.executable, __file__, "augment", "--work", str(work), "--copies", str(args.augment)],
                                     stdout=log, stderr=subprocess.STDOUT)
    for phase in ("calibrate", "train"):
        if phase == "train" and maker is not None:
            try:  # the chains train without copies (and say so) if they are not ready in time
                maker.wait(timeout=max(1.0, t0 + args.calibrate_seconds + 60 - time.time()))
            except subprocess.TimeoutExpired:
                maker.kill()
                maker.wait()
            print(f"== augment: exit {maker.returncode}\n" + (work / "augment.log").read_text()[-600:], flush=True)
        procs = {}
        for name in chains:
            (work / name).mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, __file__, "chain", name, "--work", str(work),
                   "--stage1-seconds", str(args.stage1_seconds), "--stage2-seconds", str(args.stage2_seconds),
                   "--augment", str(args.augment)]
            log = open(work / name / f"{phase}.log", "w")
            procs[name] = (subprocess.Popen(cmd + (["--calibrate"] if phase == "calibrate" else []), stdout=log,
                                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}), log)
        # A stage stops itself at its time limit; the watchdog only catches what runs on past it (slow
        # set-up, a hang), so the checkpoints written so far still reach --out.
        deadline = min(time.time() + (args.calibrate_seconds if phase == "calibrate" else args.stage1_seconds + args.stage2_seconds + 90),
                       t0 + args.total_seconds - 20)  # leave time to export
        for name, (proc, log) in procs.items():
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = f"killed at the deadline ({proc.wait()})"
            log.close()
            text = (work / name / f"{phase}.log").read_text()
            print(f"== {name} {phase}: exit {code} ({time.time() - t0:.0f} s)\n" + "\n".join(text.splitlines()[-12:]), flush=True)
            if code:
                rc = 1
                chains = [c for c in chains if c != name]
        if not chains:
            break
    export(work, Path(args.out))
    print(f"done in {time.time() - t0:.0f} s", flush=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
