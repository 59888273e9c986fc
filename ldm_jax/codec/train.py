"""Codec training: one jitted GAN step (discriminator update, then generator update, DAC's order).

Follows Kumar et al. 2023 (DAC, "High-Fidelity Audio Compression with Improved RVQGAN"): AdamW with
an exponential learning-rate decay, multi-scale mel L1, LSGAN adversarial and feature-matching
losses, commitment and codebook losses, gradient clipping. Both sides live in one state pytree
(generator and discriminator params and optimiser states, EMA codebooks and optional EMA params).
The generator's forward pass is run once through `jax.vjp` and reused for both updates.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax import loop, parallel
from ldm_jax.checkpoint import evaluation_params
from ldm_jax.codec import losses
from ldm_jax.codec.discriminators import Discriminator
from ldm_jax.codec.model import CodecConfig, make_codec
from ldm_jax.codec.quantize import STATS


def make_discriminator(cfg) -> Discriminator:
    d = cfg.discriminator
    return Discriminator(periods=tuple(d.periods), fft_sizes=tuple(d.fft_sizes),
                         rates=tuple(d.rates), msstft_sizes=tuple(d.get("msstft_sizes", ())),
                         channels=d.channels, max_channels=d.max_channels,
                         sample_rate=cfg.model.sample_rate, dtype=jnp.dtype(cfg.model.dtype))


def _optimizer(lr: float, clip: float, t):
    schedule = optax.exponential_decay(lr, transition_steps=1, decay_rate=t.lr_decay)
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.get("eps", 1e-8),
                                   weight_decay=t.weight_decay))


def optimizers(cfg):
    """AdamW for the generator and the discriminator, each with its own clipping (DAC)."""
    t = cfg.train
    return _optimizer(t.lr, t.grad_clip, t), _optimizer(t.disc_lr, t.disc_grad_clip, t)


def init_state(cfg, rng, *, crop_samples: int):
    """The full training state for `cfg` (a codec experiment config), its arrays boxed with
    their logical axis names (`loop.Task.init`)."""
    codec, disc = make_codec(cfg.model), make_discriminator(cfg)
    gen_tx, disc_tx = optimizers(cfg)
    r_gen, r_disc = jax.random.split(rng)
    x = jnp.zeros((1, crop_samples, cfg.model.channels), jnp.float32)
    variables = codec.init({"params": r_gen}, x)
    disc_params = disc.init(r_disc, x)["params"]
    params = variables["params"]
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": gen_tx.init(params), "disc_params": disc_params,
             "disc_opt_state": disc_tx.init(disc_params),
             "stats": variables.get(STATS, {})}
    if cfg.train.ema_decay:
        state["ema_params"] = params
    return state


def _codec_variables(state, params=None):
    variables = {"params": state["params"] if params is None else params}
    if state["stats"]:
        variables[STATS] = state["stats"]
    return variables


def train_step(state, batch, rng, *, cfg):
    """One discriminator update then one generator update.

    Args:
      state: the pytree from `init_state`.
      batch: {"audio": [B, T, channels] float32}.
      rng: base key, folded with the step.

    Returns:
      (new state, metrics): metrics keyed like the loss weights (`mel/loss`, `adv/gen_loss`, ...).
    """
    codec, disc = make_codec(cfg.model), make_discriminator(cfg)
    gen_tx, disc_tx = optimizers(cfg)
    weights = dict(cfg.loss_weights)
    kind = cfg.train.adversarial
    rng = jax.random.fold_in(rng, state["step"])
    r_quant, r_noise = jax.random.split(rng)
    x = batch["audio"]
    adversarial = (state["step"] >= cfg.train.disc_start).astype(jnp.float32)

    def generate(params):
        (y, aux), updates = codec.apply(
            _codec_variables(state, params), x, train=True, mutable=[STATS],
            rngs={"quantizer": r_quant, "noise": r_noise})
        return (y, aux["losses"]), (aux, updates)

    (y, bottleneck_losses), vjp_fn, (aux, updates) = jax.vjp(generate, state["params"],
                                                             has_aux=True)
    x = x[:, :y.shape[1]]
    y_fixed = jax.lax.stop_gradient(y)

    def disc_loss_fn(dp):
        d_fake, d_real = _discriminate_pair(disc, dp, y_fixed, x)
        return losses.discriminator_loss(d_fake, d_real, kind)

    d_loss, d_grads = jax.value_and_grad(disc_loss_fn)(state["disc_params"])
    d_grads = jax.tree_util.tree_map(lambda g: g * adversarial, d_grads)
    d_updates, disc_opt_state = disc_tx.update(d_grads, state["disc_opt_state"],
                                               state["disc_params"])
    disc_params = optax.apply_updates(state["disc_params"], d_updates)

    # Forward only: the generator's update needs no gradient through the real clips' pass.
    d_real = jax.lax.stop_gradient(disc.apply({"params": disc_params}, x))

    def gen_loss_fn(y, bottleneck):
        named = dict(bottleneck)
        named["mel/loss"] = losses.mel_loss(y, x, cfg.model.sample_rate)
        named["waveform/l1"] = losses.waveform_l1(y, x)
        if weights.get("waveform/level_loss"):
            named["waveform/level_loss"] = losses.level_loss(y, x)
        if weights.get("waveform/si_sdr_loss"):
            # Negative SI-SDR: a phase-aware term that short CPU runs need to learn waveforms.
            named["waveform/si_sdr_loss"] = losses.si_sdr_loss(y, x, clip_min=-30.0)
        d_fake = disc.apply({"params": disc_params}, y)
        named["adv/gen_loss"] = adversarial * losses.generator_adversarial_loss(d_fake, kind)
        named["adv/feat_loss"] = adversarial * losses.feature_matching_loss(d_fake, d_real)
        return losses.weighted_total(named, weights), named

    (g_loss, named), (g_y, g_bottleneck) = jax.value_and_grad(
        gen_loss_fn, argnums=(0, 1), has_aux=True)(y, bottleneck_losses)
    (g_params,) = vjp_fn((g_y, g_bottleneck))
    g_updates, opt_state = gen_tx.update(g_params, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], g_updates)

    new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state,
                     disc_params=disc_params, disc_opt_state=disc_opt_state,
                     stats=updates.get(STATS, state["stats"]))
    if "ema_params" in state:
        new_state["ema_params"] = loop.ema_update(state["ema_params"], params,
                                                  cfg.train.ema_decay)
    metrics = {"loss": g_loss, "disc/loss": d_loss, **named,
               "grad_norm": optax.global_norm(g_params),
               "disc/grad_norm": optax.global_norm(d_grads)}
    metrics.update({k: v for k, v in aux.get("stats", {}).items()})
    return new_state, metrics


def _discriminate_pair(disc: Discriminator, params, fake: jax.Array, real: jax.Array):
    """Discriminator feature maps of `fake` and of `real` from one pass over both.

    Each example's fake and real clips sit next to each other in one batch of 2B, so a
    batch-sharded step keeps both on the example's device, and data parallelism all-reduces one
    discriminator gradient instead of one per pass.
    """
    both = jnp.stack([fake, real.astype(fake.dtype)], axis=1)
    fmaps = disc.apply({"params": params}, both.reshape((-1,) + fake.shape[1:]))
    pairs = jax.tree_util.tree_map(lambda f: f.reshape((fake.shape[0], 2) + f.shape[1:]), fmaps)
    return (jax.tree_util.tree_map(lambda f: f[:, 0], pairs),
            jax.tree_util.tree_map(lambda f: f[:, 1], pairs))


def crop_samples(cfg) -> int:
    """Training crop length in samples, rounded down to a whole number of codec frames."""
    hop = CodecConfig.from_dict(cfg.model).hop_length
    n = int(round(cfg.data.crop_seconds * cfg.model.sample_rate))
    return max(hop, n - n % hop)


def make_task(cfg, *, media_audio: np.ndarray | None = None) -> loop.Task:
    """The codec's `loop.Task`; `media_audio` ([T] float32) is decoded for TensorBoard."""
    n = crop_samples(cfg)
    codec = make_codec(cfg.model)

    def prepare(batch):
        audio = np.asarray(batch["audio"], np.float32)
        if audio.ndim == 2:
            audio = audio[..., None]
        return {"audio": audio[:, :n]}

    media = None
    if media_audio is not None:
        clip = jnp.asarray(np.asarray(media_audio, np.float32).reshape(1, -1, 1))
        reconstruct = jax.jit(lambda v: codec.apply(v, clip)[0])

        def media(state):
            from ldm_jax.eval.plots import spectrogram_rgb
            # Every host gathers (the arrays may span hosts); process 0 alone writes media.
            variables = parallel.host_local(_codec_variables(state, evaluation_params(state)))
            if not parallel.is_leader():
                return {}
            y = np.asarray(reconstruct(variables))[0, :, 0]
            sr = cfg.model.sample_rate
            return {"codec/reconstruction": ("audio", y, sr),
                    "codec/reconstruction_mel": ("image", spectrogram_rgb(y, sr))}

    return loop.Task(name="codec", init=functools.partial(init_state, cfg, crop_samples=n),
                     step=functools.partial(train_step, cfg=cfg),
                     model_config=CodecConfig.from_dict(cfg.model),
                     prepare=prepare, media=media)


