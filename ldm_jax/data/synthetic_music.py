"""The `synthetic_music` TFDS dataset: procedural captioned clips from `ldm_jax.data.synthetic`.

Each example is `generate_example(seed, index, split, sample_rate, seconds)` stored in ArrayRecord
with its caption and the attributes the caption was written from, so a model trained on it can be
checked for prompt adherence (instrument, key, mode, tempo, pattern, loudness). Examples depend only
on (seed, split, index); building in worker processes gives the same bytes as building in one.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator

import numpy as np

from ldm_jax.data import DataError, synthetic

# Generator processes import this module to run `make_example`; TFDS is imported inside the
# functions that write, so those processes start without it.

NAME = "synthetic_music"
TEXT_FIELDS = ("caption", "instrument", "key", "mode", "pattern", "loudness", "id")
FLOAT_FIELDS = ("tempo_bpm", "loudness_db")
BOOL_FIELDS = ("with_drums",)
# With `data.controls`: the level-curve shape and the ground truth of the controls
# (`synthetic.render`), float32 seconds except the MIDI pitches.
CONTROL_TEXT_FIELDS = ("dynamics",)
CONTROL_ARRAYS = {"beats": np.float32, "downbeats": np.float32, "note_onsets": np.float32,
                  "note_offsets": np.float32, "note_pitches": np.int32, "gain_times": np.float32,
                  "gain_db": np.float32}
# Below this many examples, starting worker processes costs more than it saves.
MIN_EXAMPLES_FOR_WORKERS = 64


def features(controls: bool = False) -> dict:
    """The feature dict: audio float32 `[time]`, text attributes, float32 and bool scalars; with
    `controls`, the dynamics shape and the ground-truth arrays (CONTROL_ARRAYS)."""
    import tensorflow_datasets as tfds

    from ldm_jax.data.tfds_common import audio_feature

    spec = {"audio": audio_feature(None)}
    spec.update({k: tfds.features.Text() for k in TEXT_FIELDS})
    spec.update({k: tfds.features.Scalar(dtype=np.float32) for k in FLOAT_FIELDS})
    spec.update({k: tfds.features.Scalar(dtype=np.bool_) for k in BOOL_FIELDS})
    if controls:
        spec.update({k: tfds.features.Text() for k in CONTROL_TEXT_FIELDS})
        spec.update({k: tfds.features.Tensor(shape=(None,), dtype=dtype)
                     for k, dtype in CONTROL_ARRAYS.items()})
    return spec


def params_from_config(data_cfg) -> dict:
    """The build parameters recorded in the metadata (a rebuild with others is refused)."""
    params = {"sample_rate": int(data_cfg.sample_rate),
              "clip_seconds": float(data_cfg.clip_seconds),
              "num_train": int(data_cfg.num_train), "num_test": int(data_cfg.num_test),
              "seed": int(data_cfg.seed)}
    if params["num_train"] < 1 or params["num_test"] < 0:
        raise DataError(f"synthetic_music needs num_train >= 1 and num_test >= 0, got "
                        f"num_train={params['num_train']}, num_test={params['num_test']}; "
                        "fix --config.data.num_train / num_test")
    if params["clip_seconds"] <= 0 or params["sample_rate"] <= 0:
        raise DataError("synthetic_music needs clip_seconds > 0 and sample_rate > 0; fix "
                        "--config.data.clip_seconds / sample_rate")
    # Recorded only when on, so that builds made before the option compare equal.
    if data_cfg.get("controls", False):
        params["controls"] = True
    return params


def make_example(job: tuple[int, int, str, int, float, bool]) -> tuple[str, dict]:
    """One stored example from `(seed, index, split, sample_rate, seconds, controls)`; runs in
    workers."""
    seed, index, split, sample_rate, seconds, controls = job
    example = synthetic.generate_example(seed, index, split, sample_rate=sample_rate,
                                         seconds=seconds, controls=controls)
    key = f"{split}_{index:08d}"
    out = {"audio": np.asarray(example["audio"], np.float32), "id": key}
    out.update({k: str(example[k]) for k in TEXT_FIELDS if k != "id"})
    out.update({k: np.float32(example[k]) for k in FLOAT_FIELDS})
    out.update({k: np.bool_(example.get(k, False)) for k in BOOL_FIELDS})
    if controls:
        out.update({k: str(example[k]) for k in CONTROL_TEXT_FIELDS})
        out.update({k: np.asarray(example[k], dtype) for k, dtype in CONTROL_ARRAYS.items()})
    return key, out


def _examples(params: dict, split: str, count: int, pool
              ) -> Callable[[], Iterator[tuple[str, dict]]]:
    jobs = [(params["seed"], i, split, params["sample_rate"], params["clip_seconds"],
             bool(params.get("controls", False))) for i in range(count)]

    def generate():
        if pool is None:
            return map(make_example, jobs)
        return pool.imap(make_example, jobs, chunksize=4)

    return generate


def default_workers(num_examples: int) -> int:
    """The CPU count (at most 8), or 1 when starting processes would cost more than it saves."""
    if num_examples < MIN_EXAMPLES_FOR_WORKERS:
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


def build_synthetic_music(data_cfg, data_dir: str, *, overwrite: bool = False,
                          workers: int | None = None, progress: bool = True) -> dict:
    """Builds `synthetic_music` into DATA_DIR (skipped when an identical build is complete).

    Args:
      data_cfg: the `data` config section (sample_rate, clip_seconds, num_train, num_test, seed,
        and optionally controls: clips with varying dynamics and stored control ground truth).
      data_dir: TFDS data directory.
      overwrite: replace a build made with other parameters instead of refusing.
      workers: generator processes; None uses the CPU count (one process for tiny builds).
      progress: show progress bars.

    Returns:
      Summary dict: name, path, params, splits {split: count}, already_built, seconds.

    Raises:
      DataError: DATA_DIR holds synthetic_music built with other parameters.
    """
    from ldm_jax.data.tfds_common import SplitSpec, check_existing, dataset_path, write_dataset

    params = params_from_config(data_cfg)
    start = time.time()
    existing = check_existing(NAME, data_dir, params, overwrite)
    splits_count = {"train": params["num_train"], "test": params["num_test"]}
    summary = {"name": NAME, "path": dataset_path(data_dir, NAME), "params": params,
               "splits": splits_count, "bad_files": [], "truncated": []}
    if existing is not None:
        return {**summary, "already_built": True, "seconds": 0.0}
    total = params["num_train"] + params["num_test"]
    workers = default_workers(total) if workers is None else int(workers)
    # One pool for both splits; spawn, not fork, because the caller may already run JAX threads.
    with contextlib.ExitStack() as stack:
        pool = None
        if workers > 1:
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers))
        splits = {split: SplitSpec(count, _examples(params, split, count, pool))
                  for split, count in splits_count.items() if count > 0}
        write_dataset(NAME, data_dir, features=features(bool(params.get("controls", False))),
                      splits=splits, params=params,
                      summary={"splits": splits_count},
                      description="Procedural captioned music clips (ldm_jax.data.synthetic).",
                      progress=progress)
    return {**summary, "already_built": False, "seconds": round(time.time() - start, 2)}
