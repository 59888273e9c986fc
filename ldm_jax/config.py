"""Experiment configs: `experiments/*.py:get_config(arg)` files and `--config.a.b=value` overrides.

Follows big_vision's convention: one experiment is one Python file whose `get_config(arg=None)`
returns an `ml_collections.ConfigDict`; `FILE:arg` selects a variant. Overrides are type-checked
against the existing field, and an unknown key is an error that names it.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys
from collections.abc import Sequence

import ml_collections

# The embedded experiments ship inside the installed package tree (`experiments/`).
EXPERIMENTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "experiments")
DEFAULT_EXPERIMENT = "tiny"


class ConfigError(ValueError):
    """A config file or override a user wrote is wrong; the message says what to change."""


def resolve_experiment(spec: str) -> tuple[str, str | None]:
    """Splits `FILE[:arg]` and finds FILE as a path or as the name of an embedded experiment."""
    path, _, arg = spec.partition(":")
    candidates = [path, os.path.join(EXPERIMENTS_DIR, path),
                  os.path.join(EXPERIMENTS_DIR, path + ".py"),
                  os.path.join(EXPERIMENTS_DIR, os.path.basename(path))]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return os.path.abspath(candidate), (arg or None)
    embedded = sorted(f[:-3] for f in os.listdir(EXPERIMENTS_DIR)
                      if f.endswith(".py") and not f.startswith("_") and f != "common.py")
    raise ConfigError(f"config file {path!r} not found; give a path or one of: "
                      f"{', '.join(embedded)}")


def load_config(spec: str | None = None) -> ml_collections.ConfigDict:
    """Loads `get_config(arg)` from an experiment file.

    Args:
      spec: `path/to/exp.py[:arg]` or an embedded experiment name (`codec_tiny`); None loads the
        embedded default experiment.

    Returns:
      The unlocked ConfigDict, with `config_file` recording where it came from.
    """
    path, arg = resolve_experiment(spec or DEFAULT_EXPERIMENT)
    if EXPERIMENTS_DIR not in sys.path and os.path.dirname(EXPERIMENTS_DIR) not in sys.path:
        sys.path.insert(0, os.path.dirname(EXPERIMENTS_DIR))
    name = "ldm_jax_experiment_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"config file {path} has a syntax error at line {e.lineno}: "
                          f"{e.msg}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config()")
    try:
        cfg = module.get_config(arg) if arg is not None else module.get_config()
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{os.path.basename(path)}: {e}") from e
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"get_config() in {path} returned {type(cfg).__name__}, not a ConfigDict")
    with cfg.unlocked():
        cfg.config_file = f"{path}:{arg}" if arg else path
    return cfg


def _parse_value(text: str, current):
    """Parses an override string into the type of the field it replaces."""
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str):
        return text
    if current is None:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    value = ast.literal_eval(text)
    if isinstance(current, (tuple, list)):
        value = type(current)(value if isinstance(value, (tuple, list)) else (value,))
    return value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]):
    """Applies `a.b=value` overrides in place.

    Raises:
      ConfigError: for an unknown key (the message names it and lists its siblings) or a value
        that does not parse as the field's type.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} needs the form --config.{key}=VALUE")
        node = cfg
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(parts[:i]) or "the config"
                known = ", ".join(sorted(node.keys())) if isinstance(
                    node, ml_collections.ConfigDict) else "nothing (it is a value)"
                raise ConfigError(f"unknown config key {key!r}: {where} has {known}")
            if i < len(parts) - 1:
                node = node[part]
        current = node[parts[-1]]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"config key {key!r} is a section; set one of its fields instead")
        try:
            value = _parse_value(text, current)
        except (ValueError, SyntaxError) as e:
            raise ConfigError(f"bad value for --config.{key}: {e}") from e
        with node.ignore_type():
            node[parts[-1]] = value
    return cfg


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.a.b=v` / `--config.a.b v` overrides from the other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise ConfigError(f"override {arg} has no value")
                body = f"{body}={argv[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def get_config(spec: str | None = None, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`load_config` then `apply_overrides`: what every command does with its `--config` flags."""
    cfg = load_config(spec)
    apply_overrides(cfg, overrides)
    return cfg


def to_json(cfg: ml_collections.ConfigDict) -> str:
    """A stable JSON form of a config, used to detect a stage whose config changed."""
    return json.dumps(cfg.to_dict(), sort_keys=True, indent=2, default=str)
