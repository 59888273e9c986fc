"""The attribute judge: a small log-mel classifier of instrument, pattern and drums.

Generated clips are judged on instrument by a model that shares nothing with the CLAP that
conditions the generator: a 1-D convolutional network over log-mel frames (mel bands as
channels), trained on the training split's labels. Each block is conv (width 3) - GroupNorm -
GELU - average pool 2; the frames are then pooled by mean and max over time, and one linear head
per attribute gives its logits. Works on clips of any length.

The model contract of every family: `JudgeConfig` (frozen; `from_dict` checks keys and types),
`make_model(config)`, `init_variables(model, rng)` and `load(path_or_preset)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import checkpoint, paths
from ldm_jax.audio import dsp
from ldm_jax.config import Section
from ldm_jax.data import synthetic
from ldm_jax.nn.layers import conv, dense, group_norm

CONFIG_FILE = "judge.json"  # the judge's config beside its checkpoints (names the family)
# The attributes judged and their classes (the synthetic generator's vocabulary).
LABELS = {"instrument": synthetic.INSTRUMENTS, "pattern": synthetic.PATTERNS,
          "with_drums": ("no", "yes")}


class JudgeError(ValueError):
    """Bad judge config or input (the message says which and why)."""


@dataclasses.dataclass(frozen=True)
class JudgeConfig(Section):
    """The judge's front end and network.

    Attributes:
      sample_rate: of the audio it judges.
      n_fft, hop_length, n_mels: its log-mel spectrogram.
      widths: channels of the convolutional blocks (each halves the frames).
      groups: GroupNorm groups.
      dropout: before the heads, in training.
      instrument, pattern, with_drums: the class names of each head.
    """

    SECTION: ClassVar[str] = "model"
    LABEL: ClassVar[str] = "judge config"
    ERROR: ClassVar[type[Exception]] = JudgeError

    sample_rate: int = 16000
    n_fft: int = 1024
    hop_length: int = 256
    n_mels: int = 64
    widths: tuple[int, ...] = (64, 128, 128, 128)
    groups: int = 8
    dropout: float = 0.1
    instrument: tuple[str, ...] = LABELS["instrument"]
    pattern: tuple[str, ...] = LABELS["pattern"]
    with_drums: tuple[str, ...] = LABELS["with_drums"]

    def __post_init__(self):
        for name in ("widths", "instrument", "pattern", "with_drums"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if min(self.widths, default=0) < 1 or any(w % self.groups for w in self.widths):
            raise JudgeError(f"model.widths {self.widths} must be positive multiples of "
                             f"model.groups={self.groups}")
        if self.hop_length < 1 or self.n_fft < self.hop_length or self.n_mels < 1:
            raise JudgeError("model.n_fft >= model.hop_length >= 1 and model.n_mels >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise JudgeError(f"model.dropout must be in [0, 1), got {self.dropout}")

    @property
    def heads(self) -> dict[str, tuple[str, ...]]:
        return {"instrument": self.instrument, "pattern": self.pattern,
                "with_drums": self.with_drums}


class Judge(nn.Module):
    """Audio [B, T] -> {attribute: logits [B, classes]}."""

    config: JudgeConfig

    @nn.compact
    def __call__(self, audio: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        c = self.config
        if audio.ndim != 2:
            raise JudgeError(f"the judge takes mono audio [batch, time], got {audio.shape}")
        x = dsp.log_mel(audio, c.sample_rate, n_fft=c.n_fft, hop_length=c.hop_length,
                        n_mels=c.n_mels)
        # Per clip and band: the judge hears timbre and pattern, not the overall level.
        x = (x - jnp.mean(x, axis=1, keepdims=True)) / (jnp.std(x, axis=1, keepdims=True) + 1.0)
        for i, width in enumerate(c.widths):
            x = conv(width, (3,), padding=1, name=f"conv_{i}")(x)
            x = nn.gelu(group_norm(c.groups, "conv_out", name=f"norm_{i}")(x))
            if x.shape[1] >= 2:
                x = nn.avg_pool(x, (2,), strides=(2,))
        pooled = jnp.concatenate([jnp.mean(x, axis=1), jnp.max(x, axis=1)], axis=-1)
        pooled = nn.Dropout(c.dropout)(pooled, deterministic=not train)
        return {name: dense(len(classes), ("conv_in", "classes"), name=f"head_{name}")(pooled)
                for name, classes in c.heads.items()}


PRESETS = {"judge_tiny": JudgeConfig()}


def make_model(config) -> Judge:
    """The Judge of a `JudgeConfig`, a `model` section / experiment config, or a preset name."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise JudgeError(f"unknown judge preset {config!r}; use one of "
                             f"{', '.join(PRESETS)}")
        config = PRESETS[config]
    elif not isinstance(config, JudgeConfig):
        config = JudgeConfig.from_dict(config["model"] if "model" in config else config)
    return Judge(config)


def init_variables(model: Judge, rng: jax.Array, *, boxed: bool = False) -> dict:
    """Fresh `{"params": ...}` (boxed with their logical axis names when `boxed`)."""
    audio = jnp.zeros((1, model.config.sample_rate // 2), jnp.float32)
    variables = jax.jit(lambda r: model.init(r, audio))(rng)
    return variables if boxed else nn.meta.unbox(variables)


def save_config(stage_dir: str, config: JudgeConfig) -> None:
    paths.write_text(os.path.join(stage_dir, CONFIG_FILE), json.dumps(config.to_dict()))


def load(source: str, *, rng: jax.Array | None = None) -> tuple[Judge, dict]:
    """The judge and its variables: a trained directory (W/judge) or a workdir W holding one, a
    model file from `ldm-jax export` (`.msgpack`), or a preset (freshly initialised)."""
    if source in PRESETS:
        model = make_model(source)
        return model, init_variables(model, jax.random.PRNGKey(0) if rng is None else rng)
    if source.endswith(".msgpack"):
        exported = checkpoint.read_export(source, "judge")
        return make_model(exported["config"]), exported["variables"]
    stage = source if paths.isfile(os.path.join(source, CONFIG_FILE)) else \
        os.path.join(source, "judge")
    path = os.path.join(stage, CONFIG_FILE)
    if not paths.isfile(path):
        raise JudgeError(f"no trained judge in {source} (missing {CONFIG_FILE}); run "
                         "`ldm-jax train judge` first")
    config = JudgeConfig.from_dict(json.loads(paths.read_text(path)))
    try:
        params, _, _ = checkpoint.read_params(stage)
    except checkpoint.CheckpointError:
        raise JudgeError(f"no checkpoint in {stage}/checkpoints; train the judge first") \
            from None
    return make_model(config), {"params": params}


class Predictor:
    """Jitted judgements of clips: `predict(clips) -> {attribute: [class names]}`."""

    def __init__(self, model: Judge, variables: dict):
        self.model, self.variables = model, variables
        self._fn = jax.jit(lambda v, x: {k: jnp.argmax(l, -1)
                                         for k, l in model.apply(v, x).items()})

    @classmethod
    def load(cls, source: str) -> Predictor:
        return cls(*load(source))

    @property
    def sample_rate(self) -> int:
        return self.model.config.sample_rate

    def predict(self, clips) -> dict[str, list[str]]:
        """Mono clips ([T] each, cut to the shortest) -> the class each head picks."""
        clips = [np.asarray(c, np.float32).reshape(-1) for c in clips]
        length = min(len(c) for c in clips)
        x = np.stack([c[:length] for c in clips])
        picks = jax.device_get(self._fn(self.variables, x))
        heads = self.model.config.heads
        return {k: [heads[k][int(i)] for i in v] for k, v in picks.items()}
