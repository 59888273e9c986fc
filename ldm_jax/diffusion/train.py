"""Latent diffusion training: the loop `Task` of the text-conditioned U-Net over codec latents.

Follows latent diffusion (Rombach et al. 2022) as applied to audio by AudioLDM (Liu et al. 2023)
and MusicLDM (Chen et al. 2023):

- latents from the `latents` dataset, scaled by LDM's global scale factor (or normalised per
  channel), cropped to `data.crop_seconds`;
- conditioning by a frozen CLAP text tower run on the host: token states for cross-attention and
  the pooled text embedding, with classifier-free-guidance dropout (Ho & Salimans 2022) that
  replaces a caption by the null condition the sampler uses for its unconditional branch (an
  all-masked context and a zero pooled embedding);
- `train.condition_on_audio`: MusicLDM's way to use uncaptioned audio: the model is conditioned
  on the CLAP *audio* embedding of each clip (as the pooled vector and a one-token context) while
  sampling uses the text embedding of the prompt in the same places;
- the epsilon, v (Salimans & Ho 2022) or x0 objective with optional min-SNR-gamma weighting
  (Hang et al. 2023), a mean squared error over the valid latent frames, AdamW with warm-up and
  gradient clipping, and an exponential moving average of the parameters (with LDM's warm-up of
  the decay) that generation uses.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax import loop, parallel, paths
from ldm_jax.diffusion import schedules
from ldm_jax.diffusion.schedules import DiffusionError
from ldm_jax.diffusion.unet import make_unet

CONFIG_FILE = "config.json"
STATS_FILE = "latent_stats.json"
# The `diffusion` section and its defaults.
DIFFUSION_DEFAULTS = dict(
    schedule="scaled_linear", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
    objective="v", min_snr_gamma=5.0,  # 0 disables the weighting
    snr_shift=1.0,  # divides every timestep's SNR (simple diffusion's shifted schedule)
    cond_drop=0.1,  # probability of training a caption as the null condition
    normalize="global",  # "global" (LDM's scale factor) or "channel" (per-channel mean / std)
)
TRAIN_DEFAULTS = dict(lr=1e-4, warmup=0, lr_schedule="constant", weight_decay=0.0, b1=0.9,
                      b2=0.999, eps=1e-8, grad_clip=1.0, ema_decay=0.999,
                      condition_on_audio=False,
                      text_layer=-1)  # CLAP text layer the U-Net's context is taken from


def diffusion_config(cfg) -> dict:
    """The `diffusion` section over its defaults; an unknown key is an error naming it."""
    given = dict(cfg.get("diffusion", {}) or {})
    unknown = sorted(set(given) - set(DIFFUSION_DEFAULTS))
    if unknown:
        raise DiffusionError(f"unknown diffusion config keys {unknown}; the section takes "
                             f"{', '.join(DIFFUSION_DEFAULTS)}")
    d = {**DIFFUSION_DEFAULTS, **given}
    d["objective"] = schedules.canonical_objective(d["objective"])
    if d["normalize"] not in ("global", "channel"):
        raise DiffusionError(f"diffusion.normalize={d['normalize']!r}: use 'global' or 'channel'")
    if not 0.0 <= float(d["cond_drop"]) < 1.0:
        raise DiffusionError(f"diffusion.cond_drop={d['cond_drop']} must be in [0, 1)")
    return d


def train_config(cfg) -> dict:
    return {**TRAIN_DEFAULTS, **dict(cfg.train)}


def schedule_from_config(cfg) -> schedules.Schedule:
    d = diffusion_config(cfg)
    return schedules.make_schedule(d["schedule"], int(d["num_train_timesteps"]),
                                   d["beta_start"], d["beta_end"], float(d["snr_shift"]))


def make_optimizer(cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Gradient clipping, then AdamW with linear warm-up (then constant or cosine decay)."""
    t = train_config(cfg)
    lr, warmup, steps = float(t["lr"]), int(t["warmup"]), int(t["steps"])
    if t["lr_schedule"] == "cosine":
        lr_fn = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, warmup + 1))
    elif t["lr_schedule"] == "constant":
        lr_fn = optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)),
                                      optax.constant_schedule(lr)], [max(warmup, 1)]) \
            if warmup else optax.constant_schedule(lr)
    else:
        raise DiffusionError(f"train.lr_schedule={t['lr_schedule']!r}: use 'constant' or "
                             "'cosine'")
    tx = optax.chain(optax.clip_by_global_norm(float(t["grad_clip"])),
                     optax.adamw(lr_fn, b1=float(t["b1"]), b2=float(t["b2"]),
                                 eps=float(t["eps"]), weight_decay=float(t["weight_decay"])))
    return tx, lr_fn


