"""Provenance: what made an output (commit, versions, devices, seeds)."""

import json
import os
import subprocess

import jax

from ldm_jax import provenance


def test_record_names_the_commit_versions_devices_and_seeds():
    record = provenance.record(codec_seed=3, eval_seed=None)
    assert record["seeds"] == {"codec_seed": 3}
    assert record["versions"]["jax"] == jax.__version__ and record["versions"]["python"]
    assert record["devices"]["count"] == jax.device_count()
    assert record["devices"]["platform"] == jax.devices()[0].platform
    json.dumps(record)  # every field is JSON
    def git(*args):
        return subprocess.run(["git", "-C", provenance.REPO, *args], capture_output=True,
                              text=True, check=True).stdout.strip()

    try:
        top, head = git("rev-parse", "--show-toplevel"), git("rev-parse", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        top = head = None
    if top and os.path.samefile(top, provenance.REPO):
        assert record["commit"] == head and isinstance(record["dirty"], bool)
    else:
        assert record["commit"] is None  # not this project's checkout: nothing is invented
