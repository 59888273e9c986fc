"""Experiment configs: `experiments/*.py:get_config(arg)` files and `--config.a.b=value` overrides.

Follows big_vision's convention: one experiment is one Python file whose `get_config(arg=None)`
returns an `ml_collections.ConfigDict`; `FILE:arg` selects a variant. Overrides are type-checked
against the existing field, and an unknown key is an error that names it.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import ml_collections
import numpy as np

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


# ------------------------------------------------------------------------------- config sections

@dataclasses.dataclass(frozen=True)
class Section:
    """Base of every model's frozen config dataclass (one config section, e.g. `model`).

    `from_dict` is derived from the dataclass's fields and their annotations: a missing key takes
    the field's default (defaults live only in the dataclass), an unknown key is an error that
    names it and lists the fields, and a value of the wrong type (a string for an int, a float
    that is not whole for an int, a number for a bool) is an error that names the key. Tuples
    accept lists, floats accept ints, nested sections accept mappings. Subclasses validate the
    values together in `__post_init__`.

    Class attributes: `SECTION`, the section's name in messages ("model"); `LABEL`, what it
    configures ("U-Net config"); `ERROR`, the exception type raised.
    """

    SECTION: ClassVar[str] = "model"
    LABEL: ClassVar[str] = "model config"
    ERROR: ClassVar[type[Exception]] = ConfigError

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None = None, *, section: str | None = None):
        """The config from a dict or ConfigDict of (some of) its fields."""
        section = section or cls.SECTION
        if isinstance(values, cls):
            return values
        if values is None:
            values = {}
        if hasattr(values, "to_dict"):
            values = values.to_dict()
        if not isinstance(values, Mapping):
            raise cls.ERROR(f"{section} must be a mapping of {cls.LABEL} fields, got "
                            f"{type(values).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise cls.ERROR(f"unknown {cls.LABEL} keys {unknown}; {section} takes "
                            f"{', '.join(fields)}")
        hints = typing.get_type_hints(cls)
        kwargs = {k: _coerce(v, hints[k], f"{section}.{k}", cls.ERROR)
                  for k, v in values.items()}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-ready dict (lists for tuples, dicts for nested sections)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.init}

    def to_config_dict(self) -> ml_collections.ConfigDict:
        """The section as an experiment's ConfigDict (tuples stay tuples, so that overrides on
        the command line parse as the field's type)."""
        def convert(value):
            if isinstance(value, Section):
                return value.to_config_dict()
            return value
        return ml_collections.ConfigDict({f.name: convert(getattr(self, f.name))
                                          for f in dataclasses.fields(self) if f.init})

    @classmethod
    def config(cls, **overrides) -> ml_collections.ConfigDict:
        """The experiment section: the defaults with OVERRIDES, checked (for experiment files)."""
        return cls.from_dict(overrides).to_config_dict()

    def replace(self, **changes):
        """A copy with some fields changed (checked like `from_dict`)."""
        return type(self).from_dict({**self.to_dict(), **changes})


def _plain(value):
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value, hint, name: str, error: type[Exception]):
    """VALUE as the annotated type HINT of field NAME, or ERROR naming it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        problems = []
        for option in options:
            try:
                return _coerce(value, option, name, error)
            except error as e:
                problems.append(str(e))
        raise error(problems[0] if len(problems) == 1 else
                    f"{name}={value!r} is not a {' or '.join(map(_type_name, args))}")
    if isinstance(hint, type) and issubclass(hint, Section):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping) and not hasattr(value, "to_dict"):
            raise error(f"{name} must be a section (a mapping of {hint.LABEL} fields), got "
                        f"{value!r}")
        return hint.from_dict(value, section=name)
    if origin is tuple:
        if not isinstance(value, tuple | list):
            raise error(f"{name}={value!r} must be a list of values")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{name}[{i}]", error) for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise error(f"{name}={value!r} must have {len(args)} values")
        return tuple(_coerce(v, a, f"{name}[{i}]", error) if args else v
                     for i, (v, a) in enumerate(zip(value, args or [Any] * len(value))))
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if hasattr(value, "to_dict"):
            value = value.to_dict()
        if not isinstance(value, Mapping):
            raise error(f"{name}={value!r} must be a mapping")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool | np.bool_):
            return bool(value)
        raise error(f"{name}={value!r} must be true or false")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise error(f"{name}={value!r} must be an integer")
        if float(value) != int(value):
            raise error(f"{name}={value!r} must be an integer")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise error(f"{name}={value!r} must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise error(f"{name}={value!r} must be a string")
        return value
    return value

