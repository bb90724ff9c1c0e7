"""Quantisers: straight-through gradients, exact one-hots, diversity loss, buffers, restarts
across two gloo ranks."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from largewave.models.encoder import Encoder
from largewave.models.quantizers import ArgmaxQuantiser, ContinuousQuantiser, VectorQuantiser

torch.set_num_threads(1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["amae", "vqvae", "vqvae-loss", "continuous"])
def test_straight_through_gradient_reaches_encoder(kind):
    torch.manual_seed(0)
    K, D, hop = 8, 4, 4
    quant = {"amae": lambda: ArgmaxQuantiser(K, D),
             "vqvae": lambda: VectorQuantiser(K, D),
             "vqvae-loss": lambda: VectorQuantiser(K, D, ema=False),
             "continuous": lambda: ContinuousQuantiser(D)}[kind]().train()
    enc = Encoder(256, quant.input_dim, hop, channels=8, dilations=(1, 2))
    tokens = torch.randint(0, 256, (2, 32))
    out = quant(enc(tokens))
    # a decoder-like downstream loss on the quantised output only
    (out.output * torch.randn_like(out.output)).sum().backward()
    grads = [p.grad for p in enc.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("normalise", ["sum", "softmax"])
def test_amae_exact_one_hots_and_diversity_by_hand(normalise):
    torch.manual_seed(0)
    K, D = 6, 3
    q = ArgmaxQuantiser(K, D, normalise=normalise)
    z = torch.randn(2, K, 5)
    out = q(z)
    st, codes, _ = q.one_hot(z)
    assert torch.equal(codes, out.codes)
    assert torch.equal(st, torch.nn.functional.one_hot(codes, K).permute(0, 2, 1).float())
    # the forward value is exactly the embedding of a one-hot
    assert torch.equal(out.output, q.embedding[out.codes].permute(0, 2, 1))
    # hand computation (plain Python over the numbers)
    zz = z.tolist()
    probs = []
    for b in range(2):
        for t in range(5):
            col = [zz[b][k][t] for k in range(K)]
            if normalise == "sum":
                h = [max(v, 0.0) for v in col]
                s = sum(h) + q.eps
                p = [v / s for v in h]
            else:
                m = max(col)
                e = [pow(2.718281828459045, v - m) for v in col]
                p = [v / sum(e) for v in e]
            probs.append(p)
            assert out.codes[b, t].item() == max(range(K), key=lambda k: p[k])
    qbar = [sum(p[k] for p in probs) / len(probs) for k in range(K)]
    expected = sum((K * qk - 1.0) ** 2 for qk in qbar)
    assert abs(out.losses["diversity"].item() - expected) < 1e-4 * max(1.0, expected)


@pytest.mark.timeout(60)
def test_amae_diversity_is_zero_when_uniform():
    K = 4
    q = ArgmaxQuantiser(K, 2)
    z = torch.eye(K)[None].repeat(3, 1, 1)  # every code exactly once per item
    assert q(z).losses["diversity"].item() < 1e-6


@pytest.mark.timeout(60)
def test_vq_buffers_round_trip_through_state_dict():
    torch.manual_seed(0)
    a = VectorQuantiser(16, 4, usage_window=5, recent=64).train()
    for _ in range(3):
        a(torch.randn(2, 4, 20))
    sd = a.state_dict()
    for name in ("codebook", "ema_count", "ema_sum", "initialised", "recent", "usage", "usage_step"):
        assert name in sd
    b = VectorQuantiser(16, 4, usage_window=5, recent=64)
    b.load_state_dict(sd)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    a.eval(), b.eval()
    z = torch.randn(2, 4, 9)
    assert torch.equal(a(z).codes, b(z).codes)
    assert list(a.parameters()) == []  # EMA codebook: nothing for the optimizer


@pytest.mark.timeout(60)
def test_vq_fp32_under_bf16_autocast():
    q = VectorQuantiser(8, 4).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(torch.randn(2, 4, 6).bfloat16())
    assert q.codebook.dtype == torch.float32 and q.ema_sum.dtype == torch.float32
    assert out.output.dtype == torch.float32
    q.bfloat16()  # a module-wide cast (DeepSpeed bf16) keeps the EMA state in fp32
    assert q.codebook.dtype == torch.float32 and q.ema_count.dtype == torch.float32
    assert q(torch.randn(2, 4, 6).bfloat16()).output.dtype == torch.float32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collapse_worker(rank: int, world: int, port: int, path: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        K, D = 16, 4
        torch.manual_seed(0)
        q = VectorQuantiser(K, D, decay=0.9, usage_window=4, recent=256).train()
        # forced collapse: every input maps to code 0 or 1, the other codes are far away
        with torch.no_grad():
            q.codebook[:2] = torch.randn(2, D) * 0.1
            q.codebook[2:] = 1e3
            q.ema_sum.copy_(q.codebook)
            q.initialised.fill_(True)
        torch.manual_seed(100 + rank)  # different data (and RNG) on each rank
        centres = torch.randn(K, D) * 3 + rank
        used0 = q(centres[torch.randint(0, K, (64,))].T[None]).metrics["codes_used"].item()
        for _ in range(30):
            x = centres[torch.randint(0, K, (64,))] + 0.05 * torch.randn(64, D)
            out = q(x.T[None])
        state = torch.cat([q.codebook.flatten(), q.ema_sum.flatten(), q.ema_count])
        gathered = [torch.zeros_like(state) for _ in range(world)]
        dist.all_gather(gathered, state)
        if rank == 0:
            torch.save({"used0": used0, "used": out.metrics["codes_used_window"].item(),
                        "same": all(torch.equal(gathered[0], g) for g in gathered)}, path)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_vq_restarts_after_collapse_on_two_gloo_ranks(tmp_path):
    path = str(tmp_path / "result.pt")
    mp.spawn(_collapse_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    r = torch.load(path)
    assert r["used0"] <= 2
    assert r["used"] >= 12, r
    assert r["same"], "ranks disagree on the codebook"
