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
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax import config as config_lib
from ldm_jax import loop, parallel, paths
from ldm_jax.diffusion import schedules
from ldm_jax.diffusion.conditioning import (
    WithEmbeddings,
    check_clap,
    clip_embeddings,
    conditioning_mode,
    embedding_condition,
    text_condition,
    text_layer,
)
from ldm_jax.diffusion.config import (
    CONFIG_FILE,
    STATS_FILE,
    diffusion_config,
    generation_config,
    schedule_from_config,
    train_config,
)
from ldm_jax.diffusion.generate import Generator
from ldm_jax.diffusion.schedules import DiffusionError
from ldm_jax.diffusion.unet import UNetConfig, init_variables, make_unet


def make_optimizer(cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Gradient clipping, then AdamW with linear warm-up (then constant or cosine decay)."""
    t = train_config(cfg)
    lr, warmup, steps = t.lr, t.warmup, t.steps
    if t.lr_schedule == "cosine":
        lr_fn = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, warmup + 1))
    elif warmup:
        lr_fn = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                      optax.constant_schedule(lr)], [warmup])
    else:
        lr_fn = optax.constant_schedule(lr)
    tx = optax.chain(optax.clip_by_global_norm(t.grad_clip),
                     optax.adamw(lr_fn, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay))
    return tx, lr_fn


# ------------------------------------------------------------------------------- state and step

def init_state(cfg, rng) -> dict:
    """{"step", "params", "opt_state", "ema_params"} of a fresh U-Net, its arrays boxed with
    their logical axis names (`loop.Task.init`)."""
    tx, _ = make_optimizer(cfg)
    params = init_variables(make_unet(cfg.model), rng, boxed=True)["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "ema_params": params}


def ema_decay_at(step, decay: float):
    """LDM's warm-up of the EMA decay: min(decay, (1 + step) / (10 + step))."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def loss_grads(state, batch, rng, part=(0, 1), *, cfg, denoise=None):
    """The diffusion loss's gradients on a batch, or on part (i, k) of one: the rows i::k of a
    batch of k times its size, with the random draws (timesteps, noise, condition dropout) that
    those rows get in the whole batch, so that k parts averaged are the whole batch's step.

    Args:
      state: from `init_state`.
      batch: {"latents": [B, T, D] scaled latents, "latents_mask": bool [B, T],
        "context": [B, L, C], "context_mask": bool [B, L], "pooled": [B, E]}.
      rng: base key, folded with the step.
      part: (i, k): which of k interleaved micro-batches BATCH is (`loop.accumulating_step`).
      denoise: the model in place of the U-Net (a ControlNet's controlled U-Net):
        `denoise(params, state, batch, x_t, t, context, context_mask, pooled, rngs=...,
        draw=(key, b, pick)) -> prediction`, where `pick` takes this part's rows of a [b, ...]
        draw made with `key`.

    Returns:
      (grads, metrics): loss (weighted), mse (unweighted), cond_drop (share of the batch
      trained unconditionally).
    """
    i, k = part
    d = diffusion_config(cfg)
    unet = make_unet(cfg.model) if denoise is None else None
    schedule = schedule_from_config(cfg)
    rng = jax.random.fold_in(rng, state["step"])
    r_t, r_noise, r_drop, r_dropout = jax.random.split(rng, 4)
    x0 = batch["latents"].astype(jnp.float32)
    valid = batch["latents_mask"].astype(jnp.float32)
    b = x0.shape[0] * k
    t = jax.random.randint(r_t, (b,), 0, schedule.num_train_timesteps)
    noise = jax.random.normal(r_noise, (b,) + x0.shape[1:], jnp.float32)
    keep = jax.random.uniform(r_drop, (b,)) >= d.cond_drop
    def pick(v):
        return loop.micro_rows(v, i, k) if k > 1 else v

    t, noise, keep = pick(t), pick(noise), pick(keep)
    if k > 1:
        r_dropout = jax.random.fold_in(r_dropout, i)
    x_t = schedules.add_noise(schedule, x0, noise, t)
    target = schedules.target(schedule, d.objective, x0, noise, t)
    context = jnp.where(keep[:, None, None], batch["context"], 0.0)
    context_mask = batch["context_mask"] & keep[:, None]
    pooled = jnp.where(keep[:, None], batch["pooled"], 0.0)
    gamma = d.min_snr_gamma or None
    weight = schedules.loss_weight(schedule, t, d.objective, gamma)
    frames = jnp.maximum(valid.sum(1), 1.0)

    def loss_fn(params):
        if denoise is None:
            out, _ = unet.apply({"params": params}, x_t, t, context, context_mask, pooled,
                                train=True, rngs={"dropout": r_dropout})
        else:
            out = denoise(params, state, batch, x_t, t, context, context_mask, pooled,
                          rngs={"dropout": r_dropout},
                          draw=(jax.random.fold_in(rng, 1 << 20), b, pick))
        err = jnp.mean(jnp.square(out.astype(jnp.float32) - target), axis=-1)
        per_example = jnp.sum(err * valid, axis=1) / frames
        return jnp.mean(weight * per_example), jnp.mean(per_example)

    (loss, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    return grads, {"loss": loss, "mse": mse,
                   "cond_drop": 1.0 - jnp.mean(keep.astype(jnp.float32))}


def apply_update(state, grads, metrics, *, cfg):
    """One AdamW step from the (mean) gradients, and the EMA; adds grad_norm and lr. Other
    entries of the state (a ControlNet's frozen `base`) pass through."""
    tx, lr_fn = make_optimizer(cfg)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    decay = ema_decay_at(state["step"], train_config(cfg).ema_decay)
    ema = loop.ema_update(state["ema_params"], params, decay)
    new_state = {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state,
                 "ema_params": ema}
    return new_state, {**metrics, "grad_norm": optax.global_norm(grads),
                       "lr": lr_fn(state["step"])}


def train_step(state, batch, rng, *, cfg):
    """One AdamW step on the diffusion loss (`loss_grads` then `apply_update`).

    Returns:
      (new state, metrics): loss (weighted), mse (unweighted), grad_norm, lr, cond_drop.
    """
    grads, metrics = loss_grads(state, batch, rng, cfg=cfg)
    return apply_update(state, grads, metrics, cfg=cfg)


class Prepare:
    """Host side: latents scaled and masked, captions (or clip embeddings) to CLAP conditions."""

    def __init__(self, cfg, clap_model, scale, *, mixer=None, codec=None):
        self.clap = clap_model
        self.mixer, self.codec = mixer, codec
        if mixer is not None and (codec is None or not hasattr(scale, "denormalize")):
            raise DiffusionError("train.mixup decodes each mix: it needs the trained codec and "
                                 "the latent statistics")
        self.scale = scale
        self.normalize = diffusion_config(cfg).normalize
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
            embeddings = np.asarray(batch["clap_audio"], np.float32)
            if self.mixer is not None:
                x, mask, mixed, _ = self.mixer(x, mask, batch["index"], batch["latents_start"])
                if mixed.any():  # a mix is conditioned on the CLAP embedding of its sound
                    embeddings = embeddings.copy()
                    audio = self.codec.decode(self.scale.denormalize(x[mixed], self.normalize))
                    embeddings[mixed] = self.clap.embed_audio(
                        list(audio.mean(axis=-1)), sample_rate=self.codec.sample_rate)
            cond = embedding_condition(embeddings)
        else:
            cond = text_condition(self.clap, list(batch["caption"]), self.mode, self.text_layer)
        return {"latents": x, "latents_mask": mask, **cond}


def make_task(cfg, clap_model, scale, *, codec=None, media_prompts=None,
              mixer=None) -> loop.Task:
    """The latent diffusion stage for `loop.train`.

    Args:
      cfg: the LDM experiment config (`model`, `diffusion`, `train`, `generation`, `seed`).
      clap_model: a loaded `ClapModel` (frozen; its text tower conditions the U-Net).
      scale: the latent scale: a `data.latents.LatentStats` or a bare float scale factor
        (`diffusion.normalize="global"` only).
      codec: a `LoadedCodec`; with it and `media_prompts`, `media` generates audio.
      media_prompts: prompts sampled for TensorBoard every `log.audio_every_steps`
        (default: the first two of `generation.prompts`).
      mixer: a `mixup.Mixer` (train.mixup; needs `codec`).

    Returns:
      A loop.Task with state {"step", "params", "opt_state", "ema_params"}.
    """
    check_clap(cfg, clap_model)
    diffusion_config(cfg)
    media = None
    g = generation_config(cfg)
    prompts = list(media_prompts if media_prompts is not None else g.prompts[:2])
    if codec is not None and prompts and hasattr(scale, "normalize"):
        generator = Generator.from_parts(cfg, None, codec=codec, clap=clap_model, stats=scale)
        options = {**g.sampling(), "steps": g.media_steps}

        def media(state):
            # Every host gathers (the arrays may span hosts); process 0 alone writes media.
            generator.params = parallel.host_local(state["ema_params"])
            if not parallel.is_leader():
                return {}
            audio = generator.generate(prompts, **options, progress=False)
            return {f"ldm/sample_{i}": ("audio", a if a.ndim == 1 else a[:, 0],
                                        generator.sample_rate) for i, a in enumerate(audio)}

    return loop.Task(name="ldm", init=functools.partial(init_state, cfg),
                     step=functools.partial(train_step, cfg=cfg),
                     grads=functools.partial(loss_grads, cfg=cfg),
                     apply=functools.partial(apply_update, cfg=cfg),
                     model_config=UNetConfig.from_dict(cfg.model),
                     prepare=Prepare(cfg, clap_model, scale, mixer=mixer, codec=codec),
                     media=media)


# ------------------------------------------------------------------------------- the stage

def save_run_files(cfg, workdir: str, stats, latent: str):
    """`config.json` and `latent_stats.json` beside the checkpoints, for `Generator`."""
    if jax.process_index() != 0:
        return
    paths.write_text(os.path.join(workdir, CONFIG_FILE), config_lib.to_json(cfg))
    paths.write_text(os.path.join(workdir, STATS_FILE),
                     json.dumps({**stats.to_dict(), "latent": latent}, indent=1))


def train(cfg, layout) -> loop.TrainResult:
    """Trains (or resumes) the LDM of stage config CFG.

    Args:
      cfg: the LDM experiment config (`ldm_tiny`, or a chain's `ldm` section).
      layout: the `workdir.Layout`: the latents in `layout.stage("latents")`, the trained CLAP
        in `layout.stage("clap")` and the codec (if present; it decodes the TensorBoard samples)
        in `layout.stage("codec")`; checkpoints go to `layout.stage("ldm")`, TensorBoard logs
        to `layout.logs("ldm")`.

    Returns:
      loop.TrainResult.
    """
    from ldm_jax.clap.model import ClapModel
    from ldm_jax.data import builders, latents, pipeline

    latents_dir, clap_dir = layout.stage("latents"), layout.stage("clap")
    stats = latents.read_stats(latents_dir)
    latent = latents.read_metadata(latents_dir).get("latent", "z")
    if int(cfg.model.latent_channels) != stats.latent_dim:
        raise DiffusionError(f"model.latent_channels={cfg.model.latent_channels} but the latents "
                             f"in {latents_dir} have {stats.latent_dim} channels; set "
                             f"--config.model.latent_channels={stats.latent_dim}")
    clap_model = ClapModel.load(clap_dir)
    mesh = parallel.make_mesh(cfg.mesh)
    stage_dir = layout.stage("ldm")
    source = builders.open_split(latents_dir, latents.NAME, "train")
    fields = ["latents", "caption"]
    t = train_config(cfg)
    split = source
    if t.condition_on_audio:
        source = WithEmbeddings(source, clip_embeddings(
            clap_model, source, latents_dir, os.path.join(stage_dir, "clap_audio_train.npy")))
        fields.append("clap_audio")
    mixer = codec = None
    if t.mixup:
        from ldm_jax.codec import inference
        from ldm_jax.controls import FeatureConfig
        from ldm_jax.diffusion import mixup
        codec = inference.load_trained(layout.stage("codec"))
        features = FeatureConfig(sample_rate=codec.sample_rate, frame_rate=stats.frame_rate)
        rhythm = mixup.clip_rhythm(split, latents_dir, features,
                                   os.path.join(stage_dir, "rhythm_train.npz"))
        scaler = Prepare(cfg, clap_model, stats)
        mixer = mixup.Mixer(split, rhythm, scaler.scale_latents, stats.frame_rate,
                            probability=t.mixup, tolerance=t.mixup_tempo_tolerance,
                            beta=t.mixup_beta, seed=int(cfg.get("seed", 0)))
        source = mixup.WithIndex(source)
        fields.append("index")
    iterator = pipeline.make_iterator(
        source, cfg.data, batch_size=parallel.per_host_batch(int(cfg.train.batch_size), mesh),
        seed=int(cfg.data.shuffle_seed), fields=fields, crop_key="latents",
        rate=stats.frame_rate)
    if codec is None and cfg.log.get("audio_every_steps", 0):
        from ldm_jax.checkpoint import CheckpointError
        from ldm_jax.codec import inference
        try:
            codec = inference.load_trained(layout.stage("codec"))
        except CheckpointError:
            logging.warning("ldm: no codec in %s; TensorBoard gets no audio samples",
                            layout.stage("codec"))
    task = make_task(cfg, clap_model, stats, codec=codec, mixer=mixer)
    save_run_files(cfg, stage_dir, stats, latent)
    return loop.train(task, iterator, workdir=stage_dir, num_steps=int(cfg.train.steps),
                      grad_accum_steps=train_config(cfg).grad_accum_steps,
                      seed=int(cfg.get("seed", 0)), mesh=mesh, checkpoint_cfg=cfg.checkpoint,
                      log_cfg=cfg.log, logdir=layout.logs("ldm"))
