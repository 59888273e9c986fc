"""The `latents` dataset: codec latents of every clip, with captions, attributes and statistics.

The third step of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models"): the trained autoencoder is frozen and the dataset is encoded once, so
the diffusion model trains on compact latents. Stored per clip: the continuous latents
(float32 `[frames, dim]`: the quantised `z` of an RVQ codec, the posterior mean of a KL codec),
the caption, every scalar or text attribute of the source example (instrument, key, mode,
tempo, loudness, id, ...) and the source example's index. Recorded beside them: per-channel mean
and standard deviation over the training frames and LDM's global `scale_factor` (the inverse
standard deviation of all training latent values), in the dataset metadata and in `stats.json`.

This module is the dataset's format and its readers; `codec.latents.encode_latents` writes it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

from ldm_jax import paths
from ldm_jax.data import DataError

NAME = "latents"
STATS_FILE = "stats.json"


@dataclasses.dataclass(frozen=True)
class LatentStats:
    """Statistics of the training latents and how to normalise with them.

    Attributes:
      mean: float32 [dim], per-channel mean over all training frames.
      std: float32 [dim], per-channel standard deviation.
      scale_factor: 1 / (standard deviation of all training latent values), LDM's scale factor.
      frame_rate: latent frames per second.
      sample_rate: the codec's audio sample rate.
      num_frames: training frames the statistics were computed on.
    """

    mean: np.ndarray
    std: np.ndarray
    scale_factor: float
    frame_rate: float
    sample_rate: int
    num_frames: int

    @property
    def latent_dim(self) -> int:
        return int(self.mean.shape[0])

    def normalize(self, z, mode: str = "global"):
        """Codec latents [..., dim] -> diffusion space: `z * scale_factor` ("global", as LDM)
        or `(z - mean) / std` per channel ("channel")."""
        if mode == "global":
            return z * np.float32(self.scale_factor)
        if mode == "channel":
            return (z - self.mean) / self.std
        raise DataError(f"latent normalisation {mode!r} is unknown; use 'global' or 'channel'")

    def denormalize(self, x, mode: str = "global"):
        """Inverse of `normalize`: diffusion space -> codec latents."""
        if mode == "global":
            return x / np.float32(self.scale_factor)
        if mode == "channel":
            return x * self.std + self.mean
        raise DataError(f"latent normalisation {mode!r} is unknown; use 'global' or 'channel'")

    def to_dict(self) -> dict:
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std],
                "scale_factor": float(self.scale_factor), "frame_rate": float(self.frame_rate),
                "sample_rate": int(self.sample_rate), "num_frames": int(self.num_frames),
                "latent_dim": self.latent_dim}

    @classmethod
    def from_dict(cls, d: dict) -> LatentStats:
        return cls(mean=np.asarray(d["mean"], np.float32), std=np.asarray(d["std"], np.float32),
                   scale_factor=float(d["scale_factor"]), frame_rate=float(d["frame_rate"]),
                   sample_rate=int(d["sample_rate"]), num_frames=int(d["num_frames"]))


class Moments:
    """Running float64 sums of latent frames, mergeable across hosts."""

    def __init__(self, dim: int):
        self.count = 0
        self.total = np.zeros(dim, np.float64)
        self.squares = np.zeros(dim, np.float64)

    def add(self, z: np.ndarray):
        z = np.asarray(z, np.float64)
        self.count += z.shape[0]
        self.total += z.sum(0)
        self.squares += np.square(z).sum(0)

    def merge(self, other: Moments):
        self.count += other.count
        self.total += other.total
        self.squares += other.squares

    def to_dict(self) -> dict:
        return {"count": self.count, "total": self.total.tolist(),
                "squares": self.squares.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Moments:
        m = cls(len(d["total"]))
        m.count = int(d["count"])
        m.total = np.asarray(d["total"], np.float64)
        m.squares = np.asarray(d["squares"], np.float64)
        return m

    def stats(self, frame_rate: float, sample_rate: int) -> LatentStats:
        if self.count == 0:
            raise DataError("no training latents to compute statistics from; the train split "
                            "is empty")
        mean = self.total / self.count
        var = np.maximum(self.squares / self.count - mean**2, 0.0)
        global_mean = self.total.sum() / (self.count * len(self.total))
        global_var = max(self.squares.sum() / (self.count * len(self.total)) - global_mean**2,
                         0.0)
        return LatentStats(mean=mean.astype(np.float32),
                           std=np.sqrt(np.maximum(var, 1e-12)).astype(np.float32),
                           scale_factor=float(1.0 / math.sqrt(max(global_var, 1e-12))),
                           frame_rate=float(frame_rate), sample_rate=int(sample_rate),
                           num_frames=int(self.count))


def is_complete(latents_dir: str) -> bool:
    """Whether LATENTS_DIR holds a finished latents dataset with its statistics."""
    from ldm_jax.data.tfds_common import dataset_path

    return paths.isfile(os.path.join(latents_dir, STATS_FILE)) and paths.isfile(
        os.path.join(dataset_path(latents_dir, NAME), "dataset_info.json"))


def read_stats(latents_dir: str) -> LatentStats:
    """The statistics of the latents dataset in LATENTS_DIR (its `stats.json`).

    Raises:
      DataError: LATENTS_DIR holds no complete latents dataset.
    """
    path = os.path.join(latents_dir, STATS_FILE)
    if not paths.isfile(path):
        raise DataError(f"no latents statistics in {latents_dir}; run `ldm-jax latents encode` "
                        "first")
    return LatentStats.from_dict(json.loads(paths.read_text(path)))


def read_metadata(latents_dir: str) -> dict:
    """`stats.json` as written: statistics plus `latent`, `codec_step`, `source`, `data_dir`."""
    return json.loads(paths.read_text(os.path.join(latents_dir, STATS_FILE)))
