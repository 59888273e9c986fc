"""How the U-Net is conditioned: frozen CLAP text states, the null condition, audio embeddings.

Training and generation condition the same way, so both import this module (and neither imports
the other):

- "states" mode: the token states of a CLAP text layer (`train.text_layer`) are the
  cross-attention context, the pooled text embedding the global condition;
- "embedding" mode (`train.condition_on_audio`, MusicLDM's way to use uncaptioned audio): a CLAP
  embedding is both the pooled vector and a one-token context; training uses each clip's *audio*
  embedding (`clip_embeddings`, cached beside the checkpoints), sampling the prompt's *text*
  embedding in the same places;
- the null condition of classifier-free guidance (Ho & Salimans 2022): an all-masked context and
  a zero pooled vector, what condition dropout trains and the sampler's unconditional branch uses.

Captions reach the text tower through `ClapModel.encode_text`, the one batching path that CLAP's
own embedding functions use.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence

import jax
import numpy as np

from ldm_jax import paths
from ldm_jax.clap.model import ClapError, text_layer_index
from ldm_jax.diffusion.config import train_config
from ldm_jax.diffusion.schedules import DiffusionError

MODES = ("states", "embedding")


def conditioning_mode(cfg) -> str:
    """"embedding" (one-token context from a CLAP embedding) or "states" (text token states)."""
    return "embedding" if train_config(cfg).condition_on_audio else "states"


def text_layer(cfg, clap_model) -> int:
    """`train.text_layer`, checked against the CLAP text tower's depth."""
    layer = train_config(cfg).text_layer
    try:
        text_layer_index(clap_model.cfg, layer)
    except ClapError as e:
        raise DiffusionError(f"train.text_layer: {e}") from None
    return layer


def check_clap(cfg, clap_model):
    """The U-Net's context and pooled widths must be those of the CLAP model."""
    m, c = cfg.model, clap_model.cfg.model
    mode = conditioning_mode(cfg)
    context = int(c.embed_dim) if mode == "embedding" else int(c.text.width)
    what = "CLAP embed_dim" if mode == "embedding" else "CLAP text width"
    if int(m.context_dim) != context:
        raise DiffusionError(f"model.context_dim={m.context_dim} but the {what} is {context}; "
                             f"set --config.model.context_dim={context}")
    if int(m.pooled_dim) != int(c.embed_dim):
        raise DiffusionError(f"model.pooled_dim={m.pooled_dim} but the CLAP embed_dim is "
                             f"{c.embed_dim}; set --config.model.pooled_dim={c.embed_dim}")


def text_condition(clap_model, texts: Sequence[str | bytes], mode: str = "states",
                   layer: int = -1) -> dict:
    """Frozen CLAP conditioning of captions.

    Args:
      clap_model: a `ClapModel` (its tokenizer, params and jitted text tower are used).
      texts: list of B captions (str or UTF-8 bytes).
      mode: "states" (token states as context) or "embedding" (the text embedding as a
        one-token context, for models trained with `train.condition_on_audio`).
      layer: the text tower layer whose token states are the context (`train.text_layer`; see
        `clap.model.text_layer_index`); the pooled embedding is always the final one.

    Returns:
      {"context": float32 [B, L, D] (L = 1 in embedding mode), "context_mask": bool [B, L],
       "pooled": float32 [B, E] unit-norm text embedding}.
    """
    if mode not in MODES:
        raise DiffusionError(f"conditioning mode {mode!r}: use one of {', '.join(MODES)}")
    texts = [t.decode() if isinstance(t, bytes) else str(t) for t in texts]
    states, mask, pooled = clap_model.encode_text(texts, layer)
    if mode == "embedding":
        return embedding_condition(pooled)
    return {"context": states, "context_mask": mask, "pooled": pooled}


def embedding_condition(embedding: np.ndarray) -> dict:
    """A CLAP embedding [B, E] as the pooled vector and a one-token context."""
    e = np.asarray(embedding, np.float32)
    return {"context": e[:, None, :], "context_mask": np.ones((e.shape[0], 1), bool),
            "pooled": e}


def null_condition(like: dict) -> dict:
    """The unconditional input, shaped like a condition: all-masked context, zero pooled."""
    return {"context": np.zeros_like(like["context"]),
            "context_mask": np.zeros_like(like["context_mask"], dtype=bool),
            "pooled": np.zeros_like(like["pooled"])}


class WithEmbeddings:
    """A latents split with each example's CLAP audio embedding added as `clap_audio`."""

    def __init__(self, source, embeddings: np.ndarray):
        self.source, self.embeddings = source, embeddings

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return {**self.source[i], "clap_audio": self.embeddings[i]}

    def __getitems__(self, indices):
        return [self[i] for i in indices]


def clip_embeddings(clap_model, source, latents_dir: str, cache: str) -> np.ndarray:
    """CLAP audio embeddings [N, E] of the source clips of a latents split (cached in CACHE).

    The audio comes from the dataset the latents were encoded from (recorded in their
    stats.json), by each example's `source_index`.
    """
    from ldm_jax.data import builders, latents

    key = {"clap_step": clap_model.step, "examples": len(source)}
    if paths.isfile(cache) and paths.isfile(cache + ".json"):
        if json.loads(paths.read_text(cache + ".json")) == key:
            return np.load(io.BytesIO(paths.read_bytes(cache)))
    meta = latents.read_metadata(latents_dir)
    audio = builders.open_split(meta["data_dir"], meta["source"], source.split)
    rate = int(builders.dataset_info(meta["data_dir"], meta["source"])["params"]["sample_rate"])
    out = []
    for start in range(0, len(source), clap_model.batch_size):
        idx = range(start, min(start + clap_model.batch_size, len(source)))
        clips = [audio[int(source[i]["source_index"])]["audio"] for i in idx]
        out.append(clap_model.embed_audio(clips, sample_rate=rate))
    embeddings = np.concatenate(out).astype(np.float32)
    if jax.process_index() == 0:
        buffer = io.BytesIO()
        np.save(buffer, embeddings)
        paths.write_bytes(cache, buffer.getvalue())
        paths.write_text(cache + ".json", json.dumps(key))
    return embeddings


