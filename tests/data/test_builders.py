"""Tests for the TFDS builders: determinism, parameter checks, and a folder with bad files."""

import json
import os

import ml_collections
import numpy as np
import pytest
import soundfile as sf

from ldm_jax.data import builders
from ldm_jax.data.tfds_common import DataError

SR = 16000


def synth_cfg(**overrides):
    cfg = ml_collections.ConfigDict(dict(name="synthetic_music", sample_rate=SR, channels=1,
                                         clip_seconds=0.5, num_train=8, num_test=2, seed=0))
    cfg.update(overrides)
    return cfg


def folder_cfg(source, **overrides):
    cfg = ml_collections.ConfigDict(dict(name="audio_folder", sample_rate=SR, channels=1,
                                         source=str(source), test_fraction=0.1, max_seconds=0.4))
    cfg.update(overrides)
    return cfg


def all_examples(data_dir, name, split):
    return list(builders.open_split(str(data_dir), name, split))


@pytest.fixture(scope="module")
def synthetic_dirs(tmp_path_factory):
    """The same synthetic_music built twice: in this process and in two worker processes."""
    one = tmp_path_factory.mktemp("synth_a")
    two = tmp_path_factory.mktemp("synth_b")
    first = builders.build("synthetic_music", synth_cfg(), str(one), workers=1, progress=False,
                           print_fn=None)
    builders.build_synthetic_music(synth_cfg(), str(two), workers=2, progress=False)
    return one, two, first


