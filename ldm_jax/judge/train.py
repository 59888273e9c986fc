"""Training the attribute judge: cross-entropy on each head, AdamW, through the shared loop.

Batches are random crops of the training clips (`data.crop_seconds`) with their labels; the
evaluation at the end (and every `eval.every_steps`) is the accuracy of each head on whole test
clips (`judge.evaluate`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax import loop, parallel, paths
from ldm_jax.judge import model as judge_model


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, float(train_cfg.lr), max(int(train_cfg.warmup), 1),
        max(int(train_cfg.steps), int(train_cfg.warmup) + 1))
    return optax.chain(optax.clip_by_global_norm(float(train_cfg.grad_clip)),
                       optax.adamw(schedule, weight_decay=float(train_cfg.weight_decay)))


def init_state(cfg, rng) -> dict:
    """{"step", "params", "opt_state"}, boxed with logical axis names (`loop.Task.init`)."""
    params = judge_model.init_variables(judge_model.make_model(cfg), rng, boxed=True)["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": make_optimizer(cfg.train).init(params)}


def train_step(state, batch, rng, *, cfg):
    """One AdamW step on the summed cross-entropy of the heads.

    Args:
      state: from `init_state`.
      batch: {"audio": float32 [B, T], and int32 [B] class indices per head}.
      rng: base key, folded with the step (dropout).
    """
    model = judge_model.make_model(cfg)
    tx = make_optimizer(cfg.train)
    rng = jax.random.fold_in(rng, state["step"])

    def loss_fn(params):
        logits = model.apply({"params": params}, batch["audio"], train=True,
                             rngs={"dropout": rng})
        losses = {k: optax.softmax_cross_entropy_with_integer_labels(v, batch[k]).mean()
                  for k, v in logits.items()}
        accuracy = {f"{k}_accuracy": jnp.mean(jnp.argmax(v, -1) == batch[k])
                    for k, v in logits.items()}
        return sum(losses.values()), {**{f"{k}_loss": v for k, v in losses.items()}, **accuracy}

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return ({"step": state["step"] + 1, "params": params, "opt_state": opt_state},
            {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)})


def labels_of(example, heads: dict) -> dict[str, int]:
    """Class indices of a stored example's attributes (`with_drums` a bool)."""
    out = {}
    for name, classes in heads.items():
        value = example[name]
        if isinstance(value, bytes):
            value = value.decode()
        if name == "with_drums":
            value = "yes" if bool(value) else "no"
        if value not in classes:
            raise judge_model.JudgeError(f"label {name}={value!r} is not one of the judge's "
                                         f"classes {classes}")
        out[name] = classes.index(value)
    return out


class Prepare:
    """Host side: labels to class indices, audio as float32 [B, T] (picklable for grain)."""

    def __init__(self, cfg):
        self.heads = judge_model.make_model(cfg).config.heads

    def __call__(self, batch: dict) -> dict:
        out = {"audio": np.asarray(batch["audio"], np.float32).reshape(len(batch["audio"]), -1)}
        rows = [labels_of({k: batch[k][i] for k in self.heads}, self.heads)
                for i in range(len(out["audio"]))]
        out.update({k: np.asarray([r[k] for r in rows], np.int32) for k in self.heads})
        return out


def make_task(cfg, evaluate=None) -> loop.Task:
    judge_model.make_model(cfg)  # a config that cannot build fails here
    return loop.Task(name="judge", init=functools.partial(init_state, cfg),
                     step=functools.partial(train_step, cfg=cfg),
                     model_config=dict(cfg.model), prepare=Prepare(cfg), evaluate=evaluate)


def train(cfg, layout) -> loop.TrainResult:
    """Trains (or resumes) the judge on the labels of `cfg.data.name`'s training split.

    Args:
      cfg: the judge experiment config (`judge_tiny`, or a chain's `judge` section).
      layout: the `workdir.Layout`; checkpoints, config.json and metrics.jsonl go to
        `layout.stage("judge")`, TensorBoard logs to `layout.logs("judge")`.
    """
    from ldm_jax.data import builders, pipeline
    from ldm_jax.judge import evaluate as judge_eval

    workdir = layout.stage("judge")
    mesh = parallel.make_mesh(cfg.mesh)
    source = builders.open_split(layout.data_dir, cfg.data.name, "train")
    test = builders.open_split(layout.data_dir, cfg.data.name, "test")
    clips = builders.Column(test, None, int(cfg.eval.num_examples))
    model = judge_model.make_model(cfg)

    def evaluate(state):
        params = parallel.host_local(state["params"])
        scores = judge_eval.accuracy(judge_model.Predictor(model, {"params": params}), clips,
                                     batch_size=int(cfg.eval.batch_size))
        return {k: v for k, v in scores.items() if isinstance(v, float)}

    task = make_task(cfg, evaluate=evaluate if len(clips) else None)
    fields = ("audio", *model.config.heads)
    iterator = pipeline.make_iterator(
        source, cfg.data, batch_size=parallel.per_host_batch(int(cfg.train.batch_size), mesh),
        seed=int(cfg.data.shuffle_seed), fields=fields)
    if jax.process_index() == 0:
        paths.makedirs(workdir)
        judge_model.save_config(workdir, model.config)
    return loop.train(task, iterator, workdir=workdir, num_steps=int(cfg.train.steps),
                      seed=int(cfg.get("seed", 0)), mesh=mesh, checkpoint_cfg=cfg.checkpoint,
                      log_cfg=cfg.log, eval_every=int(cfg.eval.get("every_steps", 0)),
                      logdir=layout.logs("judge"))
