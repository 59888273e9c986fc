"""Training of Music ControlNet (`diffusion.controlnet`): the loop Task and the stage.

Kept apart from the model so that generation and evaluation never import training code. The
loss is the LDM's (`diffusion.train.loss_grads`) through the controlled model, with masks drawn
per example (`controlnet.sample_masks`) and the LDM's text dropout for classifier-free guidance;
the state keeps the frozen U-Net's parameters under `base`, outside the optimiser state, filled
in (with the copy's initial values) by the Task's warm start. The controls of the training clips
are extracted once from the audio the latents were encoded from and cached beside the
checkpoints; they ride on the latents' channels so that the pipeline's crop cuts both alike.
"""

from __future__ import annotations

import functools
import io
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax import loop, parallel, paths
from ldm_jax.diffusion.controlnet import (
    FEATURES_FILE,
    ControlMaskConfig,
    ControlNetConfig,
    apply_controlled,
    base_unet,
    control_frames,
    controlnet_config,
    copied_from_base,
    init_params,
    make_controlnet,
    sample_masks,
)
from ldm_jax.diffusion.schedules import DiffusionError


def merged_config(cfg, base_cfg) -> ml_collections.ConfigDict:
    """The config one ControlNet run trains with: the trained LDM's (its diffusion, conditioning
    and data) with the ControlNet stage's `model`, `train`, `masks`, `data`, `mesh`,
    `checkpoint`, `log` and `seed` over it."""
    merged = ml_collections.ConfigDict(json.loads(json.dumps(
        base_cfg.to_dict() if hasattr(base_cfg, "to_dict") else base_cfg)))
    model = controlnet_config(merged.model, cfg.get("model", None)).to_dict()
    with merged.unlocked():
        merged.model = ml_collections.ConfigDict(
            json.loads(json.dumps(model, default=list)))
        train = dict(merged.get("train", {}))
        keep = {k: train[k] for k in ("condition_on_audio", "text_layer") if k in train}
        merged.train = ml_collections.ConfigDict({**keep, **dict(cfg.train)})
        merged.masks = ml_collections.ConfigDict(dict(cfg.get("masks", None) or {}))
        for name in ("data", "mesh", "checkpoint", "log"):
            if name in cfg:
                section = dict(merged.get(name, {}))
                section.update(dict(cfg[name]))
                merged[name] = ml_collections.ConfigDict(section)
        if "seed" in cfg:
            merged.seed = int(cfg.seed)
    return merged


def init_state(cfg, rng) -> dict:
    """{"step", "params", "opt_state", "ema_params", "base"}: a fresh ControlNet (boxed), and
    zeros in the frozen U-Net's shapes and logical axes, which the Task's warm start replaces
    with the trained U-Net's parameters (nothing is spent initialising what is overwritten)."""
    from ldm_jax.diffusion.train import make_optimizer
    from ldm_jax.diffusion.unet import init_variables as init_unet

    tx, _ = make_optimizer(cfg)
    model = make_controlnet(cfg.model)
    params = init_params(model, rng, boxed=True)
    shapes = jax.eval_shape(lambda r: init_unet(base_unet(cfg), r, boxed=True)["params"], rng)
    base = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "ema_params": params, "base": base}


def denoise_fn(cfg):
    """The controlled model for `diffusion.train.loss_grads`: masks drawn per example."""
    unet, controlnet = base_unet(cfg), make_controlnet(cfg.model)
    masks = ControlMaskConfig.from_dict(cfg.get("masks", None) or {})
    n = len(controlnet.controls)

    def denoise(params, state, batch, x_t, t, context, context_mask, pooled, *, rngs, draw):
        key, rows, pick = draw
        mask = pick(sample_masks(key, rows, x_t.shape[1], n, masks))
        mask = mask * batch["latents_mask"][..., None].astype(mask.dtype)
        return apply_controlled(unet, state["base"], controlnet, params, x_t, t, context,
                                context_mask, pooled, batch["controls"], mask, train=True,
                                rngs=rngs)

    return denoise


