"""WaveNet golden tests: causality by gradients, receptive field, incremental == full forward."""
import math
import os

import pytest
import torch

from largewave.config import WaveNetConfig
from largewave.models import fast_step
from largewave.models.wavenet import WaveNet

torch.set_num_threads(1)

V = 11


def make(kernel_size=2, input_kernel_size=1, cond_channels=0, hop=4, upsample="repeat",
         dilations=(1, 2, 4, 1, 3), seed=0):
    torch.manual_seed(seed)
    net = WaveNet(V, dilations, residual_channels=8, gate_channels=12, skip_channels=10,
                  kernel_size=kernel_size, input_kernel_size=input_kernel_size,
                  cond_channels=cond_channels, cond_hop=hop, upsample=upsample)
    # larger-than-init weights: no accidental zero gradients, a stricter equality check
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.4)
    return net.eval()


def input_gradients(net, tokens, t, cond=None):
    """|d logits[:, :, t] / d (input embedding at each position)| summed over channels: [T]."""
    captured = []

    def hook(_module, _inp, out):
        out.retain_grad()
        captured.append(out)

    h = net.embed.register_forward_hook(hook)
    try:
        logits = net(tokens, cond)
    finally:
        h.remove()
    logits[:, :, t].sum().backward()
    return sum(e.grad.abs().sum(dim=(0, 2)) for e in captured)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["eval", "train"])  # train: the residual stack's own backward
@pytest.mark.parametrize("kernel_size,input_kernel_size", [(2, 1), (3, 1), (2, 3)])
def test_causal_and_receptive_field_by_gradients(kernel_size, input_kernel_size, mode):
    net = make(kernel_size, input_kernel_size)
    net.train(mode == "train")
    T = net.receptive_field + 20
    tokens = torch.randint(0, V, (2, T))
    t = T - 5
    g = input_gradients(net, tokens, t)
    assert torch.all(g[t:] == 0), "output at t depends on tokens at or after t"
    seen = torch.nonzero(g).flatten()
    assert seen.max().item() == t - 1
    measured = t - seen.min().item()
    assert measured == net.receptive_field
    assert len(seen) == net.receptive_field  # every token inside the field matters


@pytest.mark.timeout(60)
def test_receptive_field_matches_config_formula():
    cfg = WaveNetConfig(kernel_size=3, stacks=2, layers_per_stack=4, max_dilation=4, input_kernel_size=2)
    net = WaveNet(V, cfg.dilation_schedule(), 8, 12, 10, kernel_size=3, input_kernel_size=2)
    assert net.receptive_field == cfg.receptive_field()


