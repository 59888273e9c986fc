"""Controls of a clip or a file in one form, whatever their source, and their JSON and plot.

`controls_from_audio` runs the jitted features (`features.extract`) and the host-side beat
tracking; `controls_from_file` dispatches on the extension (audio, .mid/.midi, .csv); both return
the form `symbolic.controls_from_midi` does, so a written control and an extracted one compare
frame for frame. `to_json` keeps what a user needs to read or edit a control.
"""

from __future__ import annotations

import os

import numpy as np

from ldm_jax.audio.io import read_audio
from ldm_jax.controls.beats import beat_grid, estimate_downbeats, track_beats
from ldm_jax.controls.features import ControlsError, FeatureConfig, extract
from ldm_jax.controls.symbolic import controls_from_midi, dynamics_from_csv

MIDI_EXTENSIONS = (".mid", ".midi")


def controls_from_audio(audio: np.ndarray, cfg: FeatureConfig, *,
                        beats_per_bar: int = 4) -> dict:
    """Melody, dynamics and rhythm of one mono clip [time] (see `symbolic.controls_from_midi`
    for the form), plus the chroma and onset envelope they come from."""
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 1:
        raise ControlsError(f"one mono clip [time] is analysed at a time, got shape {audio.shape}")
    if audio.size < cfg.n_fft // 2 + 1:
        raise ControlsError(f"clip of {audio.size} samples is shorter than half an FFT "
                            f"({cfg.n_fft // 2 + 1}); give at least "
                            f"{(cfg.n_fft // 2 + 1) / cfg.sample_rate:.3f} s")
    f = {k: {n: np.asarray(a) for n, a in v.items()} if isinstance(v, dict) else np.asarray(v)
         for k, v in extract(audio, cfg).items()}
    frames = f["onset"].shape[-1]
    beats = track_beats(f["onset"], cfg)
    downbeats = estimate_downbeats(beats, f["onset"], cfg, harmony=f["harmony"],
                                   beats_per_bar=beats_per_bar)
    return {"num_frames": frames, "melody": f["melody"], "dynamics": f["dynamics"],
            "rhythm": beat_grid(beats, downbeats, frames, cfg.frame_rate), "onset": f["onset"]}


def controls_from_file(path: str | os.PathLike, *, frame_rate: float,
                       sample_rate: int | None = None, beats_per_bar: int = 4) -> dict:
    """Controls of an audio file (extracted), a MIDI file (written) or a CSV dynamics curve.

    Args:
      path: .wav/.flac/.mp3/.ogg, .mid/.midi, or .csv (`time,db` rows).
      frame_rate: control frames per second.
      sample_rate: resample audio to this rate first (default: the file's); for MIDI and CSV
        the rate the frame grid is defined at (default 16 kHz).
      beats_per_bar: for the downbeat estimate of audio.

    Returns:
      {"source", "frame_rate", "num_frames", and "melody", "dynamics", "rhythm" where the
      source defines them}.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in MIDI_EXTENSIONS or ext == ".csv":
        cfg = FeatureConfig(sample_rate=int(sample_rate or 16000), frame_rate=frame_rate)
        if ext == ".csv":
            db = dynamics_from_csv(path, cfg)
            out = {"num_frames": int(db.shape[0]), "dynamics": {"raw_db": db, "db": db}}
        else:
            out = controls_from_midi(path, cfg)
        return {"source": "midi" if ext != ".csv" else "csv", "frame_rate": cfg.frame_rate,
                **out}
    audio, rate = read_audio(path, sample_rate)
    cfg = FeatureConfig(sample_rate=rate, frame_rate=frame_rate)
    return {"source": "audio", "frame_rate": cfg.frame_rate,
            **controls_from_audio(audio[:, 0], cfg, beats_per_bar=beats_per_bar)}


def to_json(controls: dict) -> dict:
    """The JSON form: per-frame lists and times in seconds, rounded for reading."""
    out = {"source": controls.get("source", "audio"), "frame_rate": controls["frame_rate"],
           "num_frames": int(controls["num_frames"])}
    if "melody" in controls:
        out["melody"] = {"pitch_class": [int(p) for p in controls["melody"]["pitch_class"]]}
    if "dynamics" in controls:
        out["dynamics_db"] = [round(float(x), 3) for x in controls["dynamics"]["db"]]
    if "rhythm" in controls:
        r = controls["rhythm"]
        out["beats"] = [round(float(t), 4) for t in r["beats"]]
        out["downbeats"] = [round(float(t), 4) for t in r["downbeats"]]
    return out


def plot(controls: dict, path: str | os.PathLike) -> None:
    """A figure of the controls (pitch classes, dynamics, beats) written to PNG `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.arange(int(controls["num_frames"])) / float(controls["frame_rate"])
    panels = [k for k in ("melody", "dynamics", "rhythm") if k in controls]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.2 * len(panels)), sharex=True,
                             squeeze=False)
    for ax, name in zip(axes[:, 0], panels):
        if name == "melody":
            pc = np.asarray(controls["melody"]["pitch_class"], float)
            ax.scatter(t[pc >= 0], pc[pc >= 0], s=4)
            ax.set_yticks(range(12), ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A",
                                      "A#", "B"])
            ax.set_ylabel("melody")
        elif name == "dynamics":
            ax.plot(t, controls["dynamics"]["db"])
            ax.set_ylabel("dB")
        else:
            r = controls["rhythm"]
            if "onset" in controls:
                onset = np.asarray(controls["onset"])
                ax.plot(t, onset / max(float(onset.max()), 1e-9), lw=0.8)
            for b in r["beats"]:
                ax.axvline(b, color="tab:orange", lw=0.8)
            for b in r["downbeats"]:
                ax.axvline(b, color="tab:red", lw=1.6)
            ax.set_ylabel("rhythm")
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)
