"""`ldm-jax export W/STAGE -o MODEL.msgpack`: a trained stage as one portable file.

The file holds the model's family, its config, its variables (the EMA parameters where the run
kept them, the codec's codebook statistics), the files it needs (CLAP's tokenizer) and its
provenance; `ldm_jax.codec.load`, `ldm_jax.clap.load`, `ldm_jax.diffusion.load` and
`ldm_jax.judge.load` read it without a workdir.
"""

from __future__ import annotations

import json
import os

from ldm_jax import checkpoint, paths, provenance
from ldm_jax.config import ConfigError

FAMILIES = ("codec", "clap", "ldm", "judge")


def family_of(stage_dir: str) -> str:
    """Which trained stage STAGE_DIR holds (codec, clap or ldm), from the files beside its
    checkpoints."""
    from ldm_jax.clap.model import CONFIG_FILE as CLAP_CONFIG
    from ldm_jax.clap.model import TOKENIZER_FILE
    from ldm_jax.diffusion.config import STATS_FILE
    from ldm_jax.judge.model import CONFIG_FILE as JUDGE_CONFIG

    def has(*names):
        return paths.isfile(os.path.join(stage_dir, *names))

    if has(JUDGE_CONFIG):
        return "judge"
    if has(CLAP_CONFIG) and has(TOKENIZER_FILE):
        return "clap"
    if has("config.json") and has(STATS_FILE):
        return "ldm"
    if has("checkpoints", checkpoint.MODEL_CONFIG):
        return "codec"
    raise ConfigError(f"{stage_dir} is not a trained stage directory: give W/codec, W/clap, "
                      "W/ldm or W/judge")


def export(stage_dir: str, out: str, *, use_ema: bool = True) -> dict:
    """Writes the latest checkpoint of STAGE_DIR to OUT (one msgpack file).

    Returns:
      {"family", "path", "step", "parameters"}.
    """
    import jax

    if not out.endswith(".msgpack"):
        raise ConfigError(f"name the model file MODEL.msgpack (got {out}): load() recognises "
                          "exported models by that suffix")
    stage_dir = paths.resolve(stage_dir)
    family = family_of(stage_dir)
    params, step, state = checkpoint.read_params(stage_dir, use_ema=use_ema)
    variables = {"params": params}
    files = {}
    if family == "codec":
        model_config = json.loads(paths.read_text(
            os.path.join(stage_dir, "checkpoints", checkpoint.MODEL_CONFIG)))
        config = {"model": model_config}
        if state.get("stats"):
            from ldm_jax.codec.quantize import STATS
            variables[STATS] = state["stats"]
    elif family == "judge":
        from ldm_jax.judge.model import CONFIG_FILE as JUDGE_CONFIG
        config = json.loads(paths.read_text(os.path.join(stage_dir, JUDGE_CONFIG)))
    else:
        config = json.loads(paths.read_text(os.path.join(stage_dir, "config.json")))
    if family == "clap":
        from ldm_jax.clap.model import TOKENIZER_FILE
        files[TOKENIZER_FILE] = paths.read_bytes(os.path.join(stage_dir, TOKENIZER_FILE))
    if family == "ldm":
        from ldm_jax.diffusion.config import STATS_FILE
        files[STATS_FILE] = paths.read_bytes(os.path.join(stage_dir, STATS_FILE))
    record = {**provenance.record(seed=config.get("seed")), "stage_dir": stage_dir,
              "step": step, "ema": use_ema and bool(state.get("ema_params"))}
    checkpoint.write_export(out, family=family, config=config, variables=variables,
                            files=files, provenance=record)
    count = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
    return {"family": family, "path": paths.resolve(out), "step": step, "parameters": count}