def train(cfg, layout) -> loop.TrainResult:
    """Trains (or resumes) the codec of stage config CFG.

    Args:
      cfg: the codec experiment config (`codec_tiny`, or a chain's `codec` section).
      layout: the `workdir.Layout`: the dataset in `layout.data_dir`; checkpoints go to
        `layout.stage("codec")`, TensorBoard logs to `layout.logs("codec")`.
    """
    from ldm_jax.data import builders, pipeline
    mesh = parallel.make_mesh(cfg.mesh)
    batch = parallel.per_host_batch(cfg.train.batch_size, mesh)
    source = builders.open_split(layout.data_dir, cfg.data.name, "train")
    iterator = pipeline.make_iterator(
        source, cfg.data, batch_size=batch, seed=cfg.data.shuffle_seed, train=True,
        crop_seconds=crop_samples(cfg) / cfg.model.sample_rate)
    test = builders.open_split(layout.data_dir, cfg.data.name, "test")
    task = make_task(cfg, media_audio=test[0]["audio"] if len(test) else None)
    return loop.train(task, iterator, workdir=layout.stage("codec"),
                      num_steps=cfg.train.steps, seed=cfg.seed, mesh=mesh,
                      checkpoint_cfg=cfg.checkpoint, log_cfg=cfg.log,
                      logdir=layout.logs("codec"))
