"""MusicLDM's beat-synchronous latent mixup (Chen et al. 2023), an LDM training option.

MusicLDM mixes pairs of training clips whose tempos are close, aligned at their downbeats, to
show the model new music rather than copies of the training set. Here, in latent space (their
BLM variant): for an example chosen with probability `train.mixup`, a partner is drawn among the
training clips whose tempo is within `train.mixup_tempo_tolerance` (relative) of its own; the
partner's latents are read from the window whose downbeat lands on the example's first downbeat
(`align_offset`), and the two are mixed as `z = lam z1 + (1 - lam) z2` with `lam ~ Beta(a, a)`
(`train.mixup_beta`, 5 in MusicLDM) where the shifted partner has frames (at least half the
window, else the example stays unmixed); elsewhere the example is kept. The mix is decoded by
the codec and its CLAP audio embedding conditions the U-Net (`train.condition_on_audio`:
MusicLDM's audio-embedding training, in which a mix needs no caption).

Tempo and downbeats of every training clip come from the controls package's beat tracker run
once on the source audio and cached beside the checkpoints. The draws of a batch are seeded by
its clips (their source indices and crop offsets) and the run's seed, so a resumed run mixes as
the uninterrupted one would.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence

import numpy as np

from ldm_jax import parallel, paths
from ldm_jax.diffusion.schedules import DiffusionError


def tempo_of(beats: np.ndarray) -> float:
    """Tempo in BPM from beat times (the median inter-beat interval); NaN under two beats."""
    beats = np.asarray(beats, np.float64)
    if beats.size < 2:
        return float("nan")
    return float(60.0 / np.median(np.diff(beats)))


def tempo_partners(tempos: Sequence[float], tolerance: float) -> list[np.ndarray]:
    """For each clip, the other clips whose tempo is within TOLERANCE (relative) of its own."""
    t = np.asarray(tempos, np.float64)
    ok = np.isfinite(t)
    close = np.abs(t[:, None] - t[None, :]) <= tolerance * np.where(ok, t, np.inf)[:, None]
    close &= ok[:, None] & ok[None, :]
    np.fill_diagonal(close, False)
    return [np.flatnonzero(row) for row in close]


def align_offset(downbeat: float, partner_downbeats: np.ndarray, frame_rate: float
                 ) -> int | None:
    """The partner's latent frame at which a window starts whose downbeat falls on the
    example's DOWNBEAT (seconds from its window's start): of the partner's downbeats, the one
    needing the smallest shift (the window may reach past either end of the partner). None
    when the partner has no downbeat.

    The partner downbeat at `d` lands at `d - offset / frame_rate` in the window: the offset is
    `round((d - downbeat) * frame_rate)`, so the two coincide within half a frame.
    """
    offsets = [int(round((d - downbeat) * frame_rate))
               for d in np.asarray(partner_downbeats, np.float64)]
    return min(offsets, key=abs) if offsets else None


def clip_rhythm(source, latents_dir: str, features, cache: str, *, progress: bool = True
                ) -> dict[str, list]:
    """Tempo (BPM) and downbeat times of every clip of a latents split, from the audio the
    latents were encoded from (`source_index`), cached in CACHE (.npz)."""
    from tqdm.auto import tqdm

    from ldm_jax.controls import controls_from_audio
    from ldm_jax.data import builders, latents

    key = {"examples": len(source), "features": features.to_dict()}
    if paths.isfile(cache) and paths.isfile(cache + ".json") and \
            json.loads(paths.read_text(cache + ".json")) == key:
        stored = np.load(io.BytesIO(paths.read_bytes(cache)))
        return {"tempo": list(stored["tempo"]),
                "downbeats": [stored[f"d{i}"] for i in range(len(source))]}
    meta = latents.read_metadata(latents_dir)
    audio = builders.open_split(meta["data_dir"], meta["source"], source.split)
    tempos, downbeats = [], []
    for i in tqdm(range(len(source)), desc="beats", leave=False,
                  disable=not progress or not parallel.is_leader()):
        clip = np.asarray(audio[int(source[i]["source_index"])]["audio"], np.float32)
        clip = clip.mean(axis=-1) if clip.ndim == 2 else clip
        rhythm = controls_from_audio(clip, features)["rhythm"]
        tempos.append(tempo_of(rhythm["beats"]))
        downbeats.append(np.asarray(rhythm["downbeats"], np.float64))
    if parallel.is_leader():
        buffer = io.BytesIO()
        np.savez(buffer, tempo=np.asarray(tempos),
                 **{f"d{i}": d for i, d in enumerate(downbeats)})
        paths.write_bytes(cache, buffer.getvalue())
        paths.write_text(cache + ".json", json.dumps(key))
    return {"tempo": tempos, "downbeats": downbeats}


class Mixer:
    """Host side: mixes chosen rows of a prepared latent batch with tempo-close partners.

    Args:
      source: the latents split (random access to partners' latents).
      rhythm: `clip_rhythm` of it.
      scale: `latents -> normalised latents` (the LDM's scaling of a partner's latents).
      frame_rate: latent frames per second.
      probability, tolerance, beta: `train.mixup`, `train.mixup_tempo_tolerance`,
        `train.mixup_beta`.
      seed: the run's seed.
    """

    def __init__(self, source, rhythm: dict, scale, frame_rate: float, *, probability: float,
                 tolerance: float, beta: float, seed: int):
        if not 0.0 <= probability <= 1.0 or tolerance < 0 or beta <= 0:
            raise DiffusionError("train.mixup must be in [0, 1], train.mixup_tempo_tolerance "
                                 ">= 0 and train.mixup_beta > 0")
        self.source, self.scale, self.rate = source, scale, float(frame_rate)
        self.downbeats = rhythm["downbeats"]
        self.partners = tempo_partners(rhythm["tempo"], tolerance)
        self.probability, self.beta, self.seed = probability, beta, int(seed)

    def __call__(self, latents: np.ndarray, mask: np.ndarray, indices: np.ndarray,
                 starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
        """Mixes rows of a batch.

        Args:
          latents: normalised latents [B, T, D] (zero past each mask).
          mask: bool [B, T].
          indices: each row's example index in the split [B].
          starts: each row's crop offset in latent frames [B].

        Returns:
          (latents, mask, mixed bool [B], {"lam": [B], "partner": [B] (-1 unmixed),
          "offset": [B]}).
        """
        rng = np.random.default_rng([self.seed, *map(int, indices), *map(int, starts)])
        out, out_mask = latents.copy(), mask.copy()
        b, length = latents.shape[:2]
        lam = np.ones(b)
        partner, offsets = np.full(b, -1), np.zeros(b, int)
        mixed = np.zeros(b, bool)
        for row in range(b):
            i = int(indices[row])
            if rng.random() >= self.probability or not len(self.partners[i]):
                continue
            j = int(rng.choice(self.partners[i]))
            start = int(starts[row]) / self.rate
            own = self.downbeats[i][self.downbeats[i] >= start] - start
            if not own.size:
                continue
            z = np.asarray(self.source[j]["latents"], np.float32)
            offset = align_offset(float(own[0]), self.downbeats[j], self.rate)
            if offset is None:
                continue
            frames = offset + np.arange(length)
            inside = (frames >= 0) & (frames < z.shape[0])
            if inside.mean() < 0.5:
                continue
            window = np.zeros((length, z.shape[1]), np.float32)
            window[inside] = self.scale(z[frames[inside]])
            lam[row] = rng.beta(self.beta, self.beta)
            mix = lam[row] * latents[row] + (1.0 - lam[row]) * window
            out[row] = np.where(inside[:, None], mix, latents[row]) * mask[row][:, None]
            partner[row], offsets[row], mixed[row] = j, offset, True
        return out, out_mask, mixed, {"lam": lam, "partner": partner, "offset": offsets}


class WithIndex:
    """A split whose examples carry their own index (`index`), for `Mixer`."""

    def __init__(self, source):
        self.source = source
        self.split = getattr(source, "split", None)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return {**self.source[i], "index": np.int64(i)}

    def __getitems__(self, indices):
        return [self[i] for i in indices]
