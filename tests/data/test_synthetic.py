"""Tests of the procedural music generator: determinism, attributes, loudness, captions, and that
key, tempo and instrument can be recovered from the audio by independent analysis (librosa)."""

import collections
import re

import numpy as np
import pytest

from ldm_jax.data import synthetic

# Krumhansl & Kessler key profiles (C major / C minor).
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


@pytest.fixture(scope="module")
def examples():
    return [synthetic.generate_example(0, i, "train") for i in range(64)]


def _mentions(caption, phrase):
    return re.search(r"(?<![\w-])" + re.escape(phrase.lower()) + r"(?![\w-])",
                     caption.lower()) is not None


def test_same_arguments_give_identical_bytes():
    a = synthetic.generate_example(7, 3, "train")
    b = synthetic.generate_example(7, 3, "train")
    assert a["audio"].tobytes() == b["audio"].tobytes()
    assert {k: v for k, v in a.items() if k != "audio"} == {
        k: v for k, v in b.items() if k != "audio"}
    for other in (synthetic.generate_example(7, 4, "train"),
                  synthetic.generate_example(7, 3, "test"),
                  synthetic.generate_example(8, 3, "train")):
        assert other["audio"].tobytes() != a["audio"].tobytes()


@pytest.mark.parametrize("sample_rate,seconds", [(16000, 4.0), (8000, 1.5), (22050, 0.3),
                                                 (48000, 1.0)])
def test_audio_is_finite_float32_of_the_requested_length(sample_rate, seconds):
    for index in range(6):
        audio = synthetic.generate_example(1, index, "train", sample_rate, seconds)["audio"]
        assert audio.dtype == np.float32
        assert audio.shape == (round(seconds * sample_rate),)
        assert np.isfinite(audio).all()
        assert 1e-3 < np.abs(audio).max() <= 1.0


def test_attributes_are_valid_and_varied(examples):
    for ex in examples:
        assert ex["instrument"] in synthetic.INSTRUMENTS
        assert ex["pattern"] in synthetic.PATTERNS
        assert ex["loudness"] in synthetic.LOUDNESS
        assert 70 <= ex["tempo_bpm"] <= 160
        if ex["instrument"] == "drum_kit":
            assert (ex["key"], ex["mode"], ex["pattern"]) == ("", "", "groove")
        else:
            assert ex["key"] in synthetic.KEYS and ex["mode"] in synthetic.MODES
            assert ex["pattern"] != "groove"
    assert {ex["instrument"] for ex in examples} == set(synthetic.INSTRUMENTS)
    assert {ex["pattern"] for ex in examples} == set(synthetic.PATTERNS)
    assert {ex["loudness"] for ex in examples} == set(synthetic.LOUDNESS)
    assert len({ex["key"] for ex in examples} - {""}) >= 10
    assert {synthetic.tempo_class(ex["tempo_bpm"]) for ex in examples} == set(synthetic.TEMPI)
    assert {ex["with_drums"] for ex in examples if ex["instrument"] != "drum_kit"} == {True, False}
    combos = {(ex["instrument"], ex["key"], ex["mode"], ex["pattern"]) for ex in examples}
    assert len(combos) >= 48
    assert len({ex["caption"] for ex in examples}) == len(examples)


def test_loudness_classes_are_ordered_by_measured_loudness(examples):
    by_class = collections.defaultdict(list)
    for ex in examples:
        measured = synthetic.loudness_lufs(ex["audio"], 16000)
        assert ex["loudness_db"] == pytest.approx(measured, abs=0.05)
        by_class[ex["loudness"]].append(measured)
    assert max(by_class["quiet"]) < min(by_class["moderate"])
    assert max(by_class["moderate"]) < min(by_class["loud"])


def test_k_weighting_reproduces_the_bs1770_coefficients_and_reference_tone():
    # ITU-R BS.1770-4, Tables 1 and 2 (48 kHz).
    published = np.array([
        [1.53512485958697, -2.69169618940638, 1.19839281085285, 1.0, -1.69065929318241,
         0.73248077421585],
        [1.0, -2.0, 1.0, 1.0, -1.99004745483398, 0.99007225036621]])
    np.testing.assert_allclose(synthetic.k_weighting(48000), published, atol=1e-8)
    # A full-scale 997 Hz sine reads -3.01 LUFS.
    rng = np.random.default_rng(0)
    for rate, tolerance in ((48000, 0.01), (16000, 0.06)):
        t = np.arange(3 * rate) / rate
        tone = np.sin(2 * np.pi * 997.0 * t)
        assert synthetic.loudness_lufs(tone, rate) == pytest.approx(-3.01, abs=tolerance)
        # Quiet noise around it (above the absolute gate) falls under the relative gate; what
        # remains are the 27 blocks inside the tone and the 6 that overlap it by 1/4, 1/2, 3/4.
        hiss = 0.003 * rng.standard_normal(2 * rate)
        padded = np.concatenate([hiss, tone, hiss])
        expected = -3.01 + 10 * np.log10(30 / 33)
        assert synthetic.loudness_lufs(padded, rate) == pytest.approx(expected, abs=tolerance)


