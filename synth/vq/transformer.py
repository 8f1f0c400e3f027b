"""Autoregressive transformer over a VQ-VAE's code grid (raster order), on two engines.

The network is a post-norm transformer encoder with a causal mask (Vaswani et al. 2017) over the
flattened code grid. Attention is either *linear* (Katharopoulos et al., "Transformers are RNNs",
ICML 2020: ``phi(x) = elu(x) + 1``, ``V'_i = phi(q_i)^T S_i / (phi(q_i)^T z_i)`` with
``S_i = sum_{j<=i} phi(k_j) v_j^T`` and ``z_i = sum_{j<=i} phi(k_j)``), whose recurrent form costs
the same for every new token, or *softmax*.

Two engines hold the same parameters under the same names, so one state dict runs on either:

* ``fast-transformers`` (PyPI ``pytorch-fast-transformers``): ``causal-linear`` / ``full``
  attention for the parallel pass, its ``RecurrentEncoderBuilder`` (``linear`` / ``full``) for
  sampling;
* ``torch`` (the fallback when the extension is missing): the same linear attention in plain torch
  (chunked parallel pass, recurrent state for sampling), and softmax attention through
  ``scaled_dot_product_attention`` with a preallocated key-value cache.

Conditioning: the condition vector (covariates in [0, 1] plus a presence flag; all zeros is the
unconditional input of classifier-free guidance) is projected to one embedding that is the first
input token and is added to every input position.

Decoding schedules. :class:`IncrementalDecoder` walks the sequence token by token (``sequential``:
one step per token). A model with a ``window`` (attention blocks, e.g. one x-slab of codes) and
``wavefront`` (a block's first input carries no previous token) depends on earlier blocks only
through the slab-back context, i.e. block ``k``'s token at in-block position ``p`` needs block
``k - 1`` up to position ``p``. :class:`WavefrontDecoder` then decodes all blocks side by side, block
``k`` one position behind block ``k - 1``: at step ``t`` block ``k`` decodes position ``t - k``, so the
9,600 codes of a 20 x 24 x 20 grid in 480-token slabs take 480 + 19 = 499 batched steps (up to 20
blocks each) instead of 9,600. Both compute the teacher-forced model exactly (to float rounding);
:attr:`CodeTransformer.schedule` says which one the sampler and the codec use.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CodeTransformer", "IncrementalDecoder", "WavefrontDecoder", "fast_transformers_available", "resolve_engine",
           "wavefront_order", "ENGINES", "SCHEDULES"]

ENGINES = ("fast-transformers", "torch")
ATTENTIONS = ("linear", "softmax")
SCHEDULES = ("sequential", "wavefront")
_EPS = 1e-6  # fast_transformers' linear attention eps


def fast_transformers_available(cuda: bool = False) -> bool:
    """Whether the compiled ``fast_transformers`` extension imports (with its CUDA kernels if ``cuda``)."""
    try:
        import fast_transformers.causal_product as cp
        from fast_transformers.builders import RecurrentEncoderBuilder, TransformerEncoderBuilder  # noqa: F401
    except Exception:
        return False
    return not cuda or getattr(cp, "causal_dot_product_cuda", None) is not None


def resolve_engine(engine: str = "auto") -> str:
    """``auto`` -> ``fast-transformers`` when installed, else ``torch``; a named engine is checked."""
    if engine == "auto":
        return "fast-transformers" if fast_transformers_available() else "torch"
    if engine not in ENGINES:
        raise ValueError(f"`engine` must be auto, fast-transformers or torch, got {engine!r}")
    if engine == "fast-transformers" and not fast_transformers_available():
        raise ValueError("engine fast-transformers is not installed: run scripts/setup.sh (it builds "
                         "pytorch-fast-transformers), or use --engine torch")
    return engine


def _phi(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


def causal_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Causal linear attention of feature-mapped (B, H, L, E) queries/keys and (B, H, L, M) values.

    Chunked: quadratic inside a chunk, the running sums ``S``, ``z`` carried across chunks.
    """
    b, h, n, e = q.shape
    s = q.new_zeros(b, h, e, v.shape[-1])
    z = q.new_zeros(b, h, e)
    out = []
    for i in range(0, n, chunk):
        qc, kc, vc = q[:, :, i:i + chunk], k[:, :, i:i + chunk], v[:, :, i:i + chunk]
        a = (qc @ kc.transpose(-1, -2)).tril()
        num = a @ vc + qc @ s
        den = a.sum(-1) + (qc @ z[..., None]).squeeze(-1)  # phi(q_i) . z_i
        out.append(num / (den[..., None] + _EPS))
        s = s + kc.transpose(-1, -2) @ vc
        z = z + kc.sum(2)
    return torch.cat(out, dim=2)


