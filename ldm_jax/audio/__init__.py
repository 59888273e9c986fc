"""Audio front end: STFT, mel spectrograms, resampling, loudness (pure JAX) and file I/O."""

from ldm_jax.audio.dsp import (
    amplitude_to_db,
    istft,
    log_mel,
    loudness_lufs,
    loudness_normalize,
    mel_filterbank,
    melspectrogram,
    peak_normalize,
    power_to_db,
    resample,
    resample_numpy,
    rms_db,
    stft,
)
from ldm_jax.audio.io import AudioReadError, AudioWriteError, audio_info, read_audio, write_audio

__all__ = [
    "AudioReadError", "AudioWriteError", "amplitude_to_db", "audio_info", "istft", "log_mel",
    "loudness_lufs", "loudness_normalize", "mel_filterbank", "melspectrogram", "peak_normalize",
    "power_to_db", "read_audio", "resample", "resample_numpy", "rms_db", "stft", "write_audio",
]
