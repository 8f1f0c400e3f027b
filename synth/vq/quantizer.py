"""Vector quantiser with an exponential-moving-average codebook and dead-code restarts.

Van den Oord et al., "Neural discrete representation learning", NeurIPS 2017: ``z_q = e_k`` with
``k = argmin_j ||z_e - e_j||``; the encoder gets the straight-through gradient and the commitment
loss ``beta ||z_e - sg(z_q)||^2``; the codebook follows the EMA of the vectors assigned to each code
(their appendix A.1). Codes that fall out of use are restarted on encoder outputs drawn from the
current batch (Dhariwal et al. 2020, "Jukebox", sec. 2.2), so the whole codebook stays in use.

Distances and assignments are always computed in float32 (also under bf16 autocast), so the
indices, and hence compressed files, do not depend on the autocast setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EMAQuantizer", "QuantizerOutput"]


@dataclass
class QuantizerOutput:
    """Result of :meth:`EMAQuantizer.forward`.

    Attributes:
        quantized: (B, D, x, y, z) codebook vectors (straight-through gradient to the input).
        indices: (B, x, y, z) int64 code indices.
        commitment: Scalar commitment loss ``||z_e - sg(z_q)||^2`` (unweighted).
        perplexity: ``exp(entropy)`` of the batch's code usage (codebook usage; 1 = collapsed).
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    commitment: torch.Tensor
    perplexity: torch.Tensor


class EMAQuantizer(nn.Module):
    """EMA vector quantiser for (B, D, x, y, z) inputs.

    Args:
        num_embeddings: Codebook size ``K``.
        embedding_dim: Code dimension ``D``.
        decay: EMA decay of the codebook statistics.
        epsilon: Laplace smoothing of the cluster sizes.
        dead_threshold: A code whose EMA usage (assignments per step) falls below this is dead.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, decay: float = 0.99, epsilon: float = 1e-5,
                 dead_threshold: float = 0.03):
        super().__init__()
        if num_embeddings < 2 or embedding_dim < 1:
            raise ValueError(f"need num_embeddings >= 2 and embedding_dim >= 1, got {num_embeddings} and {embedding_dim}")
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.decay, self.epsilon, self.dead_threshold = decay, epsilon, dead_threshold
        self.register_buffer("codebook", torch.randn(num_embeddings, embedding_dim))
        self.register_buffer("ema_count", torch.ones(num_embeddings))
        self.register_buffer("ema_sum", self.codebook.clone())

    # -- inference ------------------------------------------------------------------------------
    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code of each vector of a (B, D, x, y, z) tensor: (B, x, y, z) int64, in float32."""
        with torch.autocast(z.device.type, enabled=False):  # autocast would run the matmul in bf16
            flat = z.float().movedim(1, -1).reshape(-1, self.embedding_dim)
            cb = self.codebook.float()
            dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ cb.t() + cb.pow(2).sum(1)[None]
            return dist.argmin(1).view(z.shape[0], *z.shape[2:])

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, x, y, z) indices -> (B, D, x, y, z) codebook vectors."""
        return F.embedding(indices, self.codebook).movedim(-1, 1).contiguous()

    # -- training -------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(z.device.type, enabled=False):
            return self._forward(z.float())

    def _forward(self, z: torch.Tensor) -> QuantizerOutput:
        idx = self.assign(z)
        zq = self.embed(idx)
        counts = torch.bincount(idx.flatten(), minlength=self.num_embeddings).float()
        if self.training:
            self._ema_update(z, idx, counts)
            zq = self.embed(idx)
        commitment = F.mse_loss(z, zq.detach())
        p = counts / counts.sum()
        perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum())
        quantized = z + (zq - z).detach()  # straight-through estimator
        return QuantizerOutput(quantized, idx, commitment, perplexity)

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        flat = z.movedim(1, -1).reshape(-1, self.embedding_dim)
        sums = torch.zeros_like(self.ema_sum).index_add_(0, idx.flatten(), flat)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.ema_count.sum()
        count = (self.ema_count + self.epsilon) / (n + self.num_embeddings * self.epsilon) * n
        self.codebook.copy_(self.ema_sum / count[:, None])

    @torch.no_grad()
    def restart_dead(self, z: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """Move codes whose EMA usage is below ``dead_threshold`` onto random input vectors of ``z``.

        Returns the number of codes restarted. Deterministic for a given ``generator``.
        """
        dead = (self.ema_count < self.dead_threshold).nonzero().flatten()
        if len(dead) == 0:
            return 0
        flat = z.detach().float().movedim(1, -1).reshape(-1, self.embedding_dim)
        pick = torch.randint(len(flat), (len(dead),), generator=generator, device="cpu").to(flat.device)
        noise = torch.randn(len(dead), self.embedding_dim, generator=generator, device="cpu").to(flat.device)
        new = flat[pick] + 0.01 * flat.std() * noise
        self.codebook[dead] = new
        self.ema_sum[dead] = new
        self.ema_count[dead] = 1.0
        return int(len(dead))

    @torch.no_grad()
    def init_codebook(self, vectors: torch.Tensor, iters: int = 20, seed: int = 0) -> None:
        """k-means (Lloyd) initialisation on (N, D) encoder outputs; empty clusters take random vectors."""
        vectors = vectors.float()
        g = torch.Generator().manual_seed(seed)
        if len(vectors) < self.num_embeddings:
            raise ValueError(f"k-means needs at least {self.num_embeddings} vectors, got {len(vectors)}")
        cb = vectors[torch.randperm(len(vectors), generator=g)[: self.num_embeddings]].clone()
        for _ in range(iters):
            a = torch.cdist(vectors, cb).argmin(1)
            counts = torch.bincount(a, minlength=self.num_embeddings).float()
            sums = torch.zeros_like(cb).index_add_(0, a, vectors)
            empty = counts == 0
            cb = torch.where(empty[:, None], cb, sums / counts.clamp(min=1)[:, None])
            if empty.any():
                cb[empty] = vectors[torch.randint(len(vectors), (int(empty.sum()),), generator=g)]
        self.codebook.copy_(cb)
        self.ema_sum.copy_(cb)
        self.ema_count.fill_(1.0)
