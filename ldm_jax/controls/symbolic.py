"""Controls written instead of extracted: from a MIDI file or a dynamics curve in CSV.

From MIDI (`pretty_midi`), at the same frames as the audio features (frame t at t / frame_rate):
- melody: the pitch class of the highest note sounding in each frame (drum tracks ignored),
  unvoiced where none sounds;
- dynamics: the loudest sounding velocity in each frame in dB (40 log10(v / 127), the usual
  velocity-to-level curve, -60 dB where silent), smoothed like the audio dynamics;
- rhythm: beats and downbeats of the tempo map and time signatures.
From CSV: rows `time,db` (seconds, dB; a header row is allowed), linearly interpolated to the
frames and held constant beyond its ends.
"""

from __future__ import annotations

import csv
import io
import os

import numpy as np

from ldm_jax import paths
from ldm_jax.controls.beats import beat_grid
from ldm_jax.controls.features import ControlsError, FeatureConfig, savgol, smoothing_window

SILENT_DB = -60.0


def _read_midi(path: str):
    import pretty_midi
    if not paths.exists(path):
        raise ControlsError(f"{path}: no such MIDI file")
    try:
        return pretty_midi.PrettyMIDI(io.BytesIO(paths.read_bytes(path)))
    except Exception as e:  # pretty_midi/mido raise many kinds on a bad file
        raise ControlsError(f"{path}: not a readable MIDI file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None


def velocity_db(velocity) -> np.ndarray:
    """MIDI velocity (1-127) to level in dB: 40 log10(v / 127); 0 gives SILENT_DB."""
    v = np.asarray(velocity, np.float64)
    with np.errstate(divide="ignore"):
        db = 40.0 * np.log10(np.maximum(v, 0.0) / 127.0)
    return np.maximum(db, SILENT_DB)


def melody_from_notes(onsets, offsets, pitches, num_frames: int, frame_rate: float
                      ) -> dict[str, np.ndarray]:
    """The melody of a list of notes: in each frame the pitch class of the highest sounding note.

    Args:
      onsets, offsets: note start and end times in seconds, [notes].
      pitches: MIDI note numbers, [notes].
      num_frames: frames of the control; frame t is at t / frame_rate.
      frame_rate: frames per second.

    Returns:
      {"pitch_class": int [frames] (-1 where no note sounds), "voiced": bool [frames],
       "one_hot": float32 [frames, 12]}.
    """
    t = np.arange(int(num_frames))[:, None] / float(frame_rate)
    onsets, offsets = np.asarray(onsets, np.float64), np.asarray(offsets, np.float64)
    pitches = np.asarray(pitches, np.int64)
    if pitches.size:
        sounding = (t >= onsets[None, :]) & (t < offsets[None, :])
        top = np.max(np.where(sounding, pitches[None, :], -1), axis=1)
    else:
        top = np.full(int(num_frames), -1)
    voiced = top >= 0
    pitch_class = np.where(voiced, top % 12, -1)
    one_hot = np.zeros((int(num_frames), 12), np.float32)
    one_hot[np.flatnonzero(voiced), pitch_class[voiced]] = 1.0
    return {"pitch_class": pitch_class, "voiced": voiced, "one_hot": one_hot}


def controls_from_midi(path: str | os.PathLike, cfg: FeatureConfig, *,
                       seconds: float | None = None) -> dict:
    """Melody, dynamics and rhythm controls of a MIDI file.

    Args:
      path: a .mid file.
      cfg: the frame rate (and dynamics smoothing) of the controls.
      seconds: length of the controls; default the MIDI's end time.

    Returns:
      {"num_frames", "melody": {"pitch_class" int [frames] (-1 unvoiced), "voiced",
      "one_hot" [frames, 12]}, "dynamics": {"raw_db", "db"} [frames], "rhythm": `beat_grid`}.
    """
    pm = _read_midi(os.fspath(path))
    end = float(pm.get_end_time()) if seconds is None else float(seconds)
    frames = cfg.num_frames(int(round(end * cfg.sample_rate)))
    t = np.arange(frames) / cfg.frame_rate
    notes = [n for inst in pm.instruments if not inst.is_drum for n in inst.notes]
    melody = melody_from_notes([n.start for n in notes], [n.end for n in notes],
                               [n.pitch for n in notes], frames, cfg.frame_rate)
    loudest = np.zeros(frames)
    for n in notes:
        on = (t >= n.start) & (t < n.end)
        loudest = np.where(on, np.maximum(loudest, n.velocity), loudest)
    raw = velocity_db(loudest).astype(np.float32)
    smooth = np.asarray(savgol(raw, smoothing_window(cfg, frames), cfg.smooth_order))
    beats = np.asarray(pm.get_beats(), np.float64)
    downbeats = np.asarray(pm.get_downbeats(), np.float64)
    beats, downbeats = beats[beats < end], downbeats[downbeats < end]
    return {"num_frames": frames, "melody": melody,
            "dynamics": {"raw_db": raw, "db": smooth},
            "rhythm": beat_grid(beats, downbeats, frames, cfg.frame_rate)}


def dynamics_from_csv(path: str | os.PathLike, cfg: FeatureConfig,
                      num_frames: int | None = None) -> np.ndarray:
    """A dynamics curve (dB per frame, float32 [frames]) from a CSV of `time,db` rows.

    Args:
      path: the CSV; times in seconds, increasing; an optional header row.
      cfg: the frame rate.
      num_frames: frames to cover; default up to the last time given.
    """
    path = os.fspath(path)
    if not paths.exists(path):
        raise ControlsError(f"{path}: no such CSV file")
    rows = [r for r in csv.reader(paths.read_text(path).splitlines()) if r and any(r)]
    points = []
    for i, row in enumerate(rows):
        try:
            points.append((float(row[0]), float(row[1])))
        except (ValueError, IndexError):
            if i == 0:
                continue  # a header
            raise ControlsError(f"{path}: line {i + 1} is not 'time,db' ({','.join(row)})") \
                from None
    if not points:
        raise ControlsError(f"{path}: no 'time,db' rows")
    times, db = np.asarray(points, np.float64).T
    if np.any(np.diff(times) <= 0) or not np.all(np.isfinite(db)) or times[0] < 0:
        raise ControlsError(f"{path}: times must be non-negative and increasing and levels "
                            "finite")
    frames = num_frames or cfg.num_frames(int(round(times[-1] * cfg.sample_rate)))
    return np.interp(np.arange(frames) / cfg.frame_rate, times, db).astype(np.float32)
