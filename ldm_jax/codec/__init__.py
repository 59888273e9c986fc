"""The neural audio codec: model, bottlenecks, training, and import of released DAC checkpoints.

The model contract of every family: `CodecConfig` (frozen; `CodecConfig.from_dict` checks the
keys), `make_model(config)` -> the Linen `Codec`, `init_variables(model, rng)`, and
`load(path_or_preset) -> (model, variables)` for a trained directory, a DAC `.pth`, a released
EnCodec `.th` or a preset.
"""

from ldm_jax.codec.convert import import_dac
from ldm_jax.codec.encodec_import import import_encodec
from ldm_jax.codec.inference import LoadedCodec, load, load_trained
from ldm_jax.codec.model import (
    PRESETS,
    Codec,
    CodecConfig,
    init_variables,
    make_codec,
    make_model,
)
from ldm_jax.codec.quantize import CodecError

__all__ = ["PRESETS", "Codec", "CodecConfig", "CodecError", "LoadedCodec", "import_dac",
           "import_encodec", "init_variables", "load", "load_trained", "make_codec",
           "make_model"]
