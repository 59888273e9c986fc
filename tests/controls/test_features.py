"""Control features against librosa/scipy and against signals whose answer is known."""

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest
import scipy.signal

from ldm_jax import controls
from ldm_jax.controls import features

SR, RATE = 16000, 50
CFG = controls.FeatureConfig(sample_rate=SR, frame_rate=RATE)
A, C = 9, 0


def tone(hz, seconds=2.0, amp=0.5):
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def click_track(seconds=8.0, bpm=120.0, accent_every=4):
    """Short 1 kHz clicks on every beat, twice as loud on every `accent_every`-th."""
    x = np.zeros(int(seconds * SR), np.float32)
    burst = np.hanning(160) * np.sin(2 * np.pi * 1000 * np.arange(160) / SR)
    times = np.arange(0, seconds, 60.0 / bpm)
    for k, b in enumerate(times):
        i = int(round(b * SR))
        x[i:i + 160] += (1.0 if k % accent_every == 0 else 0.5) * burst[:len(x) - i]
    return x, times


def test_a_sine_is_an_a_and_a_bass_under_c5_is_a_c():
    found = controls.melody(tone(440.0), CFG)
    assert bool(np.all(found["voiced"]))
    assert set(np.asarray(found["pitch_class"]).tolist()) == {A}
    np.testing.assert_allclose(np.asarray(found["one_hot"]).sum(-1), 1.0)
    # A loud A1 under a quiet C5: the high-pass at middle C leaves the melody.
    mix = tone(55.0, amp=0.8) + tone(523.25, amp=0.1)
    assert set(np.asarray(controls.melody(mix, CFG)["pitch_class"]).tolist()) == {C}
    # Without the high-pass the bass would win: librosa's chroma of the raw mix says A.
    raw = librosa.feature.chroma_stft(y=mix, sr=SR, n_fft=CFG.n_fft, hop_length=CFG.hop_length,
                                      tuning=0.0)
    assert np.bincount(raw.argmax(0)).argmax() == A
    silent = controls.melody(np.zeros(SR, np.float32), CFG)
    assert not bool(np.any(silent["voiced"])) and set(
        np.asarray(silent["pitch_class"]).tolist()) == {-1}


def test_chroma_equals_librosa_on_the_high_passed_signal():
    """Our filter acts on the spectrum; librosa reads the time-domain filtered signal. Away from
    the edges (where the IIR filter's transient is) the chromagrams agree."""
    rng = np.random.default_rng(0)
    x = sum(tone(f, amp=a) for f, a in zip((110.0, 330.0, 587.3, 784.0), rng.uniform(0.1, 0.4, 4)))
    x = x + 0.01 * rng.standard_normal(x.shape).astype(np.float32)
    ours = np.asarray(controls.melody(x, CFG)["chroma"])
    sos = scipy.signal.butter(2, features.MIDDLE_C, "highpass", fs=SR, output="sos")
    ref = librosa.feature.chroma_stft(y=scipy.signal.sosfilt(sos, x), sr=SR, n_fft=CFG.n_fft,
                                      hop_length=CFG.hop_length, tuning=0.0).T
    inner = slice(5, -5)
    np.testing.assert_allclose(ours[inner], ref[inner], atol=0.02)
    assert ours.shape == (CFG.num_frames(len(x)), 12)


def test_dynamics_follow_a_ramp_and_smooth_like_scipy():
    t = np.arange(4 * SR) / SR
    ramp = (np.linspace(0.01, 1.0, t.size) * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    d = controls.dynamics(ramp, CFG)
    db, raw = np.asarray(d["db"]), np.asarray(d["raw_db"])
    assert np.all(np.diff(db) > 0)
    # The level tracks 20 log10 of the amplitude (a constant offset apart) in the middle.
    centres = np.minimum(np.arange(raw.size) * CFG.hop_length, t.size - 1)
    amp = np.linspace(0.01, 1.0, t.size)[centres]
    mid = slice(20, -20)
    offset = raw[mid] - 20 * np.log10(amp[mid])
    assert np.ptp(offset) < 0.5, np.ptp(offset)
    window = features.smoothing_window(CFG, raw.size)
    assert window == 51
    np.testing.assert_allclose(db, scipy.signal.savgol_filter(raw, window, CFG.smooth_order,
                                                              mode="nearest"), atol=1e-3)


def test_onset_strength_equals_librosa():
    x, _ = click_track(4.0)
    ours = np.asarray(controls.onset_strength(x, CFG))
    ref = librosa.onset.onset_strength(y=x, sr=SR, n_fft=CFG.n_fft, hop_length=CFG.hop_length,
                                       n_mels=CFG.n_mels, center=True)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-3 * ref.max())


def test_a_120_bpm_click_track_gives_beats_half_a_second_apart_and_its_accents():
    x, times = click_track(8.0)
    found = controls.controls_from_audio(x, CFG)
    beats = found["rhythm"]["beats"]
    assert len(beats) >= 12
    np.testing.assert_allclose(np.diff(beats), 0.5, atol=1.0 / RATE)
    # Every tracked beat is within one frame of a click.
    assert np.all(np.min(np.abs(beats[:, None] - times[None, :]), axis=1) <= 1.0 / RATE + 1e-9)
    downbeats = found["rhythm"]["downbeats"]
    accents = times[::4]
    assert len(downbeats) >= 3
    gaps = np.min(np.abs(downbeats[:, None] - accents[None, :]), axis=1)
    assert np.all(gaps <= 1.0 / RATE + 1e-9)
    act = found["rhythm"]["beat_activation"]
    assert act.shape == (found["num_frames"],) and act.max() == pytest.approx(1.0, abs=0.05)


def test_extraction_is_one_jitted_differentiable_call_per_batch():
    rng = np.random.default_rng(1)
    batch = (0.1 * rng.standard_normal((2, SR))).astype(np.float32)
    both = controls.extract(batch, CFG)
    one = controls.extract(batch[1], CFG)
    for key in ("chroma", "soft"):
        np.testing.assert_allclose(both["melody"][key][1], one["melody"][key], atol=1e-5)
    np.testing.assert_allclose(both["dynamics"]["db"][1], one["dynamics"]["db"], atol=1e-4)
    np.testing.assert_allclose(both["onset"][1], one["onset"], rtol=1e-4, atol=1e-5)

    target = jax.nn.one_hot(jnp.full((CFG.num_frames(SR),), A), 12)

    def loss(audio):
        f = controls.extract(audio, CFG)
        return -jnp.sum(f["melody"]["soft"] * target) + jnp.mean(f["dynamics"]["db"]) \
            + jnp.sum(f["onset"])

    g = jax.grad(loss)(jnp.asarray(tone(440.0, seconds=1.0)))
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


def test_bad_configs_are_refused():
    with pytest.raises(controls.ControlsError, match="whole number of samples"):
        controls.FeatureConfig(sample_rate=16000, frame_rate=48)
    with pytest.raises(controls.ControlsError, match="cutoff_hz"):
        controls.FeatureConfig(sample_rate=16000, frame_rate=50, cutoff_hz=9000)
    with pytest.raises(controls.ControlsError, match="shorter than half an FFT"):
        controls.controls_from_audio(np.zeros(100, np.float32), CFG)


def test_readme_controls_example_runs():
    import os
    import re
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    section = readme[readme.index("## Musical controls\n"):]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["features"]["dynamics"]["db"].shape == (ns["found"]["num_frames"],)
