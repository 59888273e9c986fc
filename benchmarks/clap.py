"""CLAP benchmark: contrastive train-step time and pairs/s; clip and caption embedding throughput.

    python benchmarks/clap.py --config clap_tiny --json out.json
    python benchmarks/clap.py --config clap_base --batch 256 --json out.json   # accelerator
    python benchmarks/clap.py --config clap_base --skip-speed   # parameter count only

The step is `ldm_jax.clap.train.make_task(...).step` (InfoNCE over the batch, AdamW) on random
clips of `data.crop_seconds` and random captions of `model.text.max_length` tokens in the
tokenizer's layout (BOS, pieces, EOS, padding). The embedders are `clap.model.make_embedders` at
`eval.batch_size` on clips of `eval.crop_seconds`. Timing: the first call (compile) is reported
separately; then the median of `--repeats` calls, each synchronised with `block_until_ready`.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from timing import timed, timed_steps  # benchmarks/timing.py (scripts run from this folder)


def _captions(rng: np.random.Generator, batch: int, length: int, vocab: int):
    """Random captions in the tokenizer's layout: BOS, 4..length-2 pieces, EOS, padding."""
    from ldm_jax.clap.text import BOS_ID, EOS_ID
    tokens = rng.integers(4, vocab, (batch, length)).astype(np.int32)
    ends = rng.integers(min(5, length - 1), length, batch)
    tokens[:, 0] = BOS_ID
    tokens[np.arange(batch), ends] = EOS_ID
    mask = np.arange(length) <= ends[:, None]
    return jnp.asarray(np.where(mask, tokens, 0)), jnp.asarray(mask)


def _audio(rng: np.random.Generator, batch: int, samples: int):
    wave = (0.1 * rng.standard_normal((batch, samples))).astype(np.float32)
    return jnp.asarray(wave), jnp.ones((batch, samples), bool)


def count_params(cfg) -> dict:
    """Parameter counts from `jax.eval_shape` of the init (nothing is allocated)."""
    from ldm_jax.clap.model import init_params
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    size = lambda tree: sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))
    return {"params": size(shapes), "text_params": size(shapes["text"]),
            "audio_params": size(shapes["audio"])}


def bench_speed(cfg, batch: int, repeats: int) -> dict:
    from ldm_jax.clap import model as clap_model
    from ldm_jax.clap import train as clap_train
    vocab, length = int(cfg.model.text.vocab_size), int(cfg.model.text.max_length)
    sr = int(cfg.model.audio.sample_rate)
    # The step consumes token ids; the tokenizer only bounds the vocabulary here.
    task = clap_train.make_task(cfg, types.SimpleNamespace(vocab_size=vocab))
    state = jax.jit(task.init)(jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens, text_mask = _captions(rng, batch, length, vocab)
    audio, audio_mask = _audio(rng, batch, int(float(cfg.data.crop_seconds) * sr))
    batch_arrays = {"tokens": tokens, "text_mask": text_mask, "audio": audio,
                    "audio_mask": audio_mask}
    step = jax.jit(task.step, donate_argnums=(0,))
    state, step_compile, step_s = timed_steps(step, state, batch_arrays, jax.random.key(1),
                                              repeats=repeats)

    eval_batch = int(cfg.eval.batch_size)
    eval_seconds = float(cfg.eval.crop_seconds)
    embed_text, embed_audio = clap_model.make_embedders(cfg)
    tokens, text_mask = _captions(rng, eval_batch, length, vocab)
    audio, audio_mask = _audio(rng, eval_batch, int(eval_seconds * sr))
    params = state["params"]
    _, text_compile, text_s = timed(embed_text, params, tokens, text_mask, repeats=repeats)
    _, audio_compile, audio_s = timed(embed_audio, params, audio, audio_mask, repeats=repeats)
    return {"batch": batch, "crop_seconds": float(cfg.data.crop_seconds), "text_length": length,
            "train_step_s": step_s, "train_step_compile_s": step_compile,
            "pairs_per_s": batch / step_s, "eval_batch": eval_batch,
            "eval_crop_seconds": eval_seconds, "captions_per_s": eval_batch / text_s,
            "clips_per_s": eval_batch / audio_s, "embed_text_compile_s": text_compile,
            "embed_audio_compile_s": audio_compile}


def main(argv=None):
    from ldm_jax import config as config_lib
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="clap_tiny")
    p.add_argument("--batch", type=int, default=None, help="default: train.batch_size")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-speed", action="store_true", help="only count the parameters")
    p.add_argument("--json", default=None)
    args, overrides = p.parse_known_args(argv)
    overrides = [o.removeprefix("--config.") for o in overrides]
    cfg = config_lib.get_config(args.config, overrides)
    result = {"command": " ".join(sys.argv), "config": args.config,
              "device": str(jax.devices()[0]), "device_count": jax.device_count(),
              "jax": jax.__version__, "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "dtype": str(cfg.model.dtype),
              **count_params(cfg)}
    if not args.skip_speed:
        result["speed"] = bench_speed(cfg, args.batch or int(cfg.train.batch_size), args.repeats)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
