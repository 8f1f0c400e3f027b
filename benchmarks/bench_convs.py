#!/usr/bin/env python
"""The two convolution levers of the generator, each against its baseline in the same run.

    python benchmarks/bench_convs.py [--model synthbrain-ldm-2mm] [--threads 2] [--repeats 5]

  unet step  one unguided UNet evaluation (batch 1, fp32) with PyTorch's own Conv3d dispatch (the
             baseline: its 2D-tuned rule keeps these small 3D convolutions on the slow reference path)
             against synth.models.fast.OneDNNConv3d (oneDNN for every fp32 CPU convolution)
  decoder    the inference decoder (fused upsampling) in the default memory format (baseline) against
             channels-last 3D, as synth.pipeline runs it; where bf16 is native, also channels-last with
             bf16 weights and activations against the fp32 one
  upsampling the decoder's 32-channel nearest x2 upsampling and 3x3x3 convolution to 80 x 96 x 80 (channels-
             last) as eight 2x2x2 convolutions, one per output parity, written by strided copies (the
             baseline: synth until 2026-12-01) against one stride-2 transposed convolution
             (synth.models.fast.SubpixelUpConv now)
Prints the CPU, the kernels PyTorch uses and whether bf16 is native; ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`` reproduces a CPU without native bf16. Also checks that each pair agrees.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _median_s(f, repeats: int) -> float:
    import torch

    from synth.runtime import median_seconds

    with torch.no_grad():
        return median_seconds(f, repeats)


def _parity_kernels(w):
    """(Cout, Cin, 3, 3, 3) -> (8, Cout, Cin, 2, 2, 2): the 2x2x2 kernel of each output parity (the baseline)."""
    import torch

    fold = (((0,), (1, 2)), ((0, 1), (2,)))  # per parity: which of the 3 taps add into each of the 2
    out = []
    for px in range(2):
        for py in range(2):
            for pz in range(2):
                k = w.new_zeros(*w.shape[:2], 2, 2, 2)
                for a, ia in enumerate(fold[px]):
                    for b, ib in enumerate(fold[py]):
                        for c, ic in enumerate(fold[pz]):
                            k[:, :, a, b, c] = w[:, :, list(ia)][:, :, :, list(ib)][:, :, :, :, list(ic)].sum((2, 3, 4))
                out.append(k)
    return torch.stack(out)


def _parity_upconv(x, kernels, bias):
    """Nearest x2 + 3x3x3 convolution as synth ran it until 2026-12-01: eight convolutions, strided writes."""
    import torch
    import torch.nn.functional as F

    n, _, d, h, w = x.shape
    xp = F.pad(x, (1, 1, 1, 1, 1, 1))
    y = torch.empty(n, kernels.shape[1], 2 * d, 2 * h, 2 * w, memory_format=torch.channels_last_3d)
    k = 0
    for px in range(2):
        for py in range(2):
            for pz in range(2):
                y[:, :, px::2, py::2, pz::2] = F.conv3d(xp[:, :, px:px + d + 1, py:py + h + 1, pz:pz + w + 1], kernels[k], bias)
                k += 1
    return y


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="synthbrain-ldm-2mm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    import torch

    import synth
    from synth.models.fast import OneDNNConv3d, SubpixelUpConv
    from synth.pipeline import _fast_decoder
    from synth.runtime import cpu_description, machine_line

    torch.set_num_threads(args.threads)
    cpu = cpu_description()
    print(machine_line(args.threads))
    gen = synth.load_generator(args.model, device="cpu")
    fast_unet = gen.unet
    plain_unet = copy.deepcopy(fast_unet)
    for m in plain_unet.modules():
        if type(m) is OneDNNConv3d:
            m.__class__ = torch.nn.Conv3d
    z = torch.randn(gen.latent_shape(), generator=torch.Generator().manual_seed(0))
    x, ctx = gen._unet_inputs(z, gen.encode_condition(synth.Condition(age=70, sex="F")))
    t = torch.tensor([500])
    base = _median_s(lambda: plain_unet(x, timesteps=t, context=ctx), args.repeats)
    ours = _median_s(lambda: fast_unet(x, timesteps=t, context=ctx), args.repeats)
    with torch.no_grad():
        diff = (plain_unet(x, timesteps=t, context=ctx) - fast_unet(x, timesteps=t, context=ctx)).abs().max().item()
    print(f"unet step, batch 1:  PyTorch dispatch {base:.3f} s   oneDNN {ours:.3f} s   ({base / ours:.2f}x; max difference {diff:.1e})")

    latent = z / gen.config.latent_scale
    channels_last = _fast_decoder(gen.autoencoder)
    ae = copy.deepcopy(gen.autoencoder)
    from synth.models.fast import fuse_upsample_convs

    post, dec = ae.post_quant_conv, ae.decoder
    fuse_upsample_convs(dec)
    base = _median_s(lambda: dec(post(latent)), args.repeats)
    ours = _median_s(lambda: channels_last(latent), args.repeats)
    with torch.no_grad():
        diff = (dec(post(latent)) - channels_last(latent)).abs().max().item()
    print(f"decoder:             default format   {base:.3f} s   channels-last {ours:.3f} s   ({base / ours:.2f}x; max difference {diff:.1e})")

    ups = [m for m in dec.modules() if isinstance(m, SubpixelUpConv) and m.weight.shape[0] == 32]
    if ups:  # the shipped decoder's 32-channel upsampling, at its input size; random weights of its shape
        torch.manual_seed(0)
        conv = torch.nn.Conv3d(32, ups[0].out_channels, 3, padding=1)
        fused = SubpixelUpConv(conv)
        folded = _parity_kernels(conv.weight.detach())
        xin = torch.randn(1, 32, 40, 48, 40, generator=torch.Generator().manual_seed(1)).contiguous(
            memory_format=torch.channels_last_3d)
        base = _median_s(lambda: _parity_upconv(xin, folded, conv.bias), args.repeats)
        ours = _median_s(lambda: fused(xin), args.repeats)
        with torch.no_grad():
            diff = (_parity_upconv(xin, folded, conv.bias) - fused(xin)).abs().max().item()
        print(f"upsampling, 32 ch:   8 parity convs   {base:.3f} s   transposed    {ours:.3f} s   ({base / ours:.2f}x; max difference {diff:.1e})")

    # bf16 weights and activations (no autocast casts): the lever left for the 1 s target where bf16 is native.
    if cpu["native_bf16"]:
        bf16 = _fast_decoder(copy.deepcopy(gen.autoencoder).to(torch.bfloat16))
        lb = latent.to(torch.bfloat16)
        half = _median_s(lambda: bf16(lb), args.repeats)
        with torch.no_grad():
            diff = (channels_last(latent) - bf16(lb).float()).abs().max().item()
        print(f"decoder, bf16:       channels-last fp32 {ours:.3f} s   bf16 {half:.3f} s   ({ours / half:.2f}x; max difference {diff:.1e})")
    else:
        print("decoder, bf16:       skipped (bf16 is not native here: emulated, far slower)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
