"""WaveNet over a token stream, with exact fast (incremental) generation.

One class serves every level: a level-k decoder is a WaveNet over level-(k−1) tokens conditioned
on upsampled level-k code embeddings; the prior (and the plain WaveNet baseline) is the same
network without conditioning.

Position ``t`` of the output is the distribution of token ``t`` given tokens ``< t`` (and the
conditioning): the input is shifted right by one inside :meth:`WaveNet.forward`, so callers pass
the target tokens themselves.

Generation keeps an explicit :class:`IncrementalState`: a ring of each layer's past inputs, so
that one step costs O(layers) small matrix products whatever the receptive field.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from largewave.models import fast_step
from largewave.models.residual_stack import residual_stack


class WaveNet(nn.Module):
    """Causal dilated gated convolutions over tokens ``0 … vocab-1``.

    Args:
        vocab: number of token classes V (256 mu-law classes, or K codes of the level below).
        dilations: one dilation per residual layer, e.g. ``[1, 2, …, 512] * 3``.
        residual_channels: R, width of the residual stream.
        gate_channels: G, output width of each dilated conv (G/2 tanh and G/2 sigmoid halves).
        skip_channels: S, width of the skip sum and of the output stack.
        kernel_size: taps of each dilated conv (2 in the paper).
        input_kernel_size: taps of the causal input convolution over one-hot tokens
            (1 = a plain embedding lookup).
        cond_channels: C, channels of the local conditioning (0 = unconditioned).
        cond_hop: tokens per conditioning frame (the level's hop).
        upsample: ``"repeat"`` (each frame repeated hop times) or ``"transposed"`` (a learned
            transposed convolution with kernel = stride = hop, so every token position inside a
            frame gets its own vector while still seeing only its own frame).

    Shapes: ``forward(tokens: LongTensor[B x T], cond: Tensor[B x C x T/hop]) -> Tensor[B x V x T]``.
    """

    def __init__(
        self,
        vocab: int,
        dilations: Sequence[int],
        residual_channels: int = 64,
        gate_channels: int = 128,
        skip_channels: int = 256,
        kernel_size: int = 2,
        input_kernel_size: int = 1,
        cond_channels: int = 0,
        cond_hop: int = 1,
        upsample: str = "repeat",
    ):
        super().__init__()
        if gate_channels % 2:
            raise ValueError(f"gate_channels={gate_channels} must be even")
        if kernel_size < 2:
            raise ValueError(f"kernel_size={kernel_size} must be >= 2")
        if upsample not in ("repeat", "transposed"):
            raise ValueError(f"upsample={upsample!r} must be 'repeat' or 'transposed'")
        self.vocab = vocab
        self.dilations = [int(d) for d in dilations]
        self.residual_channels = R = residual_channels
        self.gate_channels = G = gate_channels
        self.skip_channels = S = skip_channels
        self.kernel_size = kernel_size
        self.input_kernel_size = input_kernel_size
        self.cond_channels = cond_channels
        self.cond_hop = cond_hop
        self.upsample = upsample
        L = len(self.dilations)
        H = G // 2

        # Causal input conv over one-hot tokens == a sum of per-tap embedding lookups;
        # tap j looks at token t-1-j.
        self.embed = nn.Embedding(vocab * input_kernel_size, R)
        nn.init.normal_(self.embed.weight, std=1.0)
        self.convs = nn.ModuleList([nn.Conv1d(R, G, kernel_size, dilation=d) for d in self.dilations])
        # No bias on the residual convs: the residual stream is zero-padded at the start of every
        # layer, and a bias-free stream keeps the padding identical in training and generation.
        self.res = nn.ModuleList([nn.Conv1d(H, R, 1, bias=False) for _ in range(L - 1)])
        self.skip = nn.ModuleList([nn.Conv1d(H, S, 1, bias=False) for _ in range(L)])
        self.skip_bias = nn.Parameter(torch.zeros(S))
        self.out1 = nn.Conv1d(S, S, 1)
        self.out2 = nn.Conv1d(S, vocab, 1)
        if cond_channels > 0:
            # All layers' conditioning projections V_f c, V_g c as one 1×1 conv: C → L·G.
            self.cond = nn.Conv1d(cond_channels, L * G, 1, bias=False)
            if upsample == "transposed":
                self.upsampler = nn.ConvTranspose1d(cond_channels, cond_channels, cond_hop, stride=cond_hop)
            else:
                self.upsampler = None
        else:
            self.cond = None
            self.upsampler = None
        # Recompute each residual layer in backward instead of storing its activations (set by
        # the trainer from ``train.activation_checkpointing``).
        self.activation_checkpointing = False
        # Train through the residual stack's hand-written backward (largewave/models/residual_stack.py):
        # the same function, fewer and larger matmuls; False runs the layer loop under autograd.
        self.fused_training = True
        # The weights of generation steps: "fp32" (exact) or "bf16" (reduced precision, fused step only).
        self.generation_precision = "fp32"
        scale = 1.0 / math.sqrt(2.0)
        for conv in self.res:
            conv.weight.data.mul_(scale)

    # ---- geometry ------------------------------------------------------------------------

    @property
    def receptive_field(self) -> int:
        """Tokens that the prediction of one token depends on: ``(k−1)·Σ dilations + input taps``."""
        return (self.kernel_size - 1) * sum(self.dilations) + self.input_kernel_size

    @property
    def layers(self) -> int:
        return len(self.dilations)

    # ---- full (teacher-forced) forward ---------------------------------------------------

    def _input(self, tokens: Tensor) -> Tensor:
        """Tensor[B x R x T]: the causal input conv of tokens shifted right by one (zeros before 0)."""
        B, T = tokens.shape
        k = self.input_kernel_size
        x = None
        for j in range(k):
            e = self.embed(tokens + j * self.vocab)  # [B x T x R]
            e = F.pad(e.transpose(1, 2), (1 + j, 0))[:, :, :T]
            x = e if x is None else x + e
        return x

    def conditioning(self, cond: Tensor, length: int) -> Tensor:
        """Per-layer gate biases from the conditioning.

        Args:
            cond: Tensor[B x C x Tc] at frame rate (Tc · hop ≥ length).
        Returns:
            Tensor[B x L·G x length]: ``V c`` for every layer at token rate.
        """
        if self.upsampler is not None:
            c = self.upsampler(cond)  # [B x C x Tc·hop]
            return self.cond(c[:, :, :length])
        # Project at frame rate, then repeat: hop× cheaper than projecting after the upsampling.
        return torch.repeat_interleave(self.cond(cond), self.cond_hop, dim=2)[:, :, :length]

    def _layer(self, i: int, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """Residual layer i: Tensor[B x R x T] (+ gate bias [B x G x T]) → (next x, skip [B x S x T])."""
        H = self.gate_channels // 2
        pad = (self.kernel_size - 1) * self.dilations[i]
        a = self.convs[i](F.pad(x, (pad, 0)))
        if c is not None:
            a = a + c
        z = torch.tanh(a[:, :H]) * torch.sigmoid(a[:, H:])
        if i < len(self.res):
            x = x + self.res[i](z)
        return x, self.skip[i](z)

    def forward(self, tokens: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """Logits of every token given the ones before it.

        Args:
            tokens: LongTensor[B x T], the token stream (the targets; shifting happens here).
            cond: Tensor[B x C x ceil(T/hop)] conditioning frames; frame i conditions tokens
                ``i·hop … (i+1)·hop − 1``.
        Returns:
            Tensor[B x V x T] logits; position t depends on tokens[< t] and the conditioning.
        """
        T = tokens.shape[1]
        x = self._input(tokens)
        G = self.gate_channels
        if self.cond is not None and cond is None:
            raise ValueError("this WaveNet is conditioned: pass cond")
        if self.fused_training and self.training and torch.is_grad_enabled() and not self.activation_checkpointing:
            frames = self._frame_conditioning(cond, T) if self.cond is not None else None
            if self.cond is None or frames is not None:
                skips = residual_stack(x, frames, self.dilations, self.kernel_size, self.convs, self.res, self.skip)
                return self._output(skips)
        cb = None
        if self.cond is not None:
            cb = self.conditioning(cond, T)
        # Per-layer gate biases as views from one split: the backward of a split is one cat, where
        # slicing each layer's block would allocate (and zero) a full-size gradient per layer.
        per_layer = [None] * self.layers if cb is None else cb.split(G, dim=1)
        skips = None
        ckpt = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i in range(self.layers):
            c = per_layer[i]
            if ckpt:
                x, s = checkpoint(self._layer, i, x, c, use_reentrant=False)
            else:
                x, s = self._layer(i, x, c)
            skips = s if skips is None else skips + s
        return self._output(skips)

    def _output(self, skips: Tensor) -> Tensor:
        """The output stack: Tensor[B x S x T] skip sum → Tensor[B x V x T] logits."""
        h = F.relu(skips + self.skip_bias[:, None])
        h = F.relu(self.out1(h))
        return self.out2(h)

    def _frame_conditioning(self, cond: Tensor, length: int) -> Optional[Tensor]:
        """Tensor[B x L·G x Tc] per-layer gate biases at a rate that divides ``length`` (frame rate
        for the repeat upsampler, token rate for the transposed one), or None where the
        conditioning does not tile ``length`` exactly (then the token-rate path is used)."""
        if self.upsampler is not None:
            c = self.upsampler(cond)
            return self.cond(c[:, :, :length]) if c.shape[2] >= length else None
        if length % self.cond_hop or cond.shape[2] * self.cond_hop < length:
            return None
        return self.cond(cond[:, :, :length // self.cond_hop])

    # ---- incremental generation ----------------------------------------------------------

    def incremental_state(self, batch: int, cond: Optional[Tensor] = None) -> "IncrementalState":
        """A fresh generation state for ``batch`` streams (see :class:`IncrementalState`)."""
        return IncrementalState(self, batch, cond)

    @torch.inference_mode()
    def generate(
        self,
        n_tokens: int,
        batch: int = 1,
        cond: Optional[Tensor] = None,
        temperature: float = 1.0,
        generator: Optional[torch.Generator] = None,
        prompt: Optional[Tensor] = None,
        top_p: float = 1.0,
        precision: Optional[str] = None,
        fused: Optional[bool] = None,
        progress: Optional[Callable[[int], None]] = None,
    ) -> Tensor:
        """Sample ``n_tokens`` tokens per stream.

        Args:
            cond: Tensor[B x C x ceil(n_tokens/hop)] for a conditioned WaveNet.
            temperature: softmax temperature; 0 takes the most likely token.
            top_p: nucleus cut-off: sample only among the most likely tokens whose probabilities
                (at ``temperature``) sum to ``top_p``, the most likely one always included;
                1 samples from the whole distribution.
            prompt: LongTensor[B x P] (P ≤ n_tokens) forced as the first P tokens.
            precision: ``"fp32"`` (exact: the step agrees with the full forward to float
                rounding) or ``"bf16"`` (the step's weights rounded to bfloat16, fp32
                accumulation; needs the fused step, else fp32 is used with a warning);
                None = :attr:`generation_precision` (fp32 unless set, e.g. by ``Stack.load``).
            fused: run the fused C step (:mod:`largewave.models.fast_step`); None = where it is
                available (CPU, fp32 parameters, input_kernel_size 1, a C compiler).
            progress: called with the number of positions just finished (every few hundred
                steps at most), e.g. a progress bar's ``update``.
        Returns:
            LongTensor[B x n_tokens] (the prompt included).
        """
        if cond is not None:
            batch = cond.shape[0]
        if prompt is not None:
            batch = prompt.shape[0]
        state = self.incremental_state(batch, cond)
        # time-major so that every step writes one contiguous row (views made once, not per step)
        out = torch.empty(n_tokens, batch, dtype=torch.long, device=state.device)
        rows = out.unbind(0)
        P = 0 if prompt is None else prompt.shape[1]
        if P > n_tokens:
            raise ValueError(f"prompt of {P} tokens is longer than n_tokens={n_tokens}")
        if P:
            out[:P] = prompt.t()
        # Gumbel-max: argmax(logits/T + g) is an exact sample of softmax(logits/T); the noise is
        # drawn in blocks so that a step costs two kernels instead of softmax + multinomial.
        block = 1024
        noise = torch.empty(block, batch, self.vocab, device=state.device)
        noise_rows = noise.unbind(0)
        y = torch.empty(batch, self.vocab, device=state.device)
        inv_t = 1.0 / temperature if temperature > 0 else 1.0
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")
        nucleus = top_p < 1.0 and temperature > 0
        precision = precision or self.generation_precision
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision={precision!r} must be 'fp32' or 'bf16'")
        runner = state.fused(precision) if fused is not False else None
        if runner is None and fused:
            raise RuntimeError(f"fused=True but the fused generation step is unavailable here: "
                               f"{fast_step.unavailable_reason() or 'this network or device is not supported'}")
        if runner is None and precision != "fp32":
            _warn(f"precision={precision!r} generation needs the fused step "
                       f"({fast_step.unavailable_reason() or 'unsupported network or device'}): using fp32")
        if runner is not None:
            _generate_fused(state, runner, out, P, noise, block, temperature, inv_t, top_p if nucleus else 1.0,
                            generator, progress)
            return out.t().contiguous()
        prev: Optional[Tensor] = None
        step = state._step  # already under inference_mode
        for t in range(n_tokens):
            if progress is not None and t and t % PROGRESS_EVERY == 0:
                progress(PROGRESS_EVERY)
            logits = step(prev)
            prev = rows[t]
            if t < P:
                continue
            if temperature > 0:
                j = (t - P) % block
                if j == 0:
                    noise.exponential_(generator=generator).log_().neg_()
                torch.add(noise_rows[j], logits, alpha=inv_t, out=y)
                if nucleus:
                    y.masked_fill_(_outside_nucleus(logits * inv_t, top_p), float("-inf"))
                torch.argmax(y, dim=1, out=prev)
            else:
                torch.argmax(logits, dim=1, out=prev)
        if progress is not None and n_tokens:
            progress(n_tokens - (n_tokens - 1) // PROGRESS_EVERY * PROGRESS_EVERY)
        return out.t().contiguous()


PROGRESS_EVERY = 256  # positions between two progress calls of the step-by-step loop


def _generate_fused(state: "IncrementalState", runner, out: Tensor, P: int, noise: Tensor, block: int,
                    temperature: float, inv_t: float, top_p: float, generator,
                    progress: Optional[Callable[[int], None]] = None) -> None:
    """``generate``'s loop on the fused step: the C kernel runs stretches of steps that share one
    conditioning frame and one block of noise; the same noise as the PyTorch loop (Gumbel-max in
    blocks of ``block`` steps counted from the end of the prompt), so both draw the same samples
    up to float rounding. Nucleus sampling takes the logits step by step."""
    n = out.shape[0]
    hop = state.hop if state.frame_bias is not None else n + 1
    rows = out.unbind(0)
    y = torch.empty_like(state.logits)
    t = done = 0
    while t < n:
        if state.frame_bias is not None and t % hop == 0:
            state._refresh_frame(t // hop)
        end = min(n, (t // hop + 1) * hop)
        if t < P:
            end = min(end, P)
            runner.run(t, end - t, out, P, None, 1.0)
        elif temperature <= 0:
            runner.run(t, end - t, out, P, None, 1.0)
        else:
            j = (t - P) % block
            if j == 0:
                noise.exponential_(generator=generator).log_().neg_()
            end = min(end, t + block - j)
            if top_p < 1.0:
                logits = runner.logits(t, rows[t - 1] if t else None)
                torch.add(noise[j], logits, alpha=inv_t, out=y)
                y.masked_fill_(_outside_nucleus(logits * inv_t, top_p), float("-inf"))
                torch.argmax(y, dim=1, out=rows[t])
                end = t + 1
            else:
                runner.run(t, end - t, out, P, noise[j:], inv_t)
        if progress is not None:
            done += end - t
            if done >= PROGRESS_EVERY or end == n:
                progress(done)
                done = 0
        t = end
    state.t = n


def _warn(msg: str) -> None:
    """A RuntimeWarning (Python's default filter shows it once per calling line)."""
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _outside_nucleus(logits: Tensor, top_p: float) -> Tensor:
    """BoolTensor[B x V]: the tokens outside the smallest set of most likely tokens whose
    probabilities sum to at least ``top_p`` (the most likely token is always inside)."""
    probs, order = torch.softmax(logits, dim=1).sort(dim=1, descending=True)
    outside_sorted = probs.cumsum(dim=1).sub_(probs) >= top_p  # mass before the token already enough
    return torch.empty_like(outside_sorted).scatter_(1, order, outside_sorted)


class IncrementalState:
    """Generation state of one :class:`WaveNet` for B streams: everything a step needs.

    It owns, for every layer l, a ring of the layer's last ``(k−1)·max(d)+1`` inputs
    ``hist[l, pos]`` (Tensor[L x N x B x R]), fused weight matrices, the current conditioning
    frame's projections, and preallocated work buffers. One :meth:`step` consumes the previous
    token and returns the logits of the next position; it runs in O(layers):

    1. one gather fetches the past taps of *all* layers (they are known before the step starts)
       and one batched matmul turns them, plus the frame's conditioning, into per-layer gate
       pre-activations;
    2. per layer: ``addmm`` with the current input, ``tanh``, one ``addcmul`` for the gate
       (σ(x) = (1 + tanh(x/2))/2, with the halves' scales folded into the weights), ``addmm``
       for the residual — four kernels into preallocated buffers;
    3. all skip connections at once as one matmul over the concatenated gate outputs.

    The conditioning projections are computed once per code frame (every hop steps). The
    weights are copied into fused matrices when the state is made: make a new state after the
    network's weights change. Memory: the ring holds L·N·B·R floats (N = (k−1)·max(d)+1).

    Shapes: ``step(token: LongTensor[B] | None) -> Tensor[B x V]``.
    """

    def __init__(self, net: WaveNet, batch: int, cond: Optional[Tensor] = None):
        p = net.embed.weight
        device, dtype = p.device, p.dtype
        self.device = device
        self.net = net
        self.batch = B = batch
        L, R, G, S = net.layers, net.residual_channels, net.gate_channels, net.skip_channels
        H = G // 2
        k = net.kernel_size
        self.L, self.R, self.G, self.H, self.k = L, R, G, H, k
        with torch.no_grad():
            # Gate half scaled by 1/2 (σ(x) = (1 + tanh(x/2))/2); z' = tanh_f·(1 + tanh_g) = 2z,
            # so the residual and skip weights take the other factor 1/2.
            gscale = torch.ones(G, device=device, dtype=dtype)
            gscale[H:] = 0.5
            W = torch.stack([c.weight for c in net.convs]) * gscale[None, :, None, None]  # [L x G x R x k]
            self.w_cur_all = W[..., k - 1].transpose(1, 2).contiguous()  # [L x R x G]
            self.w_cur = list(self.w_cur_all.unbind(0))
            # past taps j = 0..k-2 (tap j sees t − (k−1−j)·d), stacked along the input dim
            self.w_past = W[..., : k - 1].permute(0, 3, 2, 1).reshape(L, (k - 1) * R, G).contiguous()
            self.bias = (torch.stack([c.bias for c in net.convs]) * gscale).contiguous()  # [L x G]
            self.w_res_all = (0.5 * torch.stack([r.weight[:, :, 0].t() for r in net.res])).contiguous() \
                if len(net.res) else torch.zeros(0, H, R, device=device, dtype=dtype)  # [(L−1) x H x R]
            self.w_res = list(self.w_res_all.unbind(0))
            self.w_skip = torch.cat([0.5 * s.weight[:, :, 0].t() for s in net.skip], 0).contiguous()  # [L·H x S]
            self.b_skip = net.skip_bias.detach().clone()
            self.w_out1 = net.out1.weight[:, :, 0].t().contiguous()
            self.b_out1 = net.out1.bias.detach().clone()
            self.w_out2 = net.out2.weight[:, :, 0].t().contiguous()
            self.b_out2 = net.out2.bias.detach().clone()
            self.embed = net.embed.weight.detach()

        # Ring of past layer inputs; N > (k−1)·max(d) so a tap never reads an overwritten slot.
        self.N = N = (k - 1) * max(net.dilations) + 1
        self.hist = torch.zeros(L, N, B, R, device=device, dtype=dtype)
        # Gather table: for step t (mod N), the flat rows of hist that hold every layer's past taps,
        # ordered (layer, batch, tap) so the gathered block is [L x B x (k−1)·R] without a copy.
        t = torch.arange(N, device=device)[:, None, None, None]
        l = torch.arange(L, device=device)[None, :, None, None]
        b = torch.arange(B, device=device)[None, None, :, None]
        j = torch.arange(k - 1, device=device)[None, None, None, :]
        d = torch.tensor(net.dilations, device=device)[None, :, None, None]
        pos = (t - (k - 1 - j) * d) % N
        self.table = ((l * N + pos) * B + b).reshape(N, -1)
        self.table_rows = list(self.table.unbind(0))
        self.hist_flat = self.hist.view(L * N * B, R)
        self.hist_at = list(self.hist.unbind(1))  # hist_at[pos]: [L x B x R] view

        # Work buffers (reused every step).
        self.x = torch.zeros(L, B, R, device=device, dtype=dtype)  # each layer's current input
        self.x_at = list(self.x.unbind(0))
        self.past = torch.empty(L, B, (k - 1) * R, device=device, dtype=dtype)
        self.pre = torch.empty(L, B, G, device=device, dtype=dtype)
        self.pre_at = list(self.pre.unbind(0))
        self.tf_at = [a[:, :H] for a in self.pre_at]
        self.tg_at = [a[:, H:] for a in self.pre_at]
        self.z = torch.empty(B, L, H, device=device, dtype=dtype)
        self.z_at = list(self.z.unbind(1))
        self.z_flat = self.z.view(B, L * H)
        self.h1 = torch.empty(B, S, device=device, dtype=dtype)
        self.h2 = torch.empty(B, S, device=device, dtype=dtype)
        self.logits = torch.empty(B, net.vocab, device=device, dtype=dtype)
        self.tok_hist = torch.zeros(net.input_kernel_size, B, dtype=torch.long, device=device)
        self.tok_valid = torch.zeros(net.input_kernel_size, B, 1, device=device, dtype=dtype)
        self.tap_offset = (torch.arange(net.input_kernel_size, device=device) * net.vocab)[:, None]
        self.t = 0
        self._fused: dict[str, "fast_step.FusedStep"] = {}

        # Conditioning: per-frame gate biases for all layers, [P x L x B x G] (P = 1 for repeat,
        # hop for a transposed upsampler), refreshed once per frame.
        self.cond = cond
        self.hop = net.cond_hop
        if net.cond is not None:
            if cond is None:
                raise ValueError("this WaveNet is conditioned: pass cond")
            if cond.shape[0] != B:
                raise ValueError(f"cond has batch {cond.shape[0]}, expected {B}")
            P = net.cond_hop if net.upsampler is not None else 1
            self.frame_bias = torch.empty(P, L, B, G, device=device, dtype=dtype)
            self.frame_bias_at = list(self.frame_bias.unbind(0))
            with torch.no_grad():
                wc = net.cond.weight[:, :, 0].view(L, G, -1) * gscale[None, :, None]  # [L x G x C]
                self.w_cond = wc.permute(2, 0, 1).reshape(-1, L * G).contiguous()  # [C x L·G]
        else:
            self.frame_bias = None
            self.const_bias = self.bias[:, None, :].expand(L, B, G).contiguous()

    def fused(self, precision: str = "fp32") -> Optional["fast_step.FusedStep"]:
        """This state bound to the fused C step (see :mod:`largewave.models.fast_step`), or None
        where that cannot run it. One binding per precision, made on first use."""
        if not fast_step.supports(self):
            return None
        if precision not in self._fused:
            self._fused[precision] = fast_step.FusedStep(self, precision)
        return self._fused[precision]

    def _refresh_frame(self, frame: int) -> None:
        """Compute every layer's conditioning bias for code frame ``frame`` (once per frame)."""
        net, L, B, G = self.net, self.L, self.batch, self.G
        c = self.cond[:, :, frame]  # [B x C]
        if net.upsampler is not None:
            up = net.upsampler
            # ConvTranspose with kernel = stride = hop: position p of the frame is W[:, :, p]ᵀ c + b.
            c = torch.einsum("bc,cdp->pbd", c, up.weight) + up.bias  # [P x B x C]
        else:
            c = c[None]
        proj = torch.matmul(c, self.w_cond).view(-1, B, L, G).transpose(1, 2)  # [P x L x B x G]
        torch.add(proj, self.bias[None, :, None, :], out=self.frame_bias)

    def step(self, token: Optional[Tensor]) -> Tensor:
        """Consume the previous token and return the logits of the next one.

        Args:
            token: LongTensor[B], the token at position t−1 (None at t = 0: nothing before).
        Returns:
            Tensor[B x V] logits for position t (a buffer overwritten by the next step).
        """
        with torch.inference_mode():
            return self._step(token)

    def _step(self, token: Optional[Tensor]) -> Tensor:
        net, t, N = self.net, self.t, self.N
        ik = net.input_kernel_size
        # input: sum of per-tap embeddings of the last ik tokens
        if ik == 1:
            if token is None:
                self.x_at[0].zero_()
            else:
                torch.index_select(self.embed, 0, token, out=self.x_at[0])
        else:
            self.tok_hist = torch.roll(self.tok_hist, 1, 0)
            self.tok_valid = torch.roll(self.tok_valid, 1, 0)
            if token is not None:
                self.tok_hist[0] = token
                self.tok_valid[0] = 1.0
            e = self.embed[(self.tok_hist + self.tap_offset).view(-1)].view(ik, self.batch, self.R)
            torch.sum(e * self.tok_valid, 0, out=self.x_at[0])

        if self.frame_bias is not None:
            if t % self.hop == 0:
                self._refresh_frame(t // self.hop)
            bias = self.frame_bias_at[t % self.hop] if len(self.frame_bias_at) > 1 else self.frame_bias_at[0]
        else:
            bias = self.const_bias
        # past taps of all layers in one gather, their contribution in one batched matmul
        torch.index_select(self.hist_flat, 0, self.table_rows[t % N], out=self.past.view(-1, self.R))
        torch.baddbmm(bias, self.past, self.w_past, out=self.pre)

        x_at, pre_at, tf_at, tg_at, z_at = self.x_at, self.pre_at, self.tf_at, self.tg_at, self.z_at
        w_cur, w_res = self.w_cur, self.w_res
        last = self.L - 1
        for l in range(self.L):
            a = pre_at[l]
            a.addmm_(x_at[l], w_cur[l])
            a.tanh_()
            torch.addcmul(tf_at[l], tf_at[l], tg_at[l], out=z_at[l])
            if l < last:
                torch.addmm(x_at[l], z_at[l], w_res[l], out=x_at[l + 1])
        self.hist_at[t % N].copy_(self.x)
        torch.addmm(self.b_skip, self.z_flat, self.w_skip, out=self.h1).relu_()
        torch.addmm(self.b_out1, self.h1, self.w_out1, out=self.h2).relu_()
        torch.addmm(self.b_out2, self.h2, self.w_out2, out=self.logits)
        self.t = t + 1
        return self.logits
