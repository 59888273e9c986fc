"""Experiment configs: loading, FILE:arg variants and override errors."""

import pytest

from ldm_jax import config as config_lib


def test_embedded_default_loads():
    cfg = config_lib.get_config()
    assert cfg.data.name == "synthetic_music"
    assert cfg.config_file.endswith("tiny.py")


def test_overrides_are_typed():
    cfg = config_lib.get_config("tiny", ["data.num_train=256", "data.clip_seconds=1",
                                         "data.name=audio_folder", "log.progress=false"])
    assert cfg.data.num_train == 256 and isinstance(cfg.data.num_train, int)
    assert cfg.data.clip_seconds == 1.0 and isinstance(cfg.data.clip_seconds, float)
    assert cfg.data.name == "audio_folder"
    assert cfg.log.progress is False


def test_unknown_key_names_it():
    with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'data.num_trian'.*"
                                                     r"num_train"):
        config_lib.get_config("tiny", ["data.num_trian=3"])
    with pytest.raises(config_lib.ConfigError, match="unknown config key 'nope.x'"):
        config_lib.get_config("tiny", ["nope.x=3"])


def test_bad_value_and_missing_file():
    with pytest.raises(config_lib.ConfigError, match="bad value for --config.data.num_train"):
        config_lib.get_config("tiny", ["data.num_train=many"])
    with pytest.raises(config_lib.ConfigError, match="not found"):
        config_lib.get_config("no_such_experiment.py")


def test_split_config_args_both_forms():
    rest, overrides = config_lib.split_config_args(
        ["data", "build", "--config.data.seed=3", "--config.data.num_test", "5", "--x"])
    assert rest == ["data", "build", "--x"]
    assert overrides == ["data.seed=3", "data.num_test=5"]


def test_file_arg_variant(tmp_path):
    exp = tmp_path / "exp.py"
    exp.write_text("import ml_collections\n"
                   "def get_config(arg=None):\n"
                   "    c = ml_collections.ConfigDict()\n"
                   "    c.size = {'small': 1, 'big': 2}[arg or 'small']\n"
                   "    return c\n")
    assert config_lib.get_config(f"{exp}:big").size == 2
    assert config_lib.get_config(str(exp)).size == 1
