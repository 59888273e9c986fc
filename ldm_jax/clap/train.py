"""CLAP training: the loop `Task` (init, jitted step, host-side tokenisation) and `train(...)`.

The step follows CLIP/OpenCLIP (Radford et al. 2021; Cherti et al. 2023): symmetric InfoNCE over
the global batch, AdamW (beta2 0.98, no decay on gains, biases and the temperature) with linear
warm-up and cosine decay, global-norm gradient clipping, and the log inverse temperature clamped
to [0, log 100] after each update. Captions are tokenised on the host; optional augmentation
drops trailing clauses of a caption (attribute dropout) and, for datasets that carry the
synthetic generator's attributes, rewrites the caption from a random subset of them (template
paraphrase), so short prompts such as "a slow organ piece" land near the right clips.
"""

from __future__ import annotations

import functools
import logging
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax import config as config_lib
from ldm_jax import loop, parallel, paths
from ldm_jax.clap import model as clap_model
from ldm_jax.clap.text import Tokenizer
from ldm_jax.data import synthetic

# Attributes of the synthetic generator that the paraphrase can use, when a dataset has them.
ATTRIBUTE_FIELDS = ("instrument", "key", "mode", "pattern", "loudness", "tempo_bpm")


def decay_mask(params):
    """Weight decay on matrices and embeddings only (not on gains, biases or the temperature)."""
    return jax.tree_util.tree_map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(train_cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Clip by global norm, then AdamW with warm-up and cosine decay.

    Args:
      train_cfg: `steps`, `lr`, `warmup`, `weight_decay`, `grad_clip`, optional `b1`, `b2`,
        `eps`, `final_lr_fraction`.

    Returns:
      (optimizer, learning-rate schedule).
    """
    steps, warmup = int(train_cfg.steps), int(train_cfg.warmup)
    lr = float(train_cfg.lr)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=max(warmup, 1), decay_steps=max(steps, warmup + 1),
        end_value=lr * float(train_cfg.get("final_lr_fraction", 0.0)))
    tx = optax.chain(
        optax.clip_by_global_norm(float(train_cfg.grad_clip)),
        optax.adamw(schedule, b1=float(train_cfg.get("b1", 0.9)),
                    b2=float(train_cfg.get("b2", 0.98)), eps=float(train_cfg.get("eps", 1e-6)),
                    weight_decay=float(train_cfg.weight_decay), mask=decay_mask))
    return tx, schedule


def drop_clauses(caption: str, rng: np.random.Generator, p: float) -> str:
    """Attribute dropout: removes each comma-separated clause after the first with probability p.

    The synthetic captions (and most human ones) put the subject first and qualifiers (tempo,
    loudness, BPM, accompaniment) in later clauses, so the subject always survives.
    """
    clauses = [c.strip() for c in caption.rstrip(". ").split(",")]
    kept = [clauses[0]] + [c for c in clauses[1:] if c and rng.random() >= p]
    return ", ".join(kept) + ("." if caption.rstrip().endswith(".") else "")


def paraphrase(attributes: dict, rng: np.random.Generator, p: float) -> str:
    """A new caption from the generator's attributes, each but the instrument dropped with
    probability p, worded with the generator's own synonyms.

    Args:
      attributes: instrument, key, mode, pattern, loudness (str), tempo_bpm (float).
      rng: chooses the attributes kept and the words.
      p: drop probability per attribute.

    Returns:
      e.g. "a quiet slow organ melody in D minor" or "a synth lead piece".
    """
    pick = lambda words: words[rng.integers(len(words))]
    instrument = str(attributes["instrument"])
    keep = lambda: rng.random() >= p
    words = []
    if keep() and attributes.get("loudness") in synthetic.LOUDNESS_WORDS:
        words.append(pick(synthetic.LOUDNESS_WORDS[attributes["loudness"]]))
    if keep() and attributes.get("tempo_bpm") is not None:
        words.append(pick(synthetic.TEMPO_WORDS[synthetic.tempo_class(
            float(attributes["tempo_bpm"]))]))
    words.append(pick(synthetic.INSTRUMENT_WORDS.get(instrument, (instrument.replace("_", " "),))))
    pattern = attributes.get("pattern")
    if instrument == "bass" and pattern == "melody":
        pattern = "bass_melody"
    words.append(pick(synthetic.PATTERN_WORDS[pattern]) if keep() and
                 pattern in synthetic.PATTERN_WORDS else pick(("piece", "music", "clip")))
    if keep() and attributes.get("key") and attributes.get("mode"):
        words.append(f"in {attributes['key']} {attributes['mode']}")
    elif keep() and attributes.get("mode"):
        words.append(f"in a {attributes['mode']} key")
    text = " ".join(words)
    return ("an " if text[0].lower() in "aeiou" else "a ") + text


class Prepare:
    """Host-side batch preparation: mono audio and mask, (augmented) caption tokens.

    The augmentation draws come from a generator seeded by the batch's audio, so a resumed run
    augments exactly as an uninterrupted one.
    """

    def __init__(self, cfg, tokenizer: Tokenizer, train: bool = True):
        self.tokenizer = tokenizer
        self.max_length = int(cfg.model.text.max_length)
        aug = cfg.train.get("augment", {}) if train else {}
        self.clause_drop = float(aug.get("clause_drop", 0.0))
        self.paraphrase = float(aug.get("paraphrase", 0.0))
        self.attribute_drop = float(aug.get("attribute_drop", 0.5))
        self.seed = int(cfg.get("seed", 0))

    def __call__(self, batch: dict) -> dict:
        if "audio" not in batch or "caption" not in batch:
            raise clap_model.ClapError(f"a CLAP batch needs audio and caption; it has "
                                       f"{', '.join(sorted(batch))}")
        audio = np.asarray(batch["audio"], np.float32)
        if audio.ndim == 3:
            audio = audio.mean(-1)
        mask = batch.get("audio_mask")
        if mask is None and "audio_length" in batch:
            mask = np.arange(audio.shape[1]) < np.asarray(batch["audio_length"])[:, None]
        mask = np.ones(audio.shape, bool) if mask is None else np.asarray(mask, bool)
        captions = [c.decode() if isinstance(c, bytes) else str(c) for c in batch["caption"]]
        if self.clause_drop or self.paraphrase:
            captions = self.augment(captions, batch, audio)
        tokens, text_mask = self.tokenizer.encode(captions, self.max_length)
        return {"audio": audio, "audio_mask": mask, "tokens": tokens, "text_mask": text_mask}

    def augment(self, captions: list[str], batch: dict, audio: np.ndarray) -> list[str]:
        digest = zlib.crc32(np.ascontiguousarray(audio[:, :1024]).tobytes())
        rng = np.random.default_rng([self.seed, digest])
        has_attributes = "instrument" in batch and "tempo_bpm" in batch
        out = []
        for i, caption in enumerate(captions):
            if has_attributes and rng.random() < self.paraphrase:
                attrs = {k: batch[k][i] for k in ATTRIBUTE_FIELDS if k in batch}
                attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
                caption = paraphrase(attrs, rng, self.attribute_drop)
            elif self.clause_drop:
                caption = drop_clauses(caption, rng, self.clause_drop)
            out.append(caption)
        return out


def init_state(cfg, rng) -> dict:
    """{"step", "params", "opt_state"} of a fresh CLAP model, its arrays boxed with their
    logical axis names (`loop.Task.init`)."""
    tx, _ = make_optimizer(cfg.train)
    params = clap_model.init_params(cfg, rng, boxed=True)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def train_step(state, batch, rng, *, cfg):
    """One AdamW step on the symmetric contrastive loss over the (global) batch.

    Args:
      state: from `init_state`.
      batch: {"tokens", "text_mask", "audio", "audio_mask"} (see `Prepare`).
      rng: base key, folded with the step (dropout).

    Returns:
      (new state, metrics): loss, the in-batch accuracies, temperature, grad_norm, lr.
    """
    model = clap_model.make_model(cfg)
    tx, schedule = make_optimizer(cfg.train)
    scale_max = float(cfg.model.logit_scale_max)
    rng = jax.random.fold_in(rng, state["step"])

    def loss_fn(params):
        logits, aux = model.apply({"params": params}, batch["tokens"], batch["text_mask"],
                                  batch["audio"], batch["audio_mask"], train=True,
                                  rngs={"dropout": rng})
        loss, metrics = clap_model.contrastive_loss(logits)
        return loss, (metrics, aux["logit_scale"])

    (loss, (metrics, scale)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    params = {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, scale_max)}
    metrics = {**metrics, "loss": loss, "temperature": jnp.exp(-scale),
               "grad_norm": optax.global_norm(grads), "lr": schedule(state["step"])}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


def make_task(cfg, tokenizer: Tokenizer, evaluate=None) -> loop.Task:
    """The CLAP stage for `loop.train`.

    Args:
      cfg: the experiment config (`model`, `train`, `data`, `seed`).
      tokenizer: the caption tokenizer (its vocabulary must fit model.text.vocab_size).
      evaluate: optional `state -> {name: float}` (see `clap.evaluate.make_evaluator`).

    Returns:
      A loop.Task whose state is {"step", "params", "opt_state"}.
    """
    if tokenizer.vocab_size > int(cfg.model.text.vocab_size):
        raise clap_model.ClapError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but model.text.vocab_size is "
            f"{cfg.model.text.vocab_size}; raise it (it follows tokenizer.vocab_size) or retrain "
            "the tokenizer")
    clap_model.make_model(cfg)  # a config that cannot build fails here, not inside jit
    return loop.Task(name="clap", init=functools.partial(init_state, cfg),
                     step=functools.partial(train_step, cfg=cfg),
                     model_config=clap_model.ClapConfig.from_dict(cfg.model),
                     prepare=Prepare(cfg, tokenizer),
                     evaluate=evaluate)


def read_fields(source) -> tuple[str, ...]:
    """The fields a CLAP batch reads from a split: audio, caption and any generator attributes."""
    first = source[0]
    return ("audio", "caption") + tuple(k for k in ATTRIBUTE_FIELDS if k in first)


def save_run_files(cfg, workdir: str, tokenizer_path: str):
    """`config.json` and `tokenizer.model` beside the checkpoints, so `ClapModel.load` needs
    nothing else (written by process 0)."""
    if jax.process_index() != 0:
        return
    paths.write_text(os.path.join(workdir, clap_model.CONFIG_FILE), config_lib.to_json(cfg))
    target = os.path.join(workdir, clap_model.TOKENIZER_FILE)
    if paths.resolve(tokenizer_path) != paths.resolve(target):
        paths.copy_file(tokenizer_path, target)


def train(cfg, layout) -> loop.TrainResult:
    """Trains (or resumes) CLAP on `cfg.data.name`.

    Args:
      cfg: the CLAP experiment config (`clap_tiny`, or a chain's `clap` section).
      layout: the `workdir.Layout`: the dataset in `layout.data_dir`, the tokenizer at
        `layout.tokenizer`; the stage directory `layout.stage("clap")` gets checkpoints,
        config.json, tokenizer.model and metrics.jsonl, `layout.logs("clap")` TensorBoard logs.

    Returns:
      loop.TrainResult; its last history row holds the final evaluation (`eval/...`).
    """
    from ldm_jax.clap import evaluate as clap_eval
    from ldm_jax.data import builders, pipeline

    workdir, data_dir, tokenizer_path = layout.stage("clap"), layout.data_dir, layout.tokenizer
    tokenizer = Tokenizer.load(tokenizer_path)
    mesh = parallel.make_mesh(cfg.mesh)
    source = builders.open_split(data_dir, cfg.data.name, "train")
    try:
        test = builders.open_split(data_dir, cfg.data.name, "test")
    except builders.DataError:
        test = None
    if test is not None and len(test) == 0:
        test = None
    if test is None:
        logging.warning("clap: %s has no test split; training without evaluation", data_dir)
    evaluator = clap_eval.make_evaluator(cfg, test, tokenizer) if test is not None else None
    task = make_task(cfg, tokenizer, evaluate=evaluator)
    iterator = pipeline.make_iterator(
        source, cfg.data, batch_size=parallel.per_host_batch(int(cfg.train.batch_size), mesh),
        seed=int(cfg.data.shuffle_seed), fields=read_fields(source))
    save_run_files(cfg, workdir, tokenizer_path)
    return loop.train(task, iterator, workdir=workdir, num_steps=int(cfg.train.steps),
                      seed=int(cfg.get("seed", 0)), mesh=mesh, checkpoint_cfg=cfg.checkpoint,
                      log_cfg=cfg.log, eval_every=int(cfg.eval.get("every_steps", 0)),
                      logdir=layout.logs("clap"))
