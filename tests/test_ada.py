"""ADA level and prior: loss bookkeeping, encode/decode shapes, chunked encoding, and an ADA
that learns to use its codes on a signal whose structure is beyond its decoder's reach."""
import math
import time

import pytest
import torch

from largewave.models.ada import ADALevel, Prior
from largewave.models.encoder import Encoder
from largewave.models.quantizers import ArgmaxQuantiser, ContinuousQuantiser, VectorQuantiser
from largewave.models.wavenet import WaveNet

torch.set_num_threads(1)


def tiny_ada(kind="amae", V=16, K=8, D=8, hop=8, dilations=(1,), enc_dilations=(1, 2), seed=0):
    torch.manual_seed(seed)
    quant = {"amae": lambda: ArgmaxQuantiser(K, D, diversity_weight=0.01),
             "vqvae": lambda: VectorQuantiser(K, D),
             "continuous": lambda: ContinuousQuantiser(D)}[kind]()
    enc = Encoder(V, quant.input_dim, hop, channels=32, dilations=enc_dilations,
                  waveform_input=False, input_embedding=16)
    dec = WaveNet(V, dilations, residual_channels=16, gate_channels=32, skip_channels=32,
                  cond_channels=D, cond_hop=hop)
    return ADALevel(enc, quant, dec)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["amae", "vqvae", "continuous"])
def test_loss_is_weighted_sum_and_gradients_reach_encoder(kind):
    m = tiny_ada(kind).train()
    tokens = torch.randint(0, 16, (2, 64))
    out = m.loss(tokens)
    assert set(out.terms) == set(out.weights) and "nll" in out.terms
    expected = sum(out.weights[k] * out.terms[k] for k in out.terms)
    assert torch.allclose(out.loss, expected)
    assert "bits_per_token" in out.metrics
    if kind != "continuous":
        assert {"codes_used", "codes_used_window", "perplexity", "dead_codes"} <= set(out.metrics)
    m.zero_grad()
    out.terms["nll"].backward()  # the decoder's loss alone must reach the encoder (straight-through)
    assert sum(p.grad.abs().sum() for p in m.encoder.parameters() if p.grad is not None) > 0


@pytest.mark.timeout(60)
def test_encode_decode_shapes_and_prompt():
    m = tiny_ada().eval()
    tokens = torch.randint(0, 16, (3, 48))
    codes = m.encode(tokens)
    assert codes.shape == (3, 6) and codes.dtype == torch.long
    g = torch.Generator().manual_seed(0)
    out = m.decode(codes, temperature=1.0, prompt=tokens[:, :5], generator=g)
    assert out.shape == (3, 48)
    assert torch.equal(out[:, :5], tokens[:, :5])
    assert int(out.min()) >= 0 and int(out.max()) < 16


@pytest.mark.timeout(60)
def test_chunked_encoding_reproduces_whole():
    torch.manual_seed(0)
    hop = 4
    enc = Encoder(256, 6, hop, channels=8, dilations=(1, 2, 4), kernel_size=3).eval()
    x = torch.randint(0, 256, (1, 400))
    with torch.no_grad():
        whole = enc(x)
        ctx = -(-enc.context // hop) * hop  # context rounded up to whole frames
        chunk = 80
        parts = []
        for s in range(0, 400, chunk):
            lo, hi = max(0, s - ctx), min(400, s + chunk + ctx)
            y = enc(x[:, lo:hi])
            parts.append(y[:, :, (s - lo) // hop:(s - lo + chunk) // hop])
        assert torch.allclose(torch.cat(parts, 2), whole, atol=1e-5)


@pytest.mark.timeout(60)
def test_prior_interface():
    torch.manual_seed(0)
    p = Prior(WaveNet(12, [1, 2, 4], 8, 12, 10))
    tokens = torch.randint(0, 12, (2, 30))
    out = p.loss(tokens)
    assert set(out.terms) == {"nll"} and torch.allclose(out.loss, p.nll(tokens))
    assert torch.equal(p.nll(tokens, shuffle_codes=True), p.nll(tokens))
    g = torch.Generator().manual_seed(0)
    s = p.generate(20, batch=3, temperature=0.8, generator=g)
    assert s.shape == (3, 20)


def synthetic(batch, T, V=16, states=4, mean_len=48, generator=None):
    """Tokens whose distribution depends on a hidden state that changes at random moments: in
    state s, 3/4 of the tokens are drawn from s's own 4 tokens and the rest uniformly."""
    out = torch.empty(batch, T, dtype=torch.long)
    for b in range(batch):
        t = 0
        while t < T:
            n = int(torch.randint(mean_len // 3, 2 * mean_len, (1,), generator=generator))
            s = int(torch.randint(0, states, (1,), generator=generator))
            own = s * (V // states) + torch.randint(0, V // states, (n,), generator=generator)
            anyt = torch.randint(0, V, (n,), generator=generator)
            pick = torch.rand(n, generator=generator) < 0.75
            out[b, t:t + n] = torch.where(pick, own, anyt)[: T - t]
            t += n
    return out


@pytest.mark.timeout(180)
def test_ada_uses_its_codes():
    """Decoder receptive field: 2 tokens; state segments: ~16–96 tokens. After a few hundred
    CPU steps, NLL with the true codes is ≥ 0.5 bit/token lower than with shuffled codes."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    m = tiny_ada("amae", V=16, K=8, D=8, hop=8, dilations=(1,), enc_dilations=(1, 2)).train()
    assert m.decoder.receptive_field == 2
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    start = time.time()
    for step in range(300):
        out = m.loss(synthetic(16, 256, generator=g))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    m.eval()
    test = synthetic(32, 256, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        true = m.nll(test).item() / math.log(2)
        shuffled = m.nll(test, shuffle_codes=True, generator=torch.Generator().manual_seed(1)).item() / math.log(2)
    print(f"bits/token: true codes {true:.3f}, shuffled {shuffled:.3f}; {time.time() - start:.1f} s")
    assert shuffled - true >= 0.5


@pytest.mark.timeout(60)
def test_nll_and_encode_leave_quantiser_state_alone():
    m = tiny_ada("vqvae").train()
    tokens = torch.randint(0, 16, (2, 64))
    m.loss(tokens)  # data-dependent init + one EMA update
    before = {k: v.clone() for k, v in m.quantiser.state_dict().items()}
    m.nll(tokens)
    m.nll(tokens, shuffle_codes=True)
    m.encode(tokens)
    assert m.training and m.quantiser.training
    for k, v in m.quantiser.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.timeout(60)
def test_activation_checkpointing_gives_same_gradients():
    tokens = torch.randint(0, 16, (2, 64))
    grads = []
    for ckpt in (False, True):
        m = tiny_ada("amae", dilations=(1, 2), seed=0).train()
        for mod in m.modules():
            if hasattr(mod, "activation_checkpointing"):
                mod.activation_checkpointing = ckpt
        m.loss(tokens).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
