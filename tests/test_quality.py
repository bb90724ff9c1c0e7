"""The quality figures on synthetic piano-like clips: exact values where the definition fixes
them, and the orderings the figures exist to show."""
import numpy as np
import pytest

from largewave import quality as q

R = q.RATE


def piano(notes, seconds=3.0, seed=0, harmonics=(1.0, 0.5, 0.3, 0.2, 0.12, 0.08, 0.05), room_db=-45.0):
    """Decaying harmonic tones, one onset every 0.5 s, over quiet low-passed room noise."""
    rng = np.random.default_rng(seed)
    n = int(seconds * R)
    t = np.arange(n) / R
    x = np.zeros(n)
    for i, m in enumerate(notes):
        f0 = 440 * 2 ** ((m - 69) / 12)
        start = int(i * 0.5 * R) % max(1, n - R // 4)
        tt = t[: n - start]
        env = np.exp(-tt * 3.0) * (1 - np.exp(-tt * 400))
        for h, a in enumerate(harmonics, 1):
            if f0 * h < 7500:
                x[start:] += a * env * np.sin(2 * np.pi * f0 * h * tt + rng.uniform(0, 2 * np.pi))
    x /= np.sqrt(np.mean(x ** 2))
    room = np.cumsum(rng.standard_normal(n))
    room -= np.convolve(room, np.ones(200) / 200, "same")
    x += room / np.sqrt(np.mean(room ** 2)) * 10 ** (room_db / 20)
    return 0.1 * x


def with_noise(x, snr_db, seed=0):
    n = np.random.default_rng(seed).standard_normal(len(x))
    return x + n * np.sqrt(np.mean(x ** 2) / np.mean(n ** 2)) * 10 ** (-snr_db / 20)


C_MAJOR = [60, 64, 67, 72, 64, 60]
F_SHARP = [61, 66, 70, 73, 66, 61]  # a semitone away from every note above


@pytest.fixture(scope="module")
def clip():
    return piano(C_MAJOR)


def test_the_original_scores_zero_zero_one(clip):
    f = q.figures(clip, clip.copy())
    assert (f.lsd_db, f.flatness_excess_db, f.pitch_class_agreement) == (0.0, 0.0, pytest.approx(1.0, abs=1e-12))
    assert f.loud_frames > 150


def test_only_the_first_common_samples_count(clip):
    longer = np.concatenate([clip, np.random.default_rng(1).standard_normal(R)])
    assert q.figures(clip, longer) == q.figures(clip, clip)


def test_equal_loudness_noise_fails_every_figure(clip):
    f = q.figures(clip, q.noise_like(clip, seed=3))
    # far outside anything a model that hears its input produces (see the demo gate's floors)
    assert f.lsd_db > 25 and f.flatness_excess_db > 20 and f.pitch_class_agreement < 0.8, f
    assert np.sqrt(np.mean(q.noise_like(clip) ** 2)) == pytest.approx(np.sqrt(np.mean(clip ** 2)), rel=0.05)


def test_another_clip_is_told_apart_by_pitch_class(clip):
    other = q.figures(clip, piano(F_SHARP, seed=1))
    same_notes_other_timbre = q.figures(clip, piano(C_MAJOR, seed=2, harmonics=(1.0, 0.3, 0.1, 0.05)))
    assert other.pitch_class_agreement < 0.6, other
    assert same_notes_other_timbre.pitch_class_agreement > 0.95, same_notes_other_timbre
    # another clip is as noisy as the original (no flatness excess) but far in LSD
    assert abs(other.flatness_excess_db) < 3 and other.lsd_db > 12


def test_added_white_noise_moves_lsd_into_a_known_band(clip):
    at30, at20 = q.figures(clip, with_noise(clip, 30)), q.figures(clip, with_noise(clip, 20))
    # These synthetic tones have deep valleys between partials, so white noise fills more of the
    # spectrum than on recorded piano (7.8 / 14.0 dB measured on a demo clip at 30 / 20 dB SNR).
    assert 12.0 <= at30.lsd_db <= 22.0, at30
    assert at30.lsd_db < at20.lsd_db < q.figures(clip, q.noise_like(clip)).lsd_db
    assert 0 < at30.flatness_excess_db < at20.flatness_excess_db
    assert at30.pitch_class_agreement > 0.99  # the notes are all still there


def test_baselines_and_mean(clip):
    b = q.baselines(clip, piano(F_SHARP, seed=1), seed=0)
    assert set(b) == {"chance", "noise"}
    assert b["noise"].lsd_db > b["chance"].lsd_db
    m = q.mean_figures([b["chance"], b["noise"]])
    assert m.lsd_db == pytest.approx((b["chance"].lsd_db + b["noise"].lsd_db) / 2)


def test_describe_tells_piano_from_noise(clip):
    p, n = q.describe(clip), q.describe(q.noise_like(clip))
    assert p["centroid_hz"] < 1000 < 3500 < n["centroid_hz"]
    assert p["flatness_db"] < -25 and n["flatness_db"] == pytest.approx(-2.5, abs=0.5)


def test_silent_original_is_an_error(clip):
    with pytest.raises(ValueError, match="silent"):
        q.figures(np.zeros(R), clip)
