"""Tests of the instrument voices: Karplus-Strong against its time-domain recursion, tuning,
band-limiting (no partial folds over Nyquist), envelopes and drum spectra."""

import numpy as np
import pytest
from scipy import signal

from ldm_jax.data import instruments

SR = 16000
PITCHED = ("plucked_string", "organ", "bell", "synth_lead", "bass")


def _params(instrument):
    params = instruments.voice_params(instrument, np.random.default_rng(0))
    if instrument == "synth_lead":  # one oscillator, steady pitch: a clean line spectrum
        params.update(detune_cents=0.0, vibrato=0.0)
    if instrument == "organ":
        params.update(tremolo_depth=0.0)
    if instrument == "bell":
        params.update(index=5.0, ratio=1.4)
    return params


def _note(instrument, midi, params, seconds=1.5, sample_rate=SR):
    return instruments.render_notes(instrument, [0.0], [seconds - 0.2], [midi], [1.0],
                                    sample_rate, int(seconds * sample_rate), params,
                                    np.random.default_rng(1))


def _power_spectrum(audio, start, stop, sample_rate=SR, pad=1):
    segment = audio[int(start * sample_rate):int(stop * sample_rate)]
    n = len(segment) * pad
    power = np.abs(np.fft.rfft(segment * np.blackman(len(segment)), n)) ** 2
    return np.fft.rfftfreq(n, 1.0 / sample_rate), power


def test_karplus_strong_matches_its_time_domain_recursion():
    excitation = np.random.default_rng(0).standard_normal((1, 50)).astype(np.float32)
    gain, s, delay = 0.995, 0.3, 37
    y = instruments.karplus_strong(excitation, [gain], [s], [delay], 6000)
    denominator = np.zeros(delay + 2)
    denominator[[0, delay, delay + 1]] = 1.0, -gain * (1.0 - s), -gain * s
    reference = signal.lfilter([1.0], denominator,
                               np.pad(excitation[0].astype(np.float64), (0, 5950)))
    assert y.shape == (1, 6000)
    np.testing.assert_allclose(y[0], reference, atol=1e-4 * np.abs(reference).max())


@pytest.mark.parametrize("instrument", PITCHED)
def test_voices_are_in_tune(instrument):
    params = _params(instrument)
    for midi in ((36, 43, 50) if instrument == "bass" else (57, 69, 81)):
        f0 = float(instruments.midi_to_hz(midi))
        freqs, power = _power_spectrum(_note(instrument, midi, params), 0.2, 1.2, pad=64)
        band = np.abs(freqs / f0 - 1.0) < 0.03
        peak = freqs[band][np.argmax(power[band])]
        assert abs(1200.0 * np.log2(peak / f0)) < 1.0, (instrument, midi, peak, f0)


@pytest.mark.parametrize("instrument,midi", [("organ", 96), ("synth_lead", 96),
                                             ("synth_lead", 60), ("bass", 52), ("bell", 84)])
def test_pitched_voices_are_band_limited(instrument, midi):
    params = _params(instrument)
    f0 = float(instruments.midi_to_hz(midi))
    if instrument == "organ":
        lines = np.arange(1, 64) * f0 / 2.0  # drawbars are harmonics of the 16' sub-octave
    elif instrument == "bell":
        lines = np.abs(f0 * (1.0 + np.arange(-40, 41) * params["ratio"]))
    else:
        lines = np.arange(1, 400) * f0
    freqs, power = _power_spectrum(_note(instrument, midi, params), 0.1, 1.1)
    # Anything folded over Nyquist would land away from the partials the voice means to play.
    near = (np.abs(freqs[:, None] - lines[None, lines < SR / 2]) < 40.0).any(axis=1)
    assert 10 * np.log10(power[~near].sum() / power.sum()) < -60.0


def test_envelopes_decay_or_sustain_as_their_instrument_does():
    def level(audio, start, stop):
        return 10 * np.log10(np.mean(audio[int(start * SR):int(stop * SR)] ** 2) + 1e-20)

    for instrument in ("plucked_string", "bell"):
        audio = _note(instrument, 64, _params(instrument))
        assert level(audio, 1.0, 1.2) < level(audio, 0.05, 0.25) - 10.0
    for instrument in ("organ", "synth_lead"):
        audio = _note(instrument, 64, _params(instrument))
        assert abs(level(audio, 1.0, 1.2) - level(audio, 0.4, 0.6)) < 1.5
        assert level(audio, 1.45, 1.5) < level(audio, 1.0, 1.2) - 20.0  # released


def test_drum_hits_occupy_their_own_bands():
    params = instruments.voice_params("drum_kit", np.random.default_rng(0))
    hits = instruments.drum_samples(SR, params, np.random.default_rng(0))
    assert set(hits) == set(instruments.DRUM_NAMES)

    def centroid(hit):
        freqs, power = _power_spectrum(hit, 0.0, len(hit) / SR)
        return (freqs * power).sum() / power.sum()

    for hit in hits.values():
        assert hit.dtype == np.float32 and np.abs(hit).max() == pytest.approx(1.0)
    assert centroid(hits["kick"]) < 200.0 < centroid(hits["snare"]) < 4000.0
    assert centroid(hits["hat"]) > 4000.0
