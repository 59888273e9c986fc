"""Writes the `latents` dataset (`data.latents`): every clip of a dataset through a trained codec.

Hosts: every JAX process encodes the strided slice `[process_index::process_count]` of each
split into its own part (a TFDS dataset of one split under `.latents_parts/`); process 0 then
joins the parts' shard files into `OUT_DIR/latents/1.0.0` and removes them. A part that is complete
is never encoded again, so an interrupted run resumes per split and host; a complete dataset with
the same parameters is recognised without loading the codec.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import time

import numpy as np

from ldm_jax import parallel, paths
from ldm_jax.checkpoint import MODEL_CONFIG, latest_step
from ldm_jax.codec.inference import codec_dir, load_trained
from ldm_jax.data import DataError
from ldm_jax.data.latents import NAME, STATS_FILE, Moments

PARTS_DIR = ".latents_parts"
MOMENTS_FILE = "moments.json"
EMPTY_FILE = "empty.json"
# Clips are zero-padded to a multiple of this many frames, so few encoder shapes are compiled.
LENGTH_BUCKET_FRAMES = 64
SHARD_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"


def _source_features(data_dir: str, name: str) -> dict:
    """The source dataset's text and scalar features (all but the audio), to copy."""
    import tensorflow_datasets as tfds

    from ldm_jax.data.tfds_common import dataset_path

    builder = tfds.builder_from_directory(dataset_path(data_dir, name))
    out = {}
    for key, feature in builder.info.features.items():
        if key == "audio":
            continue
        if isinstance(feature, tfds.features.Text):
            out[key] = tfds.features.Text()
        elif tuple(feature.shape) == ():
            out[key] = tfds.features.Scalar(dtype=feature.np_dtype)
    return out


def _codec_fingerprint(codec_path: str) -> dict:
    directory = codec_dir(codec_path)
    config = json.loads(paths.read_text(os.path.join(directory, "checkpoints", MODEL_CONFIG)))
    return {"config": config, "step": latest_step(os.path.join(directory, "checkpoints"))}


def _to_channels(x: np.ndarray, channels: int) -> np.ndarray:
    x = np.asarray(x, np.float32)
    x = x[:, None] if x.ndim == 1 else x
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return np.repeat(x, channels, axis=1)
    if channels == 1:
        return x.mean(1, keepdims=True)
    raise DataError(f"clips have {x.shape[1]} channels but the codec takes {channels}; "
                    "rebuild the dataset with data.channels matching the codec")


