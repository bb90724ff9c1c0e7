"""Training precision: ``auto`` picks bf16 only where the CPU has bf16 matrix units and a cached
probe measured it faster; a resumed run keeps the precision stored in its checkpoints; bf16 and
fp32 training of the same short run end within 0.05 bits of valid bits/token.

Real DeepSpeed (gloo, CPU) through ``launch/train.py``, as in ``test_engine.py``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_engine import data, run_folder, train_to_end, write_config  # noqa: E402,F401  (data: a fixture)

from largewave import distributed  # noqa: E402
from largewave.engine import checkpoint as ckpt  # noqa: E402


def _seed_probe(cache: Path, fp32: float, bf16: float) -> None:
    """A cached probe result for this machine's key, as :func:`distributed.resolve_precision` writes it."""
    path = cache / "precision-probe.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({distributed._probe_key(): {"fp32": fp32, "bf16": bf16}}))


def test_auto_precision_follows_the_cpu_units_and_a_cached_probe(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("LARGEWAVE_CACHE", str(tmp_path))
    assert distributed.resolve_precision("bf16", cpu) == ("bf16", "as configured")
    monkeypatch.setenv("LARGEWAVE_CPU_FLAGS", "avx2 fma")
    prec, why = distributed.resolve_precision("auto", cpu)
    assert prec == "fp32" and "no bf16 matrix units" in why
    assert not (tmp_path / "precision-probe.json").exists()  # no units: nothing to probe

    monkeypatch.setenv("LARGEWAVE_CPU_FLAGS", "avx2 fma avx512_bf16 amx_bf16")
    _seed_probe(tmp_path, fp32=1.0, bf16=0.5)
    assert distributed.resolve_precision("auto", cpu)[0] == "bf16"
    _seed_probe(tmp_path, fp32=1.0, bf16=0.95)  # 5% faster is not enough to be worth it
    assert distributed.resolve_precision("auto", cpu)[0] == "fp32"

    # no cached result: the probe runs once (on this CPU, for real) and is cached for the next process
    (tmp_path / "precision-probe.json").unlink()
    calls = []
    real = distributed.bf16_probe
    monkeypatch.setattr(distributed, "bf16_probe", lambda: calls.append(1) or real(repeats=1))
    first = distributed.resolve_precision("auto", cpu)
    second = distributed.resolve_precision("auto", cpu)
    assert len(calls) == 1 and first == second
    probe = json.loads((tmp_path / "precision-probe.json").read_text())[distributed._probe_key()]
    assert probe["fp32"] > 0 and probe["bf16"] > 0
    assert first[0] == ("bf16" if probe["fp32"] / probe["bf16"] >= 1.1 else "fp32")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_resumed_run_keeps_the_precision_of_its_checkpoints(data, tmp_path, monkeypatch):  # noqa: F811
    """Trained to a pause where auto means fp32, resumed where auto would now mean bf16: the run
    goes on in fp32, says so, and its checkpoints record fp32."""
    monkeypatch.setenv("LARGEWAVE_CACHE", str(tmp_path / "cache"))
    cfg = write_config(tmp_path, accum=1, audio=data / "audio", precision="auto")
    monkeypatch.setenv("LARGEWAVE_CPU_FLAGS", "avx2 fma")
    first = train_to_end(cfg, 1, tmp_path / "logs1", ("level1.train.pause_at=4",))
    assert "precision         fp32 (auto: no bf16 matrix units" in first.output(0)
    run = run_folder(tmp_path)
    assert ckpt.stored_precision(run / "checkpoints") == "fp32"

    monkeypatch.setenv("LARGEWAVE_CPU_FLAGS", "avx2 fma avx512_bf16")
    _seed_probe(tmp_path / "cache", fp32=1.0, bf16=0.4)
    assert distributed.resolve_precision("auto", torch.device("cpu"))[0] == "bf16"  # a fresh run would switch
    second = train_to_end(cfg, 1, tmp_path / "logs2")
    out = second.output(0)
    assert "resumed at step 4" in out, out[-3000:]
    assert "precision         fp32 (auto, kept from the run's checkpoints (fp32))" in out, out[-3000:]
    last = ckpt.latest_complete(run / "checkpoints")
    assert torch.load(ckpt.common_state_path(last.path), weights_only=False)["precision"] == "fp32"


def _valid_bits(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["valid/bits_per_token"] for r in rows if "valid/bits_per_token" in r][-1]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_bf16_and_fp32_training_end_within_005_bits(data, tmp_path):  # noqa: F811
    """The same short training (60 steps of the tiny level 1) in bf16 (DeepSpeed bf16: bf16 weights
    and activations, fp32 master weights, fp32 loss) and in fp32."""
    bits = {}
    for prec in ("fp32", "bf16"):
        root = tmp_path / prec
        root.mkdir()
        cfg = write_config(root, accum=1, steps=60, audio=data / "audio")
        job = train_to_end(cfg, 1, root / "logs", (f"level1.train.precision={prec}", "level1.train.eval_every=60",
                                                    "level1.train.eval_batches=4", "level1.train.save_every=60"))
        assert f"precision         {prec} (as configured)" in job.output(0)
        bits[prec] = _valid_bits(run_folder(root))
    print(f"valid bits/token after 60 steps: fp32 {bits['fp32']:.4f}, bf16 {bits['bf16']:.4f}")
    assert bits["fp32"] < 7.5  # it learned something (8 bits = uniform over 256 tokens)
    assert abs(bits["bf16"] - bits["fp32"]) <= 0.05, bits