# ------------------------------------------------------------------------------- conditioning

def conditioning_mode(cfg) -> str:
    """"embedding" (one-token context from a CLAP embedding) or "states" (text token states)."""
    return "embedding" if train_config(cfg)["condition_on_audio"] else "states"


def text_layer(cfg, clap_model) -> int:
    """`train.text_layer`, checked against the CLAP text tower's depth."""
    from ldm_jax.clap.model import ClapError, text_layer_index

    layer = int(train_config(cfg)["text_layer"])
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


def bucket_rows(n: int, limit: int) -> int:
    """Rows a batch of n is padded to: the next power of two (so few shapes compile)."""
    return min(max(limit, n), 1 << max(n - 1, 0).bit_length())


def text_condition(clap_model, texts, mode: str = "states", layer: int = -1) -> dict:
    """Frozen CLAP conditioning of captions.

    Args:
      clap_model: a `ClapModel` (its tokenizer, params and jitted text tower are used).
      texts: list of B captions.
      mode: "states" (token states as context) or "embedding" (the text embedding as a
        one-token context, for models trained with `train.condition_on_audio`).
      layer: the text tower layer whose token states are the context (`train.text_layer`; see
        `clap.model.text_layer_index`); the pooled embedding is always the final one.

    Returns:
      {"context": float32 [B, L, D] (L = 1 in embedding mode), "context_mask": bool [B, L],
       "pooled": float32 [B, E] unit-norm text embedding}.
    """
    texts = [t.decode() if isinstance(t, bytes) else str(t) for t in texts]
    tokens, mask = clap_model.tokenizer.encode(texts, clap_model.max_length)
    text_fn = clap_model.text_embedder(layer)
    states, pooled = [], []
    for start in range(0, len(texts), clap_model.batch_size):
        n = min(clap_model.batch_size, len(texts) - start)
        rows = bucket_rows(n, clap_model.batch_size)
        t = np.zeros((rows, tokens.shape[1]), tokens.dtype)
        m = np.zeros((rows, tokens.shape[1]), bool)
        t[:n], m[:n] = tokens[start:start + n], mask[start:start + n]
        s, e = text_fn(clap_model.params, t, m)
        states.append(np.asarray(s, np.float32)[:n])
        pooled.append(np.asarray(e, np.float32)[:n])
    pooled = np.concatenate(pooled)
    if mode == "embedding":
        return embedding_condition(pooled)
    return {"context": np.concatenate(states), "context_mask": mask, "pooled": pooled}


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


# ------------------------------------------------------------------------------- state and step

