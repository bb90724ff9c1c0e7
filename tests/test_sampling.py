"""Cascade sampling from a tiny 2-level stack + prior (untrained exports written as the engine
writes them): exact-length finite 16 kHz WAVs, seeds, temperatures, reconstructions through each
level, continuations of a prompt, loading from run folders, and the receptive fields printed."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stackutil import TINY, export_untrained, make_audio, tiny_stack  # noqa: E402

from largewave import stack  # noqa: E402
from largewave.audio import mulaw_decode, mulaw_encode  # noqa: E402
from largewave.config import load_config  # noqa: E402
from largewave.data.manifest import read_manifest  # noqa: E402
from largewave.sampling import (Stack, StackError, continue_stack, parse_temperatures,  # noqa: E402
                                reconstruct_stack, sample_stack)

SR = 16000


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    cfg = tiny_stack(root)
    make_audio(cfg)
    for i, level in enumerate(cfg.level_names()):
        export_untrained(cfg, level, seed=i)
    return cfg


@pytest.fixture(scope="module")
def loaded(tiny):
    return Stack.load(tiny, device="cpu")


def read_wav(path) -> tuple[np.ndarray, int]:
    info = sf.info(path)
    assert info.channels == 1 and info.subtype == "PCM_16" and info.format == "WAV"
    w, sr = sf.read(path, dtype="float32")
    return w, sr


@pytest.mark.timeout(120)
def test_cascade_sample_is_a_finite_16khz_wav_of_the_requested_length(tiny, tmp_path):
    lines: list[str] = []
    seconds = 0.2037  # not a whole number of top-level frames (8 samples)
    s = sample_stack(tiny, seconds, count=2, seed=3, out_dir=tmp_path / "out", log=lines.append)
    n = int(round(seconds * SR))
    assert len(s.paths) == 2 and s.count == 2 and s.seed == 3
    for p in s.paths:
        w, sr = read_wav(p)
        assert sr == SR and w.shape == (n,) and np.all(np.isfinite(w)) and np.abs(w).max() <= 1.0
        assert w.std() > 0  # not silent
    assert list(s.level_s) == ["prior", "level2", "level1"]
    assert all(v > 0 for v in s.rtf.values())
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["paths"] == s.paths
    text = "\n".join(lines)
    assert "real-time factor" in text and s.paths[0] in text


@pytest.mark.timeout(60)
def test_prior_receptive_field_in_seconds_is_printed_and_correct(tiny, loaded):
    lines: list[str] = []
    stack.print_receptive_fields(tiny, log=lines.append)
    d = tiny.level("prior").decoder
    rf = (d.kernel_size - 1) * sum(d.dilation_schedule()) + d.input_kernel_size  # (k−1)·Σ dilations + input taps
    assert rf == loaded.models["prior"].receptive_field == 2 * (1 + 2 + 4 + 8) + 2
    top_rate = SR / (tiny.level("level1").hop * tiny.level("level2").hop)  # 16000 / (4·2) = 2000 Hz
    seconds = rf / top_rate
    assert loaded.receptive_field_seconds() == pytest.approx(seconds)
    prior_line = [line for line in lines if "prior" in line]
    assert prior_line == [f"#   prior (prior): receptive field {rf} tokens at {top_rate:g} Hz = {seconds:.3f} s of audio"]
    # and in the sampling summary
    out: list[str] = []
    s = sample_stack(tiny, 0.01, stack=loaded, seed=0, out_dir=Path(loaded.exports["prior"]).parent / "s", log=out.append)
    assert s.prior_receptive_field_s == pytest.approx(seconds)
    assert any(f"= {seconds:.3f} s of audio" in line for line in out)
    # the paper-scale stack: 6144 codes at 250 Hz = 24.576 s
    rows = {r["level"]: r for r in stack.describe_receptive_fields(load_config("piano"))}
    assert rows["prior"]["tokens"] == 6144 and rows["prior"]["token_rate_hz"] == 250.0
    assert rows["prior"]["seconds"] == pytest.approx(24.576)


@pytest.mark.timeout(120)
def test_seed_and_temperature(loaded):
    a = loaded.sample(0.05, 2, seed=11)
    b = loaded.sample(0.05, 2, seed=11)
    c = loaded.sample(0.05, 2, seed=12)
    np.testing.assert_array_equal(a.waves, b.waves)
    assert not np.array_equal(a.waves, c.waves)
    assert a.waves.shape == (2, 800) and a.waves.dtype == np.float32
    assert set(a.tokens) == {"prior", "level2", "level1"}
    assert a.tokens["prior"].shape == (2, 100) and int(a.tokens["prior"].max()) < 8
    assert a.tokens["level2"].shape == (2, 200) and int(a.tokens["level2"].max()) < 16
    g0 = loaded.sample(0.02, 1, temperatures=0, seed=1)
    g1 = loaded.sample(0.02, 1, temperatures=0, seed=2)
    np.testing.assert_array_equal(g0.waves, g1.waves)  # greedy everywhere: the seed does not matter
    only_prior = loaded.sample(0.02, 1, temperatures={"prior": 0}, seed=1)
    assert only_prior.tokens["prior"].equal(g0.tokens["prior"])
    assert loaded.temperatures({"prior": 0.5, 1: 0.9}) == {"level1": 0.9, "level2": 1.0, "prior": 0.5}
    with pytest.raises(StackError, match="level7"):
        loaded.temperatures({"level7": 1.0})
    assert parse_temperatures(["0.8"]) == 0.8
    assert parse_temperatures(["prior=0.9", "level1=1,level2=0.5"]) == {"prior": 0.9, "level1": 1.0, "level2": 0.5}


@pytest.mark.timeout(120)
def test_encode_and_reconstruct_through_each_level(tiny, loaded, tmp_path):
    rng = np.random.default_rng(0)
    n = 1203  # not a multiple of the total hop (8)
    wave = (0.3 * np.sin(np.arange(n) / 7.0) + 0.01 * rng.standard_normal(n)).astype(np.float32)
    enc = loaded.encode(wave)
    assert [k for k in enc] == ["audio", "level1", "level2"]
    assert enc["audio"].shape == (n,) and enc["level1"].shape == (n // 4,) and enc["level2"].shape == (n // 4 // 2,)
    rec = loaded.reconstruct(wave, seed=0)
    assert set(rec.waves) == {"level1", "level2"} and set(rec.codes) == {"level1", "level2"}
    np.testing.assert_array_equal(rec.original, mulaw_decode(mulaw_encode(wave)))
    for w in rec.waves.values():
        assert w.shape == (n,) and np.all(np.isfinite(w))
    # from an audio-shard key (a valid segment), written one WAV per level
    key = read_manifest(tiny.path(tiny.data.shards)).keys("valid")[0]
    s = reconstruct_stack(tiny, key, seconds=0.1, stack=loaded, seed=0, out_dir=tmp_path / "rec", log=None)
    assert [Path(p).name for p in s.paths] == ["original.wav", "from-level1.wav", "from-level2.wav"]
    for p in s.paths:
        w, sr = read_wav(p)
        assert sr == SR and w.shape == (1600,) and np.all(np.isfinite(w))
    # from a file
    sf.write(tmp_path / "in.wav", wave, SR)
    s = reconstruct_stack(tiny, tmp_path / "in.wav", seconds=None, stack=loaded, seed=0, out_dir=tmp_path / "f",
                          log=None)
    assert all(read_wav(p)[0].shape == (n,) for p in s.paths)
    with pytest.raises(StackError, match="neither an audio file nor a key"):
        reconstruct_stack(tiny, "no-such-key", stack=loaded, log=None)


@pytest.mark.timeout(120)
def test_continuation_starts_with_the_prompt(tiny, loaded, tmp_path):
    n_prompt = 8 * 30 + 5  # the last 5 samples make no whole top-level frame and are dropped
    prompt = (0.4 * np.sin(np.arange(n_prompt) / 5.0)).astype(np.float32)
    g = loaded.sample(0.05, 2, seed=0, prompt=prompt)
    assert g.prompt_samples == 240 and g.waves.shape == (2, 800)
    expect = mulaw_decode(mulaw_encode(prompt[:240]))
    for w in g.waves:
        np.testing.assert_array_equal(w[:240], expect)
    enc = loaded.encode(prompt[:240])
    assert g.tokens["prior"][:, :30].eq(torch.as_tensor(enc["level2"])).all()  # the prior continued the prompt's codes
    assert g.tokens["level2"][:, :60].eq(torch.as_tensor(enc["level1"])).all()
    sf.write(tmp_path / "prompt.wav", prompt, SR)
    s = continue_stack(tiny, tmp_path / "prompt.wav", 0.06, 1, stack=loaded, seed=1, out_dir=tmp_path / "c", log=None)
    assert [Path(p).name for p in s.paths] == ["prompt.wav", "continuation-000.wav"]
    assert read_wav(s.paths[1])[0].shape == (960,)
    with pytest.raises(StackError, match="not shorter than"):
        loaded.sample(0.01, 1, prompt=prompt)


@pytest.mark.timeout(120)
def test_load_from_run_folders_and_clear_errors(tiny, loaded, tmp_path):
    folders = [stack.run_dir(tiny, n) for n in tiny.level_names()]
    from_runs = Stack.load(folders, device="cpu")
    assert from_runs.cfg.to_dict() == tiny.to_dict()
    np.testing.assert_array_equal(from_runs.sample(0.02, 1, seed=4).waves, loaded.sample(0.02, 1, seed=4).waves)
    from_root = Stack.load(Path(tiny.run.root) / tiny.stack, device="cpu")
    assert set(from_root.models) == {"level1", "level2", "prior"}
    # a stack whose prior is not trained yet can reconstruct but not sample
    partial = tiny_stack(tmp_path)
    export_untrained(partial, "level1")
    export_untrained(partial, "level2")
    s = Stack.load(partial)
    with pytest.raises(StackError, match=r"prior of stack tiny has no export .*largewave train --stack <config> stack=tiny … --level prior"):
        s.sample(0.01)
    assert set(s.reconstruct(np.zeros(64, np.float32)).waves) == {"level1", "level2"}


@pytest.mark.timeout(60)
def test_progress_bars_count_each_levels_audio_samples(tiny, loaded, tmp_path, monkeypatch):
    """On a terminal, sampling and reconstruction show one tqdm bar per level, counted in audio
    samples (so every level's bar ends at the clip's length), with the real-time rate beside it."""
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    n = int(0.05 * SR)  # 800 samples: whole frames of both levels, so the reconstruction is 800 long too
    loaded.progress = True
    sample_stack(tiny, 0.05, 2, stack=loaded, seed=0, out_dir=tmp_path / "s", log=None)
    loaded.reconstruct(np.zeros(n, np.float32))
    lines = [ln.strip() for ln in term.getvalue().replace("\r", "\n").splitlines() if "100%" in ln]
    assert [ln.split(":")[0] for ln in lines] == ["prior ×2", "level2 ×2", "level1 ×2", "level2", "level1 ×2"], lines
    assert all(f"{n}/{n}" in ln for ln in lines), lines
    assert all("real time 16k/s" in ln for ln in lines), lines
    term.seek(0), term.truncate()
    loaded.progress = False
    sample_stack(tiny, 0.05, 1, stack=loaded, seed=0, out_dir=tmp_path / "q", log=None)
    assert term.getvalue() == ""
    loaded.progress = True


@pytest.mark.timeout(60)
def test_samples_go_to_an_active_wandb_run(tiny, loaded, tmp_path, monkeypatch):
    logged = {}
    fake = types.SimpleNamespace(run=object(), log=logged.update,
                                 Audio=lambda w, sample_rate, caption: ("audio", len(w), sample_rate, caption))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    s = sample_stack(tiny, 0.01, 2, stack=loaded, seed=0, out_dir=tmp_path / "w", log=None)
    assert s.wandb and logged == {"samples/sample-000": ("audio", 160, SR, "sample-000"),
                                  "samples/sample-001": ("audio", 160, SR, "sample-001")}


@pytest.mark.timeout(120)
def test_command_line(tiny, tmp_path):
    overrides = ["stack=tiny", f"run.root={tiny.run.root}", f"data.shards={tiny.data.shards}",
                 f"data.codes={tiny.data.codes}", *TINY]
    r = subprocess.run([sys.executable, str(REPO / "launch" / "sample.py"), "--config", "demo", "--seconds", "0.05",
                        "--count", "1", "--seed", "0", "--temperature", "prior=0.9", "--out", str(tmp_path / "cli"),
                        *overrides], capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stderr
    assert "receptive field" in r.stdout and "real-time factor" in r.stdout
    w, sr = read_wav(tmp_path / "cli" / "sample-000.wav")
    assert sr == SR and w.shape == (800,)
    r = subprocess.run([sys.executable, str(REPO / "launch" / "sample.py"), "--config", "demo", "--seconds", "1",
                        f"run.root={tmp_path / 'empty'}"], capture_output=True, text=True, timeout=100)
    assert r.returncode == 2 and "has no export" in r.stderr and "largewave train" in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_trained_tiny_stack_end_to_end(tmp_path):
    """Every stage as a user runs it: train level 1 → its codes → train level 2 → its codes →
    train the prior → sample and reconstruct. A few steps each, real DeepSpeed on CPU."""
    steps = "train.steps=3 train.micro_batch=2 train.eval_every=3 train.sample_every=1000 train.save_every=3".split()
    overrides = ["stack=tiny", f"run.root={tmp_path / 'runs'}", f"data.shards={tmp_path / 'audio'}",
                 f"data.codes={tmp_path / 'codes'}", "run.wandb_mode=disabled", "data.workers=0", *TINY,
                 *[f"{level}.{s}" for level in ("level1", "level2", "prior") for s in steps]]
    cfg = load_config("demo", overrides)
    make_audio(cfg, pieces=3, seconds=3.0)

    def run(*args: str) -> str:
        r = subprocess.run([sys.executable, *args, *overrides], cwd=REPO, capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, f"{args}: {r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        return r.stdout

    run("launch/train.py", "--stack", "demo", "--level", "1")
    run("shards/build_codes.py", "--config", "demo", "--level", "1", "--quiet")
    assert stack.codes_status(cfg, "level1") == (True, "ready")
    run("launch/train.py", "--stack", "demo", "--level", "2")
    run("shards/build_codes.py", "--config", "demo", "--level", "2", "--quiet")
    assert stack.check_codes(cfg, "prior") == stack.expected_fingerprint(cfg, "level2")
    run("launch/train.py", "--stack", "demo", "--level", "prior")
    out = run("launch/sample.py", "--config", "demo", "--seconds", "0.25", "--count", "2", "--seed", "0",
              "--out", str(tmp_path / "samples"))
    rf = stack.describe_receptive_fields(cfg)[-1]
    assert f"receptive field {rf['tokens']} tokens at 2000 Hz = {rf['seconds']:.3f} s of audio" in out
    for i in range(2):
        w, sr = read_wav(tmp_path / "samples" / f"sample-{i:03d}.wav")
        assert sr == SR and w.shape == (4000,) and np.all(np.isfinite(w))
    key = read_manifest(cfg.path(cfg.data.shards)).keys("valid")[0]
    run("launch/sample.py", "--config", "demo", "--reconstruct", key, "--seconds", "0.1", "--out", str(tmp_path / "rec"))
    assert all(read_wav(tmp_path / "rec" / f"{n}.wav")[0].shape == (1600,)
               for n in ("original", "from-level1", "from-level2"))


@pytest.mark.timeout(120)
def test_level1_reconstructs_before_level2_exists(tmp_path):
    """A researcher checks level 1 before training level 2: with only level 1 exported, the API and
    the command line reconstruct from level 1; asking for level 2 names what to train."""
    partial = tiny_stack(tmp_path)
    make_audio(partial)
    export_untrained(partial, "level1")
    s = Stack.load(partial)
    assert s.trained_levels() == ["level1"]
    wave = 0.3 * np.sin(np.arange(203) / 5.0).astype(np.float32)  # not a whole level-2 frame
    rec = s.reconstruct(wave, seed=0)
    assert set(rec.waves) == {"level1"} and rec.waves["level1"].shape == (203,)
    assert set(rec.codes) == {"level1"}
    with pytest.raises(StackError, match=r"level2 of stack tiny has no export .*--level 2"):
        s.reconstruct(wave, levels=["level2"])
    overrides = ["stack=tiny", f"run.root={partial.run.root}", f"data.shards={partial.data.shards}",
                 f"data.codes={partial.data.codes}", *TINY]
    key = read_manifest(partial.data.shards).shards("valid")[0].keys[0]
    r = subprocess.run([sys.executable, str(REPO / "launch" / "sample.py"), "--config", "demo", "--reconstruct", key,
                        "--seconds", "0.05", "--seed", "0", "--out", str(tmp_path / "rec"), *overrides],
                       capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "rec").glob("*.wav")) == ["from-level1.wav", "original.wav"]
    w, sr = read_wav(tmp_path / "rec" / "from-level1.wav")
    assert sr == SR and w.shape == (800,)


@pytest.mark.timeout(120)
def test_reduced_precision_sampling_is_a_load_option(tiny, loaded):
    """Stack.load(precision="bf16") gives every decoder bf16 step weights: the samples stay close
    to fp32's (same seed); the prior (two input taps, not fused) keeps fp32 and says so."""
    bf = Stack.load(tiny, device="cpu", precision="bf16")
    nets = [m for model in bf.models.values() for m in model.modules() if hasattr(m, "generation_precision")]
    assert nets and all(m.generation_precision == "bf16" for m in nets)
    with pytest.warns(RuntimeWarning, match="needs the fused step"):
        low = bf.sample(0.05, 2, seed=11)
    ref = loaded.sample(0.05, 2, seed=11)
    assert low.tokens["prior"].equal(ref.tokens["prior"])
    same = (low.tokens["level2"] == ref.tokens["level2"]).float().mean().item()
    assert same >= 0.9, same
    with pytest.raises(StackError, match="precision"):
        Stack.load(tiny, device="cpu", precision="fp16")
