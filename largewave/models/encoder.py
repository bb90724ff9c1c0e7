"""Non-causal dilated residual conv encoder (NSynth-style), downsampled by the level's hop.

The encoder has no normalisation over time and only zero padding at the edges, so every code
frame depends on a fixed window of input tokens (:attr:`Encoder.context` on each side of its hop
tokens). Encoding a long stream in chunks that overlap by ``context`` tokens (rounded up to a
multiple of hop) and keeping each chunk's interior frames reproduces the whole-stream encoding.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class _ResBlock(nn.Module):
    """x + 1×1(ReLU(dilated k-tap conv(ReLU(x)))), 'same' zero padding."""

    def __init__(self, channels: int, kernel_size: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size, dilation=dilation,
                              padding=dilation * (kernel_size // 2))
        self.proj = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.proj(F.relu(self.conv(F.relu(x))))


class Encoder(nn.Module):
    """Tokens → pre-quantisation features at frame rate.

    Args:
        vocab: input token classes (256 mu-law classes at level 1, K codes above).
        out_channels: features per frame handed to the quantiser (K for AMAE, D for VQ/continuous).
        hop: input tokens per output frame.
        channels: width of the residual stack.
        dilations: one per residual block, e.g. ``[1, 2, …, 512]``.
        kernel_size: odd taps of each dilated conv (centred, non-causal).
        downsample: ``"strided"`` (a learned conv with kernel = stride = hop) or ``"pool"``
            (average over each hop).
        waveform_input: read tokens as mu-law-companded amplitudes in [-1, 1] (level 1);
            otherwise as embeddings of ``input_embedding`` dims (codes of the level below).

    Shapes: ``forward(tokens: LongTensor[B x T]) -> Tensor[B x out_channels x T/hop]``
    (T a multiple of hop).
    """

    def __init__(
        self,
        vocab: int,
        out_channels: int,
        hop: int,
        channels: int = 64,
        dilations: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        kernel_size: int = 3,
        downsample: str = "strided",
        waveform_input: bool = True,
        input_embedding: int = 32,
    ):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size={kernel_size} must be odd")
        if downsample not in ("strided", "pool"):
            raise ValueError(f"downsample={downsample!r} must be 'strided' or 'pool'")
        self.vocab = vocab
        self.hop = hop
        self.kernel_size = kernel_size
        self.dilations = [int(d) for d in dilations]
        self.waveform_input = waveform_input
        in_ch = 1 if waveform_input else input_embedding
        self.embed = None if waveform_input else nn.Embedding(vocab, input_embedding)
        self.input = nn.Conv1d(in_ch, channels, kernel_size, padding=kernel_size // 2)
        self.blocks = nn.ModuleList([_ResBlock(channels, kernel_size, d) for d in self.dilations])
        if downsample == "strided":
            self.down = nn.Conv1d(channels, channels, hop, stride=hop)
        else:
            self.down = nn.AvgPool1d(hop, stride=hop)
        self.out = nn.Conv1d(channels, out_channels, 1)
        # recompute blocks in backward instead of storing activations (train.activation_checkpointing)
        self.activation_checkpointing = False

    @property
    def context(self) -> int:
        """Input tokens each code frame sees on *each* side of its own hop tokens."""
        return (self.kernel_size // 2) * (1 + sum(self.dilations))

    @property
    def receptive_field(self) -> int:
        """Input tokens one code frame depends on: its hop tokens plus the context on both sides."""
        return self.hop + 2 * self.context

    def features(self, tokens: Tensor) -> Tensor:
        """Tensor[B x Cin x T]: the encoder's input representation of LongTensor[B x T] tokens."""
        if self.embed is None:
            # mu-law classes 0 … V−1 are already companded amplitudes: map them back to [-1, 1]
            return (tokens.float() * (2.0 / (self.vocab - 1)) - 1.0)[:, None, :]
        return self.embed(tokens).transpose(1, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.shape[1] % self.hop:
            raise ValueError(f"{tokens.shape[1]} tokens is not a multiple of the hop ({self.hop})")
        x = self.input(self.features(tokens))
        ckpt = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if ckpt else block(x)
        return self.out(F.relu(self.down(x)))
