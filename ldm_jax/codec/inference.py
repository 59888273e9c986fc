"""Using a trained or imported codec: load it, encode and decode files, evaluate it.

A codec directory (`W/codec`, or the `--out` of `codec import-dac` / `codec import-encodec`)
holds orbax checkpoints under `checkpoints/` and the model config beside them
(`checkpoints/model_config.json`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import parallel, paths
from ldm_jax.audio import loudness
from ldm_jax.checkpoint import (
    MODEL_CONFIG,
    Checkpointer,
    CheckpointError,
    read_export,
    read_params,
)
from ldm_jax.codec import losses, quantize
from ldm_jax.codec.convert import import_dac
from ldm_jax.codec.encodec_import import import_encodec
from ldm_jax.codec.model import PRESETS, Codec, CodecConfig, init_variables, make_codec
from ldm_jax.codec.quantize import STATS, CodecError
from ldm_jax.config import ConfigError
from ldm_jax.controls.metrics import bootstrap_interval


def codec_dir(path: str) -> str:
    """Accepts a workdir W (uses W/codec) or a codec directory itself."""
    for candidate in (path, os.path.join(path, "codec")):
        if paths.isfile(os.path.join(candidate, "checkpoints", MODEL_CONFIG)):
            return candidate
    raise CheckpointError(f"no trained codec in {path}: run `ldm-jax train codec --workdir W`, "
                          "`ldm-jax codec import-dac WEIGHTS.pth --out DIR` or `ldm-jax codec "
                          "import-encodec WEIGHTS.th --out DIR` first")


def segment_bounds(num_samples: int, segment_length: int, stride: int) -> list[tuple[int, int]]:
    """EnCodec's segments of a clip: `(offset, length)` for offsets `0, stride, 2 stride, ...`
    below `num_samples`, each `segment_length` long or cut by the clip's end."""
    return [(o, min(segment_length, num_samples - o)) for o in range(0, num_samples, stride)]


def linear_overlap_add(frames: Sequence[np.ndarray], stride: int) -> np.ndarray:
    """EnCodec's overlap-add of decoded segments with triangular weights.

    Each segment is weighted by a triangle peaking at its middle (of the first segment's
    length, cut for shorter ones), the weighted segments are summed at multiples of `stride`,
    and the sum is divided by the summed weights: where two segments overlap, the output fades
    linearly from the first to the second; where one covers a sample alone, it is kept as is.

    Args:
      frames: `[B, T_i, C]` decoded segments, all but the last of the same length.
      stride: samples between segment starts.

    Returns:
      `[B, stride * (n - 1) + T_last, C]`.
    """
    length = frames[0].shape[1]
    t = np.linspace(0.0, 1.0, length + 2, dtype=np.float32)[1:-1]
    weight = (0.5 - np.abs(t - 0.5)).astype(np.float32)
    total = stride * (len(frames) - 1) + frames[-1].shape[1]
    out = np.zeros((frames[0].shape[0], total, frames[0].shape[2]), np.float32)
    weights = np.zeros((total,), np.float32)
    for i, frame in enumerate(frames):
        n = frame.shape[1]
        out[:, i * stride:i * stride + n] += weight[:n, None] * frame
        weights[i * stride:i * stride + n] += weight[:n]
    return out / weights[None, :, None]