def init_state(cfg, rng) -> dict:
    """{"step", "params", "opt_state", "ema_params"} of a fresh U-Net."""
    from ldm_jax.diffusion.unet import example_inputs

    unet = make_unet(cfg.model)
    tx, _ = make_optimizer(cfg)
    params = nn.meta.unbox(unet.init(rng, **example_inputs(unet)))["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "ema_params": params}


def ema_decay_at(step, decay: float):
    """LDM's warm-up of the EMA decay: min(decay, (1 + step) / (10 + step))."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def train_step(state, batch, rng, *, cfg):
    """One AdamW step on the diffusion loss.

    Args:
      state: from `init_state`.
      batch: {"latents": [B, T, D] scaled latents, "latents_mask": bool [B, T],
        "context": [B, L, C], "context_mask": bool [B, L], "pooled": [B, E]}.
      rng: base key, folded with the step.

    Returns:
      (new state, metrics): loss (weighted), mse (unweighted), grad_norm, lr, cond_drop (share
      of the batch trained unconditionally).
    """
    d, t_cfg = diffusion_config(cfg), train_config(cfg)
    unet = make_unet(cfg.model)
    schedule = schedule_from_config(cfg)
    tx, lr_fn = make_optimizer(cfg)
    rng = jax.random.fold_in(rng, state["step"])
    r_t, r_noise, r_drop, r_dropout = jax.random.split(rng, 4)
    x0 = batch["latents"].astype(jnp.float32)
    valid = batch["latents_mask"].astype(jnp.float32)
    b = x0.shape[0]
    t = jax.random.randint(r_t, (b,), 0, schedule.num_train_timesteps)
    noise = jax.random.normal(r_noise, x0.shape, jnp.float32)
    x_t = schedules.add_noise(schedule, x0, noise, t)
    target = schedules.target(schedule, d["objective"], x0, noise, t)
    keep = jax.random.uniform(r_drop, (b,)) >= float(d["cond_drop"])
    context = jnp.where(keep[:, None, None], batch["context"], 0.0)
    context_mask = batch["context_mask"] & keep[:, None]
    pooled = jnp.where(keep[:, None], batch["pooled"], 0.0)
    gamma = float(d["min_snr_gamma"]) or None
    weight = schedules.loss_weight(schedule, t, d["objective"], gamma)
    frames = jnp.maximum(valid.sum(1), 1.0)

    def loss_fn(params):
        out, _ = unet.apply({"params": params}, x_t, t, context, context_mask, pooled,
                            train=True, rngs={"dropout": r_dropout})
        err = jnp.mean(jnp.square(out.astype(jnp.float32) - target), axis=-1)
        per_example = jnp.sum(err * valid, axis=1) / frames
        return jnp.mean(weight * per_example), jnp.mean(per_example)

    (loss, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    decay = ema_decay_at(state["step"], float(t_cfg["ema_decay"]))
    ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p,
                                 state["ema_params"], params)
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                 "ema_params": ema}
    metrics = {"loss": loss, "mse": mse, "grad_norm": optax.global_norm(grads),
               "lr": lr_fn(state["step"]), "cond_drop": 1.0 - jnp.mean(keep.astype(jnp.float32))}
    return new_state, metrics


class Prepare:
    """Host side: latents scaled and masked, captions (or clip embeddings) to CLAP conditions."""

    def __init__(self, cfg, clap_model, scale):
        self.clap = clap_model
        self.scale = scale
        self.normalize = diffusion_config(cfg)["normalize"]
        self.mode = conditioning_mode(cfg)
        self.text_layer = text_layer(cfg, clap_model)
        if self.normalize == "channel" and not hasattr(scale, "normalize"):
            raise DiffusionError("diffusion.normalize='channel' needs the latent statistics "
                                 "(a LatentStats), not a bare scale factor")

    def scale_latents(self, z: np.ndarray) -> np.ndarray:
        if hasattr(self.scale, "normalize"):
            return self.scale.normalize(z, self.normalize)
        return z * np.float32(self.scale)

    def __call__(self, batch: dict) -> dict:
        z = np.asarray(batch["latents"], np.float32)
        mask = np.asarray(batch.get("latents_mask", np.ones(z.shape[:2], bool)), bool)
        x = (self.scale_latents(z) * mask[..., None]).astype(np.float32)
        if self.mode == "embedding":
            if "clap_audio" not in batch:
                raise DiffusionError("train.condition_on_audio needs a 'clap_audio' field in "
                                     "the batch (train() adds the clips' CLAP audio embeddings)")
            cond = embedding_condition(batch["clap_audio"])
        else:
            cond = text_condition(self.clap, list(batch["caption"]), self.mode, self.text_layer)
        return {"latents": x, "latents_mask": mask, **cond}


def make_task(cfg, clap_model, scale, *, codec=None, media_prompts=None) -> loop.Task:
    """The latent diffusion stage for `loop.train`.

    Args:
      cfg: the LDM experiment config (`model`, `diffusion`, `train`, `generation`, `seed`).
      clap_model: a loaded `ClapModel` (frozen; its text tower conditions the U-Net).
      scale: the latent scale: a `data.latents.LatentStats` or a bare float scale factor
        (`diffusion.normalize="global"` only).
      codec: a `LoadedCodec`; with it and `media_prompts`, `media` generates audio.
      media_prompts: prompts sampled for TensorBoard every `log.audio_every_steps`
        (default: the first two of `generation.prompts`).

    Returns:
      A loop.Task with state {"step", "params", "opt_state", "ema_params"}.
    """
    check_clap(cfg, clap_model)
    diffusion_config(cfg)
    media = None
    gen_cfg = dict(cfg.get("generation", {}) or {})
    prompts = list(media_prompts if media_prompts is not None
                   else gen_cfg.get("prompts", ())[:2])
    if codec is not None and prompts and hasattr(scale, "normalize"):
        from ldm_jax.diffusion.generate import Generator

        generator = Generator.from_parts(cfg, None, codec=codec, clap=clap_model, stats=scale)
        seconds = float(gen_cfg.get("seconds", 2.0))
        steps = int(gen_cfg.get("media_steps", gen_cfg.get("steps", 25)))

        def media(state):
            # Every host gathers (the arrays may span hosts); process 0 alone writes media.
            generator.params = parallel.host_local(state["ema_params"])
            if not parallel.is_leader():
                return {}
            audio = generator.generate(prompts, seconds=seconds, steps=steps,
                                       sampler=gen_cfg.get("sampler", "dpmpp_2m"),
                                       cfg_scale=float(gen_cfg.get("cfg_scale", 3.0)),
                                       seed=int(gen_cfg.get("seed", 0)), progress=False)
            return {f"ldm/sample_{i}": ("audio", a if a.ndim == 1 else a[:, 0],
                                        generator.sample_rate) for i, a in enumerate(audio)}

    return loop.Task(name="ldm", init=functools.partial(init_state, cfg),
                     step=functools.partial(train_step, cfg=cfg),
                     model_config=cfg.model.to_dict(), prepare=Prepare(cfg, clap_model, scale),
                     media=media)


# ------------------------------------------------------------------------------- the stage

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


def save_run_files(cfg, workdir: str, stats, latent: str):
    """`config.json` and `latent_stats.json` beside the checkpoints, for `Generator`."""
    from ldm_jax import config as config_lib

    if jax.process_index() != 0:
        return
    paths.write_text(os.path.join(workdir, CONFIG_FILE), config_lib.to_json(cfg))
    paths.write_text(os.path.join(workdir, STATS_FILE),
                     json.dumps({**stats.to_dict(), "latent": latent}, indent=1))


def train(cfg, workdir: str, latents_dir: str, clap_dir: str) -> loop.TrainResult:
    """Trains (or resumes) the LDM of experiment `cfg` into `workdir/ldm`.

    Args:
      cfg: the LDM experiment config.
      workdir: W; checkpoints go to W/ldm, TensorBoard logs to W/logs/ldm; the codec in W/codec
        (if present) decodes the TensorBoard samples.
      latents_dir: the latents data directory (W/latents).
      clap_dir: the trained CLAP directory (W/clap).

    Returns:
      loop.TrainResult.
    """
    from ldm_jax.clap.model import ClapModel
    from ldm_jax.data import builders, latents, pipeline

    stats = latents.read_stats(latents_dir)
    latent = latents.read_metadata(latents_dir).get("latent", "z")
    if int(cfg.model.latent_channels) != stats.latent_dim:
        raise DiffusionError(f"model.latent_channels={cfg.model.latent_channels} but the latents "
                             f"in {latents_dir} have {stats.latent_dim} channels; set "
                             f"--config.model.latent_channels={stats.latent_dim}")
    clap_model = ClapModel.load(clap_dir)
    mesh = parallel.make_mesh(cfg.mesh)
    stage_dir = os.path.join(workdir, "ldm")
    source = builders.open_split(latents_dir, latents.NAME, "train")
    fields = ["latents", "caption"]
    if train_config(cfg)["condition_on_audio"]:
        source = WithEmbeddings(source, clip_embeddings(
            clap_model, source, latents_dir, os.path.join(stage_dir, "clap_audio_train.npy")))
        fields.append("clap_audio")
    iterator = pipeline.make_iterator(
        source, cfg.data, batch_size=parallel.per_host_batch(int(cfg.train.batch_size), mesh),
        seed=int(cfg.data.shuffle_seed), fields=fields, crop_key="latents",
        rate=stats.frame_rate)
    codec = None
    if cfg.log.get("audio_every_steps", 0):
        from ldm_jax.checkpoint import CheckpointError
        from ldm_jax.codec import inference
        try:
            codec = inference.load_trained(workdir)
        except CheckpointError:
            logging.warning("ldm: no codec in %s; TensorBoard gets no audio samples", workdir)
    task = make_task(cfg, clap_model, stats, codec=codec)
    save_run_files(cfg, stage_dir, stats, latent)
    return loop.train(task, iterator, workdir=stage_dir, num_steps=int(cfg.train.steps),
                      seed=int(cfg.get("seed", 0)), mesh=mesh, checkpoint_cfg=cfg.checkpoint,
                      log_cfg=cfg.log, logdir=os.path.join(workdir, "logs", "ldm"))
