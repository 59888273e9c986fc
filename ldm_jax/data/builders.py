"""The dataset builders `ldm-jax data` drives: build by name, show examples, describe a build.

Datasets are TFDS ArrayRecord datasets (see `tfds_common`): `synthetic_music` (procedural
captioned music) and `audio_folder` (a user's folder of audio files with captions). A new builder
is a function `(data_cfg, data_dir, *, overwrite, workers, progress) -> summary` added to
`BUILDERS`; its body is a features dict and one example generator per split handed to
`tfds_common.write_dataset`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ldm_jax.data.audio_folder import build_audio_folder
from ldm_jax.data.synthetic_music import build_synthetic_music
from ldm_jax.data.tfds_common import DataError, SplitSource, dataset_info, open_split

__all__ = ["BUILDERS", "Column", "DataError", "SplitSource", "build", "build_audio_folder",
           "build_synthetic_music", "captions", "dataset_info", "format_summary", "open_split",
           "show"]

BUILDERS: dict[str, Callable[..., dict]] = {
    "synthetic_music": build_synthetic_music,
    "audio_folder": build_audio_folder,
}


def build(name: str, data_cfg, data_dir: str, overwrite: bool = False, *,
          workers: int | None = None, progress: bool = True, print_fn=None) -> dict:
    """Builds dataset NAME into DATA_DIR and reports what was written and what was skipped.

    Args:
      name: a key of BUILDERS.
      data_cfg: the `data` config section.
      data_dir: TFDS data directory.
      overwrite: replace an earlier build made with other parameters.
      workers: builder processes (None: the CPU count, one process for tiny builds).
      progress: show progress bars.
      print_fn: called with each line of `format_summary`; None (the default) leaves
        printing to the caller.

    Returns:
      The builder's summary dict (see `format_summary` for its fields).

    Raises:
      DataError: unknown NAME, bad parameters, or DATA_DIR holds NAME built differently.
    """
    if name not in BUILDERS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(BUILDERS))}")
    summary = BUILDERS[name](data_cfg, data_dir, overwrite=overwrite, workers=workers,
                             progress=progress)
    if print_fn is not None:
        for line in format_summary(summary).splitlines():
            print_fn(line)
    return summary


def format_summary(summary: dict) -> str:
    """A build summary as text: splits, every skipped file with its reason, truncated clips."""
    counts = summary.get("splits", {})
    order = sorted(counts, key=lambda k: (k != "train", k != "test", k))
    splits = ", ".join(f"{k} {counts[k]}" for k in order)
    state = "already built" if summary.get("already_built") else (
        f"built in {summary.get('seconds', 0):.1f} s")
    lines = [f"{summary['name']}: {state} at {summary['path']} ({splits})"]
    bad = summary.get("bad_files", [])
    if bad:
        lines.append(f"skipped {len(bad)}:")
        lines.extend(f"  {b['file']}: {b['reason']}" for b in bad)
    truncated = summary.get("truncated", [])
    if truncated:
        max_seconds = summary.get("params", {}).get("max_seconds")
        lines.append(f"truncated to {max_seconds} s: {len(truncated)} "
                     f"({', '.join(truncated[:10])}{', ...' if len(truncated) > 10 else ''})")
    ignored = summary.get("ignored", [])
    if ignored:
        lines.append(f"ignored {len(ignored)} non-audio files "
                     f"({', '.join(ignored[:10])}{', ...' if len(ignored) > 10 else ''})")
    return "\n".join(lines)


def show(data_dir: str, name: str, split: str = "train", n: int = 3) -> list[dict]:
    """The first N examples of a split, as dicts of numpy arrays and strings.

    Raises:
      DataError: the dataset or split does not exist.
    """
    source = open_split(data_dir, name, split)
    return [source[i] for i in range(min(int(n), len(source)))]


def captions(source, key: str = "caption", chunk: int = 256) -> list[str]:
    """Every caption of a split, in source order (what the tokenizer is trained on).

    Args:
      source: a SplitSource from `open_split` (or any sequence of example dicts).
      key: the text field to collect.
      chunk: examples read per batched read.

    Returns:
      list of str, one per example (empty strings included).
    """
    out = []
    for start in range(0, len(source), chunk):
        indices = range(start, min(start + chunk, len(source)))
        if hasattr(source, "__getitems__"):
            examples = source.__getitems__(list(indices))
        else:
            examples = [source[i] for i in indices]
        out.extend(str(e[key]) for e in examples)
    return out


class Column(Sequence):
    """`source[i][key]` (the whole example when `key` is None) for the first `n` examples, read
    when indexed: a host that handles some batches of a split reads only those."""

    def __init__(self, source, key: str | None, n: int | None = None):
        self.source, self.key = source, key
        self.n = len(source) if n is None else min(int(n), len(source))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.n))]
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} examples")
        example = self.source[index % self.n]
        return example if self.key is None else example[self.key]
