"""The attribute judge: instrument, pattern and drums from log-mel, independent of CLAP.

The model contract of every family: `JudgeConfig`, `make_model(config)` -> the Linen `Judge`,
`init_variables(model, rng)`, `load(path_or_preset) -> (model, variables)`; `Predictor` gives
class names for clips.
"""

from ldm_jax.judge.model import (
    LABELS,
    PRESETS,
    Judge,
    JudgeConfig,
    JudgeError,
    Predictor,
    init_variables,
    load,
    make_model,
)

__all__ = ["LABELS", "PRESETS", "Judge", "JudgeConfig", "JudgeError", "Predictor",
           "init_variables", "load", "make_model"]
