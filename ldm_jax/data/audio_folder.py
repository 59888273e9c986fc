"""The `audio_folder` TFDS dataset: a user's folder of WAV/FLAC/MP3/OGG files with captions.

Captions come from `captions.jsonl` (`{"path": ..., "caption": ..., other keys}`) or `captions.csv`
(columns `path`, `caption`, other columns) at the folder root; the other keys are kept as a JSON
string feature `attributes`. Files are resampled to `data.sample_rate`, given `data.channels`
channels and cut at `data.max_seconds`. Train and test are split by a stable hash of the relative
path, so adding files never moves old ones between splits. A file that cannot be used (unreadable,
corrupt, empty, silent) or a caption row that cannot be used is skipped and reported by name with
its reason; nothing is dropped silently.
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from ldm_jax import paths
from ldm_jax.audio.io import AudioReadError, audio_info, read_audio
from ldm_jax.data.tfds_common import (
    DataError,
    SplitSpec,
    audio_feature,
    check_existing,
    dataset_path,
    write_dataset,
)

NAME = "audio_folder"
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")
CAPTION_FILES = ("captions.jsonl", "captions.csv")
# A clip whose peak stays below this is treated as silence (16-bit dither sits near -90 dBFS).
SILENCE_DBFS = -80.0
MIN_FILES_FOR_WORKERS = 32


def features(channels: int) -> dict:
    return {"audio": audio_feature(channels), "caption": tfds.features.Text(),
            "attributes": tfds.features.Text(), "id": tfds.features.Text(),
            "seconds": tfds.features.Scalar(dtype=np.float32)}


def _rel(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def scan(root: str) -> tuple[list[str], list[str]]:
    """Relative paths (sorted, `/`-separated) of audio files and of other files under ROOT."""
    audio, other = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            rel = _rel(os.path.join(dirpath, filename), root)
            if filename.lower().endswith(AUDIO_SUFFIXES):
                audio.append(rel)
            elif rel not in CAPTION_FILES:
                other.append(rel)
    return audio, other


def _caption_path(root: str, given: str) -> str:
    path = given if os.path.isabs(given) else os.path.join(root, given)
    return _rel(os.path.normpath(path), root)


def _caption_rows(root: str) -> tuple[str | None, list[tuple[str, dict]]]:
    """(caption file name, [(where, row dict)]), rows as written; None when there is none."""
    present = [f for f in CAPTION_FILES if os.path.isfile(os.path.join(root, f))]
    if len(present) > 1:
        raise DataError(f"{root} has both captions.jsonl and captions.csv; keep one of them")
    if not present:
        return None, []
    filename = present[0]
    path = os.path.join(root, filename)
    rows = []
    if filename.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    row = "not valid JSON"
                rows.append((f"{filename}:{line_no}", row))
    else:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise DataError(f"{path} needs a header row with a `path` column "
                                "(and usually `caption`)")
            for row in reader:
                rows.append((f"{filename}:{reader.line_num}", row))
    return filename, rows


def read_captions(root: str, audio: list[str]) -> tuple[dict[str, tuple[str, dict]], list[dict]]:
    """Captions by relative path, and the rows that could not be used (with reasons).

    Returns:
      ({relative path: (caption, attributes)}, [{"file": "captions.jsonl:LINE", "reason": ...}])
    """
    _, rows = _caption_rows(root)
    audio_set = set(audio)
    captions, bad = {}, []
    for where, row in rows:
        if not isinstance(row, dict):
            bad.append({"file": where, "reason": row if isinstance(row, str) else
                        "a row must be a JSON object with path and caption"})
            continue
        given = row.get("path")
        if not given or not isinstance(given, str):
            bad.append({"file": where, "reason": "row has no path"})
            continue
        rel = _caption_path(root, given)
        if rel in captions:
            bad.append({"file": where, "reason": f"second caption for {rel}; the first is kept"})
        elif rel not in audio_set:
            missing = not os.path.exists(os.path.join(root, rel))
            bad.append({"file": where, "reason": f"points at {given}, which is "
                        + ("missing" if missing else "not a WAV/FLAC/MP3/OGG file")})
        else:
            caption = row.get("caption")
            attributes = {k: v for k, v in row.items() if k not in ("path", "caption")}
            captions[rel] = ("" if caption is None else str(caption), attributes)
    return captions, bad


def fingerprint(root: str, audio: list[str]) -> str:
    """Changes when an audio file or the captions file is added, removed or modified."""
    digest = hashlib.sha1()
    for rel in sorted(audio) + [f for f in CAPTION_FILES if os.path.isfile(os.path.join(root, f))]:
        stat = os.stat(os.path.join(root, rel))
        digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def hash_fraction(rel: str) -> float:
    """A stable number in [0, 1) from a relative path (same on every machine and run)."""
    return int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def load_clip(job: tuple[str, str, str, int, int, int]) -> dict:
    """Reads, checks and caches one file; runs in worker processes.

    Args:
      job: (root, relative path, cache file, sample_rate, channels, max_samples or 0).

    Returns:
      {"file", "ok", "reason", "num_samples", "truncated", "source_seconds"}; when ok, the clip
      (float32 [time, channels]) is saved to the cache file.
    """
    root, rel, cache, sample_rate, channels, max_samples = job
    result = {"file": rel, "ok": False, "reason": "", "num_samples": 0, "truncated": False,
              "source_seconds": 0.0}
    path = os.path.join(root, rel)
    try:
        if os.path.getsize(path) == 0:
            result["reason"] = "empty (0 bytes)"
            return result
        if audio_info(path)[2] == 0:
            result["reason"] = "empty (0 samples)"
            return result
        audio, _ = read_audio(path, sample_rate=sample_rate, mono=channels == 1)
    except AudioReadError as e:
        # The message starts with the path, which the report already shows.
        detail = str(e)
        detail = detail[len(path) + 2:] if detail.startswith(path + ": ") else detail
        result["reason"] = f"unreadable: {detail}"
        return result
    except Exception as e:  # noqa: BLE001 - any decoder failure is reported, never fatal
        message = (str(e).splitlines() or [""])[0]
        result["reason"] = f"unreadable ({type(e).__name__}: {message})"
        return result
    audio = np.asarray(audio, np.float32)
    if audio.ndim == 1:
        audio = audio[:, None]
    result["source_seconds"] = round(audio.shape[0] / sample_rate, 3)
    if audio.shape[0] == 0:
        result["reason"] = "empty (0 samples)"
        return result
    if audio.shape[1] != channels:
        if audio.shape[1] != 1:
            result["reason"] = (f"has {audio.shape[1]} channels; data.channels={channels} needs "
                                f"1 or {channels}")
            return result
        audio = np.repeat(audio, channels, axis=1)
    if max_samples and audio.shape[0] > max_samples:
        audio = audio[:max_samples]
        result["truncated"] = True
    peak = float(np.max(np.abs(audio)))
    if peak < 10.0 ** (SILENCE_DBFS / 20.0):
        level = "-inf" if peak == 0 else f"{20 * np.log10(peak):.0f}"
        result["reason"] = f"silent (peak {level} dBFS < {SILENCE_DBFS:.0f} dBFS)"
        return result
    np.save(cache, audio)
    result.update(ok=True, num_samples=int(audio.shape[0]))
    return result


def assign_splits(files: list[str], test_fraction: float) -> dict[str, list[str]]:
    """Train/test by hash of the relative path; each split gets a file when there are two.

    A folder too small for `test_fraction` to pick any test file sends its lowest-hash train file
    to test (and the reverse for an empty train split), so both splits exist whenever possible.
    """
    fractions = {f: hash_fraction(f) for f in files}
    test = sorted(f for f in files if fractions[f] < test_fraction)
    train = sorted(f for f in files if fractions[f] >= test_fraction)
    if test_fraction > 0 and not test and len(train) >= 2:
        moved = min(train, key=lambda f: fractions[f])
        train.remove(moved)
        test = [moved]
    if not train and len(test) >= 2:
        moved = max(test, key=lambda f: fractions[f])
        test.remove(moved)
        train = [moved]
    return {"train": train, "test": test}


def params_from_config(data_cfg) -> tuple[str, dict]:
    source = os.path.abspath(os.path.expanduser(str(data_cfg.source or "")))
    if data_cfg.source and paths.is_remote(str(data_cfg.source)):
        raise DataError(f"audio_folder reads a local folder, not {data_cfg.source}: copy it "
                        "(gcloud storage cp -r) or mount the bucket (gcsfuse) and pass that path")
    if not data_cfg.source or not os.path.isdir(source):
        raise DataError(f"audio_folder needs a folder of audio files: set "
                        f"--config.data.source=FOLDER (got {data_cfg.source!r})")
    test_fraction = float(data_cfg.test_fraction)
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"data.test_fraction must be in [0, 1), got {test_fraction}")
    params = {"source": source, "sample_rate": int(data_cfg.sample_rate),
              "channels": int(data_cfg.channels), "test_fraction": test_fraction,
              "max_seconds": float(data_cfg.max_seconds)}
    return source, params


def _map(fn, jobs, workers, progress, desc):
    bar = dict(total=len(jobs), desc=desc, unit="file", disable=not progress, leave=False)
    if workers <= 1:
        return [fn(j) for j in tqdm.tqdm(jobs, **bar)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return list(tqdm.tqdm(pool.imap(fn, jobs, chunksize=4), **bar))


def build_audio_folder(data_cfg, data_dir: str, *, overwrite: bool = False,
                       workers: int | None = None, progress: bool = True) -> dict:
    """Builds `audio_folder` from `data_cfg.source` into DATA_DIR.

    Args:
      data_cfg: the `data` section (source, sample_rate, channels, test_fraction, max_seconds).
      data_dir: TFDS data directory.
      overwrite: replace a build made with other parameters or another folder state.
      workers: decoder processes; None uses the CPU count (one process for small folders).
      progress: show progress bars.

    Returns:
      Summary dict: name, path, params, splits {split: count}, bad_files [{"file", "reason"}]
      (unusable files and caption rows), truncated [relative paths cut at max_seconds],
      ignored [non-audio files], already_built, seconds.

    Raises:
      DataError: the folder is missing, has no usable audio, or DATA_DIR holds audio_folder built
        from other parameters or another state of the folder.
    """
    start = time.time()
    source, params = params_from_config(data_cfg)
    audio, ignored = scan(source)
    params["fingerprint"] = fingerprint(source, audio)
    existing = check_existing(NAME, data_dir, params, overwrite)
    if existing is not None:
        return {**existing.get("summary", {}), "name": NAME, "path": dataset_path(data_dir, NAME),
                "params": existing["params"], "already_built": True, "seconds": 0.0}
    captions, bad = read_captions(source, audio)
    sample_rate, channels = params["sample_rate"], params["channels"]
    max_seconds = params["max_seconds"]
    max_samples = int(round(max_seconds * sample_rate)) if max_seconds > 0 else 0
    if workers is None:
        workers = 1 if len(audio) < MIN_FILES_FOR_WORKERS else max(1, min(os.cpu_count() or 1, 8))
    # Decoded clips wait beside the dataset, or in the system's temporary folder for a remote one.
    local_dir = None if paths.is_remote(data_dir) else data_dir
    paths.makedirs(data_dir)
    with tempfile.TemporaryDirectory(dir=local_dir, prefix=".audio_folder_cache.") as cache:
        cached = {rel: os.path.join(cache, f"{i:08d}.npy") for i, rel in enumerate(audio)}
        jobs = [(source, rel, cached[rel], sample_rate, channels, max_samples) for rel in audio]
        results = _map(load_clip, jobs, workers, progress, "reading audio")
        bad = [{"file": r["file"], "reason": r["reason"]} for r in results if not r["ok"]] + bad
        good = {r["file"]: r for r in results if r["ok"]}
        if not good:
            reasons = "; ".join(f"{b['file']}: {b['reason']}" for b in bad[:5])
            raise DataError(f"no usable audio in {source} ({len(audio)} audio files; {reasons})")
        split_files = assign_splits(sorted(good), params["test_fraction"])

        def examples(files):
            def generate():
                for rel in files:
                    caption, attributes = captions.get(rel, ("", {}))
                    clip = np.load(cached[rel])
                    yield rel, {"audio": clip, "caption": caption, "id": rel,
                                "attributes": json.dumps(attributes, sort_keys=True),
                                "seconds": np.float32(clip.shape[0] / sample_rate)}
            return generate

        summary = {"splits": {k: len(v) for k, v in split_files.items()},
                   "num_audio_files": len(audio), "num_captioned": sum(r in captions for r in good),
                   "bad_files": bad, "truncated": sorted(r for r in good if good[r]["truncated"]),
                   "ignored": ignored}
        write_dataset(NAME, data_dir, features=features(channels),
                      splits={k: SplitSpec(len(v), examples(v))
                              for k, v in split_files.items() if v},
                      params=params, summary=summary, progress=progress,
                      description=f"Audio files from {source}.")
    return {**summary, "name": NAME, "path": dataset_path(data_dir, NAME), "params": params,
            "already_built": False, "seconds": round(time.time() - start, 2)}