class WithControls:
    """A latents split whose examples carry their clip's control channels after the latent
    channels of `latents` (so that the pipeline's crop cuts both at the same frames)."""

    def __init__(self, source, controls: Sequence[np.ndarray]):
        self.source, self.controls = source, controls

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        example = self.source[i]
        z = np.asarray(example["latents"], np.float32)
        c = np.asarray(self.controls[i], np.float32)[:z.shape[0]]
        c = np.pad(c, [(0, z.shape[0] - c.shape[0]), (0, 0)])
        return {**example, "latents": np.concatenate([z, c], axis=-1)}

    def __getitems__(self, indices):
        return [self[i] for i in indices]


class Prepare:
    """Host side: the LDM's preparation of latents and conditions, with the control channels
    split off the latents into `controls`."""

    def __init__(self, cfg, clap_model, stats):
        from ldm_jax.diffusion.train import Prepare as LatentPrepare
        self.latent_dim = int(stats.latent_dim)
        self.inner = LatentPrepare(cfg, clap_model, stats)

    def __call__(self, batch: dict) -> dict:
        both = np.asarray(batch["latents"], np.float32)
        out = self.inner({**batch, "latents": both[..., :self.latent_dim]})
        out["controls"] = both[..., self.latent_dim:] * out["latents_mask"][..., None]
        return out


def feature_config(cfg, sample_rate: int, frame_rate: float):
    """The control features of a ControlNet run: its `features` section at the data's sample
    rate and the latent frame rate."""
    from ldm_jax.controls import FeatureConfig
    fields = dict(cfg.get("features", None) or {})
    fields["frame_rate"] = float(frame_rate)
    return FeatureConfig.from_dict({**fields, "sample_rate": int(sample_rate)})


def training_controls(source, latents_dir: str, features, names: Sequence[str], cache: str,
                      *, progress: bool = True) -> list[np.ndarray]:
    """The control channels of every clip of a latents split (extracted from the audio the
    latents were encoded from, by `source_index`), cached in CACHE (.npz)."""
    from tqdm.auto import tqdm

    from ldm_jax.controls import controls_from_audio
    from ldm_jax.data import builders, latents

    key = {"examples": len(source), "controls": list(names),
           "features": features.to_dict()}
    if paths.isfile(cache) and paths.isfile(cache + ".json"):
        if json.loads(paths.read_text(cache + ".json")) == key:
            stored = np.load(io.BytesIO(paths.read_bytes(cache)))
            return [stored[f"c{i}"] for i in range(len(source))]
    meta = latents.read_metadata(latents_dir)
    audio = builders.open_split(meta["data_dir"], meta["source"], source.split)
    rate = int(builders.dataset_info(meta["data_dir"], meta["source"])["params"]["sample_rate"])
    if rate != features.sample_rate:
        raise DiffusionError(f"the clips are at {rate} Hz, the control features at "
                             f"{features.sample_rate} Hz")
    out = []
    for i in tqdm(range(len(source)), desc="controls", leave=False,
                  disable=not progress or not parallel.is_leader()):
        clip = np.asarray(audio[int(source[i]["source_index"])]["audio"], np.float32)
        clip = clip.mean(axis=-1) if clip.ndim == 2 else clip
        found = controls_from_audio(clip, features)
        out.append(control_frames(found, names, found["num_frames"]))
    if jax.process_index() == 0:
        buffer = io.BytesIO()
        np.savez(buffer, **{f"c{i}": c for i, c in enumerate(out)})
        paths.write_bytes(cache, buffer.getvalue())
        paths.write_text(cache + ".json", json.dumps(key))
    return out


def base_dir(layout) -> str:
    from ldm_jax.diffusion.generate import ldm_dir
    return ldm_dir(layout.stage("ldm"))


def read_base(layout):
    """(the trained LDM's config, its EMA U-Net parameters as numpy arrays)."""
    from ldm_jax import checkpoint
    from ldm_jax.diffusion.config import CONFIG_FILE
    directory = base_dir(layout)
    base_cfg = ml_collections.ConfigDict(json.loads(paths.read_text(
        os.path.join(directory, CONFIG_FILE))))
    params, _, _ = checkpoint.read_params(directory)
    return base_cfg, jax.tree_util.tree_map(np.asarray, params)


