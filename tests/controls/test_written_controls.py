"""Controls from MIDI and CSV, the control metrics, and `ldm-jax controls extract`."""

import json

import mir_eval
import numpy as np
import pretty_midi
import pytest

from ldm_jax import cli, controls
from ldm_jax.audio.io import write_audio

SR, RATE = 16000, 50
CFG = controls.FeatureConfig(sample_rate=SR, frame_rate=RATE)
MELODY = [72, 76, 79, 77, 74, 72, 71, 72, 76, 79, 81, 79, 77, 76, 74, 72]  # C5 upwards


@pytest.fixture(scope="module")
def midi_file(tmp_path_factory):
    """Eight seconds at 120 BPM in 4/4: a melody above middle C (one note a beat, velocity
    rising from 30 to 120), a quiet bass note under it each bar, and drums (ignored by the
    melody)."""
    pm = pretty_midi.PrettyMIDI(initial_tempo=120.0)
    lead = pretty_midi.Instrument(program=0)
    bass = pretty_midi.Instrument(program=33)
    drums = pretty_midi.Instrument(program=0, is_drum=True)
    for i, pitch in enumerate(MELODY):
        velocity = int(30 + 90 * i / (len(MELODY) - 1))
        lead.notes.append(pretty_midi.Note(velocity, pitch, 0.5 * i, 0.5 * i + 0.45))
        drums.notes.append(pretty_midi.Note(100, 42, 0.5 * i, 0.5 * i + 0.05))
    for bar in range(4):
        bass.notes.append(pretty_midi.Note(25, 36, 2.0 * bar, 2.0 * bar + 1.9))
    pm.instruments += [lead, bass, drums]
    path = tmp_path_factory.mktemp("midi") / "song.mid"
    pm.write(str(path))
    return path, pm


def test_midi_controls_follow_the_score(midi_file):
    path, pm = midi_file
    c = controls.controls_from_midi(path, CFG)
    assert c["num_frames"] == CFG.num_frames(round(pm.get_end_time() * SR))
    pc = c["melody"]["pitch_class"]
    # Frame 10 (0.2 s) is in the first note, C5; frame 30 (0.6 s) in the second, E5.
    assert pc[10] == 0 and pc[30] == 4
    assert pc[23] == -1 or pc[23] == 0  # 0.46 s: the gap between notes, or the bass's C
    np.testing.assert_allclose(c["rhythm"]["beats"], np.arange(16) * 0.5)
    np.testing.assert_allclose(c["rhythm"]["downbeats"], np.arange(4) * 2.0)
    db = c["dynamics"]["db"]
    assert np.corrcoef(np.arange(db.size), db)[0, 1] > 0.9  # the velocity crescendo


def test_midi_and_audio_routes_agree_on_a_rendered_midi_file(midi_file, tmp_path):
    path, pm = midi_file
    audio = pm.synthesize(fs=SR).astype(np.float32)
    audio = 0.5 * audio / np.abs(audio).max()
    wav = tmp_path / "song.wav"
    write_audio(wav, audio[:, None], SR)
    written = controls.controls_from_midi(path, CFG, seconds=len(audio) / SR)
    heard = controls.controls_from_file(wav, frame_rate=RATE)
    assert heard["num_frames"] == written["num_frames"]
    acc = controls.melody_accuracy(written["melody"]["pitch_class"],
                                   np.asarray(heard["melody"]["pitch_class"]))
    assert acc > 0.8, acc
    f1 = controls.beat_f1(written["rhythm"]["beats"], heard["rhythm"]["beats"])
    assert f1 > 0.8, f1
    corr = controls.dynamics_correlation(written["dynamics"]["db"], heard["dynamics"]["db"])
    assert corr > 0.8, corr


