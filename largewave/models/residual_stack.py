"""WaveNet's residual stack for training, with a hand-written backward.

The same function as :meth:`WaveNet.forward`'s layer loop (dilated convs, gates, residuals, the
sum of the skips), computed with fewer and larger matrix products and no per-layer temporaries
that autograd would keep:

- a dilated conv of k taps is one matmul over the k time-shifted copies of its input stacked on
  the channel axis (``[G x kR] @ [kR x T]``); the stacked input is also what its weight
  gradient needs, so it is saved instead of the padded input;
- the gates write straight into one buffer holding every layer's gate output, and the skip sum
  is one matmul over it (``[S x L·H] @ [L·H x T]``) instead of L small ones and L additions of
  S-channel tensors; its backward is one matmul too;
- conditioning is added at frame rate through a broadcast view (no token-rate copy);
- tanh and sigmoid overwrite the gate pre-activations, and the backward overwrites them with
  the gradient, so a layer keeps one G-channel tensor; on one CPU thread each way is one pass of
  the C kernel of :mod:`largewave.models.fast_step` (else PyTorch's elementwise ops).

Numerically it is the same computation in another summation order (the tests hold it to the
autograd path within float rounding, gradients included).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from largewave.models import fast_step


def _stack_taps(x: Tensor, dilation: int, k: int) -> Tensor:
    """Tensor[B x kR x T]: block j holds x shifted right by (k−1−j)·dilation (zeros before 0)."""
    B, R, T = x.shape
    out = x.new_empty(B, k * R, T)
    for j in range(k):
        shift = (k - 1 - j) * dilation
        blk = out[:, j * R:(j + 1) * R]
        if shift == 0:
            blk.copy_(x)
        elif shift >= T:
            blk.zero_()
        else:
            blk[:, :, :shift].zero_()
            blk[:, :, shift:].copy_(x[:, :, :T - shift])
    return out


def _add_at_frame_rate(a: Tensor, c: Tensor) -> None:
    """a[B x G x T] += c[B x G x Tc] repeated T/Tc times along time (in place)."""
    B, G, T = a.shape
    hop = T // c.shape[2]
    a.view(B, G, c.shape[2], hop).add_(c.unsqueeze(3))


class _ResidualStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x0: Tensor, cond: Optional[Tensor], dilations: Sequence[int], k: int, *weights: Tensor):
        L = len(dilations)
        conv_w, conv_b = weights[:L], weights[L:2 * L]
        res_w, skip_w = weights[2 * L:3 * L - 1], weights[3 * L - 1:]
        B, R, T = x0.shape
        G = conv_w[0].shape[0]
        H = G // 2
        Z = x0.new_empty(B, L * H, T)
        taps, gates = [], []
        x = x0
        for l, d in enumerate(dilations):
            xk = _stack_taps(x, d, k)
            wk = conv_w[l].permute(0, 2, 1).reshape(G, k * R)  # column j·R + r = weight[:, r, j]
            a = torch.matmul(wk, xk)  # [B x G x T]
            if cond is not None:
                _add_at_frame_rate(a, cond[:, l * G:(l + 1) * G] + conv_b[l][None, :, None])
            else:
                a.add_(conv_b[l][None, :, None])
            z = Z[:, l * H:(l + 1) * H]
            if fast_step.gates_supported(a):
                fast_step.gate_forward(a, z)
            else:
                torch.mul(a[:, :H].tanh_(), a[:, H:].sigmoid_(), out=z)
            if l < L - 1:
                x = torch.baddbmm(x, res_w[l][:, :, 0].expand(B, R, H), z)
            taps.append(xk)
            gates.append(a)
        ws = torch.cat([w[:, :, 0] for w in skip_w], 1)  # [S x L·H]
        skips = torch.matmul(ws, Z)
        ctx.dilations, ctx.k, ctx.has_cond = list(dilations), k, cond is not None
        ctx.cond_len = cond.shape[2] if cond is not None else 0
        ctx.save_for_backward(Z, ws, *taps, *gates, *weights)
        return skips

    @staticmethod
    def backward(ctx, d_skips: Tensor):
        dil, k = ctx.dilations, ctx.k
        L = len(dil)
        saved = ctx.saved_tensors
        Z, ws = saved[0], saved[1]
        taps, gates = saved[2:2 + L], saved[2 + L:2 + 2 * L]
        weights = saved[2 + 2 * L:]
        conv_w, res_w, skip_w = weights[:L], weights[2 * L:3 * L - 1], weights[3 * L - 1:]
        B, LH, T = Z.shape
        H = LH // L
        G = 2 * H
        R = conv_w[0].shape[1]
        d_skips = d_skips.contiguous()
        dws = torch.matmul(d_skips, Z.transpose(1, 2)).sum(0)  # [S x L·H]
        dZ = torch.matmul(ws.t(), d_skips)  # [B x L·H x T]
        d_conv_w, d_conv_b, d_res_w = [None] * L, [None] * L, [None] * (L - 1)
        d_cond = [None] * L
        dx: Optional[Tensor] = None  # gradient of the current layer's output stream
        for l in reversed(range(L)):
            dz = dZ[:, l * H:(l + 1) * H]
            if l < L - 1:
                z = Z[:, l * H:(l + 1) * H]
                d_res_w[l] = torch.matmul(dx, z.transpose(1, 2)).sum(0)[:, :, None]
                dz = torch.baddbmm(dz, res_w[l][:, :, 0].t().expand(B, H, R), dx)
            a = gates[l]
            # d tanh = 1 − t², d sigmoid = s (1 − s): overwrite t and s with the pre-activation gradient
            if fast_step.gates_supported(a):
                fast_step.gate_backward(a, dz)
            else:
                t, s = a[:, :H], a[:, H:]
                dt = dz * s
                ds = dz * t
                t.mul_(t).neg_().add_(1.0).mul_(dt)
                s.sub_(s * s).mul_(ds)
            da = a
            d_conv_b[l] = da.sum((0, 2))
            if ctx.has_cond:
                d_cond[l] = da.view(B, G, ctx.cond_len, T // ctx.cond_len).sum(3)
            xk = taps[l]
            dwk = torch.matmul(da, xk.transpose(1, 2)).sum(0)  # [G x kR]
            d_conv_w[l] = dwk.view(G, k, R).permute(0, 2, 1).contiguous()
            wk = conv_w[l].permute(0, 2, 1).reshape(G, k * R)
            dxk = torch.matmul(wk.t(), da)  # [B x kR x T]
            new = dxk[:, (k - 1) * R:].clone() if dx is None else dx.add_(dxk[:, (k - 1) * R:])
            for j in range(k - 1):
                shift = (k - 1 - j) * dil[l]
                if shift < T:
                    new[:, :, :T - shift].add_(dxk[:, j * R:(j + 1) * R, shift:])
            dx = new
        d_skip_w = [dws[:, l * H:(l + 1) * H, None].contiguous() for l in range(L)]
        cond_grad = torch.cat(d_cond, 1) if ctx.has_cond else None
        return (dx, cond_grad, None, None, *d_conv_w, *d_conv_b, *d_res_w, *d_skip_w)


def residual_stack(x0: Tensor, cond: Optional[Tensor], dilations: Sequence[int], kernel_size: int,
                   convs, res, skip) -> Tensor:
    """Tensor[B x S x T]: the sum of every layer's skip output (no skip bias).

    Args:
        x0: Tensor[B x R x T], the input stream (embedded, shifted tokens).
        cond: Tensor[B x L·G x Tc] per-layer gate biases at frame rate (Tc divides T), or None.
        convs, res, skip: the WaveNet's ``nn.Conv1d`` lists (dilated convs with bias; bias-free
            residual and skip 1×1 convs).
    """
    weights = [c.weight for c in convs] + [c.bias for c in convs] + [r.weight for r in res] + [s.weight for s in skip]
    dev = x0.device.type
    if torch.is_autocast_enabled(dev):
        # Under autocast every matmul would run in its dtype: cast everything once (differentiably,
        # so fp32 master weights get their gradients as autocast gives them) and run in that dtype.
        dt = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return _ResidualStack.apply(x0.to(dt), None if cond is None else cond.to(dt), list(dilations),
                                        kernel_size, *[w.to(dt) for w in weights])
    return _ResidualStack.apply(x0, cond, list(dilations), kernel_size, *weights)
