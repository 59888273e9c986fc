"""Audio file reading and writing through soundfile (libsndfile): WAV, FLAC, OGG/Vorbis, MP3.

Audio comes back as float32 `[time, channels]` in [-1, 1]. Every way a file can fail to read
(missing, empty, not audio, corrupt, truncated, an encoding this libsndfile lacks) raises
`AudioReadError` with one line naming the file and the reason, so a dataset builder can skip or
report it instead of dying in libsndfile. Resampling on read uses `resample_numpy`, the NumPy twin
of `dsp.resample`, so loaders need not touch JAX. Paths may be remote (`gs://`, see
`ldm_jax.paths`): libsndfile then reads and writes an in-memory copy of the file.
"""

from __future__ import annotations

import io
import os
import uuid

import numpy as np
import soundfile as sf

from ldm_jax import paths
from ldm_jax.audio.resample import resample_numpy

# Suffix -> (libsndfile format, default subtype for writing).
_FORMATS = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
    ".mp3": ("MP3", "MPEG_LAYER_III"),
}
# Decoders whose declared length is only an estimate (MP3 without a gapless header), so a
# shorter decode is not evidence of truncation.
_ESTIMATED_LENGTH = {"MP3"}


class AudioReadError(ValueError):
    """An audio file cannot be read; the one-line message names the file and the reason."""


class AudioWriteError(ValueError):
    """Audio cannot be written as asked; the one-line message says what to change."""


def _one_line(text: str) -> str:
    text = " ".join(str(text).split()).removeprefix("Error : ")
    return text or "unknown libsndfile error"


def _check_readable(path: str) -> None:
    if not paths.exists(path):
        raise AudioReadError(f"{path}: no such file")
    if paths.isdir(path):
        raise AudioReadError(f"{path}: is a directory, not an audio file")
    if paths.getsize(path) == 0:
        raise AudioReadError(f"{path}: file is empty (0 bytes)")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in _FORMATS:
        fmt = _FORMATS[suffix][0]
        if fmt not in sf.available_formats():
            raise AudioReadError(
                f"{path}: this libsndfile ({sf.__libsndfile_version__}) cannot decode {fmt}; "
                "install soundfile>=0.12.1, whose wheels bundle libsndfile>=1.1 with MP3 and OGG")


def _open(path: str) -> sf.SoundFile:
    try:
        return sf.SoundFile(io.BytesIO(paths.read_bytes(path)) if paths.is_remote(path) else path)
    except sf.LibsndfileError as e:
        raise AudioReadError(f"{path}: not a readable audio file "
                             f"({_one_line(e.error_string)})") from None
    except (RuntimeError, OSError, TypeError) as e:
        raise AudioReadError(f"{path}: cannot be opened ({_one_line(e)})") from None


def audio_info(path: str | os.PathLike) -> tuple[int, int, int]:
    """Sample rate, channels and frames of an audio file, read from its header.

    Args:
      path: audio file.

    Returns:
      (sample_rate, channels, frames); for MP3 the frame count may be an estimate.

    Raises:
      AudioReadError: the file is missing, empty or not readable audio.
    """
    path = os.fspath(path)
    _check_readable(path)
    with _open(path) as f:
        return int(f.samplerate), int(f.channels), int(f.frames)


