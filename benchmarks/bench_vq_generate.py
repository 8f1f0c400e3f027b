#!/usr/bin/env python
"""One brain from the VQ model's transformer: recurrent decoding against recomputing the prefix.

    python benchmarks/bench_vq_generate.py [--model synthbrain-vq-2mm] [--threads 1] [--prefix 400]

Same weights, same run, one thread (token-by-token work is too small to share), batch 1:
  recurrent-ft     fast-transformers RecurrentEncoderBuilder (linear attention): each token costs the same
  recurrent-torch  the plain-torch fallback: the same linear attention as a recurrent state
  wavefront-ft / wavefront-torch
                   models trained with `wavefront` only: all x-slabs side by side, each one code behind
                   the one before (WavefrontDecoder: 499 batched steps instead of 9,600), same engines
  sdpa-kv          torch scaled_dot_product_attention with a preallocated key-value cache (softmax attention
                   on the same weights: a different function, timed for its cost only)
  recompute        what MONAI's VQVAETransformerInferer.sample does: the whole prefix through the
                   parallel model again for every new token. Timed on the first --prefix tokens and at
                   a few prefix lengths, then extrapolated to the full sequence with the fitted
                   cost a + b * prefix per token (said so in the output).
The VQ-VAE decoder's time is measured once and added to every variant's seconds per brain; a model with a
refiner (0.3.0) also gets its time on the decoded brain (same threads), in a last column, as `generate` runs it.
Without a shipped model (--model random), a random-weight model of the shipped architecture is used.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_info() -> dict:
    """The CPU as the JSON records it (``synth.runtime.cpu_description``, bf16 under its older key)."""
    from synth.runtime import cpu_description

    cpu = cpu_description()
    return {"cpu": cpu["cpu"], "bf16_native": cpu["native_bf16"], "capability": cpu["capability"], "torch": cpu["torch"]}


def load(model: str, engine: str):
    import torch

    from synth.vq.generator import VQBrainGenerator

    if model != "random":
        from synth.vq.cli import _model_folder

        return VQBrainGenerator.from_folder(_model_folder(model), device="cpu", engine=engine)
    from synth.testing import toy_normative
    from synth.vq.config import VQModelConfig
    from synth.vq.train import DEFAULT_TRANSFORMER
    from synth.vq.transformer import CodeTransformer
    from synth.vq.vqvae import DEFAULT_VQVAE, build_vqvae

    torch.manual_seed(0)
    tf = dict(DEFAULT_TRANSFORMER, num_tokens=DEFAULT_VQVAE["num_embeddings"], seq_len=9600, n_conditioning=6,
              code_shape=[20, 24, 20], window=24 * 20)
    cfg = VQModelConfig("random-vq", "0", DEFAULT_VQVAE, tf, ["age", "sex", "brain", "lateral_ventricles", "hippocampus"],
                        grid={"shape": [80, 96, 80], "spacing": 2.0, "origin": [-79.0, -112.0, -74.0]},
                        normative=toy_normative().to_dict())
    return VQBrainGenerator(cfg, build_vqvae(DEFAULT_VQVAE), CodeTransformer(**tf, engine=engine), device="cpu")


def time_recurrent(model, cond, attention: str | None = None, schedule: str = "sequential") -> float:
    """Seconds to sample the whole sequence with ``schedule`` (optionally as softmax attention)."""
    import torch

    from synth.vq.sampler import sample_codes

    if attention and attention != model.config["attention"]:
        from synth.vq.transformer import CodeTransformer

        other = CodeTransformer(**{**model.config, "attention": attention}, engine="torch").eval()
        other.load_state_dict(model.state_dict())
        model = other
    t0 = time.perf_counter()
    sample_codes(model, cond, seed=0, threads=None, schedule=schedule)
    return time.perf_counter() - t0


def time_recompute(model, cond, prefix: int) -> dict:
    """MONAI-style sampling (the whole prefix again per token) on ``prefix`` tokens, and a fit a + b * n."""
    import numpy as np
    import torch

    tokens = torch.zeros(1, model.seq_len, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    per = []
    t_all = time.perf_counter()
    with torch.no_grad():
        for i in range(prefix):
            t0 = time.perf_counter()
            logits = model(tokens[:, : i + 1], cond)[:, -1]
            tokens[0, i] = torch.multinomial(torch.softmax(logits[0], -1), 1, generator=gen)[0]
            per.append(time.perf_counter() - t0)
    measured = time.perf_counter() - t_all
    # per-token cost grows with the prefix: fit on the measured tokens (past the first 10% for warm-up)
    n = np.arange(prefix)
    keep = n >= prefix // 10
    b, a = np.polyfit(n[keep], np.array(per)[keep], 1)
    full_n = np.arange(model.seq_len)
    # long prefixes: time with a few single evaluations to anchor the extrapolation
    anchors = {}
    with torch.no_grad():
        for m in (model.seq_len // 4, model.seq_len // 2, model.seq_len):
            t0 = time.perf_counter()
            model(tokens[:, :m], cond)
            anchors[m] = time.perf_counter() - t0
    ns = np.array([*n[keep], *anchors.keys()], float)
    ts = np.array([*np.array(per)[keep], *anchors.values()])
    b, a = np.polyfit(ns, ts, 1)
    total = float(np.sum(a + b * full_n))
    return {"measured_tokens": prefix, "measured_seconds": measured, "anchors_s": anchors,
            "fit_a_s": float(a), "fit_b_s_per_token": float(b), "extrapolated_seconds": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="synthbrain-vq-2mm", help="VQ model name/folder, or 'random'")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prefix", type=int, default=400, help="tokens actually sampled by the recompute variant")
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = ap.parse_args()
    import torch

    from synth.runtime import machine_line
    from synth.vq.transformer import fast_transformers_available

    torch.set_num_threads(args.threads)
    info = cpu_info()
    print(machine_line(args.threads))
    engines = ["torch"] + (["fast-transformers"] if fast_transformers_available() else [])
    gens = {e: load(args.model, e) for e in engines}
    g = gens["torch"]
    cond = g.encode_condition(__import__("synth").Condition(age=72, sex="F"))
    tf = g.transformer
    print(f"model {g.config.name}: {tf.seq_len} tokens, codebook {tf.config['num_tokens']}, d {tf.config['d_model']}, "
          f"{tf.config['n_layers']} layers, {tf.config['attention']} attention")
    t0 = time.perf_counter()
    codes = torch.zeros(g.code_shape(), dtype=torch.long)
    g.decode_codes(codes)
    decode_s = time.perf_counter() - t0
    refine_s = None
    if getattr(g, "refiner", None) is not None:
        from synth.runtime import median_seconds

        image = g.generate(__import__("synth").Condition(age=72, sex="F"), seed=0, refine=False).image
        refine_s = median_seconds(lambda: g.refine(image), 3)
    rows = {}
    if "fast-transformers" in gens:
        rows["recurrent-ft"] = time_recurrent(gens["fast-transformers"].transformer, cond)
    else:
        print("fast-transformers is not installed: recurrent-ft skipped")
    rows["recurrent-torch"] = time_recurrent(tf, cond)
    if tf.config.get("wavefront"):
        if "fast-transformers" in gens:
            rows["wavefront-ft"] = time_recurrent(gens["fast-transformers"].transformer, cond, schedule="wavefront")
        rows["wavefront-torch"] = time_recurrent(tf, cond, schedule="wavefront")
    else:
        print("the model was trained without `wavefront`: wavefront rows skipped (retrain it, or use --model random)")
    rows["sdpa-kv"] = time_recurrent(tf, cond, attention="softmax")
    rec_model = gens.get("fast-transformers", g).transformer
    rec = time_recompute(rec_model, cond, args.prefix)
    rows["recompute (extrapolated)"] = rec["extrapolated_seconds"]
    base = rows.get("recurrent-ft", rows["recurrent-torch"])
    print(f"\nVQ-VAE decoder: {decode_s:.2f} s per brain (added below)")
    if refine_s is None:
        print("the model has no refiner: no refiner column")
    else:
        print(f"refiner: {refine_s:.2f} s per brain (median of 3 on a decoded brain; the last column adds it)")
    extra = f" {'+ refiner':>10s}" if refine_s is not None else ""
    print(f"{'variant':28s} {'tokens s':>10s} {'s per brain':>12s} {'vs recurrent':>13s}{extra}")
    for k, v in rows.items():
        plus = f" {v + decode_s + refine_s:10.2f}" if refine_s is not None else ""
        print(f"{k:28s} {v:10.2f} {v + decode_s:12.2f} {v / base:12.1f}x{plus}")
    print(f"recompute: {rec['measured_tokens']} tokens sampled in {rec['measured_seconds']:.1f} s on the "
          f"{'fast-transformers' if 'fast-transformers' in gens else 'torch'} parallel model; full forward at "
          + ", ".join(f"{k} tokens {v:.2f} s" for k, v in rec["anchors_s"].items())
          + f"; per-token cost fitted as {rec['fit_a_s'] * 1e3:.1f} ms + {rec['fit_b_s_per_token'] * 1e6:.2f} us x prefix")
    if args.out:
        from synth.io import write_json

        write_json(args.out, {**info, "threads": args.threads, "decode_s": decode_s, "refine_s": refine_s, "tokens_s": rows, "recompute": rec})


if __name__ == "__main__":
    main()