def test_dynamics_from_csv_interpolates_and_refuses_bad_rows(tmp_path):
    good = tmp_path / "curve.csv"
    good.write_text("time,db\n0,-30\n1,-10\n2,-20\n")
    db = controls.dynamics_from_csv(good, CFG)
    assert db.shape == (CFG.num_frames(2 * SR),)
    assert db[0] == -30 and db[RATE] == -10 and db[RATE // 2] == pytest.approx(-20)
    assert db[-1] == -20
    bad = tmp_path / "bad.csv"
    bad.write_text("0,-30\n1,loud\n")
    with pytest.raises(controls.ControlsError, match="line 2 is not 'time,db'"):
        controls.dynamics_from_csv(bad, CFG)
    backwards = tmp_path / "backwards.csv"
    backwards.write_text("1,-30\n0,-10\n")
    with pytest.raises(controls.ControlsError, match="increasing"):
        controls.dynamics_from_csv(backwards, CFG)


def test_identity_controls_score_one_and_known_errors_score_what_they_should():
    rng = np.random.default_rng(0)
    pc = rng.integers(-1, 12, 200)
    assert controls.melody_accuracy(pc, pc) == 1.0
    wrong = np.where(np.arange(200) % 2 == 0, pc, (pc + 1) % 12)
    voiced = pc >= 0
    expected = np.mean((wrong == pc)[voiced])
    assert controls.melody_accuracy(pc, wrong) == pytest.approx(expected)
    # An estimate that is unvoiced where the reference is voiced counts as wrong.
    assert controls.melody_accuracy(pc, np.full(200, -1)) == 0.0
    # For a voiced estimate it is mir_eval's raw chroma accuracy (classes placed in any octave).
    est = np.where(np.arange(200) % 3 == 0, (pc + 5) % 12, np.maximum(pc, 0))
    cents = lambda p, octave: mir_eval.melody.hz2cents(
        440.0 * 2.0 ** ((np.maximum(p, 0) + 12 * octave - 69) / 12.0))
    reference = mir_eval.melody.raw_chroma_accuracy(
        voiced.astype(float), cents(pc, 5), np.ones(200), cents(est, 6))
    assert controls.melody_accuracy(pc, est) == pytest.approx(reference)
    db = rng.standard_normal(100).cumsum()
    assert controls.dynamics_correlation(db, db) == pytest.approx(1.0)
    assert controls.dynamics_correlation(db, 3 * db - 7) == pytest.approx(1.0)
    assert controls.pooled_dynamics_correlation([db, db[:50]], [db, db[:50]]) == pytest.approx(1)
    beats = np.arange(0.5, 8.0, 0.5)
    assert controls.beat_f1(beats, beats) == 1.0
    assert controls.beat_f1(beats, beats + 0.06) == 1.0      # inside the 70 ms window
    assert controls.beat_f1(beats, beats + 0.08) == 0.0      # outside it
    # Beats in the first 5 s count (mir_eval.beat.evaluate would trim them).
    assert controls.beat_f1(beats[:4], beats[:4]) == 1.0
    recall = 8 / 15  # precision 1
    assert controls.beat_f1(beats, beats[::2]) == pytest.approx(2 * recall / (1 + recall))
    with pytest.raises(controls.ControlsError, match="differ in length"):
        controls.dynamics_correlation(db, db[:10])


def test_cli_extracts_controls_of_audio_and_midi_with_one_line_errors(midi_file, tmp_path,
                                                                     capsys):
    path, pm = midi_file
    audio = pm.synthesize(fs=SR).astype(np.float32)
    wav = tmp_path / "song.wav"
    write_audio(wav, (0.5 * audio / np.abs(audio).max())[:, None], SR)
    out = tmp_path / "out" / "c.json"
    png = tmp_path / "out" / "c.png"
    assert cli.main(["controls", "extract", str(wav), "--json", str(out), "--plot",
                     str(png)]) == 0
    got = json.loads(out.read_text())
    assert got["source"] == "audio" and got["frame_rate"] == 50.0  # the tiny codec's rate
    assert len(got["melody"]["pitch_class"]) == len(got["dynamics_db"]) == got["num_frames"]
    assert len(got["beats"]) >= 12 and png.stat().st_size > 1000
    assert cli.main(["controls", "extract", str(path), "--json", str(out),
                     "--frame-rate", "25"]) == 0
    got = json.loads(out.read_text())
    assert got["source"] == "midi" and got["frame_rate"] == 25.0
    assert got["downbeats"] == [0.0, 2.0, 4.0, 6.0]
    capsys.readouterr()
    broken = tmp_path / "broken.mid"
    broken.write_bytes(b"not midi at all")
    assert cli.main(["controls", "extract", str(broken), "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ldm-jax: error:") and "not a readable MIDI file" in err
    assert len(err.splitlines()) == 1
    assert cli.main(["controls", "extract", str(wav), "--json", str(out),
                     "--frame-rate", "48"]) == 2
    assert "whole number of samples" in capsys.readouterr().err
