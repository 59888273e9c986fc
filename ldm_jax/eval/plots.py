"""Figures for `data show`, TensorBoard and the HTML report: log-mel spectrograms, loss curves."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ldm_jax import paths  # noqa: E402


def log_mel_image(audio: np.ndarray, sample_rate: int, n_mels: int = 80) -> np.ndarray:
    """Log-mel spectrogram in dB, [n_mels, frames], from the project's own DSP."""
    from ldm_jax.audio import dsp
    n_fft = 1024 if sample_rate >= 16000 else 512
    mel = dsp.melspectrogram(np.asarray(audio, np.float32).reshape(-1), sample_rate, n_fft=n_fft,
                             hop_length=n_fft // 4, n_mels=n_mels)
    return np.asarray(dsp.power_to_db(mel, ref=float(np.max(mel)) + 1e-12)).T


def save_log_mel_grid(path: str, audios: Sequence[np.ndarray], titles: Sequence[str],
                      sample_rate: int):
    """One log-mel panel per clip, stacked vertically, titled with its caption."""
    n = max(len(audios), 1)
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.2 * n), squeeze=False)
    for ax, audio, title in zip(axes[:, 0], audios, titles):
        img = log_mel_image(audio, sample_rate)
        seconds = len(np.asarray(audio).reshape(-1)) / sample_rate
        ax.imshow(img, origin="lower", aspect="auto", cmap="magma", vmin=-80, vmax=0,
                  extent=(0, seconds, 0, img.shape[0]))
        ax.set_title(title[:110], fontsize=8)
        ax.set_ylabel("mel bin", fontsize=7)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("seconds", fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def spectrogram_rgb(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """A log-mel spectrogram as an RGB uint8 image [H, W, 3] for TensorBoard."""
    img = log_mel_image(audio, sample_rate)
    norm = np.clip((img + 80.0) / 80.0, 0.0, 1.0)[::-1]
    return (matplotlib.colormaps["magma"](norm)[..., :3] * 255).astype(np.uint8)


def save_curves(path: str, history: Sequence[dict], keys: Sequence[str], title: str = ""):
    """Line plot of logged metrics against step."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for key in keys:
        pts = [(r["step"], r[key]) for r in history if key in r and np.isfinite(r[key])]
        if pts:
            ax.plot(*zip(*pts), label=key.split("/", 1)[-1])
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: str):
    """Writes FIG as a PNG to a local or remote (gs://) PATH and closes it."""
    if paths.is_remote(path):
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=90, format="png")
        paths.write_bytes(path, buffer.getvalue())
    else:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=90)
    plt.close(fig)
