"""What produced an output: the commit, the library versions, the devices and the seeds.

Every file a run writes for people to compare (evaluation JSON, the report, an exported model,
a benchmark record) carries `record(...)`, so that two numbers are only compared when they came
from comparable code and hardware.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import os
import platform
import subprocess

PACKAGES = ("ldm-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
            "tensorflow-datasets", "numpy")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


@functools.cache
def commit() -> dict:
    """{"commit": the checkout's HEAD (None outside a git checkout), "dirty": tracked files
    differ from it}."""
    top = _git("rev-parse", "--show-toplevel")
    # Only this project's own checkout counts (not a repository it is installed inside).
    head = _git("rev-parse", "HEAD") if top and os.path.samefile(top, REPO) else None
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no")) if head else None
    return {"commit": head, "dirty": dirty}


@functools.cache
def versions() -> dict:
    """Installed versions of the packages that decide the numbers (None where absent)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def devices() -> dict:
    """The JAX platform, device kind and counts (global and per host)."""
    import jax

    device = jax.devices()[0]
    return {"platform": device.platform, "kind": device.device_kind,
            "count": jax.device_count(), "local_count": jax.local_device_count(),
            "process_count": jax.process_count(), "host_cpus": os.cpu_count()}


def record(**seeds) -> dict:
    """The provenance block of an output file; SEEDS names the seeds that decided it."""
    return {**commit(), "versions": versions(), "devices": devices(),
            "seeds": {k: v for k, v in seeds.items() if v is not None},
            "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
