"""Codec experiment presets: parameter counts equal the released DAC checkpoints' manifest."""

import json
import os

import jax
import numpy as np
import pytest

from ldm_jax import config as config_lib
from ldm_jax.codec.model import make_codec

MANIFEST_KEYS = {"dac_44khz": "44khz", "dac_24khz": "24khz", "dac_16khz": "16khz",
                 "dac_44khz_16kbps": "44khz_16kbps"}


def count_params(model_cfg) -> int:
    codec = make_codec(model_cfg)
    x = jax.ShapeDtypeStruct((1, codec.config.hop_length, 1), np.float32)
    shapes = jax.eval_shape(lambda x: codec.init(jax.random.key(0), x), x)["params"]
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize("preset", sorted(MANIFEST_KEYS))
def test_preset_parameter_count_matches_manifest(preset, fixtures_dir):
    with open(os.path.join(fixtures_dir, "dac", "44khz_manifest.json")) as f:
        manifest = json.load(f)
    entry = manifest["configs"][MANIFEST_KEYS[preset]] if "configs" in manifest else \
        manifest[MANIFEST_KEYS[preset]]
    cfg = config_lib.get_config(f"codec:{preset}")
    assert count_params(cfg.model) == entry["num_parameters"]


def test_vae_preset_has_a_kl_bottleneck():
    cfg = config_lib.get_config("codec:vae")
    assert cfg.model.quantizer == "kl" and cfg.model.latent_dim == 64
    with pytest.raises(config_lib.ConfigError, match="unknown codec preset"):
        config_lib.get_config("codec:dac_8khz")


def test_dac_presets_train_with_dacs_loss_terms_only():
    # DAC's conf/base.yml: mel 15, feature matching 2, adversarial 1, commitment 0.25, codebook 1.
    cfg = config_lib.get_config("codec:dac_44khz")
    active = {k: v for k, v in cfg.loss_weights.items() if v and not k.startswith("kl/")}
    assert active == {"mel/loss": 15.0, "adv/feat_loss": 2.0, "adv/gen_loss": 1.0,
                      "vq/commitment_loss": 0.25, "vq/codebook_loss": 1.0}
