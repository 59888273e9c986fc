"""CLAP: the contrastive text-audio model whose text states condition generation.

The model contract of every family: `ClapConfig` (frozen, with `TextConfig` and `AudioConfig`
sections), `make_model(config)` -> the Linen `Clap`, `init_variables(model, rng)`, and
`load(path_or_preset) -> (model, variables)`. `ClapModel` adds the run's tokenizer and jitted
embedders, for captions and clips from Python.
"""

from ldm_jax.clap.model import (
    PRESETS,
    AudioConfig,
    Clap,
    ClapConfig,
    ClapError,
    ClapModel,
    TextConfig,
    embed_audio,
    embed_text,
    init_variables,
    load,
    make_model,
    text_states,
)
from ldm_jax.clap.text import Tokenizer

__all__ = ["PRESETS", "AudioConfig", "Clap", "ClapConfig", "ClapError", "ClapModel", "TextConfig",
           "Tokenizer", "embed_audio", "embed_text", "init_variables", "load", "make_model",
           "text_states"]
