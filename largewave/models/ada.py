"""Levels of the stack: the autoregressive discrete autoencoder (ADA) level, and the
unconditioned autoregressive level (the prior over top codes, or the plain WaveNet baseline).

Every level has ``loss(tokens) -> LossOutput`` and ``nll(tokens, shuffle_codes, generator)``;
an ADA level also ``encode``s tokens to codes and ``decode``s codes back to tokens; the
unconditioned level ``generate``s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .encoder import Encoder
from .quantizers import ContinuousQuantiser, QuantiserOutput
from .wavenet import WaveNet

LN2 = math.log(2.0)


@dataclass
class LossOutput:
    loss: Tensor  # scalar: Σ weights[k] · terms[k]
    terms: dict[str, Tensor]  # unweighted loss terms, named as logged ("nll", "diversity", …)
    weights: dict[str, float]  # weight of every term, same keys as ``terms``
    metrics: dict[str, Tensor] = field(default_factory=dict)  # detached scalars (bits_per_token, …)


def _weighted(terms: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    return sum(weights[k] * terms[k] for k in terms)


def _shuffle_frames(x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Permute the frames of Tensor[B x D x T] across batch and time (destroys the pairing of
    frames with the tokens they encode, keeps their marginal distribution)."""
    B, D, T = x.shape
    flat = x.transpose(1, 2).reshape(B * T, D)
    perm = torch.randperm(B * T, generator=generator, device="cpu").to(x.device)
    return flat[perm].view(B, T, D).transpose(1, 2)


class ADALevel(nn.Module):
    """Encoder → quantiser → upsample → WaveNet decoder over the same tokens.

    The decoder predicts token t from tokens < t (shifted inside :class:`WaveNet`) and from the
    code frame ``t // hop``, which was computed from a non-causal window of the input: codes may
    see the future, the decoder's own token inputs may not.

    Args:
        encoder: tokens → Tensor[B x quantiser.input_dim x T/hop].
        quantiser: :class:`ArgmaxQuantiser`, :class:`VectorQuantiser` or
            :class:`ContinuousQuantiser` (the NSynth baseline).
        decoder: a conditioned :class:`WaveNet` over the same vocabulary, ``cond_hop == hop``.
    """

    def __init__(self, encoder: Encoder, quantiser: nn.Module, decoder: WaveNet):
        super().__init__()
        if decoder.cond_channels <= 0:
            raise ValueError("an ADA decoder must be conditioned (cond_channels > 0)")
        if decoder.cond_hop != encoder.hop:
            raise ValueError(f"decoder hop {decoder.cond_hop} != encoder hop {encoder.hop}")
        self.encoder = encoder
        self.quantiser = quantiser
        self.decoder = decoder
        # the quantiser's embedding (dim D) → the decoder's conditioning channels C
        if quantiser.dim != decoder.cond_channels:
            self.cond_proj: nn.Module = nn.Conv1d(quantiser.dim, decoder.cond_channels, 1)
        else:
            self.cond_proj = nn.Identity()

    @property
    def hop(self) -> int:
        return self.encoder.hop

    @property
    def vocab(self) -> int:
        return self.decoder.vocab

    @property
    def discrete(self) -> bool:
        return not isinstance(self.quantiser, ContinuousQuantiser)

    @property
    def receptive_field(self) -> int:
        """The decoder's receptive field in tokens."""
        return self.decoder.receptive_field

    def quantise(self, tokens: Tensor, update: bool = True) -> QuantiserOutput:
        """LongTensor[B x T] → the quantiser's result for its T/hop frames.

        ``update=False`` runs the quantiser as in eval mode whatever the module's mode: no EMA
        update, restart, usage-window entry or collective — what evaluation and encoding on
        one rank need."""
        z = self.encoder(tokens)
        if update or not self.quantiser.training:
            return self.quantiser(z)
        self.quantiser.train(False)
        try:
            return self.quantiser(z)
        finally:
            self.quantiser.train(True)

    def loss(self, tokens: Tensor) -> LossOutput:
        """Training objective on LongTensor[B x T] (T a multiple of hop).

        terms: ``nll`` (nats/token) plus the quantiser's (``diversity``; or ``commitment`` and,
        without EMA, ``codebook``)."""
        q = self.quantise(tokens)
        logits = self.decoder(tokens, self.cond_proj(q.output))
        nll = F.cross_entropy(logits.float(), tokens)
        terms = {"nll": nll, **q.losses}
        weights = {"nll": 1.0, **self.quantiser.loss_weights}
        metrics = {"bits_per_token": nll.detach() / LN2, **q.metrics}
        return LossOutput(loss=_weighted(terms, weights), terms=terms, weights=weights, metrics=metrics)

    def nll(self, tokens: Tensor, shuffle_codes: bool = False,
            generator: Optional[torch.Generator] = None) -> Tensor:
        """Mean NLL (nats/token) of LongTensor[B x T] given its own codes; with ``shuffle_codes``
        the code frames are permuted across batch and time first (the "uses the codes" gap)."""
        q = self.quantise(tokens, update=False)
        cond = q.output
        if shuffle_codes:
            cond = _shuffle_frames(cond, generator)
        logits = self.decoder(tokens, self.cond_proj(cond))
        return F.cross_entropy(logits.float(), tokens)

    @torch.no_grad()
    def encode(self, tokens: Tensor) -> Tensor:
        """LongTensor[B x T] → codes LongTensor[B x T/hop] (for a continuous level: the
        embedding Tensor[B x D x T/hop])."""
        q = self.quantise(tokens, update=False)
        return q.codes if q.codes is not None else q.output

    @torch.no_grad()
    def decode(self, codes: Tensor, temperature: float = 1.0, prompt: Optional[Tensor] = None,
               generator: Optional[torch.Generator] = None, top_p: float = 1.0,
               progress: Optional[Callable[[int], None]] = None) -> Tensor:
        """Generate the token stream that ``codes`` encode.

        Args:
            codes: LongTensor[B x Tc] (or, for a continuous level, Tensor[B x D x Tc]).
            temperature: sampling temperature (0 = greedy).
            prompt: LongTensor[B x P] tokens forced at the start (P ≤ Tc·hop).
            generator: torch.Generator for reproducible sampling.
            top_p: nucleus cut-off (1 = the whole distribution); see :meth:`WaveNet.generate`.
            progress: called with the number of positions just generated (a progress bar's update).
        Returns:
            LongTensor[B x Tc·hop], the prompt included.
        """
        emb = codes.float() if codes.dim() == 3 else self.quantiser.embed(codes)
        cond = self.cond_proj(emb)
        return self.decoder.generate(cond.shape[2] * self.hop, cond=cond, temperature=temperature,
                                     generator=generator, prompt=prompt, top_p=top_p, progress=progress)


