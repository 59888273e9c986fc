"""Generation metrics: Fréchet distance, CLAP score, and the music analysers on synthetic clips."""

import numpy as np
import pytest

from ldm_jax.data import synthetic
from ldm_jax.eval import metrics, music

SR = 16000


@pytest.fixture(scope="module")
def clips():
    return [synthetic.generate_example(3, i, "test", SR, 4.0) for i in range(24)]


@pytest.fixture(scope="module")
def analyses(clips):
    return [music.analyse(c["audio"], SR) for c in clips]


def test_frechet_distance_of_identical_and_transformed_sets():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 1.0
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.arange(6) * 0.5
    # A shifted copy has the same covariance: the distance is the squared shift.
    assert metrics.frechet_distance(a, a + shift) == pytest.approx(shift @ shift, rel=1e-6)
    # Scaling by c scales the covariance by c^2: tr(S) (1 - c)^2 plus the mean term.
    cov, mean = np.cov(a, rowvar=False), a.mean(0)
    expected = (np.trace(cov) + mean @ mean) * (1 - 2.0) ** 2
    assert metrics.frechet_distance(a, 2.0 * a) == pytest.approx(expected, rel=1e-6)
    # Independent Gaussian samples with shifted means: close to the squared shift.
    b = rng.normal(size=(4000, 6))
    c = rng.normal(size=(4000, 6)) + 1.0
    assert metrics.frechet_distance(b, c) == pytest.approx(6.0, rel=0.05)
    # Fewer samples than dimensions: the covariance product is singular but the result is finite.
    assert np.isfinite(metrics.frechet_distance(b[:5], c[:5]))


def test_clap_score_is_the_mean_cosine():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    t = np.array([[1.0, 1.0], [0.0, -1.0]])
    assert metrics.clap_score(a, t) == pytest.approx((np.sqrt(0.5) - 1.0) / 2)


def test_key_and_mode_analysis_on_synthetic_clips(clips, analyses):
    refs = [{k: c[k] for k in ("key", "mode", "tempo_bpm", "loudness")} for c in clips]
    scores = music.adherence(analyses, refs)
    assert scores["n_key"] >= 12
    # Chance is 1/12 for the tonic and 1/24 for tonic and mode.
    assert scores["key_accuracy"] >= 0.6
    assert scores["key_mode_accuracy"] >= 0.5
    assert scores["mode_accuracy"] >= 0.7


def test_tempo_and_loudness_analysis_on_synthetic_clips(clips, analyses):
    refs = [{k: c[k] for k in ("key", "mode", "tempo_bpm", "loudness")} for c in clips]
    scores = music.adherence(analyses, refs)
    assert scores["loudness_accuracy"] >= 0.9
    for a, c in zip(analyses, clips):
        assert a["loudness_db"] == pytest.approx(c["loudness_db"], abs=1.0)
    assert scores["tempo_octave_accuracy"] >= 0.6
    assert scores["tempo_accuracy"] <= scores["tempo_octave_accuracy"]
    chance = music.chance(refs)
    assert scores["tempo_octave_accuracy"] > chance["tempo_octave_accuracy"]


def test_a_pure_chord_names_its_key():
    t = np.arange(2 * SR) / SR
    # A minor triad (A C E) over its root an octave below.
    freqs = [110.0, 220.0, 261.63, 329.63]
    audio = sum(np.sin(2 * np.pi * f * t) for f in freqs).astype(np.float32) * 0.2
    key, mode, score = music.estimate_key(audio, SR)
    assert (key, mode) == ("A", "minor") and score > 0.5


def test_loudness_classes_and_tempo_matching():
    assert music.loudness_class(-33.0) == "quiet"
    assert music.loudness_class(-23.0) == "moderate"
    assert music.loudness_class(-13.0) == "loud"
    assert music.loudness_class(float("-inf")) == "quiet"
    assert music.tempo_matches(104.0, 100.0) and not music.tempo_matches(110.0, 100.0)
    assert not music.tempo_matches(200.0, 100.0)
    assert music.tempo_matches(200.0, 100.0, octave=True)
    assert music.tempo_matches(51.0, 100.0, octave=True)


def test_chance_levels_follow_the_attribute_distribution():
    refs = [{"key": k, "mode": "major", "tempo_bpm": 100.0 + 50 * (i % 2), "loudness": "loud"}
            for i, k in enumerate(synthetic.KEYS)]
    chance = music.chance(refs)
    assert chance["key_accuracy"] == pytest.approx(1 / 12)
    assert chance["mode_accuracy"] == pytest.approx(1.0)
    assert chance["loudness_accuracy"] == pytest.approx(1.0)
    assert chance["tempo_accuracy"] == pytest.approx(0.5)
    perfect = music.adherence([dict(r, loudness_db=-13.0) for r in refs], refs)
    assert perfect["key_mode_accuracy"] == 1.0 and perfect["tempo_accuracy"] == 1.0


def test_shuffled_references_keep_the_bias_and_remove_the_prompt():
    refs = [{"key": k, "mode": "major", "tempo_bpm": 60.0 + 10 * i, "loudness": "loud"}
            for i, k in enumerate(list(synthetic.KEYS) * 2)]
    # A generator that follows every prompt: far above its permutations.
    perfect = [dict(r, loudness_db=-13.0) for r in refs]
    means, p = music.shuffled(perfect, refs, rounds=200)
    assert means["key_accuracy"] == pytest.approx(1 / 12, abs=0.02)
    assert p["key_accuracy"] == pytest.approx(1 / 201) and p["tempo_accuracy"] == 1 / 201
    # Constant loudness: every permutation matches as well as the true pairing.
    assert means["loudness_accuracy"] == 1.0 and p["loudness_accuracy"] == 1.0
    # A generator that always answers the commonest key beats `chance` without reading the
    # prompt; its permutations score exactly as well.
    skewed = refs[:12] + [dict(r, key="Bb") for r in refs[12:]]
    constant = [dict(r, key="Bb", loudness_db=-13.0) for r in skewed]
    true = music.adherence(constant, skewed)["key_accuracy"]
    means, p = music.shuffled(constant, skewed, rounds=50)
    assert true == pytest.approx(13 / 24) and true > music.chance(skewed)["key_accuracy"]
    assert means["key_accuracy"] == pytest.approx(true) and p["key_accuracy"] == 1.0
