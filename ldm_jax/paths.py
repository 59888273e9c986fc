"""File system paths for local and remote (gs://) workdirs and data dirs.

A workdir or a data dir may be a local path or a URL that `etils.epath` knows (`gs://bucket/run`,
also `s3://`, `az://`). Local paths go through `os` and `shutil`, writing the same bytes as
before; remote paths go through `epath.Path`, which without TensorFlow reaches Cloud Storage
through fsspec's `gcs` filesystem (the gcsfs package: `pip install -e ".[gcs]"`). Object stores
differ from disks in ways the functions here absorb:

- an object appears whole when its write completes, so a remote write needs no temporary name,
  while a local file is written beside its destination and renamed into place;
- an object cannot be appended to, and a "directory" is only a name prefix: nothing exists until
  a file is written under it, and renaming one copies every object;
- libraries that need a real file get one: `SyncedDir` gives a library that fills a directory
  (tensorboardX) a local one copied up at each `sync`, `copy_tree` copies up a directory built
  locally (ArrayRecord's writer takes local paths only) and `local_mirror` keeps a local copy of a
  remote directory for random-access reading.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable

from etils import epath

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Where `local_mirror` keeps its copies (override with LDM_JAX_CACHE).
CACHE_ENV = "LDM_JAX_CACHE"


def is_remote(path) -> bool:
    """Whether PATH is a URL (`gs://...`) rather than a local path."""
    return bool(_URL.match(os.fspath(path)))


def resolve(path) -> str:
    """A local path made absolute (with `~` expanded); a URL as given, without a trailing `/`."""
    path = os.fspath(path)
    if is_remote(path):
        return path.rstrip("/") if not path.endswith("://") else path
    return os.path.abspath(os.path.expanduser(path))


def join(path, *parts: str) -> str:
    """`os.path.join` for local paths, `/`-joined for URLs."""
    path = os.fspath(path)
    if is_remote(path):
        return "/".join([path.rstrip("/")] + [p.strip("/") for p in parts if p])
    return os.path.join(path, *parts)


def _remote(path) -> epath.Path:
    return epath.Path(os.fspath(path))


def exists(path) -> bool:
    return _remote(path).exists() if is_remote(path) else os.path.exists(path)


def isfile(path) -> bool:
    return _remote(path).is_file() if is_remote(path) else os.path.isfile(path)


def isdir(path) -> bool:
    """For a URL: whether any object lies under the prefix (object stores have no empty dirs)."""
    return _remote(path).is_dir() if is_remote(path) else os.path.isdir(path)


def getsize(path) -> int:
    return int(_remote(path).stat().length) if is_remote(path) else os.path.getsize(path)


def makedirs(path) -> None:
    """Creates PATH and its parents if missing (a no-op on object stores, whose dirs are implicit
    in the names of the objects under them)."""
    if is_remote(path):
        _remote(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def listdir(path) -> list[str]:
    """The names in directory PATH, sorted."""
    if is_remote(path):
        return sorted(p.name for p in _remote(path).iterdir())
    return sorted(os.listdir(path))


def remove(path) -> None:
    """Removes file PATH if it exists."""
    if is_remote(path):
        _remote(path).unlink(missing_ok=True)
    elif os.path.lexists(path):
        os.remove(path)


def rmtree(path) -> None:
    """Removes directory PATH and everything under it, if it exists."""
    if is_remote(path):
        if _remote(path).exists():
            _remote(path).rmtree(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def read_bytes(path) -> bytes:
    if is_remote(path):
        return _remote(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def read_text(path) -> str:
    if is_remote(path):
        return _remote(path).read_text()
    with open(path) as f:
        return f.read()


def write_bytes(path, data: bytes) -> None:
    """Writes a whole file at once, creating its parents: a reader sees the old content or the
    new, never part of it (locally through a sibling temporary file and a rename)."""
    path = os.fspath(path)
    if is_remote(path):
        _remote(path).write_bytes(data)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path, text: str) -> None:
    """`write_bytes` of UTF-8 text."""
    write_bytes(path, text.encode("utf-8"))


def copy_file(src, dst) -> None:
    """Copies one file between any two places (local or remote)."""
    if not is_remote(src) and not is_remote(dst):
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        shutil.copyfile(src, dst)
    else:
        write_bytes(dst, read_bytes(src))


def _walk_files(path) -> list[str]:
    """Relative `/`-separated names of every file under directory PATH, sorted."""
    out = []
    if is_remote(path):
        # fsspec walks in `bucket/key` names, without the scheme.
        base = resolve(path).split("://", 1)[1].strip("/")
        for directory, _, files in _remote(path).walk():
            rel = os.fspath(directory).split("://", 1)[-1].strip("/")[len(base):].strip("/")
            out += [f"{rel}/{f}" if rel else f for f in files]
    else:
        for directory, _, files in os.walk(path):
            rel = os.path.relpath(directory, path).replace(os.sep, "/")
            out += [f if rel == "." else f"{rel}/{f}" for f in files]
    return sorted(out)


def _ordered(names: list[str], last: Iterable[str]) -> list[str]:
    last = set(last)
    return [n for n in names if n.split("/")[-1] not in last] + \
        [n for n in names if n.split("/")[-1] in last]


def copy_tree(src, dst, *, last: Iterable[str] = ()) -> None:
    """Copies every file under directory SRC to DST, files named in LAST after all others.

    A reader that takes LAST (a completion marker such as `dataset_info.json`) as the sign that
    the directory is whole never sees a partial copy, though an object store copies file by file.
    """
    for rel in _ordered(_walk_files(src), last):
        copy_file(join(src, *rel.split("/")), join(dst, *rel.split("/")))



def move_tree(src, dst, *, last: Iterable[str] = ()) -> None:
    """Replaces directory DST by SRC: a rename on a disk; on an object store, a copy with the
    files named in LAST written last, then the removal of SRC."""
    if not is_remote(src) and not is_remote(dst):
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        os.rename(src, dst)
        return
    rmtree(dst)
    copy_tree(src, dst, last=last)
    rmtree(src)


def cache_dir() -> str:
    """Where local copies of remote data live: $LDM_JAX_CACHE or ~/.cache/ldm_jax."""
    return os.path.abspath(os.path.expanduser(
        os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "ldm_jax")))


def local_mirror(path, key_files: Iterable[str] = ()) -> str:
    """A local copy of directory PATH (PATH itself when it is local), fetched once per content.

    The copy is named by the URL and the bytes of KEY_FILES under PATH (for a TFDS dataset its
    `dataset_info.json` and `metadata.json`, which change whenever it is rebuilt differently), so
    a changed remote directory is fetched again and older copies of it are removed. A copy is
    downloaded under a temporary name and renamed, so processes sharing the cache never read a
    partial one.

    Args:
      path: a directory, local or remote.
      key_files: names of files under PATH whose content identifies its version.

    Returns:
      A local directory holding the same files.
    """
    path = resolve(path)
    if not is_remote(path):
        return path
    digest = hashlib.sha256()
    for name in key_files:
        digest.update(name.encode() + b"\0")
        file = join(path, name)
        digest.update(read_bytes(file) if exists(file) else b"")
    parent = os.path.join(cache_dir(), "remote", hashlib.sha256(path.encode()).hexdigest()[:16])
    target = os.path.join(parent, digest.hexdigest()[:16])
    if os.path.isdir(target):
        return target
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".incomplete.")
    try:
        copy_tree(path, tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same copy first
            if not os.path.isdir(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in os.listdir(parent):
        if old != os.path.basename(target) and not old.startswith("."):
            shutil.rmtree(os.path.join(parent, old), ignore_errors=True)
    return target


class SyncedDir:
    """A local directory whose new and changed files `sync()` copies to a remote directory.

    For libraries that fill a directory themselves and append to their files (tensorboardX's
    event files): they write locally, and the remote copy follows at each `sync()` and at
    `close()`. For a local REMOTE, `local` is REMOTE itself and syncing does nothing.

    Attributes:
      remote: the destination directory.
      local: the directory to hand to the library.
    """

    def __init__(self, remote: str):
        self.remote = resolve(remote)
        self._temporary = is_remote(self.remote)
        self.local = tempfile.mkdtemp(prefix="ldm_jax_sync.") if self._temporary else self.remote
        self._sent: dict[str, tuple[int, int]] = {}

    def sync(self) -> None:
        """Copies the files created or changed since the last sync."""
        if not self._temporary:
            return
        for rel in _walk_files(self.local):
            local = os.path.join(self.local, *rel.split("/"))
            stat = os.stat(local)
            signature = (stat.st_size, stat.st_mtime_ns)
            if self._sent.get(rel) != signature:
                copy_file(local, join(self.remote, *rel.split("/")))
                self._sent[rel] = signature

    def close(self) -> None:
        """A last sync, then the local copy is removed."""
        if self._temporary:
            self.sync()
            shutil.rmtree(self.local, ignore_errors=True)
