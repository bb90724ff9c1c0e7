"""largewave.audio: mu-law, resampling, PCM16/FLAC, decoding."""
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from largewave.audio import (AudioError, decode_flac, encode_flac, float_to_pcm16, load_audio,
                             mulaw_decode, mulaw_encode, pcm16_to_float)


def tone(freq, rate, seconds=1.0, amp=0.5):
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# ---- mu-law ---------------------------------------------------------------------------------


def test_mulaw_formula_and_fixed_points():
    mu = 255
    x = np.linspace(-1, 1, 10001)
    f = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)  # the WaveNet companding
    expected = np.floor((f + 1) / 2 * mu + 0.5).astype(np.int64)
    assert np.array_equal(mulaw_encode(x), expected)
    assert mulaw_encode(np.array([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]
    assert mulaw_encode(np.array([-3.0, 3.0])).tolist() == [0, 255]  # clipped, not wrapped
    assert mulaw_encode(x).min() == 0 and mulaw_encode(x).max() == 255  # 256 classes


def test_mulaw_round_trip():
    c = np.arange(256)
    assert np.array_equal(mulaw_encode(mulaw_decode(c)), c)  # every class survives decode→encode
    x = np.random.default_rng(0).uniform(-1, 1, 100_000)
    err = np.abs(mulaw_decode(mulaw_encode(x)) - x)
    # half a class at full scale: (1+mu)^(1/mu)… ≈ 0.0218; near silence the bins are ~100× finer
    assert err.max() < 0.022
    small = np.abs(x) < 0.01
    assert err[small].max() < 0.0003
    assert mulaw_decode(c).dtype == np.float32


def test_mulaw_numpy_and_torch_agree():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.uniform(-1, 1, 50_000), rng.normal(0, 0.01, 50_000)]).astype(np.float32)
    cn = mulaw_encode(x)
    ct = mulaw_encode(torch.from_numpy(x))
    assert ct.dtype == torch.long
    assert np.array_equal(cn, ct.numpy())
    assert np.array_equal(mulaw_decode(cn), mulaw_decode(ct).numpy())
    pcm = rng.integers(-32768, 32768, 10_000).astype(np.int16)  # integer PCM is scaled by 1/32768
    assert np.array_equal(mulaw_encode(pcm), mulaw_encode(torch.from_numpy(pcm)).numpy())
    assert np.array_equal(mulaw_encode(pcm), mulaw_encode(pcm16_to_float(pcm)))
    assert mulaw_encode(torch.zeros(2, 3)).shape == (2, 3)


# ---- resampling -----------------------------------------------------------------------------


def peak_hz(x, rate):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * rate / len(x)


@pytest.mark.parametrize("rate", [44100, 48000, 22050, 8000])
def test_resample_keeps_1khz_tone(tmp_path, rate):
    path = tmp_path / "tone.wav"
    sf.write(path, np.stack([tone(1000, rate)] * 2, axis=1), rate, subtype="PCM_16")  # stereo
    x, info = load_audio(path)
    assert (info.orig_rate, info.orig_channels, info.orig_frames) == (rate, 2, rate)
    assert abs(len(x) - 16000) <= 1
    assert abs(peak_hz(x, 16000) - 1000) <= 2
    assert abs(np.sqrt(np.mean(x[2000:-2000] ** 2)) - 0.5 / math.sqrt(2)) < 0.01  # level kept


def test_resample_suppresses_above_nyquist(tmp_path):
    path = tmp_path / "high.wav"
    sf.write(path, tone(10_000, 44100), 44100, subtype="FLOAT")  # above the new 8 kHz Nyquist
    x, _ = load_audio(path)
    rms_in = 0.5 / math.sqrt(2)
    rms_out = np.sqrt(np.mean(x[2000:-2000].astype(np.float64) ** 2))
    assert 20 * np.log10(rms_out / rms_in + 1e-12) < -40  # no alias at 6 kHz


def test_downmix_is_mean(tmp_path):
    path = tmp_path / "lr.wav"
    left, right = tone(1000, 16000, amp=0.5), np.zeros(16000, np.float32)
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    x, _ = load_audio(path)
    np.testing.assert_allclose(x, left / 2, atol=1e-7)  # 16 kHz in: no resampling at all


# ---- PCM16 and FLAC -------------------------------------------------------------------------


def test_flac_bytes_round_trip_is_bitwise():
    pcm = np.random.default_rng(2).integers(-32768, 32768, 40_000).astype(np.int16)
    pcm[:3] = [-32768, 32767, 0]
    data = encode_flac(pcm)
    back, rate = decode_flac(data)
    assert rate == 16000 and back.dtype == np.int16
    assert np.array_equal(back, pcm)
    assert encode_flac(pcm) == data  # deterministic bytes
    with pytest.raises(ValueError):
        encode_flac(pcm.astype(np.float32))


def test_float_to_pcm16_clips_instead_of_wrapping():
    assert float_to_pcm16(np.array([1.2, -1.5, 0.5, -1.0])).tolist() == [32767, -32768, 16384, -32768]


def test_load_audio_errors(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("not audio at all " * 10)
    with pytest.raises(AudioError, match="empty"):
        load_audio(tmp_path / "empty.wav")
    with pytest.raises(AudioError, match="not an audio file"):
        load_audio(tmp_path / "text.wav")
    with pytest.raises(AudioError, match="unreadable"):
        load_audio(tmp_path / "missing.wav")
