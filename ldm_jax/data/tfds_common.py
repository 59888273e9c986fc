"""Writing and reading ArrayRecord TFDS datasets without TensorFlow.

Every dataset of the project (synthetic music, a user's audio folder, codec latents) is a TFDS
dataset in the ArrayRecord format, read by random access through `as_data_source` (TFDS's
"random access data source" path, which needs no TensorFlow when the features are `Tensor`,
`Scalar` and `Text`). A builder here is a features dict plus one example generator per split:
`write_dataset` turns them into `DATA_DIR/NAME/VERSION/`, records the build parameters in the
dataset metadata, and refuses to mix two builds with different parameters in one directory.
`open_split` reads a split back as a sequence of dicts of numpy arrays and Python strings.

DATA_DIR may be remote (`gs://`, see `ldm_jax.paths`): ArrayRecord writes local files only, so a
remote dataset is built in a local directory and copied up, and it is read from a local copy
fetched once (random access to single records over the network would starve training).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from array_record.python import array_record_module
from tensorflow_datasets.core import writer as tfds_writer
from tensorflow_datasets.core.utils import tqdm_utils

from ldm_jax import paths
from ldm_jax.data import DataError

VERSION = "1.0.0"
FILE_FORMAT = "array_record"
# One record per chunk for random access (as TFDS writes), without zstd: audio and latent floats
# shrink by ~10% under zstd while reading a record gets ~4x slower.
ARRAY_RECORD_OPTIONS = "group_size:1,uncompressed"
# What a changed parameter means, where its value alone does not say.
PARAM_NOTES = {"fingerprint": ": the source files changed since that build"}


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """One split to write.

    Attributes:
      num_examples: how many examples `examples()` yields (sets the progress bar's total).
      examples: a function returning an iterable of `(unique_key, example_dict)`; each example
        holds numpy arrays, floats and strings matching the features dict.
    """

    num_examples: int
    examples: Callable[[], Iterable[tuple[str, dict[str, Any]]]]


def audio_feature(channels: int | None = None, dtype=np.float32) -> tfds.features.Tensor:
    """Variable-length audio: `[time]` when channels is None, else `[time, channels]`.

    Stored as raw bytes: a `tf.train.Example` float list is several times slower to write and
    to parse, and general-purpose compression gains little on audio samples.
    """
    shape = (None,) if channels is None else (None, int(channels))
    return tfds.features.Tensor(shape=shape, dtype=dtype, encoding=tfds.features.Encoding.BYTES)


def dataset_path(data_dir: str, name: str) -> str:
    """Where `write_dataset` puts NAME: `DATA_DIR/NAME/VERSION`."""
    return paths.join(paths.resolve(data_dir), name, VERSION)


def _is_built(path: str) -> bool:
    return paths.isfile(paths.join(path, "dataset_info.json"))


def _read_metadata(path: str) -> dict:
    try:
        return json.loads(paths.read_text(paths.join(path, "metadata.json")))
    except (OSError, ValueError):
        return {}


def _normalise(params: Mapping[str, Any]) -> dict:
    """JSON round trip, so that stored and requested parameters compare like for like."""
    return json.loads(json.dumps(dict(params), sort_keys=True, default=str))


def check_existing(name: str, data_dir: str, params: Mapping[str, Any], overwrite: bool = False,
                   ) -> dict | None:
    """Decides what to do with an earlier build of NAME in DATA_DIR before building again.

    Args:
      name: dataset name.
      data_dir: the TFDS data directory.
      params: the parameters the new build would use.
      overwrite: delete an earlier build made with other parameters instead of refusing.

    Returns:
      The stored metadata (with `params` and `summary`) when a complete build with the same
      parameters exists, so the caller can skip building; None when the caller should build.

    Raises:
      DataError: an earlier build used other parameters and `overwrite` is False.
    """
    path = dataset_path(data_dir, name)
    parent = os.path.dirname(path)
    if paths.isdir(parent):
        # Interrupted builds leave `incomplete.*` folders that TFDS never reuses.
        for entry in paths.listdir(parent):
            if entry.startswith("incomplete."):
                paths.rmtree(paths.join(parent, entry))
    if not _is_built(path):
        paths.rmtree(path)
        return None
    metadata = _read_metadata(path)
    wanted = _normalise(params)
    stored = metadata.get("params")
    if stored == wanted:
        return metadata
    if overwrite:
        paths.rmtree(path)
        return None
    if isinstance(stored, dict):
        differ = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        built = ", ".join(f"{k}={stored.get(k)!r} (asked {wanted.get(k)!r}"
                          f"{PARAM_NOTES.get(k, '')})" for k in differ)
    else:
        built = "unknown parameters"
    raise DataError(f"data dir {data_dir} holds {name} built with {built}; choose another "
                    "--data-dir or pass --overwrite")


@contextlib.contextmanager
def _tfds_progress_bars(enable: bool):
    # The project draws its own bars (with totals); TFDS's switch is global, so restore it.
    was_active = tqdm_utils._active  # noqa: SLF001
    tfds.display_progress_bar(enable)
    try:
        yield
    finally:
        tfds.display_progress_bar(was_active)


class _UncompressedArrayRecordWriter(tfds_writer.ExampleWriter):
    """TFDS's ArrayRecord writer with ARRAY_RECORD_OPTIONS (readers detect the options)."""

    def write(self, path, examples):
        writer = array_record_module.ArrayRecordWriter(os.fspath(path), ARRAY_RECORD_OPTIONS)
        try:
            for _, serialized in examples:
                writer.write(serialized)
        finally:
            writer.close()
        return None


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A GeneratorBasedBuilder whose features and split generators are given at construction."""

    VERSION = tfds.core.Version(VERSION)

    def __init__(self, *, features, splits, metadata, description, progress, **kwargs):
        self._features = features
        self._splits = splits
        self._metadata = tfds.core.MetadataDict(metadata)
        self._description = description
        self._progress = progress
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self._description,
                                     features=tfds.features.FeaturesDict(self._features),
                                     metadata=self._metadata)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in self._splits}

    def _generate_examples(self, split: str = "train"):
        spec = self._splits[split]
        bar = tqdm.tqdm(spec.examples(), total=spec.num_examples, desc=f"{self.name} {split}",
                        unit="ex", disable=not self._progress, leave=False)
        yield from bar

    def _example_writer(self) -> tfds_writer.ExampleWriter:
        return _UncompressedArrayRecordWriter(file_format=self.info.file_format)

    # TFDS prints download-oriented banners; the caller reports the build itself.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass


def write_dataset(name: str, data_dir: str, *, features: Mapping[str, Any],
                  splits: Mapping[str, SplitSpec], params: Mapping[str, Any],
                  summary: Mapping[str, Any] | None = None, description: str = "",
                  progress: bool = True) -> str:
    """Writes NAME as an ArrayRecord TFDS dataset under DATA_DIR.

    Call `check_existing` first: this function assumes no complete build is in the way.

    Args:
      name: dataset name (a directory name; snake_case).
      data_dir: TFDS data directory.
      features: feature name -> `tfds.features.Tensor` / `Scalar` / `Text`.
      splits: split name -> SplitSpec; splits with no examples must be left out (TFDS refuses
        to write an empty split).
      params: build parameters, stored in the metadata and compared by later builds.
      summary: JSON-serialisable build report stored beside the parameters.
      description: a line for dataset_info.json.
      progress: show one progress bar per split.

    Returns:
      The directory holding the dataset (`DATA_DIR/NAME/VERSION`).
    """
    data_dir = paths.resolve(data_dir)
    if paths.is_remote(data_dir):
        # dataset_info.json goes up last: its presence is what marks a build complete.
        os.makedirs(paths.cache_dir(), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=paths.cache_dir(), prefix=".build.") as local:
            built = write_dataset(name, local, features=features, splits=splits, params=params,
                                  summary=summary, description=description, progress=progress)
            target = dataset_path(data_dir, name)
            paths.rmtree(target)
            paths.copy_tree(built, target, last=("dataset_info.json",))
        return target
    cls = type(_class_name(name), (_Builder,), {"name": name}, skip_registration=True)
    metadata = {"params": _normalise(params), "summary": _normalise(summary or {})}
    os.makedirs(data_dir, exist_ok=True)
    builder = cls(features=dict(features), splits=dict(splits), metadata=metadata,
                  description=description, progress=progress, data_dir=data_dir,
                  file_format=FILE_FORMAT)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".downloads.") as downloads, \
            _tfds_progress_bars(False):
        builder.download_and_prepare(file_format=FILE_FORMAT, download_dir=downloads)
    return str(builder.data_dir)


def _class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_")) or "Dataset"


class SplitSource:
    """Random access to one split: `len(source)`, `source[i]` -> dict of numpy and str.

    Text features come back as `str` (TFDS returns bytes); tensors as numpy arrays; scalars as
    numpy scalars of the feature's dtype (TFDS returns Python numbers). Picklable, so grain
    worker processes can read it.
    """

    def __init__(self, data_source, name: str, split: str, text_keys: Iterable[str],
                 scalar_dtypes: Mapping[str, Any] | None = None):
        self._source = data_source
        self.name = name
        self.split = split
        self._text_keys = tuple(text_keys)
        self._scalar_types = {k: np.dtype(v).type for k, v in (scalar_dtypes or {}).items()}

    def __len__(self) -> int:
        return len(self._source)

    def _decode(self, example: dict) -> dict:
        for key in self._text_keys:
            value = example[key]
            if isinstance(value, bytes):
                example[key] = value.decode("utf-8")
        for key, cast in self._scalar_types.items():
            example[key] = cast(example[key])
        return example

    def __getitem__(self, index) -> dict:
        index = index.__index__()
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.name}/{self.split} "
                             f"({len(self)} examples)")
        return self._decode(self._source[index])

    def __getitems__(self, indices) -> list[dict]:
        return [self._decode(e) for e in self._source.__getitems__(list(indices))]

    # grain reads a whole batch in one call when the source has `_getitems`.
    _getitems = __getitems__

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"SplitSource({self.name}/{self.split}, {len(self)} examples)"


def _load_builder(data_dir: str, name: str, local: bool = False):
    """The TFDS builder of a built dataset; with `local`, of its local copy when remote."""
    path = dataset_path(data_dir, name)
    if not _is_built(path):
        raise DataError(f"no dataset {name} in {data_dir}; run `ldm-jax data build {name} "
                        f"--data-dir {data_dir}`")
    if local:
        path = paths.local_mirror(path, ("dataset_info.json", "metadata.json"))
    return tfds.builder_from_directory(path)


def open_split(data_dir: str, name: str, split: str) -> SplitSource:
    """Opens one split of a built dataset for random access.

    Args:
      data_dir: TFDS data directory.
      name: dataset name (`synthetic_music`, `audio_folder`, ...).
      split: `train` or `test`; TFDS slicing such as `train[:10%]` works too.

    Returns:
      A SplitSource; `source[i]` is a dict whose audio is float32 `[time]` or
      `[time, channels]`. A remote dataset is read from its local copy under
      `paths.cache_dir()`, fetched on first use.

    Raises:
      DataError: the dataset or the split does not exist.
    """
    builder = _load_builder(data_dir, name, local=True)
    available = list(builder.info.splits.keys())
    base = split.split("[")[0]
    if base not in available:
        raise DataError(f"dataset {name} in {data_dir} has no split {base!r}; it has "
                        f"{', '.join(available)}")
    source = builder.as_data_source(split=split)
    features = builder.info.features
    text_keys = [k for k, f in features.items() if isinstance(f, tfds.features.Text)]
    scalars = {k: f.np_dtype for k, f in features.items()
               if not isinstance(f, tfds.features.Text) and tuple(f.shape) == ()}
    return SplitSource(source, name, split, text_keys, scalars)


def dataset_info(data_dir: str, name: str) -> dict:
    """What a built dataset holds.

    Returns:
      {"name", "path", "version", "params", "summary", "splits": {split: num_examples},
       "features": {name: description}}.

    Raises:
      DataError: the dataset does not exist.
    """
    builder = _load_builder(data_dir, name)
    info = builder.info
    metadata = dict(info.metadata or {})
    features = {}
    for key, feature in info.features.items():
        if isinstance(feature, tfds.features.Text):
            features[key] = "text"
        else:
            features[key] = f"{np.dtype(feature.np_dtype).name}{list(feature.shape)}"
    return {"name": name, "path": dataset_path(data_dir, name), "version": str(info.version),
            "params": metadata.get("params", {}), "summary": metadata.get("summary", {}),
            "splits": {k: int(v.num_examples) for k, v in info.splits.items()},
            "features": features}