def test_synthetic_builds_are_identical(synthetic_dirs, monkeypatch):
    one, two, summary = synthetic_dirs
    assert summary["splits"] == {"train": 8, "test": 2} and not summary["already_built"]
    for split, count in (("train", 8), ("test", 2)):
        a, b = all_examples(one, "synthetic_music", split), all_examples(two, "synthetic_music",
                                                                          split)
        assert len(a) == len(b) == count
        for x, y in zip(a, b):
            assert x["audio"].dtype == np.float32 and x["audio"].shape == (SR // 2,)
            assert x["audio"].tobytes() == y["audio"].tobytes()
            assert isinstance(x["caption"], str) and x["caption"]
            for key in ("caption", "instrument", "key", "mode", "pattern", "loudness", "id"):
                assert x[key] == y[key]
            for key in ("tempo_bpm", "loudness_db"):
                assert np.float32(x[key]) == np.float32(y[key])
    assert {e["id"] for e in all_examples(one, "synthetic_music", "test")} == {
        "test_00000000", "test_00000001"}


def test_synthetic_params_are_recorded_and_checked(synthetic_dirs, monkeypatch):
    one, _, _ = synthetic_dirs
    info = builders.dataset_info(str(one), "synthetic_music")
    assert info["params"] == {"sample_rate": SR, "clip_seconds": 0.5, "num_train": 8,
                              "num_test": 2, "seed": 0}
    assert info["splits"] == {"train": 8, "test": 2}
    again = builders.build_synthetic_music(synth_cfg(), str(one), progress=False)
    assert again["already_built"]
    with pytest.raises(DataError, match=r"holds synthetic_music built with num_train=8 .*"
                                        r"--overwrite"):
        builders.build_synthetic_music(synth_cfg(num_train=4), str(one), progress=False)
    shown = builders.show(str(one), "synthetic_music", "train", 3)
    assert len(shown) == 3 and all(isinstance(e["caption"], str) for e in shown)
    source = builders.open_split(str(one), "synthetic_music", "train")
    assert builders.captions(source, chunk=3) == [e["caption"] for e in source]


def test_overwrite_and_missing_dataset(tmp_path):
    builders.build_synthetic_music(synth_cfg(num_train=2, num_test=1, clip_seconds=0.1),
                                   str(tmp_path), progress=False)
    builders.build_synthetic_music(synth_cfg(num_train=3, num_test=1, clip_seconds=0.1),
                                   str(tmp_path), overwrite=True, progress=False)
    assert len(builders.open_split(str(tmp_path), "synthetic_music", "train")) == 3
    with pytest.raises(DataError, match="ldm-jax data build audio_folder --data-dir"):
        builders.open_split(str(tmp_path), "audio_folder", "train")
    with pytest.raises(DataError, match="no split 'valid'"):
        builders.open_split(str(tmp_path), "synthetic_music", "valid")
    with pytest.raises(DataError, match="unknown dataset"):
        builders.build("nope", synth_cfg(), str(tmp_path))


def tone(seconds, sr, channels=1, freq=440.0):
    t = np.arange(int(seconds * sr)) / sr
    x = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def make_folder(root, captions_format):
    """Good WAV/FLAC/48 kHz stereo files, one of each bad kind, and a captions file."""
    os.makedirs(root / "sub")
    sf.write(root / "good.wav", tone(0.3, SR), SR)
    sf.write(root / "sub" / "good.flac", tone(0.6, SR, freq=220.0), SR)  # longer than 0.4 s
    sf.write(root / "stereo48k.wav", tone(0.3, 48000, channels=2), 48000)
    sf.write(root / "bad.flac", tone(1.0, SR), SR)
    data = (root / "bad.flac").read_bytes()
    (root / "bad.flac").write_bytes(data[: len(data) // 3])
    sf.write(root / "empty.wav", np.zeros((0,), np.float32), SR)
    (root / "notes.wav").write_text("these are not audio samples\n")
    sf.write(root / "silent.wav", np.zeros((SR // 4,), np.float32), SR)
    (root / "README.txt").write_text("a folder of test clips\n")
    rows = [{"path": "good.wav", "caption": "a bright tone", "mood": "happy"},
            {"path": "sub/good.flac", "caption": "a low tone", "mood": "calm"},
            {"path": "missing.wav", "caption": "not here", "mood": "sad"}]
    if captions_format == "jsonl":
        with open(root / "captions.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    else:
        with open(root / "captions.csv", "w") as f:
            f.write("path,caption,mood\n")
            f.writelines(f"{r['path']},{r['caption']},{r['mood']}\n" for r in rows)


@pytest.fixture(scope="module", params=["jsonl", "csv"])
def folder_build(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"folder_{request.param}")
    make_folder(root / "music", request.param)
    data_dir = root / "data"
    lines = []
    summary = builders.build("audio_folder", folder_cfg(root / "music"), str(data_dir),
                             workers=1, progress=False, print_fn=lines.append)
    return root, data_dir, summary, lines


def test_folder_good_files_are_built(folder_build):
    _, data_dir, summary, _ = folder_build
    examples = {e["id"]: e for split in ("train", "test")
                for e in all_examples(data_dir, "audio_folder", split)}
    assert set(examples) == {"good.wav", "sub/good.flac", "stereo48k.wav"}
    assert sum(summary["splits"].values()) == 3 and summary["splits"]["test"] >= 1
    stereo = examples["stereo48k.wav"]["audio"]
    assert stereo.dtype == np.float32 and stereo.shape == (int(0.3 * SR), 1)
    assert 0.4 < np.max(np.abs(stereo)) < 0.6  # resampled, not attenuated or clipped
    flac = examples["sub/good.flac"]
    assert flac["audio"].shape == (int(0.4 * SR), 1) and summary["truncated"] == ["sub/good.flac"]
    assert flac["caption"] == "a low tone"
    assert json.loads(flac["attributes"]) == {"mood": "calm"}
    assert examples["stereo48k.wav"]["caption"] == ""
    assert examples["good.wav"]["seconds"] == pytest.approx(0.3)
    assert summary["ignored"] == ["README.txt"]


def test_folder_bad_files_are_reported(folder_build):
    _, _, summary, lines = folder_build
    reasons = {b["file"]: b["reason"] for b in summary["bad_files"]}
    assert set(reasons) - {"captions.jsonl:3", "captions.csv:4"} == {
        "bad.flac", "empty.wav", "notes.wav", "silent.wav"}
    assert reasons["empty.wav"] == "empty (0 samples)"
    assert reasons["silent.wav"].startswith("silent")
    assert "unreadable" in reasons["notes.wav"]
    assert "truncated" in reasons["bad.flac"]
    missing = [r for f, r in reasons.items() if f.startswith("captions.")]
    assert len(missing) == 1 and "missing.wav, which is missing" in missing[0]
    text = "\n".join(lines)
    assert text == builders.format_summary(summary)
    for name in reasons:
        assert name in text
    assert "truncated" in text and "skipped 5" in text


def test_folder_rebuild_rules(folder_build):
    root, data_dir, summary, _ = folder_build
    again = builders.build("audio_folder", folder_cfg(root / "music"), str(data_dir),
                           progress=False, print_fn=None)
    assert again["already_built"] and again["bad_files"] == summary["bad_files"]
    with pytest.raises(DataError, match="holds audio_folder built with max_seconds=0.4"):
        builders.build("audio_folder", folder_cfg(root / "music", max_seconds=1.0),
                       str(data_dir), progress=False)
    sf.write(root / "music" / "added.wav", tone(0.2, SR, freq=330.0), SR)
    with pytest.raises(DataError, match="source files changed"):
        builders.build("audio_folder", folder_cfg(root / "music"), str(data_dir), progress=False)
    rebuilt = builders.build("audio_folder", folder_cfg(root / "music"), str(data_dir),
                             overwrite=True, progress=False, print_fn=None)
    assert sum(rebuilt["splits"].values()) == 4 and not rebuilt["already_built"]


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="--config.data.source"):
        builders.build_audio_folder(folder_cfg(tmp_path / "nowhere"), str(tmp_path / "d"))
    (tmp_path / "only_bad").mkdir()
    (tmp_path / "only_bad" / "x.wav").write_text("nope")
    with pytest.raises(DataError, match="no usable audio.*x.wav"):
        builders.build_audio_folder(folder_cfg(tmp_path / "only_bad"), str(tmp_path / "d"),
                                    progress=False)
