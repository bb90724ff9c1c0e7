"""Quantisers between an encoder and a decoder; all return one :class:`QuantiserOutput`.

- :class:`VectorQuantiser` (VQ-VAE): nearest of K codebook vectors, straight-through gradient,
  EMA codebook updates (default) or codebook + commitment losses, data-dependent init and
  dead-code restarts from recent encoder outputs. EMA state lives in fp32 buffers and is kept
  identical on every rank when ``torch.distributed`` is initialised.
- :class:`ArgmaxQuantiser` (AMAE): ReLU → normalise → argmax one-hot, straight-through, with the
  diversity loss ``Σ_i (K·q̄_i − 1)²``.
- :class:`ContinuousQuantiser` (NSynth baseline): no quantisation.

Every quantiser maps ``Tensor[B x input_dim x T] -> QuantiserOutput`` whose ``output`` is
``Tensor[B x dim x T]`` (what the decoder is conditioned on) and whose ``codes`` are
``LongTensor[B x T]`` (None for the continuous one). ``embed(codes)`` gives the decoder input
for stored codes. ``loss_weights`` names the weights of the loss terms it returns.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class QuantiserOutput:
    output: Tensor  # Tensor[B x D x T]: straight-through quantised embedding for the decoder
    codes: Optional[Tensor]  # LongTensor[B x T] (None: continuous)
    losses: dict[str, Tensor] = field(default_factory=dict)  # unweighted terms, keyed as logged
    metrics: dict[str, Tensor] = field(default_factory=dict)  # detached scalars


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _CodeUsage(nn.Module):
    """Usage statistics shared by the discrete quantisers: a ring of per-step code counts
    (``usage_window`` steps, a buffer, so it survives checkpoints)."""

    def __init__(self, codes: int, usage_window: int):
        super().__init__()
        self.codes = codes
        self.register_buffer("usage", torch.zeros(usage_window, codes))
        self.register_buffer("usage_step", torch.zeros((), dtype=torch.long))

    def _usage_metrics(self, codes: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            counts = torch.bincount(codes.reshape(-1), minlength=self.codes).float()
            if self.training:
                self.usage[int(self.usage_step) % self.usage.shape[0]] = counts
                self.usage_step += 1
            p = counts / counts.sum().clamp_min(1)
            entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
            window = self.usage.sum(0) + (0 if self.training else counts)
            used_window = (window > 0).sum().float()
            return {
                "codes_used": (counts > 0).sum().float(),
                "codes_used_window": used_window,
                "perplexity": entropy.exp(),
                "dead_codes": self.codes - used_window,
            }


class ArgmaxQuantiser(_CodeUsage):
    """Argmax autoencoder bottleneck.

    ``q = ReLU(z) / (Σ ReLU(z) + eps)`` (``normalise="sum"``, the paper's) or ``softmax(z)``;
    the decoder sees ``embed(onehot(argmax q))`` with the straight-through gradient of q.
    The diversity loss ``Σ_i (K·q̄_i − 1)²`` of the batch-and-time mean q̄ is zero when every
    code gets the same share.

    Shapes: ``forward(z: Tensor[B x K x T]) -> QuantiserOutput(output: [B x dim x T], codes: [B x T])``.
    """

    def __init__(self, codes: int, dim: int, normalise: str = "sum", diversity_weight: float = 0.1,
                 eps: float = 1e-6, usage_window: int = 100):
        super().__init__(codes, usage_window)
        if normalise not in ("sum", "softmax"):
            raise ValueError(f"normalise={normalise!r} must be 'sum' or 'softmax'")
        self.dim = dim
        self.input_dim = codes
        self.normalise = normalise
        self.eps = eps
        self.loss_weights = {"diversity": float(diversity_weight)}
        # the one-hot's embedding (a K×D table applied to the straight-through one-hot)
        self.embedding = nn.Parameter(torch.randn(codes, dim))

    def probabilities(self, z: Tensor) -> Tensor:
        """Tensor[B x K x T] → normalised non-negative q, Tensor[B x K x T] summing to ≤ 1 over K."""
        z = z.float()
        if self.normalise == "softmax":
            return torch.softmax(z, dim=1)
        h = F.relu(z)
        return h / (h.sum(dim=1, keepdim=True) + self.eps)

    def one_hot(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Tensor[B x K x T] → (straight-through one-hot [B x K x T], codes [B x T], q [B x K x T]).
        The one-hot's forward value is exact (the q − q terms cancel exactly in floating point)."""
        q = self.probabilities(z)
        codes = q.argmax(dim=1)
        onehot = F.one_hot(codes, self.codes).transpose(1, 2).to(q.dtype)
        return onehot + (q - q.detach()), codes, q

    def forward(self, z: Tensor) -> QuantiserOutput:
        st, codes, q = self.one_hot(z)
        # Exact lookup forward + straight-through path backward (its forward value is exactly 0).
        output = (self.embed(codes)
                  + torch.einsum("bkt,kd->bdt", st - st.detach(), self.embedding))
        qbar = q.mean(dim=(0, 2))
        diversity = ((self.codes * qbar - 1.0) ** 2).sum()
        metrics = self._usage_metrics(codes)
        return QuantiserOutput(output=output, codes=codes, losses={"diversity": diversity}, metrics=metrics)

    def embed(self, codes: Tensor) -> Tensor:
        """LongTensor[B x T] → Tensor[B x dim x T]."""
        return F.embedding(codes, self.embedding).transpose(1, 2)


class VectorQuantiser(_CodeUsage):
    """VQ-VAE bottleneck with EMA (default) or gradient-trained codebook.

    State (all buffers, fp32, in the state_dict): ``codebook`` [K x D] (a parameter without EMA),
    ``ema_count`` [K], ``ema_sum`` [K x D], ``initialised``, ``recent`` [M x D] (a reservoir of
    recent encoder outputs that dead codes restart from) and the usage window.

    Under ``torch.distributed`` the EMA statistics are all-reduced before the update, and the
    data-dependent init and restarts are chosen on rank 0 and broadcast, so all ranks hold the
    same codebook after every step.

    Shapes: ``forward(z: Tensor[B x D x T]) -> QuantiserOutput(output: [B x D x T], codes: [B x T])``.
    """

    def __init__(self, codes: int, dim: int, ema: bool = True, decay: float = 0.99,
                 commitment_weight: float = 0.25, codebook_weight: float = 1.0,
                 restart_threshold: float = 1.0, usage_window: int = 100, recent: int = 4096,
                 eps: float = 1e-5):
        super().__init__(codes, usage_window)
        self.dim = dim
        self.input_dim = dim
        self.ema = ema
        self.decay = decay
        self.restart_threshold = restart_threshold
        self.eps = eps
        self.loss_weights = {"commitment": float(commitment_weight)}
        if ema:
            self.register_buffer("codebook", torch.randn(codes, dim))
        else:
            self.codebook = nn.Parameter(torch.randn(codes, dim))
            self.loss_weights["codebook"] = float(codebook_weight)
        self.register_buffer("ema_count", torch.ones(codes))
        self.register_buffer("ema_sum", self.codebook.detach().clone())
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.register_buffer("recent", torch.zeros(recent, dim))
        self.register_buffer("recent_filled", torch.zeros((), dtype=torch.long))

    def _apply(self, fn, recurse=True):
        # Module-wide casts (``.bfloat16()``, as DeepSpeed's bf16 mode does) move the EMA state
        # but keep it fp32: EMA updates of 0.01·x in bf16 would round away.
        keep = {n: b for n, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for n, old in keep.items():
            new = self._buffers[n]
            if new is not None and new.dtype != old.dtype:
                self._buffers[n] = old.to(device=new.device)
        return self

    # ---- helpers -------------------------------------------------------------------------

    def _nearest(self, flat: Tensor) -> Tensor:
        """Tensor[N x D] fp32 → LongTensor[N] indices of the nearest codebook rows."""
        cb = self.codebook.detach().float()
        d = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ cb.t() + cb.pow(2).sum(1)[None])
        return d.argmin(dim=1)

    def _remember(self, flat: Tensor) -> None:
        """Keep a random subset of this batch's encoder outputs for restarts (rank-local)."""
        m = self.recent.shape[0]
        take = flat[torch.randperm(flat.shape[0], device=flat.device)[:m]]
        n = take.shape[0]
        self.recent = torch.roll(self.recent, n, 0)
        self.recent[:n] = take
        self.recent_filled.fill_(min(int(self.recent_filled) + n, m))

    def _sample_recent(self, n: int) -> Tensor:
        pool = self.recent[: max(int(self.recent_filled), 1)]
        idx = torch.randint(0, pool.shape[0], (n,), device=pool.device)
        # a small jitter so that several restarts from one vector can still separate
        return pool[idx] + 1e-3 * pool.std() * torch.randn(n, self.dim, device=pool.device)

    def _broadcast_state(self) -> None:
        if _distributed():
            for t in (self.codebook.data, self.ema_sum, self.ema_count):
                dist.broadcast(t, src=0)

    @torch.no_grad()
    def _init_from(self, flat: Tensor) -> None:
        self._remember(flat)
        self.codebook.data.copy_(self._sample_recent(self.codes))
        self.ema_sum.copy_(self.codebook.data)
        self.ema_count.fill_(1.0)
        self._broadcast_state()
        self.initialised.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, codes: Tensor) -> None:
        onehot = F.one_hot(codes, self.codes).float()  # [N x K]
        count = onehot.sum(0)
        total = onehot.t() @ flat  # [K x D]
        if _distributed():
            stats = torch.cat([count[:, None], total], 1)
            dist.all_reduce(stats)
            count, total = stats[:, 0], stats[:, 1:]
        self.ema_count.mul_(self.decay).add_(count, alpha=1 - self.decay)
        if self.ema:
            self.ema_sum.mul_(self.decay).add_(total, alpha=1 - self.decay)
            # Laplace smoothing keeps rarely used codes from dividing by ~0
            n = self.ema_count.sum()
            smoothed = (self.ema_count + self.eps) / (n + self.codes * self.eps) * n
            self.codebook.data.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def _restart_dead(self) -> Tensor:
        """Move codes whose EMA count fell below the threshold onto recent encoder outputs.
        ``ema_count`` is identical on every rank, so all ranks agree on the dead set; rank 0
        picks the new vectors and broadcasts them."""
        dead = self.ema_count < self.restart_threshold
        n = int(dead.sum())
        if n:
            new = self._sample_recent(n)
            self.codebook.data[dead] = new.to(self.codebook.dtype)
            self.ema_sum[dead] = new
            self.ema_count[dead] = self.restart_threshold
            self._broadcast_state()
        return torch.tensor(float(n), device=self.ema_count.device)

    # ---- forward -------------------------------------------------------------------------

    def forward(self, z: Tensor) -> QuantiserOutput:
        B, D, T = z.shape
        # Distances, statistics and the codebook stay in fp32 even under bf16 autocast.
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = z.float()
            flat = zf.transpose(1, 2).reshape(-1, D).detach()
            if self.training and not bool(self.initialised):
                self._init_from(flat)
            codes = self._nearest(flat)
            restarted = torch.zeros((), device=z.device)
            if self.training:
                self._remember(flat)
                self._ema_update(flat, codes)
                restarted = self._restart_dead()
            q = F.embedding(codes, self.codebook.float()).view(B, T, D).transpose(1, 2)  # [B x D x T]
            losses = {"commitment": F.mse_loss(zf, q.detach())}
            if not self.ema:
                losses["codebook"] = F.mse_loss(q, zf.detach())
            output = zf + (q - zf).detach()  # straight-through
            codes = codes.view(B, T)
        metrics = self._usage_metrics(codes)
        metrics["restarted"] = restarted
        return QuantiserOutput(output=output, codes=codes, losses=losses, metrics=metrics)

    def embed(self, codes: Tensor) -> Tensor:
        """LongTensor[B x T] → Tensor[B x D x T]."""
        return F.embedding(codes, self.codebook.float()).transpose(1, 2)


class ContinuousQuantiser(nn.Module):
    """Identity bottleneck (the NSynth autoencoder's continuous embedding).

    Shapes: ``forward(z: Tensor[B x D x T]) -> QuantiserOutput(output: z, codes: None)``.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.input_dim = dim
        self.codes = 0
        self.loss_weights: dict[str, float] = {}

    def forward(self, z: Tensor) -> QuantiserOutput:
        return QuantiserOutput(output=z, codes=None, losses={},
                               metrics={"embedding_rms": z.detach().float().pow(2).mean().sqrt()})

    def embed(self, codes: Tensor) -> Tensor:
        raise TypeError("a continuous bottleneck has no codes; decode from the embedding itself")
