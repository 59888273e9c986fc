"""The neural audio codec: model, bottlenecks and import of released DAC checkpoints."""

from ldm_jax.codec.convert import import_dac
from ldm_jax.codec.model import PRESETS, Codec, CodecConfig, init_variables, load, make_codec
from ldm_jax.codec.quantize import CodecError

__all__ = ["PRESETS", "Codec", "CodecConfig", "CodecError", "import_dac", "init_variables",
           "load", "make_codec"]