class LoadedCodec:
    """A codec with its variables and jitted encode/decode, for files and evaluation.

    `encode` / `decode` treat each clip as one piece. A codec trained on segments
    (`config.segment_seconds`, EnCodec 48 kHz) is used as EnCodec uses it by `encode_segments`
    / `decode_segments` (and `roundtrip`): clips cut into overlapping segments, each encoded on
    its own (with its own volume scale), decoded segments joined by `linear_overlap_add`.
    """

    def __init__(self, codec: Codec, variables: dict):
        self.codec, self.variables = codec, variables
        self.config: CodecConfig = codec.config
        self._encode = jax.jit(lambda v, x, n: codec.apply(v, x, n_quantizers=n,
                                                           method=Codec.encode),
                               static_argnums=2)
        self._decode = jax.jit(lambda v, z, s: codec.apply(v, z, s, method=Codec.decode))
        self._from_codes = jax.jit(lambda v, c: codec.apply(v, c, method=Codec.from_codes))

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def encode(self, audio: np.ndarray, n_codebooks: int | None = None) -> dict:
        """Audio [B, T, C] -> {"z": [B, T', D], "codes": [B, T', K] (quantised codecs),
        "scale": [B] (codecs that `normalize`; `decode` needs it back)}."""
        z, aux = self._encode(self.variables, jnp.asarray(audio, jnp.float32), n_codebooks)
        out = {"z": np.asarray(z)}
        for key in ("codes", "mean", "scale"):
            if key in aux:
                out[key] = np.asarray(aux[key])
        return out

    @staticmethod
    def _scale(scale, batch: int):
        return None if scale is None else jnp.broadcast_to(jnp.asarray(scale, jnp.float32),
                                                           (batch,))

    def decode(self, z: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
        """Latents [B, T', D] (and `encode`'s `scale` [B]) -> audio [B, samples, C].

        A codec that normalises (`config.normalize`) decodes at the normalised volume (RMS
        about 1) unless given the `scale` its `encode` returned, e.g. for generated latents.
        """
        z = jnp.asarray(z, jnp.float32)
        return np.asarray(self._decode(self.variables, z, self._scale(scale, z.shape[0])))

    def decode_codes(self, codes: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
        """Codes [B, T', k] (and `encode`'s `scale` [B]) -> audio [B, samples, C]."""
        return self.decode(self._from_codes(self.variables, jnp.asarray(codes, jnp.int32)),
                           scale)

    @property
    def segment(self) -> tuple[int, int] | None:
        """`(segment_length, stride)` in samples as EnCodec computes them, or None (whole
        clips)."""
        c = self.config
        if c.segment_seconds <= 0:
            return None
        length = int(c.segment_seconds * c.sample_rate)
        return length, max(1, int((1 - c.segment_overlap) * length))

    def encode_segments(self, audio: np.ndarray, n_codebooks: int | None = None) -> dict:
        """Audio [B, T, C] -> `encode`'s outputs per segment (one segment without
        `config.segment_seconds`), concatenated along frames, with `segment_frames` [n] (the
        frames of each segment) and `scale` [B, n] for a codec that normalises."""
        length, stride = self.segment or (audio.shape[1], audio.shape[1])
        parts = [self.encode(audio[:, o:o + n], n_codebooks)
                 for o, n in segment_bounds(audio.shape[1], length, stride)]
        out = {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0]
               if k != "scale"}
        if "scale" in parts[0]:
            out["scale"] = np.stack([p["scale"] for p in parts], axis=1)
        out["segment_frames"] = np.asarray([p["z"].shape[1] for p in parts], np.int32)
        return out

    def decode_segments(self, segment_frames: Sequence[int], *, z: np.ndarray | None = None,
                        codes: np.ndarray | None = None,
                        scale: np.ndarray | None = None) -> np.ndarray:
        """`encode_segments`' latents `z` or `codes` (and `scale` [B, n]) -> audio [B, samples,
        C], each segment decoded on its own and the segments overlap-added."""
        bounds = np.cumsum([0, *segment_frames])
        data = z if codes is None else codes
        if data is None or bounds[-1] != data.shape[1]:
            raise CodecError(f"segment_frames add up to {bounds[-1]} frames; the "
                             f"{'codes' if codes is not None else 'latents'} have "
                             f"{None if data is None else data.shape[1]}")
        decode = self.decode if codes is None else self.decode_codes
        pieces = [decode(data[:, a:b], None if scale is None else np.asarray(scale)[:, i])
                  for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
        stride = (self.segment or (0, 0))[1]
        return pieces[0] if len(pieces) == 1 else linear_overlap_add(pieces, stride)

    def roundtrip(self, audio: np.ndarray, n_codebooks: int | None = None) -> np.ndarray:
        """Audio [B, T, C] encoded and decoded as the codec is meant to be used (in segments
        where it has them, with its volume scale), cut to T samples."""
        encoded = self.encode_segments(audio, n_codebooks)
        y = self.decode_segments(encoded["segment_frames"], z=encoded["z"],
                                 scale=encoded.get("scale"))
        return y[:, :audio.shape[1]]


def write_checkpoint(directory: str, config: CodecConfig, params, stats=None, step: int = 0):
    """Writes an inference checkpoint (params and EMA codebooks) that `load_trained` reads;
    this host alone writes it."""
    state = {"step": np.asarray(step, np.int32), "params": params, "stats": stats or {}}
    ck = Checkpointer(os.path.join(directory, "checkpoints"), model_config=config.to_dict(),
                      this_host_only=True)
    ck.save(step, state)
    ck.close()


def load_trained(path: str, *, use_ema: bool = True) -> LoadedCodec:
    """The latest checkpoint of a codec directory (or of W/codec) as a LoadedCodec, read on this
    host alone (any subset of hosts may load it)."""
    directory = codec_dir(path)
    config = CodecConfig.from_dict(json.loads(
        paths.read_text(os.path.join(directory, "checkpoints", MODEL_CONFIG))))
    params, _, raw = read_params(directory, use_ema=use_ema)
    variables = {"params": params}
    if raw.get("stats"):
        variables[STATS] = raw["stats"]
    return LoadedCodec(make_codec(config), variables)


def load(source: str, *, rng: jax.Array | None = None, use_ema: bool = True
         ) -> tuple[Codec, dict]:
    """The codec and its variables, from wherever its weights are.

    Args:
      source: a trained codec directory (`ldm-jax train codec`, `codec import-dac`,
        `codec import-encodec`) or a workdir W holding W/codec; a model file from `ldm-jax
        export` (`.msgpack`); a released DAC `.pth` or EnCodec `.th` file (imported without
        torch); or a name in `PRESETS` (freshly initialised).
      rng: PRNG key for a preset's initialisation (default `PRNGKey(0)`).
      use_ema: a trained codec's EMA parameters where it has them.

    Returns:
      `(codec, variables)`: the Linen module and `{"params": ..., "codebook_stats": ...}`.

    Raises:
      ConfigError: SOURCE is none of these (the message lists the presets).
    """
    if source in PRESETS:
        codec = make_codec(source)
        return codec, init_variables(codec, jax.random.PRNGKey(0) if rng is None else rng)
    if source.endswith((".pth", ".pt")):
        config, params = import_dac(source)
        return make_codec(config), {"params": params}
    if source.endswith(".th"):
        config, params, stats = import_encodec(source)
        return make_codec(config), {"params": params, STATS: stats}
    if source.endswith(".msgpack"):
        exported = read_export(source, "codec")
        return make_codec(exported["config"]["model"]), exported["variables"]
    try:
        loaded = load_trained(source, use_ema=use_ema)
    except CheckpointError:
        raise ConfigError(f"cannot load a codec from {source!r}: give a trained codec directory "
                          f"or workdir, a DAC .pth or EnCodec .th file or one of the presets "
                          f"{', '.join(sorted(PRESETS))}") from None
    return loaded.codec, loaded.variables


def evaluate(loaded: LoadedCodec, clips: Sequence[np.ndarray], *,
             n_codebooks: int | None = None, batch_size: int = 8, seed: int = 0,
             per_clip: bool = False) -> dict:
    """Reconstruction metrics on clips ([T] or [T, C]) at `n_codebooks` (all by default).

    On several hosts, call it on every host: the batches are shared among them (each host reads
    only its clips from a lazy sequence such as `builders.Column`) and the result is the same on
    every host, and the same as one host's.

    Args:
      seed: of the bootstrap intervals.
      per_clip: also return every clip's values (`per_clip`: {metric: [value per clip]}).

    Returns:
      Means over clips of mel_distance (DAC's multi-scale mel L1), stft_distance (multi-scale
      STFT), si_sdr (dB) and waveform_l1; loudness_difference_lu, reconstruction minus input in
      integrated loudness (ITU-R BS.1770, LUFS), and loudness_abs_difference_lu, its absolute
      value, over the `loudness_clips` clips loud enough to measure (silence measures -inf);
      `METRIC/ci95`, a 95% percentile bootstrap interval of each mean; bitrate_kbps (None for a
      KL codec) and num_clips.
    """
    cfg = loaded.config
    sr = cfg.sample_rate

    def one(y, x):
        y, x = y[None], x[None]
        return {"mel_distance": losses.mel_loss(y, x, sr),
                "stft_distance": losses.multiscale_stft_loss(y, x),
                "si_sdr": jnp.mean(losses.si_sdr(y, x)),
                "waveform_l1": losses.waveform_l1(y, x),
                "loudness_difference_lu": (
                    loudness.loudness_lufs(y, sr, axis=1, channel_axis=2)
                    - loudness.loudness_lufs(x, sr, axis=1, channel_axis=2))[0]}

    metric_fn = jax.jit(jax.vmap(one))

    def batch_values(rows: range) -> dict:
        group = [np.asarray(c, np.float32).reshape(len(c), -1) for c in
                 (clips[i] for i in rows)]
        length = min(len(c) for c in group)
        x = np.stack([c[:length] for c in group])
        y = loaded.roundtrip(x, n_codebooks)
        x = x[:, :y.shape[1]]
        values = jax.device_get(metric_fn(jnp.asarray(y), jnp.asarray(x)))
        return {k: [float(v) for v in values[k]] for k in values}

    batches = parallel.map_batches(batch_values, len(clips), batch_size)
    values = {k: [v for b in batches for v in b[k]] for k in (batches[0] if batches else {})}
    if not values or not values["mel_distance"]:
        raise CodecError("no clips to evaluate: the test split is empty")
    values["loudness_difference_lu"] = [v for v in values["loudness_difference_lu"]
                                        if np.isfinite(v)]
    values["loudness_abs_difference_lu"] = [abs(v) for v in values["loudness_difference_lu"]]
    result = {}
    for k, v in values.items():
        result[k] = float(np.mean(v)) if v else None
        result[f"{k}/ci95"] = list(bootstrap_interval(v, seed=seed)) if v else None
    result["num_clips"] = len(values["mel_distance"])
    result["loudness_clips"] = len(values["loudness_difference_lu"])
    n = 0 if cfg.quantizer == "kl" else (n_codebooks or cfg.n_codebooks)
    result["n_codebooks"] = n
    result["bitrate_kbps"] = quantize.bitrate(n, cfg.codebook_size, cfg.frame_rate) / 1000 \
        if n else None
    if per_clip:
        result["per_clip"] = values
    return result
