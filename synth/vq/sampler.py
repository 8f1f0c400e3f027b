"""Sampling and scoring of code sequences with a :class:`~synth.vq.transformer.CodeTransformer`.

Ancestral sampling with the recurrent decoder (each token costs the same), with classifier-free
guidance on the logits (Ho & Salimans 2022): ``l = l_u + w (l_c - l_u)``. The model's
:attr:`~synth.vq.transformer.CodeTransformer.schedule` picks the order: token by token in raster
order (``sequential``), or all attention blocks side by side, each one position behind the one
before (``wavefront``, models trained with ``wavefront``: 499 batched steps instead of 9,600 for a
20 x 24 x 20 code grid in x-slabs). Within a wavefront step the tokens are drawn in raster order.
Randomness enters only through a seeded ``torch.Generator``. Decoding runs on one thread by
default: token-by-token work is too small to share, and two threads were measured ten times slower
on the project's 2-core machines (NOTES).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from .transformer import SCHEDULES, CodeTransformer

__all__ = ["sample_codes", "torch_threads"]

ProgressFn = Callable[[int, int], None]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (``None``: unchanged), then restore the old count."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


@torch.no_grad()
def sample_codes(
    model: CodeTransformer,
    cond: torch.Tensor,
    *,
    seed: int,
    guidance_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    threads: int | None = 1,
    progress: ProgressFn | None = None,
    schedule: str | None = None,
) -> torch.Tensor:
    """Sample one code sequence.

    Args:
        model: The transformer (in eval mode).
        cond: (1, C) condition vector (covariates in [0, 1] and presence flag).
        seed: Seed of the sampler's ``torch.Generator``.
        guidance_scale: Classifier-free guidance weight ``w`` (1 = conditional only; needs a model
            trained with condition dropout).
        temperature: Softmax temperature (> 0).
        top_k: Keep only the ``top_k`` most likely tokens at each step (``None``: all).
        threads: Torch threads while decoding (``None``: leave as is).
        progress: Callback ``f(done, total)``, called every 256 tokens and at the end.
        schedule: ``sequential`` or ``wavefront`` (``None``: the model's own ``schedule``).

    Returns:
        (seq_len,) int64 code indices in raster order.
    """
    if temperature <= 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"`top_k` must be >= 1, got {top_k}")
    if cond.ndim != 2 or cond.shape[0] != 1:
        raise ValueError(f"`cond` must have shape (1, C), got {tuple(cond.shape)}")
    schedule = model.schedule if schedule is None else schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` must be sequential or wavefront, got {schedule!r}")
    use_cfg = guidance_scale != 1.0
    device = model.head.weight.device
    c = torch.cat([torch.zeros_like(cond), cond]) if use_cfg else cond
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    n = model.seq_len
    out = torch.empty(n, dtype=torch.long)
    with torch_threads(threads):
        if schedule == "wavefront":
            _sample_wavefront(model, c.to(device), out, gen, guidance_scale if use_cfg else None, temperature, top_k, progress)
            return out
        dec = model.decoder(c.to(device))
        prev = None
        for i in range(n):
            logits = dec.step(prev).float().cpu()
            if use_cfg:
                lu, lc = logits
                logits = lu + guidance_scale * (lc - lu)
            else:
                logits = logits[0]
            probs = torch.softmax(_filter_logits(logits, temperature, top_k), dim=-1)
            tok = torch.multinomial(probs, 1, generator=gen)
            out[i] = tok[0]
            prev = tok.expand(c.shape[0]).to(device)
            if progress and ((i + 1) % 256 == 0 or i + 1 == n):
                progress(i + 1, n)
    return out


def _sample_wavefront(model: CodeTransformer, c: torch.Tensor, out: torch.Tensor, gen: torch.Generator,
                      guidance_scale: float | None, temperature: float, top_k: int | None,
                      progress: ProgressFn | None) -> None:
    """Fill ``out`` (seq_len,) with the :class:`~synth.vq.transformer.WavefrontDecoder`: each step's
    tokens drawn together (one multinomial over the active blocks' rows, in raster order)."""
    dec = model.wavefront_decoder(c)
    n, done, prev = model.seq_len, 0, None
    for _ in range(dec.steps):
        pos, logits = dec.step(prev)
        logits = logits.float().cpu()  # (n, B, K)
        if guidance_scale is not None:
            lu, lc = logits[:, 0], logits[:, 1]
            logits = lu + guidance_scale * (lc - lu)
        else:
            logits = logits[:, 0]
        probs = torch.softmax(_filter_logits(logits, temperature, top_k), dim=-1)
        tok = torch.multinomial(probs, 1, generator=gen)[:, 0]
        out[pos.cpu()] = tok
        prev = tok[:, None].expand(-1, c.shape[0]).to(c.device)
        if progress and ((done + len(tok)) // 256 > done // 256 or done + len(tok) == n):
            progress(done + len(tok), n)
        done += len(tok)
