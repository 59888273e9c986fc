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


class LoadedCodec:
    """A codec with its variables and jitted encode/decode, for files and evaluation."""

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
        encoded = loaded.encode(x, n_codebooks)
        y = loaded.decode(encoded["z"], encoded.get("scale"))[:, :length]
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