def read_audio(path: str | os.PathLike, sample_rate: int | None = None,
               mono: bool = True) -> tuple[np.ndarray, int]:
    """Reads an audio file as float32 `[time, channels]`.

    Args:
      path: WAV, FLAC, OGG, MP3 or any other format libsndfile reads.
      sample_rate: resample to this rate (band-limited, as `dsp.resample`); None keeps the
        file's rate.
      mono: average the channels into one.

    Returns:
      (audio float32 [time, channels] (channels = 1 when mono), sample_rate).

    Raises:
      AudioReadError: the file is missing, empty, not audio, truncated or corrupt, or holds no
        samples.
    """
    path = os.fspath(path)
    _check_readable(path)
    with _open(path) as f:
        declared, file_rate, fmt = int(f.frames), int(f.samplerate), f.format
        try:
            audio = f.read(dtype="float32", always_2d=True)
        except sf.LibsndfileError as e:
            raise AudioReadError(f"{path}: decoding failed, the file is corrupt or truncated "
                                 f"({_one_line(e.error_string)})") from None
        except (RuntimeError, OSError, ValueError) as e:
            raise AudioReadError(f"{path}: decoding failed ({_one_line(e)})") from None
    if audio.shape[0] == 0:
        raise AudioReadError(f"{path}: contains no audio samples")
    if audio.shape[0] < declared and fmt not in _ESTIMATED_LENGTH:
        raise AudioReadError(f"{path}: truncated, the header declares {declared} frames but "
                             f"only {audio.shape[0]} decode")
    if not np.all(np.isfinite(audio)):
        raise AudioReadError(f"{path}: contains NaN or infinite samples")
    if mono and audio.shape[1] > 1:
        audio = audio.mean(axis=1, keepdims=True)
    if sample_rate is not None and int(sample_rate) != file_rate:
        audio = resample_numpy(audio, file_rate, int(sample_rate), axis=0)
        file_rate = int(sample_rate)
    return np.ascontiguousarray(audio, np.float32), file_rate


def write_audio(path: str | os.PathLike, audio, sample_rate: int,
                subtype: str | None = None) -> None:
    """Writes audio to a file whose suffix picks the format (.wav, .flac, .ogg, .mp3).

    The file is written beside its destination and renamed into place, so an interrupted write
    never leaves a partial file under `path`. Parent directories are created.

    Args:
      path: destination; the suffix selects the format.
      audio: float samples in [-1, 1], [time] or [time, channels] (NumPy or JAX).
      sample_rate: sample rate in Hz.
      subtype: libsndfile subtype (e.g. "FLOAT", "PCM_24"); defaults to 16-bit PCM for WAV and
        FLAC, Vorbis for OGG, MPEG layer III for MP3. Integer and lossy subtypes clip to [-1, 1].

    Raises:
      AudioWriteError: unknown suffix, bad shape, non-finite samples or unsupported subtype.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _FORMATS or _FORMATS[suffix][0] not in sf.available_formats():
        usable = sorted(s for s, (f, _) in _FORMATS.items() if f in sf.available_formats())
        raise AudioWriteError(f"{path}: cannot write '{suffix}' audio; use one of {usable}")
    fmt, default_subtype = _FORMATS[suffix]
    subtype = subtype or default_subtype
    if not sf.check_format(fmt, subtype):
        raise AudioWriteError(f"{path}: {fmt} cannot hold subtype {subtype}; choose one of "
                              f"{sorted(sf.available_subtypes(fmt))}")
    audio = np.asarray(audio, np.float32)
    if audio.ndim == 1:
        audio = audio[:, None]
    if audio.ndim != 2 or audio.shape[1] > audio.shape[0]:
        raise AudioWriteError(f"{path}: audio of shape {audio.shape} is not [time] or "
                              "[time, channels]; transpose [channels, time] audio first")
    if audio.shape[0] == 0:
        raise AudioWriteError(f"{path}: audio has no samples")
    if not np.all(np.isfinite(audio)):
        raise AudioWriteError(f"{path}: audio contains NaN or infinite samples")
    if subtype not in ("FLOAT", "DOUBLE"):
        audio = np.clip(audio, -1.0, 1.0)
    if paths.is_remote(path):  # an object appears whole when written: no temporary name
        buffer = io.BytesIO()
        sf.write(buffer, audio, int(sample_rate), subtype=subtype, format=fmt)
        paths.write_bytes(path, buffer.getvalue())
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # A unique sibling name (not mkstemp, which would leave the file mode 0600).
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}{suffix}")
    try:
        sf.write(tmp, audio, int(sample_rate), subtype=subtype, format=fmt)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
