"""`synthetic_music` with varying controls: level curves, bar accents and stored ground truth."""

import hashlib

import ml_collections
import numpy as np
import pytest

from ldm_jax import controls
from ldm_jax.data import builders, synthetic, synthetic_music

SR, SECONDS, RATE = 16000, 8.0, 50
CFG = controls.FeatureConfig(sample_rate=SR, frame_rate=RATE)

# The default clips are those built before the option existed (sha256 of the audio bytes, first
# 16 hex digits, seed 0, train, 3 s at 16 kHz): datasets and trained chains stay valid.
DEFAULT_AUDIO = {0: "5d1ae15d9c12cdee", 2: "87fccb4de4eb3fb7", 5: "20c8929f73e6a9ec"}


@pytest.fixture(scope="module")
def examples():
    return [synthetic.generate_example(0, i, "train", SR, SECONDS, controls=True)
            for i in range(12)]


def test_the_default_clips_do_not_change():
    for index, digest in DEFAULT_AUDIO.items():
        ex = synthetic.generate_example(0, index, "train", SR, 3.0)
        assert hashlib.sha256(ex["audio"].tobytes()).hexdigest()[:16] == digest
        assert "beats" not in ex and "dynamics" not in ex


def test_ground_truth_is_consistent(examples):
    shapes = set()
    for ex in examples:
        beat = 60.0 / ex["tempo_bpm"]
        np.testing.assert_allclose(np.diff(ex["beats"]), beat, rtol=1e-9)
        assert ex["beats"][0] == 0.0 and ex["beats"][-1] < SECONDS
        np.testing.assert_array_equal(ex["downbeats"], ex["beats"][::4])
        shapes.add(ex["dynamics"])
        assert ex["dynamics"] in synthetic.DYNAMICS
        assert np.all(np.diff(ex["gain_times"]) >= 0) and ex["gain_times"][-1] == SECONDS
        assert np.ptp(ex["gain_db"]) >= 8.0
        if ex["instrument"] == "drum_kit":
            assert ex["note_pitches"].size == 0
        else:
            assert ex["note_pitches"].size > 4
            assert np.all(ex["note_offsets"] > ex["note_onsets"])
            assert np.all(ex["note_offsets"] <= SECONDS)
            # Every note starts on the sixteenth-note grid of the beats (strums: 20 ms a string).
            steps = ex["note_onsets"] / (beat / 4)
            np.testing.assert_allclose(steps * beat / 4, np.round(steps) * beat / 4, atol=0.07)
    assert len(shapes) >= 3


def test_extracted_controls_follow_the_ground_truth(examples):
    """The signal carries what the ground truth says: the level curve, the beats and, for
    single lines above middle C, the melody."""
    correlations, f1s, accuracies = [], [], []
    for ex in examples:
        found = controls.controls_from_audio(ex["audio"], CFG)
        frames = found["num_frames"]
        truth_db = np.interp(np.arange(frames) / RATE, ex["gain_times"], ex["gain_db"])
        correlations.append(controls.dynamics_correlation(truth_db, found["dynamics"]["db"]))
        f1s.append(controls.beat_f1(ex["beats"], found["rhythm"]["beats"]))
        if ex["pattern"] == "melody" and ex["instrument"] != "bass":
            truth = controls.melody_from_notes(ex["note_onsets"], ex["note_offsets"],
                                               ex["note_pitches"], frames, RATE)
            accuracies.append(controls.melody_accuracy(
                truth["pitch_class"], np.asarray(found["melody"]["pitch_class"])))
    assert np.median(correlations) > 0.75, correlations
    assert np.median(f1s) > 0.6, f1s
    if accuracies:
        assert np.mean(accuracies) > 0.5, accuracies


def test_the_dataset_stores_the_ground_truth(tmp_path):
    cfg = ml_collections.ConfigDict(dict(name="synthetic_music", sample_rate=SR, channels=1,
                                         clip_seconds=6.0, num_train=2, num_test=1, seed=0,
                                         controls=True))
    summary = builders.build_synthetic_music(cfg, str(tmp_path), progress=False)
    assert summary["params"]["controls"] is True
    stored = list(builders.open_split(str(tmp_path), "synthetic_music", "test"))[0]
    direct = synthetic.generate_example(0, 0, "test", SR, 6.0, controls=True)
    for key in ("beats", "downbeats", "note_onsets", "note_pitches", "gain_db"):
        np.testing.assert_allclose(stored[key], direct[key], rtol=1e-6)
    assert stored["note_pitches"].dtype == np.int32
    dynamics = stored["dynamics"]
    assert (dynamics.decode() if isinstance(dynamics, bytes) else dynamics) == direct["dynamics"]
    # A build without the option records no `controls` parameter, as builds before it did.
    plain = ml_collections.ConfigDict(dict(cfg.to_dict(), controls=False))
    assert "controls" not in synthetic_music.params_from_config(plain)