class Prior(nn.Module):
    """An unconditioned WaveNet over a token stream: the prior over the top level's codes, and
    (as :class:`WaveNetLevel`) the plain WaveNet baseline over mu-law audio tokens."""

    hop = 1

    def __init__(self, decoder: WaveNet):
        super().__init__()
        if decoder.cond_channels:
            raise ValueError("a prior's WaveNet is unconditioned (cond_channels = 0)")
        self.decoder = decoder

    @property
    def vocab(self) -> int:
        return self.decoder.vocab

    @property
    def receptive_field(self) -> int:
        return self.decoder.receptive_field

    def loss(self, tokens: Tensor) -> LossOutput:
        """LongTensor[B x T] → LossOutput with the single term ``nll`` (nats/token)."""
        nll = self.nll(tokens)
        return LossOutput(loss=nll, terms={"nll": nll}, weights={"nll": 1.0},
                          metrics={"bits_per_token": nll.detach() / LN2})

    def nll(self, tokens: Tensor, shuffle_codes: bool = False,
            generator: Optional[torch.Generator] = None) -> Tensor:
        """Mean NLL (nats/token); ``shuffle_codes`` is accepted for a uniform interface and has
        no effect (nothing conditions a prior)."""
        return F.cross_entropy(self.decoder(tokens).float(), tokens)

    @torch.no_grad()
    def generate(self, n_tokens: int, batch: int = 1, temperature: float = 1.0,
                 generator: Optional[torch.Generator] = None, prompt: Optional[Tensor] = None,
                 top_p: float = 1.0, progress: Optional[Callable[[int], None]] = None) -> Tensor:
        """Sample LongTensor[batch x n_tokens] (the optional prompt LongTensor[batch x P] first;
        ``top_p``: nucleus cut-off, ``progress``: see :meth:`WaveNet.generate`)."""
        return self.decoder.generate(n_tokens, batch=batch, temperature=temperature,
                                     generator=generator, prompt=prompt, top_p=top_p, progress=progress)


class WaveNetLevel(Prior):
    """The plain WaveNet baseline: an unconditioned WaveNet over mu-law audio tokens."""


Level = Union[ADALevel, Prior]
