"""Checkpoints: orbax CheckpointManager over the train state and the grain iterator state.

A checkpoint directory holds numbered steps written atomically by orbax (a step is written to a
temporary directory and renamed when complete, so a crash mid-write never leaves a step that
restores wrongly), plus `model_config.json`: the model section that fixes the parameter shapes, so a
checkpoint loaded with another config fails with a message naming what differs.
"""

from __future__ import annotations

import json
import logging

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from ldm_jax import paths

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
    """Saves and restores `{state, data}` composites in one directory."""

    def __init__(self, directory: str, *, keep: int = 2, model_config: dict | None = None):
        # orbax refuses relative paths (tensorstore needs absolute ones); URLs such as gs:// pass.
        self.directory = epath.Path(paths.resolve(str(directory)))
        self.model_config = json.loads(json.dumps(model_config, default=list)) \
            if model_config is not None else None
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def check_config(self):
        """Raises CheckpointError if the directory was written with another model config."""
        path = self.directory / MODEL_CONFIG
        if self.model_config is None or not path.exists():
            return
        saved = json.loads(path.read_text())
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

    def restore_raw(self, step: int | None = None):
        """Restores the saved state as host numpy arrays without a target structure."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))
        return restored["state"]

    def close(self):
        self.manager.close()