class _TorchAttention(nn.Module):
    """Multi-head causal attention named like ``fast_transformers.attention.AttentionLayer``."""

    def __init__(self, d_model: int, n_heads: int, kind: str):
        super().__init__()
        self.query_projection = nn.Linear(d_model, d_model)
        self.key_projection = nn.Linear(d_model, d_model)
        self.value_projection = nn.Linear(d_model, d_model)
        self.out_projection = nn.Linear(d_model, d_model)
        self.n_heads, self.kind = n_heads, kind

    def _qkv(self, x: torch.Tensor):
        shape = (*x.shape[:-1], self.n_heads, -1)
        return (self.query_projection(x).view(shape), self.key_projection(x).view(shape),
                self.value_projection(x).view(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D)
        q, k, v = (t.transpose(1, 2) for t in self._qkv(x))  # (B, H, L, E)
        if self.kind == "linear":
            y = causal_linear_attention(_phi(q), _phi(k), v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_projection(y.transpose(1, 2).reshape(x.shape))

    def step(self, x: torch.Tensor, state: dict, t: int, start: int = 0) -> torch.Tensor:  # (B, D), one position
        q, k, v = self._qkv(x)  # (B, H, E)
        if self.kind == "linear":
            q, k = _phi(q), _phi(k)
            state["s"] += torch.einsum("nhd,nhm->nhdm", k, v)
            state["z"] += k
            den = 1.0 / (torch.einsum("nhd,nhd->nh", q, state["z"]) + _EPS)
            y = torch.einsum("nhd,nhdm,nh->nhm", q, state["s"], den)
        else:  # key-value cache, preallocated for the whole sequence
            state["k"][:, :, t] = k
            state["v"][:, :, t] = v
            y = F.scaled_dot_product_attention(q[:, :, None], state["k"][:, :, start: t + 1], state["v"][:, :, start: t + 1])[:, :, 0]
        return self.out_projection(y.reshape(x.shape))

    def new_state(self, batch: int, seq_len: int, like: torch.Tensor) -> dict:
        e = like.shape[-1] // self.n_heads
        if self.kind == "linear":
            return {"s": like.new_zeros(batch, self.n_heads, e, e), "z": like.new_zeros(batch, self.n_heads, e)}
        return {"k": like.new_zeros(batch, self.n_heads, seq_len, e), "v": like.new_zeros(batch, self.n_heads, seq_len, e)}


class _TorchLayer(nn.Module):
    """Post-norm layer, named and ordered like ``fast_transformers``' ``TransformerEncoderLayer``."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, kind: str, dropout: float):
        super().__init__()
        self.attention = _TorchAttention(d_model, n_heads, kind)
        self.linear1, self.linear2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        y = x = self.norm1(x)
        y = self.dropout(self.linear2(self.dropout(F.gelu(self.linear1(y)))))
        return self.norm2(x + y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._ff(x + self.dropout(self.attention(x)))

    def step(self, x: torch.Tensor, state: dict, t: int, start: int = 0) -> torch.Tensor:
        return self._ff(x + self.attention.step(x, state, t, start))


class _TorchEncoder(nn.Module):
    def __init__(self, n_layers: int, d_model: int, n_heads: int, d_ff: int, kind: str, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(_TorchLayer(d_model, n_heads, d_ff, kind, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def _ft_kwargs(cfg: dict[str, Any], recurrent: bool) -> dict[str, Any]:
    kind = cfg["attention"]
    if recurrent:
        attention_type = "linear" if kind == "linear" else "full"
    else:
        attention_type = "causal-linear" if kind == "linear" else "full"
    kw = dict(n_layers=cfg["n_layers"], n_heads=cfg["n_heads"], query_dimensions=cfg["d_model"] // cfg["n_heads"],
              value_dimensions=cfg["d_model"] // cfg["n_heads"], feed_forward_dimensions=cfg["d_ff"],
              attention_type=attention_type, activation="gelu", dropout=cfg["dropout"])
    if kind == "softmax":
        kw["attention_dropout"] = 0.0
    return kw


class CodeTransformer(nn.Module):
    """Conditional autoregressive model of a flattened code grid.

    Args:
        num_tokens: Codebook size ``K`` (the vocabulary).
        seq_len: Number of codes per volume (e.g. 20 * 24 * 20 = 9,600).
        n_conditioning: Length of the condition vector (covariates + presence flag).
        d_model: Width.
        n_layers: Transformer layers.
        n_heads: Attention heads (``d_model`` must divide by it).
        d_ff: Feed-forward width (default ``4 * d_model``).
        attention: ``linear`` (causal linear attention; recurrent sampling at constant cost per token)
            or ``softmax``.
        dropout: Dropout in the layers (training only).
        code_shape: (x, y, z) of the code grid (raster order, z fastest). When given, each input also
            carries the embeddings of the already-decoded codes one row (y - 1) and one slab (x - 1)
            back, so local 3D context need not be found by attention (a causal PixelCNN-like context;
            the code one step back, z - 1, is the previous token anyway).
        window: Attention restarts every ``window`` tokens (e.g. one x-slab of the code grid): each
            block attends only within itself (earlier blocks reach it through ``code_shape``'s
            context and the absolute positions). Training then runs on blocks, far cheaper than whole
            sequences, and is exactly what the recurrent decoder computes (it resets its state at
            every block). ``None``: one causal attention over the whole sequence.
        wavefront: The first input of every attention block (position ``% window == 0``) carries no
            previous-token embedding, like the first token of the sequence, so a block depends on
            earlier blocks only through ``code_shape``'s context (and the absolute positions), and
            :class:`WavefrontDecoder` decodes the blocks side by side, each one position behind the
            one before. Needs a ``window`` that divides ``seq_len`` and under which every context
            neighbour is decoded earlier in that schedule (true for one x-slab, ``y * z`` tokens).
            ``False`` (the default, and what a saved config without the key means): the previous
            token is always embedded, and decoding is sequential.
        prior_top: Add a fixed per-position log-prior to the logits: the ``prior_top`` most frequent
            codes of each position in the training codes (Laplace-smoothed), the rest sharing what
            is left (:meth:`set_prior`). The network then learns what the position alone does not tell;
            much of the background and the brain's outline is known from the position.
        engine: ``auto`` (fast-transformers when installed, else torch), ``fast-transformers`` or ``torch``.
    """

    def __init__(self, num_tokens: int, seq_len: int, n_conditioning: int, d_model: int = 128, n_layers: int = 4,
                 n_heads: int = 4, d_ff: int | None = None, attention: str = "linear", dropout: float = 0.0,
                 code_shape: list[int] | tuple[int, ...] | None = None, window: int | None = None,
                 prior_top: int | None = None, wavefront: bool = False, engine: str = "auto"):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"`attention` must be linear or softmax, got {attention!r}")
        if d_model % n_heads:
            raise ValueError(f"`d_model` ({d_model}) must divide by `n_heads` ({n_heads})")
        if code_shape is not None and math.prod(code_shape) != seq_len:
            raise ValueError(f"`code_shape` {tuple(code_shape)} must hold `seq_len` = {seq_len} codes")
        if prior_top and not 1 <= prior_top < num_tokens:
            raise ValueError(f"`prior_top` must be within 1-{num_tokens - 1} (or None), got {prior_top}")
        if window is not None and not 1 <= window <= seq_len:
            raise ValueError(f"`window` must be within 1-{seq_len} (or None), got {window}")
        if wavefront:
            if window is None or seq_len % window:
                raise ValueError(f"`wavefront` needs a `window` that divides `seq_len` ({seq_len}), got {window}")
            if code_shape is not None and not _wavefront_causal(_context_index(code_shape), window):
                raise ValueError(f"`wavefront` needs every row/slab neighbour decoded earlier in the wavefront; a window "
                                 f"of {window} tokens on code grid {tuple(code_shape)} does not allow it (one x-slab does)")
        self.config = dict(num_tokens=int(num_tokens), seq_len=int(seq_len), n_conditioning=int(n_conditioning),
                           d_model=int(d_model), n_layers=int(n_layers), n_heads=int(n_heads),
                           d_ff=int(d_ff or 4 * d_model), attention=attention, dropout=float(dropout),
                           code_shape=list(code_shape) if code_shape is not None else None,
                           window=int(window) if window is not None else None,
                           prior_top=int(prior_top) if prior_top else None, wavefront=bool(wavefront))
        self.engine = resolve_engine(engine)
        self.tok_emb = nn.Embedding(num_tokens, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.cond_proj = nn.Linear(n_conditioning, d_model)
        if code_shape is not None:  # index num_tokens = "no such neighbour"
            self.ctx_emb = nn.Embedding(2 * (num_tokens + 1), d_model)
            nn.init.normal_(self.ctx_emb.weight, std=0.02)
            self.register_buffer("ctx_index", _context_index(code_shape), persistent=False)
        else:
            self.ctx_emb = None
        if self.engine == "fast-transformers":
            from fast_transformers.builders import TransformerEncoderBuilder

            self.encoder = TransformerEncoderBuilder.from_kwargs(**_ft_kwargs(self.config, recurrent=False)).get()
        else:
            c = self.config
            self.encoder = _TorchEncoder(c["n_layers"], c["d_model"], c["n_heads"], c["d_ff"], attention, c["dropout"])
        self.head = nn.Linear(d_model, num_tokens)
        if prior_top:
            self.register_buffer("prior_index", torch.zeros(seq_len, prior_top, dtype=torch.int16))  # small on disk
            self.register_buffer("prior_logp", torch.zeros(seq_len, prior_top))
            self.register_buffer("prior_floor", torch.zeros(seq_len))
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    @property
    def seq_len(self) -> int:
        return self.config["seq_len"]

    @property
    def schedule(self) -> str:
        """The decoding schedule the sampler and the codec use: ``wavefront`` for a model with
        ``wavefront`` (except softmax attention on fast-transformers, whose recurrent key cache holds
        one length for the whole batch), else ``sequential``."""
        if self.config.get("wavefront") and not (self.engine == "fast-transformers" and self.config["attention"] == "softmax"):
            return "wavefront"
        return "sequential"

    def inputs(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens and (B, C) conditions -> (B, L, D) inputs, shifted right by the condition token
        (with ``wavefront``, every block's first input carries no previous token)."""
        c = self.cond_proj(cond.to(self.cond_proj.weight.dtype))[:, None]
        prev = torch.cat([torch.zeros_like(c), self.tok_emb(tokens[:, :-1])], dim=1)
        n = tokens.shape[1]
        if self.config.get("wavefront"):
            starts = torch.arange(n, device=prev.device) % self.config["window"] == 0
            prev = prev.masked_fill(starts[None, :, None], 0.0)
        x = prev + c + self.pos_emb.weight[:n]
        if self.ctx_emb is not None:
            x = x + self.ctx_emb(self._context_ids(tokens, self.ctx_index[:, :n])).sum(1)
        return x

    def _context_ids(self, tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens and (2, n) neighbour positions (-1: none) -> (B, 2, n) ids of ``ctx_emb``."""
        k = self.config["num_tokens"]
        ids = torch.where(index >= 0, tokens[:, index.clamp(min=0)], torch.full_like(index, k)[None])
        return ids + torch.tensor([0, k + 1], device=tokens.device)[None, :, None]

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits: (B, L) tokens, (B, C) conditions -> (B, L, K); ``[:, i]`` predicts token ``i``."""
        if tokens.shape[1] > self.seq_len:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens is longer than the model's {self.seq_len}")
        return self.logits(self.encode_inputs(self.inputs(tokens, cond)), 0)

    def logits(self, h: torch.Tensor, start: int) -> torch.Tensor:
        """(..., n, D) encoder outputs at positions ``start..start+n-1`` -> (..., n, K) logits (+ the prior)."""
        out = self.head(h)
        if self.config.get("prior_top"):
            out = out + self.prior_logits(start, h.shape[-2]).to(out.dtype)
        return out

    def prior_logits(self, start: int, n: int) -> torch.Tensor:
        """(n, K) log-prior of positions ``start..start+n-1``."""
        return self._prior_at(slice(start, start + n))

    def _prior_at(self, index: slice | torch.Tensor) -> torch.Tensor:
        dense = self.prior_floor[index, None].expand(-1, self.config["num_tokens"]).clone()
        return dense.scatter_(1, self.prior_index[index].long(), self.prior_logp[index])

    def logits_at(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(n, B, D) encoder outputs at the ``positions`` (n,) -> (n, B, K) logits (+ the prior)."""
        out = self.head(h)
        if self.config.get("prior_top"):
            out = out + self._prior_at(positions)[:, None].to(out.dtype)
        return out

    @torch.no_grad()
    def set_prior(self, codes: torch.Tensor, alpha: float = 0.05) -> None:
        """Fit the per-position prior on (N, L) training codes (add-``alpha`` smoothing)."""
        k, n_tok = self.config["prior_top"], self.config["num_tokens"]
        codes = codes.long().cpu()
        counts = torch.zeros(self.seq_len, n_tok)
        counts.scatter_add_(1, codes.t(), torch.ones(codes.t().shape))
        p = (counts + alpha) / (len(codes) + alpha * n_tok)
        top_p, top_i = torch.topk(p, k, dim=1)
        rest = (1 - top_p.sum(1)).clamp(min=1e-12) / (n_tok - k)
        self.prior_index.copy_(top_i.to(torch.int16))
        self.prior_logp.copy_(torch.log(top_p))
        self.prior_floor.copy_(torch.log(rest))

    def encode_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The causal encoder over (B, n, D) inputs, block by block when the model has a ``window``
        (``x`` then starts at a block boundary)."""
        b, n, d = x.shape
        w = self.config["window"]
        if w is not None and n > w:
            nb = -(-n // w)
            x = F.pad(x, (0, 0, 0, nb * w - n)).reshape(b * nb, w, d)  # padding at the end: causal, unseen
        if self.engine == "fast-transformers":
            from fast_transformers.masking import TriangularCausalMask

            # its compiled causal product takes float32 only: no bf16 autocast inside the encoder
            with torch.autocast(x.device.type, enabled=False):
                h = self.encoder(x.float(), attn_mask=TriangularCausalMask(x.shape[1], device=x.device))
        else:
            h = self.encoder(x)
        return h.reshape(b, -1, d)[:, :n]

    def decoder(self, cond: torch.Tensor) -> "IncrementalDecoder":
        """An :class:`IncrementalDecoder` (recurrent / key-value-cached) for conditions (B, C)."""
        return IncrementalDecoder(self, cond)

    def wavefront_decoder(self, cond: torch.Tensor) -> "WavefrontDecoder":
        """A :class:`WavefrontDecoder` for conditions (B, C) (a model with ``wavefront``)."""
        return WavefrontDecoder(self, cond)

    def with_engine(self, engine: str) -> "CodeTransformer":
        """A copy of this model (same weights) on another engine."""
        other = CodeTransformer(**self.config, engine=engine)
        other.load_state_dict(self.state_dict())
        return other.to(self.head.weight.device).train(self.training)


class IncrementalDecoder:
    """Token-by-token evaluation of a :class:`CodeTransformer`: each call of :meth:`step` costs the
    same (linear attention) or grows with the prefix only through the cached keys (softmax).

    Example:
        >>> dec = model.decoder(cond)                # doctest: +SKIP
        >>> logits = dec.step(None)                  # distribution of token 0  # doctest: +SKIP
        >>> logits = dec.step(torch.tensor([17]))    # of token 1 given token 0 = 17  # doctest: +SKIP
    """

    @torch.no_grad()
    def __init__(self, model: CodeTransformer, cond: torch.Tensor):
        self.model, self.t = model, 0
        self.c = model.cond_proj(cond.to(model.cond_proj.weight.dtype))
        self.batch = cond.shape[0]
        self.history = torch.zeros(self.batch, model.seq_len, dtype=torch.long, device=self.c.device)
        if model.engine == "fast-transformers":
            from fast_transformers.builders import RecurrentEncoderBuilder

            self.rnn = RecurrentEncoderBuilder.from_kwargs(**_ft_kwargs(model.config, recurrent=True)).get()
            self.rnn.load_state_dict(model.encoder.state_dict())
            self.rnn.to(self.c.device).eval()
            self.state = None
        else:
            self.state = [layer.attention.new_state(self.batch, model.seq_len, self.c) for layer in model.encoder.layers]
            self.fused = [_fuse(layer) for layer in model.encoder.layers] if model.config["attention"] == "linear" else None

    @torch.no_grad()
    def step(self, prev: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, K) of the next token, given the previous token (B,) (``None`` for the first)."""
        m = self.model
        if self.t >= m.seq_len:
            raise ValueError(f"all {m.seq_len} tokens are decoded")
        x = self.c + m.pos_emb.weight[self.t]
        w = m.config["window"]
        if prev is not None:
            prev = prev.to(self.c.device)
            if not (m.config.get("wavefront") and self.t % w == 0):  # wavefront: a block starts without it
                x = x + m.tok_emb(prev)
            self.history[:, self.t - 1] = prev
        elif self.t:
            raise ValueError("`prev` is needed after the first token")
        if m.ctx_emb is not None:
            x = x + m.ctx_emb(m._context_ids(self.history, m.ctx_index[:, self.t:self.t + 1])).sum(1)[:, 0]
        if w is not None and self.t and self.t % w == 0:  # a new attention block
            self._reset()
        if m.engine == "fast-transformers":
            h, self.state = self.rnn(x, state=self.state)
        elif self.fused is not None:
            h = x
            for w, st in zip(self.fused, self.state):
                h = _linear_step(h, w, st, m.config["n_heads"])
            h = m.encoder.norm(h)
        else:
            h = x
            start = self.t - self.t % w if w else 0
            for layer, st in zip(m.encoder.layers, self.state):
                h = layer.step(h, st, self.t, start)
            h = m.encoder.norm(h)
        self.t += 1
        return m.logits(h[:, None], self.t - 1)[:, 0]

    def _reset(self) -> None:
        if self.model.engine == "fast-transformers":
            self.state = None
        elif self.fused is not None:  # linear attention: empty running sums (the KV cache needs no reset)
            for st in self.state:
                st["s"].zero_()
                st["z"].zero_()


class WavefrontDecoder:
    """All attention blocks of a ``wavefront`` model decoded side by side, block ``k`` one position
    behind block ``k - 1``: at step ``t`` block ``k`` decodes in-block position ``t - k`` (when within the
    block), so ``seq_len / window + window - 1`` steps cover the sequence, each one batched evaluation
    of the active blocks (times the condition batch). Every block keeps its own recurrent state
    (linear attention) or key-value cache (softmax); inactive blocks' state is not touched.

    Exact for a model with ``wavefront``: a block's inputs need only its own earlier tokens and the
    tokens of earlier blocks up to the same position (``code_shape``'s slab-back context), all decoded
    at earlier steps. Engines: torch (linear and softmax attention) and fast-transformers (linear;
    its recurrent softmax keeps one key length per batch, so such models stay sequential).

    Example:
        >>> dec = model.wavefront_decoder(cond)          # doctest: +SKIP
        >>> prev = None
        >>> for _ in range(dec.steps):                   # doctest: +SKIP
        ...     positions, logits = dec.step(prev)       # (n,) raster positions, (n, B, K) logits
        ...     prev = logits.argmax(-1)                 # (n, B) the tokens at those positions
    """

    @torch.no_grad()
    def __init__(self, model: CodeTransformer, cond: torch.Tensor):
        cfg = model.config
        if not cfg.get("wavefront"):
            raise ValueError("wavefront decoding needs a model trained with `wavefront` (its first token of a block "
                             "carries no previous token); use the sequential IncrementalDecoder")
        if model.schedule != "wavefront":
            raise ValueError(f"the {model.engine} engine cannot decode {cfg['attention']} attention as a wavefront")
        self.model, self.t, self.positions = model, 0, None
        self.window = w = cfg["window"]
        self.blocks = model.seq_len // w
        self.steps = self.blocks - 1 + w
        self.c = model.cond_proj(cond.to(model.cond_proj.weight.dtype))  # (B, D)
        self.batch = b = cond.shape[0]
        self.history = torch.zeros(b, model.seq_len, dtype=torch.long, device=self.c.device)
        rows, h, e = self.blocks * b, cfg["n_heads"], cfg["d_model"] // cfg["n_heads"]
        z = self.c.new_zeros
        if cfg["attention"] == "linear":  # per layer: running sums S (rows, H, E, E), z (rows, H, E)
            self.state = [{"s": z(rows, h, e, e), "z": z(rows, h, e)} for _ in range(cfg["n_layers"])]
        else:  # per layer: a key-value cache of one block per row
            self.state = [{"k": z(rows, h, w, e), "v": z(rows, h, w, e)} for _ in range(cfg["n_layers"])]
        self.rnn = self.fused = None
        if model.engine == "fast-transformers":
            from fast_transformers.builders import RecurrentEncoderBuilder

            self.rnn = RecurrentEncoderBuilder.from_kwargs(**_ft_kwargs(cfg, recurrent=True)).get()
            self.rnn.load_state_dict(model.encoder.state_dict())
            self.rnn.to(self.c.device).eval()
        elif cfg["attention"] == "linear":
            self.fused = [_fuse(layer) for layer in model.encoder.layers]

    def active(self, t: int) -> tuple[int, int]:
        """Blocks ``lo..hi`` (inclusive) decoded at step ``t``."""
        return max(0, t - self.window + 1), min(t, self.blocks - 1)

    @torch.no_grad()
    def step(self, prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One wavefront step.

        Args:
            prev: (n, B) tokens at the positions the previous step returned (``None`` at the first).

        Returns:
            ``(positions, logits)``: the (n,) raster positions decoded now (ascending block order)
            and their (n, B, K) logits.
        """
        m, w, b = self.model, self.window, self.batch
        if self.t >= self.steps:
            raise ValueError(f"all {m.seq_len} tokens are decoded")
        if prev is not None:
            if self.positions is None:
                raise ValueError("`prev` must be None at the first step")
            self.history[:, self.positions] = prev.to(self.c.device).reshape(len(self.positions), b).t()
        elif self.t:
            raise ValueError("`prev` is needed after the first step")
        lo, hi = self.active(self.t)
        blocks = torch.arange(lo, hi + 1, device=self.c.device)
        inner = self.t - blocks  # in-block positions, decreasing
        pos = blocks * w + inner
        n = len(pos)
        x = self.c[None] + m.pos_emb.weight[pos][:, None]  # (n, B, D)
        emb = m.tok_emb(self.history[:, (pos - 1).clamp(min=0)]).transpose(0, 1)  # (n, B, D)
        x = x + emb.masked_fill((inner == 0)[:, None, None], 0.0)  # a block starts without a previous token
        if m.ctx_emb is not None:
            x = x + m.ctx_emb(m._context_ids(self.history, m.ctx_index[:, pos])).sum(1).transpose(0, 1)
        x = x.reshape(n * b, -1)
        rows = slice(lo * b, (hi + 1) * b)  # row = block * B + condition: the active blocks are contiguous
        if self.rnn is not None:
            state = [[st["s"][rows], st["z"][rows]] for st in self.state]
            h, new = self.rnn(x, state=state)
            for st, (s, z) in zip(self.state, new):  # in place already (no grad); copy if it was not
                if s.data_ptr() != st["s"][rows].data_ptr():
                    st["s"][rows] = s
                    st["z"][rows] = z
        elif self.fused is not None:
            h = x
            for fw, st in zip(self.fused, self.state):
                h = _linear_step(h, fw, {"s": st["s"][rows], "z": st["z"][rows]}, m.config["n_heads"])
            h = m.encoder.norm(h)
        else:
            h = x
            inner_rows = inner.repeat_interleave(b)
            for layer, st in zip(m.encoder.layers, self.state):
                h = _softmax_wave_step(layer, h, st["k"][rows], st["v"][rows], inner_rows)
            h = m.encoder.norm(h)
        self.t += 1
        self.positions = pos
        return pos, m.logits_at(h.view(n, b, -1), pos)


def wavefront_order(seq_len: int, window: int) -> torch.Tensor:
    """(seq_len,) raster positions in the order :class:`WavefrontDecoder` decodes them (step by
    step, blocks ascending within a step)."""
    pos = torch.arange(seq_len)
    block, inner = pos // window, pos % window
    return pos[torch.argsort((block + inner) * (seq_len // window + 1) + block)]


def _wavefront_causal(ctx_index: torch.Tensor, window: int) -> bool:
    """Whether every context neighbour is decoded at an earlier wavefront step than its position."""
    pos = torch.arange(ctx_index.shape[1])
    step = pos // window + pos % window
    nb = ctx_index.clamp(min=0)
    return bool(((ctx_index < 0) | (step[nb] < step[None])).all())


def _softmax_wave_step(layer: _TorchLayer, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       inner: torch.Tensor) -> torch.Tensor:
    """One token per row through a softmax layer; row ``i`` is at in-block position ``inner[i]`` of its
    own (rows, H, window, E) cache (a mask hides the keys past it)."""
    a = layer.attention
    q, k, v = a._qkv(x)  # (N, H, E)
    rows = torch.arange(len(x), device=x.device)
    k_cache[rows, :, inner] = k
    v_cache[rows, :, inner] = v
    n = int(inner.max()) + 1
    mask = (torch.arange(n, device=x.device)[None] <= inner[:, None])[:, None, None]  # (N, 1, 1, n)
    y = F.scaled_dot_product_attention(q[:, :, None], k_cache[:, :, :n], v_cache[:, :, :n], attn_mask=mask)[:, :, 0]
    return layer._ff(x + a.out_projection(y.reshape(x.shape)))


def _context_index(code_shape) -> torch.Tensor:
    """(2, L) raster positions of each code's neighbour one row back (y - 1) and one slab back (x - 1); -1 if none."""
    nx, ny, nz = (int(v) for v in code_shape)
    ix, iy, iz = torch.meshgrid(torch.arange(nx), torch.arange(ny), torch.arange(nz), indexing="ij")
    pos = (ix * ny + iy) * nz + iz
    row = torch.where(iy > 0, pos - nz, -1)
    slab = torch.where(ix > 0, pos - ny * nz, -1)
    return torch.stack([row.flatten(), slab.flatten()])


def _fuse(layer: _TorchLayer) -> dict[str, torch.Tensor]:
    """A layer's weights laid out for :func:`_linear_step` (query/key/value as one matrix)."""
    a = layer.attention
    return {
        "wqkv": torch.cat([a.query_projection.weight, a.key_projection.weight, a.value_projection.weight]).t().contiguous(),
        "bqkv": torch.cat([a.query_projection.bias, a.key_projection.bias, a.value_projection.bias]),
        "wo": a.out_projection.weight.t().contiguous(), "bo": a.out_projection.bias,
        "w1": layer.linear1.weight.t().contiguous(), "b1": layer.linear1.bias,
        "w2": layer.linear2.weight.t().contiguous(), "b2": layer.linear2.bias,
        "n1": (layer.norm1.weight, layer.norm1.bias, layer.norm1.eps), "n2": (layer.norm2.weight, layer.norm2.bias, layer.norm2.eps),
    }


def _linear_step(x: torch.Tensor, w: dict, state: dict, n_heads: int) -> torch.Tensor:
    """One token through one linear-attention layer (the maths of :meth:`_TorchLayer.step`, fewer calls)."""
    b, d = x.shape
    q, k, v = torch.addmm(w["bqkv"], x, w["wqkv"]).view(b, 3, n_heads, d // n_heads).unbind(1)
    q, k = _phi(q), _phi(k)
    state["s"].add_(k.unsqueeze(-1) * v.unsqueeze(-2))  # S_i = S_{i-1} + phi(k_i) v_i^T
    state["z"].add_(k)  # z_i = z_{i-1} + phi(k_i)
    num = torch.matmul(q.unsqueeze(-2), state["s"]).squeeze(-2)
    y = (num / ((q * state["z"]).sum(-1, keepdim=True) + _EPS)).reshape(b, d)
    x = F.layer_norm(x + torch.addmm(w["bo"], y, w["wo"]), (d,), *w["n1"][:2], w["n1"][2])
    h = torch.addmm(w["b2"], F.gelu(torch.addmm(w["b1"], x, w["w1"])), w["w2"])
    return F.layer_norm(x + h, (d,), *w["n2"][:2], w["n2"][2])