def test_limiter_keeps_peaks_under_the_ceiling_without_touching_quiet_parts():
    rng = np.random.default_rng(0)
    audio = 0.1 * rng.standard_normal(16000).astype(np.float32)
    audio[8000] = 3.0
    limited = synthetic.limit(audio, 16000, ceiling=0.5)
    assert np.abs(limited).max() <= 0.5
    np.testing.assert_array_equal(limited[:7000], audio[:7000])


def test_captions_name_every_attribute(examples):
    for ex in examples:
        caption = ex["caption"]
        names = synthetic.INSTRUMENT_WORDS[ex["instrument"]]
        if ex["instrument"] == "drum_kit":
            names += ("drums",)
        assert any(_mentions(caption, w) for w in names), caption
        if ex["instrument"] != "drum_kit":
            spellings = {ex["key"], synthetic.KEY_SPELLINGS.get(ex["key"], ex["key"])}
            assert any(_mentions(caption, f"{k} {ex['mode']}") for k in spellings), caption
        tempo = synthetic.tempo_class(ex["tempo_bpm"])
        said = synthetic.TEMPO_WORDS[tempo] + synthetic.TEMPO_PHRASES[tempo]
        assert any(_mentions(caption, w) for w in said), caption
        for other in set(synthetic.TEMPI) - {tempo}:
            assert not any(_mentions(caption, w) for w in synthetic.TEMPO_WORDS[other]), caption
        said = synthetic.LOUDNESS_WORDS[ex["loudness"]] + synthetic.LOUDNESS_PHRASES[ex["loudness"]]
        assert any(_mentions(caption, w) for w in said), caption
        if ex["with_drums"] and ex["instrument"] != "drum_kit":
            assert any(_mentions(caption, w) for w in synthetic.DRUM_PHRASES), caption
        assert caption[0].isupper() and caption.endswith(".")
        assert " a a" not in caption and " a e" not in caption.lower()


def test_caption_wording_is_deterministic_and_varied():
    attributes = {"instrument": "organ", "key": "A", "mode": "minor", "tempo_bpm": 72.0,
                  "pattern": "chords", "with_drums": False, "loudness": "quiet"}
    first = synthetic.caption_for(attributes, np.random.default_rng(5))
    assert first == synthetic.caption_for(attributes, np.random.default_rng(5))
    wordings = {synthetic.caption_for(attributes, np.random.default_rng(s)) for s in range(40)}
    assert len(wordings) >= 30
    assert all("A minor" in w for w in wordings)


def _estimate_key(audio, sample_rate):
    import librosa

    chroma = librosa.feature.chroma_stft(y=audio, sr=sample_rate, n_fft=4096, tuning=0.0)
    profile = chroma.mean(axis=1)
    scores = [(np.corrcoef(profile, np.roll(template, tonic))[0, 1], synthetic.KEYS[tonic], mode)
              for mode, template in (("major", MAJOR_PROFILE), ("minor", MINOR_PROFILE))
              for tonic in range(12)]
    return max(scores)[1:]


def test_key_and_mode_are_recoverable_from_chroma():
    pitched = []
    index = 0
    while len(pitched) < 24:
        ex = synthetic.generate_example(2, index, "train")
        index += 1
        if ex["instrument"] != "drum_kit":
            pitched.append(ex)
    hits = sum(_estimate_key(ex["audio"], 16000) == (ex["key"], ex["mode"]) for ex in pitched)
    assert hits >= 16, f"key recovered for {hits} of 24 clips"


def test_tempo_is_recoverable_from_drum_grooves():
    import librosa

    grooves = []
    index = 0
    while len(grooves) < 12:
        ex = synthetic.generate_example(3, index, "train")
        index += 1
        if ex["instrument"] == "drum_kit":
            grooves.append(ex)
    hits = 0
    for ex in grooves:
        tempo, _ = librosa.beat.beat_track(y=ex["audio"], sr=16000)
        tempo = float(np.atleast_1d(tempo)[0])
        hits += any(abs(tempo - ex["tempo_bpm"] * f) <= 0.08 * ex["tempo_bpm"] * f
                    for f in (0.5, 1.0, 2.0))
    assert hits >= 10, f"tempo recovered for {hits} of 12 grooves"


def test_instruments_are_told_apart_by_their_spectra(examples):
    import librosa

    features = []
    for ex in examples:
        mfcc = librosa.feature.mfcc(y=ex["audio"], sr=16000, n_mfcc=20)
        features.append(np.concatenate([mfcc.mean(axis=1), mfcc.std(axis=1)]))
    features = np.array(features)
    features = (features - features.mean(0)) / features.std(0)
    labels = np.array([ex["instrument"] for ex in examples])
    correct = 0
    for i in range(len(examples)):
        others = np.arange(len(examples)) != i
        centroids = {c: features[others & (labels == c)].mean(0) for c in synthetic.INSTRUMENTS}
        guess = min(centroids, key=lambda c: np.linalg.norm(features[i] - centroids[c]))
        correct += guess == labels[i]
    assert correct >= 0.75 * len(examples), f"{correct} of {len(examples)} told apart"