def training_task(cfg, base_params, prepare=None) -> loop.Task:
    """The ControlNet's loop Task (CFG from `merged_config`) over the frozen U-Net parameters
    BASE_PARAMS (numpy), with PREPARE as its host-side batch preparation."""
    from ldm_jax.diffusion import train as ldm_train

    grads = functools.partial(ldm_train.loss_grads, cfg=cfg, denoise=denoise_fn(cfg))
    apply = functools.partial(ldm_train.apply_update, cfg=cfg)

    def step(state, batch, rng):
        return apply(state, *grads(state, batch, rng))

    def warm_start(abstract):
        copied = copied_from_base(abstract["params"], base_params)
        return {"params": copied, "ema_params": copied, "base": base_params}

    return loop.Task(name="controlnet", init=functools.partial(init_state, cfg), step=step,
                     grads=grads, apply=apply,
                     model_config=ControlNetConfig.from_dict(cfg.model),
                     prepare=prepare or (lambda batch: batch), warm_start=warm_start)


def make_task(cfg, clap_model, stats, base_params) -> loop.Task:
    """The ControlNet stage for `loop.train`: `training_task` with the LDM's preparation of
    latents and captions (CLAP) and the control channels split off."""
    return training_task(cfg, base_params, Prepare(cfg, clap_model, stats))


def train(cfg, layout) -> loop.TrainResult:
    """Trains (or resumes) the ControlNet of stage config CFG on the trained chain of LAYOUT.

    Args:
      cfg: the `controlnet` section of a chain experiment (`controls_tiny`): `model`
        (controls, encoder_channels), `masks`, `features`, `train`, `data`, `mesh`,
        `checkpoint`, `log`, `seed`.
      layout: the workdir layout: the trained U-Net in `layout.stage("ldm")`, its latents and
        CLAP beside it; checkpoints go to `layout.stage("controlnet")`.
    """
    from ldm_jax.clap.model import ClapModel
    from ldm_jax.data import builders, latents, pipeline
    from ldm_jax.diffusion.conditioning import check_clap
    from ldm_jax.diffusion.train import save_run_files, train_config

    base_cfg, base_params = read_base(layout)
    merged = merged_config(cfg, base_cfg)
    latents_dir = layout.stage("latents")
    stats = latents.read_stats(latents_dir)
    clap_model = ClapModel.load(layout.stage("clap"))
    check_clap(merged, clap_model)
    meta = latents.read_metadata(latents_dir)
    rate = int(builders.dataset_info(meta["data_dir"], meta["source"])["params"]["sample_rate"])
    features = feature_config(cfg, rate, stats.frame_rate)
    names = list(ControlNetConfig.from_dict(merged.model).controls)
    stage_dir = layout.stage("controlnet")
    paths.makedirs(stage_dir)
    source = builders.open_split(latents_dir, latents.NAME, "train")
    controls = training_controls(source, latents_dir, features, names,
                                 os.path.join(stage_dir, "controls_train.npz"))
    mesh = parallel.make_mesh(merged.mesh)
    iterator = pipeline.make_iterator(
        WithControls(source, controls), merged.data,
        batch_size=parallel.per_host_batch(int(merged.train.batch_size), mesh),
        seed=int(merged.data.shuffle_seed), fields=["latents", "caption"],
        crop_key="latents", rate=stats.frame_rate)
    task = make_task(merged, clap_model, stats, base_params)
    save_run_files(merged, stage_dir, stats, meta.get("latent", "z"))
    if parallel.is_leader():
        paths.write_text(os.path.join(stage_dir, FEATURES_FILE),
                         json.dumps(features.to_dict(), indent=1))
    return loop.train(task, iterator, workdir=stage_dir, num_steps=int(merged.train.steps),
                      grad_accum_steps=train_config(merged).grad_accum_steps,
                      seed=int(merged.get("seed", 0)), mesh=mesh,
                      checkpoint_cfg=merged.checkpoint, log_cfg=merged.log,
                      logdir=layout.logs("controlnet"))


