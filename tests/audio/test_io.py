"""Audio file reading and writing: round trips, down-mixing, resampling, and clear errors."""

import os

import numpy as np
import pytest
import soundfile as sf

from ldm_jax.audio import dsp
from ldm_jax.audio import io as audio_io
from ldm_jax.audio.io import AudioReadError, AudioWriteError, audio_info, read_audio, write_audio

SR = 16000


@pytest.fixture(scope="module")
def stereo():
    t = np.arange(SR // 2) / SR
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    right = 0.25 * np.sin(2 * np.pi * 660 * t)
    return np.stack([left, right], axis=-1).astype(np.float32)  # [time, channels]


def test_wav_and_flac_round_trip(tmp_path, stereo):
    for name, subtype, atol in (("a.wav", None, 1.0 / 32768), ("b.flac", None, 1.0 / 32768),
                                ("c.wav", "FLOAT", 0.0), ("d.flac", "PCM_24", 1.0 / 2 ** 23)):
        path = tmp_path / "nested" / name
        write_audio(path, stereo, SR, subtype=subtype)
        assert audio_info(path) == (SR, 2, len(stereo))
        audio, sr = read_audio(path, mono=False)
        assert sr == SR and audio.dtype == np.float32 and audio.shape == stereo.shape
        np.testing.assert_allclose(audio, stereo, atol=atol)
        mono, _ = read_audio(path)
        assert mono.shape == (len(stereo), 1)
        np.testing.assert_allclose(mono[:, 0], stereo.mean(axis=1), atol=atol)
    assert sorted(os.listdir(tmp_path / "nested")) == ["a.wav", "b.flac", "c.wav", "d.flac"]


def test_one_dimensional_audio_and_clipping(tmp_path):
    path = tmp_path / "x.wav"
    write_audio(path, np.array([0.0, 2.0, -3.0, 0.5] * 100, np.float32), SR)
    audio, _ = read_audio(path)
    assert audio.shape == (400, 1)
    np.testing.assert_allclose(audio[:4, 0], [0.0, 1.0, -1.0, 0.5], atol=2.0 / 32768)


def test_read_resamples_like_dsp(tmp_path, stereo):
    path = tmp_path / "float.wav"
    write_audio(path, stereo, SR, subtype="FLOAT")
    audio, sr = read_audio(path, sample_rate=24000, mono=False)
    assert sr == 24000 and audio.shape == (-(-len(stereo) * 24000 // SR), 2)
    expected = np.asarray(dsp.resample(stereo, SR, 24000, axis=0))
    np.testing.assert_allclose(audio, expected, atol=2e-6)
    same, sr = read_audio(path, sample_rate=SR, mono=False)
    assert sr == SR
    np.testing.assert_array_equal(same, stereo)


@pytest.mark.parametrize("suffix,fmt", [(".ogg", "OGG"), (".mp3", "MP3")])
def test_compressed_formats(tmp_path, stereo, suffix, fmt):
    if fmt not in sf.available_formats():
        pytest.skip(f"this libsndfile has no {fmt} support")
    path = tmp_path / f"c{suffix}"
    write_audio(path, stereo, SR)
    audio, sr = read_audio(path, mono=False)
    assert sr == SR and audio.shape[1] == 2
    # Lossy codecs add delay and noise: compare the tone by correlation, away from the ends.
    n = min(len(audio), len(stereo))
    a, b = audio[2000:n - 2000, 0], stereo[2000:n - 2000, 0]
    lag = np.argmax(np.correlate(a[:4000], b[:2000], mode="valid"))
    corr = np.corrcoef(a[lag:lag + 2000], b[:2000])[0, 1]
    assert corr > 0.95


def _assert_one_line(excinfo, path, reason):
    message = str(excinfo.value)
    assert "\n" not in message and str(path) in message and reason in message


def test_unreadable_files_raise_one_line_errors(tmp_path, stereo):
    missing = tmp_path / "missing.wav"
    with pytest.raises(AudioReadError) as e:
        read_audio(missing)
    _assert_one_line(e, missing, "no such file")

    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioReadError) as e:
        read_audio(empty)
    _assert_one_line(e, empty, "empty (0 bytes)")

    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 20)
    for fn in (read_audio, audio_info):
        with pytest.raises(AudioReadError) as e:
            fn(text)
        _assert_one_line(e, text, "not a readable audio file")

    header_only = tmp_path / "header_only.wav"
    sf.write(header_only, np.zeros((0, 1), np.float32), SR)
    with pytest.raises(AudioReadError) as e:
        read_audio(header_only)
    _assert_one_line(e, header_only, "no audio samples")

    good = tmp_path / "good.flac"
    write_audio(good, stereo, SR)
    truncated = tmp_path / "truncated.flac"
    data = good.read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(AudioReadError) as e:
        read_audio(truncated)
    _assert_one_line(e, truncated, "corrupt or truncated")

    with pytest.raises(AudioReadError) as e:
        read_audio(tmp_path)
    _assert_one_line(e, tmp_path, "is a directory")


def test_missing_codec_is_reported(tmp_path, monkeypatch):
    path = tmp_path / "song.mp3"
    path.write_bytes(b"\xff\xfb" + bytes(1000))
    monkeypatch.setattr(audio_io.sf, "available_formats", lambda: {"WAV": "", "FLAC": ""})
    with pytest.raises(AudioReadError) as e:
        read_audio(path)
    _assert_one_line(e, path, "cannot decode MP3")


def test_write_errors(tmp_path, stereo):
    with pytest.raises(AudioWriteError, match="cannot write '.xyz'"):
        write_audio(tmp_path / "a.xyz", stereo, SR)
    with pytest.raises(AudioWriteError, match=r"transpose \[channels, time\]"):
        write_audio(tmp_path / "a.wav", stereo.T, SR)
    with pytest.raises(AudioWriteError, match="NaN"):
        write_audio(tmp_path / "a.wav", np.full(100, np.nan, np.float32), SR)
    with pytest.raises(AudioWriteError, match="FLAC cannot hold subtype FLOAT"):
        write_audio(tmp_path / "a.flac", stereo, SR, subtype="FLOAT")
    assert os.listdir(tmp_path) == []
