"""Checkpoints: orbax CheckpointManager over the train state and the grain iterator state.

A checkpoint directory holds numbered steps written atomically by orbax (a step is written to a
temporary directory and renamed when complete, so a crash mid-write never leaves a step that
restores wrongly), plus `model_config.json`: the model section that fixes the parameter shapes, so a
checkpoint loaded with another config fails with a message naming what differs.

Training opens a `Checkpointer` on every host at once: orbax synchronises the hosts when it
creates, saves and restores. Everything that only reads a trained model (evaluation, latents,
generation, a stage's completeness) goes through `latest_step` and `read_state` instead: an
orbax manager over this process alone, restoring numpy arrays, which synchronises nobody and so
works on any subset of hosts.
"""

from __future__ import annotations

import json
import logging
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ldm_jax import parallel, paths
from ldm_jax.config import Section

MODEL_CONFIG = "model_config.json"


class CheckpointError(ValueError):
    """A checkpoint is missing or does not fit the config; the message says what to do."""


def _flatten(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable `key: saved -> current` lines for every field that differs."""
    a, b = _flatten(saved), _flatten(current)
    return [f"{k}: checkpoint has {a.get(k, '(absent)')!r}, config has {b.get(k, '(absent)')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class Checkpointer:
    """Saves and restores `{state, data}` composites in one directory.

    Args:
      directory: the checkpoint directory (local or gs://).
      keep: how many steps to keep.
      model_config: the model section the checkpoints must fit: a dict, or a config dataclass
        (`config.Section`), whose defaults then complete a checkpoint written before a field
        existed (a field added with a default does not make old checkpoints foreign).
      this_host_only: a manager over this process alone, which never waits for other hosts
        (reading a trained model; writing one on a single host). By default every host must
        open the manager together.
    """

    def __init__(self, directory: str, *, keep: int = 2, model_config: dict | None = None,
                 this_host_only: bool = False):
        # orbax refuses relative paths (tensorstore needs absolute ones); URLs such as gs:// pass.
        self.directory = epath.Path(paths.resolve(str(directory)))
        self._section = model_config if isinstance(model_config, Section) else None
        if self._section is not None:
            model_config = model_config.to_dict()
        self.model_config = json.loads(json.dumps(model_config, default=list)) \
            if model_config is not None else None
        if this_host_only:
            me = jax.process_index()
            self._process = ocp.options.MultiprocessingOptions(primary_host=me,
                                                               active_processes={me})
            # A manager over a subset of processes may not create its directory itself.
            paths.makedirs(str(self.directory))
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=False, enable_async_checkpointing=False,
                multiprocessing_options=self._process)
            # Its state item written by this process alone (the data iterator has no place here).
            handlers = {"state": ocp.StandardCheckpointHandler(
                multiprocessing_options=self._process)}
        else:
            parallel.require_all_hosts(f"the checkpoint manager of {self.directory}")
            self._process = ocp.options.MultiprocessingOptions()
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                   enable_async_checkpointing=False)
            handlers = None
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def check_config(self):
        """Raises CheckpointError if the directory was written with another model config."""
        path = self.directory / MODEL_CONFIG
        if self.model_config is None or not path.exists():
            return
        saved = json.loads(path.read_text())
        if self._section is not None:
            try:
                saved = json.loads(json.dumps(type(self._section).from_dict(saved).to_dict(),
                                              default=list))
            except (ValueError, TypeError):
                pass  # not a valid config of this kind: compared as written
        diffs = config_differences(saved, self.model_config)
        if diffs:
            raise CheckpointError(
                f"checkpoint in {self.directory} was written with another model config ("
                + "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")
                + "): use the config it was trained with or another workdir")

    def save(self, step: int, state, data_iterator=None):
        if self.model_config is not None and jax.process_index() == 0:
            path = self.directory / MODEL_CONFIG
            if not path.exists():
                path.write_text(json.dumps(self.model_config, indent=2, sort_keys=True))
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None and hasattr(data_iterator, "get_state"):
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()

    def restore(self, abstract_state, data_iterator=None, step: int | None = None):
        """Restores the state into the shardings of `abstract_state` (ShapeDtypeStructs).

        Args:
          abstract_state: pytree of jax.ShapeDtypeStruct with `.sharding` set.
          data_iterator: a grain iterator whose position is restored in place, if given.
          step: which step; the latest when None.

        Returns:
          The restored state pytree.
        """
        self.check_config()
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        has_data = (self.directory / str(step) / "data").exists()
        if data_iterator is not None and has_data and hasattr(data_iterator, "set_state"):
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"checkpoint {self.directory}/{step} does not fit this model "
                                  f"({first[:300]}); was it trained with another config?") from e
        if hasattr(data_iterator, "set_state") and not has_data:
            logging.warning("checkpoint %s/%d has no data-iterator state; data restarts",
                            self.directory, step)
        return restored["state"]

    def read(self, step: int | None = None) -> dict:
        """The saved state of `step` (default: the latest) as numpy arrays in this host's
        memory, whatever devices and hosts wrote them."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        reader = ocp.PyTreeCheckpointHandler(multiprocessing_options=self._process)
        path = self.directory / str(step) / "state"
        tree = reader.metadata(path).tree
        as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                          tree)
        try:
            return reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
        finally:
            reader.close()

    def close(self):
        self.manager.close()


def latest_step(directory: str) -> int | None:
    """The newest complete step in a checkpoint directory (None if none); synchronises no
    hosts."""
    if not paths.isdir(directory):
        return None
    ck = Checkpointer(directory, this_host_only=True)
    try:
        return ck.latest_step()
    finally:
        ck.close()


def read_state(directory: str, step: int | None = None) -> tuple[dict, int]:
    """A checkpoint's saved state as host numpy arrays, and its step; synchronises no hosts, so
    any subset of hosts may read a trained model.

    Raises:
      CheckpointError: DIRECTORY holds no complete checkpoint.
    """
    if not paths.isdir(directory):
        raise CheckpointError(f"no checkpoint in {directory}")
    ck = Checkpointer(directory, this_host_only=True)
    try:
        step = ck.latest_step() if step is None else int(step)
        if step is None:
            raise CheckpointError(f"no checkpoint in {directory}")
        return ck.read(step), step
    finally:
        ck.close()


def evaluation_params(state: dict, use_ema: bool = True):
    """The parameters a trained state is evaluated, sampled and exported with: its exponential
    moving average where it keeps one (and `use_ema`), else its parameters."""
    ema = state.get("ema_params")
    return ema if use_ema and ema else state["params"]


def read_params(stage_dir: str, *, use_ema: bool = True, step: int | None = None
                ) -> tuple[dict, int, dict]:
    """A trained stage's parameters, read on this host alone from STAGE_DIR/checkpoints.

    Returns:
      (parameters as jax arrays: the EMA where the state keeps one and `use_ema`, the step,
      the whole saved state as numpy arrays).

    Raises:
      CheckpointError: STAGE_DIR holds no complete checkpoint.
    """
    try:
        state, step = read_state(os.path.join(stage_dir, "checkpoints"), step)
    except CheckpointError:
        raise CheckpointError(f"no checkpoint in {stage_dir}/checkpoints; train the stage "
                              "first") from None
    params = jax.tree_util.tree_map(jax.numpy.asarray, evaluation_params(state, use_ema))
    return params, step, state


# --------------------------------------------------------------------------------- exported models

EXPORT_FORMAT = "ldm_jax.export/1"


def write_export(path: str, *, family: str, config: dict, variables: dict,
                 files: dict[str, bytes] | None = None, provenance: dict | None = None):
    """One portable file (msgpack) holding a trained model: its family, its config, its
    variables (EMA parameters where the run kept them), any small files it needs (a tokenizer)
    and where it came from. `read_export` and every family's `load()` read it without a workdir.
    """
    from flax import serialization

    payload = {"format": EXPORT_FORMAT, "family": family, "config": json.dumps(config),
               "variables": jax.tree_util.tree_map(np.asarray, variables),
               "files": dict(files or {}), "provenance": json.dumps(provenance or {})}
    paths.write_bytes(path, serialization.msgpack_serialize(payload))


def read_export(path: str, family: str | None = None) -> dict:
    """{"family", "config", "variables" (jax arrays), "files", "provenance"} of an exported
    model.

    Raises:
      CheckpointError: PATH is not an exported model (of FAMILY, when given).
    """
    from flax import serialization

    try:
        payload = serialization.msgpack_restore(paths.read_bytes(path))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path} is not an exported ldm_jax model ({e})") from None
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path} is not an exported ldm_jax model (format "
                              f"{EXPORT_FORMAT}); write one with `ldm-jax export`")
    if family is not None and payload["family"] != family:
        raise CheckpointError(f"{path} holds a {payload['family']} model, not a {family}")
    return {"family": payload["family"], "config": json.loads(payload["config"]),
            "variables": jax.tree_util.tree_map(jax.numpy.asarray, payload["variables"]),
            "files": dict(payload.get("files") or {}),
            "provenance": json.loads(payload.get("provenance") or "{}")}