@pytest.mark.timeout(60)
def test_conditioning_is_frame_aligned():
    """Token t sees conditioning frames up to t // hop only (a frame's own future tokens are the
    autoencoder's business, a later frame's are not)."""
    hop = 4
    net = make(cond_channels=6, hop=hop)
    T = 32
    tokens = torch.randint(0, V, (1, T))
    cond = torch.randn(1, 6, T // hop, requires_grad=True)
    t = 13
    net(tokens, cond)[:, :, t].sum().backward()
    per_frame = cond.grad.abs().sum(dim=(0, 1))
    assert torch.all(per_frame[t // hop + 1:] == 0)
    assert per_frame[t // hop] > 0


CASES = [
    (2, 1, 0, "repeat"),
    (3, 1, 0, "repeat"),
    (2, 1, 6, "repeat"),
    (3, 1, 6, "repeat"),
    (2, 3, 6, "transposed"),
    (3, 2, 6, "transposed"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kernel_size,input_kernel_size,cond_channels,upsample", CASES)
def test_incremental_equals_full_forward(kernel_size, input_kernel_size, cond_channels, upsample):
    hop = 4
    net = make(kernel_size, input_kernel_size, cond_channels, hop, upsample)
    B, T = 3, 48
    tokens = torch.randint(0, V, (B, T))
    cond = torch.randn(B, cond_channels, T // hop) if cond_channels else None
    with torch.no_grad():
        full = net(tokens, cond)  # [B x V x T]
    state = net.incremental_state(B, cond)
    prev = None
    steps = []
    for t in range(T):
        steps.append(state.step(prev).clone())
        prev = tokens[:, t]
    inc = torch.stack(steps, dim=2)
    assert (inc - full).abs().max().item() < 1e-4


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cond_channels", [0, 6])
def test_greedy_generation_is_consistent_with_forward(cond_channels):
    """Greedy samples are the argmax of the full forward on themselves (prompt kept)."""
    hop = 4
    net = make(3, 2, cond_channels, hop)
    B, T, P = 2, 40, 7
    cond = torch.randn(B, cond_channels, T // hop) if cond_channels else None
    prompt = torch.randint(0, V, (B, P))
    out = net.generate(T, batch=B, cond=cond, temperature=0.0, prompt=prompt)
    assert out.shape == (B, T)
    assert torch.equal(out[:, :P], prompt)
    with torch.no_grad():
        pred = net(out, cond).argmax(1)
    assert torch.equal(pred[:, P:], out[:, P:])


@pytest.mark.timeout(60)
def test_sampling_is_reproducible_and_follows_the_distribution():
    net = make(dilations=(1, 2))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = net.generate(200, batch=4, temperature=1.0, generator=g1)
    b = net.generate(200, batch=4, temperature=1.0, generator=g2)
    assert torch.equal(a, b)
    # first token: no context, so its distribution is softmax of the t=0 logits
    g = torch.Generator().manual_seed(0)
    n = 4000
    first = net.generate(1, batch=n, temperature=1.0, generator=g)[:, 0]
    with torch.no_grad():
        p = torch.softmax(net(torch.zeros(1, 1, dtype=torch.long))[0, :, 0], 0)
    freq = torch.bincount(first, minlength=V).float() / n
    assert (freq - p).abs().max() < 0.04


@pytest.mark.timeout(60)
def test_nucleus_sampling_keeps_the_top_mass_and_renormalises():
    """top_p: the first token (no context) is drawn only from the smallest set of most likely
    tokens holding top_p of the probability, in proportion to their probabilities; top_p = 1 is
    plain sampling, draw for draw; a tiny top_p is greedy."""
    net = make(dilations=(1, 2))
    with torch.no_grad():
        p = torch.softmax(net(torch.zeros(1, 1, dtype=torch.long))[0, :, 0], 0)
    order = p.argsort(descending=True)
    top_p = float(p[order[:3]].sum()) - 1e-4  # the third token is needed to reach it, the fourth not
    n = 6000
    first = net.generate(1, batch=n, temperature=1.0, generator=torch.Generator().manual_seed(0), top_p=top_p)[:, 0]
    freq = torch.bincount(first, minlength=V).float() / n
    inside = torch.zeros(V, dtype=torch.bool)
    inside[order[:3]] = True
    assert freq[~inside].sum() == 0
    expected = torch.where(inside, p, torch.zeros_like(p)) / p[inside].sum()
    assert (freq - expected).abs().max() < 0.03

    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(net.generate(50, batch=3, generator=g1, top_p=1.0), net.generate(50, batch=3, generator=g2))
    greedy = net.generate(50, batch=3, temperature=0.0)
    assert torch.equal(net.generate(50, batch=3, generator=torch.Generator().manual_seed(1), top_p=1e-6), greedy)
    with pytest.raises(ValueError, match="top_p"):
        net.generate(5, top_p=0.0)


# ---- the equivalence rule at reference scale -------------------------------------------------------
# Every generation path (present and future) must satisfy, on the reference decoder with default
# initialisation: teacher-forced incremental logits within 1e-5 · max(1, max|logits|) of the full
# forward, and greedy decoding equal to the argmax of the full forward at every step.

REFERENCE_DILATIONS = [2 ** i for i in range(10)] * 3  # 30 layers, 1 … 512
REFERENCE_STEPS = 2048  # >= 2,000 steps: every layer's history ring (at most 513 entries) wraps


def reference_net(cond_channels: int) -> WaveNet:
    torch.manual_seed(0)
    return WaveNet(256, REFERENCE_DILATIONS, residual_channels=64, gate_channels=128, skip_channels=256,
                   cond_channels=cond_channels, cond_hop=8).eval()


def teacher_forced(net: WaveNet, tokens, cond, path: str, precision: str = "fp32"):
    """Tensor[B x V x T]: the logits of every step of incremental generation fed the true tokens,
    through the PyTorch step ("torch") or the fused C step ("fused")."""
    B, T = tokens.shape
    with torch.no_grad():
        state = net.incremental_state(B, cond)
        out = torch.empty(B, net.vocab, T)
        if path == "torch":
            prev = None
            for t in range(T):
                out[:, :, t] = state.step(prev)
                prev = tokens[:, t]
            return out
        runner = state.fused(precision)
        assert runner is not None, fast_step.unavailable_reason()
        rows = tokens.t().contiguous()
        for t in range(T):
            if cond is not None and t % net.cond_hop == 0:
                state._refresh_frame(t // net.cond_hop)
            out[:, :, t] = runner.logits(t, rows[t - 1] if t else None)
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("path", ["torch", "fused"])
@pytest.mark.parametrize("cond_channels", [0, 64], ids=["unconditioned", "conditioned-hop8-C64"])
def test_reference_scale_incremental_equals_full_forward(cond_channels, path, one_thread):
    net = reference_net(cond_channels)
    T, B = REFERENCE_STEPS, 1
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(B, cond_channels, T // 8, generator=g) if cond_channels else None
    tokens = torch.randint(0, 256, (B, T), generator=g)
    with torch.no_grad():
        full = net(tokens, cond)  # [B x V x T]
    inc = teacher_forced(net, tokens, cond, path)
    tol = 1e-5 * max(1.0, full.abs().max().item())
    err = (inc - full).abs().max().item()
    print(f"max |incremental - full| = {err:.3g} (tolerance {tol:.3g})")
    assert err <= tol, f"teacher-forced incremental logits differ by {err:.3g} > {tol:.3g}"

    # greedy decoding: every token is the argmax of the full forward over the decoded sequence
    out = net.generate(T, batch=B, cond=cond, temperature=0.0, fused=path == "fused")
    with torch.no_grad():
        pred = net(out, cond).argmax(1)
    mismatch = (pred != out).nonzero()
    assert mismatch.numel() == 0, f"greedy token differs from the full forward's argmax at {mismatch[:5].tolist()}"
    assert out.unique().numel() > 1  # a decoding that produced a constant would be a weak check


# ---- the fused C step ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kernel_size,cond_channels,upsample,B", [
    (2, 0, "repeat", 1), (2, 6, "repeat", 3), (3, 6, "transposed", 7), (2, 0, "repeat", 13)])
def test_fused_step_equals_full_forward_and_draws_the_same_samples(kernel_size, cond_channels, upsample, B):
    """Every block shape of the kernel's matrix products (batches of 1 … 13 streams, widths that
    are not multiples of 8), both conditioning upsamplers, kernel 3; sampling, greedy, nucleus
    and prompts draw exactly what the PyTorch loop draws from the same generator."""
    hop = 4
    net = make(kernel_size, 1, cond_channels, hop, upsample)
    T = 64
    tokens = torch.randint(0, V, (B, T))
    cond = torch.randn(B, cond_channels, T // hop) if cond_channels else None
    with torch.no_grad():
        full = net(tokens, cond)
    fused = teacher_forced(net, tokens, cond, "fused")
    assert (fused - full).abs().max().item() < 1e-4
    prompt = torch.randint(0, V, (B, 9))
    for kw in ({"temperature": 0.0}, {"temperature": 1.0}, {"temperature": 0.7, "top_p": 0.8}, {"prompt": prompt}):
        a = net.generate(T, batch=B, cond=cond, generator=torch.Generator().manual_seed(5), fused=True, **kw)
        b = net.generate(T, batch=B, cond=cond, generator=torch.Generator().manual_seed(5), fused=False, **kw)
        assert torch.equal(a, b), kw


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fused", [True, False])
def test_generation_reports_progress_for_every_position(fused):
    """The progress callback (what the sampling progress bars count) adds up to exactly the
    positions generated, prompt included, on both paths, in calls of at most a few hundred."""
    net = make(2, 1, 6, 4, "repeat")
    for T, kw in ((600, {}), (64, {"prompt": torch.randint(0, V, (2, 9))}), (257, {"temperature": 0.0})):
        calls = []
        net.generate(T, batch=2, cond=torch.randn(2, 6, -(-T // 4)), fused=fused, progress=calls.append, **kw)
        assert sum(calls) == T and max(calls) <= 2 * 256, (T, calls)


def _kl_and_nll(net, tokens, cond, precision):
    ref = teacher_forced(net, tokens, cond, "fused", "fp32")
    low = teacher_forced(net, tokens, cond, "fused", precision)
    lp, lq = ref.log_softmax(1), low.log_softmax(1)
    kl = (lp.exp() * (lp - lq)).sum(1)  # [B x T]: KL(fp32 || reduced) per step, nats
    nll = lambda lg: -lg.log_softmax(1).gather(1, tokens[:, None]).mean().item() / math.log(2)  # noqa: E731
    return kl.max().item(), abs(nll(ref) - nll(low))


@pytest.mark.timeout(240)
def test_reduced_precision_step_is_close_to_fp32(one_thread):
    """bf16 step weights: per-step KL ≤ 1e-3 nats against fp32, NLL within 0.01 bits (reference
    decoder, conditioned; tokens drawn from the fp32 model so that the NLL is a real one)."""
    net = reference_net(64)
    T = 600
    g = torch.Generator().manual_seed(2)
    cond = torch.randn(1, 64, T // 8, generator=g)
    tokens = net.generate(T, cond=cond, generator=g, fused=True)
    kl, dnll = _kl_and_nll(net, tokens, cond, "bf16")
    print(f"bf16 step: max per-step KL {kl:.2e} nats, |NLL difference| {dnll:.2e} bits")
    assert kl <= 1e-3 and dnll <= 0.01
    assert kl > 0  # the weights were really rounded
    bf = net.generate(T, cond=cond, generator=torch.Generator().manual_seed(0), precision="bf16")
    assert bf.shape == (1, T) and bf.unique().numel() > 1


def test_fused_step_is_cached_and_falls_back_without_a_compiler(tmp_path):
    """Built once per cache (a second process loads it without compiling); with no compiler on
    PATH generation still works, through PyTorch, and fused=True says why it cannot."""
    import subprocess
    import sys

    code = ("import torch, sys; from largewave.models import fast_step; "
            "from largewave.models.wavenet import WaveNet; torch.manual_seed(0); "
            "net = WaveNet(7, [1, 2], 8, 8, 8).eval(); "
            "out = net.generate(20, batch=2, generator=torch.Generator().manual_seed(0)); "
            "print('fused', fast_step.kernel() is not None, 'why', fast_step.unavailable_reason()); "
            "print('tokens', out.sum().item())")
    env = dict(os.environ, LARGEWAVE_CACHE=str(tmp_path / "cache"))
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "fused True" in first.stdout
    built = list((tmp_path / "cache" / "kernels").glob("wavenet_step-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    second = subprocess.run([sys.executable, "-c", code], env=dict(env, CC="/nonexistent-cc"), capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 0 and "fused True" in second.stdout, second.stderr
    assert built[0].stat().st_mtime_ns == stamp
    # the same draws through PyTorch where no compiler exists and nothing is cached
    bare = dict(env, LARGEWAVE_CACHE=str(tmp_path / "empty"), PATH=str(tmp_path / "no-bin"), CC="")
    third = subprocess.run([sys.executable, "-c", code], env=bare, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr
    assert "fused False" in third.stdout and "no C compiler" in third.stdout
    assert third.stdout.split("tokens")[1] == first.stdout.split("tokens")[1]
    with pytest.raises(RuntimeError, match="fused"):
        env_off = os.environ.get("LARGEWAVE_FUSED_STEP")
        os.environ["LARGEWAVE_FUSED_STEP"] = "0"
        try:
            WaveNet(7, [1, 2], 8, 8, 8).eval().generate(5, fused=True)
        finally:
            if env_off is None:
                del os.environ["LARGEWAVE_FUSED_STEP"]
            else:
                os.environ["LARGEWAVE_FUSED_STEP"] = env_off


# ---- training through the residual stack's hand-written backward --------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("threads", [1, 2])  # 1: the C gate kernel; 2: PyTorch's elementwise ops
@pytest.mark.parametrize("kernel_size,cond_channels,upsample,dilations", [
    (2, 0, "repeat", (1, 2, 4, 1, 3)), (2, 6, "repeat", (1, 2, 64, 4)), (3, 6, "transposed", (1, 3, 2)),
    (2, 6, "repeat", (1,))])
def test_fused_training_equals_autograd(kernel_size, cond_channels, upsample, dilations, threads):
    """Logits and every gradient (weights, conditioning) of the fused residual stack equal those of
    the layer loop under autograd, to float rounding; dilation 64 > T checks an all-zero tap."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        hop = 4
        net = make(kernel_size, 1, cond_channels, hop, upsample, dilations=dilations).train()
        tokens = torch.randint(0, V, (3, 48))
        cond = torch.randn(3, cond_channels, 12, requires_grad=True) if cond_channels else None
        weight = torch.randn(3, V, 48, generator=torch.Generator().manual_seed(1))
        got = {}
        for fused in (False, True):
            net.fused_training = fused
            net.zero_grad()
            if cond is not None:
                cond.grad = None
            out = net(tokens, cond)
            (out * weight).sum().backward()
            got[fused] = (out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()},
                          None if cond is None else cond.grad.clone())
    finally:
        torch.set_num_threads(before)
    (o0, g0, c0), (o1, g1, c1) = got[False], got[True]
    assert (o0 - o1).abs().max() <= 1e-5 * max(1.0, o0.abs().max().item())
    assert g0.keys() == g1.keys()
    for n in g0:
        tol = 1e-5 * max(1.0, g0[n].abs().max().item())
        assert (g0[n] - g1[n]).abs().max() <= tol, f"gradient of {n} differs"
    if cond is not None:
        assert (c0 - c1).abs().max() <= 1e-5 * max(1.0, c0.abs().max().item())


@pytest.mark.timeout(60)
def test_fused_training_under_bf16_autocast_matches_the_loop():
    """Under bf16 autocast (how bf16 training and the precision probe run) the fused stack runs in
    bf16 and gives fp32 master weights gradients close to the autograd loop's (bf16 rounding)."""
    torch.manual_seed(0)
    net = WaveNet(V, [1, 2, 4, 8], 16, 32, 32, cond_channels=8, cond_hop=4).train()
    tokens = torch.randint(0, V, (2, 64))
    cond = torch.randn(2, 8, 16)
    got = {}
    for fused in (False, True):
        net.fused_training = fused
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(net(tokens, cond).float(), tokens)
        loss.backward()
        got[fused] = (loss.item(), torch.cat([p.grad.flatten() for p in net.parameters()]))
        assert all(p.grad.dtype == torch.float32 for p in net.parameters())
    assert abs(got[False][0] - got[True][0]) < 1e-2
    assert torch.nn.functional.cosine_similarity(got[False][1], got[True][1], dim=0) > 0.99