def encode_clips(loaded, clips: list[np.ndarray], latent_key: str, batch_size: int
                 ) -> list[np.ndarray]:
    """Encodes clips ([T] or [T, C] at the codec's rate) to latents, one [frames_i, dim] each.

    Each clip is zero-padded at its end to a multiple of `LENGTH_BUCKET_FRAMES` codec frames and
    keeps its first `ceil(T / hop)` frames, so its latents depend on the clip alone while the
    encoder compiles once per bucket (and batches are padded to `batch_size` rows).
    """
    cfg = loaded.config
    hop = cfg.hop_length
    bucket = hop * LENGTH_BUCKET_FRAMES
    clips = [_to_channels(c, cfg.channels) for c in clips]
    widths = [max(1, -(-c.shape[0] // bucket)) * bucket for c in clips]
    out: list[np.ndarray | None] = [None] * len(clips)
    for width in sorted(set(widths)):
        members = [i for i, w in enumerate(widths) if w == width]
        for start in range(0, len(members), batch_size):
            rows = members[start:start + batch_size]
            x = np.zeros((batch_size, width, cfg.channels), np.float32)
            for r, i in enumerate(rows):
                x[r, :clips[i].shape[0]] = clips[i]
            z = loaded.encode(x)[latent_key]
            for r, i in enumerate(rows):
                frames = -(-clips[i].shape[0] // hop)
                out[i] = np.ascontiguousarray(z[r, :frames], np.float32)
    return out


def _normalise(params: dict) -> dict:
    """JSON round trip, as the dataset metadata stores parameters."""
    return json.loads(json.dumps(params, sort_keys=True, default=str))


def _part_dir(out_dir: str, split: str, index: int, count: int) -> str:
    return os.path.join(out_dir, PARTS_DIR, f"{split}-{index:05d}-of-{count:05d}")


def _read_json(path: str):
    try:
        return json.loads(paths.read_text(path))
    except (OSError, ValueError):
        return None


def _write_json(path: str, value):
    paths.write_text(path, json.dumps(value, indent=1))


def _part_complete(part: str, params: dict, train: bool) -> bool:
    from ldm_jax.data.tfds_common import dataset_path

    marker = _read_json(os.path.join(part, EMPTY_FILE))
    if marker is not None:
        return marker.get("params") == _normalise(params)
    metadata = _read_json(os.path.join(dataset_path(part, NAME), "metadata.json"))
    if not paths.isfile(os.path.join(dataset_path(part, NAME), "dataset_info.json")) or \
            metadata is None or metadata.get("params") != _normalise(params):
        return False
    return not train or _read_json(os.path.join(part, MOMENTS_FILE)) is not None


def _part_moments(part: str, dim: int) -> Moments:
    moments = _read_json(os.path.join(part, MOMENTS_FILE))
    return Moments.from_dict(moments) if moments is not None else Moments(dim)


def _encode_part(part: str, *, loaded, source, indices: list[int], split: str, params: dict,
                 features: dict, latent_key: str, source_rate: int, batch_size: int,
                 progress: bool):
    """Encodes `source[indices]` into the one-split TFDS dataset PART (plus its moments)."""
    from ldm_jax.audio.dsp import resample_numpy
    from ldm_jax.data.tfds_common import SplitSpec, write_dataset

    paths.rmtree(part)
    paths.makedirs(part)
    if not indices:
        _write_json(os.path.join(part, EMPTY_FILE), {"params": _normalise(params)})
        return
    moments = Moments(loaded.config.resolved_latent_dim)
    fields = [k for k in features if k not in ("latents", "source_index")]

    def examples():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            items = source.__getitems__(chunk)
            clips = [resample_numpy(np.asarray(e["audio"], np.float32), source_rate,
                                    loaded.sample_rate, axis=0) for e in items]
            for index, item, z in zip(chunk, items, encode_clips(loaded, clips, latent_key,
                                                                 batch_size)):
                if split == "train":
                    moments.add(z)
                example = {"latents": z, "source_index": np.int64(index)}
                example.update({k: item[k] for k in fields})
                yield f"{split}_{index:09d}", example

    write_dataset(NAME, part, features=features, splits={split: SplitSpec(len(indices),
                                                                          examples)},
                  params=params, summary={"examples": len(indices)},
                  description="Codec latents (one host's part).", progress=progress)
    if split == "train":
        _write_json(os.path.join(part, MOMENTS_FILE), moments.to_dict())


def _link_or_copy(src: str, dst: str):
    if paths.is_remote(src) or paths.is_remote(dst):
        paths.copy_file(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _merge(out_dir: str, parts: dict[str, list[str]], params: dict, summary: dict,
           stats: dict) -> str:
    """Joins the parts' shard files into OUT_DIR/latents/VERSION with one dataset_info.json."""
    from ldm_jax.data.tfds_common import dataset_path

    final = dataset_path(out_dir, NAME)
    # On a disk the dataset is joined beside FINAL and renamed into place. An object store has no
    # rename, so FINAL is written directly, dataset_info.json (what marks it complete) last.
    remote = paths.is_remote(final)
    tmp = final if remote else os.path.join(os.path.dirname(final), "incomplete.merge")
    paths.rmtree(tmp)
    paths.makedirs(tmp)
    template, split_infos = None, []
    for split, dirs in parts.items():
        files, lengths, num_bytes = [], [], 0
        for part in dirs:
            if paths.isfile(os.path.join(part, EMPTY_FILE)):
                continue
            path = dataset_path(part, NAME)
            info = _read_json(os.path.join(path, "dataset_info.json"))
            template = template or (info, path)
            (entry,) = [s for s in info["splits"] if s["name"] == split]
            shards = [os.path.join(path, f) for f in paths.listdir(path)
                      if fnmatch.fnmatch(f, f"{NAME}-{split}.*-of-*")]
            if len(shards) != len(entry["shardLengths"]):
                raise DataError(f"latents part {part} is incomplete; delete it and encode again")
            files += shards
            lengths += [int(n) for n in entry["shardLengths"]]
            num_bytes += int(entry.get("numBytes", 0))
        if not files:
            continue
        fmt = template[0].get("fileFormat", "array_record")
        for k, src in enumerate(files):
            _link_or_copy(src, os.path.join(tmp, f"{NAME}-{split}.{fmt}-{k:05d}-of-"
                                                 f"{len(files):05d}"))
        split_infos.append({"filepathTemplate": SHARD_TEMPLATE, "name": split,
                            "numBytes": str(num_bytes), "shardLengths": [str(n) for n in lengths]})
    if template is None:
        raise DataError("the source dataset has no examples to encode")
    info, path = template
    info = dict(info, splits=split_infos, description="Codec latents with captions and "
                "attributes (ldm_jax.data.latents).")
    paths.copy_file(os.path.join(path, "features.json"), os.path.join(tmp, "features.json"))
    _write_json(os.path.join(tmp, "metadata.json"), {
        "params": _normalise(params), "summary": _normalise(summary), "stats": stats})
    _write_json(os.path.join(tmp, "dataset_info.json"), info)
    if not remote:
        paths.move_tree(tmp, final)
    return final


def encode_latents(codec_path: str, data_cfg, data_dir: str, out_dir: str, *,
                   batch_size: int = 8, progress: bool = True, overwrite: bool = False,
                   process_index: int | None = None, process_count: int | None = None) -> dict:
    """Encodes every train and test clip of `data_cfg.name` into the `latents` dataset.

    Args:
      codec_path: a trained codec directory, or a workdir W holding W/codec.
      data_cfg: the `data` section (its `name` is the source dataset).
      data_dir: the TFDS data directory holding the source dataset.
      out_dir: the data directory of the latents dataset (W/latents): the dataset goes to
        OUT_DIR/latents/1.0.0, its statistics to OUT_DIR/stats.json.
      batch_size: clips encoded per call.
      progress: show a progress bar per split.
      overwrite: replace a latents dataset built from another codec or source.
      process_index, process_count: this host's slice (default: JAX's process index and count).

    Returns:
      Summary: name, path, params, splits {split: count}, latent ("z" or "mean"), latent_dim,
      frame_rate, scale_factor, already_built, complete (False only on a host that is not
      process 0 of a simulated multi-host run whose other parts are missing), seconds.

    Raises:
      DataError: the source dataset is missing, or OUT_DIR holds latents of another codec or
        source and `overwrite` is False.
    """
    import jax

    from ldm_jax.data.tfds_common import check_existing, dataset_info, dataset_path, open_split

    start = time.time()
    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    source_info = dataset_info(data_dir, data_cfg.name)
    codec = _codec_fingerprint(codec_path)
    latent = "mean" if codec["config"].get("quantizer") == "kl" else "z"
    params = {"codec": codec, "latent": latent,
              "source": {"name": data_cfg.name, "params": source_info["params"]}}
    splits = {k: v for k, v in source_info["splits"].items() if k in ("train", "test")}
    base = {"name": NAME, "path": dataset_path(out_dir, NAME), "params": params,
            "splits": splits, "latent": latent}

    # Process 0 alone judges what is there, so that every host encodes or none does.
    existing = parallel.on_leader("the latents check",
                                  lambda: check_existing(NAME, out_dir, params, overwrite),
                                  share=True)
    if existing is not None and existing.get("stats"):
        _write_stats_file(out_dir, existing["stats"])
        return {**base, **_stats_summary(existing["stats"]), "already_built": True,
                "complete": True, "seconds": round(time.time() - start, 2)}

    loaded = load_trained(codec_path)
    dim = loaded.config.resolved_latent_dim
    features = {"latents": _latent_feature(dim), **_source_features(data_dir, data_cfg.name)}
    import tensorflow_datasets as tfds
    features["source_index"] = tfds.features.Scalar(dtype=np.int64)
    source_rate = int(source_info["params"].get("sample_rate", loaded.sample_rate))
    for split, n in splits.items():
        part = _part_dir(out_dir, split, index, count)
        part_params = {**params, "split": split, "process": [index, count]}
        if _part_complete(part, part_params, split == "train"):
            continue
        source = open_split(data_dir, data_cfg.name, split)
        _encode_part(part, loaded=loaded, source=source, indices=list(range(n))[index::count],
                     split=split, params=part_params, features=features, latent_key=latent,
                     source_rate=source_rate, batch_size=batch_size, progress=progress)
    parallel.barrier("ldm_jax_latents_parts")

    def merge():
        """Process 0 joins every host's parts once all are complete; the others wait."""
        if index != 0:
            return None
        parts = {split: [_part_dir(out_dir, split, i, count) for i in range(count)]
                 for split in splits}
        if not all(_part_complete(p, {**params, "split": s, "process": [i, count]}, s == "train")
                   for s, dirs in parts.items() for i, p in enumerate(dirs)):
            return None
        moments = Moments(dim)
        for part in parts.get("train", []):
            moments.merge(_part_moments(part, dim))
        stats = {**moments.stats(loaded.config.frame_rate, loaded.sample_rate).to_dict(),
                 "latent": latent, "codec_step": codec["step"],
                 "source": data_cfg.name, "data_dir": paths.resolve(data_dir)}
        _merge(out_dir, parts, params, {"splits": splits}, stats)
        _write_stats_file(out_dir, stats)
        paths.rmtree(os.path.join(out_dir, PARTS_DIR))
        return stats

    stats = parallel.on_leader("the latents merge", merge)
    if stats is None:
        merged = _read_json(os.path.join(out_dir, STATS_FILE))
        if merged is None or not paths.isdir(dataset_path(out_dir, NAME)):
            return {**base, "already_built": False, "complete": False,
                    "seconds": round(time.time() - start, 2)}
        stats = merged
    return {**base, **_stats_summary(stats), "already_built": False, "complete": True,
            "seconds": round(time.time() - start, 2)}


def _latent_feature(dim: int):
    from ldm_jax.data.tfds_common import audio_feature

    # Same storage as audio: raw float32 bytes of a [frames, dim] tensor.
    return audio_feature(dim)


def _stats_summary(stats: dict) -> dict:
    return {"latent_dim": stats["latent_dim"], "frame_rate": stats["frame_rate"],
            "scale_factor": stats["scale_factor"]}


def _write_stats_file(out_dir: str, stats: dict):
    import jax

    if jax.process_index() == 0:
        _write_json(os.path.join(out_dir, STATS_FILE), stats)
