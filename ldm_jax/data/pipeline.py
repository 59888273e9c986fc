"""The grain input pipeline: per-host shard, seeded shuffle, random crops, batches, resumable.

Follows flax's `examples/gemma/input_pipeline_grain.py`: a random-access source (a TFDS
ArrayRecord split from `open_split`) becomes a `grain.MapDataset`. Every host forms the same
global order and cuts it into batches of its per-host size; host h reads batches h, h + N,
h + 2N, ... of N hosts (`batches[process_index::process_count]`), so in training the global batch
of a step is N consecutive batches of that one order, whatever N is: 2 hosts of batch 8 train on
exactly the examples 1 host of batch 16 does. Order and crops are functions of (seed, example
index, epoch) only — grain's index shuffle and its per-index seeded `random_map` — so an iterator
restored with `set_state(get_state())` yields exactly the batches an uninterrupted run would, with
or without worker processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from ldm_jax.data import DataError

DEFAULT_FIELDS = ("audio", "caption")
# Batches read ahead per host; every batch is built by one thread, so a few threads suffice.
READ_THREADS = 4
PREFETCH_BATCHES = 4


def _derive_seeds(seed: int) -> tuple[int, int]:
    """Independent 32-bit seeds for the crop and the shuffle from one user seed."""
    crop_seed, shuffle_seed = np.random.SeedSequence(int(seed)).generate_state(2)
    return int(crop_seed), int(shuffle_seed)


class _Prepare:
    """Selects fields, gives the crop key a fixed length (crop or zero-pad) and a mask.

    Called as a grain random map in training (random offset from the per-index rng) and as a
    plain map in evaluation (centre crop). A class, not a closure, so worker processes can
    unpickle it.
    """

    def __init__(self, fields: Sequence[str], crop_key: str, crop_length: int | None,
                 channels: int | None):
        self.fields = tuple(fields)
        self.crop_key = crop_key
        self.crop_length = crop_length
        self.channels = channels

    def _signal(self, value) -> np.ndarray:
        x = np.asarray(value, np.float32)
        if x.ndim == 1:
            x = x[:, None]
        if self.channels is not None and x.shape[1] != self.channels:
            if x.shape[1] != 1:
                raise DataError(f"{self.crop_key} has {x.shape[1]} channels but data.channels="
                                f"{self.channels}; rebuild the dataset or fix data.channels")
            x = np.repeat(x, self.channels, axis=1)
        return x

    def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict:
        out = {}
        for key in self.fields:
            value = example[key]
            if key != self.crop_key:
                out[key] = value if isinstance(value, str) else np.asarray(value)
                continue
            x = self._signal(value)
            length = x.shape[0] if self.crop_length is None else self.crop_length
            start = 0
            if x.shape[0] > length:
                room = x.shape[0] - length
                start = int(rng.integers(0, room + 1)) if rng is not None else room // 2
                x = x[start:start + length]
            valid = x.shape[0]
            if valid < length:
                x = np.pad(x, [(0, length - valid), (0, 0)])
            out[key] = np.ascontiguousarray(x)
            mask = np.zeros(length, bool)
            mask[:valid] = True
            out[f"{key}_length"] = np.int32(valid)
            out[f"{key}_start"] = np.int32(start)
            out[f"{key}_mask"] = mask
        return out


class _Collate:
    """Stacks examples into a batch; the crop key and its mask are zero-padded to the longest."""

    def __init__(self, crop_key: str):
        self.padded = (crop_key, f"{crop_key}_mask")

    def __call__(self, examples: Sequence[dict]) -> dict:
        batch = {}
        for key in examples[0]:
            values = [e[key] for e in examples]
            longest = max(v.shape[0] for v in values) if key in self.padded else 0
            if key in self.padded and any(v.shape[0] < longest for v in values):
                values = [np.pad(v, [(0, longest - v.shape[0])] + [(0, 0)] * (v.ndim - 1))
                          for v in values]
            batch[key] = np.stack(values)
        return batch


def _use_flag_defaults():
    """Lets grain read its absl flags in a program that never parsed a command line.

    With JAX's profiler loaded, `mp_prefetch` reads an absl flag and fails when flags were not
    parsed (google/grain#1355); defaults are what such a program wants.
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_dataset(source, data_cfg, *, batch_size: int, seed: int | None = None,
                 train: bool = True, process_index: int | None = None,
                 process_count: int | None = None, crop_seconds: float | None = None,
                 fields: Sequence[str] = DEFAULT_FIELDS, crop_key: str = "audio",
                 rate: float | None = None, num_epochs: int | None = None,
                 worker_count: int | None = None) -> grain.IterDataset:
    """A grain dataset of per-host batches.

    Args:
      source: random-access examples (`open_split(...)`, or any sequence of dicts).
      data_cfg: the `data` section (sample_rate, channels, crop_seconds, shuffle_seed,
        worker_count, worker_buffer_size).
      batch_size: examples per batch on this host.
      seed: shuffle and crop seed; None uses data_cfg.shuffle_seed.
      train: True shuffles, repeats, crops at random offsets and drops the last partial batch;
        False reads once in order, crops the centre and keeps the last partial batch (so with
        several hosts, batch counts may differ by one, and a host may get none).
      process_index, process_count: this host's batches are those at process_index modulo
        process_count; default jax.process_index() / jax.process_count().
      crop_seconds: crop length; None uses data_cfg.crop_seconds; 0 or less keeps whole clips,
        zero-padded to the longest clip of each batch.
      fields: example keys to keep (strings stay strings; arrays are stacked).
      crop_key: the time-major field that is cropped (`audio`; `latents` for latent datasets).
      rate: frames per second of `crop_key`; None uses data_cfg.sample_rate.
      num_epochs: training epochs before the iterator ends; None repeats forever.
      worker_count: worker processes; None uses data_cfg.worker_count (0: read in this process).

    Returns:
      An IterDataset of dicts: `crop_key` float32 [B, T, C] (`audio` gets data.channels
      channels), `{crop_key}_mask` bool [B, T] (True on real samples), `{crop_key}_length`
      int32 [B], `{crop_key}_start` int32 [B] (the crop's first frame in the clip), and the
      other fields stacked [B, ...] (text as a numpy str array).

    Raises:
      DataError: the source is empty or lacks a field, or a finite training run leaves this
        host no batch.
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is not in [0, {process_count})")
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    if len(source) == 0:
        raise DataError(f"the data source {source!r} is empty; rebuild the dataset")
    missing = [f for f in fields if f not in source[0]]
    if missing:
        raise DataError(f"examples have no field {', '.join(missing)}; they have "
                        f"{', '.join(sorted(source[0]))}")
    seed = int(data_cfg.shuffle_seed if seed is None else seed)
    crop_seconds = float(data_cfg.crop_seconds if crop_seconds is None else crop_seconds)
    rate = float(data_cfg.sample_rate if rate is None else rate)
    crop_length = int(round(crop_seconds * rate)) if crop_seconds > 0 else None
    channels = int(data_cfg.channels) if crop_key == "audio" else None
    prepare = _Prepare(fields, crop_key, crop_length, channels)
    prepare(source[0])  # a channel mismatch fails here, in one line, not inside a worker
    crop_seed, shuffle_seed = _derive_seeds(seed)

    ds = grain.MapDataset.source(source)
    # Crops are seeded by the example index, so they do not depend on the number of hosts;
    # `repeat` folds the epoch into that index.
    ds = ds.random_map(prepare, seed=crop_seed) if train else ds.map(prepare)
    if train:
        ds = ds.shuffle(seed=shuffle_seed).repeat(num_epochs)
    ds = ds.batch(batch_size, drop_remainder=train, batch_fn=_Collate(crop_key))
    if train:  # every host takes as many steps (matters only for a finite number of epochs)
        ds = ds[:len(ds) - len(ds) % process_count]
    ds = ds[process_index::process_count]
    if train and len(ds) == 0:
        raise DataError(f"host {process_index} of {process_count} gets no batch of "
                        f"{batch_size} from {len(source)} examples; use fewer hosts, smaller "
                        "batches or more epochs")
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS,
                                              prefetch_buffer_size=PREFETCH_BATCHES))
    workers = int(data_cfg.worker_count if worker_count is None else worker_count)
    if workers > 0:
        _use_flag_defaults()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=int(data_cfg.worker_buffer_size)))
    return ds


def make_iterator(source, data_cfg, *, batch_size: int, seed: int | None = None,
                  **kwargs: Any) -> grain.DatasetIterator:
    """`iter(make_dataset(...))`: a grain iterator of per-host batches.

    Its `get_state()` is a JSON-serialisable dict and `set_state(state)` moves a fresh iterator
    of the same pipeline to that position; `grain.checkpoint.CheckpointSave(iterator)` stores it
    next to an orbax checkpoint. Close iterators with worker processes (`iterator.close()`).
    Arguments are those of `make_dataset`.
    """
    return iter(make_dataset(source, data_cfg, batch_size=batch_size, seed=seed, **kwargs))
