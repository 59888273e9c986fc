"""Experiment configs: loading, FILE:arg variants and override errors."""

import json

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


# ------------------------------------------------------------------- model config dataclasses

def test_sections_from_dict_name_unknown_and_mistyped_keys():
    from ldm_jax.clap.model import ClapConfig, ClapError
    from ldm_jax.codec.model import CodecConfig
    from ldm_jax.diffusion.config import DiffusionConfig, TrainConfig
    from ldm_jax.diffusion.schedules import DiffusionError
    from ldm_jax.diffusion.unet import UNetConfig

    with pytest.raises(DiffusionError, match=r"unknown U-Net config keys \['base_chanels'\].*"
                                             r"base_channels"):
        UNetConfig.from_dict({"base_chanels": 32})
    with pytest.raises(DiffusionError, match=r"model.base_channels='wide' must be an integer"):
        UNetConfig.from_dict({"base_channels": "wide"})
    with pytest.raises(DiffusionError, match=r"model.num_heads=2.5 must be an integer"):
        UNetConfig.from_dict({"num_heads": 2.5})
    with pytest.raises(DiffusionError, match=r"model.remat=1 must be true or false"):
        UNetConfig.from_dict({"remat": 1})
    with pytest.raises(ClapError, match=r"unknown CLAP text config keys \['widht'\]; "
                                        r"model.text takes"):
        ClapConfig.from_dict({"text": {"widht": 64}})
    with pytest.raises(ClapError, match=r"model.audio.stem_strides=2 must be a list"):
        ClapConfig.from_dict({"audio": {"stem_strides": 2}})
    with pytest.raises(config_lib.ConfigError, match=r"unknown codec config keys \['rates'\]"):
        CodecConfig.from_dict({"rates": (2, 4)})
    with pytest.raises(DiffusionError, match=r"diffusion.cond_drop='often' must be a number"):
        DiffusionConfig.from_dict({"cond_drop": "often"})
    with pytest.raises(DiffusionError, match=r"unknown LDM train config keys \['lr_shedule'\]"):
        TrainConfig.from_dict({"lr_shedule": "cosine"})


def test_sections_coerce_and_round_trip():
    from ldm_jax.clap.model import PRESETS as CLAP_PRESETS
    from ldm_jax.clap.model import ClapConfig
    from ldm_jax.diffusion.unet import PRESETS, UNetConfig

    c = UNetConfig.from_dict({"channel_mult": [1, 2, 4], "dropout": 0, "base_channels": 64.0})
    assert c.channel_mult == (1, 2, 4) and c.dropout == 0.0 and isinstance(c.dropout, float)
    assert c.base_channels == 64 and isinstance(c.base_channels, int)
    assert UNetConfig.from_dict(c.to_dict()) == c
    assert UNetConfig.from_dict(c.to_config_dict()) == c
    assert c.to_config_dict().channel_mult == (1, 2, 4)  # a tuple: overrides parse as lists
    base = CLAP_PRESETS["clap_base"]
    assert ClapConfig.from_dict(base.to_dict()) == base and base.text.width == 768
    assert ClapConfig.from_dict({"audio": {"fmax": 8000}}).audio.fmax == 8000.0
    assert ClapConfig.from_dict({"audio": {"fmax": None}}).audio.fmax is None
    assert PRESETS["ldm_base"].replace(dtype="float32").dtype == "float32"
    with pytest.raises(ValueError):
        PRESETS["ldm_base"].replace(channel_mult=())


def test_experiment_sections_restate_no_defaults():
    """The embedded experiments build their model sections from the dataclasses."""
    from ldm_jax.clap.model import ClapConfig
    from ldm_jax.codec.model import CodecConfig
    from ldm_jax.diffusion.config import DiffusionConfig, TrainConfig
    from ldm_jax.diffusion.unet import UNetConfig

    cfg = config_lib.get_config("tiny")
    assert set(cfg.codec.model) == {f for f in CodecConfig().to_dict()}
    assert set(cfg.clap.model.audio) == set(ClapConfig().audio.to_dict())
    assert set(cfg.ldm.model) == set(UNetConfig().to_dict())
    assert set(cfg.ldm.diffusion) == set(DiffusionConfig().to_dict())
    assert set(cfg.ldm.train) == set(TrainConfig().to_dict())
    # A field of any section can be overridden on the command line, with its type.
    cfg = config_lib.get_config("ldm_base", ["train.text_layer=-2", "model.context_pooling=none"])
    assert cfg.train.text_layer == -2


