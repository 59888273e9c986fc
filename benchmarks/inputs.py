"""Random inputs of the shapes the stages train and generate on, and the codec an LDM pairs with.

A benchmark needs no trained model or dataset: captions, clips, latents and CLAP conditions are
drawn at random with the shapes (and the caption layout) the real pipeline produces.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import config as config_lib

# The codec each standalone LDM preset is sized for (its latent_dim is the U-Net's
# latent_channels); it sets the latent frame rate and decodes in `bench sample`. A chain
# experiment (`tiny`) carries its own codec section instead.
PAIRED_CODECS = {"ldm_tiny": "codec_tiny:vae", "ldm_base": "codec:vae"}


def paired_codec(spec: str, cfg, codec_spec: str | None = None):
    """The codec of an LDM preset: `codec_spec` if given, else the chain experiment's codec
    section, else `PAIRED_CODECS`.

    Args:
      spec: the LDM preset as given (`ldm_tiny`, `path/exp.py`, `tiny`).
      cfg: its loaded config.
      codec_spec: a codec experiment (or chain) to use instead.

    Returns:
      (`CodecConfig` or None when nothing pairs, a description of where it came from).
    """
    from ldm_jax.codec.model import CodecConfig

    name = os.path.splitext(os.path.basename(spec.partition(":")[0]))[0]
    codec_spec = codec_spec or (None if "codec" in cfg else PAIRED_CODECS.get(name))
    if codec_spec:
        codec_cfg = config_lib.get_config(codec_spec)
        model = codec_cfg.codec.model if "codec" in codec_cfg else codec_cfg.model
    elif "codec" in cfg:
        codec_spec, model = f"{spec} (its codec section)", cfg.codec.model
    else:
        return None, None
    return CodecConfig.from_dict(model), codec_spec


def random_captions(rng: np.random.Generator, batch: int, length: int, vocab: int):
    """Random captions in the tokenizer's layout: BOS, 4..length-2 pieces, EOS, padding.

    Returns:
      (tokens int32 [batch, length], mask bool [batch, length]).
    """
    from ldm_jax.clap.text import BOS_ID, EOS_ID

    tokens = rng.integers(4, vocab, (batch, length)).astype(np.int32)
    ends = rng.integers(min(5, length - 1), length, batch)
    tokens[:, 0] = BOS_ID
    tokens[np.arange(batch), ends] = EOS_ID
    mask = np.arange(length) <= ends[:, None]
    return jnp.asarray(np.where(mask, tokens, 0)), jnp.asarray(mask)


def random_clips(rng: np.random.Generator, batch: int, samples: int):
    """(audio float32 [batch, samples], mask bool [batch, samples] all True)."""
    wave = (0.1 * rng.standard_normal((batch, samples))).astype(np.float32)
    return jnp.asarray(wave), jnp.ones((batch, samples), bool)


def random_condition(section, batch: int, rng: np.random.Generator) -> dict:
    """Random CLAP conditions of the shapes the U-Net trains on: token states of
    `tokenizer.max_length` (one token with `train.condition_on_audio`) with random caption
    lengths, and a unit-norm pooled embedding.

    Returns:
      {"context": float32 [B, L, context_dim], "context_mask": bool [B, L],
       "pooled": float32 [B, pooled_dim]}.
    """
    from ldm_jax.diffusion import conditioning

    m = section.model
    embedding = conditioning.conditioning_mode(section) == "embedding"
    length = 1 if embedding else int(section.tokenizer.max_length)
    context = rng.standard_normal((batch, length, int(m.context_dim))).astype(np.float32)
    ends = rng.integers(1, length + 1, batch)
    pooled = rng.standard_normal((batch, int(m.pooled_dim))).astype(np.float32)
    pooled /= np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-6)
    return {"context": context, "context_mask": np.arange(length) < ends[:, None],
            "pooled": pooled}


def abstract(tree):
    """The `jax.ShapeDtypeStruct` tree of arrays (for lowering without the values)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