def test_a_field_added_with_its_default_does_not_make_a_stage_stale():
    from ldm_jax import chain

    cfg = config_lib.get_config("tiny")
    stages = {s.name: s for s in chain.default_stages()}
    current = chain.fingerprint(cfg, stages["codec"])
    recorded = {**current, "codec": {**current["codec"],
                                     "model": dict(current["codec"]["model"])}}
    del recorded["codec"]["model"]["ema_epsilon"]  # written before the field existed
    assert chain._with_defaults(recorded) == chain._with_defaults(current)
    recorded["codec"]["model"]["ema_epsilon"] = 1e-3  # a real change still counts
    assert chain._with_defaults(recorded) != chain._with_defaults(current)
    # A loss added switched off (weight 0) changes nothing the stage computes; switched on, it
    # does.
    recorded = json.loads(json.dumps(current))
    recorded["codec"]["loss_weights"].pop("waveform/level_loss")
    assert current["codec"]["loss_weights"]["waveform/level_loss"] == 0.0
    assert chain._with_defaults(recorded) == chain._with_defaults(current)
    recorded["codec"]["loss_weights"]["waveform/level_loss"] = 15.0
    assert chain._with_defaults(recorded) != chain._with_defaults(current)


def test_a_chain_experiment_declares_its_stages():
    from ldm_jax import chain

    cfg = config_lib.get_config("tiny")
    assert chain.is_chain(cfg) and not chain.is_chain(config_lib.get_config("codec_tiny"))
    assert [s.name for s in chain.stages_for(cfg)] == list(cfg.stages)
    with cfg.unlocked():
        cfg.stages = ("data", "tokenizer", "codec", "vampnet")
    with pytest.raises(config_lib.ConfigError, match="unknown stage.*vampnet"):
        chain.stages_for(cfg)
    with cfg.unlocked():
        cfg.stages = ("data", "codec_eval", "codec")
    with pytest.raises(config_lib.ConfigError, match="codec_eval reads codec"):
        chain.stages_for(cfg)


def test_layout_places_data_and_tokenizer_where_the_config_or_command_says(tmp_path):
    from ldm_jax import workdir

    cfg = config_lib.get_config("tiny")
    w = workdir.layout(cfg, str(tmp_path))
    assert w.data_dir == str(tmp_path / "data") and w.stage("ldm") == str(tmp_path / "ldm")
    assert w.tokenizer == str(tmp_path / "tokenizer" / "spm.model")
    assert w.logs("clap") == str(tmp_path / "logs" / "clap")
    with cfg.unlocked():
        cfg.data.data_dir = str(tmp_path / "shared")
    w = workdir.layout(cfg, str(tmp_path), tokenizer="/t/spm.model", latents=str(tmp_path / "z"))
    assert w.data_dir == str(tmp_path / "shared") and w.tokenizer == "/t/spm.model"
    assert w.stage("latents") == str(tmp_path / "z") and w.stage("clap") == str(tmp_path / "clap")


def test_one_sampling_options_type_for_samples_evaluation_and_generate():
    from ldm_jax.diffusion.config import (
        EvalConfig,
        GenerationConfig,
        eval_config,
        generation_config,
    )
    from ldm_jax.diffusion.schedules import DiffusionError

    ldm = config_lib.get_config("tiny").ldm
    g, e = generation_config(ldm), eval_config(ldm)
    assert g.sampling() == {"seconds": 2.0, "steps": 25, "sampler": "dpmpp_2m",
                            "cfg_scale": 3.0, "seed": 0, "negative_prompt": None}
    assert e.num_prompts == 64 and "negative_prompt" not in e.sampling()
    with pytest.raises(DiffusionError, match="unknown sampler 'heun'"):
        GenerationConfig.from_dict({"sampler": "heun"})
    with pytest.raises(DiffusionError, match="eval.seconds=-1.0 must be positive"):
        EvalConfig.from_dict({"seconds": -1})
    with pytest.raises(DiffusionError, match=r"unknown generation eval config keys \['prompts'\]"):
        EvalConfig.from_dict({"prompts": ["x"]})
